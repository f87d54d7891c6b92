"""--dry-run: the compile plan (graphs, shapes, aliases, compiler arguments, HBM per core) on any machine.

Reads only the model's config (config.json, or the GGUF header through transformers); never the
weights, never torch-neuronx. Sizes come from compile.neuron.graphs.weight_shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

from compile.buckets import GraphSpec, plan_graphs
from compile.config import CompileConfig
from compile.model import ModelConfig
from compile.neuron import flags
from compile.neuron.graphs import COLUMN_PARALLEL, MODEL_BUILDER, ROW_PARALLEL, TRACE, cache_shapes, weight_shapes

BYTES = {"float32": 4, "bfloat16": 2}
GIB = 2 ** 30


def read_model_config(checkpoint: str) -> ModelConfig:
    """The ModelConfig from config.json or GGUF metadata alone (no tensors are read)."""
    from transformers import AutoConfig

    from compile.checkpoint import CheckpointError, model_config_from_hf, resolve
    path = resolve(checkpoint)
    if path.is_file() and path.suffix == ".gguf":
        hf = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    elif path.is_dir() and (path / "config.json").exists():
        hf = AutoConfig.from_pretrained(str(path))
    else:
        raise CheckpointError(f"{path} is neither a Hugging Face folder nor a .gguf file")
    return model_config_from_hf(hf)


@dataclass(frozen=True)
class HbmEstimate:
    weights_bytes: int     # per core (per rank)
    kv_bytes: int          # per core: k and v caches
    capacity_gib: int

    @property
    def total_gib(self) -> float:
        return (self.weights_bytes + self.kv_bytes) / GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.capacity_gib


def sharded(name: str) -> bool:
    return name.startswith("lm_head") or any(f".{p}." in name for p in COLUMN_PARALLEL + ROW_PARALLEL)


def hbm_per_core(cfg: CompileConfig, model: ModelConfig) -> HbmEstimate:
    """Weights (linear layers split over tp, the rest replicated) plus the KV cache, per NeuronCore."""
    tp, size = cfg.tp_degree, BYTES[cfg.dtype]
    shapes = dict(weight_shapes(model))
    if tp > 1 and model.tie_word_embeddings:
        shapes["lm_head.weight"] = (model.vocab_size, model.hidden_size)  # its own sharded copy
    weights = 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        weights += (4 if name == "rope.inv_freq" else size) * (n // tp if tp > 1 and sharded(name) else n)
    kv = 1
    for d in cache_shapes(model, cfg.max_num_seqs, cfg.max_model_len, tp)[0]:
        kv *= d
    return HbmEstimate(weights, 2 * kv * size, flags.HBM_PER_CORE_GIB[cfg.neuron_target or "inf2"])


def shape_text(shape) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def graph_io(spec: GraphSpec, model: ModelConfig, cfg: CompileConfig, neuron: bool) -> tuple[str, str]:
    """Input and output descriptions of one bucket graph (after the weights)."""
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
    if cfg.tp_degree == 1:
        return inputs, f"logits{logits} cache_k cache_v (aliases: cache_k->output 1, cache_v->output 2)"
    return inputs, f"logits{logits} (cache_k, cache_v buffers reassigned in forward: aliased by ModelBuilder)"


def describe_plan(cfg: CompileConfig) -> str:
    model = read_model_config(cfg.checkpoint)
    neuron = cfg.target == "neuron"
    if neuron:
        flags.check_tp(cfg, model)  # an impossible plan is a one-line error, not a table
    specs = plan_graphs(cfg)
    lines = ["compile plan (dry run: nothing compiled, no weights loaded)",
             f"checkpoint: {cfg.checkpoint} ({model.architecture}, {model.num_layers} layers, {model.num_heads} heads, "
             f"{model.num_kv_heads} KV heads, head_dim {model.head_dim}, hidden {model.hidden_size}, vocab {model.vocab_size})"]
    if neuron:
        tracer = TRACE + " per bucket" if cfg.tp_degree == 1 else MODEL_BUILDER + " (one tag per bucket, one NxDModel)"
        lines.append(f"target: neuron --neuron-target {cfg.neuron_target}, tp {cfg.tp_degree}, "
                     f"LNC {flags.LNC[cfg.neuron_target]}, dtype {cfg.dtype}, tracer {tracer}")
        lines.append("weights: kept out of every graph (inline_weights_to_neff=False / NxDModel.save(save_weights=False)), "
                     + ("bound from weights/model.safetensors at load" if cfg.tp_degree == 1 else
                        f"sharded once per rank into {cfg.tp_degree} weights/tp_rank_XX.safetensors"))
        k_shape, v_shape = cache_shapes(model, cfg.max_num_seqs, cfg.max_model_len, cfg.tp_degree)
        lines.append(f"KV cache per core: cache_k {shape_text(k_shape)} and cache_v {shape_text(v_shape)} "
                     "[layers, slots, kv heads, positions, head_dim]; updated inside each graph")
    else:
        lines.append(f"target: cpu, dtype {cfg.dtype}, torch.export per bucket (weights are graph inputs)")
    lines.append(f"graphs ({len(specs)}):")
    width = max(len(s.name) for s in specs)
    for spec in specs:
        inputs, outputs = graph_io(spec, model, cfg, neuron)
        lines.append(f"  {spec.name:<{width}}  in: {inputs}  out: {outputs}")
    if neuron:
        lines.append("compiler arguments (neuronx-cc; compiled with cpu_backend=True):")
        for kind in sorted({s.kind for s in specs}):
            lines.append(f"  {kind:<13}  {flags.compiler_args_str(kind, cfg.neuron_target)}")
        est = hbm_per_core(cfg, model)
        verdict = "fits" if est.fits else "DOES NOT FIT: raise --tp-degree or lower --max-num-seqs/--max-model-len"
        lines.append(f"HBM per NeuronCore (estimate): weights {est.weights_bytes / GIB:.3f} GiB + KV cache "
                     f"{est.kv_bytes / GIB:.3f} GiB = {est.total_gib:.3f} GiB of {est.capacity_gib} GiB: {verdict} "
                     "(excludes NEFF code, scratchpad and DMA rings)")
    return "\n".join(lines)
