"""Session fixtures: one real tokenizer, one tiny checkpoint, one compiled artifact for the whole run."""
from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import TINY_ARTIFACT_SETTINGS, make_tiny_checkpoint, save_smollm2_tokenizer

@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    save_smollm2_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), smollm2_tokenizer_dir, "llama")


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_llama_dir) -> Path:
    from compile.config import CompileConfig
    from compile.export import build_artifact
    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    build_artifact(CompileConfig(checkpoint=str(tiny_llama_dir), target="cpu", **TINY_ARTIFACT_SETTINGS),
                   out, progress=False)
    return out
