#!/bin/sh
# Description: installs onceq into a temporary prefix with `make install`,
# then builds examples/ against it the way an outside user would, through
# pkg-config only (no -I or -L into the source tree), and runs them: the
# library example against the shared library and against the static one, and
# the plugin example loaded by the installed binary. Also checks the soname,
# that only the public API is exported, and the man page.
# Prints "N passed, N failed".
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "[ OK ] $1"; }
bad() { fail=$((fail + 1)); echo "[FAIL] $1"; }
check() { name=$1; shift; if "$@" >"$tmp/out" 2>&1; then ok "$name"; else bad "$name"; cat "$tmp/out"; fi; }

prefix="$tmp/prefix"
check "make install" make -s -C "$top" install PREFIX="$prefix" BUILD="${BUILD:-build}"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
cc=${CC:-cc}

check "pkg-config knows onceq" pkg-config --exists onceq
check "pkg-config version matches onceq --version" sh -c \
  "test \"onceq \$(pkg-config --modversion onceq)\" = \"\$('$prefix/bin/onceq' --version)\""
check "soname is libonceq.so.MAJOR" sh -c \
  "objdump -p '$prefix/lib/libonceq.so' | grep -q 'SONAME *libonceq\\.so\\.[0-9]*\$'"
check "only oq_ symbols are exported" sh -c \
  "! nm -D --defined-only '$prefix/lib/libonceq.so' | awk '\$2 ~ /[TDBR]/ {print \$3}' | grep -v '^oq_[a-z]' | grep -v '^_' | grep ."
check "no internal oq__ symbol is exported" sh -c \
  "! nm -D --defined-only '$prefix/lib/libonceq.so' | grep -q ' oq__'"
check "man page installed" test -s "$prefix/share/man/man1/onceq.1"

cd "$tmp" || exit 1
# shellcheck disable=SC2046
check "example builds with pkg-config (shared)" sh -c \
  "$cc -o ex_shared '$top/examples/library_example.c' \$(pkg-config --cflags --libs onceq)"
check "example runs against the shared library" sh -c \
  "LD_LIBRARY_PATH='$prefix/lib' ./ex_shared > shared.out && grep -q '^once 3\$' shared.out && grep -q '3 processed, 2 duplicates' shared.out"
check "example builds with pkg-config (static)" sh -c \
  "$cc -o ex_static '$top/examples/library_example.c' \$(pkg-config --cflags --static --libs onceq | sed 's/-lonceq/-l:libonceq.a/')"
check "example runs statically linked" sh -c \
  "./ex_static > static.out && cmp shared.out static.out"
check "plugin builds with pkg-config --cflags" sh -c \
  "$cc -shared -fPIC -o plugin_upper.so '$top/examples/plugin_upper.c' \$(pkg-config --cflags onceq)"
printf '{"id":"p1","word":"hello"}\n{"id":"p1","word":"hello"}\n' > ev.jsonl
check "installed onceq loads the plugin" sh -c \
  "'$prefix/bin/onceq' run -q --handler plugin:./plugin_upper.so ev.jsonl > plug.out && test \$(wc -l < plug.out) -eq 1 && grep -q HELLO plug.out"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
