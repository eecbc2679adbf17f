#!/bin/sh
# Two onceq binaries on the same file, alternately (A, B, A, B, ...), so a
# noisy shared machine slows both alike; prints the median wall seconds of
# each and B's speed relative to A, for each worker count. Outputs and dead
# letters go to /dev/null; a run that exits 2 or more stops the script.
#
# usage: sh bench/bench_ab.sh A B FILE [REPS] [WORKERS] [-- RUN ARGS...]
#   e.g. sh bench/bench_ab.sh /tmp/onceq-old build/onceq ev1m.jsonl 5 1,2
#        sh bench/bench_ab.sh A B ev1m.jsonl 5 2 -- --handler noop
set -eu
[ $# -ge 3 ] || { echo "usage: sh bench/bench_ab.sh A B FILE [REPS] [WORKERS] [-- ARGS...]" >&2; exit 2; }
A=$1 B=$2 FILE=$3
REPS=${4:-5}
WORKERS=${5:-1,2}
shift $(( $# < 5 ? $# : 5 ))
[ "${1:-}" = "--" ] && shift

now() { date +%s.%N; }
# One run; exit 0 or 1 (dead letters) is a finished run, anything else
# (bad usage, a crash) stops the comparison.
run1() {
    rc=0
    "$@" || rc=$?
    if [ "$rc" -gt 1 ]; then
        echo "bench_ab: '$*' exited $rc" >&2
        exit 1
    fi
}
median() { sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

printf '%-8s %10s %10s %12s\n' workers "A (s)" "B (s)" "speed B/A"
for w in $(echo "$WORKERS" | tr , ' '); do
    ta= tb=
    i=0
    while [ $i -lt "$REPS" ]; do
        s=$(now); run1 "$A" run -q -w "$w" -o /dev/null --dlq /dev/null "$@" "$FILE"; e=$(now)
        ta="$ta $(awk -v s="$s" -v e="$e" 'BEGIN {print e - s}')"
        s=$(now); run1 "$B" run -q -w "$w" -o /dev/null --dlq /dev/null "$@" "$FILE"; e=$(now)
        tb="$tb $(awk -v s="$s" -v e="$e" 'BEGIN {print e - s}')"
        i=$((i + 1))
    done
    ma=$(echo "$ta" | tr ' ' '\n' | grep . | median)
    mb=$(echo "$tb" | tr ' ' '\n' | grep . | median)
    printf '%-8s %10.3f %10.3f %11.2fx\n' "$w" "$ma" "$mb" \
        "$(awk -v a="$ma" -v b="$mb" 'BEGIN {print a / b}')"
done
