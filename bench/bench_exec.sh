#!/bin/sh
# Description: fast command handlers (issue 17) in one run, on 2 workers:
# GNU parallel (`parallel -j2 true ::: $(seq N)`), `exec:` through the shell
# (a command with shell syntax), `exec:` direct (`exec:/bin/true`; `exec:true` would
# go through the shell: true is a builtin), and
# `coproc:` with the Python echo co-process (examples/coproc_echo.py).
# Prints each command, events/s (median of RUNS runs) and the ratio to
# parallel; CSV into $RESULTS/exec_handlers.csv. See docs/BENCHMARKS.md.
#
# Usage: sh bench/bench_exec.sh   (from the repository root, after make)
# Environment: ONCEQ (build/onceq), RUNS (3), EXEC_EVENTS (3000: parallel
#   and exec:), COPROC_EVENTS (200000), WORKERS (2), RESULTS (bench/results).
set -eu

ONCEQ=${ONCEQ:-build/onceq}
RUNS=${RUNS:-3}
EXEC_EVENTS=${EXEC_EVENTS:-3000}
COPROC_EVENTS=${COPROC_EVENTS:-200000}
WORKERS=${WORKERS:-2}
RESULTS=${RESULTS:-bench/results}
PY=$(command -v python3)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/onceq-bench-exec.XXXXXX")
trap 'rm -rf "$TMP"' EXIT INT TERM
mkdir -p "$RESULTS"

"$ONCEQ" gen --events "$EXEC_EVENTS" --seed 1 -o "$TMP/small.jsonl"
"$ONCEQ" gen --events "$COPROC_EVENTS" --seed 1 -o "$TMP/big.jsonl"

now() { date +%s.%N; }

# median_rate EVENTS CMD...: runs CMD RUNS times, prints the median events/s.
median_rate() {
    n=$1; shift
    i=0; rates=""
    while [ "$i" -lt "$RUNS" ]; do
        t0=$(now)
        "$@" > /dev/null 2>&1
        t1=$(now)
        rates="$rates $(echo "$n $t0 $t1" | awk '{ printf "%.0f", $1 / ($3 - $2) }')"
        i=$((i + 1))
    done
    echo $rates | tr ' ' '\n' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'
}

echo "bench_exec: $WORKERS workers, median of $RUNS runs, $(nproc) CPUs"
printf '%-10s %12s %10s  %s\n' mode events/s "x parallel" command
echo "mode,events,events_per_s,ratio_to_parallel" > "$RESULTS/exec_handlers.csv"

row() { # MODE EVENTS RATE COMMAND
    ratio=$(echo "$3 $base" | awk '{ printf "%.2f", $1 / $2 }')
    printf '%-10s %12s %10s  %s\n' "$1" "$3" "$ratio" "$4"
    echo "$1,$2,$3,$ratio" >> "$RESULTS/exec_handlers.csv"
}

if command -v parallel > /dev/null 2>&1; then
    base=$(median_rate "$EXEC_EVENTS" sh -c "parallel -j$WORKERS true ::: \$(seq $EXEC_EVENTS)")
    row parallel "$EXEC_EVENTS" "$base" "parallel -j$WORKERS true ::: \$(seq $EXEC_EVENTS)"
else
    base=1
    echo "(GNU parallel not installed: ratios are to 1 event/s)"
fi
cmd="$ONCEQ run -q -w $WORKERS --handler 'exec:/bin/true;' -o /dev/null small.jsonl"
r=$(median_rate "$EXEC_EVENTS" "$ONCEQ" run -q -w "$WORKERS" --handler 'exec:/bin/true;' -o /dev/null "$TMP/small.jsonl")
row exec-sh "$EXEC_EVENTS" "$r" "$cmd"
cmd="$ONCEQ run -q -w $WORKERS --handler exec:/bin/true -o /dev/null small.jsonl"
r_exec=$(median_rate "$EXEC_EVENTS" "$ONCEQ" run -q -w "$WORKERS" --handler exec:/bin/true -o /dev/null "$TMP/small.jsonl")
row exec "$EXEC_EVENTS" "$r_exec" "$cmd"
cmd="$ONCEQ run -q -w $WORKERS --handler 'coproc:python3 examples/coproc_echo.py' -o /dev/null big.jsonl"
r=$(median_rate "$COPROC_EVENTS" "$ONCEQ" run -q -w "$WORKERS" --handler "coproc:$PY examples/coproc_echo.py" -o /dev/null "$TMP/big.jsonl")
row coproc "$COPROC_EVENTS" "$r" "$cmd"
echo "coproc / exec (direct): $(echo "$r $r_exec" | awk '{ printf "%.1f", $1 / $2 }')x"
