"""How many neuronx-cc processes a compile runs at once: bounded by the host's memory.

ModelBuilder.compile(max_workers=None) starts one neuronx-cc per tag at once (up to CPUs + 4): with
30 buckets of a large model that is a host OOM (docs/neuron.md). Kiln passes a number instead:
--neuron-compile-workers, or this default.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

GIB = 2 ** 30
# NOTE: an assumption, not a measurement (nothing here has run neuronx-cc): one compile job holds
# its HLO, the compiler's own working set (a few GiB for a decoder graph) and, for the weight
# layout passes, up to about twice the rank's weights. Tune it from `/usr/bin/time -v` on a real compile.
JOB_BASE_BYTES = 4 * GIB
JOB_WEIGHT_FACTOR = 2


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> Optional[int]:
    """MemAvailable of this host, or None where it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def job_bytes(rank_weight_bytes: int) -> int:
    """Host memory one neuronx-cc job is assumed to need."""
    return JOB_BASE_BYTES + JOB_WEIGHT_FACTOR * rank_weight_bytes


def default_workers(num_tags: int, rank_weight_bytes: int, available: Optional[int] = None,
                    cpus: Optional[int] = None) -> int:
    """min(tags, CPUs, available memory / job_bytes), at least 1."""
    available = available_memory_bytes() if available is None else available
    cpus = cpus or os.cpu_count() or 1
    by_memory = (available // job_bytes(rank_weight_bytes)) if available else 1
    return max(1, min(num_tags, cpus, by_memory))
