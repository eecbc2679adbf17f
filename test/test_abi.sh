#!/bin/sh
# Description: the ABI check guards the public ABI. `make abi-check` passes
# on the library as built; on a copy of the sources whose onceq.h lost a
# struct field (oq_idset_stats.table_bytes; the one line of idset.c that
# writes it is pointed at another field by a macro, so the copy compiles)
# it fails, and abidiff names the deleted member. Needs abigail-tools
# (make deps). Prints "N passed, N failed".
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD:-build}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "[ OK ] $1"; }
bad() { fail=$((fail + 1)); echo "[FAIL] $1"; }

if ! command -v abidiff >/dev/null 2>&1; then
  bad "abidiff not found: install abigail-tools (make deps)"
  echo "$pass passed, $fail failed"
  exit 1
fi

if make -s -C "$top" abi-check BUILD="$build" >"$tmp/out" 2>&1; then
  ok "make abi-check passes on $build/libonceq.so"
else
  bad "make abi-check fails on $build/libonceq.so"; cat "$tmp/out"
fi

copy="$tmp/copy"
mkdir -p "$copy"
cp -R "$top/Makefile" "$top/include" "$top/src" "$top/abi" "$copy/"
field='uint64_t table_bytes;'
if grep -q "^ *$field" "$copy/include/onceq.h"; then
  ok "oq_idset_stats has the field the copy removes"
else
  bad "include/onceq.h has no '$field' line to remove: update this test"
fi
sed -i "/^ *$field/d" "$copy/include/onceq.h"
sed -i 's|^#endif /\* ONCEQ_H \*/|#define table_bytes forgotten /* the field is gone */\n&|' \
  "$copy/include/onceq.h"
if make -s -C "$copy" build/libonceq.so >"$tmp/out" 2>&1; then
  ok "a copy with oq_idset_stats.table_bytes removed builds"
else
  bad "the copy with a removed field does not build"; cat "$tmp/out"
fi
make -s -C "$copy" abi-check >"$tmp/out" 2>&1
rc=$?
if [ "$rc" -ne 0 ]; then
  ok "make abi-check fails on the removed field (exit $rc)"
else
  bad "make abi-check passes although a field was removed"; cat "$tmp/out"
fi
if grep -q "data member deletion" "$tmp/out" && grep -q "table_bytes" "$tmp/out"; then
  ok "abidiff names the deleted member"
else
  bad "abidiff's report does not name the deleted member"; cat "$tmp/out"
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
