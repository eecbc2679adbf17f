#!/usr/bin/env python3
"""Description: end-to-end tests of request-reply over Redis Streams
(`onceq send --reply-to`, replies appended by `onceq run --redis`
responders' commit script, `onceq run --join-requests` requesters, `onceq
request`) against a real redis-server on a free loopback port. Each test
computes the right answer in Python from what it sent and checks what Redis
holds, read with redis-cli: each settled request has exactly one reply in
its reply_to stream (one per copy for duplicates, all alike), its effect
(the S:results record) once, the reply's result equal to it; requesters
handle each reply once, joined with the context send stored; late,
duplicate and bad requests or replies are dead-lettered or counted, never
answered or handled twice. Faults: kill -9 of a responder and of a
requester mid-handler (survivors take over after the visibility timeout).
Every reply line is parsed strictly (UTF-8, no duplicate keys, no
NaN/Infinity). While the feature is not built each test fails at once with
a line saying which part is missing. Prints "N passed, N failed".

Environment: ONCEQ (the binary; default ./onceq), OQ_RUN_SEED, BUILD (a
sanitizer build gets smaller inputs and longer waits), OQ_RR_TESTS
(comma-separated parts of test names: run only those)."""
import datetime
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Suite  # noqa: E402
import redis_harness as rh  # noqa: E402
from redis_harness import (  # noqa: E402
    ONCEQ, SLOW, SEED, TMP, path, cli, hash_of, entries, pending,
    pending_of, run, start, finish, wait_for, one_line_exit_2, script_file,
    lines_of)

print(f"test_reqreply_redis: seed {SEED} (OQ_RUN_SEED), binary {ONCEQ}")

suite = Suite()
test = suite.test
URL = None                      # set by main()
WAIT = 4 if SLOW else 1         # visibility timeouts in fault tests, s
LONG = 90 if SLOW else 30       # waits on conditions, s
DAY_MS = 86400000
HEX32 = re.compile(r"[0-9a-f]{32}\Z")
ISO_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?"
                     r"(Z|\+00:00)\Z")
REPLY_KEYS = {"correlation_id", "id", "status", "attempts"}


# ------------------------------------------------------ the feature is there?

_missing = {}
_PROBES = {
    # part: (arguments, what the current binary says when it lacks it)
    "send --reply-to": (lambda: ["send", "--redis", URL, "--stream",
                                 "probe-rr", "--reply-to", "probe-rr-r",
                                 "/dev/null"], "unknown option '--reply-to'"),
    "run --join-requests": (lambda: ["run", "--redis", URL, "--stream",
                                     "probe-rr-r", "--group", "requesters",
                                     "--join-requests", "--drain", "-q"],
                            "unknown option '--join-requests'"),
    "onceq request": (lambda: ["request", "--redis", URL, "--stream",
                               "probe-rr", "--reply-timeout", "1s", "-q"],
                      "unknown command 'request'"),
}


def need(*parts):
    """Fails the test at once, in one line, while a part of the feature is
    not built (the binary does not know its option or command)."""
    for part in parts:
        if part not in _missing:
            args, says = _PROBES[part]
            rc, _, err = run(args(), timeout=60, input=b"")
            _missing[part] = err.strip() if says in err else None
        if _missing[part]:
            raise AssertionError(f"request-reply over Redis is not built: "
                                 f"{part}: {_missing[part]}")


# ------------------------------------------------------------- helpers

def strict_json(text):
    """json.loads that refuses what a lax parser lets through: duplicate
    keys, NaN/Infinity, raw control characters in strings."""
    def pairs(kv):
        d = {}
        for k, v in kv:
            if k in d:
                raise ValueError(f"duplicate key {k!r} in {text!r}")
            d[k] = v
        return d

    def const(c):
        raise ValueError(f"{c} in {text!r}")
    return json.loads(text, object_pairs_hook=pairs, parse_constant=const)


def line_of(x):
    if isinstance(x, str):
        return x
    return json.dumps(x, ensure_ascii=False, separators=(",", ":"))


def write_lines(name, items):
    """Writes events (dicts, or raw lines as strings) one a line."""
    f = path(name)
    with open(f, "w", encoding="utf-8") as g:
        for x in items:
            g.write(line_of(x) + "\n")
    return f


def send_requests(stream, reply_to, f, *extra):
    rc, out, err = run(["send", "--redis", URL, "--stream", stream,
                        "--reply-to", reply_to] + list(extra) + [f])
    assert rc == 0, f"send --reply-to: {rc} {err}"
    return out


def stamped(stream):
    """The events of stream as sent (field e), parsed strictly; None for a
    line that is not a JSON object. Read before any consumer settles them
    (settled entries are trimmed)."""
    out = []
    for e in entries(stream):
        try:
            v = strict_json(e["e"])
        except ValueError:
            v = None
        out.append(v if isinstance(v, dict) else None)
    return out


def context(reply_to, cid):
    """The request context send stored, parsed strictly, or None."""
    v = cli("GET", f"{reply_to}:rq:{cid}")
    return None if v is None else strict_json(v)


def check_reply(r):
    """A reply has the spec's members and no others."""
    assert isinstance(r, dict), r
    extra = {"result"} if r.get("status") == "ok" else {"error"}
    assert set(r) == REPLY_KEYS | extra, f"reply members: {sorted(r)}"
    assert isinstance(r["correlation_id"], str), r
    assert isinstance(r["id"], str), r
    assert r["status"] in ("ok", "failed", "dead"), r
    assert isinstance(r["attempts"], int) and r["attempts"] >= 1, r
    if r["status"] == "ok":
        assert isinstance(r["result"], list), r
    else:
        assert isinstance(r["error"], str) and r["error"], r


def replies(reply_to, stream):
    """Every reply in the stream reply_to, in order, parsed strictly; each
    entry must say it is a reply of stream (field s)."""
    out = []
    for e in entries(reply_to):
        assert e.get("s") == f"reply:{stream}", f"field s of a reply: {e}"
        r = strict_json(e["e"])
        check_reply(r)
        out.append(r)
    return out


def by_cid(rs):
    """{correlation id: reply}; fails when a correlation id has two."""
    n = Counter(r["correlation_id"] for r in rs)
    twice = sorted(c for c, k in n.items() if k > 1)
    assert not twice, f"more than one reply for {twice}"
    return {r["correlation_id"]: r for r in rs}


def results(stream):
    """{id: [records]} of S:results, each record parsed strictly."""
    out = {}
    for e in entries(f"{stream}:results"):
        out.setdefault(e["id"], []).append(strict_json(e["r"]))
    return out


def once_each(stream):
    """S:results with each id committed exactly once: {id: record}."""
    res = results(stream)
    twice = sorted(i for i, rs in res.items() if len(rs) != 1)
    assert not twice, f"committed more than once: {twice}"
    return {i: rs[0] for i, rs in res.items()}


def check_balanced(stream, group="g"):
    st = hash_of(f"{stream}:stats")
    assert st.get("sent", 0) == st.get("processed", 0) + \
        st.get("duplicates", 0) + st.get("dead", 0), st
    assert pending(stream, group) == 0, "messages still pending"
    return st


def responder(stream, name, handler, *extra):
    return start(["run", "--redis", URL, "--stream", stream, "--group", "g",
                  "--consumer", name, "--drain", "-q", "--handler", handler,
                  "--stats", path(f"{stream}-{name}.stats")] + list(extra))


def requester(reply_to, name, handler, *extra):
    return start(["run", "--redis", URL, "--stream", reply_to, "--group",
                  "requesters", "--consumer", name, "--join-requests",
                  "--drain", "-q", "--handler", handler, "--stats",
                  path(f"{reply_to}-{name}.stats")] + list(extra))


def stats_of(stream, name):
    with open(path(f"{stream}-{name}.stats")) as f:
        return json.load(f)


def echo_handler(name, log=None):
    """An exec: command that logs its event id (its external effect,
    at-least-once), takes 0.3 s for ids starting "slow", and prints
    {"echo": <the event it got>} (its record: the request's result)."""
    body = "read -r l\n"
    if log:
        body += f'echo "$ONCEQ_EVENT_ID" >> {log}\n'
    body += ('case "$ONCEQ_EVENT_ID" in slow*) sleep 0.3;; esac\n'
             "printf '{\"echo\":%s}\\n' \"$l\"\n")
    return "exec:" + script_file(name, body)


def kill_holding(p, stream, name, group="g"):
    """kill -9 of consumer p while it holds messages (stopped first, so
    the count is exact); returns how many it left pending."""
    wait_for(lambda: pending_of(stream, name, group) > 0, LONG,
             f"{name} to hold messages")
    for _ in range(500):
        p.send_signal(signal.SIGSTOP)
        if pending_of(stream, name, group) > 0:
            break
        p.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    p.kill()
    p.wait()
    left = pending_of(stream, name, group)
    assert left > 0, f"{name} held nothing when it was killed"
    return left


def without(d, *keys):
    return {k: v for k, v in d.items() if k not in keys}


def utc(s):
    """An ISO 8601 UTC time (as ISO_UTC matches), as a datetime."""
    m = re.match(r"(.{19})(?:\.(\d+))?", s)
    t = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
    us = int((m.group(2) or "0")[:6].ljust(6, "0"))
    return t.replace(microsecond=us, tzinfo=datetime.timezone.utc)


# ---------------------------------------------------------------- tests

@test
def send_stamps_each_request_and_stores_its_context():
    need("send --reply-to")
    s, r = "rr0", "rr0-r"
    evs = [{"id": "a1", "word": "x"},
           {"id": "a2", "word": "y", "correlation_id": "own-2",
            "reply_to": "elsewhere"},
           {"id": "a4", "word": "w", "correlation_id": "own-4",
            "nested": {"reply_to": "kept"}},
           "not json"]
    f = write_lines("rr0.jsonl", evs)
    t0 = datetime.datetime.now(datetime.timezone.utc)
    send_requests(s, r, f)
    t1 = datetime.datetime.now(datetime.timezone.utc)
    got = stamped(s)
    assert len(got) == len(evs), got
    # A line that is not a JSON object is sent as it is (the consumers
    # dead-letter it), with no context.
    assert got[3] is None and entries(s)[3]["e"] == "not json"
    cids = [check_stamped(s, r, ev, st, t0, t1)
            for ev, st in zip(evs[:3], got[:3])]
    assert len(set(cids)) == 3, cids
    assert sorted(cli("KEYS", f"{r}:rq:*")) == \
        sorted(f"{r}:rq:{c}" for c in cids)
    # Sent again within the dedup window: rejected, and no new context
    # (a1 would get a new correlation id, so a new one).
    out = send_requests(s, r, f)
    assert "rejected 3" in out, out
    assert len(cli("KEYS", f"{r}:rq:*")) == 3, cli("KEYS", f"{r}:rq:*")
    # A correlation id in use by another request (another event id) is
    # refused: the second request would take the first one's context.
    rc, out, err = run(["send", "--redis", URL, "--stream", s, "--reply-to",
                        r, write_lines("rr0d.jsonl", [
                            {"id": "a9", "word": "z",
                             "correlation_id": "own-2"}])])
    assert rc == 1 and "correlation_id" in err, (rc, out, err)
    assert context(r, "own-2")["event"]["id"] == "a2"
    assert all(x is None or x.get("id") != "a9" for x in stamped(s))
    # --request-ttl sets the contexts' expiry.
    f2 = write_lines("rr0b.jsonl", [{"id": "b1", "word": "x"}])
    send_requests(s, "rr0-r2", f2, "--request-ttl", "5m")
    cid = stamped(s)[-1]["correlation_id"]
    ttl = cli("PTTL", f"rr0-r2:rq:{cid}")
    assert 240000 < ttl <= 300000, ttl
    # A correlation_id that is not a string is kept (the user's, not
    # replaced behind their back) and the event is still a request, with
    # no context: the responders dead-letter it with the reason.
    ev = {"id": "a3", "word": "z", "correlation_id": 17}
    n_ctx = len(cli("KEYS", "rr0-r3:rq:*"))
    send_requests(s, "rr0-r3", write_lines("rr0c.jsonl", [ev]))
    st = stamped(s)[-1]
    assert st == {"id": "a3", "word": "z", "correlation_id": 17,
                  "reply_to": "rr0-r3"}, st
    assert len(cli("KEYS", "rr0-r3:rq:*")) == n_ctx


def check_stamped(s, r, ev, st, t0, t1):
    """Event ev as send --reply-to r sent it to stream s (st), between t0
    and t1, and its stored context; returns its correlation id."""
    assert st["reply_to"] == r, st
    cid = st["correlation_id"]
    own = ev.get("correlation_id")
    if isinstance(own, str):
        assert cid == own, (ev, st)
    else:
        assert isinstance(cid, str) and HEX32.match(cid), st
    assert without(st, "reply_to", "correlation_id") == \
        without(ev, "reply_to", "correlation_id"), (ev, st)
    ctx = context(r, cid)
    assert ctx is not None, f"no context {r}:rq:{cid}"
    assert set(ctx) == {"correlation_id", "stream", "event", "sent_at"}, ctx
    assert ctx["correlation_id"] == cid and ctx["stream"] == s, ctx
    assert ctx["event"] == st, (ctx, st)
    assert ISO_UTC.match(ctx["sent_at"]), ctx["sent_at"]
    at = utc(ctx["sent_at"])
    assert t0 - datetime.timedelta(seconds=2) <= at <= \
        t1 + datetime.timedelta(seconds=2), (t0, at, t1)
    ttl = cli("PTTL", f"{r}:rq:{cid}")
    assert DAY_MS - 600000 < ttl <= DAY_MS, ttl
    return cid


@test
def responders_killed_mid_request_reply_once_per_request():
    need("send --reply-to")
    rng = random.Random(SEED)
    s, r = "rr1", "rr1-r"
    n = 30 if SLOW else 90
    evs = []
    for i in range(n):
        kind = "slow" if rng.random() < 0.12 else "q"
        ev = {"id": f"{kind}{i}", "n": i}
        if rng.random() < 0.5:
            ev["correlation_id"] = f"c-{i}-{rng.randrange(10**6)}"
        evs.append(ev)
    send_requests(s, r, write_lines("rr1.jsonl", evs))
    sent = stamped(s)
    cid_of = {st["id"]: st["correlation_id"] for st in sent}
    ev_of = {st["id"]: st for st in sent}
    log = path("rr1.effects")
    h = echo_handler("rr1.sh", log)
    args = ["-w", "2", "--batch", "4", "--visibility-timeout", f"{WAIT}s"]
    victim = responder(s, "victim", h, *args)
    surv = []
    try:
        wait_for(lambda: pending_of(s, "victim") > 0, LONG,
                 "the victim to read")
        surv = [responder(s, f"c{i}", h, *args) for i in range(2)]
        orphaned = kill_holding(victim, s, "victim")
        for p in surv:
            rc, _, err = finish(p)
            assert rc == 0, (rc, err)
    finally:
        for p in [victim] + surv:
            if p.poll() is None:
                p.kill()
                p.wait()
    # Each request committed once (its record), and one reply per request,
    # with that record as its result.
    rec = once_each(s)
    assert sorted(rec) == sorted(ev_of), "a request was never committed"
    got = by_cid(replies(r, s))
    assert sorted(got) == sorted(cid_of.values()), \
        "a request without a reply, or a reply to no request"
    again = 0
    for i, st in ev_of.items():
        rep = got[cid_of[i]]
        assert rep["id"] == i and rep["status"] == "ok", rep
        assert rep["result"] == [{"echo": st}], (rep, st)
        assert rep["result"] == [rec[i]], (rep, rec[i])
        again += rep["attempts"] > 1
    assert again <= orphaned, (again, orphaned)
    # The external effect is at-least-once: every request ran; only what
    # the victim held ran twice.
    ran = lines_of(log)
    assert set(ran) == set(ev_of), "a request never ran"
    assert len(ran) <= n + orphaned, (len(ran), n, orphaned)
    st = check_balanced(s)
    assert st["processed"] == n, st
    assert st["requests"] == n and st["replies"] == n, st
    assert st.get("duplicate_replies", 0) == 0, st
    took = sum(stats_of(s, f"c{i}")["redelivered"] for i in range(2))
    assert took >= orphaned, (took, orphaned)


@test
def requesters_killed_mid_handler_handle_each_reply_once():
    need("send --reply-to", "run --join-requests")
    rng = random.Random(SEED + 1)
    s, r = "rr2", "rr2-r"
    n = 24 if SLOW else 60
    evs = []
    for i in range(n):
        ev = {"id": f"r{i}", "n": i}
        if rng.random() < 0.3:
            ev["correlation_id"] = f"cid-{i}"
        evs.append(ev)
    send_requests(s, r, write_lines("rr2.jsonl", evs))
    sent = stamped(s)
    ctx = {st["correlation_id"]: context(r, st["correlation_id"])
           for st in sent}
    assert all(ctx.values()), "a request without its context"
    rc, _, err = finish(responder(s, "resp", echo_handler("rr2.sh"),
                                  "-w", "4"))
    assert rc == 0, (rc, err)
    # Read before the requesters settle (and trim) the reply stream.
    rep = by_cid(replies(r, s))
    assert sorted(rep) == sorted(ctx), "not one reply per request"
    log = path("rr2.handled")
    h = "exec:" + script_file("rr2-req.sh", f'echo "$ONCEQ_EVENT_ID" >> '
                              f'{log}\nsleep 0.05\ncat\n')
    args = ["-w", "2", "--batch", "4", "--visibility-timeout", f"{WAIT}s"]
    victim = requester(r, "victim", h, *args)
    surv = []
    try:
        wait_for(lambda: pending_of(r, "victim", "requesters") > 0, LONG,
                 "the victim requester to read")
        surv = [requester(r, f"q{i}", h, *args) for i in range(2)]
        orphaned = kill_holding(victim, r, "victim", "requesters")
        for p in surv:
            rc, _, err = finish(p)
            assert rc == 0, (rc, err)
    finally:
        for p in [victim] + surv:
            if p.poll() is None:
                p.kill()
                p.wait()
    # Each reply handled (committed) once, under its correlation id, and
    # the handler got the reply joined with its request's context.
    rec = once_each(r)
    assert sorted(rec) == sorted(ctx), "a reply never handled"
    for cid, got in rec.items():
        want = dict(rep[cid])
        want["request"] = ctx[cid]
        assert got == want, (got, want)
        assert got["request"]["event"]["reply_to"] == r, got
        assert ISO_UTC.match(got["request"]["sent_at"]), got
    ran = lines_of(path("rr2.handled"))
    assert set(ran) == set(ctx) and len(ran) <= n + orphaned, \
        (len(ran), n, orphaned)
    assert pending(r, "requesters") == 0, "replies left unacked"
    assert cli("XLEN", f"{r}:dlq") == 0, entries(f"{r}:dlq")
    st = hash_of(f"{r}:stats")
    assert st["processed"] == n, st
    assert st.get("late_replies", 0) == 0 and st.get("duplicates", 0) == 0, \
        st


@test
def a_request_sent_twice_gets_two_replies_and_one_effect():
    need("send --reply-to")
    s, ra, rb = "rr3", "rr3-a", "rr3-b"
    log = path("rr3.effects")
    # The record is the handler's pid: a second run would show another.
    h = "exec:" + script_file("rr3.sh", f"read -r l\n"
                              f'echo "$ONCEQ_EVENT_ID" >> {log}\n'
                              'echo "{\\"pid\\":$$}"\n')
    send_requests(s, ra, write_lines("rr3a.jsonl", [
        {"id": "d1", "word": "x", "correlation_id": "first"}]))
    send_requests(s, rb, write_lines("rr3b.jsonl", [
        {"id": "d1", "word": "x", "correlation_id": "second"}]),
        "--dedup-window", "0")
    assert cli("XLEN", s) == 2
    rc, _, err = finish(responder(s, "c0", h, "-w", "2"))
    assert rc == 0, (rc, err)
    a, b = replies(ra, s), replies(rb, s)
    assert [x["correlation_id"] for x in a] == ["first"], a
    assert [x["correlation_id"] for x in b] == ["second"], b
    assert without(a[0], "correlation_id") == \
        without(b[0], "correlation_id"), (a, b)
    assert a[0]["id"] == "d1" and a[0]["status"] == "ok", a
    assert len(a[0]["result"]) == 1 and \
        isinstance(a[0]["result"][0].get("pid"), int), a
    assert lines_of(log) == ["d1"], lines_of(log)
    assert once_each(s) == {"d1": a[0]["result"][0]}
    st = check_balanced(s)
    assert st["requests"] == 1 and st["replies"] == 2, st
    assert st["duplicate_replies"] == 1 and st["duplicates"] == 1, st
    ttl = cli("PTTL", f"{s}:rp:d1")
    assert DAY_MS - 600000 < ttl <= DAY_MS, f"{s}:rp:d1 PTTL {ttl}"
    # wordcount: counters are not part of the result; --reply-ttl sets the
    # cache's expiry.
    s, r = "rr3w", "rr3w-r"
    send_requests(s, r, write_lines("rr3w.jsonl", [
        {"id": "w1", "word": "x", "correlation_id": "wa"}]))
    send_requests(s, r, write_lines("rr3w2.jsonl", [
        {"id": "w1", "word": "x", "correlation_id": "wb"}]),
        "--dedup-window", "0")
    rc, _, err = finish(responder(s, "c0", "wordcount", "--reply-ttl", "5m"))
    assert rc == 0, (rc, err)
    got = by_cid(replies(r, s))
    assert got == {c: {"correlation_id": c, "id": "w1", "status": "ok",
                       "result": [], "attempts": 1} for c in ("wa", "wb")}, \
        got
    assert hash_of(f"{s}:counts") == {"x": 1}
    ttl = cli("PTTL", f"{s}:rp:w1")
    assert 240000 < ttl <= 300000, ttl
    assert hash_of(f"{s}:stats")["duplicate_replies"] == 1


@test
def poison_and_exhausted_requests_get_one_reply_and_one_dead_letter():
    need("send --reply-to")
    s, r = "rr4", "rr4-r"
    h = "exec:" + script_file("rr4.sh", 'read -r l\ncase "$ONCEQ_EVENT_ID" '
                              'in poison*) echo "boom $ONCEQ_EVENT_ID" >&2; '
                              'exit 1;; esac\necho \'{"ok":true}\'\n')
    send_requests(s, r, write_lines("rr4.jsonl", [
        {"id": "poison1", "correlation_id": "cp1"},
        {"id": "fine1", "correlation_id": "cf1"}]))
    # A copy of the poison request, sent later: the cached reply again.
    send_requests(s, r, write_lines("rr4b.jsonl", [
        {"id": "poison1", "correlation_id": "cp2"}]), "--dedup-window", "0")
    rc, _, err = finish(responder(s, "c0", h, "-w", "1"))
    assert rc == 1, (rc, err)
    got = by_cid(replies(r, s))
    assert sorted(got) == ["cf1", "cp1", "cp2"], got
    assert got["cf1"] == {"correlation_id": "cf1", "id": "fine1",
                          "status": "ok", "result": [{"ok": True}],
                          "attempts": 1}, got["cf1"]
    p1 = got["cp1"]
    assert p1["id"] == "poison1" and p1["status"] == "failed", p1
    assert "boom poison1" in p1["error"] and p1["attempts"] == 1, p1
    assert without(got["cp2"], "correlation_id") == \
        without(p1, "correlation_id"), got
    dead = entries(f"{s}:dlq")
    assert [(d["id"], d["reason"]) for d in dead] == \
        [("poison1", "failed")], dead
    st = check_balanced(s)
    assert st["requests"] == 2 and st["replies"] == 3, st
    assert st["duplicate_replies"] == 1 and st["dead"] == 1, st
    # Out of attempts: one "dead" reply (none for the retry before it).
    s, r = "rr4m", "rr4m-r"
    send_requests(s, r, write_lines("rr4m.jsonl", [
        {"id": "t1", "correlation_id": "ct1"}]))
    rc, _, err = finish(responder(s, "c0", "exec:echo tired >&2; exit 75",
                                  "--max-attempts", "2", "--backoff",
                                  "5ms,10ms"))
    assert rc == 1, (rc, err)
    got = replies(r, s)
    assert len(got) == 1, got
    assert got[0]["correlation_id"] == "ct1" and got[0]["id"] == "t1", got
    assert got[0]["status"] == "dead" and got[0]["attempts"] == 2, got
    assert "tired" in got[0]["error"], got
    dead = entries(f"{s}:dlq")
    assert [(d["id"], d["reason"], d["attempts"]) for d in dead] == \
        [("t1", "max_attempts", "2")], dead
    st = check_balanced(s)
    assert st["requests"] == 1 and st["replies"] == 1, st
    assert st.get("retried", 0) >= 1, st


def request(args, data=None, timeout=None):
    """onceq request: (status, stdout lines parsed strictly, stderr)."""
    p = subprocess.run([ONCEQ, "request", "--redis", URL] + args,
                       capture_output=True, cwd=TMP,
                       input=b"" if data is None else data,
                       timeout=timeout or 2 * LONG)
    out = p.stdout.decode("utf-8")   # strict: invalid UTF-8 raises
    return p.returncode, [strict_json(x) for x in out.splitlines()], \
        p.stderr.decode("utf-8", "replace")


@test
def request_with_no_responder_times_out_in_input_order():
    need("onceq request")
    s = "rr5a"
    evs = [{"id": "t1", "word": "a"},
           {"id": "t2", "word": "b", "correlation_id": "mine-2"},
           {"id": "t3", "word": "c"}]
    f = write_lines("rr5a.jsonl", evs)
    t0 = time.time()
    rc, out, err = request(["--stream", s, "--reply-timeout", "1s", f])
    took = time.time() - t0
    assert rc == 1, (rc, out, err)
    assert took >= 0.9, f"gave up after {took:.2f}s"
    assert err.strip(), "no summary on stderr"
    assert [x["id"] for x in out] == ["t1", "t2", "t3"], out
    for x in out:
        assert set(x) == {"correlation_id", "id", "status"}, x
        assert x["status"] == "timeout", x
    assert out[1]["correlation_id"] == "mine-2", out
    for k in (0, 2):
        assert HEX32.match(out[k]["correlation_id"]), out
    assert out[0]["correlation_id"] != out[2]["correlation_id"], out
    # They were sent, stamped with the default reply stream, now deleted
    # with the contexts.
    sent = stamped(s)
    assert [x["correlation_id"] for x in sent] == \
        [x["correlation_id"] for x in out], (sent, out)
    assert all(x["reply_to"].startswith(f"{s}:replies:") for x in sent), \
        sent
    # Only the marker that the stream is gone is left (so that a late
    # reply does not bring it back), and it expires.
    left = cli("KEYS", f"{s}:replies:*")
    assert len(left) == 1 and left[0].endswith(":gone"), left
    assert 0 < cli("PTTL", left[0]) <= 24 * 3600 * 1000, left
    # A responder that comes now processes the requests and writes no
    # reply: the stream stays gone, the replies are counted as dropped.
    p = start(["run", "--redis", URL, "--stream", s, "--group", "g",
               "--drain", "-q"])
    finish(p)
    assert cli("KEYS", f"{s}:replies:*") == left, cli("KEYS", f"{s}:replies:*")
    st = hash_of(f"{s}:stats")
    assert st.get("replies_dropped") == 3 and st.get("processed") == 3, st


@test
def request_with_a_responder_gets_each_reply_in_input_order():
    need("onceq request")
    s = "rr5b"
    h = echo_handler("rr5b.sh")
    resp = start(["run", "--redis", URL, "--stream", s, "--group", "g",
                  "--consumer", "resp", "-q", "--handler", h,
                  "--visibility-timeout", f"{WAIT}s"])
    try:
        odd = 'é "q" \\ \u0001 🙂'
        evs = [{"id": "u0", "n": 0},
               {"id": "u1", "n": 1, "correlation_id": odd},
               {"id": "u2", "n": 2},
               {"id": "u0", "n": 0}]   # the same line again: a request
        f = write_lines("rr5b.jsonl", evs)
        rc, out, err = request(["--stream", s, "--reply-timeout",
                                f"{2 * LONG}s", f])
        assert rc == 0, (rc, out, err)
        assert err.strip(), "no summary on stderr"
        assert [x["id"] for x in out] == ["u0", "u1", "u2", "u0"], out
        assert all(x["status"] == "ok" for x in out), out
        cids = [x["correlation_id"] for x in out]
        assert cids[1] == odd, cids
        assert all(HEX32.match(cids[k]) for k in (0, 2, 3)), cids
        assert len(set(cids)) == 4, cids
        # Each ran with its own request; u0 once, for whichever of its
        # two copies came first: the other got that copy's result again.
        for k in (0, 1, 2):
            st = out[k]["result"][0]["echo"]
            ran_for = (cids[0], cids[3]) if k == 0 else (cids[k],)
            assert st["correlation_id"] in ran_for, (k, st)
            assert st["reply_to"].startswith(f"{s}:replies:"), st
            assert without(st, "reply_to", "correlation_id") == \
                without(evs[k], "correlation_id"), st
        assert out[3]["result"] == out[0]["result"], out
        assert out[3]["attempts"] == out[0]["attempts"], out
        # Lines that are not JSON objects are not sent; stdin without FILE.
        data = "".join(line_of(x) + "\n" for x in [
            {"id": "v1", "n": 1}, "not json", "[1,2]", {"id": "v2", "n": 2}])
        rc, out, err = request(["--stream", s, "--reply-timeout",
                                f"{2 * LONG}s", "--reply-stream",
                                "rr5b-mine", "-q"], data.encode())
        assert rc == 1, (rc, out, err)
        assert err == "", err
        assert [x.get("id") for x in out] == ["v1", None, None, "v2"], out
        for k in (1, 2):
            assert set(out[k]) == {"correlation_id", "status", "error"}, out
            assert out[k]["correlation_id"] is None, out
            assert out[k]["status"] == "rejected" and out[k]["error"], out
        for k in (0, 3):
            assert out[k]["status"] == "ok", out
            assert out[k]["result"][0]["echo"]["reply_to"] == "rr5b-mine"
    finally:
        resp.send_signal(signal.SIGTERM)
        try:
            resp.communicate(timeout=LONG)
        except subprocess.TimeoutExpired:
            resp.kill()
            resp.wait()
    # Whatever the responder left, a drain settles: nothing but the six
    # requests was sent (a bad line sent would be a parse_error here).
    rc, _, err = finish(responder(s, "drain", h,
                                  "--visibility-timeout", f"{WAIT}s"))
    assert rc == 0, (rc, err)
    assert cli("XLEN", f"{s}:dlq") == 0, entries(f"{s}:dlq")
    assert pending(s, "g") == 0, "requests left unacked"
    st = hash_of(f"{s}:stats")
    assert st.get("processed", 0) + st.get("duplicates", 0) == 6, st
    assert st["duplicates"] == 1 and st["duplicate_replies"] == 1, st
    assert sorted(once_each(s)) == ["u0", "u1", "u2", "v1", "v2"]


@test
def correlation_ids_survive_and_bad_requests_get_no_reply():
    need("send --reply-to")
    s, r = "rr6", "rr6-r"
    odd = ['quote " and \\ back', 'unicode é 漢 🙂', 'ctl \u0001 and \u001f',
           'tab\tand\nnewline', '', 'sp ace {"json":[1]}']
    send_requests(s, r, write_lines("rr6.jsonl", [
        {"id": f"k{i}", "word": "w", "correlation_id": c}
        for i, c in enumerate(odd)]))
    # The longest name, and every kind of character a name may have.
    long_ok = "y" * 200
    send_requests(s, long_ok, write_lines("rr6b.jsonl", [
        {"id": "g2", "word": "w", "correlation_id": "long"}]))
    send_requests(s, "A.b_c-d:9", write_lines("rr6c.jsonl", [
        {"id": "g3", "word": "w", "correlation_id": "chars"}]))
    # Requests by hand (send would stamp them): a good one, with no context
    # (to a reply stream that exists: a requesters' group made it), and
    # bad ones.
    cli("XGROUP", "CREATE", r, "requesters", "0", "MKSTREAM")
    hand = [{"id": "g1", "word": "w", "reply_to": r, "correlation_id": "h"}]
    bad_to = ["../x", "", "a b", ".hidden", "x" * 201, 7, ["l"], None]
    bad = [{"id": "b0", "word": "w", "reply_to": r, "correlation_id": 5},
           {"id": "b1", "word": "w", "reply_to": r, "correlation_id": None}]
    bad += [{"id": f"b{i + 2}", "word": "w", "reply_to": t,
             "correlation_id": f"cb{i}"} for i, t in enumerate(bad_to)]
    for k, ev in enumerate(hand + bad):
        cli("XADD", s, "*", "e", line_of(ev), "s", f"hand:{k + 1}")
    rc, _, err = finish(responder(s, "c0", echo_handler("rr6.sh"), "-w",
                                  "2"))
    assert rc == 1, (rc, err)
    got = by_cid(replies(r, s))
    assert sorted(got) == sorted(odd + ["h"]), sorted(got)
    for i, c in enumerate(odd):
        assert got[c]["id"] == f"k{i}" and got[c]["status"] == "ok", got[c]
        assert got[c]["result"][0]["echo"]["correlation_id"] == c, got[c]
    for name, cid, i in ((long_ok, "long", "g2"), ("A.b_c-d:9", "chars",
                                                   "g3")):
        rs = replies(name, s)
        assert [(x["correlation_id"], x["id"]) for x in rs] == [(cid, i)], rs
    dead = entries(f"{s}:dlq")
    assert sorted(strict_json(d["event"])["id"] for d in dead) == \
        sorted(b["id"] for b in bad), dead
    assert all(d["reason"] == "rejected" for d in dead), dead
    for t in bad_to:
        if isinstance(t, str):
            assert cli("EXISTS", t) == 0, f"a reply stream named {t!r}"
    # (Not balanced against "sent": the hand-made entries were not.)
    assert pending(s, "g") == 0, "requests left unacked"
    st = hash_of(f"{s}:stats")
    assert st["replies"] == len(odd) + 3, st
    assert st["dead"] == len(bad) and st["dead:rejected"] == len(bad), st
    assert st.get("duplicate_replies", 0) == 0, st
    # A bad request's dead letter names its id, as any other's does (and
    # as the in-memory run's does).
    assert sorted(d["id"] for d in dead) == sorted(b["id"] for b in bad), \
        f"dead letters' ids: {sorted(d['id'] for d in dead)}"


@test
def late_and_duplicate_replies_are_not_handled():
    need("send --reply-to", "run --join-requests")
    s, r = "rr7", "rr7-r"
    send_requests(s, r, write_lines("rr7.jsonl", [
        {"id": "k1", "word": "a"},
        {"id": "k2", "word": "b", "correlation_id": "c-k2"}]))
    # A request whose context expires before its reply comes (1s: the
    # shortest --request-ttl).
    send_requests(s, r, write_lines("rr7b.jsonl", [
        {"id": "k3", "word": "c", "correlation_id": "c-k3"}]),
        "--request-ttl", "1s")
    wait_for(lambda: cli("EXISTS", f"{r}:rq:c-k3") == 0, LONG,
             "the context to expire")
    # A request whose deadline (--reply-timeout: 1ms) has passed when its
    # reply comes: late too, and a timeout. Its context says when.
    t0 = time.time()
    send_requests(s, r, write_lines("rr7c.jsonl", [
        {"id": "k4", "word": "d", "correlation_id": "c-k4"}]),
        "--reply-timeout", "1ms")
    ctx = context(r, "c-k4")
    assert t0 * 1000 - 5000 < ctx["deadline_ms"] < time.time() * 1000 + 5000
    cid1 = stamped(s)[0]["correlation_id"]
    # The requesters' group, made first (so the reply stream exists
    # whatever reply is committed first).
    cli("XGROUP", "CREATE", r, "requesters", "0", "MKSTREAM")
    rc, _, err = finish(responder(s, "c0", "wordcount"))
    assert rc == 0, (rc, err)
    rep = by_cid(replies(r, s))
    assert sorted(rep) == sorted([cid1, "c-k2", "c-k3", "c-k4"]), rep
    # A reply nobody asked for, and a second copy of c-k2's.
    cli("XADD", r, "*", "e", line_of({"correlation_id": "nobody-asked",
                                      "id": "zz", "status": "ok",
                                      "result": [], "attempts": 1}),
        "s", f"reply:{s}")
    cli("XADD", r, "*", "e", line_of(rep["c-k2"]), "s", f"reply:{s}")
    log = path("rr7.handled")
    h = "exec:" + script_file("rr7-req.sh", f'echo "$ONCEQ_EVENT_ID" >> '
                              f'{log}\ncat\n')
    rc, _, err = finish(requester(r, "q0", h, "-w", "1"))
    assert rc == 1, (rc, err)   # the late replies are dead letters
    assert sorted(lines_of(log)) == sorted([cid1, "c-k2"]), lines_of(log)
    assert sorted(once_each(r)) == sorted([cid1, "c-k2"])
    dead = entries(f"{r}:dlq")
    assert sorted(d["id"] for d in dead) == ["c-k3", "c-k4",
                                             "nobody-asked"], dead
    for d in dead:
        assert d["reason"] == "rejected", d
        assert d["error"].startswith("late reply"), d
        assert ("deadline" in d["error"]) == (d["id"] == "c-k4"), d
    st = hash_of(f"{r}:stats")
    assert st["late_replies"] == 3 and st["timeouts"] == 1, st
    mine = stats_of(r, "q0")
    assert mine["late_replies"] == 3 and mine["timeouts"] == 1, mine
    assert st["duplicates"] == 1 and st["duplicate_replies"] == 1, st
    assert st["processed"] == 2, st
    assert pending(r, "requesters") == 0, "replies left unacked"


@test
def a_requester_killed_mid_wait_gets_its_answers_on_a_rerun():
    # onceq request is killed -9 while it waits (the responder is slow);
    # run again with the same input, it gets every answer, from the
    # responders' reply cache for the requests that were already settled:
    # one effect per id, whatever the requesters did.
    need("onceq request")
    s = "rr9"
    evs = [{"id": f"slow{k}", "word": f"w{k}"} for k in range(4)]
    f = write_lines("rr9.jsonl", evs)
    # Not --drain: it must still be there for the rerun.
    resp = start(["run", "--redis", URL, "--stream", s, "--group", "g",
                  "--consumer", "r1", "-q", "-w", "1", "--handler",
                  echo_handler("rr9.sh"), "--visibility-timeout", f"{WAIT}s"])
    try:
        p = start(["request", "--redis", URL, "--stream", s,
                   "--reply-timeout", "60s", f])
        wait_for(lambda: hash_of(f"{s}:stats").get("processed", 0) >= 1,
                 LONG, "a first request processed")
        p.send_signal(signal.SIGKILL)
        finish(p)
        rc, out, err = request(["--stream", s, "--reply-timeout",
                                f"{LONG}s", f])
        assert rc == 0, (rc, out, err)
        assert [x["id"] for x in out] == [e["id"] for e in evs], out
        assert all(x["status"] == "ok" for x in out), out
        # Each answer is its own event's outcome (a cached one is the
        # first copy's: same id and word, another correlation id).
        for x, e in zip(out, evs):
            echo = x["result"][0]["echo"]
            assert (echo["id"], echo["word"]) == (e["id"], e["word"]), x
        res = once_each(s)       # each id committed exactly once
        assert sorted(res) == sorted(e["id"] for e in evs), res
        st = hash_of(f"{s}:stats")
        assert st["requests"] == 4, st
        assert st.get("duplicate_replies", 0) >= 1, st
    finally:
        resp.send_signal(signal.SIGTERM)
        finish(resp)


@test
def reply_to_that_is_not_a_usable_stream():
    # A reply_to naming a key of another type: the request is processed
    # and its reply is counted undeliverable (the responder goes on); one
    # naming the responders' own stream, records or dead letters would
    # forge them: rejected at decode, with its id.
    # A reply_to shaped like a key onceq keeps for any stream (its
    # delayed set, a claim, a done-mark bucket, a cached reply, another
    # queue's stats) would turn that key into a stream and stop every
    # later run of its queue: rejected too.
    s = "rr10"
    cli("SET", "rr10-str", "x")
    bad = [s, f"{s}:dlq", f"{s}:results", f"{s}:delayed", "rr10x:id:victim",
           f"{s}:d:0", f"{s}:rp:ok", "other:stats", "other:rq:c1", "zu:meta"]
    evs = [{"id": "h1", "word": "a", "reply_to": "rr10-str"}] + \
        [{"id": f"o{k}", "word": "b", "reply_to": b}
         for k, b in enumerate(bad)] + \
        [{"id": "ok", "word": "e", "reply_to": "rr10-r"},
         {"id": "rt", "word": "f"}]   # retried once: needs S:delayed
    for ev in evs:
        cli("XADD", s, "*", "e", line_of(ev), "s", "hand")
    cli("HINCRBY", f"{s}:stats", "sent", len(evs))
    h = script_file("rr10.sh", 'read -r l\ncase "$ONCEQ_EVENT_ID" in rt) '
                    '[ -e rr10.once ] || { : > rr10.once; exit 75; };; '
                    'esac\necho \'{"r":1}\'\n')
    rc, out, err = run(["run", "--redis", URL, "--stream", s, "--group",
                        "g", "--drain", "-q", "--handler", "exec:" + h,
                        "--backoff", "10ms"])
    assert rc == 1, (rc, err)
    assert cli("GET", "rr10-str") == "x"
    assert cli("TYPE", f"{s}:delayed") in ("zset", "none")
    assert cli("TYPE", "rr10x:id:victim") == "none"
    dead = entries(f"{s}:dlq")
    assert sorted((d["id"], d["reason"]) for d in dead) == \
        sorted((f"o{k}", "rejected") for k in range(len(bad))), dead
    assert all(d["error"].startswith("bad request: reply_to")
               for d in dead), dead
    assert [strict_json(e["e"])["id"] for e in entries("rr10-r")] == ["ok"]
    st = check_balanced(s)
    assert st["replies_undeliverable"] == 1 and st["requests"] == 2, st
    assert st["processed"] == 3 and st["retried"] == 1, st
    # The stream still runs (nothing of it was turned into a stream).
    rc, out, err = run(["run", "--redis", URL, "--stream", s, "--group",
                        "g", "--drain", "-q", "--handler", "exec:" + h])
    assert rc == 0, (rc, err)
    # send --reply-to and request --reply-stream refuse such names.
    for args in (["send", "--redis", URL, "--stream", s, "--reply-to",
                  f"{s}:delayed"],
                 ["send", "--redis", URL, "--stream", s, "--reply-to", s],
                 ["request", "--redis", URL, "--stream", s,
                  "--reply-stream", "q:id:x"]):
        err = one_line_exit_2(args)
        assert "reply" in err, err


@test
def request_matches_by_correlation_id_and_id_reads_only_new_replies():
    # Two different requests that share a correlation id each get their
    # own reply (s5 failed: exit 1); a shared reply stream with an old
    # reply for the same correlation id and id is not read; a line with
    # no usable id is refused at once (the responders would dead-letter
    # it, bad_id, and never reply); SIGTERM mid-wait cleans up.
    need("onceq request")
    s = "rr11"
    h = script_file("rr11.sh", 'read -r l\ncase "$l" in *fail*) echo '
                    'failing >&2; exit 1;; esac\necho \'{"r":1}\'\n')
    resp = start(["run", "--redis", URL, "--stream", s, "--group", "g",
                  "--consumer", "resp", "-q", "--handler", "exec:" + h])
    try:
        old = {"correlation_id": "same", "id": "s4", "status": "failed",
               "error": "an old reply", "attempts": 1}
        cli("XADD", "rr11-shared", "*", "e", line_of(old), "s", "hand")
        data = "".join(line_of(x) + "\n" for x in [
            {"id": "s4", "correlation_id": "same", "word": "a"},
            {"id": "s5", "correlation_id": "same", "fail": 1},
            {"x": 1}, {"id": True}])
        rc, out, err = request(["--stream", s, "--reply-stream",
                                "rr11-shared", "--reply-timeout",
                                f"{LONG}s"], data.encode())
        assert rc == 1, (rc, out, err)
        assert [(x.get("id"), x["status"]) for x in out] == \
            [("s4", "ok"), ("s5", "failed"), (None, "rejected"),
             (None, "rejected")], out
        assert "id" in out[2]["error"] and "id" in out[3]["error"], out
        # SIGTERM while waiting (no responder for this stream): exit 143,
        # nothing printed, the contexts and the own stream cleaned up.
        p2 = subprocess.Popen([ONCEQ, "request", "--redis", URL, "--stream",
                               "rr11-none", "--reply-timeout", "60s", "-q",
                               write_lines("rr11b.jsonl",
                                           [{"id": "w1", "word": "a"}])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=TMP)
        wait_for(lambda: cli("KEYS", "rr11-none:replies:*:rq:*") != [],
                 LONG, "the request's context")
        p2.send_signal(signal.SIGTERM)
        out2, _ = p2.communicate(timeout=LONG)
        assert p2.returncode == 143 and out2 == b"", (p2.returncode, out2)
        assert cli("KEYS", "rr11-none:replies:*:rq:*") == []
        left = cli("KEYS", "rr11-none:replies:*")
        assert len(left) == 1 and left[0].endswith(":gone"), left
    finally:
        resp.send_signal(signal.SIGTERM)
        finish(resp)


@test
def bad_usage_exits_2_with_one_line():
    need("send --reply-to", "run --join-requests", "onceq request")
    f = write_lines("rr8.jsonl", [{"id": "a", "word": "x"}])
    for bad in ("a b", "", ".x", "../x", "x" * 201):
        err = one_line_exit_2(["send", "--redis", URL, "--stream", "rr8",
                               "--reply-to", bad, f])
        assert "--reply-to" in err, err
    assert cli("EXISTS", "rr8") == 0, "refused, yet it sent"
    err = one_line_exit_2(["send", "--redis", URL, "--stream", "rr8",
                           "--reply-to", "ok", "--request-ttl", "bogus", f])
    assert "--request-ttl" in err, err
    one_line_exit_2(["request", "--stream", "rr8"], input=b"")
    one_line_exit_2(["request", "--redis", URL], input=b"")
    err = one_line_exit_2(["request", "--redis", URL, "--stream", "rr8",
                           "--reply-timeout", "nonsense"], input=b"")
    assert "--reply-timeout" in err, err
    one_line_exit_2(["request", "--redis", URL, "--stream", "rr8",
                     "--reply-stream", "a b"], input=b"")
    one_line_exit_2(["run", "--stream", "rr8-r", "--group", "g",
                     "--join-requests"], input=b"")
    err = one_line_exit_2(["send", "--redis", URL, "--stream", "rr8",
                           "--reply-timeout", "1s", f])
    assert "--reply-to" in err, err
    assert cli("EXISTS", "rr8") == 0, "refused, yet it sent"


def main():
    global URL
    try:
        _, URL = rh.start_server()
    except Exception as e:  # a missing server is a failure, not a skip
        print(f"test_reqreply_redis: cannot start redis-server: {e}")
        print(f"0 passed, {len(suite.tests)} failed")
        return 1
    try:
        return suite.run(TMP, seed=SEED, only_env="OQ_RR_TESTS")
    finally:
        rh.stop_server()


if __name__ == "__main__":
    sys.exit(main())
