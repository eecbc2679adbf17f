#!/bin/sh
# Description: events/s of `onceq run --redis ... --handler noop --drain`
# with C consumer processes against one redis-server (without partitions,
# the baseline, and with --partitions) and against Redis Clusters of 2
# and 4 masters (private servers on free
# loopback ports, no persistence), side by side in one run: the same
# events (`onceq gen --events N`), the targets alternated within each of
# R repetitions, medians, and the ratios to the single Redis. Only the
# consumers are timed (from their start until the last has drained every
# partition); `onceq send` is timed apart. Bytes per remembered id:
# bench/bench_redis_mem.sh.
# Usage: sh bench/bench_redis_cluster.sh [P]
#   P: partitions for every target (default: 4 for the single Redis,
#      4 x masters for a cluster)
# Environment: ONCEQ (default build/onceq), EVENTS (default 200000),
# CONSUMERS (default 2), WORKERS (threads per consumer, default 2),
# REPS (default 3), MASTERS (cluster sizes, default "2 4").
# CSV in bench/results/redis_cluster.csv.
set -eu
ONCEQ=${ONCEQ:-build/onceq}
EVENTS=${EVENTS:-200000}
CONSUMERS=${CONSUMERS:-2}
WORKERS=${WORKERS:-2}
REPS=${REPS:-3}
MASTERS=${MASTERS:-2 4}
P_ARG=${1:-}
CSV=bench/results/redis_cluster.csv
TMP=$(mktemp -d)
. "$(dirname "$0")/redis_lib.sh"
trap 'redis_stop_all; rm -rf "$TMP"' EXIT
mkdir -p bench/results

if ! "$ONCEQ" run --help 2>&1 | grep -q -- --partitions; then
  echo "bench_redis_cluster: $ONCEQ has no --partitions" >&2
  exit 2
fi

now() { python3 -c 'import time; print(time.monotonic())'; }
median() { python3 -c "import sys,statistics; print(f'{statistics.median(map(float, sys.argv[1:])):.0f}')" "$@"; }

# The targets: name, ports (to flush), URL, partitions.
redis_start "$TMP"
# plain: the same Redis without partitions (the baseline of the ratios).
T_NAMES="plain single"
eval "T_plain_ports=$REDIS_PORT T_plain_url=$REDIS_URL T_plain_m=1 T_plain_p=0"
eval "T_single_ports=$REDIS_PORT T_single_url=$REDIS_URL T_single_m=1"
eval "T_single_p=${P_ARG:-4}"
for m in $MASTERS; do
  mkdir -p "$TMP/c$m"
  redis_cluster_start "$TMP/c$m" "$m"
  T_NAMES="$T_NAMES cluster$m"
  eval "T_cluster${m}_ports='$CLUSTER_PORTS' T_cluster${m}_url='$CLUSTER_URL'"
  eval "T_cluster${m}_m=$m T_cluster${m}_p=${P_ARG:-$((4 * m))}"
done

echo "bench_redis_cluster: $(nproc) CPUs, redis-server $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), $EVENTS events, $CONSUMERS consumers x -w $WORKERS, $REPS reps"
"$ONCEQ" gen --events "$EVENTS" --seed 1 -o "$TMP/ev.jsonl"
n=$(wc -l < "$TMP/ev.jsonl")

# one TARGET: sends the events, times the consumers; sets SEND_RATE RUN_RATE
one() {
  eval "ports=\$T_$1_ports url=\$T_$1_url p=\$T_$1_p"
  # shellcheck disable=SC2086
  redis_flush $ports
  t0=$(now)
  parts=""
  [ "$p" != 0 ] && parts="--partitions $p"
  # shellcheck disable=SC2086
  "$ONCEQ" send --redis "$url" --stream b $parts \
    --dedup-window 0 -q "$TMP/ev.jsonl"
  t1=$(now)
  pids=""
  for c in $(seq "$CONSUMERS"); do
    "$ONCEQ" run --redis "$url" --stream b --group g --consumer "c$c" \
      --drain -q -w "$WORKERS" --handler noop &
    pids="$pids $!"
  done
  for pid in $pids; do wait "$pid"; done
  t2=$(now)
  SEND_RATE=$(python3 -c "print(f'{$n/($t1-$t0):.0f}')")
  RUN_RATE=$(python3 -c "print(f'{$n/($t2-$t1):.0f}')")
}

echo "target,masters,partitions,rep,events,send_events_per_s,run_events_per_s" > "$CSV"
for r in $(seq "$REPS"); do
  for t in $T_NAMES; do
    one "$t"
    eval "T_${t}_runs=\"\${T_${t}_runs:-} $RUN_RATE\" T_${t}_sends=\"\${T_${t}_sends:-} $SEND_RATE\""
    eval "echo \"$t,\$T_${t}_m,\$T_${t}_p,$r,$n,$SEND_RATE,$RUN_RATE\"" >> "$CSV"
    echo "rep $r $t: run $RUN_RATE events/s, send $SEND_RATE events/s"
  done
done

printf '\n%-10s %7s %10s %14s %9s %14s %9s\n' target masters partitions \
  run_events/s vs_plain send_events/s vs_plain
base_run="" base_send=""
for t in $T_NAMES; do
  eval "runs=\$T_${t}_runs sends=\$T_${t}_sends m=\$T_${t}_m p=\$T_${t}_p"
  # shellcheck disable=SC2086
  mr=$(median $runs)
  # shellcheck disable=SC2086
  ms=$(median $sends)
  [ -z "$base_run" ] && base_run=$mr && base_send=$ms
  printf '%-10s %7s %10s %14s %8.2fx %14s %8.2fx\n' "$t" "$m" "$p" "$mr" \
    "$(python3 -c "print($mr/$base_run)")" "$ms" \
    "$(python3 -c "print($ms/$base_send)")"
done
echo
echo "each run: $ONCEQ run --redis URL(S) --stream b --group g --consumer cN --drain -w $WORKERS --handler noop, $CONSUMERS at once, after $ONCEQ send --partitions P --dedup-window 0"
echo "medians of $REPS reps, targets alternated; goal (issue 14): 4 masters >= 2.5x one Redis on 16 cores"
echo "csv: $CSV"
