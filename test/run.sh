#!/bin/sh
# Runs test programs and prints one closing line: "N passed, N failed".
# A cmocka binary reports "[  PASSED  ] N test(s)." and "[  FAILED  ] N
# test(s)"; a script test prints its own "N passed, N failed" line. A test
# program that crashes or exits non-zero without such a line counts as one
# failure. Each program gets OQ_TEST_TIMEOUT seconds (default 600).
# Usage: run.sh PROGRAM...   (BUILD names the build directory in use)
set -u
pass=0
fail=0
failed_progs=""
timeout_s=${OQ_TEST_TIMEOUT:-600}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for prog in "$@"; do
  name=$(basename "$prog")
  printf '== %s\n' "$name"
  case "$prog" in
    *.py) set -- python3 "$prog" ;;
    *.sh) set -- sh "$prog" ;;
    *stress_*) set -- "$prog" ${OQ_STRESS_ARGS:-} ;;
    *) set -- "$prog" ;;
  esac
  timeout "$timeout_s" "$@" >"$out" 2>&1
  rc=$?
  cat "$out"
  p=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$out" | tail -n 1)
  f=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test.*/\1/p' "$out" | tail -n 1)
  if [ -z "$p$f" ]; then
    line=$(grep -E '^([A-Za-z]+: )?[0-9]+ passed, [0-9]+ failed' "$out" | tail -n 1)
    p=$(printf '%s' "$line" | sed -n 's/.*\b\([0-9][0-9]*\) passed.*/\1/p')
    f=$(printf '%s' "$line" | sed -n 's/.* \([0-9][0-9]*\) failed.*/\1/p')
  fi
  p=${p:-0}
  f=${f:-0}
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
    [ "$rc" -eq 124 ] && echo "$name: timed out after ${timeout_s}s"
    echo "$name: exited with status $rc"
    f=1
  fi
  pass=$((pass + p))
  fail=$((fail + f))
  [ "$f" -gt 0 ] && failed_progs="$failed_progs $name"
done
echo
[ -n "$failed_progs" ] && echo "failing:$failed_progs"
echo "${BUILD:-build}: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
