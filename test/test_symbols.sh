#!/bin/sh
# Description: checks the library boundary of libonceq.so against
# include/onceq.h and src/libonceq.map: every function the header marks
# OQ_API is listed in the map and exported with the version of its map node
# (readelf shows name@@ONCEQ_x.y), nothing else is exported, the map lists
# nothing that is not in the header, and the library needs none of the
# CLI's libraries (SQLite, hiredis, cJSON). Prints "N passed, N failed".
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
lib="$top/${BUILD:-build}/libonceq.so"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "[ OK ] $1"; }
bad() { fail=$((fail + 1)); echo "[FAIL] $1"; }

# name per line: the functions the public header declares OQ_API.
sed -n 's/^OQ_API[^(]*[ *]\([a-z_0-9]*\)(.*/\1/p' "$top/include/onceq.h" |
  sort -u > "$tmp/api"
# "name node" per line: the map's global symbols and their version node.
sed 's|/\*.*\*/||; /\/\*/,/\*\//d' "$top/src/libonceq.map" | awk '
  /^[A-Z][A-Z0-9_.]* *\{/ { node = $1; global = 0; next }
  /global:/ { global = 1; next }
  /local:/ || /^ *}/ { global = 0; next }
  global && /;/ { gsub(/[ \t;]/, ""); if ($0 != "") print $0, node }
' | sort > "$tmp/map"
# "name version" per line: what the library exports (defined, dynamic).
readelf --dyn-syms --wide "$lib" | awk '
  $1 ~ /^[0-9]+:$/ && $7 != "UND" && $7 != "ABS" && $5 != "LOCAL" && NF >= 8 {
    n = $8; v = ""
    if (index(n, "@@")) { v = substr(n, index(n, "@@") + 2); n = substr(n, 1, index(n, "@@") - 1) }
    print n, v
  }' | sort > "$tmp/dyn"

if [ -s "$tmp/api" ] && [ "$(wc -l < "$tmp/api")" -ge 50 ]; then
  ok "header declares $(wc -l < "$tmp/api") OQ_API functions"
else
  bad "could not read the OQ_API functions of include/onceq.h"
fi

missing=$(cut -d' ' -f1 "$tmp/map" | comm -23 "$tmp/api" -)
if [ -z "$missing" ]; then ok "every OQ_API function is in src/libonceq.map"
else bad "OQ_API functions missing from src/libonceq.map:"; echo "$missing"; fi

stale=$(cut -d' ' -f1 "$tmp/map" | comm -13 "$tmp/api" -)
if [ -z "$stale" ]; then ok "the map lists only OQ_API functions"
else bad "src/libonceq.map lists names that are not OQ_API in include/onceq.h:"; echo "$stale"; fi

dups=$(cut -d' ' -f1 "$tmp/map" | uniq -d)
if [ -z "$dups" ]; then ok "each symbol is in one version node"
else bad "symbols in more than one version node:"; echo "$dups"; fi

if cmp -s "$tmp/map" "$tmp/dyn"; then
  ok "libonceq.so exports exactly the map's symbols, each name@@NODE"
else
  bad "exported symbols differ from the map (< map, > libonceq.so):"
  diff "$tmp/map" "$tmp/dyn" | grep '^[<>]'
fi

if readelf -V "$lib" | grep -q 'Name: ONCEQ_'; then ok "libonceq.so defines its ONCEQ_ version nodes"
else bad "libonceq.so has no ONCEQ_ version definition"; fi

needed=$(readelf -d "$lib" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
case "$needed" in
  *sqlite*|*hiredis*|*cjson*) bad "libonceq.so needs a CLI library: $needed" ;;
  *) ok "libonceq.so needs only: $needed" ;;
esac

if [ "$(readelf -d "$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')" = \
     "libonceq.so.$(sed -n 's/^#define OQ_VERSION_MAJOR \([0-9]*\)/\1/p' "$top/include/onceq.h")" ]; then
  ok "soname is libonceq.so.MAJOR"
else bad "soname is not libonceq.so.MAJOR"; fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
