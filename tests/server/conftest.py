from __future__ import annotations

import sys
from pathlib import Path

import pytest

# NOTE: tests/ has no __init__.py files; this makes `import server_harness` work however
# pytest resolves module names.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))


@pytest.fixture
def make_harness(smollm2_tokenizer):
    """make(**kwargs) -> app_harness.Harness (closed at the end of the test)."""
    from app_harness import Harness
    made = []

    def make(**kwargs):
        made.append(Harness(smollm2_tokenizer, **kwargs))
        return made[-1]

    yield make
    for h in made:
        h.close()
