#!/usr/bin/env python3
"""Description: end-to-end tests of request-reply in memory (`onceq run
--replies DIR`): a request (an event with "reply_to") gets exactly one reply
per settled outcome, committed with its id: "ok" with the handler's records,
"failed" for a permanent failure, "dead" when out of attempts; a duplicate
request gets the same reply again without a second effect; replies are
strict JSON and carry the correlation id unchanged; bad requests and bad
usage are refused. Drives the real binary; prints "N passed, N failed".

Environment: ONCEQ (the binary; default ./onceq), BUILD."""
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Suite  # noqa: E402

ONCEQ = os.path.abspath(os.environ.get("ONCEQ", "./onceq"))
TMP = tempfile.mkdtemp(prefix="onceq-replies-test-")

suite = Suite()
test = suite.test


def path(name):
    return os.path.join(TMP, name)


def run(args, timeout=120):
    p = subprocess.run([ONCEQ] + args, capture_output=True, timeout=timeout,
                       cwd=TMP)
    return p.returncode, p.stdout.decode("utf-8", "replace"), \
        p.stderr.decode("utf-8", "replace")


def write_events(name, events):
    with open(path(name), "w", encoding="utf-8") as f:
        for e in events:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    return path(name)


def fresh_dir(name):
    d = path(name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    return d


def replies(d, stream):
    """Every reply line of DIR/<stream>.jsonl, parsed strictly."""
    out = []
    with open(os.path.join(d, stream + ".jsonl"), "rb") as f:
        for raw in f:
            line = raw.decode("utf-8")  # strict: invalid UTF-8 raises
            out.append(json.loads(line, parse_constant=lambda c: 1 / 0))
    return out


@test
def each_request_gets_one_reply_with_its_outcome():
    corr = ['plain', 'quote " and \\ back', 'unicode é 漢 🙂', '']
    evs = []
    for i, c in enumerate(corr):
        evs.append({"id": f"r{i}", "line": f"ok {i}", "reply_to": "orders",
                    "correlation_id": c})
    # No correlation_id: the event id stands for it.
    evs.append({"id": "r-nocorr", "line": "ok x", "reply_to": "orders"})
    # Not requests: no reply.
    evs.append({"id": "plain1", "line": "ok p"})
    # A poison request, and one that keeps asking for a retry.
    evs.append({"id": "poison", "line": "fail", "reply_to": "orders",
                "correlation_id": "cp"})
    evs.append({"id": "tired", "line": "retry", "reply_to": "pay",
                "correlation_id": "ct"})
    f = write_events("one.jsonl", evs)
    d = fresh_dir("one")
    script = ("read -r l; case \"$l\" in *'\"fail\"'*) echo no >&2; exit 1;; "
              "*'\"retry\"'*) echo later >&2; exit 75;; esac; "
              "echo \"{\\\"seen\\\":1}\"")
    rc, out, err = run(["run", "--replies", d, "--handler", "exec:" + script,
                        "--max-attempts", "2", "--backoff", "1ms,2ms",
                        "--stats", path("one.stats"), "-o", path("one.out"),
                        "--dlq", path("one.dlq"), f])
    assert rc == 1, (rc, err)  # dead letters
    got = replies(d, "orders")
    by = {r["correlation_id"]: r for r in got}
    assert len(got) == len(by) == len(corr) + 2, got
    for i, c in enumerate(corr):
        r = by[c]
        assert r == {"correlation_id": c, "id": f"r{i}", "status": "ok",
                     "result": [{"seen": 1}], "attempts": 1}, r
    assert by["r-nocorr"]["id"] == "r-nocorr"
    assert by["cp"]["status"] == "failed" and "no" in by["cp"]["error"], by
    assert "result" not in by["cp"]
    pay = replies(d, "pay")
    assert len(pay) == 1 and pay[0]["status"] == "dead", pay
    assert pay[0]["correlation_id"] == "ct" and "later" in pay[0]["error"]
    st = json.load(open(path("one.stats")))
    assert st["requests"] == len(corr) + 3 and st["replies"] == st["requests"]
    assert st["duplicate_replies"] == 0, st
    dead = [json.loads(x) for x in open(path("one.dlq"))]
    assert sorted(x["id"] for x in dead) == ["poison", "tired"], dead


@test
def a_duplicate_request_gets_the_same_reply_and_no_second_effect():
    evs = [{"id": "a", "word": "x", "reply_to": "q", "correlation_id": "ca"},
           {"id": "b", "word": "y", "reply_to": "q", "correlation_id": "cb"}]
    empty = {"id": "e", "word": "q", "reply_to": "q", "correlation_id": ""}
    evs = evs + [{"id": "c", "word": "z"}] * 3 + evs + evs[:1] + [empty] * 2
    f = write_events("dup.jsonl", evs)
    d = fresh_dir("dup")
    rc, out, err = run(["run", "-w", "3", "--replies", d, "--stats",
                        path("dup.stats"), f])
    assert rc == 0, err
    counts = {json.loads(x)["word"]: json.loads(x)["count"]
              for x in out.splitlines()}
    assert counts == {"x": 1, "y": 1, "z": 1, "q": 1}, counts
    got = replies(d, "q")
    n = Counter(r["correlation_id"] for r in got)
    assert n == {"ca": 3, "cb": 2, "": 2}, n
    # Every copy is the same reply, byte for byte.
    lines = open(os.path.join(d, "q.jsonl"), "rb").read().splitlines()
    assert len({x for x in lines if b'"ca"' in x}) == 1, lines
    st = json.load(open(path("dup.stats")))
    assert st["requests"] == 3 and st["duplicate_replies"] == 4, st


@test
def a_dying_copy_of_a_processed_request_is_a_duplicate_not_dead():
    # Many workers, tiny lease: copies race; whatever happens, each
    # request has exactly one settled outcome, so its replies are all the
    # same "ok" line.
    evs = [{"id": f"i{k % 50}", "word": "w", "reply_to": "r",
            "correlation_id": f"c{k % 50}"} for k in range(400)]
    f = write_events("race.jsonl", evs)
    d = fresh_dir("race")
    rc, out, err = run(["run", "-w", "4", "--batch", "4", "--replies", d,
                        "--stats", path("race.stats"), f])
    assert rc == 0, err
    got = replies(d, "r")
    assert len(got) == 400, len(got)
    assert all(r["status"] == "ok" for r in got), got
    per = {}
    for line in open(os.path.join(d, "r.jsonl"), "rb"):
        c = json.loads(line)["correlation_id"]
        per.setdefault(c, set()).add(line)
    assert len(per) == 50 and all(len(v) == 1 for v in per.values()), per
    assert json.loads(out.splitlines()[0]) == {"word": "w", "count": 50}


@test
def a_duplicate_gets_its_own_reply_not_one_with_the_same_correlation_id():
    # Two requests share a correlation id (and a third's event id is the
    # first's correlation id): a duplicate of p1 gets p1's reply, in
    # p1's reply_to, and nothing goes to the others' streams.
    evs = [{"id": "p1", "word": "a", "reply_to": "alice",
            "correlation_id": "c1"},
           {"id": "q1", "word": "b", "reply_to": "bob",
            "correlation_id": "c1"},
           {"id": "c1", "word": "c", "reply_to": "carol"},
           {"id": "p1", "word": "a", "reply_to": "alice",
            "correlation_id": "c1"},
           {"id": "q1", "word": "b"}]  # a copy that is not a request
    f = write_events("corr.jsonl", evs)
    d = fresh_dir("corr")
    rc, out, err = run(["run", "-w", "1", "--replies", d, f])
    assert rc == 0, err
    alice, bob, carol = (replies(d, x) for x in ("alice", "bob", "carol"))
    assert [r["id"] for r in alice] == ["p1", "p1"], alice
    assert [r["id"] for r in bob] == ["q1"], bob
    assert [(r["id"], r["correlation_id"]) for r in carol] == \
        [("c1", "c1")], carol


@test
def a_retried_request_gets_the_reply_under_its_own_correlation_id():
    # A requester that retries with a new correlation id and another
    # reply_to (the first requester is gone) must be able to match the
    # answer: the copy's head, the settled copy's outcome.
    evs = [{"id": "o1", "word": "a", "reply_to": "first",
            "correlation_id": "try-1"},
           {"id": "o1", "word": "a", "reply_to": "second",
            "correlation_id": "try-2 \"quoted\" \u00e9"}]
    f = write_events("retry.jsonl", evs)
    d = fresh_dir("retry")
    rc, out, err = run(["run", "-w", "1", "--replies", d, f])
    assert rc == 0, err
    first, second = replies(d, "first"), replies(d, "second")
    assert [r["correlation_id"] for r in first] == ["try-1"], first
    assert [r["correlation_id"] for r in second] == \
        ["try-2 \"quoted\" \u00e9"], second
    a, b = dict(first[0]), dict(second[0])
    a.pop("correlation_id")
    b.pop("correlation_id")
    assert a == b and a["status"] == "ok", (a, b)


@test
def a_reply_is_written_when_its_request_settles_not_at_the_end():
    # A responder fed from a pipe that stays open: the reply must be in
    # the file while the run goes on.
    d = fresh_dir("live")
    p = subprocess.Popen([ONCEQ, "run", "--replies", d, "-q"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=TMP)
    try:
        p.stdin.write(b'{"id":"r1","word":"x","reply_to":"live"}\n')
        p.stdin.flush()
        f = os.path.join(d, "live.jsonl")
        deadline = time.time() + 20
        while time.time() < deadline:
            if os.path.exists(f) and os.path.getsize(f) > 0:
                break
            time.sleep(0.05)
        got = replies(d, "live")
        assert [r["id"] for r in got] == ["r1"], got
        assert p.poll() is None, "the run ended early"
    finally:
        p.stdin.close()
        p.wait(timeout=60)
    assert p.returncode == 0, p.stderr.read()


@test
def bad_requests_are_dead_lettered_and_nothing_else_changes():
    evs = [{"id": "p1", "word": "a", "reply_to": "../etc"},
           {"id": "p2", "word": "a", "reply_to": ".hidden"},
           {"id": "p3", "word": "a", "reply_to": 7},
           {"id": "p4", "word": "a", "reply_to": "ok", "correlation_id": 5},
           {"id": "p5", "word": "a", "reply_to": "x" * 201},
           {"id": "good", "word": "b", "reply_to": "ok"}]
    f = write_events("bad.jsonl", evs)
    d = fresh_dir("bad")
    rc, out, err = run(["run", "--replies", d, "--dlq", path("bad.dlq"), f])
    assert rc == 1, err
    dead = [json.loads(x) for x in open(path("bad.dlq"))]
    assert sorted(x["id"] for x in dead) == ["p1", "p2", "p3", "p4", "p5"]
    assert all(x["reason"] == "rejected" and "bad request" in x["error"]
               for x in dead), dead
    assert os.listdir(d) == ["ok.jsonl"], os.listdir(d)
    assert [r["id"] for r in replies(d, "ok")] == ["good"]


@test
def usage_errors_exit_2():
    f = write_events("u.jsonl", [{"id": "a", "word": "x"}])
    rc, _, err = run(["run", "--replies", path("no-such-dir"), f])
    assert rc == 2 and "no such directory" in err, (rc, err)
    rc, _, err = run(["run", "--replies", f, f])
    assert rc == 2 and "not a directory" in err, (rc, err)
    rc, _, err = run(["run", "--replies", TMP, "--state", path("u.db"), f])
    assert rc == 2 and "--state" in err, (rc, err)
    rc, _, err = run(["run", "--replies", TMP, "--redis",
                      "redis://127.0.0.1:1", "--stream", "s", "--group", "g"])
    assert rc == 2 and "--replies" in err, (rc, err)
    rc, _, err = run(["run", "--replies", "", f])
    assert rc == 2, (rc, err)


@test
def a_reply_that_cannot_be_written_stops_the_run():
    """A reply file on a full disk: every later reply would be lost too.
    The run went on applying every request and counted each as replied,
    with one message at the end; now it stops (exit 3), counts no reply
    that was not written, and leaves the rest unfinished."""
    if not os.path.exists("/dev/full"):
        return
    d = path("full")
    os.makedirs(d, exist_ok=True)
    os.symlink("/dev/full", os.path.join(d, "orders.jsonl"))
    # exec: a few ms an event, so a run that does not stop takes seconds.
    n = 2000
    f = write_events("full.jsonl", [{"id": f"y{i}", "word": "a",
                                     "reply_to": "orders"}
                                    for i in range(n)])
    st = path("full.stats")
    rc, out, err = run(["run", "-q", "--replies", d, "--stats", st, "-o",
                        "/dev/null", "-w", "2", "--handler", "exec:cat", f])
    assert rc == 3 and "cannot write replies" in err, (rc, err)
    s = json.load(open(st))
    assert s["replies"] == 0, s
    assert s["processed"] < n and s["unfinished"] > 0, s


def main():
    return suite.run(TMP)


if __name__ == "__main__":
    sys.exit(main())
