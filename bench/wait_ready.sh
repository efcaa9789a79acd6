# Sourced by bench/peers/compare.sh and bench/scale-out/compare.sh.
wait_ready() {   # url, pid, log: until the url answers, or the process has died (up to 10 minutes)
    for _ in $(seq 600); do
        curl -sf "$1" >/dev/null && return 0
        kill -0 "$2" 2>/dev/null || { echo "exited; see $3" >&2; return 1; }
        sleep 1
    done
    return 1
}
