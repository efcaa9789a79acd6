#!/usr/bin/env bash
# docs/scale-out.md's measurement: 3 replicas on 127.0.0.1, measured with the same
# `reprise bench serve` run (multiturn and prefix-repetition) through `reprise route`, twice:
#   route-prefix       replicas with the shared tier (--kv-store), routed by prefix (KV events)
#   round-robin        replicas without a shared tier, routed round-robin
# then `reprise bench compare`.        bash bench/scale-out/compare.sh OUT_DIR
set -euo pipefail
OUT=${1:-scale-out-results}
mkdir -p "$OUT"
REPRISE=(.venv/bin/python -m reprise.cli)   # this checkout's reprise
REDIS_PORT=6391
STORE=redis://127.0.0.1:$REDIS_PORT/0
ROUTER=8190
REPLICAS=(8191 8192 8193)
# 4 conversations over 3 replicas: round-robin moves each conversation to another replica every turn
# (with a multiple of 3 it would keep each on one replica by accident)
BENCH_FLAGS=(--scenario multiturn,prefix-repetition --request-timeout 900 --conversations 4 --turns 4
             --num-prompts 12 --concurrency 3)
PIDS=()

source "$(dirname "$0")/../wait_ready.sh"

start() {        # log name, then the command
    local name=$1; shift
    "$@" >"$OUT/$name.log" 2>&1 &
    PIDS+=($!)
}

stop_all() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
trap stop_all EXIT

measure() {      # label, policy, then extra replica flags
    local label=$1 policy=$2; shift 2
    local replica_urls=()
    for port in "${REPLICAS[@]}"; do
        start "$label-replica-$port" "${REPRISE[@]}" serve --port "$port" "$@"
        replica_urls+=(--replica "http://127.0.0.1:$port")
    done
    for i in "${!REPLICAS[@]}"; do
        wait_ready "http://127.0.0.1:${REPLICAS[$i]}/health" "${PIDS[$i]}" "$OUT/$label-replica-${REPLICAS[$i]}.log"
    done
    start "$label-router" "${REPRISE[@]}" route --port $ROUTER --policy "$policy" --kv-store $STORE "${replica_urls[@]}"
    wait_ready "http://127.0.0.1:$ROUTER/health" "${PIDS[-1]}" "$OUT/$label-router.log"
    sleep 3      # two health checks: every replica in
    "${REPRISE[@]}" bench serve --base-url "http://127.0.0.1:$ROUTER" --label "$label" "${BENCH_FLAGS[@]}" \
        --out "$OUT/$label.json"
    stop_all
}

redis-server --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no --maxmemory 2gb \
    --maxmemory-policy allkeys-lru >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
trap 'stop_all; kill $REDIS_PID 2>/dev/null || true' EXIT
sleep 1
measure route-prefix prefix --kv-store $STORE
redis-cli -p $REDIS_PORT flushall >/dev/null
measure round-robin round-robin
"${REPRISE[@]}" bench compare "$OUT/route-prefix.json" "$OUT/round-robin.json" --out "$OUT/table.md"
cat "$OUT/table.md"
