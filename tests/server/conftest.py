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
