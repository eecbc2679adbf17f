#!/usr/bin/env python3
"""Description: end-to-end tests of durable mode (`onceq run --state`) and
its subcommands, on the real binary. The crash loop proves invariant 5 of
the design: kill -9 a durable run at any moment, run it again with the same
state and inputs, and the results and the set of dead letters equal those of
one clean in-memory run. Prints "N passed, N failed".

Environment: ONCEQ (the binary; default ./onceq), BUILD (a sanitizer build
runs fewer crash iterations on a smaller file: 50 iterations in the normal
build, 12 under TSAN/ASAN), OQ_CRASH_ITERS (overrides the iteration count;
`make stress` sets it), OQ_DURABLE_SEED (default: time). The handler is a
small plugin this test compiles with cc: it counts words (or emits records),
fails transiently on the first attempt of "transient" events and for good on
"poison" events."""
import json
import os
import random
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
SEED = int(os.environ.get("OQ_DURABLE_SEED", str(int(time.time()) % 100000)))
ITERS = int(os.environ.get("OQ_CRASH_ITERS", "12" if SLOW else "50"))
HERE = os.path.dirname(os.path.abspath(__file__))
TMP = tempfile.mkdtemp(prefix="onceq-durable-test-")
print(f"test_durable: seed {SEED} (OQ_DURABLE_SEED), {ITERS} crash "
      f"iterations (OQ_CRASH_ITERS), binary {ONCEQ}")

suite = Suite()
test = suite.test
tests = suite.tests


def path(name):
    return os.path.join(TMP, name)


def run(args, env=None, timeout=300):
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([ONCEQ] + args, capture_output=True, timeout=timeout,
                       cwd=TMP, env=e)
    return p.returncode, p.stdout.decode("utf-8", "replace"), \
        p.stderr.decode("utf-8", "replace")


def gen(name, *args):
    rc, out, err = run(["gen", "-o", path(name)] + list(args))
    assert rc == 0, err
    return path(name)


def rm_state(db):
    for suffix in ("", "-wal", "-shm", ".lock"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)


def dead_set(p):
    if not os.path.exists(p):
        return set()
    with open(p, "rb") as f:
        return {(d.get("id"), d["reason"]) for d in map(json.loads, f)}


PLUGIN_C = r"""
#define _GNU_SOURCE
#include "onceq.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int oq_plugin_output = 0;
const char *oq_plugin_count_key = "word";

int oq_plugin_init(void **arg)
{
    const char *m = getenv("PLUGIN_RECORDS");
    if (m && *m == '1')
        oq_plugin_output = 1;
    *arg = NULL;
    return 0;
}

int oq_plugin_handle(const oq_event *ev, oq_txn *txn, void *arg)
{
    const char *p = ev->payload, *w, *end;
    size_t n = ev->payload_len;
    char buf[2048];
    (void)arg;
    if (memmem(p, n, "\"poison\":true", 13) && !getenv("PLUGIN_FIXED")) {
        oq_txn_error(txn, "poison %.*s", (int)ev->id_len, ev->id);
        return OQ_FAIL;
    }
    if (memmem(p, n, "\"hold\":true", 11) && getenv("PLUGIN_HOLD"))
        sleep(60);
    if (memmem(p, n, "\"transient\":true", 16) && ev->attempt == 1 &&
        !getenv("PLUGIN_UP")) {
        oq_txn_error(txn, "transient");
        return OQ_RETRY;
    }
    w = memmem(p, n, "\"word\":\"", 8);
    if (w == NULL)
        return OQ_OK;
    w += 8;
    end = memchr(w, '"', (size_t)(p + n - w));
    if (end == NULL)
        return OQ_OK;
    if (oq_plugin_output == 0)
        return oq_txn_count(txn, w, (size_t)(end - w), 1) ? OQ_RETRY : OQ_OK;
    n = (size_t)snprintf(buf, sizeof(buf), "{\"id\":\"%.*s\",\"word\":\"%.*s\"}",
                         (int)ev->id_len, ev->id, (int)(end - w), w);
    return oq_txn_record(txn, buf, n) ? OQ_RETRY : OQ_OK;
}
"""

PLUGIN = path("crash_plugin.so")


def build_plugin():
    src = path("crash_plugin.c")
    open(src, "w").write(PLUGIN_C)
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-I",
                    os.path.join(HERE, "..", "include"), "-o", PLUGIN, src],
                   check=True)


def run_args(db, out, dlq, f, extra=()):
    args = ["run", "-q", "--handler", "plugin:" + PLUGIN, "--backoff",
            "1ms,5ms", "-o", out, "--dlq", dlq] + list(extra)
    if db:
        args += ["--state", db]
    return args + [f]


def reference(f, env, tag):
    out, dlq = path(tag + ".ref.out"), path(tag + ".ref.dlq")
    rc, _, err = run(run_args(None, out, dlq, f), env)
    assert rc in (0, 1), err
    return open(out, "rb").read(), dead_set(dlq)


# ------------------------------------------------------------ crash loop

@test
def crash_loop_equals_one_clean_run():
    """kill -9 at a random moment (once or twice), then run to the end:
    results and dead letters equal one clean in-memory run's."""
    n = 4000 if SLOW else 20000
    f = gen("crash.jsonl", "--events", str(n), "--duplicates", "0.1",
            "--poison", "0.01", "--transient", "0.05", "--words", "200",
            "--seed", str(SEED))
    refs = {m: reference(f, {"PLUGIN_RECORDS": m}, "crash" + m)
            for m in ("0", "1")}
    # How long a whole durable run takes: kills fall within it.
    db = path("crash-time.db")
    t0 = time.time()
    rc, _, err = run(run_args(db, path("t.out"), path("t.dlq"), f))
    span = time.time() - t0
    assert rc in (0, 1), err
    failures = []
    phase = {"before the first commit": 0, "mid-run": 0, "after the end": 0}

    def progress(db):
        """Where the last kill struck, from what the state holds."""
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            line = con.execute("SELECT coalesce(sum(line), 0) FROM "
                               "sources").fetchone()[0]
            con.close()
        except sqlite3.Error:
            line = 0
        return "before the first commit" if line == 0 else \
            "after the end" if line == n else "mid-run"

    for i in range(ITERS):
        rnd = random.Random(SEED * 1000 + i)
        mode = "1" if i % 3 == 2 else "0"   # a third with record outputs
        env = {"PLUGIN_RECORDS": mode}
        extra = ["-w", str(rnd.choice([1, 2, 4])), "--commit-batch",
                 str(rnd.choice([1, 16, 256])), "--commit-interval",
                 rnd.choice(["1ms", "5ms"])]
        db, out, dlq = path("c.db"), path("c.out"), path("c.dlq")
        rm_state(db)
        kills = []
        for k in range(rnd.choice([1, 1, 2])):
            t = rnd.uniform(0, span)
            e = dict(os.environ)
            e.update(env)
            p = subprocess.Popen([ONCEQ] + run_args(db, out, dlq, f, extra),
                                 cwd=TMP, env=e, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            time.sleep(t)
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills.append(round(t, 4))
        phase[progress(db)] += 1
        rc, _, err = run(run_args(db, out, dlq, f, extra), env)
        want_out, want_dead = refs[mode]
        why = None
        if rc not in (0, 1):
            why = f"exit {rc}: {err.strip()}"
        elif open(out, "rb").read() != want_out:
            why = "results differ"
        elif dead_set(dlq) != want_dead:
            why = (f"dead letters differ: extra {dead_set(dlq) - want_dead}, "
                   f"missing {want_dead - dead_set(dlq)}")
        if why:
            failures.append(f"iteration {i} (seed {SEED}, kill times "
                            f"{kills} s, {' '.join(extra)}, records={mode}): "
                            f"{why}")
    print(f"  kills struck: {phase} (whole run {span:.3f} s)")
    assert not failures, "\n".join(failures)
    # The kills must mostly land inside the runs, or this proves little.
    assert phase["mid-run"] >= max(1, ITERS // 8), phase


# ------------------------------------------------------------- resume

@test
def resume_skips_settled_lines_without_reading_them():
    f = gen("resume.jsonl", "--events", "1000", "--duplicates", "0.1",
            "--seed", str(SEED + 1))
    db = path("resume.db")
    rc, out1, err = run(["run", "-q", "--state", db, "--stats",
                         path("r1.st"), f])
    assert rc == 0, err
    # Appending to the file keeps its identity: the rerun reads only the
    # new lines.
    more = gen("more.jsonl", "--events", "300", "--seed", str(SEED + 2))
    with open(f, "ab") as a:
        a.write(open(more, "rb").read().replace(b'"evt-', b'"new-'))
    rc, out2, err = run(["run", "-q", "--state", db, "--stats",
                         path("r2.st"), f])
    assert rc == 0, err
    st = json.load(open(path("r2.st")))
    assert st["resumed_skipped_lines"] == 1000, st
    assert st["lines"] == 300 and st["processed"] + st["duplicates"] == 300
    rc, ref, err = run(["run", "-q", f])
    assert out2 == ref, "results after resume differ from one clean run"
    # A finished run, run again: nothing read, the same results.
    rc, out3, err = run(["run", "-q", "--state", db, "--stats",
                         path("r3.st"), f])
    st = json.load(open(path("r3.st")))
    assert rc == 0 and out3 == ref, err
    assert (st["resumed_skipped_lines"], st["lines"], st["processed"]) == \
        (1300, 0, 0), st


@test
def changed_input_is_refused_unless_forced():
    f = gen("chg.jsonl", "--events", "200", "--seed", str(SEED + 3))
    db = path("chg.db")
    rc, _, err = run(["run", "-q", "--state", db, "-o", path("chg.out"), f])
    assert rc == 0, err
    # Truncated in place (same inode, shorter).
    data = open(f, "rb").read()
    with open(f, "r+b") as h:
        h.truncate(100)
    rc, out, err = run(["run", "--state", db, f])
    assert rc == 2 and "shorter" in err, (rc, err)
    assert err.count("\n") == 1 and out == "", err
    open(f, "wb").write(data)
    # Replaced by another file (a new inode) with other contents.
    g = gen("chg2.jsonl", "--events", "200", "--seed", str(SEED + 4))
    os.replace(g, f)
    rc, out, err = run(["run", "--state", db, f])
    assert rc == 2 and "changed" in err and "--force" in err, (rc, err)
    rc, out, err = run(["run", "-q", "--state", db, "--force", "--stats",
                        path("chg.st"), f])
    assert rc == 0, err
    assert json.load(open(path("chg.st")))["resumed_skipped_lines"] == 0


@test
def another_handler_on_the_same_state_is_refused():
    f = gen("hnd.jsonl", "--events", "50")
    db = path("hnd.db")
    assert run(["run", "-q", "--state", db, f])[0] == 0
    want = run(["export", "--state", db])
    rc, out, err = run(["run", "--state", db, "--handler", "count:word", f])
    assert rc == 2 and "--handler" in err, (rc, err)
    # A refused run leaves the state as it was (meta output, count_key).
    rc, out, err = run(["run", "--state", db, "--handler", "noop", "--emit",
                        f])
    assert rc == 2 and "--handler" in err, (rc, err)
    assert run(["export", "--state", db]) == want


# ------------------------------------------------------------- redrive

@test
def redrive_filters_and_runs_each_event_once():
    f = gen("rd.jsonl", "--events", "2000", "--poison", "0.02", "--seed",
            str(SEED + 5))
    poison = sorted({json.loads(l)["id"] for l in open(f)
                     if '"poison":true' in l})
    db, dlq = path("rd.db"), path("rd.dlq")
    rc, _, err = run(run_args(db, path("rd.out"), dlq, f))
    assert rc == 1, err
    assert {i for i, _ in dead_set(dlq)} == set(poison)
    rc, out, err = run(["dlq", "redrive", "--state", db, "--reason",
                        "bad_id"])
    assert rc == 0 and out.startswith("redrove 0 "), (rc, out, err)
    rc, out, err = run(["dlq", "redrive", "--state", db, "--until", "@0"])
    assert out.startswith("redrove 0 "), out
    glob_ids = [i for i in poison if i.startswith("evt-1")]
    assert glob_ids, "the seed gave no poison event matching evt-1*"
    rc, out, err = run(["dlq", "redrive", "--state", db, "--id", "evt-1*",
                        "--since", "1h", "--dry-run"])
    assert out.startswith(f"would redrive {len(glob_ids)} "), out
    rc, out, err = run(["dlq", "list", "--state", db])
    assert len(out.splitlines()) == len(poison), "dry run changed nothing"
    rc, out, err = run(["dlq", "redrive", "--state", db, "--id", "evt-1*"])
    assert rc == 0 and out.startswith(f"redrove {len(glob_ids)} "), out
    rc, out, err = run(["dlq", "redrive", "--state", db, "--id", "evt-1*"])
    assert out.startswith("redrove 0 "), "a second redrive found them again"
    # Fixed handler: the redriven events are processed, once.
    env = {"PLUGIN_FIXED": "1"}
    for attempt in range(2):
        st = path(f"rd{attempt}.st")
        rc, _, err = run(run_args(db, path("rd.out"), dlq, f,
                                  ["--stats", st]), env)
        assert rc == 1, err  # the other poison events are still dead
        s = json.load(open(st))
        want = len(glob_ids) if attempt == 0 else 0
        assert (s["redriven"], s["processed"]) == (want, want), s
        # A run of redriven events alone settles events: its rate is not
        # 0 (it counted lines read, and it reads none).
        assert (s["events_per_s"] > 0) == (want > 0), s
    left = {i for i, _ in dead_set(dlq)}
    assert left == set(poison) - set(glob_ids), left
    con = sqlite3.connect(db)
    n = con.execute("SELECT count(*) FROM processed WHERE id GLOB 'evt-1*'"
                    " AND status = 0 AND id IN (%s)" %
                    ",".join("?" * len(glob_ids)), glob_ids).fetchone()[0]
    con.close()
    assert n == len(glob_ids), n


@test
def dlq_show_list_purge():
    f = path("bad.jsonl")
    open(f, "w").write('{"id":"a","word":"x"}\nnot json\n{"word":"noid"}\n')
    db = path("bad.db")
    rc, _, err = run(["run", "-q", "--state", db, "--dlq", path("bad.dlq"),
                      f])
    assert rc == 1, err
    rc, out, err = run(["dlq", "list", "--state", db])
    rows = [json.loads(l) for l in out.splitlines()]
    assert [r["reason"] for r in rows] == ["parse_error", "bad_id"], rows
    assert rows[0]["source"].endswith("bad.jsonl:2")
    rc, out, err = run(["dlq", "show", str(rows[1]["seq"]), "--state", db])
    assert rc == 0 and json.loads(out)["event"] == {"word": "noid"}, out
    rc, out, err = run(["dlq", "show", "nope", "--state", db])
    assert rc == 1 and "no dead letter" in err
    rc, out, err = run(["dlq", "purge", "--state", db, "--reason",
                        "parse_error"])
    assert out.startswith("purged 1 "), out
    rc, out, err = run(["dlq", "list", "--state", db])
    assert len(out.splitlines()) == 1


# ------------------------------------------------- subcommands, errors

@test
def export_and_stats_agree_with_the_run():
    f = gen("ex.jsonl", "--events", "3000", "--duplicates", "0.2", "--seed",
            str(SEED + 6))
    db = path("ex.db")
    rc, out, err = run(["run", "-q", "--state", db, "--stats",
                        path("ex.st"), f])
    assert rc == 0, err
    rc, exp, err = run(["export", "--state", db])
    assert rc == 0 and exp == out, err
    rc, _, err = run(["export", "--state", db, "-o", path("ex.out")])
    assert open(path("ex.out")).read() == out
    rc, s, err = run(["stats", "--state", db])
    s = json.loads(s)
    r = json.load(open(path("ex.st")))
    for k in ("lines", "processed", "duplicates", "dead", "blank"):
        assert s[k] == r[k], (k, s, r)
    assert s["last_run"]["processed"] == r["processed"]


@test
def checkpoint_and_restore():
    f = gen("ck.jsonl", "--events", "500", "--seed", str(SEED + 7))
    db = path("ck.db")
    rc, want, err = run(["run", "-q", "--state", db, f])
    rc, out, err = run(["checkpoint", "one", "--state", db])
    assert rc == 0 and os.path.exists(db + ".checkpoint.one"), err
    con = sqlite3.connect(db)
    con.execute("DELETE FROM aggregates")
    con.commit()
    con.close()
    assert run(["export", "--state", db])[1] == ""
    rc, out, err = run(["restore", "one", "--state", db])
    assert rc == 0, err
    assert run(["export", "--state", db])[1] == want
    rc, out, err = run(["restore", "two", "--state", db])
    assert rc == 2 and "no checkpoint" in err


@test
def a_running_state_is_locked():
    """A run holds the state's lock for its whole life: a second run,
    restore, dlq redrive and dlq purge refuse with exit status 2."""
    f = gen("lk.jsonl", "--events", "50", "--seed", str(SEED + 9))
    db = path("lk.db")
    assert run(["run", "-q", "--state", db, f])[0] == 0
    assert run(["checkpoint", "one", "--state", db])[0] == 0
    p = subprocess.Popen([ONCEQ, "run", "-q", "--state", db, "-o",
                          os.devnull, "-"], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         cwd=TMP)
    try:
        p.stdin.write(b'{"id":"lk-1","word":"x"}\n')
        p.stdin.flush()
        deadline = time.time() + 30
        while time.time() < deadline:  # it holds the lock from its start
            con = sqlite3.connect(db)
            n = con.execute("SELECT count(*) FROM processed WHERE id = "
                            "'lk-1'").fetchone()[0]
            con.close()
            if n == 1:
                break
            time.sleep(0.05)
        msg = f"state '{db}' is in use by another onceq run"
        for args in (["restore", "one", "--state", db],
                     ["run", "-q", "--state", db, f],
                     ["dlq", "redrive", "--state", db],
                     ["dlq", "purge", "--state", db]):
            rc, out, err = run(args)
            assert rc == 2 and err.count("\n") == 1 and msg in err, \
                (args, rc, err, p.poll())
        # Reading is fine meanwhile.
        for args in (["stats", "--state", db], ["dlq", "list", "--state", db],
                     ["dlq", "purge", "--dry-run", "--state", db]):
            rc, out, err = run(args)
            assert rc == 0, (args, rc, err)
    finally:
        p.stdin.close()
        p.wait(60)
    assert p.returncode == 0, p.stderr.read()
    assert run(["restore", "one", "--state", db])[0] == 0
    assert run(["run", "-q", "--state", db, f])[0] == 0


@test
def a_last_line_without_newline_is_read_again():
    """The watermark stays before a last line without a newline: the file
    may grow, and a rerun reads the whole line again."""
    f, db = path("pl.jsonl"), path("pl.db")
    out, dlq, st = path("pl.out"), path("pl.dlq"), path("pl.st")
    first = b'{"id":"1","text":"a"}\n'
    # Cut in the middle: a parse error now, a good event once it grew.
    open(f, "wb").write(first + b'{"id":"2","text":"b c')
    rc, _, err = run(["run", "-q", "--state", db, "-o", out, "--dlq", dlq, f])
    assert rc == 1, (rc, err)
    con = sqlite3.connect(db)
    assert con.execute("SELECT offset, line FROM sources").fetchall() == \
        [(len(first), 1)]
    con.close()
    open(f, "ab").write(b' d"}\n{"id":"3","text":"e"}\n')
    rc, _, err = run(["run", "-q", "--state", db, "-o", out, "--dlq", dlq,
                      "--stats", st, f])
    assert rc == 0 and not os.path.exists(dlq), (rc, err)
    s = json.load(open(st))
    assert (s["lines"], s["processed"], s["resumed_skipped_lines"]) == \
        (2, 2, 1), s
    assert open(out).read() == run(["run", "-q", f])[1]
    # A complete last line without a newline: processed, then a duplicate.
    f2, db2 = path("pl2.jsonl"), path("pl2.db")
    open(f2, "wb").write(first + b'{"id":"2","text":"b"}')
    assert run(["run", "-q", "--state", db2, f2])[0] == 0
    open(f2, "ab").write(b'\n')
    rc, _, err = run(["run", "-q", "--state", db2, "--stats", st, f2])
    s = json.load(open(st))
    assert rc == 0 and (s["lines"], s["duplicates"]) == (1, 1), (rc, err, s)


@test
def a_dead_letter_above_the_watermark_is_not_stale():
    """A dead letter committed above the watermark before a crash is the
    event's outcome: the rerun keeps it; a redrive runs it again."""
    f, db = path("sd.jsonl"), path("sd.db")
    out, dlq, st = path("sd.out"), path("sd.dlq"), path("sd.st")
    open(f, "w").write('{"id":"a","word":"x","hold":true}\n'
                       '{"id":"b","word":"y","transient":true}\n')
    args = run_args(db, out, dlq, f, ["-w", "2", "--max-attempts", "1"])
    p = subprocess.Popen([ONCEQ] + args, cwd=TMP, env=dict(
        os.environ, PLUGIN_HOLD="1"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                con = sqlite3.connect(db)
                n = con.execute("SELECT count(*) FROM dead_letters")\
                    .fetchone()[0]
                con.close()
                if n == 1:
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("no dead letter")
    finally:
        p.kill()
        p.wait()
    # max_attempts settled b's id as dead (one outcome per id): the rerun
    # keeps that outcome, as one clean run would have had it ...
    rc, _, err = run(args + ["--stats", st], env={"PLUGIN_UP": "1"})
    assert rc == 1, (rc, err)
    assert [(d["id"], d["reason"]) for d in map(json.loads, open(dlq))] == \
        [("b", "max_attempts")]
    assert json.load(open(st))["processed"] == 1
    # ... and a redrive gives it its fresh chance.
    rc, _, err = run(["dlq", "redrive", "--state", db])
    assert rc == 0, err
    rc, _, err = run(args + ["--stats", st], env={"PLUGIN_UP": "1"})
    assert rc == 0 and not os.path.exists(dlq), (rc, err)
    rc, out_, err = run(["stats", "--state", db])
    s = json.loads(out_)
    assert (s["processed"], s["dead"]) == (2, 0), s


@test
def explicit_stdin_is_not_tracked():
    f = gen("si.jsonl", "--events", "20")
    db = path("si.db")
    for _ in range(2):
        with open(f, "rb") as stdin:
            p = subprocess.run([ONCEQ, "run", "-q", "--state", db, "-"],
                               stdin=stdin, capture_output=True, cwd=TMP)
        assert p.returncode == 0, p.stderr
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM sources").fetchone()[0] == 0
    con.close()


@test
def dead_letters_of_earlier_generations_are_kept():
    """stdin is a new input at every run, and --force reads a file again:
    a dead letter at the same position does not replace an earlier one."""
    db = path("gen.db")
    for i in (1, 2):
        p = subprocess.run(
            [ONCEQ, "run", "-q", "--handler", "plugin:" + PLUGIN, "--state",
             db, "-o", os.devnull],
            input=b'{"id":"p%d","word":"a","poison":true}\n' % i,
            capture_output=True, cwd=TMP)
        assert p.returncode == 1, p.stderr
    f = path("gen.jsonl")
    for i in (3, 4):
        open(f, "w").write('{"id":"p%d","word":"a","poison":true}\n' % i)
        rc, _, err = run(["run", "-q", "--handler", "plugin:" + PLUGIN,
                          "--state", db, "--force", f])
        assert rc == 1, (rc, err)
    # A rerun of the same file replaces its own dead letter (one row).
    rc, _, err = run(["run", "-q", "--handler", "plugin:" + PLUGIN,
                      "--state", db, f])
    assert rc == 1, (rc, err)
    con = sqlite3.connect(db)
    dead = sorted(r[0] for r in con.execute("SELECT id FROM dead_letters"))
    marked = sorted(r[0] for r in con.execute(
        "SELECT id FROM processed WHERE status = 1"))
    con.close()
    assert dead == marked == ["p1", "p2", "p3", "p4"], (dead, marked)
    rc, out, err = run(["dlq", "list", "--state", db])
    assert rc == 0 and out.count("\n") == 4, out
    assert run(["dlq", "redrive", "--state", db])[0] == 0
    p = subprocess.run([ONCEQ, "run", "-q", "--handler", "plugin:" + PLUGIN,
                        "--state", db, "-o", os.devnull], input=b"",
                       capture_output=True, cwd=TMP,
                       env=dict(os.environ, PLUGIN_FIXED="1"))
    assert p.returncode == 0, p.stderr
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM processed WHERE status = 0")\
        .fetchone()[0] == 4
    con.close()


@test
def not_a_state_file_is_a_clear_error():
    f = gen("nf.jsonl", "--events", "10")
    open(path("rand.db"), "wb").write(random.Random(SEED).randbytes(8192))
    open(path("text.db"), "w").write("hello, world\n" * 100)
    con = sqlite3.connect(path("other.db"))
    con.execute("CREATE TABLE t(x)")
    con.commit()
    con.close()
    os.makedirs(path("dir.db"), exist_ok=True)
    for name in ("rand.db", "text.db", "other.db", "dir.db"):
        for args in (["run", "--state", path(name), f],
                     ["stats", "--state", path(name)],
                     ["dlq", "list", "--state", path(name)],
                     ["export", "--state", path(name)]):
            rc, out, err = run(args)
            assert rc == 2, (args, rc, err)
            assert err.count("\n") == 1 and "not an onceq state" in err, err
        # A mistyped path leaves nothing behind (no PATH.lock) when the
        # file is plainly not SQLite's.
        if name != "other.db":
            assert not os.path.exists(path(name + ".lock")), name
    con = sqlite3.connect(path("other.db"))
    assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    con.close()


@test
def usage_errors_exit_2_and_help_exits_0():
    db = path("usage.db")
    cases = [["dlq"], ["dlq", "frob", "--state", db], ["dlq", "list"],
             ["dlq", "list", "--state", db, "--reason", "nope"],
             ["dlq", "list", "--state", db, "--since", "yesterday-ish"],
             ["dlq", "purge", "--state", db, "--reset-attempts"],
             ["export", "--state", db, "extra"], ["checkpoint", "--state", db],
             ["checkpoint", "a/b", "--state", db], ["stats", "--bogus"],
             # SQLite's side files of a checkpoint "x", and . and ..
             ["checkpoint", "x-wal", "--state", db],
             ["checkpoint", "x-journal", "--state", db],
             ["restore", "x-shm", "--state", db],
             ["checkpoint", "..", "--state", db],
             ["run", "--state", db, "--sync", "sometimes", os.devnull],
             ["run", "--state", db, "--commit-batch", "0", os.devnull]]
    for args in cases:
        rc, out, err = run(args)
        assert rc == 2 and err.count("\n") == 1, (args, rc, err)
    for cmd in (["dlq"], ["export"], ["stats"], ["checkpoint"], ["restore"]):
        rc, out, err = run(cmd + ["--help"])
        assert rc == 0 and out.startswith("usage: onceq"), (cmd, out)
    assert "--state" in run(["run", "--help"])[1]


@test
def full_disk_during_commit_loses_nothing_acknowledged():
    # 20000 events need at least 5 transactions (each takes 4096 at most):
    # the 4th fails.
    f = gen("full.jsonl", "--events", "20000", "--duplicates", "0.1",
            "--seed", str(SEED + 8))
    db = path("full.db")
    st = path("full.st")
    rc, out, err = run(["run", "-q", "--state", db, "--commit-batch", "64",
                        "--stats", st, f],
                       env={"ONCEQ_TEST_STORE_FAIL_AFTER": "3"})
    assert rc == 3 and "disk is full" in err and "resume" in err, (rc, err)
    s = json.load(open(st))
    con = sqlite3.connect(db)
    rows = con.execute("SELECT count(*) FROM processed").fetchone()[0]
    con.close()
    # Acked as processed in that run == recorded in the state.
    assert 0 < s["processed"] == rows, (s["processed"], rows)
    rc, out, err = run(["run", "-q", "--state", db, f])
    assert rc == 0, err
    assert out == run(["run", "-q", f])[1]


@test
def a_signal_does_not_use_up_the_last_attempt():
    """SIGTERM stops a running exec: handler: a stop, not a failed attempt.
    With --max-attempts 1 the events were dead-lettered ("no attempts
    left; last error: cancelled") and a rerun skipped them; they stay
    unfinished, and the rerun processes them."""
    f = path("sig.jsonl")
    with open(f, "w") as g:
        g.write('{"id":"a"}\n{"id":"b"}\n')
    db = path("sig.db")
    rm_state(db)
    flag = path("sig.slow")
    open(flag, "w").close()
    # Slow while the flag file is there (the first run), quick after.
    h = f"exec:sh -c 'cat >/dev/null; while [ -e {flag} ]; do sleep 0.05; done'"
    p = subprocess.Popen([ONCEQ, "run", "-q", "-w", "2", "--max-attempts",
                          "1", "--handler", h, "--state", db, "-o",
                          "/dev/null", "--dlq", "/dev/null", f], cwd=TMP,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5 if not SLOW else 4)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    assert p.returncode == 143, p.returncode
    rc, out, err = run(["stats", "--state", db])
    st = json.loads(out)
    assert st["dead"] == 0 and st["last_run"]["unfinished"] == 2, st
    os.unlink(flag)
    rc, out, err = run(["run", "-q", "-w", "2", "--max-attempts", "1",
                        "--handler", h, "--state", db, "-o", "/dev/null",
                        "--dlq", "/dev/null", f])
    assert rc == 0, (rc, err)
    st = json.loads(run(["stats", "--state", db])[1])
    assert st["processed"] == 2 and st["dead"] == 0, st


def main():
    build_plugin()
    return suite.run(TMP, seed=SEED)


if __name__ == "__main__":
    sys.exit(main())
