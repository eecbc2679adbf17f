#!/bin/sh
# Description: installs onceq into a temporary prefix with `make install`,
# then builds examples/ against it the way an outside user would, through
# pkg-config only (no -I or -L into the source tree), and runs them: the
# library example against the shared library and against the static one, and
# the plugin example loaded by the installed binary. Also checks the soname
# and the versioned file names, that only the public API is exported, each
# symbol with its ONCEQ_ version, that the library needs no CLI library
# (SQLite, hiredis, cJSON), that pkg-config --static lists exactly what a
# static link needs, and the man pages (man1, man3 and the .so links).
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
version=$(pkg-config --modversion onceq)
check "versioned library installed (libonceq.so.$version, .so.MAJOR, .so links)" sh -c \
  "test -f '$prefix/lib/libonceq.so.$version' && test ! -L '$prefix/lib/libonceq.so.$version' &&
   test \"\$(readlink '$prefix/lib/libonceq.so.${version%%.*}')\" = libonceq.so.$version &&
   test \"\$(readlink '$prefix/lib/libonceq.so')\" = libonceq.so.${version%%.*}"
check "every exported symbol carries its ONCEQ_ version" sh -c \
  "readelf --dyn-syms --wide '$prefix/lib/libonceq.so' | awk '\$7 != \"UND\" && \$8 ~ /^oq_/' > '$tmp/syms' &&
   test -s '$tmp/syms' && ! grep -v '@@ONCEQ_[0-9]' '$tmp/syms'"
check "libonceq.so needs no SQLite, hiredis or cJSON" sh -c \
  "ldd '$prefix/lib/libonceq.so' > '$tmp/ldd.out' && ! grep -E 'sqlite|hiredis|cjson' '$tmp/ldd.out'"
check "pkg-config --static lists what libonceq.a needs: -lonceq -pthread -lxxhash" sh -c \
  "test \"\$(pkg-config --libs --static onceq | tr ' ' '\\n' | grep . | sort | tr '\\n' ' ')\" = \
        \"-L$prefix/lib -lonceq -lxxhash -pthread \""
check "section-3 pages installed (onceq.3, one per group, .so links)" sh -c \
  "test -s '$prefix/share/man/man3/onceq.3' && test -s '$prefix/share/man/man3/oq_pool_start.3' &&
   grep -qx '.so man3/oq_queue_settle.3' '$prefix/share/man/man3/oq_queue_ack.3'"
check "man finds oq_queue_ack and onceq(3) in the installed tree" sh -c \
  "MANPATH='$prefix/share/man' MANWIDTH=80 man 3 oq_queue_ack 2>&1 | grep -q '^OQ_QUEUE_SETTLE(3)' &&
   MANPATH='$prefix/share/man' MANWIDTH=80 man 3 onceq 2>&1 | grep -q '^ONCEQ(3)'"

cd "$tmp" || exit 1
# shellcheck disable=SC2046
check "example builds with pkg-config (shared)" sh -c \
  "$cc -o ex_shared '$top/examples/library_example.c' \$(pkg-config --cflags --libs onceq)"
check "example runs against the shared library" sh -c \
  "LD_LIBRARY_PATH='$prefix/lib' ./ex_shared > shared.out && grep -q '^once 3\$' shared.out && grep -q '3 processed, 2 duplicates' shared.out"
check "example builds with pkg-config (static)" sh -c \
  "$cc -o ex_static '$top/examples/library_example.c' \$(pkg-config --cflags --static --libs onceq | sed 's/-lonceq/-l:libonceq.a/')"
check "example runs statically linked" sh -c \
  "./ex_static > static.out && cmp shared.out static.out && ! ldd ./ex_static 2>&1 | grep -q libonceq"
check "example links statically with exactly pkg-config --static --libs" sh -c \
  "$cc -static -o ex_allstatic '$top/examples/library_example.c' \$(pkg-config --cflags --static --libs onceq) &&
   ./ex_allstatic > allstatic.out && cmp shared.out allstatic.out"
check "plugin builds with pkg-config --cflags" sh -c \
  "$cc -shared -fPIC -o plugin_upper.so '$top/examples/plugin_upper.c' \$(pkg-config --cflags onceq)"
printf '{"id":"p1","word":"hello"}\n{"id":"p1","word":"hello"}\n' > ev.jsonl
check "installed onceq loads the plugin" sh -c \
  "'$prefix/bin/onceq' run -q --handler plugin:./plugin_upper.so ev.jsonl > plug.out && test \$(wc -l < plug.out) -eq 1 && grep -q HELLO plug.out"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
