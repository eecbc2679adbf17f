#!/usr/bin/env python3
"""Description: end-to-end tests of `onceq run` and `onceq gen`, on the real
binary. Each test computes what the answer must be independently (in Python,
from the input file) and compares it with what onceq wrote: word counts,
emitted events, exec outputs, dead letters with their reasons, stats that
balance, and exit statuses. Prints "N passed, N failed".

Environment: ONCEQ (the binary; default ./onceq), OQ_RUN_SEED (default:
time), BUILD (a sanitizer build gets smaller inputs)."""
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Suite  # noqa: E402
from collections import Counter

ONCEQ = os.path.abspath(os.environ.get("ONCEQ", "./onceq"))
BUILD = os.environ.get("BUILD", "build")
SLOW = "tsan" in BUILD or "asan" in BUILD
SEED = int(os.environ.get("OQ_RUN_SEED", str(int(time.time()) % 100000)))
TMP = tempfile.mkdtemp(prefix="onceq-run-test-")
print(f"test_run: seed {SEED} (OQ_RUN_SEED), binary {ONCEQ}")

suite = Suite()
test = suite.test
tests = suite.tests


def path(name):
    return os.path.join(TMP, name)


def run(args, stdin=None, check_balance=True, timeout=300, cwd=None):
    """Runs onceq; returns (exit status, stdout, stderr)."""
    p = subprocess.run([ONCEQ] + args, input=stdin, capture_output=True,
                       timeout=timeout, cwd=cwd or TMP)
    return p.returncode, p.stdout.decode("utf-8", "replace"), \
        p.stderr.decode("utf-8", "replace")


def gen(name, *args):
    rc, out, err = run(["gen", "-o", path(name)] + list(args))
    assert rc == 0, f"gen failed: {err}"
    return path(name)


def read_jsonl(p):
    with open(p, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def expected_words(p, id_field="id"):
    """Word counts of the first occurrence of each id (the reference)."""
    seen = set()
    counts = Counter()
    with open(p, "rb") as f:
        for raw in f:
            ev = json.loads(raw)
            if ev[id_field] in seen:
                continue
            seen.add(ev[id_field])
            if "word" in ev:
                counts[ev["word"]] += 1
            else:
                counts.update(ev["text"].split())
    return counts


def parse_counts(out, key="word"):
    got = {}
    lines = [json.loads(line) for line in out.splitlines() if line]
    for o in lines:
        assert set(o) == {key, "count"}, o
        assert o[key] not in got, f"key twice: {o}"
        got[o[key]] = o["count"]
    keys = [o[key].encode() for o in lines]
    assert keys == sorted(keys), "output is not sorted by key"
    return got


def balanced(stats):
    assert stats["lines"] == stats["processed"] + stats["duplicates"] + \
        stats["dead"] + stats["blank"], stats


# ------------------------------------------------------------- wordcount

@test
def wordcount_matches_independent_counts():
    n = 20000 if SLOW else 200000
    f = gen("wc.jsonl", "--events", str(n), "--duplicates", "0.1",
            "--words", "500", "--seed", str(SEED))
    rc, out, err = run(["run", "-w", "2", "--stats", path("wc.stats"), f])
    assert rc == 0, err
    assert parse_counts(out) == dict(expected_words(f))
    st = json.load(open(path("wc.stats")))
    balanced(st)
    assert st["lines"] == n
    uniq = len({e["id"] for e in read_jsonl(f)})
    assert st["processed"] == uniq and st["duplicates"] == n - uniq, st


@test
def wordcount_text_field_and_one_worker():
    f = gen("text.jsonl", "--events", "3000", "--duplicates", "0.2", "--text",
            "--seed", str(SEED + 1))
    rc, out, err = run(["run", "-w", "1", "--batch", "1", f])
    assert rc == 0, err
    assert parse_counts(out) == dict(expected_words(f))


@test
def stdin_input_and_dash():
    f = gen("stdin.jsonl", "--events", "2000", "--duplicates", "0.1",
            "--seed", str(SEED + 2))
    data = open(f, "rb").read()
    want = dict(expected_words(f))
    rc, out, err = run(["run"], stdin=data)
    assert rc == 0, err
    assert parse_counts(out) == want
    rc, out, err = run(["run", "-"], stdin=data)
    assert rc == 0, err
    assert parse_counts(out) == want


@test
def several_files_dedup_across_files():
    a = path("a.jsonl")
    b = path("b.jsonl")
    open(a, "w").write('{"id":"1","word":"x"}\n{"id":"2","word":"y"}\n')
    open(b, "w").write('{"id":"2","word":"y"}\n{"id":"3","word":"x"}\n')
    rc, out, err = run(["run", "--stats", "-", "-o", path("ab.out"), a, b])
    assert rc == 0, err
    st = json.loads(out)
    assert (st["processed"], st["duplicates"]) == (3, 1), st
    assert parse_counts(open(path("ab.out")).read()) == {"x": 2, "y": 1}


@test
def id_field_pointer_and_event_id_fallback():
    f = path("ids.jsonl")
    open(f, "w").write('{"event_id":"a","word":"w"}\n'
                       '{"event_id":"a","word":"w"}\n'
                       '{"id":7,"word":"w"}\n{"id":7,"word":"w"}\n')
    rc, out, err = run(["run", f])
    assert rc == 0, err
    assert parse_counts(out) == {"w": 2}
    g = path("nested.jsonl")
    open(g, "w").write('{"meta":{"id":"m1"},"word":"q"}\n'
                       '{"meta":{"id":"m1"},"word":"q"}\n'
                       '{"meta":{"id":"m2"},"word":"q"}\n')
    rc, out, err = run(["run", "--id-field", "/meta/id", g])
    assert rc == 0, err
    assert parse_counts(out) == {"q": 2}


@test
def count_handler_groups_by_field():
    f = path("countries.jsonl")
    rows = [("1", "fr"), ("2", "de"), ("3", "fr"), ("3", "fr"), ("4", "it"),
            ("5", "fr")]
    open(f, "w").write("".join(f'{{"id":"{i}","country":"{c}"}}\n'
                               for i, c in rows))
    rc, out, err = run(["run", "--handler", "count:country", f])
    assert rc == 0, err
    assert parse_counts(out, "country") == {"fr": 3, "de": 1, "it": 1}


# ------------------------------------------------------------ noop --emit

@test
def emit_writes_unique_events_in_input_order():
    f = gen("emit.jsonl", "--events", "5000", "--duplicates", "0.3",
            "--seed", str(SEED + 3))
    rc, out, err = run(["run", "--handler", "noop", "--emit", "-w", "2", f])
    assert rc == 0, err
    want, seen = [], set()
    for line in open(f, "rb").read().decode().splitlines():
        i = json.loads(line)["id"]
        if i not in seen:
            seen.add(i)
            want.append(line)
    assert out.splitlines() == want


@test
def emit_needs_noop():
    rc, out, err = run(["run", "--emit", os.devnull])
    assert rc == 2 and "noop" in err, (rc, err)


def first_of_each_id(lines):
    """The model of every record output: each id once, in the order of the
    lines where it first appears (lines that are not JSON objects with an
    id, blank or poison, are skipped)."""
    order, seen = [], set()
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if not isinstance(ev, dict) or "id" not in ev or ev.get("poison"):
            continue
        if ev["id"] not in seen:
            seen.add(ev["id"])
            order.append(ev["id"])
    return order


ECHO_SCRIPT = r"""#!/bin/sh
# Writes the event back; a transient copy fails its first attempt, so a
# later copy of its id runs first; a poison event always fails.
line=$(cat)
case "$line" in
  *'"transient":true'*) [ "$ONCEQ_ATTEMPT" = 1 ] && exit 75 ;;
  *'"poison":true'*) exit 3 ;;
esac
printf '%s\n' "$line"
"""


def later_copy_first_corpus():
    """Two inputs. Ids p0..p11 have a first copy that fails once (backoff
    400 ms) and a second copy 30 to 150 lines later, often in the other
    input, which commits first: its record must still be written where the
    id first appeared. Blank lines and poison events settle their lines
    without a record."""
    rows = []
    for i in range(240):
        rows.append({"id": f"e{i}", "n": i})
        if i % 20 == 3:
            rows.append({"id": f"p{i // 20}", "copy": 1, "transient": True})
        if i % 37 == 5:
            rows.append({"id": f"x{i}", "poison": True})
    for k in range(12):
        at = next(j for j, r in enumerate(rows) if r["id"] == f"p{k}")
        rows.insert(at + 30 + 10 * k, {"id": f"p{k}", "copy": 2})
    lines = [json.dumps(r, separators=(",", ":")) for r in rows]
    for j in range(7, len(lines), 50):
        lines[j] += "\n"  # a blank line after it
    return lines


@test
def a_presize_without_memory_is_only_a_hint():
    """The processed set is sized from the input at start; when that much
    memory is not there (the seam asks for 2^40 ids), the run goes on with
    a set that grows, and its results are the same."""
    f = gen("hint.jsonl", "--events", "3000", "--duplicates", "0.2",
            "--seed", str(SEED + 41))
    env = dict(os.environ, ONCEQ_TEST_EXPECTED_IDS=str(1 << 40))
    # Under ASan/TSAN a malloc that cannot be served must return NULL, as
    # it does without them, not abort.
    for k in ("ASAN_OPTIONS", "TSAN_OPTIONS"):
        env[k] = ":".join(filter(None, [env.get(k), "allocator_may_return_null=1"]))
    p = subprocess.run([ONCEQ, "run", "-w", "2", f], capture_output=True,
                       timeout=300, cwd=TMP, env=env)
    assert p.returncode == 0, (p.returncode, p.stderr.decode())
    assert parse_counts(p.stdout.decode()) == dict(expected_words(f))


@test
def emit_record_moves_to_the_first_copy_when_a_later_copy_commits_first():
    script = path("echo.sh")
    open(script, "w").write(ECHO_SCRIPT)
    os.chmod(script, 0o755)
    lines = later_copy_first_corpus()
    a, b = path("first-a.jsonl"), path("first-b.jsonl")
    half = len(lines) // 2
    open(a, "w").write("\n".join(lines[:half]) + "\n")
    open(b, "w").write("\n".join(lines[half:]) + "\n")
    want = first_of_each_id("\n".join(lines).split("\n"))
    for window in (None, "8"):
        env = dict(os.environ)
        if window:
            # The reader waits on the watermark, and so on the transient
            # copies' backoff: it must not stall for good.
            env["ONCEQ_TEST_REORDER_WINDOW"] = window
        p = subprocess.run([ONCEQ, "run", "-w", "2", "--handler",
                            "exec:" + script, "--backoff", "400ms,400ms",
                            "--dlq", path("first-dlq.jsonl"), a, b],
                           capture_output=True, timeout=300, cwd=TMP,
                           env=env)
        err = p.stderr.decode()
        assert p.returncode == 1, (p.returncode, err)  # the poison events
        recs = [json.loads(x) for x in p.stdout.decode().splitlines()]
        assert [r["id"] for r in recs] == want, (window, err)
        later = [r for r in recs if r.get("copy") == 2]
        # The case under test happened (the second copy ran): with a
        # 400 ms backoff on each first copy, nearly always all 12.
        assert later, "no second copy committed first"
        dead = read_jsonl(path("first-dlq.jsonl"))
        assert [d["id"] for d in dead] == \
            [json.loads(x)["id"] for x in lines if '"poison"' in x]


@test
def emit_writes_records_while_the_input_is_still_open():
    # The records of the lines settled so far come out before the input
    # ends (a run that held them to its end would time out here), in input
    # order, and a later copy of an id already written adds nothing.
    n = 3000
    rows = [json.dumps({"id": f"i{k % (n // 2)}", "k": k},
                       separators=(",", ":")) for k in range(n)]
    first, second = rows[:n // 2 + 500], rows[n // 2 + 500:]
    proc = subprocess.Popen([ONCEQ, "run", "--handler", "noop", "--emit",
                             "-w", "2", "-q"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=TMP)
    try:
        proc.stdin.write(("\n".join(first) + "\n").encode())
        proc.stdin.flush()
        want = first[:n // 2]  # ids i0..i1499, each at its first line
        got, buf = [], b""
        deadline = time.time() + (60 if SLOW else 20)
        while len(got) < len(want) and time.time() < deadline:
            r, _, _ = select.select([proc.stdout], [], [], 0.2)
            if r:
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, "onceq closed its output early"
                buf += chunk
                *done, buf = buf.split(b"\n")
                got += [x.decode() for x in done]
        # In input order of first appearance; a record's bytes are the
        # copy that committed, which may be a later copy of its id.
        assert len(got) == len(want), (len(got), len(want))
        for g, w in zip(got, want):
            gj, wj = json.loads(g), json.loads(w)
            assert gj["id"] == wj["id"] and g in rows, (g, w)
        proc.stdin.write(("\n".join(second) + "\n").encode())
        proc.stdin.close()
        rest = proc.stdout.read()
        err = proc.stderr.read().decode()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert buf + rest == b"", "later copies were written"


# --------------------------------------------------------------- exec

EXEC_SCRIPT = r"""#!/bin/sh
# transient events fail on the first attempt; poison events always fail;
# slow events sleep past the visibility timeout on the first attempt.
line=$(cat)
case "$line" in
  *'"transient":true'*) [ "$ONCEQ_ATTEMPT" = 1 ] && { echo "busy, try later" >&2; exit 75; } ;;
  *'"poison":true'*) echo "cannot process $ONCEQ_EVENT_ID" >&2; exit 3 ;;
  *'"slow":true'*) [ "$ONCEQ_ATTEMPT" = 1 ] && sleep 3 ;;
esac
printf '{"id":"%s","attempt":%s}\n' "$ONCEQ_EVENT_ID" "$ONCEQ_ATTEMPT"
"""


@test
def exec_transient_permanent_and_slow_handlers():
    script = path("handler.sh")
    open(script, "w").write(EXEC_SCRIPT)
    os.chmod(script, 0o755)
    f = path("exec.jsonl")
    events = []
    for i in range(60):
        ev = {"id": f"e{i}", "word": "w"}
        if i % 10 == 1:
            ev["transient"] = True
        if i % 10 == 2:
            ev["poison"] = True
        if i in (5, 25):
            ev["slow"] = True
        events.append(ev)
    lines = [json.dumps(e, separators=(",", ":")) for e in events]
    lines += [lines[1], lines[2], lines[3]]  # redeliveries upstream
    open(f, "w").write("\n".join(lines) + "\n")
    dlq = path("exec-dlq.jsonl")
    rc, out, err = run(["run", "-w", "2", "--handler", "exec:" + script,
                        "--visibility-timeout", "1s", "--timeout", "1s",
                        "--kill-grace", "200ms",
                        "--backoff", "10ms,50ms", "--dlq", dlq,
                        "--stats", path("exec.stats"), f])
    assert rc == 1, (rc, err)  # poison events were dead-lettered
    recs = [json.loads(x) for x in out.splitlines()]
    ids = [r["id"] for r in recs]
    good = [e["id"] for e in events if not e.get("poison")]
    assert sorted(ids) == sorted(good), "each good event exactly once"
    assert ids == good, "records in input order"
    by_id = {r["id"]: r["attempt"] for r in recs}
    for e in events:
        if e.get("transient") or e.get("slow"):
            assert by_id[e["id"]] == 2, (e, by_id[e["id"]])
        elif not e.get("poison"):
            assert by_id[e["id"]] == 1, e
    dead = read_jsonl(dlq)
    assert sorted(d["id"] for d in dead) == \
        sorted(e["id"] for e in events if e.get("poison"))
    for d in dead:
        assert d["reason"] == "failed" and d["attempts"] == 1, d
        assert "exit 3" in d["error"] and d["id"] in d["error"], d
        assert d["event"]["poison"] is True
        assert d["source"].endswith(".jsonl:%d" % (int(d["id"][1:]) + 1)), d
        assert d["first_seen"] <= d["last_seen"]
    st = json.load(open(path("exec.stats")))
    balanced(st)
    assert st["duplicates"] == 3 and st["dead"] == 6, st


@test
def exec_max_attempts_dead_letters():
    f = path("always.jsonl")
    open(f, "w").write('{"id":"x"}\n{"id":"y"}\n')
    dlq = path("always-dlq.jsonl")
    rc, out, err = run(["run", "--handler", "exec:exit 75", "--max-attempts",
                        "3", "--backoff", "1ms,5ms", "--dlq", dlq, f])
    assert rc == 1, err
    dead = read_jsonl(dlq)
    assert sorted(d["id"] for d in dead) == ["x", "y"]
    for d in dead:
        assert d["reason"] == "max_attempts" and d["attempts"] == 3, d


# ------------------------------------------------------------ bad input

@test
def every_kind_of_bad_input():
    f = gen("bad.jsonl", "--bad")
    dlq = path("bad-dlq.jsonl")
    rc, out, err = run(["run", "--dlq", dlq, "--stats", path("bad.stats"), f])
    assert rc == 1, (rc, err)
    st = json.load(open(path("bad.stats")))
    balanced(st)
    assert (st["processed"], st["duplicates"], st["blank"], st["dead"]) == \
        (5, 1, 3, 18), st
    assert st["dead_by_reason"]["parse_error"] == 8
    assert st["dead_by_reason"]["bad_id"] == 9
    assert st["dead_by_reason"]["too_large"] == 1
    assert parse_counts(out) == {w: 1 for w in
                                 ["alpha", "beta", "delta", "epsilon", "omega"]}
    dead = read_jsonl(dlq)
    assert len(dead) == 18
    raw = open(f, "rb").read().split(b"\n")
    for d in dead:
        for k in ("source", "reason", "error", "attempts", "first_seen",
                  "last_seen", "event"):
            assert k in d, (k, d)
        assert d["error"], d
        lineno = int(d["source"].rsplit(":", 1)[1])
        if d["reason"] == "too_large":
            assert isinstance(d["event"], str) and len(d["event"]) == 4096
        elif d["reason"] == "parse_error":
            assert isinstance(d["event"], str), d
        else:
            assert d["reason"] == "bad_id", d
            assert json.loads(raw[lineno - 1]) == d["event"], d
    srcs = [int(d["source"].rsplit(":", 1)[1]) for d in dead]
    assert srcs == sorted(srcs), "dead letters in input order"


@test
def crlf_and_no_final_newline_accepted():
    f = path("crlf.jsonl")
    open(f, "wb").write(b'{"id":"1","word":"a"}\r\n\r\n   \n'
                        b'{"id":"2","word":"b"}')
    rc, out, err = run(["run", "--stats", path("crlf.stats"), f])
    assert rc == 0, err
    assert parse_counts(out) == {"a": 1, "b": 1}
    st = json.load(open(path("crlf.stats")))
    assert (st["lines"], st["blank"], st["processed"]) == (4, 2, 2), st


@test
def too_large_line_with_small_max_line():
    f = path("large.jsonl")
    big = '{"id":"big","word":"%s"}' % ("x" * 5000)
    open(f, "w").write('{"id":"1","word":"a"}\n' + big + '\n'
                       '{"id":"2","word":"b"}\n')
    dlq = path("large-dlq.jsonl")
    rc, out, err = run(["run", "--max-line", "1K", "--dlq", dlq, f])
    assert rc == 1, err
    assert parse_counts(out) == {"a": 1, "b": 1}
    (d,) = read_jsonl(dlq)
    assert d["reason"] == "too_large" and d["source"].endswith(":2"), d
    assert d["event"] == big[:4096]


# ---------------------------------------------------------- exit codes

@test
def usage_errors_exit_2_before_processing():
    good = gen("good.jsonl", "--events", "10")
    cases = [
        ["run", "--no-such-option", good],
        ["run", "--handler", "nosuch", good],
        ["run", "--handler", "count:", good],
        ["run", "--workers", "0", good],
        ["run", "--visibility-timeout", "soon", good],
        ["run", "--backoff", "5s,1s", good],
        ["run", good, path("missing.jsonl")],
        ["run", TMP],
        ["run", "--workers"],
    ]
    for args in cases:
        rc, out, err = run(args)
        assert rc == 2, (args, rc, err)
        assert err.count("\n") == 1 and err.startswith("onceq run: "), \
            (args, err)
        assert out == "", (args, out)  # nothing was processed
    rc, out, err = run(["frobnicate"])
    assert rc == 2 and "unknown command" in err


@test
def dlq_written_only_when_needed():
    good = gen("clean.jsonl", "--events", "50")
    dlq = path("never.jsonl")
    rc, out, err = run(["run", "--dlq", dlq, good])
    assert rc == 0 and not os.path.exists(dlq), (rc, err)


@test
def write_error_exits_3():
    good = gen("full.jsonl", "--events", "50")
    if not os.path.exists("/dev/full"):
        return
    rc, out, err = run(["run", "-o", "/dev/full", good])
    assert rc == 3 and "write error" in err, (rc, err)
    # An output that cannot be opened is refused before anything runs.
    rc, out, err = run(["run", "-o", os.path.join(TMP, "no", "dir"), good])
    assert rc == 2 and "cannot write" in err, (rc, err)


@test
def reader_thread_and_reading_workers_agree():
    """Who reads the input (a reader thread, or the workers themselves when
    their queue runs dry: ONCEQ_READER) changes nothing in the results, on
    a file and on an open pipe that is then stopped."""
    f = gen("readers.jsonl", "--events", "20000", "--duplicates", "0.2",
            "--seed", str(SEED + 7))
    want = dict(expected_words(f))
    uniq = len({e["id"] for e in read_jsonl(f)})
    for who in ("thread", "workers"):
        env = dict(os.environ, ONCEQ_READER=who)
        for w in ("1", "3"):
            p = subprocess.run([ONCEQ, "run", "-w", w, "--stats",
                                path("rd.stats"), f], capture_output=True,
                               env=env, cwd=TMP, timeout=300)
            assert p.returncode == 0, (who, w, p.stderr)
            assert parse_counts(p.stdout.decode()) == want, (who, w)
            st = json.load(open(path("rd.stats")))
            balanced(st)
            assert st["processed"] == uniq, (who, w, st)
        # An open pipe always gets a reader thread, whatever ONCEQ_READER
        # says (a worker blocked on it would hold up the queued lines; with
        # one worker, forever): lines read so far are processed at once,
        # and SIGINT stops the run. "-w 1" is the case that would hang.
        p = subprocess.Popen([ONCEQ, "run", "-w", "1", "--stats", "-"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=TMP, env=env)
        p.stdin.write(b'{"id":"a","word":"x"}\n{"id":"b","word":"x"}\n')
        p.stdin.flush()
        time.sleep(1.0 if SLOW else 0.4)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 130, (who, p.returncode, err)
        lines = out.decode().splitlines()
        assert lines[0] == '{"word":"x","count":2}', (who, lines)


@test
def sigint_and_sigterm_stop_gracefully():
    f = path("slow.jsonl")
    open(f, "w").write("".join(f'{{"id":"s{i}"}}\n' for i in range(200)))
    for sig, want in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        p = subprocess.Popen([ONCEQ, "run", "-w", "2", "--handler",
                              "exec:sleep 0.05; echo done", "--stats",
                              path("sig.stats"), f],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=TMP)
        time.sleep(0.8)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        assert p.returncode == want, (sig, p.returncode, err)
        assert b"stopped by" in err, err
        st = json.load(open(path("sig.stats")))
        assert 0 < st["processed"] < 200, st
        assert st["lines"] == st["processed"] + st["duplicates"] + \
            st["dead"] + st["blank"] + st["unfinished"], st
        # Only finished events were written.
        assert len(out.splitlines()) == st["processed"]


@test
def sigint_with_open_stdin_pipe():
    """A pipe that stays open (tail -f) must not keep onceq from stopping,
    and lines read so far must not wait for a full batch."""
    p = subprocess.Popen([ONCEQ, "run", "--stats", "-"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=TMP)
    p.stdin.write(b'{"id":"a","word":"x"}\n{"id":"b","word":"x"}\n')
    p.stdin.flush()
    time.sleep(1.0 if SLOW else 0.4)
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, (p.returncode, err)
    assert time.time() - t0 < 10
    lines = out.decode().splitlines()
    assert lines[0] == '{"word":"x","count":2}', lines
    assert json.loads(lines[1])["processed"] == 2


@test
def help_lists_options_and_exit_codes():
    rc, out, err = run(["run", "--help"])
    assert rc == 0
    for word in ("--workers", "--id-field", "--visibility-timeout",
                 "--max-attempts", "--backoff", "--ttl", "--dedup-window",
                 "--handler", "--out", "--dlq", "--stats", "--progress",
                 "--no-progress", "--quiet", "--verbose", "Exit status",
                 "Examples"):
        assert word in out, word
    rc, out, err = run(["--version"])
    assert rc == 0 and out.startswith("onceq ")


@test
def progress_line_on_request():
    f = gen("prog.jsonl", "--events", "2000")
    rc, out, err = run(["run", "--progress", f])
    assert rc == 0 and "ev/s" in err, err
    rc, out, err = run(["run", f])
    assert "ev/s" not in err  # not a TTY: off by default


@test
def gen_is_deterministic_and_validates():
    a = gen("g1.jsonl", "--events", "1000", "--seed", "5", "--duplicates",
            "0.2")
    b = gen("g2.jsonl", "--events", "1000", "--seed", "5", "--duplicates",
            "0.2")
    assert open(a, "rb").read() == open(b, "rb").read()
    rows = read_jsonl(a)
    assert len(rows) == 1000
    assert 150 <= 1000 - len({r["id"] for r in rows}) <= 250
    rc, out, err = run(["gen", "--events", "10", "--duplicates", "2"])
    assert rc == 2 and err.count("\n") == 1, err


def strict_event(raw):
    """What onceq must do with one line, decided by Python's strict json:
    "ok" with the id, or "parse_error" / "bad_id"."""
    def no_dup(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError("duplicate key")
        return dict(pairs)

    def no_const(c):
        raise ValueError(c)

    def has_surrogate(v):
        if isinstance(v, str):
            return any(0xD800 <= ord(ch) <= 0xDFFF for ch in v)
        if isinstance(v, dict):
            return any(has_surrogate(k) or has_surrogate(x) for k, x in v.items())
        if isinstance(v, list):
            return any(has_surrogate(x) for x in v)
        return False

    try:
        text = raw.decode("utf-8")
        if "\x00" in text:
            return "parse_error", None
        ev = json.loads(text, object_pairs_hook=no_dup, parse_constant=no_const)
        if has_surrogate(ev):
            return "parse_error", None
    except (ValueError, UnicodeDecodeError):
        return "parse_error", None
    if not isinstance(ev, dict):
        return "parse_error", None
    idv = ev["id"] if "id" in ev else ev.get("event_id")
    if isinstance(idv, bool) or idv is None:
        return "bad_id", None
    if isinstance(idv, str):
        b = idv.encode("utf-8")
        return ("ok", b) if 0 < len(b) <= 1024 else ("bad_id", None)
    if isinstance(idv, int):
        return "ok", str(idv).encode()  # exact for the short ints used here
    return "bad_id", None


@test
def strict_json_matches_python():
    """Differential: mutated lines are accepted exactly when Python's strict
    json accepts them (no NaN, no duplicate keys, no lone surrogates, no
    control characters or other whitespace), with the same id."""
    import random
    rnd = random.Random(SEED)
    seeds = [b'{"id":"e1","word":"w"}', b'{"id":17,"text":"a b"}',
             b'{"event_id":"x\\u0041","n":[1,2.5e3,{"k":null}],"t":true}',
             b'{"id":"\\ud83d\\ude00","v":-0}']
    alphabet = (b'{}[]":,\\/ubfnrt0123456789.eE+-aAxX \t\r\x0b\x0c\x00\x01'
                b'\x7f\xc3\xa9\xff')
    lines = [b'{"id":"first"}']
    for _ in range(1500 if SLOW else 6000):
        b = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 3)):
            at = rnd.randint(0, len(b))
            op = rnd.randint(0, 2)
            ch = alphabet[rnd.randrange(len(alphabet))]
            if op == 0 and at < len(b):
                b[at] = ch
            elif op == 1:
                b.insert(at, ch)
            elif at < len(b):
                del b[at]
        b = bytes(b).rstrip(b"\r")
        if b.strip(b" \t\r") == b"":
            continue
        lines.append(b)
    f = path("strict.jsonl")
    open(f, "wb").write(b"\n".join(lines) + b"\n")
    out, dlq = path("strict.out"), path("strict.dlq")
    rc, _, err = run(["run", "-w", "2", "--handler", "noop", "--emit", "-o",
                      out, "--dlq", dlq, f], check_balance=False)
    assert rc in (0, 1), err
    want_dead, first, copies = {}, {}, {}
    for n, raw in enumerate(lines, 1):
        what, idv = strict_event(raw)
        if what != "ok":
            want_dead[n] = what
        else:
            first.setdefault(idv, raw)
            copies.setdefault(idv, set()).add(raw)
    got_dead = {}
    if os.path.exists(dlq):
        for d in read_jsonl(dlq):
            got_dead[int(d["source"].rsplit(":", 1)[1])] = d["reason"]
    wrong = {n: (want_dead.get(n), got_dead.get(n), lines[n - 1])
             for n in set(want_dead) | set(got_dead)
             if want_dead.get(n) != got_dead.get(n)}
    assert not wrong, list(wrong.items())[:5]
    emitted = open(out, "rb").read().split(b"\n")[:-1]  # not on a lone CR
    # One line per id, at its first position; which copy of an id whose
    # copies differ ran (and so was emitted) is up to the workers.
    ids = [strict_event(e)[1] for e in emitted]
    assert ids == list(first), (len(emitted), len(first))
    for idv, e in zip(ids, emitted):
        assert e in copies[idv], (idv, e)
    for line in emitted:
        json.loads(line)


@test
def ids_are_exact_byte_strings():
    """Ids that differ after an escaped NUL, or above 2^53, are different
    events; a float id is bad_id at any --id-field depth."""
    f = path("exact.jsonl")
    lines = ['{"id":"x\\u0000y","word":"a"}', '{"id":"x\\u0000z","word":"a"}',
             '{"id":"x\\u0000y","word":"a"}',
             '{"id":9007199254740993,"word":"b"}',
             '{"id":9007199254740992,"word":"b"}',
             '{"id":"k","word":"c\\u0000d"}', '{"id":"k2","word":"c\\u0000e"}']
    open(f, "w").write("\n".join(lines) + "\n")
    rc, out, err = run(["run", f])
    assert rc == 0, err
    counts = {}
    for line in out.splitlines():
        o = json.loads(line)
        counts[o["word"]] = o["count"]
    assert counts == {"a": 2, "b": 2, "c\x00d": 1, "c\x00e": 1}, counts
    deep = "/" + "/".join(["a"] * 40)
    g = path("deep.jsonl")
    doc = '{"a":' * 40 + "1.0" + "}" * 40
    doc2 = '{"a":' * 40 + "7" + "}" * 40
    open(g, "w").write(doc[:-1] + ',"word":"x"}\n' + doc2[:-1] + ',"word":"y"}\n')
    dlq = path("deep.dlq")
    rc, out, err = run(["run", "--id-field", deep, "--dlq", dlq, g])
    assert rc == 1, err
    dead = read_jsonl(dlq)
    assert [d["reason"] for d in dead] == ["bad_id"], dead
    assert json.loads(out.splitlines()[0]) == {"word": "y", "count": 1}, out


@test
def expired_copy_of_a_processed_event_is_a_duplicate():
    """--ttl: a copy that waited past the TTL behind a slow handler is a
    duplicate when its id was processed, and an expired event is
    dead-lettered once, not once per copy."""
    f = path("ttl.jsonl")
    open(f, "w").write('{"id":"a"}\n{"id":"a"}\n{"id":"b"}\n{"id":"b"}\n')
    dlq, stats = path("ttl.dlq"), path("ttl.stats")
    rc, out, err = run(["run", "-w", "1", "--handler",
                        "exec:sleep 1; cat", "--ttl", "300ms", "--dlq", dlq,
                        "--stats", stats, f])
    assert rc == 1, err
    dead = read_jsonl(dlq)
    assert [(d["id"], d["reason"]) for d in dead] == [("b", "expired")], dead
    st = json.load(open(stats))
    assert (st["processed"], st["duplicates"], st["dead"]) == (1, 2, 1), st


def main():
    return suite.run(TMP, seed=SEED)


if __name__ == "__main__":
    sys.exit(main())
