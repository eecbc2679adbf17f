# onceq build. Targets: all check test tsan asan stress bench demo deps clean.
# Quiet unless V=1. Variants build into their own directories:
#   build/       -O2 -g (make, make test, make bench)
#   build-tsan/  ThreadSanitizer (make tsan)
#   build-asan/  AddressSanitizer + UndefinedBehaviorSanitizer (make asan)

CC       ?= cc
BUILD    ?= build
SAN      ?=
OPT      ?= -O2
PREFIX   ?= /usr/local

ifeq ($(V),1)
Q :=
else
Q := @
endif

WARN := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes \
        -Wmissing-prototypes -Wpointer-arith -Wformat=2 -Wvla \
        -Wcast-qual -Wundef -Wno-unused-parameter
CPPFLAGS += -Iinclude -Isrc -D_GNU_SOURCE -DOQ_BUILDING -MMD -MP
CFLAGS   += -std=c11 -g $(OPT) -pthread -fPIC -fvisibility=hidden $(WARN)
# -rdynamic: plugins (plugin:PATH.so) link against the binary's oq_* API.
LDFLAGS  += -pthread -rdynamic
LIBS     := -lxxhash -lsqlite3 -lhiredis -lmicrohttpd -lm -ldl

ifeq ($(SAN),thread)
CFLAGS  += -fsanitize=thread -fno-omit-frame-pointer
LDFLAGS += -fsanitize=thread
endif
ifeq ($(SAN),address)
CFLAGS  += -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
LDFLAGS += -fsanitize=address,undefined
endif

# libonceq (installed): the core, which needs only libxxhash and pthreads.
LIB_SRCS := src/alloc.c src/error.c src/clock.c src/heap.c src/queue.c src/idset.c \
            src/json.c \
            src/txn.c src/memsink.c src/engine.c src/membackend.c src/opts.c
# The engine of `onceq run` (reader, handlers, runner, SQLite store, Redis
# backends, and run.c's option parsing and reports, which redis.c and
# runner.c use): the binary's, and the tests' through build/libonceq-cli.a
# (not installed; libonceq.so links neither hiredis nor SQLite).
ENGINE_SRCS := src/source.c src/handlers.c src/runner.c src/store.c \
               src/metrics.c src/replies.c src/reorder.c src/outputs.c src/resume.c src/feed.c \
               src/redis.c src/run.c
CLI_SRCS := src/main.c src/node.c src/gen.c src/state_cli.c src/stream_cli.c
TEST_NAMES := test_clock test_heap test_queue test_idset test_json test_txn test_pool \
              test_source test_handlers test_store test_opts \
              test_ledger test_engine stress_pool
BENCH_NAMES := bench_pool bench_idset_mem bench_run bench_json bench_sqlite
# Tests that drive the real binary (each prints "N passed, N failed").
SCRIPT_TESTS := test/test_node.py test/test_run.py test/test_durable.py \
                test/test_options.py test/test_outputs.py test/test_coproc.py \
                test/test_metrics.py test/test_replies.py \
                test/test_redis.py test/test_reqreply_redis.py \
                test/test_redis_partitions.py
# The install test builds examples/ against an installed copy: normal build
# only (a sanitizer build's library needs the sanitizer's runtime). So do the
# checks of the shared library's symbols, ABI and man pages.
ifeq ($(SAN),)
SCRIPT_TESTS += test/test_install.sh test/test_symbols.sh test/test_abi.sh \
                test/test_man.sh
endif

LIB_OBJS  := $(LIB_SRCS:src/%.c=$(BUILD)/obj/%.o)
ENGINE_OBJS := $(ENGINE_SRCS:src/%.c=$(BUILD)/obj/%.o)
CLI_OBJS  := $(CLI_SRCS:src/%.c=$(BUILD)/obj/%.o)
TEST_BINS := $(TEST_NAMES:%=$(BUILD)/test/%)
BENCH_BINS := $(BENCH_NAMES:%=$(BUILD)/bench/%)

# The version lives in include/onceq.h only.
VMAJOR  := $(shell sed -n 's/^\#define OQ_VERSION_MAJOR \([0-9]*\)/\1/p' include/onceq.h)
VMINOR  := $(shell sed -n 's/^\#define OQ_VERSION_MINOR \([0-9]*\)/\1/p' include/onceq.h)
VPATCH  := $(shell sed -n 's/^\#define OQ_VERSION_PATCH \([0-9]*\)/\1/p' include/onceq.h)
VERSION := $(VMAJOR).$(VMINOR).$(VPATCH)
SONAME  := libonceq.so.$(VMAJOR)
# What libonceq itself links (onceq.pc's Libs.private says the same).
LIB_LIBS := -lxxhash -pthread
# The exported symbols and their versions (docs/ABI.md).
LIB_MAP  := src/libonceq.map
# A sanitizer's runtime is resolved at load time, so --no-undefined (every
# symbol the library uses comes from LIB_LIBS) holds for the normal build.
ifeq ($(SAN),)
LIB_LDFLAGS := -Wl,--no-undefined
endif

.PHONY: all lib tests benches check test tsan asan stress bench demo deps clean \
        run-tests install uninstall abi-check abi-update
all: $(BUILD)/libonceq.a $(BUILD)/libonceq.so $(BUILD)/onceq onceq

lib: $(BUILD)/libonceq.a

# The top-level ./onceq is a copy of the normal build's binary.
onceq: $(BUILD)/onceq
	$(Q)cp $< $@

$(BUILD)/obj/%.o: src/%.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(BUILD)/libonceq.a: $(LIB_OBJS)
	@$(if $(Q),echo "  AR      $@")
	$(Q)rm -f $@ && ar rcs $@ $^

$(BUILD)/libonceq-cli.a: $(ENGINE_OBJS)
	@$(if $(Q),echo "  AR      $@")
	$(Q)rm -f $@ && ar rcs $@ $^

# Only what onceq.h marks OQ_API is exported (-fvisibility=hidden), each
# symbol with its version from the map.
$(BUILD)/libonceq.so: $(LIB_OBJS) $(LIB_MAP)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -shared -Wl,-soname,$(SONAME) -Wl,--version-script=$(LIB_MAP) \
		$(LIB_LDFLAGS) $(LDFLAGS) -o $@ $(LIB_OBJS) $(LIB_LIBS)

$(BUILD)/onceq: $(CLI_OBJS) $(BUILD)/libonceq-cli.a $(BUILD)/libonceq.a
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/test/%.o: test/%.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) -Wno-missing-prototypes -c -o $@ $<

$(BUILD)/test/%: $(BUILD)/test/%.o $(BUILD)/libonceq-cli.a $(BUILD)/libonceq.a
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LIBS) -lcmocka

$(BUILD)/bench/%.o: bench/%.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@")
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) -Wno-missing-prototypes -c -o $@ $<

$(BUILD)/bench/%: $(BUILD)/bench/%.o $(BUILD)/libonceq-cli.a $(BUILD)/libonceq.a
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

# Only the JSON comparison links jansson.
$(BUILD)/bench/bench_json: LIBS += -ljansson -lcjson
# cJSON is only a reference now: the bare loop, and the scanner's fuzz.
$(BUILD)/bench/bench_run: LIBS += -lcjson
$(BUILD)/test/test_json: LIBS += -lcjson

tests: $(TEST_BINS)
benches: $(BENCH_BINS)

# Runs every test binary of $(BUILD) and prints "N passed, N failed".
# OQ_TIME_MULT stretches real-time waits under sanitizers.
run-tests: tests $(BUILD)/onceq $(BUILD)/libonceq.so
	$(Q)BUILD=$(BUILD) ONCEQ=$(BUILD)/onceq sh test/run.sh $(TEST_BINS) \
		$(SCRIPT_TESTS)

test:
	$(Q)$(MAKE) --no-print-directory run-tests

tsan:
	$(Q)$(MAKE) --no-print-directory BUILD=build-tsan SAN=thread OPT=-O1 \
		OQ_STRESS_ARGS="--messages 60000" run-tests

asan:
	$(Q)$(MAKE) --no-print-directory BUILD=build-asan SAN=address OPT=-O1 \
		OQ_STRESS_ARGS="--messages 60000" run-tests

export OQ_STRESS_ARGS

# The full-size stress run (1M messages), normal build and under TSAN.
stress: tests $(BUILD)/onceq
	$(Q)$(BUILD)/test/stress_pool --messages 1000000 $(STRESS_ARGS)
	$(Q)$(MAKE) --no-print-directory BUILD=build-tsan SAN=thread OPT=-O1 tests
	$(Q)build-tsan/test/stress_pool --messages 1000000 $(STRESS_ARGS)
	$(Q)OQ_CRASH_ITERS=$${OQ_CRASH_ITERS:-500} ONCEQ=$(BUILD)/onceq BUILD=$(BUILD) python3 test/test_durable.py

bench: benches
	$(Q)mkdir -p bench/results
	$(Q)$(BUILD)/bench/bench_pool --csv bench/results/pool.csv
	$(Q)$(BUILD)/bench/bench_idset_mem --ids 10000000 --csv bench/results/idset_mem.csv
	$(Q)$(BUILD)/bench/bench_json
	$(Q)$(BUILD)/bench/bench_run --onceq $(BUILD)/onceq --csv bench/results/run.csv
	$(Q)ONCEQ=$(BUILD)/onceq BENCH_RUN=$(BUILD)/bench/bench_run sh bench/bench_scale.sh 1000000 3 1,2
	$(Q)sh bench/bench_node.sh
	$(Q)ONCEQ=$(BUILD)/onceq sh bench/bench_durable.sh
	$(Q)ONCEQ=$(BUILD)/onceq sh bench/bench_exec.sh
	$(Q)sh bench/bench_peers.sh
	$(Q)ONCEQ=$(BUILD)/onceq sh bench/bench_redis.sh
	$(Q)ONCEQ=$(BUILD)/onceq sh bench/bench_reqreply.sh
	$(Q)ONCEQ=$(BUILD)/onceq sh bench/bench_redis_cluster.sh

check: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(MAKE) --no-print-directory abi-check
	$(Q)$(MAKE) --no-print-directory test
	$(Q)$(MAKE) --no-print-directory tsan
	$(Q)$(MAKE) --no-print-directory asan

DEB_PACKAGES := build-essential clang pkg-config python3 uthash-dev \
                libcmocka-dev libcjson-dev libxxhash-dev libjansson-dev \
                libsqlite3-dev sqlite3 libhiredis-dev redis-server \
                gnuplot-nox parallel beanstalkd time libjsmn-dev \
                abigail-tools groff-base man-db libmicrohttpd-dev \
                python3-prometheus-client

deps:
	$(Q)missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' \
	    || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "deps: installing$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	else echo "deps: all installed"; fi

demo: deps
	$(Q)$(MAKE) --no-print-directory all
	@echo '$$ ./onceq run -w 2 examples/events.jsonl'
	$(Q)./onceq run -w 2 examples/events.jsonl
	@echo
	@echo '$$ ./onceq run --handler count:source examples/events.jsonl'
	$(Q)./onceq run --handler count:source examples/events.jsonl

# The public ABI (types reachable from include/onceq.h and the exported
# symbols with their versions), as libabigail's abidw writes it. abi-check
# compares the library with it and fails on any change but added symbols
# (abidiff reports a removed or changed struct field as a change, exit 4,
# not only as an "incompatible" one, exit 8, so any non-zero status fails).
# After a deliberate change: make abi-update, commit abi/, and say it in the
# changelog (docs/ABI.md).
ABI_BASELINE := abi/libonceq.abi
ABIDW_FLAGS  := --headers-dir include --drop-private-types --no-corpus-path \
                --no-comp-dir-path --short-locs --type-id-style hash
ABIDIFF_FLAGS := --headers-dir2 include --drop-private-types

abi-check: $(BUILD)/libonceq.so
	$(Q)abidiff --no-added-syms $(ABIDIFF_FLAGS) $(ABI_BASELINE) $< \
	    >$(BUILD)/abi-diff.txt \
	  || { rc=$$?; cat $(BUILD)/abi-diff.txt; \
	       echo "abi-check: $< differs from $(ABI_BASELINE) (abidiff exit $$rc)." \
	       "If that is deliberate: make abi-update (docs/ABI.md)." >&2; exit 1; }
	$(Q)abidiff $(ABIDIFF_FLAGS) $(ABI_BASELINE) $< >$(BUILD)/abi-added.txt \
	  && echo "abi-check: $< matches $(ABI_BASELINE)" \
	  || { cat $(BUILD)/abi-added.txt; \
	       echo "abi-check: compatible (symbols added); record them with make abi-update"; }

abi-update: $(BUILD)/libonceq.so
	$(Q)mkdir -p $(dir $(ABI_BASELINE))
	$(Q)abidw $(ABIDW_FLAGS) --out-file $(ABI_BASELINE) $<
	$(Q)echo "abi-update: wrote $(ABI_BASELINE) from $<"

# Section-3 pages: one per function or group; every other name in a page's
# NAME section gets a one-line ".so man3/PAGE.3" page, so `man NAME` works.
MAN3_PAGES := $(wildcard docs/man3/*.3)
MAN3DIR    := $(DESTDIR)$(PREFIX)/share/man/man3

# make install PREFIX=/usr/local [DESTDIR=...]
install: $(BUILD)/libonceq.a $(BUILD)/libonceq.so $(BUILD)/onceq
	$(Q)install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/pkgconfig \
		$(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/share/man/man1 \
		$(MAN3DIR)
	$(Q)for page in $(MAN3_PAGES); do \
	  base=$$(basename $$page); install -m 644 $$page $(MAN3DIR)/$$base; \
	  for name in $$(sed -n '/^\.SH NAME/,/^\.SH/p' $$page | sed '1d;$$d' \
	                 | tr '\n' ' ' | sed 's/\\-.*//' | tr ',' ' '); do \
	    [ "$$name.3" = "$$base" ] || \
	      echo ".so man3/$$base" > $(MAN3DIR)/$$name.3; \
	  done; \
	done
	$(Q)install -m 755 $(BUILD)/onceq $(DESTDIR)$(PREFIX)/bin/onceq
	$(Q)install -m 644 $(BUILD)/libonceq.a $(DESTDIR)$(PREFIX)/lib/libonceq.a
	$(Q)install -m 755 $(BUILD)/libonceq.so \
		$(DESTDIR)$(PREFIX)/lib/libonceq.so.$(VERSION)
	$(Q)ln -sf libonceq.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/$(SONAME)
	$(Q)ln -sf $(SONAME) $(DESTDIR)$(PREFIX)/lib/libonceq.so
	$(Q)install -m 644 include/onceq.h $(DESTDIR)$(PREFIX)/include/onceq.h
	$(Q)install -m 644 docs/onceq.1 $(DESTDIR)$(PREFIX)/share/man/man1/onceq.1
	$(Q)sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' onceq.pc.in \
		> $(DESTDIR)$(PREFIX)/lib/pkgconfig/onceq.pc

uninstall:
	$(Q)rm -f $(DESTDIR)$(PREFIX)/bin/onceq $(DESTDIR)$(PREFIX)/lib/libonceq.a \
		$(DESTDIR)$(PREFIX)/lib/libonceq.so* $(DESTDIR)$(PREFIX)/include/onceq.h \
		$(DESTDIR)$(PREFIX)/share/man/man1/onceq.1 \
		$(DESTDIR)$(PREFIX)/lib/pkgconfig/onceq.pc
	$(Q)for page in $(MAN3_PAGES); do \
	  for name in $$(sed -n '/^\.SH NAME/,/^\.SH/p' $$page | sed '1d;$$d' \
	                 | tr '\n' ' ' | sed 's/\\-.*//' | tr ',' ' '); do \
	    rm -f $(MAN3DIR)/$$name.3; \
	  done; \
	done

clean:
	$(Q)rm -rf build build-tsan build-asan build-clang onceq

-include $(wildcard $(BUILD)/obj/*.d $(BUILD)/test/*.d $(BUILD)/bench/*.d)
.SECONDARY:
