#!/bin/sh
# Description: the section-3 man pages in docs/man3 cover the library:
# every function include/onceq.h marks OQ_API, and every *_defaults macro,
# is named in some page's NAME section (make install makes a .so link for
# each name that is not the page's own); each page has SYNOPSIS,
# DESCRIPTION, RETURN VALUE, THREAD SAFETY, EXAMPLE and SEE ALSO; renders
# with `groff -ww -z -man` and `man -l` without a warning; its EXAMPLE is a
# whole program that compiles warning-free against the header and the
# static library and exits 0; and its SEE ALSO names only pages that
# exist. Prints "N passed, N failed".
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD:-build}
man3="$top/docs/man3"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "[ OK ] $1"; }
bad() { fail=$((fail + 1)); echo "[FAIL] $1"; }
cc=${CC:-cc}

# The names a page documents: its NAME line(s), before "\-".
names_of() {
  sed -n '/^\.SH NAME/,/^\.SH/p' "$1" | sed '1d;$d' | tr '\n' ' ' |
    sed 's/\\-.*//' | tr ', ' '\n\n' | grep .
}

: > "$tmp/names"
for page in "$man3"/*.3; do
  names_of "$page" >> "$tmp/names"
done
sort -u "$tmp/names" > "$tmp/names.sorted"
{ sed -n 's/^OQ_API[^(]*[ *]\([a-z_0-9]*\)(.*/\1/p' "$top/include/onceq.h"
  sed -n 's/^#define \(oq_[a-z_]*_defaults\)(.*/\1/p' "$top/include/onceq.h"
} | sort -u > "$tmp/api"
missing=$(comm -23 "$tmp/api" "$tmp/names.sorted")
if [ -z "$missing" ]; then
  ok "every OQ_API function and *_defaults macro ($(wc -l < "$tmp/api")) has a man page"
else
  bad "no man page names:"; echo "$missing"
fi
dups=$(sort "$tmp/names" | uniq -d)
if [ -z "$dups" ]; then ok "each name is documented on one page"
else bad "names on more than one page:"; echo "$dups"; fi

for page in "$man3"/*.3; do
  p=$(basename "$page")
  own=${p%.3}
  if names_of "$page" | grep -qx "$own"; then :; else
    bad "$p: its NAME section does not name $own"; fi
  for sec in "NAME" "SYNOPSIS" "DESCRIPTION" "RETURN VALUE" "THREAD SAFETY" \
             "EXAMPLE" "SEE ALSO"; do
    grep -q "^\.SH \"\{0,1\}$sec\"\{0,1\}\$" "$page" || bad "$p: no $sec section"
  done
  if groff -ww -z -man "$page" > "$tmp/groff" 2>&1 && [ ! -s "$tmp/groff" ]; then
    ok "$p: groff -ww renders it without a warning"
  else
    bad "$p: groff -ww warns"; cat "$tmp/groff"
  fi
  if MANWIDTH=80 man -l "$page" > "$tmp/man.out" 2> "$tmp/man.err" &&
     [ -s "$tmp/man.out" ] && [ ! -s "$tmp/man.err" ]; then
    ok "$p: man -l renders it"
  else
    bad "$p: man -l fails or warns"; cat "$tmp/man.err"
  fi
  # SEE ALSO: every onceq page it names exists (as a page or a name).
  sed -n '/^\.SH "\{0,1\}SEE ALSO/,$p' "$page" |
    sed -n 's/^\.BR \(o[nq][a-z_]*\) (3).*/\1/p' | while read -r ref; do
      grep -qx "$ref" "$tmp/names.sorted" || echo "$ref"
    done > "$tmp/refs"
  if [ -s "$tmp/refs" ]; then bad "$p: SEE ALSO names missing pages: $(cat "$tmp/refs")"; fi
  # EXAMPLE: a whole program; compile it against the tree and run it.
  sed -n '/^\.SH EXAMPLE/,/^\.SH/p' "$page" | sed -n '/^\.EX/,/^\.EE/p' |
    sed '1d;$d' | sed -e 's/\\e/\\/g' -e 's/\\-/-/g' -e "s/\\\\(aq/'/g" \
    > "$tmp/$own.c"
  if ! grep -q 'int main' "$tmp/$own.c"; then
    bad "$p: EXAMPLE is not a whole program"
  elif $cc -std=c11 -Wall -Wextra -Werror -I"$top/include" -o "$tmp/$own" \
        "$tmp/$own.c" "$top/$build/libonceq.a" -lxxhash -pthread \
        > "$tmp/cc" 2>&1; then
    if timeout 60 "$tmp/$own" > "$tmp/run" 2>&1; then
      ok "$p: EXAMPLE compiles warning-free and exits 0"
    else
      bad "$p: EXAMPLE fails when run"; cat "$tmp/run"
    fi
  else
    bad "$p: EXAMPLE does not compile"; cat "$tmp/cc"
  fi
done

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
