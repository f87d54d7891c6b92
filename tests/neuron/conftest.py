"""Fixtures for the neuron target: the recording double, and artifacts compiled through it."""
from __future__ import annotations

from pathlib import Path

import pytest

from neuron import neuron_double


@pytest.fixture
def neuron_double_installed(monkeypatch) -> neuron_double.Recorder:
    return neuron_double.install(monkeypatch)


@pytest.fixture
def neuron_settings(tiny_artifact) -> dict:
    """The shared cpu test artifact's settings, so neuron and cpu runs are comparable."""
    from compile.manifest import Manifest
    m = Manifest.read(tiny_artifact)
    return dict(dtype=m.dtype, context_buckets=tuple(m.buckets["context"]), batch_buckets=tuple(m.buckets["batch"]),
                kv_buckets=tuple(m.buckets["kv"]), max_num_seqs=m.max_num_seqs, max_model_len=m.max_model_len)


def build_neuron(checkpoint: Path, out: Path, settings: dict, **neuron) -> Path:
    from compile.config import CompileConfig
    from compile.export import build_artifact
    cfg = CompileConfig(checkpoint=str(checkpoint), target="neuron", **{"neuron_target": "inf2", **neuron}, **settings)
    build_artifact(cfg, out, progress=False)
    return out
