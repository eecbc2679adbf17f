#!/usr/bin/env python3
"""Description: option parsing of the real binary: every duration, count and
size option of `onceq run` (one option table for every mode: the same value
gets the same refusal with and without --redis, and an option of one mode
is refused in the other), `onceq send` and `onceq gen`
takes only the strict forms (decimal digits, an optional .fraction for
durations and gen's fractions, the documented units) and refuses anything
else -- nan, inf, hex, exponents, signs, whitespace, unit garbage, overflow --
with one line naming the option and the value, and exit status 2, before
anything else happens (no input is read, no Redis connection is made).
Also: `--kill-grace 0` means SIGKILL at once, and the largest durations
(100 years) are accepted and do not overflow. Prints "N passed, N failed".

Environment: ONCEQ (the binary; default ./onceq), BUILD (a sanitizer build
gets more time)."""
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Suite  # noqa: E402

ONCEQ = os.path.abspath(os.environ.get("ONCEQ", "./onceq"))
BUILD = os.environ.get("BUILD", "build")
SLOW = "tsan" in BUILD or "asan" in BUILD
TMP = tempfile.mkdtemp(prefix="onceq-options-test-")
# Nothing listens there: a valid command line gets as far as connecting.
BOGUS_URL = "redis://127.0.0.1:1"
print(f"test_options: binary {ONCEQ}")

# The documented maximum duration: 100 years of 365 days.
MAX_MS = 100 * 365 * 24 * 3600 * 1000
MAX_H = MAX_MS // 3600000  # 876000h

# Refused by every number option (durations, counts, sizes).
BAD_COMMON = ["nan", "NaN", "inf", "-inf", "infinity", "0x10", "0X10", "1e3",
              "1E3", " 5", "5 ", "\t5", "-1", "-0", "+5", "",
              "99999999999999999999", "5x", "5 s", "0b1", "1_000", "五"]
# Also refused by durations.
BAD_DURATION = BAD_COMMON + ["1e3ms", "0x10s", "nans", "infs", "1.", ".5",
                             "1..5s", "1.5.2s", "5S", "5sec", "5hs", "s",
                             "ms", "5 ms", "5ms ", "1s2", f"{MAX_H + 1}h",
                             f"{MAX_MS + 1}ms",
                             "99999999999999999999ms", "9" * 400]
# Also refused by counts (and by sizes, but for the suffix ones).
BAD_COUNT = BAD_COMMON + ["1.5", "5k", "1M", "5s", "18446744073709551616",
                          "9" * 400]
GOOD_DURATION = ["250ms", "2s", "1.5s", "3m", "1h", "5", "0.25s", "1.5m",
                 "007s", f"{MAX_H}h", f"{MAX_MS}ms"]

suite = Suite()
test = suite.test
tests = suite.tests


def path(name):
    return os.path.join(TMP, name)


def run(args, stdin=b"", timeout=120):
    """Runs onceq; returns (exit status, stdout, stderr, seconds)."""
    t0 = time.time()
    p = subprocess.run([ONCEQ] + args, input=stdin, capture_output=True,
                       timeout=timeout, cwd=TMP)
    return p.returncode, p.stdout.decode("utf-8", "replace"), \
        p.stderr.decode("utf-8", "replace"), time.time() - t0


def expect_refused(args, opt, val, stdin=b""):
    """args fail with status 2 and one line naming opt and val."""
    rc, out, err, _ = run(args, stdin)
    what = f"{args!r}"
    assert rc == 2, f"{what}: status {rc}, want 2; stderr {err!r}"
    assert err.count("\n") == 1 and err.endswith("\n"), \
        f"{what}: want one line, got {err!r}"
    assert opt in err, f"{what}: {opt} not named in {err!r}"
    assert f"'{val}'" in err, f"{what}: value {val!r} not quoted in {err!r}"
    assert "connect" not in err, f"{what}: connected first: {err!r}"
    assert out == "", f"{what}: wrote {out!r}"


def expect_accepted(args, stdin=b""):
    rc, out, err, _ = run(args, stdin)
    assert rc == 0, f"{args!r}: status {rc}, want 0; stderr {err!r}"
    return out


def expect_connect_error(args):
    """A valid command line with BOGUS_URL: past parsing, refused by the
    connection (status 2, but about Redis, not about an option)."""
    rc, out, err, _ = run(args)
    assert rc == 2 and "cannot connect" in err, \
        f"{args!r}: status {rc}, stderr {err!r}"


def many(fn, cases):
    """Runs fn on every case; reports all the failures at once."""
    fails = []
    for c in cases:
        try:
            fn(c)
        except AssertionError as e:
            fails.append(str(e))
    assert not fails, f"{len(fails)} of {len(cases)} cases failed:\n  " + \
        "\n  ".join(fails)


# ---------------------------------------------------------------- onceq run

RUN = ["run", "-q", "--handler", "noop"]
RUN_DURATIONS = ["--visibility-timeout", "--ttl", "--kill-grace"]
# option, smallest, largest
RUN_COUNTS = [("--workers", 1, 4096), ("--batch", 1, 1024),
              ("--max-attempts", 1, 1000000), ("--dedup-window", 0, 1 << 32),
              ("--seed", 0, (1 << 64) - 1), ("--commit-batch", 1, 1000000)]


@test
def run_durations_refuse_garbage():
    many(lambda c: expect_refused(RUN + [c[0], c[1]], c[0], c[1]),
         [(o, v) for o in RUN_DURATIONS + ["--commit-interval"]
          for v in BAD_DURATION])


@test
def run_durations_refuse_garbage_after_equals():
    many(lambda c: expect_refused(RUN + [f"{c[0]}={c[1]}"], c[0], c[1]),
         [(o, v) for o in RUN_DURATIONS for v in ["nan", "0x10", "1e3", ""]])


_state_dbs = iter(range(1 << 30))


def state_for(opt):
    """--state with a fresh file for an option of durable runs, else []."""
    if opt in ("--commit-batch", "--commit-interval", "--sync", "--force"):
        return ["--state", path(f"opt{next(_state_dbs)}.db")]
    return []


@test
def run_durations_accept_the_documented_forms():
    many(lambda c: expect_accepted(RUN + [c[0], c[1]]),
         [(o, v) for o in RUN_DURATIONS for v in GOOD_DURATION])
    expect_accepted(RUN + ["--kill-grace", "0"])
    expect_accepted(RUN + state_for("--commit-interval") +
                    ["--commit-interval", "1.5s"])


@test
def run_durations_keep_their_ranges():
    expect_refused(RUN + ["--visibility-timeout", "0"],
                   "--visibility-timeout", "0")
    expect_refused(RUN + ["--visibility-timeout", "0.4ms"],
                   "--visibility-timeout", "0.4ms")
    expect_refused(RUN + ["--ttl", "0s"], "--ttl", "0s")
    expect_refused(RUN + ["--commit-interval", "61s"], "--commit-interval",
                   "61s")


@test
def run_backoff_refuses_garbage():
    cases = [v for v in BAD_DURATION if "," not in v]
    cases += [f"100ms,{v}" for v in BAD_DURATION if "," not in v]
    cases += ["1s,100ms", "100ms,", ",1s", ",", "1s,2s,3s", "1s;2s",
              "1s, 2s", "1s ,2s", "nan,nan", f"{MAX_H + 1}h",
              f"1s,{MAX_H + 1}h"]
    many(lambda v: expect_refused(RUN + ["--backoff", v], "--backoff", v),
         cases)


@test
def run_backoff_accepts_the_documented_forms():
    many(lambda v: expect_accepted(RUN + ["--backoff", v]),
         ["100ms,30s", "1s", "0", "0,0", "1.5s,3m", "250ms,1h", "5,10",
          f"{MAX_H}h,{MAX_H}h", f"1s,{MAX_H}h"])


@test
def run_counts_refuse_garbage():
    many(lambda c: expect_refused(RUN + [c[0], c[1]], c[0], c[1]),
         [(o, v) for o, _, _ in RUN_COUNTS for v in BAD_COUNT])
    many(lambda v: expect_refused(RUN + ["-w", v], "--workers", v),
         ["nan", "0x10", " 5", "+5"])


@test
def run_counts_keep_their_ranges():
    cases = []
    for o, lo, hi in RUN_COUNTS:
        if lo > 0:
            cases.append((o, str(lo - 1)))
        if hi < (1 << 64) - 1:
            cases.append((o, str(hi + 1)))
    many(lambda c: expect_refused(RUN + [c[0], c[1]], c[0], c[1]), cases)
    many(lambda c: expect_accepted(RUN + state_for(c[0]) + [c[0], c[1]]),
         [(o, str(v)) for o, lo, hi in RUN_COUNTS for v in (lo, hi)
          if o != "--workers" or v < 64] + [("--batch", "007")])


@test
def run_workers_value_is_used():
    out = expect_accepted(RUN + ["-w", "3", "--stats", "-"])
    assert '"workers":3' in out, out


@test
def run_max_line_sizes():
    bad = [v for v in BAD_COMMON if v != "99999999999999999999"]
    bad += ["1 M", "1M ", "1.5M", "0x10K", "1e3K", "-1K", "+1K", "1Mx", "M",
            "K", "1MiBx", "1iB", "1B", "15", "3G", "2049M",
            "99999999999999999999K", "18014398509481984K"]
    many(lambda v: expect_refused(RUN + ["--max-line", v], "--max-line", v),
         bad)
    many(lambda v: expect_accepted(RUN + ["--max-line", v]),
         ["16", "1M", "64K", "64k", "64KiB", "1MB", "1048576", "2G", "2048M"])


@test
def run_bad_value_comes_before_reading_input():
    missing = path("does-not-exist.jsonl")
    expect_refused(["run", "--kill-grace", "nan", missing], "--kill-grace",
                   "nan")
    expect_refused(["run", missing, "--batch", "0x10"], "--batch", "0x10")


@test
def run_timeout_is_used():
    # --timeout 250ms: the command is still running at the timeout and is
    # killed; with one attempt it is dead-lettered long before the sleep
    # would end (heartbeats keep the 250ms lease alive until then).
    rc, out, err, el = run(["run", "-q", "--handler", "exec:sleep 5",
                            "--visibility-timeout", "250ms", "--timeout",
                            "250ms",
                            "--max-attempts", "1", "--kill-grace", "0.1s",
                            "--dlq", path("vt-dlq.jsonl")],
                           stdin=b'{"id":"a"}\n')
    assert rc == 1, (rc, err)
    assert el < 4, el


@test
def run_largest_durations_do_not_overflow():
    # now + 100 years, in every place a deadline is computed.
    out = expect_accepted(
        ["run", "-q", "--visibility-timeout", f"{MAX_H}h", "--ttl",
         f"{MAX_MS}ms", "--backoff", f"{MAX_H}h,{MAX_H}h", "--kill-grace",
         f"{MAX_H}h", "-w", "2"],
        stdin=b'{"id":"a","word":"x"}\n{"id":"b","word":"x"}\n')
    assert out == '{"word":"x","count":2}\n', out


TRAP = "exec:trap '' TERM; sleep 6"


@test
def run_kill_grace_zero_kills_at_once():
    # The command ignores SIGTERM: only SIGKILL ends it. With a grace of 0
    # that comes at the visibility timeout (0.3 s); the old default of 2 s
    # would make the run last at least 2.3 s.
    rc, out, err, el = run(["run", "-q", "--handler", TRAP,
                            "--visibility-timeout", "300ms", "--timeout",
                            "300ms",
                            "--max-attempts", "1", "--kill-grace", "0",
                            "--dlq", path("kg0-dlq.jsonl")],
                           stdin=b'{"id":"a"}\n')
    assert rc == 1, (rc, err)
    assert el < (2.0 if SLOW else 1.5), f"took {el:.2f}s"


@test
def run_kill_grace_is_honoured():
    rc, out, err, el = run(["run", "-q", "--handler", TRAP,
                            "--visibility-timeout", "300ms", "--timeout",
                            "300ms",
                            "--max-attempts", "1", "--kill-grace", "1.5s",
                            "--dlq", path("kg-dlq.jsonl")],
                           stdin=b'{"id":"a"}\n')
    assert rc == 1, (rc, err)
    assert 1.7 <= el < 5.5, f"took {el:.2f}s"


# -------------------------------------------------------- onceq run --redis

RRUN = ["run", "--redis", BOGUS_URL, "--stream", "s", "--group", "g", "-q"]
# The same limits as without --redis (one option table).
RRUN_COUNTS = [("--workers", 1, 4096), ("--batch", 1, 1024),
               ("--max-attempts", 1, 1000000), ("--seed", 0, (1 << 64) - 1)]


@test
def redis_run_durations_refuse_garbage_before_connecting():
    many(lambda c: expect_refused(RRUN + [c[0], c[1]], c[0], c[1]),
         [(o, v) for o in ["--visibility-timeout", "--kill-grace"]
          for v in BAD_DURATION])
    many(lambda v: expect_refused(RRUN + ["--backoff", v], "--backoff", v),
         ["nan", "0x10", "1e3", " 5", "100ms,nan", "100ms,1e3", "1s,100ms",
          f"{MAX_H + 1}h", "", "100ms,"])


@test
def redis_run_counts_refuse_garbage_before_connecting():
    many(lambda c: expect_refused(RRUN + [c[0], c[1]], c[0], c[1]),
         [(o, v) for o, _, _ in RRUN_COUNTS for v in BAD_COUNT] +
         [(o, str(lo - 1)) for o, lo, _ in RRUN_COUNTS if lo > 0] +
         [(o, str(hi + 1)) for o, _, hi in RRUN_COUNTS if hi < (1 << 64) - 1])


@test
def redis_run_refuses_before_checking_required_options():
    # The bad value is reported even when --group is missing.
    expect_refused(["run", "--redis", BOGUS_URL, "--kill-grace", "nan"],
                   "--kill-grace", "nan")


@test
def redis_run_valid_values_get_to_connecting():
    many(lambda c: expect_connect_error(RRUN + c),
         [["--visibility-timeout", v] for v in GOOD_DURATION] +
         [["--kill-grace", v] for v in GOOD_DURATION + ["0"]] +
         [["--backoff", v] for v in ["100ms,30s", "1s", "0", "1.5s,3m",
                                     f"1s,{MAX_H}h"]] +
         [["-w", "2"], ["--batch", "1024"], ["--max-attempts", "1000000"],
          ["--seed", str((1 << 64) - 1)], ["--seed", "0"]])


@test
def redis_run_visibility_timeout_minimum():
    expect_refused(RRUN + ["--visibility-timeout", "9ms"],
                   "--visibility-timeout", "9ms")
    expect_connect_error(RRUN + ["--visibility-timeout", "10ms"])


# ------------------------------------------- one option table, every mode

def refusal(args):
    """args are refused: (status 2, one line); returns the line."""
    rc, out, err, _ = run(args)
    assert rc == 2, f"{args!r}: status {rc}, want 2; stderr {err!r}"
    assert err.count("\n") == 1 and err.endswith("\n"), \
        f"{args!r}: want one line, got {err!r}"
    assert "connect" not in err, f"{args!r}: connected first: {err!r}"
    assert out == "", f"{args!r}: wrote {out!r}"
    return err


@test
def same_bad_value_same_message_in_every_mode():
    # The same refusal, word for word, with and without --redis.
    cases = [["--workers", "0"], ["--workers", "5000"], ["-w", "nan"],
             ["--batch", "0"], ["--batch", "1025"], ["--batch", "0x10"],
             ["--visibility-timeout", "9ms"], ["--visibility-timeout", "nan"],
             ["--max-attempts", "0"], ["--backoff", "5s,1s"],
             ["--kill-grace", "1e3"], ["--seed", "-1"], ["--id-field", ""]]

    def one(c):
        a = refusal(RUN + c)
        b = refusal(RRUN + c)
        assert a == b, f"{c!r}: without --redis {a!r}, with {b!r}"
    many(one, cases)


@test
def workers_2000_same_in_every_mode():
    # Accepted in both (it was refused with --redis: 1 to 1024).
    expect_accepted(RUN + ["--workers", "2000"], stdin=b'{"id":"a"}\n')
    expect_connect_error(RRUN + ["--workers", "2000"])
    expect_connect_error(RRUN + ["--batch", "1024", "-w", "4096"])


@test
def local_options_are_refused_with_redis():
    for opt in (["--state", "x.db"], ["--sync", "off"],
                ["--commit-batch", "5"], ["--commit-interval", "5ms"],
                ["--force"], ["--ttl", "5s"], ["--dedup-window", "5"],
                ["--max-line", "1M"], ["--emit"], ["--dlq", "d.jsonl"]):
        err = refusal(RRUN + opt)
        assert opt[0] in err and "--redis" in err, (opt, err)
    err = refusal(["run", "--state", "x.db", "--redis", BOGUS_URL,
                   "--stream", "s", "--group", "g"])
    assert "--state cannot be used with --redis" in err, err
    assert not os.path.exists(path("x.db"))


@test
def timeout_and_metrics_options_work_with_redis():
    # They were refused with --redis (no heartbeats or metrics there yet):
    # now accepted, with the same limits as without --redis.
    for opt in (["--timeout", "5s"], ["--metrics", "m.prom"],
                ["--metrics", "m.prom", "--metrics-interval", "1s"],
                ["--metrics-listen", "127.0.0.1:0"]):
        expect_connect_error(RRUN + opt)
    # --metrics-interval alone would be ignored: refused, in every mode.
    for base in (RUN, RRUN):
        err = refusal(base + ["--metrics-interval", "1s"])
        assert "give --metrics" in err, err
    for opt in (["--timeout", "nan"], ["--metrics", ""],
                ["--metrics-interval", "5x"]):
        expect_refused(RRUN + opt, opt[0], opt[1])
    assert not os.path.exists(path("m.prom"))


@test
def state_options_are_refused_without_state():
    # A --sync full without --state would let a user believe the run is
    # durable: refused, not ignored; accepted with --state.
    for opt in (["--sync", "full"], ["--commit-batch", "5"],
                ["--commit-interval", "5ms"], ["--force"]):
        err = refusal(RUN + opt + [path("missing.jsonl")])
        assert opt[0] in err and "needs --state" in err, (opt, err)
        expect_accepted(RUN + ["--state", path("s.db")] + opt,
                        stdin=b'{"id":"a"}\n')
        for f in glob.glob(path("s.db*")):
            os.unlink(f)


@test
def redis_options_are_refused_without_redis():
    for opt in (["--stream", "s"], ["--group", "g"], ["--consumer", "c"],
                ["--drain"]):
        err = refusal(RUN + opt)
        assert opt[0] in err and "needs --redis" in err, (opt, err)
    # Before reading any input.
    err = refusal(["run", "--stream", "s", path("missing.jsonl")])
    assert "--stream needs --redis" in err, err


@test
def redis_needs_stream_and_group_and_no_files():
    for args in (["run", "--redis", BOGUS_URL],
                 ["run", "--redis", BOGUS_URL, "--stream", "s"],
                 ["run", "--redis", BOGUS_URL, "--group", "g"]):
        assert "are all required" in refusal(args), args
    assert "not from files" in refusal(RRUN + ["events.jsonl"])
    assert "--group" in refusal(RRUN + ["--group", ""])


@test
def redis_unwritable_output_refused_before_connecting():
    for opt in (["-o", path("no/such/dir/out.jsonl")],
                ["--stats", path("no/such/dir/stats.json")]):
        err = refusal(RRUN + opt)
        assert "cannot write" in err, (opt, err)


@test
def help_documents_every_mode_once():
    rc, out, err, _ = run(["run", "--help"])
    assert rc == 0 and err == "", (rc, err)
    lines = out.splitlines()
    for opt in ("--redis URL", "--stream NAME", "--group G",
                "--consumer NAME", "--drain", "--state PATH", "--batch N",
                "--workers N", "--progress, --no-progress"):
        rows = [ln for ln in lines if ln.lstrip().startswith(opt) or
                ln.lstrip().startswith("-w, " + opt)]
        assert len(rows) == 1, f"{opt}: {len(rows)} option rows"
    assert sum(1 for ln in lines if ln.startswith("Redis")) == 1, out
    assert "128 with --redis" in out, out
    # --redis --help is the same page.
    assert run(["run", "--redis", BOGUS_URL, "--help"])[1] == out


# --------------------------------------------------------------- onceq send

SEND = ["send", "--redis", BOGUS_URL, "--stream", "s", "-q"]


@test
def send_options_refuse_garbage_before_connecting():
    cases = [("--dedup-window", v) for v in BAD_DURATION]
    cases += [("--batch", v) for v in BAD_COUNT + ["0", "4097"]]
    cases += [("--max-line", v) for v in
              [v for v in BAD_COMMON if v != "99999999999999999999"] +
              ["1.5M", "0x10K", "15", "3G", "1 M", "99999999999999999999K"]]
    many(lambda c: expect_refused(SEND + [c[0], c[1]], c[0], c[1]), cases)


@test
def send_valid_values_get_to_connecting():
    # --dedup-window: a bare number is milliseconds (documented for send).
    many(lambda c: expect_connect_error(SEND + c),
         [["--dedup-window", v] for v in GOOD_DURATION + ["0", "300000"]] +
         [["--batch", "1"], ["--batch", "4096"], ["--max-line", "16"],
          ["--max-line", "1M"], ["--max-line", "64K"], ["--max-line", "2G"]])


@test
def send_dedup_window_bare_number_overflow():
    # Bare milliseconds, so the maximum in milliseconds, not seconds.
    expect_connect_error(SEND + ["--dedup-window", str(MAX_MS)])
    expect_refused(SEND + ["--dedup-window", str(MAX_MS + 1)],
                   "--dedup-window", str(MAX_MS + 1))


@test
def redis_largest_durations_work_end_to_end():
    # Against a real redis-server (skipped without one): the 100-year
    # maximum goes into claims, PX and deadlines without overflowing.
    exe = shutil.which("redis-server")
    if exe is None:
        print("  (skipped: no redis-server)")
        return
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"redis://127.0.0.1:{port}"
    server = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", TMP],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(250):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.02)
        ev = b'{"id":"a","word":"x"}\n{"id":"b","word":"x"}\n' \
             b'{"id":"a","word":"x"}\n'
        rc, out, err, _ = run(["send", "--redis", url, "--stream", "big",
                               "--dedup-window", f"{MAX_H}h"], stdin=ev)
        assert rc == 0 and out.strip() == \
            "sent 2, rejected 1 duplicates", (rc, out, err)
        rc, out, err, _ = run(["run", "--redis", url, "--stream", "big",
                               "--group", "g", "--drain", "-q", "-w", "2",
                               "--visibility-timeout", f"{MAX_H}h",
                               "--backoff", f"{MAX_H}h,{MAX_H}h",
                               "--kill-grace", f"{MAX_MS}ms", "-o", "-"],
                              timeout=60)
        assert rc == 0, (rc, err)
        assert out == '{"word":"x","count":2}\n', out
    finally:
        server.terminate()
        server.wait(timeout=10)


# ----------------------------------------------------------- Redis URL parts

@test
def redis_url_percent_escapes_are_strict():
    # A '%' not followed by two hex digits was taken as it is (a guess);
    # a literal '%' is %25.
    for userinfo in ("%zz:pw", "u:p%", "u:p%4", "u:%g0"):
        url = f"redis://{userinfo}@127.0.0.1:1"
        rc, out, err, _ = run(["send", "--redis", url, "--stream", "s"])
        assert rc == 2 and "bad Redis URL" in err, (url, rc, err)
    expect_connect_error(["send", "--redis", "redis://u:p%25w@127.0.0.1:1",
                          "--stream", "s"])


@test
def redis_commands_refuse_what_they_would_ignore():
    # send's --id-field is checked as run's; export and dlq refuse extra
    # arguments and the other command's options (before connecting).
    for bad in ("", "/a~2"):
        err = refusal(["send", "--redis", BOGUS_URL, "--stream", "s",
                       "--id-field", bad])
        assert "--id-field" in err, err
    for args in (["export", "--redis", BOGUS_URL, "--stream", "s", "extra"],
                 ["export", "--redis", BOGUS_URL, "--stream", "s",
                  "--reason", "failed"],
                 ["dlq", "list", "--redis", BOGUS_URL, "--stream", "s",
                  "extra"],
                 ["dlq", "list", "--redis", BOGUS_URL, "--stream", "s",
                  "-o", "x"]):
        refusal(args)


@test
def redis_url_port_and_db_are_strict():
    bad = [":+1", ": 1", ":-1", ":0x10", ":0", ":65536", ":1e3",
           ":99999999999999999999", ":18446744073709551617", ":", ":1 ",
           ":1/ 1", ":1/+1", ":1/-0", ":1/1x", ":1/0x1", ":1/1e3",
           ":1/99999999999999999999"]

    def one(tail):
        url = "redis://127.0.0.1" + tail
        for args in (["send", "--redis", url, "--stream", "s", "-q"],
                     ["run", "--redis", url, "--stream", "s", "--group",
                      "g", "-q"]):
            rc, out, err, _ = run(args)
            assert rc == 2 and "bad Redis URL" in err, \
                f"{url}: status {rc}, stderr {err!r}"
    many(one, bad)
    many(lambda tail: expect_connect_error(
        ["send", "--redis", "redis://127.0.0.1" + tail, "--stream", "s"]),
        [":1", ":1/0", ":1/15", ":00001", ":1/"])


# ---------------------------------------------------------------- onceq gen

GEN_COUNTS = [("--events", 0, None), ("--words", 1, 10000000),
              ("--seed", 0, (1 << 64) - 1)]
GEN_FRACTIONS = ["--duplicates", "--poison", "--transient"]


@test
def gen_counts_refuse_garbage():
    cases = [(o, v) for o, _, _ in GEN_COUNTS for v in BAD_COUNT]
    cases += [("--words", "0"), ("--words", "10000001")]
    many(lambda c: expect_refused(["gen", c[0], c[1]], c[0], c[1]), cases)
    many(lambda v: expect_refused(["gen", "-n", v], "--events", v),
         ["nan", "0x10", " 5", "+5"])


@test
def gen_counts_accept_and_use_their_values():
    out = expect_accepted(["gen", "--events", "7"])
    assert out.count("\n") == 7, out
    out = expect_accepted(["gen", "--events", "007", "--seed",
                           str((1 << 64) - 1), "--words", "10000000"])
    assert out.count("\n") == 7, out
    assert expect_accepted(["gen", "--events", "0"]) == ""


@test
def gen_fractions_are_strict():
    bad = [v for v in BAD_COMMON if v != "99999999999999999999"]
    bad += ["1.5", "2", "0x0.8", "1e-1", ".5", "1.", "0.5 ", " 0.5",
            "+0.5", "-0", "-0.0", "0,5", "50%", "0.5x"]
    many(lambda c: expect_refused(["gen", c[0], c[1]], c[0], c[1]),
         [(o, v) for o in GEN_FRACTIONS for v in bad])
    many(lambda c: expect_accepted(["gen", "--events", "5", c[0], c[1]]),
         [(o, v) for o in GEN_FRACTIONS
          for v in ["0", "1", "0.5", "0.001", "1.0", "0.25"]])


@test
def gen_max_line_sizes():
    bad = [v for v in BAD_COMMON if v != "99999999999999999999"]
    bad += ["2047", "1.5M", "0x10K", "1e3K", "1 M", "5G", "4097M", "1Mx",
            "99999999999999999999K"]
    many(lambda v: expect_refused(["gen", "--bad", "--max-line", v],
                                  "--max-line", v), bad)
    many(lambda v: expect_accepted(["gen", "--bad", "--max-line", v,
                                    "-o", path("bad.jsonl")]),
         ["2048", "64K", "64k", "1M", "1m", "1MiB"])


# --------------------------------------------------- --since (onceq dlq ...)

@test
def since_duration_is_strict():
    # --since takes the same durations; a bad one is refused before the
    # state file is looked at.
    st = path("no-such-state.db")
    many(lambda v: expect_refused(["dlq", "list", "--state", st, "--since",
                                   v], "time", v),
         ["nan", "inf", "0x10", "1e3", " 5", "5 ", "+5", "-1", "5x", "5 s",
          "99999999999999999999"])


@test
def empty_outputs_and_bad_pointers_are_refused():
    """-o '', --stats '' and a JSON pointer with a bad ~ escape: exit 2
    before anything runs (they used to run everything, then fail)."""
    missing = os.path.join(TMP, "missing.jsonl")
    expect_refused(["run", missing, "-o", ""], "-o", "")
    expect_refused(["run", missing, "--stats", ""], "--stats", "")
    expect_refused(["run", missing, "--metrics", ""], "--metrics", "")
    expect_refused(["run", missing, "--id-field", "/a~2b"], "--id-field",
                   "/a~2b")
    expect_refused(["run", missing, "--id-field", "/a~"], "--id-field", "/a~")


def main():
    return suite.run(TMP)


if __name__ == "__main__":
    sys.exit(main())
