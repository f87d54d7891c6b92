"""The one table from an artifact's dtype name (CompileConfig.dtype, manifest.dtype) to torch's."""
from __future__ import annotations

import torch

from compile.config import DTYPES

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16}
assert set(_TORCH) == set(DTYPES)


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _TORCH[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None
