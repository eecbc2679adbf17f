#!/bin/sh
# Description: how many `process` messages per second `onceq node` sustains.
#
# Generates N process messages (distinct event ids, plus a share of repeated
# ids, words from a vocabulary of 1000), feeds them to `onceq node` from a
# file, and times only that run, with the replies going through a pipe to
# a reader (as a real client's would) and, separately, to /dev/null.
# Prints the commands, the goal (200,000 msgs/s) and the ratio to it.
#
# Usage: bench/bench_node.sh [N]     (env ONCEQ: the binary, default
#        build/onceq; DUP_PCT: percent of repeated event ids, default 10;
#        RUNS: runs per mode, the best is reported, default 3;
#        KEEP=1 keeps the generated input; CSV=FILE appends mode,n,msgs_per_s)
set -eu
N=${1:-1000000}
ONCEQ=${ONCEQ:-build/onceq}
DUP_PCT=${DUP_PCT:-10}
RUNS=${RUNS:-3}
GOAL=200000

[ -x "$ONCEQ" ] || { echo "bench_node: no binary at $ONCEQ (run make)" >&2; exit 2; }
tmp=$(mktemp -d)
if [ "${KEEP:-0}" = 1 ]; then
    echo "bench_node: keeping the input in $tmp"
else
    trap 'rm -rf "$tmp"' EXIT
fi
in=$tmp/process.jsonl

awk -v n="$N" -v dup="$DUP_PCT" 'BEGIN {
    srand(42);
    for (i = 1; i <= n; i++) {
        e = (i > 1 && rand() * 100 < dup) ? int(rand() * (i - 1)) + 1 : i;
        printf "{\"src\":\"c1\",\"dest\":\"n1\",\"body\":{\"type\":\"process\",\"msg_id\":%d,\"event_id\":\"ev-%d\",\"word\":\"w%d\"}}\n", i, e, int(rand() * 1000);
    }
}' >"$in"

now() { date +%s.%N; }

# best_rate LABEL CMD: runs CMD (a shell string) RUNS times; prints the best.
best_rate() {
    label=$1
    cmd=$2
    best=0
    i=0
    while [ "$i" -lt "$RUNS" ]; do
        t0=$(now)
        sh -c "$cmd"
        t1=$(now)
        rate=$(awk -v n="$N" -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", n / (b - a) }')
        [ "$rate" -gt "$best" ] && best=$rate
        i=$((i + 1))
    done
    ratio=$(awk -v r="$best" -v g="$GOAL" 'BEGIN { printf "%.2f", r / g }')
    printf '%-10s %10d msgs/s  (goal %d, ratio %sx)\n' "$label" "$best" "$GOAL" "$ratio"
    printf '           command: %s\n' "$cmd"
    [ -z "${CSV:-}" ] || echo "$label,$N,$best" >>"$CSV"
}

lines=$(wc -l <"$in")
bytes=$(wc -c <"$in")
echo "bench_node: $lines process messages, $bytes bytes, ${DUP_PCT}% repeated ids, best of $RUNS"
# The reply count is checked once, so a broken node cannot look fast.
replies=$("$ONCEQ" node <"$in" | wc -l)
[ "$replies" -eq "$lines" ] || { echo "bench_node: $replies replies for $lines messages" >&2; exit 1; }
best_rate pipe "$ONCEQ node < $in | cat > /dev/null"
best_rate devnull "$ONCEQ node < $in > /dev/null"
