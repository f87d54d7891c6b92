#!/usr/bin/env bash
# Benchmark any OpenAI-compatible server (Kiln, a peer) with vLLM's own client, `vllm bench serve`,
# using the settings of Kiln's own bench defaults, and save vLLM's result JSON.
#
#   loadtest/peers/vllm_bench.sh BASE_URL MODEL RESULT_DIR [extra `vllm bench serve` flags...]
#   loadtest/peers/vllm_bench.sh http://127.0.0.1:8000 SmolLM2-135M-Instruct reports/vllm-client
#
# Environment (defaults = python -m loadtest.bench's): ENDPOINT=completions|chat,
# INPUT_LEN=256, OUTPUT_LEN=128, NUM_PROMPTS=100, CONCURRENCY="1 4 16 32" (one run, and one
# JSON, per value; "inf" for no limit), REQUEST_RATE=inf, TOKENIZER (a local Hugging Face folder;
# default ~/.cache/kiln-peers/smollm2-hf, the SmolLM2 export of serve.sh), LABEL (file prefix;
# default: the backend), IGNORE_EOS=1 (0 to let replies stop at EOS).
# Needs the vLLM peer: loadtest/peers/install.sh vllm.
set -euo pipefail

base_url=${1:?usage: vllm_bench.sh BASE_URL MODEL RESULT_DIR [vllm bench serve flags...]}
model=${2:?usage: vllm_bench.sh BASE_URL MODEL RESULT_DIR [vllm bench serve flags...]}
result_dir=${3:?usage: vllm_bench.sh BASE_URL MODEL RESULT_DIR [vllm bench serve flags...]}
shift 3
url=${base_url%/}; url=${url%/v1}  # vLLM joins --base-url and --endpoint
root=${KILN_PEERS_DIR:-$HOME/.cache/kiln-peers}
here=$(cd "$(dirname "$0")" && pwd)
python=$root/vllm/bin/python
[ -x "$python" ] || { echo "no vLLM peer at $root/vllm: run loadtest/peers/install.sh vllm" >&2; exit 2; }
tokenizer=${TOKENIZER:-$root/smollm2-hf}
[ -f "$tokenizer/tokenizer_config.json" ] || [ -f "$tokenizer/tokenizer.json" ] || {
  echo "no tokenizer at $tokenizer: set TOKENIZER, or run loadtest/peers/export_hf.py --out $tokenizer" >&2; exit 2; }

case ${ENDPOINT:-completions} in
  completions) backend=(--backend openai --endpoint /v1/completions) ;;
  chat) backend=(--backend openai-chat --endpoint /v1/chat/completions) ;;
  *) echo "ENDPOINT must be completions or chat" >&2; exit 2 ;;
esac
eos=(); [ "${IGNORE_EOS:-1}" = 1 ] && eos=(--ignore-eos)
label=(); [ -n "${LABEL:-}" ] && label=(--label "$LABEL")

for c in ${CONCURRENCY:-1 4 16 32}; do
  conc=(); [ "$c" = inf ] || conc=(--max-concurrency "$c")
  "$python" "$here/vllm_cli.py" bench serve "${backend[@]}" "${label[@]}" \
    --base-url "$url" --model "$model" --tokenizer "$tokenizer" \
    --dataset-name random --random-input-len "${INPUT_LEN:-256}" --random-output-len "${OUTPUT_LEN:-128}" \
    --random-range-ratio 0 --num-prompts "${NUM_PROMPTS:-100}" --request-rate "${REQUEST_RATE:-inf}" \
    "${conc[@]}" "${eos[@]}" --temperature 0 \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 \
    --save-result --result-dir "$result_dir" "$@"
done
