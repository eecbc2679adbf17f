#!/bin/sh
# Description: what request-reply costs over Redis, in one run with its
# baseline: the same events drained by the same consumers, sent plainly
# (`onceq send`) and as requests (`onceq send --reply-to`, so every commit
# also writes a reply and caches its body); then the requesters' side
# (`onceq run --join-requests` over the replies: one MGET of contexts a
# batch) and `onceq request` end to end. A private redis-server on a free
# loopback port. Prints every command, the figures and the ratios.
# Environment: ONCEQ (default build/onceq), EVENTS (default 100000),
# WORKERS (threads per consumer, default 2), ROUNDS (default 3: medians).
set -eu
ONCEQ=${ONCEQ:-build/onceq}
EVENTS=${EVENTS:-100000}
WORKERS=${WORKERS:-2}
ROUNDS=${ROUNDS:-3}
TMP=$(mktemp -d)

. "$(dirname "$0")/redis_lib.sh"
trap 'redis_stop_all; rm -rf "$TMP"' EXIT
redis_start "$TMP"
PORT=$REDIS_PORT
URL=$REDIS_URL
now() { python3 -c 'import time; print(time.monotonic())'; }
median() { python3 -c "import sys,statistics; print(f'{statistics.median(map(float, sys.argv[1:])):.3f}')" "$@"; }

echo "bench_reqreply: $(nproc) CPUs, $EVENTS events, $WORKERS workers, $ROUNDS rounds"
"$ONCEQ" gen --events "$EVENTS" --duplicates 0.1 --seed 3 -o "$TMP/ev.jsonl"

# drain STREAM [--join-requests]: seconds for one consumer to drain STREAM
drain() {
  s=$1; shift
  t0=$(now)
  "$ONCEQ" run --redis "$URL" --stream "$s" --group g --drain -q \
    -w "$WORKERS" "$@" || [ $? -eq 1 ]
  t1=$(now)
  python3 -c "print(f'{$t1-$t0:.3f}')"
}

plain="" req="" join=""
for r in $(seq "$ROUNDS"); do
  redis-cli -p "$PORT" FLUSHALL >/dev/null
  "$ONCEQ" send --redis "$URL" --stream p --dedup-window 0 -q "$TMP/ev.jsonl"
  "$ONCEQ" send --redis "$URL" --stream q --reply-to qr --dedup-window 0 -q \
    "$TMP/ev.jsonl"
  plain="$plain $(drain p)"
  req="$req $(drain q)"
  join="$join $(drain qr --join-requests --handler noop)"
done
plain=$(median $plain); req=$(median $req); join=$(median $join)
printf '\n$ %s\n' "onceq run --redis URL --stream p --group g --drain -w $WORKERS   (sent plainly)"
echo "plain events:   $plain s"
printf '$ %s\n' "onceq run --redis URL --stream q --group g --drain -w $WORKERS   (sent with --reply-to qr)"
echo "requests:       $req s   (plain / requests: $(python3 -c "print(f'{$plain/$req:.2f}')")x)"
printf '$ %s\n' "onceq run --redis URL --stream qr --group g --drain -w $WORKERS --join-requests --handler noop"
echo "their replies:  $join s   (plain / replies: $(python3 -c "print(f'{$plain/$join:.2f}')")x)"

# onceq request, end to end, with one responder running.
redis-cli -p "$PORT" FLUSHALL >/dev/null
"$ONCEQ" run --redis "$URL" --stream rq --group g -q -w "$WORKERS" &
RESP=$!
head -n 20000 "$TMP/ev.jsonl" > "$TMP/req.jsonl"
t0=$(now)
"$ONCEQ" request --redis "$URL" --stream rq --reply-timeout 60s -q \
  "$TMP/req.jsonl" > "$TMP/out.jsonl" || true
t1=$(now)
kill $RESP; wait $RESP 2>/dev/null || true
printf '\n$ %s\n' "onceq request --redis URL --stream rq (20000 lines, one responder -w $WORKERS)"
echo "request: $(python3 -c "print(f'{20000/($t1-$t0):.0f}')") requests/s round trip, $(grep -c '"status":"ok"' "$TMP/out.jsonl") ok"
