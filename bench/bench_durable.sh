#!/bin/sh
# Durable wordcount (onceq run --state) against the in-memory run, side by
# side in one script, on the same generated file (1M events, 10% duplicates,
# in the page cache). Reports events/s (best of REPS), the ratio to the
# in-memory run, commits (= WAL fsyncs with --sync full) per second, the
# batch sizes the committer reached, and database bytes per processed id.
# With strace installed, one more --sync full run counts the real fsyncs.
#
# Then SQLite's single-writer limit for the same rows: bench_sqlite writes
# the processed ids and the summed counts of the same file in transactions
# of the size the --sync full run reached (its events_per_commit_avg), one
# thread and nothing else, REPS times; onceq's durable rate is reported as
# a ratio to its best.
#
# usage: sh bench/bench_durable.sh [EVENTS] [REPS]
# env:   ONCEQ (default build/onceq), BARE (default build/bench/bench_sqlite),
#        CSV (default bench/results/durable.csv)
set -eu
ONCEQ=${ONCEQ:-build/onceq}
BARE=${BARE:-build/bench/bench_sqlite}
N=${1:-1000000}
REPS=${2:-3}
CSV=${CSV:-bench/results/durable.csv}
DIR=$(mktemp -d /tmp/onceq-bench-durable.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
F=$DIR/events.jsonl

echo "\$ $ONCEQ gen --events $N --duplicates 0.1 --seed 1 -o events.jsonl"
"$ONCEQ" gen --events "$N" --duplicates 0.1 --seed 1 -o "$F"
cat "$F" > /dev/null

# best_of NAME ARGS...: runs onceq run REPS times, keeps the fastest stats.
best_of() {
  name=$1; shift
  best=""
  i=0
  while [ "$i" -lt "$REPS" ]; do
    rm -f "$DIR"/s.db "$DIR"/s.db-wal "$DIR"/s.db-shm
    "$ONCEQ" run -q -w 2 -o /dev/null --stats "$DIR/st" "$@" "$F"
    python3 - "$DIR/st" "$DIR/best.$name" <<'EOF'
import json, os, sys
new = json.load(open(sys.argv[1]))
try:
    old = json.load(open(sys.argv[2]))
except OSError:
    old = None
if old is None or new["elapsed_s"] < old["elapsed_s"]:
    json.dump(new, open(sys.argv[2], "w"))
EOF
    i=$((i + 1))
  done
}

echo "\$ $ONCEQ run -q -w 2 -o /dev/null --stats - events.jsonl   (best of $REPS)"
best_of mem
for sync in full normal off; do
  echo "\$ $ONCEQ run -q -w 2 -o /dev/null --stats - --state s.db --sync $sync events.jsonl   (new state each time, best of $REPS)"
  best_of "$sync" --state "$DIR/s.db" --sync "$sync"
done
echo "\$ $ONCEQ run ... --state s.db --sync full --commit-batch 1024 events.jsonl   (best of $REPS)"
best_of full1024 --state "$DIR/s.db" --sync full --commit-batch 1024

fsyncs=""
if command -v strace > /dev/null 2>&1; then
  rm -f "$DIR"/s.db "$DIR"/s.db-wal "$DIR"/s.db-shm
  echo "\$ strace -f -c -e trace=fsync,fdatasync $ONCEQ run -q -w 2 -o /dev/null --state s.db --sync full events.jsonl"
  strace -f -c -o "$DIR/strace" -e trace=fsync,fdatasync \
    "$ONCEQ" run -q -w 2 -o /dev/null --state "$DIR/s.db" --sync full "$F"
  fsyncs=$(awk '$NF == "fsync" || $NF == "fdatasync" {n += $4} END {print n + 0}' "$DIR/strace")
fi

# SQLite's single-writer limit, in transactions of the size onceq reached.
B=$(python3 -c "import json,sys; print(max(1, round(json.load(open(sys.argv[1]))['state']['events_per_commit_avg'])))" "$DIR/best.full")
echo "\$ $BARE --file events.jsonl --db bare.db --batch $B --sync full   (best of $REPS)"
i=0
: > "$DIR/bare"
while [ "$i" -lt "$REPS" ]; do
  "$BARE" --file "$F" --db "$DIR/bare.db" --batch "$B" --sync full >> "$DIR/bare"
  i=$((i + 1))
done
rm -f "$DIR"/bare.db*

# The resume path: a finished run, run again (loads every id, skips every line).
echo "\$ $ONCEQ run -q -w 2 -o /dev/null --stats - --state s.db events.jsonl   (again: nothing left to do)"
rm -f "$DIR"/s.db "$DIR"/s.db-wal "$DIR"/s.db-shm
"$ONCEQ" run -q -w 2 -o /dev/null --state "$DIR/s.db" "$F"
"$ONCEQ" run -q -w 2 -o /dev/null --stats "$DIR/best.rerun" --state "$DIR/s.db" "$F"

mkdir -p "$(dirname "$CSV")"
python3 - "$DIR" "$CSV" "${fsyncs:-}" <<'EOF'
import json, sys
d, csv, fsyncs = sys.argv[1], sys.argv[2], sys.argv[3]
mem = json.load(open(f"{d}/best.mem"))
rate = lambda s: (s["lines"] - s["blank"]) / s["elapsed_s"]
rows = []
print()
print(f"{'configuration':32} {'events/s':>10} {'x mem':>6} {'commits/s':>10} "
      f"{'batch avg':>9} {'max':>5} {'bytes/id':>9}")
print(f"{'in-memory':32} {rate(mem):10.0f} {1.0:6.2f}")
rows.append(("in-memory", rate(mem), 1.0, "", "", "", ""))
for name, label in (("full", "--sync full"), ("normal", "--sync normal"),
                    ("off", "--sync off"),
                    ("full1024", "--sync full --commit-batch 1024")):
    s = json.load(open(f"{d}/best.{name}"))
    st = s["state"]
    r = rate(s)
    bpi = st["db_bytes"] / max(st["processed_ids"], 1)
    print(f"{label:32} {r:10.0f} {r / rate(mem):6.2f} "
          f"{st['commits_per_s']:10.0f} {st['events_per_commit_avg']:9.1f} "
          f"{st['events_per_commit_max']:5d} {bpi:9.1f}")
    rows.append((label, r, r / rate(mem), st["commits_per_s"],
                 st["events_per_commit_avg"], st["events_per_commit_max"],
                 bpi))
re = json.load(open(f"{d}/best.rerun"))
print(f"\nrerun of a finished run: {re['elapsed_s']:.2f} s, "
      f"{re['resumed_skipped_lines']} lines skipped unread, "
      f"{re['state']['loaded_ids']} ids loaded in {re['state']['load_ms']} ms, "
      f"{re['processed']} processed")
if fsyncs:
    full = json.load(open(f"{d}/best.full"))
    print(f"strace: {fsyncs} fsync/fdatasync calls in one --sync full run "
          f"({full['state']['commits']} commits in the best run)")
s = json.load(open(f"{d}/best.full"))
bare = max(float(l.split()[-2]) for l in open(f"{d}/bare") if "events/s" in l)
print(f"SQLite single-writer limit (bench_sqlite, same rows, transactions of "
      f"{s['state']['events_per_commit_avg']:.0f}): {bare:.0f} events/s; "
      f"onceq --sync full: {rate(s) / bare:.2f}x of it")
rows.append(("sqlite single writer (same rows)", bare, bare / rate(mem),
             "", "", "", ""))
print(f"\ngoal: --sync full >= 0.50x in-memory: "
      f"{'met' if rate(s) / rate(mem) >= 0.5 else 'NOT met'} "
      f"({rate(s) / rate(mem):.2f}x)")
with open(csv, "w") as f:
    f.write("configuration,events_per_s,ratio,commits_per_s,batch_avg,"
            "batch_max,db_bytes_per_id\n")
    for r in rows:
        f.write(",".join(str(round(x, 2)) if isinstance(x, float) else str(x)
                         for x in r) + "\n")
print(f"csv: {csv}")
EOF
