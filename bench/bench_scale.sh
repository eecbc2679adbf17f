#!/bin/sh
# Scaling with cores: `onceq run` at several worker counts against the bare
# single-thread loop (split + cJSON + set insert + count), measured side by
# side in one run (bench_run: the bare loop again before every round, and
# each figure the median of its per-round ratios), for both event shapes
# (small events with a "word"; events with a "text" of several words).
# (Durable runs: bench/bench_durable.sh.)
#
# Meant for a many-core machine: copy build/onceq, build/bench/bench_run
# and the shared libraries `ldd build/onceq` lists into one folder, set
# LD_LIBRARY_PATH to it, and run
#   sh bench/bench_scale.sh [EVENTS] [REPS] [WORKERS]
# e.g. sh bench/bench_scale.sh 2000000 3 1,2,4,8,16
#
# env: ONCEQ (default build/onceq), BENCH_RUN (default
# build/bench/bench_run), OUT (default bench/results: scale-*.csv)
set -eu
ONCEQ=${ONCEQ:-build/onceq}
BENCH_RUN=${BENCH_RUN:-build/bench/bench_run}
N=${1:-1000000}
REPS=${2:-3}
WORKERS=${3:-1,2}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"

echo "== machine: $(nproc) CPUs, $(uname -m); $("$ONCEQ" --version)"
for shape in word text; do
    flag=""
    [ "$shape" = text ] && flag="--text"
    echo
    echo "\$ $BENCH_RUN --events $N --reps $REPS $flag --workers $WORKERS --handlers noop,wordcount"
    "$BENCH_RUN" --onceq "$ONCEQ" --events "$N" --reps "$REPS" $flag \
        --workers "$WORKERS" --handlers noop,wordcount \
        --csv "$OUT/scale-$shape.csv"
done
