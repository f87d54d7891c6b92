"""CompileConfig: everything that decides what an artifact contains, validated once."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from compile.quantize import QUANTIZATIONS

DTYPES = ("float32", "bfloat16")
AUTO_DTYPE = "auto"   # the CLI's default; compile/cpu_kernels.resolve_dtype picks one of DTYPES
TARGETS = ("cpu", "neuron")
NEURON_TARGETS = ("inf2", "trn1", "trn2")
CPU_KERNELS = ("auto", "cpu-onednn", "portable")  # compile/cpu_kernels.py

DEFAULT_CONTEXT_BUCKETS = (128, 256, 512, 1024, 2048)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16)
DEFAULT_KV_BUCKETS = (128, 256, 512, 1024, 2048)
# A later chunk of a long prompt (or a prompt's rest after a prefix-cache hit) has at most this many tokens
# (the largest context bucket up to it), so a decode step waits behind at most one such chunk (about 0.25 s
# for SmolLM2 on 2 cores). The engine's default token budget is the same 512, so a larger chunk graph would
# only run with a larger --max-num-batched-tokens.
CHUNK_TOKENS = 512
# Chunk sizes below chunk_len: the rest of a prompt after a prefix-cache hit (a user turn, typically tens
# of tokens) runs at the smallest that holds it, not at chunk_len (a 30-token rest on a 512-token graph
# computes 94% padding). NOTE: measured on the 2-core machine, a chat turn's rest (a 50-token user turn
# plus the template's tokens and the reply's last token) came to 62-70 tokens, so 128 sits next to 64.
# Neuron has one: every graph there is a neuronx-cc compile.
CPU_SMALL_CHUNKS = (64, 128, 256)
NEURON_SMALL_CHUNKS = (128,)
# Store rows of the prefix cache (server/engine/prefix_cache.py): KV rows past max_num_seqs that keep
# finished sequences' K/V for reuse. On neuron they are part of the device state, so they are fixed at
# compile time; each costs one slot of KV memory (--dry-run shows it).
CPU_PREFIX_CACHE_ROWS = 8
NEURON_PREFIX_CACHE_ROWS = 4
# cpu: a packed prefill of T tokens returns logits for up to T // this many prompts (16-token prompts
# fill it; shorter ones just take more calls).
MIN_PACKED_PROMPT_TOKENS = 16


class ConfigError(ValueError):
    """An invalid combination of compile flags (one-line message)."""


@dataclass(frozen=True)
class CompileConfig:
    checkpoint: str
    target: str = "cpu"
    dtype: str = "bfloat16"
    context_buckets: tuple[int, ...] = DEFAULT_CONTEXT_BUCKETS
    batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS
    kv_buckets: tuple[int, ...] = DEFAULT_KV_BUCKETS
    max_num_seqs: int = 16
    max_model_len: int = 2048
    neuron_target: Optional[str] = None
    tp_degree: int = 1
    cpu_kernels: str = "auto"
    quantization: str = "none"   # compile/quantize.py: "none" (weights in dtype) or "int8" (weight-only)
    # Prefix cache store rows (0: no prefix caching) and the chunk sizes of prefill_chunk graphs (None:
    # the target's small chunk and chunk_len; see chunk_sizes).
    prefix_cache_rows: Optional[int] = None   # None: the target's default (CPU_/NEURON_PREFIX_CACHE_ROWS)
    chunk_buckets: Optional[tuple[int, ...]] = None
    # How many neuronx-cc run at once (None: by host memory, compile/neuron/workers.py). It changes
    # how a compile runs, not what it makes, so it stays out of the compile key.
    neuron_compile_workers: Optional[int] = None

    def __post_init__(self) -> None:
        fail = ConfigError
        if self.prefix_cache_rows is None:
            default = NEURON_PREFIX_CACHE_ROWS if self.target == "neuron" else CPU_PREFIX_CACHE_ROWS
            object.__setattr__(self, "prefix_cache_rows", default)
        if self.target not in TARGETS:
            raise fail(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.dtype not in DTYPES:
            raise fail(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("context_buckets", "batch_buckets", "kv_buckets"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
                raise fail(f"--{name.replace('_', '-')} must be distinct positive integers in ascending order, got {values}")
        if self.max_model_len < 2:
            raise fail("--max-model-len must be at least 2")
        if self.context_buckets[-1] > self.max_model_len:
            raise fail(f"largest context bucket {self.context_buckets[-1]} exceeds --max-model-len {self.max_model_len}")
        if self.kv_buckets[-1] != self.max_model_len:
            raise fail(f"largest KV bucket must equal --max-model-len ({self.max_model_len}), got {self.kv_buckets[-1]}")
        if self.batch_buckets[-1] != self.max_num_seqs:
            raise fail(f"largest batch bucket must equal --max-num-seqs ({self.max_num_seqs}), got {self.batch_buckets[-1]}")
        if self.target == "neuron":
            if self.neuron_target not in NEURON_TARGETS:
                raise fail(f"--neuron-target must be one of {', '.join(NEURON_TARGETS)} with --target neuron")
        elif self.tp_degree != 1:
            raise fail("--tp-degree > 1 needs --target neuron")
        if self.tp_degree < 1:
            raise fail("--tp-degree must be at least 1")
        if self.neuron_compile_workers is not None and self.neuron_compile_workers < 1:
            raise fail("--neuron-compile-workers must be at least 1")
        if self.prefix_cache_rows < 0:
            raise fail("--prefix-cache-rows must be non-negative")
        if self.chunk_buckets is not None:
            values = self.chunk_buckets
            if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
                raise fail(f"--chunk-buckets must be distinct positive integers in ascending order, got {values}")
            if values[-1] >= self.max_model_len:
                raise fail(f"largest chunk bucket {values[-1]} must be below --max-model-len {self.max_model_len}")
        if self.quantization not in QUANTIZATIONS:
            raise fail(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.cpu_kernels not in CPU_KERNELS:
            raise fail(f"--cpu-kernels must be one of {', '.join(CPU_KERNELS)}, got {self.cpu_kernels!r}")

    @property
    def chunk_len(self) -> int:
        """Tokens of a later chunk of a long prompt (it attends to the slot's past): the largest chunk size."""
        if self.chunk_buckets is not None:
            return self.chunk_buckets[-1]
        return max([b for b in self.context_buckets if b <= CHUNK_TOKENS] or [self.context_buckets[0]])

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        """Token counts of the prefill_chunk graphs: --chunk-buckets, or the target's small chunks below
        chunk_len, and chunk_len."""
        if self.chunk_buckets is not None:
            return self.chunk_buckets
        small = CPU_SMALL_CHUNKS if self.target == "cpu" else NEURON_SMALL_CHUNKS
        return tuple(s for s in small if s < self.chunk_len) + (self.chunk_len,)

    @property
    def chunk_pasts(self) -> tuple[int, ...]:
        """Past spans of the prefill_chunk graphs: on cpu the KV buckets from chunk_len up; on neuron max_model_len
        alone (every graph there is a neuronx-cc compile, and the device's attention over the span is cheap).

        NOTE: a chunk's cost is its tokens' projections and MLP; its attention over a past span of P keys is
        a small part of it (64 tokens over 2048 keys: under a third of the MLP's FLOPs on SmolLM2), so a few
        coarse spans keep the graph count low at little cost."""
        if self.target == "neuron":
            return (self.max_model_len,)
        return tuple(k for k in self.kv_buckets if k >= self.chunk_len) or (self.kv_buckets[-1],)

    @property
    def needs_chunk_graph(self) -> bool:
        """Prompts longer than chunk_len are prefilled in chunks; a prefix-cache hit prefills the rest of its
        prompt as a chunk after the cached part."""
        return self.max_model_len > self.chunk_len or self.prefix_cache_rows > 0

    @property
    def num_cache_rows(self) -> int:
        """KV cache rows: the slots of running sequences, then the prefix cache's store rows."""
        return self.max_num_seqs + self.prefix_cache_rows

    def packed_rows(self, seq_len: int) -> int:
        """cpu: prompts one packed prefill of seq_len tokens can take."""
        return max(1, min(self.max_num_seqs, seq_len // MIN_PACKED_PROMPT_TOKENS))

    def key_dict(self) -> dict:
        """What decides the artifact's contents (the compile key): everything but the checkpoint's
        path (its contents are hashed apart) and how the compile runs."""
        return self.to_dict() | {"checkpoint": None, "neuron_compile_workers": None}

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("context_buckets", "batch_buckets", "kv_buckets", "chunk_buckets"):
            d[k] = None if d[k] is None else list(d[k])
        return d
