#!/bin/sh
# Description: bytes of Redis memory per remembered id (a done-mark), the
# bucketed layout of onceq against the old one (one "D" string key per id),
# on a private redis-server on a free loopback port. IDS ids (gen's
# evt-N, no duplicates) are sent and drained with the noop handler; then
# every key but the done-marks (S:d:*) is deleted, and the figures are
#   - used_memory (INFO memory) minus the empty server's, per id;
#   - the sum of MEMORY USAGE of the S:d:* keys, per id;
#   - for the old layout: used_memory's growth when the same ids are SET
#     as S:id:<id> "D" in another db (what onceq wrote before), per id.
# Also the stream's length after the drain (trimmed: XTRIM MINID), and
# send's dedup marks (--dedup-window 5m): used_memory's growth of a send
# with them minus one without (db 2 and 3), per id.
# Environment: ONCEQ (default build/onceq), IDS (default 200000).
set -eu
ONCEQ=${ONCEQ:-build/onceq}
IDS=${IDS:-200000}
TMP=$(mktemp -d)
. "$(dirname "$0")/redis_lib.sh"
trap 'redis_stop_all; rm -rf "$TMP"' EXIT
redis_start "$TMP"
PORT=$REDIS_PORT
URL=$REDIS_URL
R="redis-cli -p $PORT"
used() { $R INFO memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p'; }
$R CONFIG SET activedefrag no >/dev/null 2>&1 || true
"$ONCEQ" gen --events "$IDS" --duplicates 0 -o "$TMP/ev.jsonl"
base=$(used)
echo "+ onceq send --dedup-window 0 --stream m ($IDS ids)"
"$ONCEQ" send --redis "$URL" --stream m --dedup-window 0 -q "$TMP/ev.jsonl"
echo "+ onceq run --redis $URL --stream m --group g --handler noop -w 2 --drain"
"$ONCEQ" run --redis "$URL" --stream m --group g --handler noop -w 2 \
  --drain -q
xlen=$($R XLEN m)
$R --scan --pattern 'm:d:*' > "$TMP/dkeys"
usage=0
while read -r k; do
  usage=$((usage + $($R MEMORY USAGE "$k" SAMPLES 0)))
done < "$TMP/dkeys"
nkeys=$(wc -l < "$TMP/dkeys")
listpack=0
while read -r k; do
  [ "$($R OBJECT ENCODING "$k")" = listpack ] && listpack=$((listpack + 1))
done < "$TMP/dkeys"
$R DEL m m:stats m:meta m:counts m:results m:dlq m:delayed >/dev/null
sleep 0.2
marks=$(($(used) - base))
# The old layout: S:id:<id> = "D", one string key per id.
$R SELECT 1 >/dev/null
base1=$(used)
$R -n 1 EVAL "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'm:id:evt-' .. i, 'D') end" 0 "$IDS" >/dev/null
old=$(($(used) - base1))
# send's dedup marks: the same send with and without the window.
$R -n 2 FLUSHDB >/dev/null
b2=$(used)
"$ONCEQ" send --redis "$URL/2" --stream m --dedup-window 0 -q "$TMP/ev.jsonl"
plain=$(($(used) - b2))
b3=$(used)
"$ONCEQ" send --redis "$URL/3" --stream m --dedup-window 5m -q "$TMP/ev.jsonl"
dedup=$(($(used) - b3 - plain))
echo "ids $IDS: $nkeys done-mark keys ($listpack listpack);" \
  "stream left $xlen entries after the drain"
python3 - "$IDS" "$marks" "$usage" "$old" "$dedup" <<'PY'
import sys
n, marks, usage, old, dedup = map(int, sys.argv[1:])
print(f"bytes per id: used_memory {marks / n:.1f}, MEMORY USAGE "
      f"{usage / n:.1f}; old layout (S:id:<id> = D) {old / n:.1f}")
print(f"send's dedup marks (--dedup-window 5m): {dedup / n:.1f} bytes per id")
PY
