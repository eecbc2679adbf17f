#!/bin/sh
# Description: onceq side by side with the tools users would pick instead.
#
# Five scenarios; each runs onceq and its peer in the same run, on the same
# generated input, prints every command it times and a table with the
# ratio, writes CSV into bench/results/peers_*.csv and renders PNG plots
# with gnuplot (bench/plots/*.gp -> bench/results/peers_*.png):
#   1 exec   `onceq run --handler exec:/bin/true -w 2` vs GNU parallel -j2
#   2 queue  the onceq library queue (in-process) vs beanstalkd (loopback)
#   3 dedup  `onceq run --handler wordcount` vs a threaded Python script
#   4 ideal  bench_run: a bare single-thread loop and a memchr-only pass
#   5 scale  events/s, MB/s and memory per id for 10^4..10^7 events
# Every figure is the median of RUNS runs. See docs/BENCHMARKS.md.
#
# Usage: sh bench/bench_peers.sh        (from the repository root, after make
#        and make benches; make bench runs it)
# Environment: ONCEQ (default build/onceq), RUNS (3), SCENARIOS ("1 2 3 4 5"),
#   EXEC_EVENTS (5000), PIPE_RUNS (runs of the slower `parallel --pipe -N1`
#   form, default 1; 0 skips it), QUEUE_JOBS (200000), DEDUP_EVENTS
#   (1000000), MAX_EVENTS (largest scaling size, default 10000000),
#   RESULTS (bench/results), TMPDIR (/tmp; the 10^7 file needs ~340 MB).
set -eu

ONCEQ=${ONCEQ:-build/onceq}
RUNS=${RUNS:-3}
SCENARIOS=${SCENARIOS:-1 2 3 4 5}
EXEC_EVENTS=${EXEC_EVENTS:-5000}
PIPE_RUNS=${PIPE_RUNS:-1}
QUEUE_JOBS=${QUEUE_JOBS:-200000}
DEDUP_EVENTS=${DEDUP_EVENTS:-1000000}
MAX_EVENTS=${MAX_EVENTS:-10000000}
RESULTS=${RESULTS:-bench/results}
LIBS="-lxxhash -lcjson -lsqlite3 -lhiredis -lm -ldl -pthread"

die() { echo "bench_peers: $*" >&2; exit 1; }

[ -f include/onceq.h ] || die "run from the repository root"
[ -x "$ONCEQ" ] || die "no binary at $ONCEQ (run make)"
mkdir -p "$RESULTS" build/peers
tmp=$(mktemp -d "${TMPDIR:-/tmp}/onceq-peers.XXXXXX")
bs_pid=""
cleanup() {
    [ -z "$bs_pid" ] || kill "$bs_pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
# median V...: the middle value (the lower middle for an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# minmax V...: "min,max".
minmax() { printf '%s\n' "$@" | sort -g | awk 'NR == 1 { a = $1 } { b = $1 } END { print a "," b }'; }
# calc EXPR: awk arithmetic, printed with %.6g unless a format is given.
calc() { awk "BEGIN { printf \"${2:-%.6g}\", $1 }"; }
# untmp S: S with this run's temporary directory written as $TMP.
untmp() { printf '%s\n' "$1" | sed "s|$tmp|\$TMP|g"; }
want() { case " $SCENARIOS " in *" $1 "*) return 0 ;; esac; return 1; }
gen() { "$ONCEQ" gen "$@"; }
load() { awk '{ print $1, $2, $3 }' /proc/loadavg; }

# timed CMD: runs the shell command CMD and prints its wall time in seconds;
# fails the benchmark if it fails.
timed() {
    t0=$(now)
    sh -c "$1" || die "failed: $1"
    t1=$(now)
    calc "$t1 - $t0"
}
# timed_any CMD: the same, whatever CMD's exit status.
timed_any() {
    t0=$(now)
    sh -c "$1" || true
    t1=$(now)
    calc "$t1 - $t0"
}

# plot NAME EVENTS: renders bench/plots/NAME.gp.
plot() {
    if command -v gnuplot >/dev/null 2>&1; then
        gnuplot -e "runs = $RUNS; events = ${2:-0}; dir = '$RESULTS'" "bench/plots/$1.gp" ||
            die "gnuplot bench/plots/$1.gp failed"
        echo "plot: $RESULTS/peers_$1.png"
    else
        echo "plot: gnuplot not installed (make deps), $1 not rendered"
    fi
}

# bench_check_stats FILE LINES PROCESSED: the --stats of a run.
check_stats() {
    grep -q "\"lines\":$2," "$1" && grep -q "\"processed\":$3," "$1" ||
        die "unexpected stats in $1: $(cat "$1")"
}

echo "bench_peers: $(nproc) CPUs, load average $(load), RUNS=$RUNS (medians)"
echo "             $(uname -srm), $("$ONCEQ" --version 2>/dev/null || echo onceq)"

# ---------------------------------------------------------------- 1 exec
if want 1; then
    command -v parallel >/dev/null || die "GNU parallel not installed (make deps)"
    echo
    echo "== 1. exec mode vs GNU parallel: $EXEC_EVENTS events, /bin/true, 2 at a time"
    ev=$tmp/exec.jsonl
    gen --events "$EXEC_EVENTS" --seed 3 -o "$ev"
    oq="$ONCEQ run -q --no-progress -w 2 --dlq $tmp/exec-dlq.jsonl --stats $tmp/exec-stats.json"
    set -- \
        "parallel -j2 /bin/true :::: $ev" "GNU parallel -j2 (one job per line)" \
        "$oq --handler exec:/bin/true $ev > /dev/null" "onceq exec:/bin/true (no shell)" \
        "$oq --handler 'exec:/bin/true;' $ev > /dev/null" "onceq exec:/bin/true; (via /bin/sh)"
    csv=$RESULTS/peers_exec.csv
    echo "contender,command,events,runs,seconds,jobs_per_s,x_parallel" >"$csv"
    printf '%-40s %10s %10s %12s\n' contender seconds jobs/s "x parallel"
    base=""
    while [ $# -gt 0 ]; do
        cmd=$1 name=$2
        shift 2
        echo "\$ $cmd"
        ts=""
        i=0
        while [ $i -lt "$RUNS" ]; do
            ts="$ts $(timed "$cmd")"
            case $cmd in "$ONCEQ"*) check_stats "$tmp/exec-stats.json" "$EXEC_EVENTS" "$EXEC_EVENTS" ;; esac
            i=$((i + 1))
        done
        t=$(median $ts)
        rate=$(calc "$EXEC_EVENTS / $t" %.0f)
        [ -n "$base" ] || base=$rate
        ratio=$(calc "$rate / $base" %.2f)
        printf '%-40s %10.3f %10d %12s\n' "$name" "$t" "$rate" "$ratio"
        echo "$name,\"$(untmp "$cmd")\",$EXEC_EVENTS,$RUNS,$t,$rate,$ratio" >>"$csv"
    done
    if [ "$PIPE_RUNS" -gt 0 ]; then
        # The same event on stdin as onceq gives it: parallel reads the
        # input itself, and is slower; shown once, not the baseline. Its
        # exit status is ignored: /bin/true exits without reading its
        # stdin, and parallel counts a job whose input it could not write
        # in full as failed (a race; some of them, each run).
        cmd="parallel -j2 --pipe -N1 /bin/true < $ev"
        echo "\$ $cmd"
        ts=""
        i=0
        while [ $i -lt "$PIPE_RUNS" ]; do
            ts="$ts $(timed_any "$cmd")"
            i=$((i + 1))
        done
        t=$(median $ts)
        rate=$(calc "$EXEC_EVENTS / $t" %.0f)
        name="GNU parallel -j2 --pipe -N1 (stdin)"
        printf '%-40s %10.3f %10d %12s\n' "$name" "$t" "$rate" "$(calc "$rate / $base" %.2f)"
        echo "$name,\"$(untmp "$cmd")\",$EXEC_EVENTS,$PIPE_RUNS,$t,$rate,$(calc "$rate / $base" %.2f)" >>"$csv"
    fi
    plain=$(awk -F, '$1 ~ /no shell/ { print $6 }' "$csv")
    viash=$(awk -F, '$1 ~ /via/ { print $6 }' "$csv")
    echo "goal >= 10x parallel: $(calc "$plain / $base" %.1f)x without a shell, $(calc "$viash / $base" %.1f)x via sh;" \
        "goal >= 2500 jobs/s: $plain without a shell, $viash via sh"
    plot exec "$EXEC_EVENTS"
fi

# --------------------------------------------------------------- 2 queue
if want 2; then
    command -v beanstalkd >/dev/null || die "beanstalkd not installed (make deps)"
    echo
    echo "== 2. queue with timeouts vs beanstalkd: $QUEUE_JOBS jobs, TTR 30 s, 1 producer, 2 consumers"
    peer=build/peers/queue_peer
    # shellcheck disable=SC2086
    cc -O2 -std=c11 -D_GNU_SOURCE -Iinclude -o "$peer" bench/peers/queue_peer.c \
        "${BUILD:-build}/libonceq.a" $LIBS || die "cannot build $peer"
    pl=$tmp/queue.jsonl
    gen --events "$QUEUE_JOBS" --seed 2 -o "$pl"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    beanstalkd -l 127.0.0.1 -p "$port" &
    bs_pid=$!
    i=0
    until python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.5)" 2>/dev/null; do
        i=$((i + 1))
        [ $i -lt 50 ] || die "beanstalkd did not start on port $port"
        sleep 0.1
    done
    echo "beanstalkd $(beanstalkd -v 2>&1 | awk '{ print $2 }') on 127.0.0.1:$port (pid $bs_pid, in memory, no binlog)"
    common="$peer --payloads $pl --jobs $QUEUE_JOBS --ttr 30 --consumers 2 --window 1000"
    set -- "$common --beanstalkd 127.0.0.1:$port" "beanstalkd (reserve/delete round trips)" \
        "$common --onceq --batch 1" "onceq queue (receive 1 + ack)" \
        "$common --onceq --batch 16" "onceq queue (receive 16 + settle)"
    for a in "$1" "$3" "$5"; do echo "\$ $a"; done
    # Interleaved, so a burst of load hits every contender alike.
    : >"$tmp/queue.out"
    i=0
    while [ $i -lt "$RUNS" ]; do
        for a in "$1" "$3" "$5"; do
            $a >>"$tmp/queue.out" || die "failed: $a"
        done
        i=$((i + 1))
    done
    kill "$bs_pid" 2>/dev/null || true
    wait "$bs_pid" 2>/dev/null || true
    bs_pid=""
    csv=$RESULTS/peers_queue.csv
    echo "contender,mode,jobs,runs,put_per_s,consume_per_s,total_per_s,x_beanstalkd" >"$csv"
    printf '%-40s %12s %12s %12s %13s\n' contender put/s consume/s total/s "x beanstalkd"
    base=""
    for m in "beanstalkd|$2" "onceq_batch1|$4" "onceq_batch16|$6"; do
        mode=${m%%|*} name=${m#*|}
        put=$(median $(awk -F, -v m="$mode" '$1 == m { print $3 }' "$tmp/queue.out"))
        con=$(median $(awk -F, -v m="$mode" '$1 == m { print $4 }' "$tmp/queue.out"))
        tot=$(median $(awk -F, -v m="$mode" '$1 == m { print $5 }' "$tmp/queue.out"))
        [ -n "$base" ] || base=$tot
        ratio=$(calc "$tot / $base" %.1f)
        printf '%-40s %12d %12d %12d %13s\n' "$name" "$put" "$con" "$tot" "$ratio"
        echo "$name,$mode,$QUEUE_JOBS,$RUNS,$put,$con,$tot,$ratio" >>"$csv"
    done
    plot queue "$QUEUE_JOBS"
fi

# --------------------------------------------------- 3 dedup, 4 ideal
ev1m=$tmp/events-$DEDUP_EVENTS.jsonl
if want 3 || want 4; then
    gen --events "$DEDUP_EVENTS" --duplicates 0.1 --words 1000 --seed 1 -o "$ev1m"
    cat "$ev1m" >/dev/null # in the page cache for every contender
fi
if want 3; then
    echo
    echo "== 3. dedup + word count vs a straightforward Python script: $DEDUP_EVENTS events, 10% duplicates, 2 workers"
    echo "$ONCEQ gen --events $DEDUP_EVENTS --duplicates 0.1 --words 1000 --seed 1 -o $ev1m"
    py="python3 bench/peers/dedup_count.py -w 2 $ev1m > $tmp/py.out 2> $tmp/py.err"
    oq="$ONCEQ run -q --no-progress -w 2 --handler wordcount --stats $tmp/wc-stats.json $ev1m > $tmp/oq.out"
    echo "\$ $py"
    echo "\$ $oq"
    pys="" oqs=""
    i=0
    while [ $i -lt "$RUNS" ]; do
        pys="$pys $(timed "$py")"
        oqs="$oqs $(timed "$oq")"
        # Both must count the same: the same words, the same totals.
        cmp -s "$tmp/py.out" "$tmp/oq.out" || {
            diff "$tmp/py.out" "$tmp/oq.out" | head -20 >&2
            die "Python and onceq counts differ (above)"
        }
        i=$((i + 1))
    done
    pyproc=$(awk '{ print $2 }' "$tmp/py.err")
    pydup=$(awk '{ print $4 }' "$tmp/py.err")
    check_stats "$tmp/wc-stats.json" "$DEDUP_EVENTS" "$pyproc"
    grep -q "\"duplicates\":$pydup," "$tmp/wc-stats.json" || die "duplicate counts differ"
    echo "check: identical word counts ($(wc -l <"$tmp/oq.out") words), $pyproc events counted, $pydup duplicates skipped, by both"
    pyt=$(median $pys)
    oqt=$(median $oqs)
    pyr=$(calc "$DEDUP_EVENTS / $pyt" %.0f)
    oqr=$(calc "$DEDUP_EVENTS / $oqt" %.0f)
    csv=$RESULTS/peers_dedup.csv
    echo "contender,events,runs,seconds,events_per_s,x_python,seconds_min,seconds_max" >"$csv"
    printf '%-40s %10s %12s %10s\n' contender seconds events/s "x Python"
    printf '%-40s %10.3f %12d %10s\n' "Python $(python3 -c 'import platform; print(platform.python_version())') threads+Queue+set" "$pyt" "$pyr" 1.00
    printf '%-40s %10.3f %12d %10s\n' "onceq run wordcount -w 2" "$oqt" "$oqr" "$(calc "$oqr / $pyr" %.2f)"
    echo "Python threads+queue.Queue+set -w 2,$DEDUP_EVENTS,$RUNS,$pyt,$pyr,1,$(minmax $pys)" >>"$csv"
    echo "onceq run wordcount -w 2,$DEDUP_EVENTS,$RUNS,$oqt,$oqr,$(calc "$oqr / $pyr" %.2f),$(minmax $oqs)" >>"$csv"
    echo "spread (min..max seconds): Python $(minmax $pys | tr , ' '), onceq $(minmax $oqs | tr , ' ')"
    plot dedup "$DEDUP_EVENTS"
fi

# --------------------------------------------------------------- 4 ideal
if want 4; then
    echo
    echo "== 4. the ideal: bare single-thread loop and memchr-only pass, same $DEDUP_EVENTS events"
    br=${BUILD:-build}/bench/bench_run
    [ -x "$br" ] || die "no $br (run make benches)"
    cmd="$br --onceq $ONCEQ --file $ev1m --events $DEDUP_EVENTS --reps $RUNS --csv $RESULTS/peers_ideal.csv"
    echo "\$ $cmd"
    $cmd || die "failed: $cmd"
    plot ideal "$DEDUP_EVENTS"
fi

# --------------------------------------------------------------- 5 scale
if want 5; then
    echo
    echo "== 5. scaling: onceq run (wordcount, -w 2) on 10^4..$MAX_EVENTS events, 10% duplicates"
    im=${BUILD:-build}/bench/bench_idset_mem
    [ -x "$im" ] || die "no $im (run make benches)"
    # The resident size of a run that remembers (almost) nothing.
    gen --events 100 --seed 1 -o "$tmp/tiny.jsonl"
    rss0s="" t0s=""
    i=0
    while [ $i -lt "$RUNS" ]; do
        t0s="$t0s $(timed "/usr/bin/time -f %M -o $tmp/rss $ONCEQ run -q --no-progress -w 2 $tmp/tiny.jsonl > /dev/null")"
        rss0s="$rss0s $(cat "$tmp/rss")"
        i=$((i + 1))
    done
    rss0=$(median $rss0s)
    tstart=$(median $t0s)
    echo "baseline: a 100-event run takes $(calc "$tstart * 1000" %.1f) ms (process start and exit), max RSS $rss0 KB"
    echo "\$ $ONCEQ gen --events N --duplicates 0.1 --words 1000 --seed 1 -o $tmp/scale-N.jsonl"
    echo "\$ /usr/bin/time -f %M $ONCEQ run -q --no-progress -w 2 --stats $tmp/scale-stats.json $tmp/scale-N.jsonl > /dev/null"
    echo "\$ $im --ids <unique ids of N>"
    csv=$RESULTS/peers_scale.csv
    echo "events,bytes,unique_ids,runs,seconds,events_per_s,mb_per_s,ns_per_event,ns_per_event_net,max_rss_kb,rss_bytes_per_id,idset_bytes_per_id" >"$csv"
    printf '%10s %8s %8s %10s %6s %8s %8s %9s %8s %8s\n' events MB seconds events/s MB/s ns/event "ns net" maxRSS_MB "B/id run" "B/id set"
    n=10000
    while [ "$n" -le "$MAX_EVENTS" ]; do
        f=$tmp/scale-$n.jsonl
        gen --events "$n" --duplicates 0.1 --words 1000 --seed 1 -o "$f"
        cat "$f" >/dev/null
        bytes=$(wc -c <"$f")
        cmd="$ONCEQ run -q --no-progress -w 2 --stats $tmp/scale-stats.json $f > /dev/null"
        ts="" rss=""
        i=0
        while [ $i -lt "$RUNS" ]; do
            ts="$ts $(timed "/usr/bin/time -f %M -o $tmp/rss $cmd")"
            rss="$rss $(cat "$tmp/rss")"
            i=$((i + 1))
        done
        uniq=$(sed 's/.*"processed":\([0-9]*\),.*/\1/' "$tmp/scale-stats.json")
        check_stats "$tmp/scale-stats.json" "$n" "$uniq"
        rm -f "$f"
        t=$(median $ts)
        r=$(median $rss)
        idb=$("$im" --ids "$uniq" | awk -v n="$uniq" '$1 == n { print $3 }')
        eps=$(calc "$n / $t" %.0f)
        mbs=$(calc "$bytes / $t / 1e6" %.1f)
        nse=$(calc "$t * 1e9 / $n" %.0f)
        net=$(calc "($t - $tstart) * 1e9 / $n" %.0f)
        bpi=$(calc "($r - $rss0) * 1024 / $uniq" %.1f)
        printf '%10d %8.1f %8.3f %10d %6s %8s %8s %9.1f %8s %8s\n' "$n" "$(calc "$bytes / 1e6")" "$t" "$eps" "$mbs" "$nse" "$net" "$(calc "$r / 1024")" "$bpi" "$idb"
        echo "$n,$bytes,$uniq,$RUNS,$t,$eps,$mbs,$nse,$net,$r,$bpi,$idb" >>"$csv"
        n=$((n * 10))
    done
    echo "(ns net: (seconds - the 100-event run's) / events; B/id run: (max RSS - $rss0 KB) / unique ids of the whole onceq run; B/id set: $im --ids <unique ids>; goal <= 32)"
    plot scale
    plot memory
fi

echo
echo "bench_peers: done, load average $(load); CSV and PNG in $RESULTS/"
