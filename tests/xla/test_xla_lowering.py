"""XLA lowering check of the neuron graphs, on CPU (PJRT_DEVICE=CPU), no Neuron needed.

NxD Core's ModelBuilder traces through torch-xla, so this is the closest check available off Neuron
hardware: the one NeuronBucketGraph module every tag is traced from (its `spec` switched per call,
its cache buffers shared by every tag, as ModelBuilder shares state) is lowered by torch-xla and run
on its CPU backend, with neuronx-distributed's parallel layers at world size 1 (the test double's,
which are plain linears there). It shows, per graph:
1. every bucket lowers to one static graph, compiled once, and a second mixed workload (prefills in
   two buckets, chunked prompts and prefix-cache resumes on chunk graphs of two sizes over two past
   spans, decodes whose batch and span change, slot copies into and out of a prefix-cache store row
   past the sequence slots) compiles nothing;
2. the HLO has no f64, and no -inf constant except as a max-reduction's start value (softmax's own);
3. every scatter/gather index operand is bounded by the bucket's own K/V size (L x KV x rows x D,
   rows = S, B or one slot's positions), never L x KV x max_len x D per write (NEURON.md §12);
4. the greedy tokens equal the cpu target's math (compile.model run eagerly with the cache written
   outside the graph, as CpuRunner does), and only slot copies write the store rows.
All of it for a Llama config and for a Gemma one (every Gemma feature at once: (1 + w) norms around both
sublayers, q/k norms, head_dim 32, GeGLU, scaled embeddings, attention and final soft-capping, a window of 12
on layer 0 only, and that sliding layer's own rope base).

Run for Llama and for Phi-3 as Kiln loads it (rope on half of each head and the rest passed through,
LongRoPE's factors in rope.inv_freq and its attention factor on cos/sin).

Needs torch-xla and its pinned torch (2.9): run scripts/xla_check.sh, which builds a separate venv
(.ci/run does). Skipped wherever torch_xla is not importable (the main environment).
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")
torch_xla = pytest.importorskip("torch_xla")

import torch  # noqa: E402
import torch_xla.core.xla_model as xm  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402

import dataclasses  # noqa: E402
import re  # noqa: E402
from dataclasses import replace  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

from compile.buckets import GraphSpec  # noqa: E402
from compile.model import ModelConfig, Weights, decode, prefill, weight_names  # noqa: E402
from compile.neuron.graphs import COPY_SLOT, NeuronBucketGraph, weight_shapes  # noqa: E402
from compile.quantize import SCALE_SUFFIX, quantize_weights  # noqa: E402
from neuron import neuron_double  # noqa: E402

pytestmark = pytest.mark.xla
sync = getattr(torch_xla, "sync", xm.mark_step)  # torch_xla.sync is the newer name

LLAMA = ModelConfig(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                    rope_type="default", rope_attention_scaling=1.0, attention_bias=False, tie_word_embeddings=True,
                    sliding_window=None, max_position_embeddings=512, bos_token_id=None, eos_token_ids=())
# NOTE: head_dim 32 (q_proj wider than hidden, as Gemma's are): a cache of the Llama config's shape would let
# XLA's compile cache serve the weightless copy_slot graph from the first config's run.
GEMMA = replace(LLAMA, architecture="Gemma3ForCausalLM", head_dim=32, rope_theta=1e6, sliding_window=12,
                qk_norm=True, hidden_act="gelu_pytorch_tanh", norm_add_one=True, embedding_multiplier=8.0, sandwich_norms=True,
                query_pre_attn_scalar=24.0, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                full_attention_layers=(1,), rope_local_base_freq=10000.0)
# MoE (Qwen3-MoE: q/k norms, 4 experts top 2 renormalised, layer 1 dense): routing, top-k and every expert
# computed and masked, in one static graph per bucket like the rest. One KV head of 32 gives it a cache shape
# of its own, so its copy_slot graph is not another config's again (a compile the count would miss).
MOE = replace(LLAMA, architecture="Qwen3MoeForCausalLM", qk_norm=True, num_kv_heads=1, head_dim=32, num_experts=4,
              num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True, dense_layers=(1,))
# int8 weights (compile/quantize.py): NxD's quantized parallel layers (the double's), the int8 weight cast to the
# dtype for the matmul, then the float32 scales. One KV head of 16: a cache shape of its own, as above.
INT8 = replace(LLAMA, quantization="int8", num_kv_heads=1)
# Phi-3 as compile/checkpoint.py leaves it: q/k/v and gate/up split out of the fused checkpoint tensors (so the
# graphs' weights are Llama's), rope on the first half of each head only, LongRoPE's long factors and its
# attention factor (sqrt(1 + ln 4 / ln 32)) folded into rope.inv_freq and cos/sin. As many KV heads as heads
# (Phi-3-mini's): a cache shape of its own, as above.
PHI3 = replace(LLAMA, architecture="Phi3ForCausalLM", num_kv_heads=4, partial_rotary_factor=0.5,
               rope_type="longrope", rope_attention_scaling=1.1832159566199232, longrope_factors="long")
CONFIGS = {"llama": LLAMA, "gemma": GEMMA, "qwen3moe": MOE, "llama-int8": INT8, "phi3-partial-longrope": PHI3}
SLOTS, MAX_LEN, CONTEXT = 4, 64, (16, 32)
# prefix-cache store rows: cache rows SLOTS.. past the sequence slots (CompileConfig.num_cache_rows)
STORE = 2
ROWS = SLOTS + STORE
# prefill_chunk graphs: a small chunk and chunk_len (CONTEXT[-1]), each over the past spans >= chunk_len
CHUNKS, PASTS = (16, 32), (32, 64)
SPECS = [GraphSpec("prefill", seq_len=s) for s in CONTEXT] + [
    GraphSpec("prefill_chunk", seq_len=s, kv_len=p) for s in CHUNKS for p in PASTS] + [
    GraphSpec("decode", batch=b, kv_len=k) for b in (1, 2, 4) for k in (32, 64)] + [COPY_SLOT]


def chunk_shape(n: int, start: int) -> tuple[int, int]:
    """As BucketedRunner.prefill_spec picks: the smallest chunk holding n, then the smallest span holding start."""
    return next(c for c in CHUNKS if c >= n), next(p for p in PASTS if p >= start)


def random_weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in weight_shapes(cfg).items():
        if name.startswith("rope.") or name == "lm_head.weight" or name.endswith(SCALE_SUFFIX):
            continue
        weights[name] = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.08
    if "lm_head.weight" in weight_names(cfg):
        weights["lm_head.weight"] = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g) * 0.08
    d = cfg.rotary_dim
    exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    factors = 2 + 6 * torch.rand(d // 2, generator=g) if cfg.rope_type == "longrope" else torch.ones(d // 2)
    for name, theta in (("rope.inv_freq", cfg.rope_theta), ("rope.local_inv_freq", cfg.rope_local_base_freq)):
        if name in weight_names(cfg):
            weights[name] = 1.0 / ((factors if name == "rope.inv_freq" else 1.0) * theta ** exponents)
    return quantize_weights(cfg, weights) if cfg.quantization else weights


class CpuReference:
    """The cpu target's math: compile.model eagerly, new K/V written into host caches outside."""

    def __init__(self, cfg, weights):
        self.w = Weights(cfg, [weights[n] for n in weight_names(cfg)])
        self.k = torch.zeros(cfg.num_layers, ROWS, cfg.num_kv_heads, MAX_LEN, cfg.head_dim)
        self.v = torch.zeros(cfg.num_layers, ROWS, cfg.num_kv_heads, MAX_LEN, cfg.head_dim)

    def prefill(self, slot, ids, start):
        n, s = len(ids), (chunk_shape(len(ids), start)[0] if start else next(c for c in CONTEXT if c >= len(ids)))
        x = torch.zeros(s, dtype=torch.int64)
        x[:n] = torch.tensor(ids)
        past = (self.k[:, slot], self.v[:, slot]) if start else ()
        logits, nk, nv = prefill(self.w, x, torch.tensor(start), torch.tensor(n - 1), *past)
        self.k[:, slot, :, start:start + n] = nk[:, :, :n]
        self.v[:, slot, :, start:start + n] = nv[:, :, :n]
        return logits

    def decode(self, ids, pos):
        b, span = len(ids), next(k for k in (32, 64) if k >= max(pos))
        logits, nk, nv = decode(self.w, torch.tensor(ids), torch.tensor(pos), self.k[:, :b, :, :span],
                                self.v[:, :b, :, :span])
        rows, at = torch.arange(b), torch.tensor(pos)
        self.k[:, rows, :, at] = nk.permute(1, 0, 2, 3)
        self.v[:, rows, :, at] = nv.permute(1, 0, 2, 3)
        return logits

    def copy_slot(self, src, dst, length):
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


def install_parallel_layers() -> None:
    """neuronx-distributed's parallel layers at world size 1 (the test double's: plain linears)."""
    layers = types.ModuleType("neuronx_distributed.parallel_layers")
    layers.ColumnParallelLinear = neuron_double.ColumnParallelLinear
    layers.RowParallelLinear = neuron_double.RowParallelLinear
    sys.modules.setdefault("neuronx_distributed", types.ModuleType("neuronx_distributed"))
    sys.modules["neuronx_distributed.parallel_layers"] = layers
    quantized = types.ModuleType("neuronx_distributed.quantization.quantization_layers")
    quantized.QuantizedColumnParallel = neuron_double.QuantizedColumnParallel
    quantized.QuantizedRowParallel = neuron_double.QuantizedRowParallel
    sys.modules.setdefault("neuronx_distributed.quantization", types.ModuleType("neuronx_distributed.quantization"))
    sys.modules["neuronx_distributed.quantization.quantization_layers"] = quantized


class XlaGraphs:
    """The one module on the XLA device: every tag reads and reassigns the same cache buffers."""

    def __init__(self, cfg, weights):
        install_parallel_layers()
        self.device = torch_xla.device() if hasattr(torch_xla, "device") else xm.xla_device()
        module = NeuronBucketGraph(cfg, SPECS[0], ROWS, MAX_LEN, torch.float32, 1)
        checkpoint = dict(weights, **{"lm_head.weight": weights["model.embed_tokens.weight"]})
        for name, value in checkpoint.items():
            neuron_double.set_tensor(module, name, value.clone())
        self.module = module.to(self.device)
        self.specs = {spec.name: spec for spec in SPECS}
        self.hlo: dict[str, str] = {}  # the first lowering of each graph

    def run(self, name, *inputs):
        self.module.spec = self.specs[name]
        out = self.module(*(t.to(self.device) for t in inputs))
        if name not in self.hlo:
            self.hlo[name] = torch_xla._XLAC._get_xla_tensors_hlo([out, self.module.cache_k, self.module.cache_v])
        sync()  # one graph per call: the output and the new state materialize together
        return out.cpu()

    def prefill(self, slot, ids, start):
        n = len(ids)
        if start:
            s, past = chunk_shape(n, start)
            name = f"prefill_chunk_s{s}_p{past}"
        else:
            s = next(c for c in CONTEXT if c >= n)
            name = f"prefill_s{s}"
        x = torch.zeros(s, dtype=torch.int64)
        x[:n] = torch.tensor(ids)
        return self.run(name, x, torch.tensor([start]), torch.tensor([n - 1]), torch.tensor([slot]))

    def decode(self, ids, pos):
        n, span = len(ids), next(k for k in (32, 64) if k >= max(pos))
        b = next(x for x in (1, 2, 4) if x >= n)
        # padding rows as NeuronRunner pads them: token 0 at the never-read last position
        x, at = torch.zeros(b, dtype=torch.int64), torch.full((b,), MAX_LEN - 1, dtype=torch.int64)
        x[:n], at[:n] = torch.tensor(ids), torch.tensor(pos)
        return self.run(f"decode_b{b}_k{span}", x, at)[:n]

    def copy_slot(self, src, dst, length):
        self.run(COPY_SLOT.name, *(torch.tensor([v]) for v in (src, dst, length)))


def workload(runner, seed: int, vocab_size: int) -> list[int]:
    """Every bucket: prefill 16/32, chunked prompts (chunks of 16 and 32 at start 32), decode batches 1/2/4
    (one with a padding row) at spans 32 and 64, a sequence stored into a store row and resumed from it
    twice (chunks of 16 and 32 past start 32: the 64 span); slots re-prefilled in between, as the engine
    does when a sequence is replaced."""
    g = torch.Generator().manual_seed(seed)
    tokens, pos, last, stored = [], {}, {}, {}

    def take(slot, logits):
        tokens.append(int(logits.argmax()))
        last[slot] = tokens[-1]

    def prefill(slot, ids, start):
        for at in range(start, len(ids), CONTEXT[-1]):
            logits = runner.prefill(slot, ids[at:at + CONTEXT[-1]], at)
        take(slot, logits[0])
        pos[slot] = len(ids)

    def prompt(slot, n):
        ids = torch.randint(0, vocab_size, (n,), generator=g).tolist()
        prefill(slot, ids, 0)
        return ids

    def store(slot, row, ids):  # a finished sequence: its cached positions into a store row
        runner.copy_slot(slot, SLOTS + row, pos[slot])
        stored[row] = ids

    def resume(slot, row, hit, n):  # a prefix-cache hit: the row's first `hit` positions, then n new tokens
        runner.copy_slot(SLOTS + row, slot, hit)
        prefill(slot, stored[row][:hit] + torch.randint(0, vocab_size, (n,), generator=g).tolist(), hit)

    def step(rows):  # decode slots 0..rows-1
        logits = runner.decode([last[s] for s in range(rows)], [pos[s] for s in range(rows)])
        for s in range(rows):
            take(s, logits[s])
            pos[s] += 1

    prompt(0, 10)
    step(1)               # prefill_s16, decode_b1_k32
    prompt(1, 20)
    step(2)               # prefill_s32, decode_b2_k32
    ids = prompt(2, 40)
    step(3)               # prefill_s32 + prefill_chunk_s16_p32, decode_b4_k64 with a padding row
    store(2, 0, ids)      # copy_slot into store row 0 (cache row SLOTS)
    prompt(2, 5)
    step(3)               # slot 2 reused: prefill_s16, decode_b4_k32
    prompt(1, 50)
    step(2)               # prefill_s32 + prefill_chunk_s32_p32, decode_b2_k64
    resume(0, 0, 36, 10)
    step(1)               # copy_slot out of the store row, prefill_chunk_s16_p64, decode_b1_k64
    resume(2, 0, 40, 17)
    step(3)               # prefill_chunk_s32_p64 at 40, decode_b4_k64
    for _ in range(2):
        step(3)
    runner.copy_slot(2, 0, pos[2] - 3)  # a fork of slot 2's first positions into slot 0 (copy_slot tag)
    last[0], pos[0] = last[2], pos[2]
    runner.copy_slot(2, 0, pos[2])      # then all of them: slot 0 continues slot 2
    for _ in range(2):
        step(3)
    return tokens


def compiles() -> int:
    data = met.metric_data("CompileTime")
    return data[0] if data else 0


OPERAND = re.compile(r"(\w+)\[([\d,]*)\]")


def numel(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


def index_operands(hlo: str) -> list[tuple[str, int]]:
    """(op, numel of its index operand) for every scatter and gather: the second operand of each."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= \S+ (scatter|gather)\((.*)\)", line)
        if m:
            operands = OPERAND.findall(m.group(2))
            found.append((m.group(1), numel(operands[1][1])))
    return found


def bad_negative_infinities(hlo: str) -> list[str]:
    """Lines that use a -inf constant other than as a reduce's start value (softmax's max-reduction)."""
    names = re.findall(r"(%[\w.]+) = \w+\[\] constant\(-inf\)", hlo)
    bad = []
    for name in names:
        for line in hlo.splitlines():
            uses = re.search(re.escape(name) + r"\b(?!\s*=)", line)
            if uses and " constant(-inf)" not in line and not (" reduce(" in line and f"{name})" in line):
                bad.append(line.strip())
    return bad


def own_kv_elements(cfg: ModelConfig, spec: GraphSpec) -> int:
    rows = {"decode": spec.batch, "copy_slot": MAX_LEN}.get(spec.kind, spec.seq_len)
    return cfg.num_layers * cfg.num_kv_heads * rows * cfg.head_dim


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_bucket_compiles_once_lowers_cleanly_and_matches_the_cpu_target(name):
    cfg = CONFIGS[name]
    weights = random_weights(cfg)
    xla = XlaGraphs(cfg, weights)
    before = compiles()
    first = workload(xla, 1, cfg.vocab_size)
    after_first = compiles()
    reference = CpuReference(cfg, weights)
    assert first == workload(reference, 1, cfg.vocab_size)
    state = xla.module.cache_k.cpu()
    # the store rows: row 0 holds exactly what copy_slot put there, row 1 was never written by any graph
    torch.testing.assert_close(state[:, SLOTS, :, :41], reference.k[:, SLOTS, :, :41], rtol=1e-4, atol=1e-4)
    assert not state[:, SLOTS, :, 41:].any() and not state[:, SLOTS + 1].any()
    assert sorted(xla.hlo) == sorted(s.name for s in SPECS)  # the workload ran every graph
    assert after_first - before == len(SPECS), met.short_metrics_report()
    second = workload(xla, 2, cfg.vocab_size)  # same graphs, other tokens: nothing new to compile
    assert compiles() == after_first, met.short_metrics_report()
    assert second == workload(CpuReference(cfg, weights), 2, cfg.vocab_size)
    full_cache = cfg.num_layers * ROWS * cfg.num_kv_heads * MAX_LEN * cfg.head_dim
    for spec in SPECS:
        hlo = xla.hlo[spec.name]
        assert "f64" not in hlo, (spec.name, [line for line in hlo.splitlines() if "f64" in line][:3])
        assert not bad_negative_infinities(hlo), (spec.name, bad_negative_infinities(hlo)[:3])
        ops = index_operands(hlo)
        assert any(op == "scatter" for op, _ in ops), spec.name  # the state update is in the graph
        for op, size in ops:
            assert size <= own_kv_elements(cfg, spec) < full_cache, (spec.name, op, size, own_kv_elements(cfg, spec))
