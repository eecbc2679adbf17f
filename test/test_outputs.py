#!/usr/bin/env python3
"""Description: end-to-end tests of what `onceq run` writes and leaves
behind: its outputs (-o, --dlq, --stats), their validity as JSON, when they
are opened and where they may not point, the exit status of a run that
stopped on a read error, the descriptors exec children inherit, and what the
durable state holds after a growing input or an interrupted run. Drives the
real binary; prints "N passed, N failed".

Environment: ONCEQ (the binary; default ./onceq), BUILD (a sanitizer build
runs fewer kill -9 rounds)."""
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Suite  # noqa: E402

ONCEQ = os.path.abspath(os.environ.get("ONCEQ", "./onceq"))
BUILD = os.environ.get("BUILD", "build")
SLOW = "tsan" in BUILD or "asan" in BUILD
TMP = tempfile.mkdtemp(prefix="onceq-outputs-test-")

suite = Suite()
test = suite.test
tests = suite.tests


def path(name):
    return os.path.join(TMP, name)


def run(args, env=None, timeout=120, stdin=None, cwd=None):
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([ONCEQ] + args, capture_output=True, timeout=timeout,
                       cwd=cwd or TMP, env=e, input=stdin)
    return p.returncode, p.stdout.decode("utf-8", "replace"), \
        p.stderr.decode("utf-8", "replace")


def gen(name, *args):
    rc, out, err = run(["gen", "-o", path(name)] + list(args))
    assert rc == 0, err
    return path(name)


def write(name, data):
    with open(path(name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    return path(name)


def rm_state(db):
    for suffix in ("", "-wal", "-shm", ".lock"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)


def state_stats(db):
    rc, out, err = run(["stats", "--state", db])
    assert rc == 0, err
    return json.loads(out)


def balanced(s):
    return s["lines"] == (s["processed"] + s["duplicates"] + s["dead"] +
                          s.get("purged", 0) + s["blank"] + s["unfinished"])


# ------------------------------------------------------- strict JSON

def no_constants(name):
    raise ValueError("not JSON: " + name)


def no_repeats(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("repeated key in %r" % keys)
    return dict(pairs)


def strict_line(line):
    """Parses one output line as RFC 8259 JSON text: valid UTF-8, no NaN or
    Infinity, no object with a repeated key."""
    text = line.decode("utf-8")  # strict: invalid UTF-8 raises
    return json.loads(text, parse_constant=no_constants,
                      object_pairs_hook=no_repeats)


def check_json_lines(data, what):
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    assert data == b"" or data.endswith(b"\n"), (what, data[-80:])
    for i, line in enumerate(data.split(b"\n")[:-1]):
        try:
            strict_line(line)
        except Exception as e:
            raise AssertionError(f"{what}: line {i + 1} is not strict JSON "
                                 f"({e}): {line[:200]!r}")
    return data.count(b"\n")


def read_bytes(p):
    with open(p, "rb") as f:
        return f.read()


ODD_BYTES = (
    b'{"id":"ok-1","word":"fine"}\n'
    b'{"id":"bom-mid","word":"x"}\n'
    b'\xef\xbb\xbf{"id":"bom-inside","word":"y"}\n'       # BOM mid-file
    b'{"id":"ctl","word":"a\x01b\x1fc"}\n'                 # raw controls
    b'{"id":"tab","word":"a\tb"}\n'
    b'{"id":"del","word":"a\x7fb"}\n'
    b'{"id":"nul-esc\\u0000x","word":"z"}\n'               # \u0000 in an id
    b'{"id":"nul-esc-word","word":"a\\u0000b"}\n'
    b'{"id":"bad-utf8","word":"\xc3\x28"}\n'
    b'{"id":"surrogate","word":"\xed\xa0\x80"}\n'
    b'{"id":"lone-esc","word":"\\ud800"}\n'                # lone surrogate
    b'{"id":"crlf-1","word":"beta"}\r\n'
    b'{"id":"cr-mid","word":"a\rb"}\n'
    b'{"id":"lead0","word":"x","n":01}\n'
    b'{"id":"nan","word":"x","n":NaN}\n'
    b'{"id":"inf","word":"x","n":Infinity}\n'
    b'{"id":"dup-key","id":"dup-key-2","word":"x"}\n'
    b'{"word":"dup","word":"dup2"}\n'                      # bad_id, repeat
    b'{"id":1.5,"word":"x","word":"y"}\n'
    b'{"id":"vt","word":"x"}\x0b\n'                        # non-JSON space
    b'\x0c{"id":"ff","word":"x"}\n'
    b'{"id":"nbsp","word":"x"}\xc2\xa0\n'
    b'{"id":"big","n":1e400,"word":"x"}\n'
    b'{"id":"ok-2","word":"fine"}\n'
)


def outputs_of_corpus(tag, corpus, handler=None):
    """Runs corpus through run (memory and --state), dlq list, export,
    stats, --stats; returns {what: bytes}."""
    h = ["--handler", handler] if handler else []
    res = {}
    out, dlq, st = path(tag + ".out"), path(tag + ".dlq"), path(tag + ".st")
    rc, o, err = run(["run", "-q"] + h + ["--dlq", dlq, "--stats", st,
                                          corpus])
    assert rc in (0, 1), (rc, err)
    res["memory stdout"] = o
    res["memory --dlq"] = read_bytes(dlq) if os.path.exists(dlq) else b""
    res["memory --stats"] = read_bytes(st)
    db = path(tag + ".db")
    rm_state(db)
    rc, _, err = run(["run", "-q"] + h + ["--state", db, "-o", out, "--dlq",
                                          dlq, "--stats", st, corpus])
    assert rc in (0, 1), (rc, err)
    res["durable -o"] = read_bytes(out)
    res["durable --dlq"] = read_bytes(dlq) if os.path.exists(dlq) else b""
    res["durable --stats"] = read_bytes(st)
    for args in (["dlq", "list"], ["export"], ["stats"]):
        rc, o, err = run(args + ["--state", db])
        assert rc == 0, (args, err)
        res[" ".join(args)] = o
    rc, o, err = run(["dlq", "show", "1", "--state", db])
    res["dlq show"] = o
    return res


@test
def every_output_line_is_strict_json_bad_corpus():
    """onceq gen --bad through every writer: each line of each output is
    strict JSON (UTF-8, no NaN/Infinity, no repeated key)."""
    corpus = path("bad.jsonl")
    rc, _, err = run(["gen", "--bad", "-o", corpus])
    assert rc == 0, err
    for handler in (None, "count:word"):
        for what, data in outputs_of_corpus("bad", corpus, handler).items():
            check_json_lines(data, f"{handler} {what}")


@test
def every_output_line_is_strict_json_odd_bytes():
    """Odd bytes: a BOM in the middle, raw control bytes in strings, \\u0000
    in ids, invalid UTF-8, CRLF, non-JSON whitespace, repeated keys. (Some
    cases need the strict decoder of json.c.)"""
    corpus = write("odd.jsonl", ODD_BYTES)
    n = 0
    for handler in (None, "count:word"):
        for what, data in outputs_of_corpus("odd", corpus, handler).items():
            n += check_json_lines(data, f"{handler} {what}")
    assert n > 0


@test
def a_handler_error_with_odd_bytes_is_a_json_string():
    """exec's error text (its stderr) is arbitrary bytes: still JSON, also
    in the history of a redriven dead letter."""
    corpus = write("he.jsonl", b'{"id":"e1","word":"x"}\n')
    h = "exec:printf 'bad \\001\\377 \"q\" \\\\ \\n' >&2; exit 1"
    db = path("he.db")
    rm_state(db)
    dlq = path("he.dlq")
    rc, _, err = run(["run", "-q", "--handler", h, "--dlq", dlq, corpus])
    assert rc == 1, err
    check_json_lines(read_bytes(dlq), "memory dlq")
    rc, _, err = run(["run", "-q", "--handler", h, "--state", db, "--dlq",
                      dlq, corpus])
    assert rc == 1, err
    assert run(["dlq", "redrive", "--state", db])[0] == 0
    rc, _, err = run(["run", "-q", "--handler", h, "--state", db, "--dlq",
                      dlq, corpus])
    assert rc == 1, err
    data = read_bytes(dlq)
    check_json_lines(data, "durable dlq")
    assert b'"history"' in data
    check_json_lines(run(["dlq", "list", "--state", db])[1].encode(),
                     "dlq list")


# ------------------------------------------------- 11: count:count

@test
def count_of_a_field_named_count_repeats_no_key():
    corpus = write("cc.jsonl", '{"id":"1","count":"red"}\n'
                   '{"id":"2","count":"red"}\n{"id":"3","count":"blue"}\n'
                   '{"id":"4","value":"v","count":"blue"}\n')
    want = ('{"value":"blue","count":2}\n{"value":"red","count":2}\n')
    rc, out, err = run(["run", "-q", "--handler", "count:count", corpus])
    assert rc == 0 and out == want, (rc, out, err)
    check_json_lines(out, "count:count")
    db = path("cc.db")
    rm_state(db)
    rc, out, err = run(["run", "-q", "--handler", "count:count", "--state",
                        db, corpus])
    assert rc == 0 and out == want, (rc, out, err)
    assert run(["export", "--state", db])[1] == want
    # Any other field keeps its name.
    rc, out, err = run(["run", "-q", "--handler", "count:value", corpus])
    assert out == '{"value":"v","count":1}\n', out


# ---------------------------------------- 5: a growing input, dead letter

@test
def a_partial_last_line_completed_as_a_duplicate_leaves_no_dead_letter():
    f, db = path("gr.jsonl"), path("gr.db")
    dlq, st = path("gr.dlq"), path("gr.st")
    rm_state(db)
    first = b'{"id":"1","text":"a b"}\n'
    open(f, "wb").write(first + first[:9])      # the writer is mid-line
    rc, _, err = run(["run", "-q", "--state", db, "--dlq", dlq, f])
    assert rc == 1, (rc, err)
    open(f, "ab").write(first[9:])              # the line: a duplicate
    rc, out, err = run(["run", "-q", "--state", db, "--dlq", dlq, "--stats",
                        st, f])
    assert rc == 0, (rc, err)
    assert not os.path.exists(dlq)
    s = state_stats(db)
    assert (s["processed"], s["dead"]) == (1, 0), s
    assert run(["dlq", "list", "--state", db])[1] == ""
    rc, _, err = run(["run", "-q", "--state", db, "--dlq", dlq, f])
    assert rc == 0, (rc, err)


@test
def a_failed_last_line_read_again_stays_dead():
    """The other side: a last line without newline that failed for good is
    read again at each run as a duplicate of itself: it stays dead."""
    f, db, dlq = path("fl.jsonl"), path("fl.db"), path("fl.dlq")
    rm_state(db)
    open(f, "wb").write(b'{"id":"1","w":"a"}\n{"id":"p","poison":1}')
    h = 'exec:read l; case "$l" in *poison*) exit 1;; esac; echo "$l"'
    for _ in range(2):
        rc, _, err = run(["run", "-q", "--handler", h, "--state", db,
                          "--dlq", dlq, "-o", os.devnull, f])
        assert rc == 1, (rc, err)
        assert open(dlq).read().count("\n") == 1
    con = sqlite3.connect(db)
    assert con.execute("SELECT id, reason FROM dead_letters").fetchall() == \
        [("p", "failed")]
    con.close()


# ------------------------------------------- 6: read error mid-run

@test
def a_read_error_after_some_input_exits_3_not_2():
    """/proc/self/mem opens and stats as a regular file but read() at offset
    0 fails (EIO): the first input was processed, so not exit 2."""
    if not os.path.exists("/proc/self/mem"):
        return
    f = write("re.jsonl", '{"id":"1","word":"a"}\n{"id":"2","word":"b"}\n')
    rc, out, err = run(["run", "-q", f, "/proc/self/mem"])
    assert rc == 3, (rc, out, err)
    assert "read error" in err and "/proc/self/mem" in err, err
    assert out == '{"word":"a","count":1}\n{"word":"b","count":1}\n', out
    db = path("re.db")
    rm_state(db)
    rc, out, err = run(["run", "-q", "--state", db, f, "/proc/self/mem"])
    assert rc == 3 and "read error" in err, (rc, err)
    assert state_stats(db)["processed"] == 2
    # Unreadable before anything runs: still 2.
    rc, out, err = run(["run", "-q", f, path("no-such-file")])
    assert rc == 2, (rc, err)


# ------------------------------------------ 7: kill -9, exec children

@test
def exec_children_inherit_only_stdin_stdout_stderr():
    """Every descriptor onceq opens (state, lock, inputs, outputs opened at
    the start) is close-on-exec: an exec child has 0, 1 and 2 only, and
    its heartbeat pipe (ONCEQ_HEARTBEAT_FD, 3)."""
    f = gen("fd.jsonl", "--events", "4")
    db = path("fd.db")
    out = path("fd.out")
    leaked = set()
    for extra in ([], ["--state", db]):
        rm_state(db)
        # A simple command: spawned without a shell, so ls lists what it
        # got from onceq (and fd 3, its own listing of /proc/self/fd).
        rc, _, err = run(["run", "-q", "--handler", "exec:ls -l /proc/self/fd",
                          "-o", out, "--dlq", path("fd.dlq"), "--stats",
                          path("fd.st"), f] + extra)
        assert rc == 0, (rc, err)
        for line in open(out):
            m = re.search(r" (\d+) -> (.*)$", line)
            if m and int(m.group(1)) > 2 and "/fd" not in m.group(2) \
                    and not (int(m.group(1)) == 3 and "pipe:" in m.group(2)):
                leaked.add((int(m.group(1)), m.group(2)))
    assert not leaked, sorted(leaked)


@test
def a_rerun_right_after_kill_9_is_not_refused():
    """kill -9 a durable exec run and start again at once: the lock went
    with the process (an exec child being spawned must not hold it)."""
    f = gen("k9.jsonl", "--events", "1500", "--seed", "9")
    db = path("k9.db")
    rm_state(db)
    h = "exec:cat"
    args = [ONCEQ, "run", "-q", "-w", "8", "--handler", h, "--state", db,
            "-o", path("k9.out"), "--dlq", path("k9.dlq"), f]
    refused = 0
    rounds = 8 if SLOW else 20
    for i in range(rounds):
        p = subprocess.Popen(args, cwd=TMP, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(0.15 + 0.01 * i)
        p.send_signal(signal.SIGKILL)
        p.wait()
        q = subprocess.run(args[:-1] + ["--stats", path("k9.st"), f],
                           cwd=TMP, capture_output=True, timeout=300,
                           input=None)
        if q.returncode == 2 and b"in use" in q.stderr:
            refused += 1
        else:
            assert q.returncode == 0, q.stderr
        rm_state(db)
    assert refused == 0, f"{refused} of {rounds} reruns refused"


# ---------------------------------------------- 8: outputs vs state

@test
def an_output_on_the_state_or_an_input_is_refused():
    f = gen("cf.jsonl", "--events", "30")
    db = path("cf.db")
    rm_state(db)
    assert run(["run", "-q", "--state", db, f])[0] == 0
    before = read_bytes(db)
    os.link(f, path("cf-hard.jsonl"))
    os.symlink(db, path("cf-sym.db"))
    cases = [["-o", db], ["--dlq", db], ["--stats", db],
             ["-o", db + "-wal"], ["--dlq", db + "-shm"],
             ["--stats", db + ".lock"], ["-o", f], ["--dlq", f],
             ["-o", path("cf-hard.jsonl")], ["-o", path("cf-sym.db")],
             ["-o", os.path.join(TMP, ".", "sub", "..", "cf.db")],
             ["-o", path("x.out"), "--stats", path("x.out")]]
    os.makedirs(path("sub"), exist_ok=True)
    for extra in cases:
        rc, out, err = run(["run", "-q", "--state", db] + extra + [f])
        assert rc == 2 and err.count("\n") == 1, (extra, rc, err)
        assert "onceq run:" in err, err
        assert read_bytes(db) == before, extra
    assert state_stats(db)["processed"] == 30
    # A state that does not exist yet, named two ways.
    new = path("cf-new.db")
    rm_state(new)
    rc, out, err = run(["run", "-q", "--state", new, "-o",
                        os.path.join(TMP, "sub", "..", "cf-new.db"), f])
    assert rc == 2 and not os.path.exists(new), (rc, err)
    # In memory: an output on an input.
    data = read_bytes(f)
    for extra in (["-o", f], ["--stats", path("cf-hard.jsonl")]):
        rc, out, err = run(["run", "-q"] + extra + [f])
        assert rc == 2, (extra, rc, err)
        assert read_bytes(f) == data
    with open(f, "rb") as stdin:
        p = subprocess.run([ONCEQ, "run", "-q", "-o", f], stdin=stdin,
                           capture_output=True, cwd=TMP)
    assert p.returncode == 2 and read_bytes(f) == data, p.stderr


# ------------------------------------- 9: outputs opened before the run

@test
def an_unwritable_output_is_refused_before_anything_runs():
    f = gen("uw.jsonl", "--events", "5")
    marker = path("uw.ran")
    h = f"exec:cat >/dev/null; touch {marker}; echo {{}}"
    bad = os.path.join(TMP, "no-such-dir", "x")
    db = path("uw.db")
    for state in ([], ["--state", db]):
        for opt in ("-o", "--dlq", "--stats"):
            rm_state(db)
            if os.path.exists(marker):
                os.unlink(marker)
            t0 = time.time()
            rc, out, err = run(["run", "-q", "--handler", h, opt, bad, f] +
                               state)
            assert rc == 2, (state, opt, rc, err)
            assert bad in err and err.count("\n") == 1, err
            assert not os.path.exists(marker), (state, opt)


# --------------------------------------------------- 12: leftovers

@test
def a_clean_memory_run_removes_an_old_dead_letter_file():
    bad = write("cl-bad.jsonl", '{"id":"1","word":"a"}\nnot json\n')
    good = write("cl-good.jsonl", '{"id":"1","word":"a"}\n')
    d = path("cl")
    os.makedirs(d, exist_ok=True)
    assert run(["run", "-q", bad], cwd=d)[0] == 1
    assert os.path.exists(os.path.join(d, "onceq-dlq.jsonl"))
    assert run(["run", "-q", good], cwd=d)[0] == 0
    assert not os.path.exists(os.path.join(d, "onceq-dlq.jsonl"))


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@test
def temp_files_of_a_killed_run_are_cleaned():
    f = gen("tf.jsonl", "--events", "20")
    d = path("tf")
    os.makedirs(d, exist_ok=True)
    out, st = os.path.join(d, "r.out"), os.path.join(d, "r.st")
    gone = dead_pid()
    live = os.getpid()
    stale = [f"{out}.tmp.{gone}", f"{st}.tmp.{gone}",
             os.path.join(d, f"onceq-dlq.jsonl.tmp.{gone}")]
    keep = [f"{out}.tmp.{live}", f"{out}.tmp.x{gone}"]
    db = os.path.join(d, "r.db")
    for state in ([], ["--state", db]):
        for p in stale + keep:
            open(p, "w").write("partial")
        rc, _, err = run(["run", "-q", "-o", out, "--stats", st, f] + state,
                         cwd=d)
        assert rc == 0, err
        left = sorted(x for x in os.listdir(d) if ".tmp." in x)
        assert left == sorted(os.path.basename(k) for k in keep), left


@test
def state_totals_balance_after_stdin_input():
    f = gen("sb.jsonl", "--events", "200", "--duplicates", "0.2", "--seed",
            "3")
    data = read_bytes(f) + b"\n\nnot json\n"
    db = path("sb.db")
    rm_state(db)
    st = path("sb.st")
    rc, _, err = run(["run", "-q", "--state", db, "--stats", st, "-o",
                      os.devnull], stdin=data)
    assert rc == 1, err
    r = json.load(open(st))
    s = state_stats(db)
    assert balanced(s), s
    for k in ("lines", "processed", "duplicates", "dead", "blank"):
        assert s[k] == r[k], (k, s, r)


@test
def state_totals_balance_after_an_interrupted_run():
    f = gen("ib.jsonl", "--events", "3000", "--duplicates", "0.3", "--seed",
            "4")
    db = path("ib.db")
    rm_state(db)
    args = [ONCEQ, "run", "-q", "-w", "4", "--handler",
            "exec:cat", "--state", db, "-o", os.devnull, f]
    p = subprocess.Popen(args, cwd=TMP, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    time.sleep(0.6)
    p.kill()
    p.wait()
    s = state_stats(db)
    assert balanced(s), s
    rc, _, err = run(args[1:])
    assert rc == 0, err
    s = state_stats(db)
    assert balanced(s) and s["processed"] > 0, s


@test
def an_output_through_a_symlink_keeps_the_link():
    """-o LINK writes what the link names, in place: renaming a temp file
    over the path would replace the link itself (with -o /dev/stdout, the
    system's /dev/stdout)."""
    f = gen("link-in.jsonl", "--events", "20")
    target, link = path("link-target.out"), path("link.out")
    open(target, "w").write("old\n")
    os.symlink(target, link)
    rc, out, err = run(["run", "-q", "-o", link, f])
    assert rc == 0, err
    assert os.path.islink(link), "the link was replaced"
    assert "old" not in open(target).read() and open(target).read(), \
        open(target).read()
    # A link to this process's fd 1 (what /dev/stdout is), stdout a file.
    fd1 = path("fd1.link")
    os.symlink("/proc/self/fd/1", fd1)
    sink = path("fd1.out")
    with open(sink, "w") as so:
        p = subprocess.run([ONCEQ, "run", "-q", "-o", fd1, f], stdout=so,
                           stderr=subprocess.PIPE, timeout=60)
    assert p.returncode == 0, p.stderr
    assert os.path.islink(fd1)
    assert open(sink).read().count("count") > 0


@test
def dlq_list_and_show_report_a_write_error():
    """`onceq dlq list/show` on a full disk: exit 3 and a message, not 0."""
    if not os.path.exists("/dev/full"):
        return
    f = write("wb.jsonl", '{"id":"1"}\n{bad\n')
    db = path("wb.db")
    rc, out, err = run(["run", "-q", "--state", db, "-o", "/dev/null",
                        "--dlq", "/dev/null", f])
    assert rc == 1, err
    for args in (["dlq", "list", "--state", db],
                 ["dlq", "show", "1", "--state", db]):
        with open("/dev/full", "w") as full:
            p = subprocess.run([ONCEQ] + args, stdout=full,
                               stderr=subprocess.PIPE, timeout=60)
        assert p.returncode == 3, (args, p.returncode)
        # With its cause.
        assert b"write error" in p.stderr and \
            b"No space left on device" in p.stderr, p.stderr
    # A failed write long before the end: its errno was gone by then
    # ("unknown error").
    big = gen("wb-big.jsonl", "--events", "50000")
    with open("/dev/full", "w") as full:
        p = subprocess.run([ONCEQ, "run", "-q", "--handler", "noop",
                            "--emit", big], stdout=full,
                           stderr=subprocess.PIPE, timeout=120)
    assert p.returncode == 3 and b"No space left on device" in p.stderr, \
        p.stderr


@test
def export_over_the_state_is_refused_and_export_is_whole():
    """`onceq export -o` the state (or a side file) would empty it, and the
    next run would apply every event again: refused (exit 2), the state
    untouched; a failed export leaves the previous file as it was."""
    f = gen("ex.jsonl", "--events", "40", "--duplicates", "0.2")
    db = path("ex.db")
    rm_state(db)
    assert run(["run", "-q", "--state", db, "-o", "/dev/null", f])[0] == 0
    before = read_bytes(db)
    for out in (db, db + "-wal", db + ".lock", path("ex-sym.db")):
        if out.endswith("sym.db") and not os.path.lexists(out):
            os.symlink(db, out)
        rc, _, err = run(["export", "--state", db, "-o", out])
        assert rc == 2 and "state" in err and err.count("\n") == 1, \
            (out, rc, err)
        assert read_bytes(db) == before, out
    rc, out, err = run(["run", "--state", db, "-o", "/dev/null",
                        "--stats", "-", "-q", f])
    assert rc == 0 and json.loads(out)["processed"] == 0, (rc, out, err)
    good = path("ex.out")
    assert run(["export", "--state", db, "-o", good])[0] == 0
    exported = read_bytes(good)
    assert exported and [json.loads(x) for x in exported.splitlines()]
    # A stale state (not an onceq file) fails the export: the old file
    # stays whole, no temporary file is left.
    write("ex-not.db", "")
    sqlite3.connect(path("ex-not.db")).execute("CREATE TABLE t(x)").close()
    rc, _, err = run(["export", "--state", path("ex-not.db"), "-o", good])
    assert rc != 0 and read_bytes(good) == exported, (rc, err)
    assert not [n for n in os.listdir(TMP) if n.startswith("ex.out.tmp")]


def closed_fd_run(args, closed, **kw):
    """Runs onceq with descriptor `closed` (1 or 2) closed."""
    return subprocess.run([ONCEQ] + args, cwd=TMP, timeout=120,
                          pass_fds=(), close_fds=True,
                          preexec_fn=lambda: os.close(closed), **kw)


@test
def a_closed_stdout_or_stderr_takes_no_output_file():
    """With stdout closed, the first file onceq opens would get descriptor
    1: results "to stdout" landed in the dead-letter file (exit 0 when
    there were none). Now writing results to a closed stdout is a write
    error (exit 3) and the dead-letter file holds only dead letters; with
    stderr closed, --progress does not land in the results."""
    bad = gen("cl-bad.jsonl", "--bad")
    dlq = path("cl.dlq")
    p = closed_fd_run(["run", "-q", "--dlq", dlq, bad], 1,
                      stderr=subprocess.PIPE)
    assert p.returncode == 3 and b"write error" in p.stderr and \
        b"Bad file descriptor" in p.stderr, p
    data = read_bytes(dlq)
    check_json_lines(data, "dead letters")
    lines = [json.loads(x) for x in data.splitlines()]
    assert lines and all("reason" in x for x in lines), lines[:3]
    good = gen("cl-good.jsonl", "--events", "20000")
    out = path("cl.out")
    p = closed_fd_run(["run", "--progress", "-o", out, good], 2,
                      stdout=subprocess.PIPE)
    assert p.returncode == 0, p
    data = read_bytes(out)
    check_json_lines(data, "results")
    rc, want, err = run(["run", "-q", good])
    assert rc == 0 and data == want.encode(), (rc, err)


@test
def a_purge_keeps_the_lifetime_totals():
    """`onceq dlq purge` removed dead letters and with them their lines
    from `onceq stats`' lifetime totals (lines 2, then 1); now they count
    as purged and lines stays."""
    f = write("pg.jsonl", '{"id":"a","word":"x"}\n{"id":"b","word":"y"}\n')
    db = path("pg.db")
    rm_state(db)
    rc, _, err = run(["run", "-q", "--state", db, "--handler", "exec:exit 75",
                      "--max-attempts", "2", "--backoff", "1ms", "-o",
                      "/dev/null", "--dlq", "/dev/null", f])
    assert rc == 1, (rc, err)
    before = state_stats(db)
    assert before["lines"] == 2 and before["dead"] == 2, before
    # A time as `dlq list` writes it (with milliseconds) is taken back by
    # --since and --until (it was refused).
    rc, out, err = run(["dlq", "list", "--state", db])
    t = json.loads(out.splitlines()[-1])["last_seen"]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", t), t
    rc, since, err = run(["dlq", "list", "--state", db, "--since", t])
    assert rc == 0 and t in since, (rc, since, err)
    rc, until, err = run(["dlq", "list", "--state", db, "--until", t])
    assert rc == 0 and t not in until, (rc, until, err)
    rc, out, err = run(["dlq", "purge", "--state", db, "--id", "a"])
    assert rc == 0 and "purged 1" in out, (rc, out, err)
    after = state_stats(db)
    assert after["lines"] == 2 and after["dead"] == 1 and \
        after["purged"] == 1 and balanced(after), after
    # A purge --dry-run counts nothing.
    run(["dlq", "purge", "--state", db, "--dry-run"])
    assert state_stats(db)["purged"] == 1


def main():
    return suite.run(TMP)


if __name__ == "__main__":
    sys.exit(main())
