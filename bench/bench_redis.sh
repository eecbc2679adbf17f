#!/bin/sh
# Description: events/s of `onceq run --redis` with 1, 2 and 4 consumer
# processes (handlers noop and wordcount), against a private redis-server
# on a free loopback port, in one run with its two baselines:
#   - the naive client: the same protocol with no batching (--batch 1 -w 1:
#     one XREADGROUP, one claim and one commit round trip per message);
#   - the server's ceiling: redis-benchmark XADD, one per round trip and
#     pipelined (-P 32).
# Only the consumers are timed (from their start until the last one has
# drained the stream), not the loading with `onceq send` (timed apart).
# Prints every command, the figures and the ratios; CSV in
# bench/results/redis.csv.
# Environment: ONCEQ (default build/onceq), EVENTS (default 200000),
# NAIVE_EVENTS (default 20000), WORKERS (threads per process, default 2).
set -eu
ONCEQ=${ONCEQ:-build/onceq}
EVENTS=${EVENTS:-200000}
NAIVE_EVENTS=${NAIVE_EVENTS:-20000}
WORKERS=${WORKERS:-2}
CSV=bench/results/redis.csv
TMP=$(mktemp -d)
mkdir -p bench/results

. "$(dirname "$0")/redis_lib.sh"
trap 'redis_stop_all; rm -rf "$TMP"' EXIT
redis_start "$TMP"
PORT=$REDIS_PORT
URL=$REDIS_URL

now() { python3 -c 'import time; print(time.monotonic())'; }
rcli() { redis-cli -p "$PORT" "$@" >/dev/null; }

echo "bench_redis: $(nproc) CPUs, redis-server $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), $EVENTS events"
"$ONCEQ" gen --events "$EVENTS" --duplicates 0.1 --seed 1 -o "$TMP/ev.jsonl"
"$ONCEQ" gen --events "$NAIVE_EVENTS" --duplicates 0.1 --seed 1 -o "$TMP/naive.jsonl"
echo "kind,handler,processes,workers,batch,events,seconds,events_per_s" > "$CSV"

# run_consumers HANDLER PROCS WORKERS BATCH FILE -> prints events/s
run_consumers() {
  rcli FLUSHALL
  "$ONCEQ" send --redis "$URL" --stream b --dedup-window 0 -q "$5"
  n=$(wc -l < "$5")
  t0=$(now)
  pids=""
  for p in $(seq "$2"); do
    "$ONCEQ" run --redis "$URL" --stream b --group g --consumer "c$p" \
      --drain -q -w "$3" --batch "$4" --handler "$1" &
    pids="$pids $!"
  done
  for p in $pids; do wait "$p" || [ $? -eq 1 ]; done
  t1=$(now)
  python3 -c "print(f'{$n/($t1-$t0):.0f} {$t1-$t0:.3f} $n')"
}

printf '\n$ %s\n' "onceq send --redis URL --stream b --dedup-window 0 ($EVENTS events)"
rcli FLUSHALL
t0=$(now)
"$ONCEQ" send --redis "$URL" --stream b --dedup-window 0 -q "$TMP/ev.jsonl"
t1=$(now)
send_rate=$(python3 -c "print(f'{$EVENTS/($t1-$t0):.0f}')")
echo "send: $send_rate events/s"
rcli FLUSHALL
t0=$(now)
"$ONCEQ" send --redis "$URL" --stream b -q "$TMP/ev.jsonl"
t1=$(now)
echo "send with producer dedup (--dedup-window 5m): $(python3 -c "print(f'{$EVENTS/($t1-$t0):.0f}')") events/s"

printf '\n$ %s\n' "onceq run --redis URL --stream b --group g --drain --batch 1 -w 1 --handler noop   (naive: $NAIVE_EVENTS events)"
set -- $(run_consumers noop 1 1 1 "$TMP/naive.jsonl")
naive=$1
echo "naive, noop: $naive events/s"
echo "naive,noop,1,1,1,$3,$2,$1" >> "$CSV"

printf '\n$ %s\n' "redis-benchmark -n 200000 XADD s '*' e <event>   (and -P 32)"
xadd1=$(redis-benchmark -p "$PORT" -n 200000 -q XADD bs '*' e '{"id":"evt-1","word":"w1"}' 2>/dev/null | tr '\r' '\n' | sed -n 's/.*: \([0-9.]*\) requests per second.*/\1/p' | tail -n 1)
xadd32=$(redis-benchmark -p "$PORT" -n 1000000 -P 32 -q XADD bs '*' e '{"id":"evt-1","word":"w1"}' 2>/dev/null | tr '\r' '\n' | sed -n 's/.*: \([0-9.]*\) requests per second.*/\1/p' | tail -n 1)
echo "redis-benchmark XADD: ${xadd1%.*} /s one per round trip, ${xadd32%.*} /s pipelined (-P 32)"
echo "ceiling,xadd,1,1,1,200000,0,${xadd1%.*}" >> "$CSV"
echo "ceiling,xadd-P32,1,1,32,1000000,0,${xadd32%.*}" >> "$CSV"

printf '\n%-10s %5s %8s %12s %10s %12s\n' handler procs seconds events/s vs_naive vs_xadd_P32
for h in noop wordcount; do
  for p in 1 2 4; do
    set -- $(run_consumers "$h" "$p" "$WORKERS" 128 "$TMP/ev.jsonl")
    echo "onceq,$h,$p,$WORKERS,128,$3,$2,$1" >> "$CSV"
    printf '%-10s %5s %8s %12s %9.1fx %11.2fx\n' "$h" "$p" "$2" "$1" \
      "$(python3 -c "print($1/$naive)")" "$(python3 -c "print($1/${xadd32%.*})")"
  done
done
echo
echo "each run: $ONCEQ run --redis URL --stream b --group g --consumer cN --drain -w $WORKERS --batch 128 --handler H, N processes at once"
echo "goal: >= 10x the naive client, >= 100000 events/s with 2 processes"
echo "csv: $CSV"
