#!/usr/bin/env bash
# Optional XLA lowering check of the neuron bucket graphs (tests/xla), on CPU, no Neuron hardware.
#
# torch-xla pins its own torch (2.9: the version torch-neuronx is frozen on), so it gets a venv of
# its own and never touches the main environment. About 4 GB of wheels: torch 2.9.0 from the
# public package index is the CUDA build and pulls the nvidia-* libraries even for CPU use.
#
#   scripts/xla_check.sh            # create/reuse the venv, then run tests/xla
#   KILN_XLA_VENV=/path scripts/xla_check.sh
set -euo pipefail

VENV="${KILN_XLA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/xla-venv}"
TORCH_XLA_VERSION="${KILN_TORCH_XLA_VERSION:-2.9.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch_xla" 2>/dev/null; then
  "$VENV/bin/python" -m pip install --quiet "torch==${TORCH_XLA_VERSION}" "torch-xla==${TORCH_XLA_VERSION}" pytest
fi
"$VENV/bin/python" -c "import torch, torch_xla; print('torch', torch.__version__, 'torch_xla', torch_xla.__version__)"
cd "$ROOT"
PJRT_DEVICE=CPU exec "$VENV/bin/python" -m pytest tests/xla -m xla -q -p no:cacheprovider -rs "$@"
