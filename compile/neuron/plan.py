"""--dry-run: the compile plan (graphs, shapes, aliases, compiler arguments, HBM per core) on any machine.

Reads only the model's config (config.json, or the GGUF header through transformers); never the
weights, never torch-neuronx. Sizes come from compile.neuron.graphs.weight_shapes.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

from compile.buckets import GraphSpec, plan_graphs
from compile.config import CompileConfig
from compile.model import ModelConfig
from compile.neuron import flags
from compile.neuron.graphs import COLUMN_PARALLEL, EXPERT_PARALLEL, ROW_PARALLEL, cache_shapes, weight_shapes
from compile.quantize import SCALE_SUFFIX, is_quantized_weight, quantized_config

BYTES = {"float32": 4, "bfloat16": 2}
GIB = 2 ** 30


def read_model_config(checkpoint: str) -> ModelConfig:
    """The ModelConfig from config.json or GGUF metadata alone (no tensors are read)."""
    from transformers import AutoConfig

    from compile.checkpoint import CheckpointError, gguf_hf_config, model_config_from_hf, resolve
    path = resolve(checkpoint)
    if path.is_file() and path.suffix == ".gguf":
        hf = gguf_hf_config(path)
    elif path.is_dir() and (path / "config.json").exists():
        hf = AutoConfig.from_pretrained(str(path))
    else:
        raise CheckpointError(f"{path} is neither a Hugging Face folder nor a .gguf file")
    return model_config_from_hf(hf)


# NOTE: an allowance, not a measurement (nothing here has run on a device): the NEFF's code and
# constants of one bucket graph on one core. NxD Inference publishes no figure, and users have seen
# the per-core total reach 16 GB with DMA rings and scratchpad (aws-neuron/transformers-neuronx#49).
# Replace it with neuron-monitor's neuroncore_memory_usage_model_code once a real artifact is loaded.
NEFF_ALLOWANCE_BYTES = 64 * 2 ** 20
ACTIVATION_BYTES = 4  # scratch is counted as float32, whatever the dtype: an upper bound


@dataclass(frozen=True)
class GraphAllowance:
    """One graph's own device memory on one core, beside the shared weights and KV state."""
    name: str
    neff_bytes: int
    scratch_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.neff_bytes + self.scratch_bytes


@dataclass(frozen=True)
class HbmEstimate:
    weights_bytes: int     # per core: this rank's weights, once, shared by every graph
    kv_bytes: int          # per core: the one KV state (cache_k + cache_v), shared by every graph
    graphs: tuple[GraphAllowance, ...]
    capacity_gib: int

    @property
    def resident_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes

    @property
    def graphs_bytes(self) -> int:
        return sum(g.total_bytes for g in self.graphs)

    @property
    def total_gib(self) -> float:
        return (self.resident_bytes + self.graphs_bytes) / GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.capacity_gib


def sharded(name: str) -> bool:
    """Split over tp ranks: lm_head, the projections and the expert stacks, except a row-parallel projection's int8 scale
    (one per output channel, and a row-parallel layer does not split its outputs)."""
    if name.startswith("lm_head") or any(f".{p}." in name for p in COLUMN_PARALLEL) or name.endswith(EXPERT_PARALLEL):
        return True
    return any(f".{p}." in name for p in ROW_PARALLEL) and not name.endswith(SCALE_SUFFIX)


def element_bytes(name: str, model: ModelConfig, dtype: str) -> int:
    """Bytes per element of a stored tensor: rope's inv_freq and int8 scales are float32, int8 projection
    weights one byte, everything else the artifact's dtype."""
    if name.startswith("rope.") or name.endswith(SCALE_SUFFIX):
        return 4
    if model.quantization and is_quantized_weight(name):
        return 1
    return BYTES[dtype]


def ffn_row_elements(model: ModelConfig, tp: int) -> int:
    """Feed-forward activations per token row, per core: a dense MLP's gate and up (2 intermediate/tp); a MoE
    layer's router probabilities and, for EVERY expert, gate and up (2 moe_intermediate/tp) and its output
    (hidden) before the weighted sum: E x (2 moe_intermediate/tp + hidden) + E. The larger of the two kinds."""
    dense = 2 * model.intermediate_size // tp if any(not model.is_moe_layer(i) for i in range(model.num_layers)) else 0
    moe = model.num_experts * (2 * model.moe_intermediate_size // tp + model.hidden_size + 1)
    return max(dense, moe)


def scratch_bytes(spec: GraphSpec, cfg: CompileConfig, model: ModelConfig) -> int:
    """Activations of one call, per core, as float32: rows x (2 hidden + ffn + heads/tp x span) + logits rows x
    vocab (a prefill keeps the last row's logits only; ffn: ffn_row_elements); a slot copy holds three slot
    rows of each cache."""
    tp = cfg.tp_degree
    if spec.kind == "copy_slot":
        row = math.prod(cache_shapes(model, 1, cfg.max_model_len, tp)[0]) * BYTES[cfg.dtype]
        return 2 * 3 * row
    rows = spec.batch if spec.kind == "decode" else spec.seq_len
    logit_rows = spec.batch if spec.kind == "decode" else 1
    span = {"decode": spec.kv_len, "prefill": spec.seq_len, "prefill_chunk": spec.kv_len + spec.seq_len}[spec.kind]
    per_row = 2 * model.hidden_size + ffn_row_elements(model, tp) + model.num_heads // tp * span
    return ACTIVATION_BYTES * (rows * per_row + logit_rows * model.vocab_size)


def hbm_per_core(cfg: CompileConfig, model: ModelConfig) -> HbmEstimate:
    """Weights (linear layers split over tp, the rest replicated) once, the KV state once, and each
    graph's NEFF and scratch allowance, per NeuronCore."""
    from compile.neuron.builder import tags
    tp = cfg.tp_degree
    shapes = dict(weight_shapes(model))
    if model.tie_word_embeddings:
        # NOTE: the traced module's lm_head is its own weight (a ColumnParallelLinear), so the device
        # holds it beside the embedding even when the checkpoint ties them (sharded at tp > 1).
        shapes["lm_head.weight"] = (model.vocab_size, model.hidden_size)
    weights = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        weights += element_bytes(name, model, cfg.dtype) * (n // tp if tp > 1 and sharded(name) else n)
    kv = sum(math.prod(shape) for shape in cache_shapes(model, cfg.num_cache_rows, cfg.max_model_len, tp))
    graphs = tuple(GraphAllowance(s.name, NEFF_ALLOWANCE_BYTES, scratch_bytes(s, cfg, model)) for s in tags(cfg))
    return HbmEstimate(weights, kv * BYTES[cfg.dtype], graphs, flags.HBM_PER_CORE_GIB[cfg.neuron_target or "inf2"])


def shape_text(shape) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def graph_io(spec: GraphSpec, model: ModelConfig, neuron: bool) -> tuple[str, str]:
    """Input and output descriptions of one graph (after the weights)."""
    if spec.kind == "copy_slot":
        return "src[1] dst[1] length[1]", "length[1] (positions < length of slot src copied into slot dst)"
    if spec.kind == "decode":
        inputs = f"input_ids{shape_text([spec.batch])} positions{shape_text([spec.batch])}"
        logits = shape_text([spec.batch, model.vocab_size])
    else:
        scalar = "[1]" if neuron else "[]"
        inputs = f"input_ids{shape_text([spec.seq_len])} start_pos{scalar} last_index{scalar}"
        logits = shape_text([1, model.vocab_size])
    if not neuron:
        lkv, d, k = [model.num_layers, model.num_kv_heads], model.head_dim, spec.kv_len
        if spec.kind == "decode":
            lkv.insert(1, spec.batch)
            inputs += f" k_span{shape_text(lkv + [k, d])} v_span{shape_text(lkv + [k, d])}"
        elif spec.kind == "prefill_chunk":
            inputs += f" past_k{shape_text(lkv + [k, d])} past_v{shape_text(lkv + [k, d])}"
        return inputs, f"logits{logits} new_k new_v"
    if spec.kind != "decode":
        inputs += " slot[1]"
    return inputs, f"logits{logits}"


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def hbm_lines(cfg: CompileConfig, model: ModelConfig) -> list[str]:
    """The HBM estimate, itemised so that a reader can check it by hand."""
    from compile.neuron.builder import compile_workers
    from compile.neuron.workers import available_memory_bytes, job_bytes
    est = hbm_per_core(cfg, model)
    tp, size = cfg.tp_degree, BYTES[cfg.dtype]
    k_shape, _ = cache_shapes(model, cfg.num_cache_rows, cfg.max_model_len, tp)
    verdict = "fits" if est.fits else ("DOES NOT FIT: raise --tp-degree or lower --max-num-seqs/--max-model-len/"
                                        "--prefix-cache-rows")
    weight_format = (f"; projections {model.quantization} (1 B) with a float32 scale per output channel"
                     if model.quantization else "")
    lines = [f"HBM per NeuronCore (estimate; {size}-byte {cfg.dtype}{weight_format}):",
             f"  weights, once per rank, shared by every graph: {est.weights_bytes / GIB:.3f} GiB"
             + (("" if tp == 1 else
                 " (projections, expert stacks and lm_head split over tp; embedding, norms, routers, rope replicated)"
                 if model.num_experts else
                 " (projections and lm_head split over tp; embedding, norms, rope replicated)")),
             f"  KV state, once, shared by every graph: 2 x {'x'.join(map(str, k_shape))} x {size} B = "
             f"{est.kv_bytes / GIB:.3f} GiB ({cfg.max_num_seqs} sequence slots + {cfg.prefix_cache_rows} prefix-cache "
             f"rows; each row {est.kv_bytes / cfg.num_cache_rows / 2 ** 20:.1f} MiB)",
             f"  resident (weights + KV): {est.resident_bytes / GIB:.3f} GiB",
             f"  per graph ({len(est.graphs)} graphs): NEFF allowance {mib(NEFF_ALLOWANCE_BYTES)} + scratch "
             f"= {ACTIVATION_BYTES} B x (rows x (2 hidden + ffn + heads/tp x span) + logit rows x vocab), ffn = "
             + (f"experts x (2 expert intermediate/tp + hidden + 1) = {ffn_row_elements(model, tp)}"
                if model.num_experts else f"2 intermediate/tp = {ffn_row_elements(model, tp)}")
             + "; summed over graphs, an upper bound"]
    width = max(len(g.name) for g in est.graphs)
    for g in est.graphs:
        lines.append(f"    {g.name:<{width}} {mib(g.neff_bytes)} + {mib(g.scratch_bytes)}")
    lines.append(f"  graphs together: {est.graphs_bytes / GIB:.3f} GiB")
    lines.append(f"  total: {est.total_gib:.3f} GiB of {est.capacity_gib} GiB: {verdict}")
    workers, free = compile_workers(cfg, model), available_memory_bytes()
    source = "--neuron-compile-workers" if cfg.neuron_compile_workers else (
        f"this host's {free / GIB:.1f} GiB available / {job_bytes(est.weights_bytes) / GIB:.1f} GiB per job, "
        "at most one per graph and per CPU" if free else "host memory unknown")
    lines.append(f"neuronx-cc jobs at once: {workers} ({source})")
    return lines


def describe_plan(cfg: CompileConfig) -> str:
    model = quantized_config(read_model_config(cfg.checkpoint), cfg.quantization)
    neuron = cfg.target == "neuron"
    if neuron:
        flags.check_tp(cfg, model)  # an impossible plan is a one-line error, not a table
        from compile.neuron.builder import tags
        specs = tags(cfg)
    else:
        specs = plan_graphs(cfg)
    lines = ["compile plan (dry run: nothing compiled, no weights loaded)",
             f"checkpoint: {cfg.checkpoint} ({model.architecture}, {model.num_layers} layers, {model.num_heads} heads, "
             f"{model.num_kv_heads} KV heads, head_dim {model.head_dim}, hidden {model.hidden_size}, "
             f"intermediate {model.intermediate_size}, vocab {model.vocab_size}"
             + (f", {model.num_experts} experts top {model.num_experts_per_tok} of intermediate "
                f"{model.moe_intermediate_size} in {model.num_layers - len(model.dense_layers)} layers, every expert "
                "computed per token" if model.num_experts else "") + ")"]
    if neuron:
        lines.append(f"target: neuron --neuron-target {cfg.neuron_target}, tp {cfg.tp_degree}, "
                     f"LNC {flags.LNC[cfg.neuron_target]}, dtype {cfg.dtype}, quantization {cfg.quantization}, tracer NxD Core ModelBuilder "
                     "(one NxDModel, one tag per graph, weights and KV state shared by every tag)")
        lines.append("weights: kept out of every graph (NxDModel.save(save_weights=False)), bound once by set_weights "
                     + ("from weights/model.safetensors" if cfg.tp_degree == 1 else
                        f"from {cfg.tp_degree} weights/tp_rank_XX.safetensors, sharded once per rank"))
        k_shape, v_shape = cache_shapes(model, cfg.num_cache_rows, cfg.max_model_len, cfg.tp_degree)
        lines.append(f"KV state per core: cache_k {shape_text(k_shape)} and cache_v {shape_text(v_shape)} "
                     f"[layers, slots ({cfg.max_num_seqs} sequences + {cfg.prefix_cache_rows} prefix-cache rows), kv heads, "
                     "positions, head_dim]; buffers reassigned in forward, aliased by "
                     "ModelBuilder, never returned to the host")
    else:
        lines.append(f"target: cpu, dtype {cfg.dtype}, quantization {cfg.quantization}, torch.export per bucket (weights are graph inputs)")
    lines.append(f"graphs ({len(specs)}):")
    width = max(len(s.name) for s in specs)
    for spec in specs:
        inputs, outputs = graph_io(spec, model, neuron)
        lines.append(f"  {spec.name:<{width}}  in: {inputs}  out: {outputs}")
    if neuron:
        lines.append("compiler arguments (neuronx-cc, per tag of ModelBuilder.compile):")
        for kind in sorted({s.kind for s in specs}):
            lines.append(f"  {kind:<13}  {flags.compiler_args_str(kind, cfg.neuron_target)}")
        lines += hbm_lines(cfg, model)
    return "\n".join(lines)
