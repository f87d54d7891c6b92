"""CompileConfig: everything that decides what an artifact contains, validated once."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

DTYPES = ("float32", "bfloat16")
TARGETS = ("cpu", "neuron")
NEURON_TARGETS = ("inf2", "trn1", "trn2")
CPU_KERNELS = ("auto", "cpu-onednn", "portable")  # compile/cpu_kernels.py

DEFAULT_CONTEXT_BUCKETS = (128, 256, 512, 1024, 2048)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16)
DEFAULT_KV_BUCKETS = (128, 256, 512, 1024, 2048)
# cpu: a later chunk of a long prompt has at most this many tokens (the largest context bucket up to
# it), so a decode step waits behind at most one such chunk (about 0.25 s for SmolLM2 on 2 cores).
CPU_CHUNK_TOKENS = 512
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
    # How many neuronx-cc run at once (None: by host memory, compile/neuron/workers.py). It changes
    # how a compile runs, not what it makes, so it stays out of the compile key.
    neuron_compile_workers: Optional[int] = None

    def __post_init__(self) -> None:
        fail = ConfigError
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
        if self.cpu_kernels not in CPU_KERNELS:
            raise fail(f"--cpu-kernels must be one of {', '.join(CPU_KERNELS)}, got {self.cpu_kernels!r}")

    @property
    def chunk_len(self) -> int:
        """Tokens of a later chunk of a long prompt (it attends to the slot's past)."""
        if self.target == "cpu":
            return max([b for b in self.context_buckets if b <= CPU_CHUNK_TOKENS] or [self.context_buckets[0]])
        return self.context_buckets[-1]

    @property
    def needs_chunk_graph(self) -> bool:
        """Prompts longer than chunk_len are prefilled in chunks."""
        return self.max_model_len > self.chunk_len

    def packed_rows(self, seq_len: int) -> int:
        """cpu: prompts one packed prefill of seq_len tokens can take."""
        return max(1, min(self.max_num_seqs, seq_len // MIN_PACKED_PROMPT_TOKENS))

    def key_dict(self) -> dict:
        """What decides the artifact's contents (the compile key): everything but the checkpoint's
        path (its contents are hashed apart) and how the compile runs."""
        return self.to_dict() | {"checkpoint": None, "neuron_compile_workers": None}

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("context_buckets", "batch_buckets", "kv_buckets"):
            d[k] = list(d[k])
        return d
