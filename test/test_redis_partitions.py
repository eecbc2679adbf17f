#!/usr/bin/env python3
"""Description: end-to-end tests of onceq's partitioned Redis streams
(`--partitions P`: stream S is P streams {S:0} .. {S:P-1}, an event in
partition XXH3-64(id) mod P) against one real redis-server and against a
Redis Cluster of 3 masters started on loopback by the tests (and stopped
after). Each test computes the right answer independently, in Python,
from the input file (word counts of each id's first copy, the partition of
each id with libxxhash's XXH3_64bits), and checks what Redis holds, read
with redis-cli (redis-cli -c on the cluster), and what `onceq export` and
`onceq dlq` print: every event in its partition, counts applied exactly
once, the partitions' stats balanced, P fixed at the first use. Faults:
kill -9 of a consumer (a survivor takes its messages over), kill -9 of a
cluster master's redis-server with AOF and its restart (consumers wait
and go on), a partition's slot moved to another master mid-run (MOVED and
ASK followed). Prints "N passed, N failed". redis-server missing is a
failure (make deps installs it).

Environment: ONCEQ (the binary; default ./onceq), OQ_RUN_SEED, BUILD (a
sanitizer build gets smaller inputs and longer waits), OQ_REDIS_TESTS
(comma-separated parts of test names: run only those)."""
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Suite  # noqa: E402
import redis_harness as rh  # noqa: E402
from redis_harness import (  # noqa: E402
    stats_of, read_events, expected_words, with_poison,
    ONCEQ, SLOW, SEED, TMP, path, run, start, finish, wait_for,
    one_line_exit_2, script_file)

print(f"test_redis_partitions: seed {SEED} (OQ_RUN_SEED), binary {ONCEQ}")

suite = Suite()
tests = suite.tests
test = suite.test

N = 3000 if SLOW else 20000      # events of the bigger cases
WAIT = 4 if SLOW else 1          # visibility timeouts in fault tests, s
LONG = 180 if SLOW else 60       # bound on a consumer's run, s


# --------------------------------------------------- where the keys are

class Target:
    """One Redis (the shared server) or the cluster: its URL for onceq
    and a redis-cli reader (redis-cli -c on the cluster)."""

    def __init__(self, url, cli):
        self.url = url
        self.cli = cli

    def hash_of(self, key):
        h = self.cli("HGETALL", key)
        if isinstance(h, dict):
            return {k: int(v) for k, v in h.items()}
        return {h[i]: int(h[i + 1]) for i in range(0, len(h or []), 2)}

    def hget(self, key, field):
        return self.cli("HGET", key, field)

    def entries(self, key):
        return [rh.fields_of(f) for _, f in self.cli("XRANGE", key, "-", "+")]


SINGLE = None          # Target of the shared redis-server
_CLUSTER = None        # the shared Cluster, started by the first cluster test


def cluster():
    """The shared 3-master cluster (started at first use), waited for
    until every node says cluster_state:ok (a test before may have
    restarted a node or moved a slot). AOF with appendfsync always: see
    a_cluster_master_killed_and_restarted_loses_nothing."""
    global _CLUSTER
    if _CLUSTER is None:
        c = rh.Cluster(masters=3, appendonly=True, appendfsync="always",
                       name="cl")
        c.start()
        _CLUSTER = c
    _CLUSTER.wait_ok(60)
    return _CLUSTER


def ctarget(c):
    return Target(c.url, c.cli)


def part(s, k):
    """Partition k's name (its stream key; every other key of it starts
    with it): {S:k}, one Redis Cluster hash tag."""
    return "{" + s + ":" + str(k) + "}"


# ------------------------------------------------ the partition of an id

_xxh = ctypes.CDLL("libxxhash.so.0")
_xxh.XXH3_64bits.restype = ctypes.c_uint64
_xxh.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


def partition_of(event_id, p):
    b = event_id.encode("utf-8")
    return _xxh.XXH3_64bits(b, len(b)) % p if p > 1 else 0


# ------------------------------------------------------------- onceq

def gen(name, *args):
    rc, out, err = run(["gen", "-o", path(name)] + list(args))
    assert rc == 0, f"gen failed: {err}"
    return path(name)


def send(t, stream, f, *extra, url=None):
    rc, out, err = run(["send", "--redis", url or t.url, "--stream", stream]
                       + list(extra) + [f], timeout=LONG)
    assert rc == 0, f"send: {rc} {err}"
    return out


def consumer(t, stream, name, *extra, url=None, drain=True):
    args = ["run", "--redis", url or t.url, "--stream", stream, "--group",
            "g", "--consumer", name, "-q", "--stats",
            path(f"{stream}-{name}.stats")] + (["--drain"] if drain else [])
    return start(args + list(extra))


def summed_stats(t, s, p):
    """The sum over the partitions of {S:k}:stats, field by field."""
    total = Counter()
    for k in range(p):
        total.update(t.hash_of(part(s, k) + ":stats"))
    return dict(total)


def check_balanced(t, s, p):
    """Drained: sent = processed + duplicates + dead over the partitions,
    and nothing pending in any of them."""
    st = summed_stats(t, s, p)
    assert st.get("sent", 0) == st.get("processed", 0) + \
        st.get("duplicates", 0) + st.get("dead", 0), st
    for k in range(p):
        n = t.cli("XPENDING", part(s, k), "g")[0]
        assert n == 0, f"{n} messages pending in {part(s, k)}"
    return st


def check_stream_stats(st_json, summed):
    """A consumer's --stats "stream": the partitions' sums (at its end:
    drained, so the totals' four fields are final)."""
    got = st_json["stream"]
    for f in ("sent", "processed", "duplicates", "dead"):
        assert int(got.get(f, 0)) == summed.get(f, 0), (f, got, summed)


def export(t, s, url=None):
    rc, out, err = run(["export", "--redis", url or t.url, "--stream", s],
                       timeout=LONG)
    assert rc == 0, (rc, err)
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def export_counts(t, s, url=None):
    """export's counts: each word once, sorted by word."""
    rows = export(t, s, url)
    words = [r["word"] for r in rows]
    assert words == sorted(set(words)), "export: not sorted, or a word twice"
    return {r["word"]: r["count"] for r in rows}


def redis_counts(t, s, p):
    """The sum over the partitions of {S:k}:counts, read from Redis."""
    total = Counter()
    for k in range(p):
        total.update(t.hash_of(part(s, k) + ":counts"))
    return dict(total)


def check_routing(t, s, p, want_ids=None):
    """Every entry of every partition's stream is in the partition of its
    id (an entry without an id: partition 0); returns the ids found, per
    partition. With want_ids, their multiset is exactly that."""
    found = []
    per = []
    for k in range(p):
        ids = []
        for e in t.entries(part(s, k)):
            try:
                ev = json.loads(e["e"])
                i = ev.get("id") if isinstance(ev, dict) else None
            except ValueError:
                i = None
            if isinstance(i, str) and i:
                assert partition_of(i, p) == k, \
                    f"id {i} in {part(s, k)}, its partition is " \
                    f"{partition_of(i, p)}"
                ids.append(i)
            else:
                assert k == 0, f"a line without an id in {part(s, k)}"
        found += ids
        per.append(ids)
    if want_ids is not None:
        assert Counter(found) == Counter(want_ids), \
            (len(found), len(want_ids))
    return per


def stream_ids(t, key):
    """{entry id: event id} of a stream's entries."""
    out = {}
    for eid, f in t.cli("XRANGE", key, "-", "+"):
        try:
            ev = json.loads(rh.fields_of(f)["e"])
        except ValueError:   # a bad line
            ev = None
        out[eid] = ev.get("id") if isinstance(ev, dict) else None
    return out


def record_ids(rows):
    return [r["k"] for r in rows]


def kill(p):
    if p is not None and p.poll() is None:
        p.kill()
        p.wait()


def reply_handler():
    """An exec handler that takes a few ms and writes a record with the
    event's id."""
    return "exec:" + script_file(
        "rec.sh", "read -r l\nsleep 0.002\n"
        "printf '{\"k\":\"%s\"}\\n' \"$ONCEQ_EVENT_ID\"\n")


# ---------------------------------------------------------------- tests

@test
def partitions_spread_events_and_apply_each_once():
    # One Redis, --partitions 4: every event in its id's partition (so
    # every copy of an id meets one done-mark: the duplicates, sent with
    # --dedup-window 0, are caught by the consumers), three consumers
    # drain all four, and the counts are exact.
    s, p = "pa", 4
    f = gen("pa.jsonl", "--events", str(N), "--duplicates", "0.2",
            "--words", "50", "--seed", str(SEED))
    events = read_events(f)
    ids = [e["id"] for e in events]
    uniq = len(set(ids))
    out = send(SINGLE, s, f, "--partitions", str(p), "--dedup-window", "0")
    assert out.strip().startswith(f"sent {len(events)},"), out
    assert SINGLE.hget(s + ":meta", "partitions") == str(p)
    per = check_routing(SINGLE, s, p, ids)
    for k in range(p):
        assert SINGLE.cli("XLEN", part(s, k)) > 0, f"{part(s, k)} is empty"
        assert len(per[k]) > 0
    # The partitions hold the events, not the stream's own keys.
    assert SINGLE.cli("EXISTS", s, s + ":counts", s + ":stats") == 0
    ps = [consumer(SINGLE, s, f"c{i}", "-w", "2") for i in range(3)]
    for q in ps:
        rc, _, err = finish(q, LONG)
        assert rc == 0, f"consumer exit {rc}: {err}"
    want = expected_words(events)
    assert redis_counts(SINGLE, s, p) == want, "counts in Redis"
    assert export_counts(SINGLE, s) == want, "export"
    st = check_balanced(SINGLE, s, p)
    assert st["sent"] == len(events), st
    assert st["processed"] == uniq, st
    assert st["duplicates"] == len(events) - uniq, st
    assert st.get("dead", 0) == 0, st
    done = sum(stats_of(s, f"c{i}")["processed"] for i in range(3))
    assert done == uniq, done
    for i in range(3):
        check_stream_stats(stats_of(s, f"c{i}"), st)
    # A consumer started now has nothing to do, and its -o is export's.
    rc, _, err = run(["run", "--redis", SINGLE.url, "--stream", s, "--group",
                      "g", "--drain", "-q", "-o", path("pa.out")])
    assert rc == 0, err
    assert open(path("pa.out")).read() == "".join(
        json.dumps({"word": w, "count": want[w]}, separators=(",", ":"))
        + "\n" for w in sorted(want)), "run -o"


@test
def partitions_are_fixed_at_the_first_use():
    s, p = "pb", 4
    f1 = gen("pb1.jsonl", "--events", "2000", "--duplicates", "0.1",
             "--seed", str(SEED + 1))
    ev1 = read_events(f1)
    u1 = {e["id"] for e in ev1}
    out = send(SINGLE, s, f1, "--partitions", str(p))
    assert out.strip() == \
        f"sent {len(u1)}, rejected {len(ev1) - len(u1)} duplicates", out
    # A later send without --partitions uses the recorded 4: the copies of
    # the first file's ids meet their dedup keys in their partitions.
    f2 = path("pb2.jsonl")
    extra = gen("pb2x.jsonl", "--events", "500", "--seed", str(SEED + 2))
    with open(f2, "w") as g:
        g.write(open(f1).read())
        for e in read_events(extra):
            e["id"] = "new-" + e["id"]
            g.write(json.dumps(e, separators=(",", ":")) + "\n")
    ev2 = read_events(f2)
    out = send(SINGLE, s, f2)
    assert out.strip() == f"sent 500, rejected {len(ev1)} duplicates", out
    check_routing(SINGLE, s, p, sorted(u1) + [f"new-{e['id']}" for e in
                                              read_events(extra)])
    # Another P is refused, by send and by run; nothing is written.
    xlens = [SINGLE.cli("XLEN", part(s, k)) for k in range(p)]
    for args in (["send", "--redis", SINGLE.url, "--stream", s,
                  "--partitions", "3", f2],
                 ["run", "--redis", SINGLE.url, "--stream", s, "--group",
                  "g", "--drain", "--partitions", "3"]):
        err = one_line_exit_2(args)
        assert "partitions" in err and "4" in err, err
    assert [SINGLE.cli("XLEN", part(s, k)) for k in range(p)] == xlens
    assert SINGLE.cli("EXISTS", part(s, 4)) == 0
    assert SINGLE.hget(s + ":meta", "partitions") == "4"
    # The same P again is fine; consumers without --partitions read all 4.
    out = send(SINGLE, s, f1, "--partitions", "4")
    assert out.strip() == f"sent 0, rejected {len(ev1)} duplicates", out
    ps = [consumer(SINGLE, s, f"c{i}", "-w", "2") for i in range(2)]
    for q in ps:
        rc, _, err = finish(q, LONG)
        assert rc == 0, (rc, err)
    want = expected_words(ev2)
    assert export_counts(SINGLE, s) == want
    st = check_balanced(SINGLE, s, p)
    assert st["processed"] == len(u1) + 500, st
    # A stream first used without --partitions keeps its layout and
    # refuses them.
    leg = "pleg"
    send(SINGLE, leg, f1)
    assert SINGLE.hget(leg + ":meta", "partitions") is None
    for args in (["send", "--redis", SINGLE.url, "--stream", leg,
                  "--partitions", "2", f1],
                 ["run", "--redis", SINGLE.url, "--stream", leg, "--group",
                  "g", "--drain", "--partitions", "2"]):
        err = one_line_exit_2(args)
        assert "--partitions" in err, err
    assert SINGLE.cli("EXISTS", part(leg, 0), part(leg, 1)) == 0
    assert SINGLE.hget(leg + ":meta", "partitions") is None
    q = consumer(SINGLE, leg, "c0")
    rc, _, err = finish(q, LONG)
    assert rc == 0, err
    assert SINGLE.hash_of(leg + ":counts") == expected_words(ev1)
    # A name with a brace cannot be a hash tag's inside: refused.
    for name in ("a{b", "a}b", "{ab}"):
        for args in (["send", "--redis", SINGLE.url, "--stream", name,
                      "--partitions", "2", f1],
                     ["run", "--redis", SINGLE.url, "--stream", name,
                      "--group", "g", "--drain", "--partitions", "2"]):
            one_line_exit_2(args)
        assert SINGLE.cli("EXISTS", name, name + ":meta") == 0, name
    assert SINGLE.cli("KEYS", "*a{b*") == [], "written under a{b"
    # P from 1 to 256.
    for bad in ("0", "257", "x", "-1"):
        err = one_line_exit_2(["send", "--redis", SINGLE.url, "--stream",
                               "pinv", "--partitions", bad, f1])
        assert "--partitions" in err, err
    assert SINGLE.cli("EXISTS", "pinv:meta", "pinv") == 0
    out = send(SINGLE, "pmax", f1, "--partitions", "256")
    assert SINGLE.hget("pmax:meta", "partitions") == "256"
    check_routing(SINGLE, "pmax", 256, sorted(u1))


def pending_of(t, key, name):
    """Messages of stream key pending with consumer name of group g."""
    try:
        info = t.cli("XINFO", "CONSUMERS", key, "g") or []
    except RuntimeError:  # no group yet
        return 0
    for c in info:
        d = rh.fields_of(c)
        if d["name"] == name:
            return int(d["pending"])
    return 0


def pending_of_parts(t, s, name, p):
    return sum(pending_of(t, part(s, k), name) for k in range(p))


def killed_consumer_taken_over(t, s, p):
    # A consumer killed with -9 while it holds messages of several
    # partitions: the survivor takes them over after the visibility
    # timeout. Records (an exec handler): each id committed once.
    n = 300 if SLOW else 800
    f = gen(f"{s}.jsonl", "--events", str(n), "--duplicates", "0.1",
            "--seed", str(SEED + 3))
    events = read_events(f)
    ids = {e["id"] for e in events}
    send(t, s, f, "--partitions", str(p), "--dedup-window", "0")
    h = reply_handler()
    vt = f"{WAIT}s"
    victim = consumer(t, s, "victim", "-w", "4", "--batch", "16",
                      "--handler", h, "--visibility-timeout", vt)
    surv = None
    try:
        # Let it commit some, then stop it while it holds messages.
        wait_for(lambda: sum(t.cli("XLEN", part(s, k) + ":results")
                             for k in range(p)) >= 20, LONG,
                 "the victim's first results")
        for _ in range(500):
            victim.send_signal(signal.SIGSTOP)
            if pending_of_parts(t, s, "victim", p) > 0:
                break
            victim.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        orphaned = pending_of_parts(t, s, "victim", p)
        assert orphaned > 0, "the victim never held a message"
        held_in = [k for k in range(p)
                   if pending_of(t, part(s, k), "victim") > 0]
        victim.kill()
        victim.wait()
        surv = consumer(t, s, "survivor", "-w", "4", "--handler", h,
                        "--visibility-timeout", vt)
        rc, _, err = finish(surv, LONG)
        assert rc == 0, (rc, err)
    finally:
        kill(victim)
        kill(surv)
    got = Counter(record_ids(export(t, s)))
    twice = sorted(i for i, c in got.items() if c > 1)
    assert not twice, f"committed more than once: {twice[:5]}"
    assert set(got) == ids, f"never committed: {sorted(ids - set(got))[:5]}"
    st = check_balanced(t, s, p)
    assert st["processed"] == len(ids), st
    assert st["duplicates"] == len(events) - len(ids), st
    sv = stats_of(s, "survivor")
    assert sv["redelivered"] >= orphaned, (sv["redelivered"], orphaned,
                                           held_in)
    check_stream_stats(sv, st)


@test
def a_killed_consumer_is_taken_over_in_every_partition():
    killed_consumer_taken_over(SINGLE, "pc", 4)


@test
def a_killed_consumer_is_taken_over_on_a_cluster():
    killed_consumer_taken_over(ctarget(cluster()), "pk", 6)


@test
def dead_letters_of_every_partition_are_listed_redriven_and_purged():
    s, p = "pd", 4
    raw = gen("pd.jsonl", "--events", "2000", "--duplicates", "0.1",
              "--poison", "0.03", "--seed", str(SEED + 4))
    f = path("pd-p.jsonl")
    poison = with_poison(raw, f)
    events = read_events(f)
    with open(f, "a") as g:
        g.write('not json\n{"no_id":1}\n')
    send(SINGLE, s, f, "--partitions", str(p), "--dedup-window", "0")
    ps = [consumer(SINGLE, s, f"c{i}", "-w", "2") for i in range(2)]
    for q in ps:
        rc, _, err = finish(q, LONG)
        assert rc in (0, 1), (rc, err)
    # In Redis: each poison id dead once, in its own partition; the bad
    # lines in partition 0; dead letters in more than one partition.
    where = {}
    for k in range(p):
        for d in SINGLE.entries(part(s, k) + ":dlq"):
            if d["reason"] == "failed":
                assert d["id"] not in where, f"{d['id']} dead twice"
                assert partition_of(d["id"], p) == k, d["id"]
                where[d["id"]] = k
            else:
                assert k == 0, (k, d)
    assert set(where) == poison, (len(where), len(poison))
    assert len(set(where.values())) >= 2, "dead letters in one partition"
    st = check_balanced(SINGLE, s, p)
    assert st["dead"] == len(poison) + 2, st
    # dlq list: every partition's.
    rc, out, err = run(["dlq", "list", "--redis", SINGLE.url, "--stream", s])
    assert rc == 0, err
    rows = [json.loads(x) for x in out.splitlines()]
    assert sorted(r["id"] for r in rows if r["reason"] == "failed") == \
        sorted(poison)
    assert Counter(r["reason"] for r in rows if r["reason"] != "failed") \
        == {"parse_error": 1, "bad_id": 1}, rows
    before = [stream_ids(SINGLE, part(s, k)) for k in range(p)]
    # redrive: every partition's, each back into its own partition, its
    # id unsettled there: a consumer dead-letters each once again.
    rc, out, err = run(["dlq", "redrive", "--redis", SINGLE.url, "--stream",
                        s, "--reason", "failed"])
    assert rc == 0 and out.strip() == f"redrove {len(poison)} dead letters", \
        (out, err)
    for k in range(p):
        left = [d["reason"] for d in SINGLE.entries(part(s, k) + ":dlq")]
        assert "failed" not in left, (k, left)
    # The new entries (those not there before the redrive) are exactly
    # the poison events, each in its partition.
    back = []
    for k in range(p):
        for eid, ev in stream_ids(SINGLE, part(s, k)).items():
            if eid not in before[k]:
                assert partition_of(ev, p) == k, (ev, k)
                back.append(ev)
    assert sorted(back) == sorted(poison), (len(back), len(poison))
    q = consumer(SINGLE, s, "c2")
    rc, _, err = finish(q, LONG)
    assert rc == 1, (rc, err)
    again = Counter(d["id"] for k in range(p)
                    for d in SINGLE.entries(part(s, k) + ":dlq")
                    if d["reason"] == "failed")
    assert set(again) == poison and max(again.values()) == 1, again
    st = check_balanced(SINGLE, s, p)
    assert st["redriven"] == len(poison), st
    assert st["dead"] == 2 * len(poison) + 2, st
    assert export_counts(SINGLE, s) == expected_words(events, poison)
    # purge: every partition's.
    rc, out, err = run(["dlq", "purge", "--redis", SINGLE.url, "--stream",
                        s, "--dry-run"])
    assert out.strip() == f"would purge {len(poison) + 2} dead letters", out
    rc, out, err = run(["dlq", "purge", "--redis", SINGLE.url, "--stream", s])
    assert rc == 0 and out.strip() == f"purged {len(poison) + 2} dead " \
        "letters", (out, err)
    assert sum(SINGLE.cli("XLEN", part(s, k) + ":dlq") for k in range(p)) \
        == 0
    rc, out, err = run(["dlq", "list", "--redis", SINGLE.url, "--stream", s])
    assert rc == 0 and out == "", (out, err)


@test
def bad_input_has_the_same_outcome_with_partitions():
    # gen --bad (every kind of bad line; lines without an id go to
    # partition 0): the outcome, summed over the partitions, is the
    # unpartitioned stream's, reason by reason.
    f = gen("bad.jsonl", "--bad")
    send(SINGLE, "pbad1", f, "--dedup-window", "0")
    send(SINGLE, "pbadp", f, "--dedup-window", "0", "--partitions", "3")
    for s in ("pbad1", "pbadp"):
        rc, _, err = finish(consumer(SINGLE, s, "c0"), LONG)
        assert rc == 1, (s, rc, err)
    one = SINGLE.hash_of("pbad1:stats")
    parts = check_balanced(SINGLE, "pbadp", 3)
    assert one.get("processed") == 5 and one.get("duplicates") == 1 and \
        one.get("dead") == 18, one
    assert parts == one, (parts, one)
    assert export_counts(SINGLE, "pbadp") == \
        {r["word"]: r["count"] for r in export(SINGLE, "pbad1")}


# ------------------------------------------------------------ cluster

@test
def an_id_in_another_partition_is_dead_lettered_not_applied_twice():
    # send routes by its --id-field; a consumer with another one would find
    # copies of one of its ids in several partitions, each with its own
    # claim and done-mark: applied once per partition. It dead-letters an
    # id found outside its partition instead (reason rejected).
    s, p = "idf", 8
    with open(path("idf.jsonl"), "w") as g:
        for i in range(200):
            g.write(json.dumps({"id": f"a{i}", "key": f"k{i % 50}",
                                "word": f"w{i % 50}"}) + "\n")
    send(SINGLE, s, path("idf.jsonl"), "--partitions", str(p))
    rc, _, err = finish(consumer(SINGLE, s, "c0", "--id-field", "key"),
                        LONG)
    assert rc == 1, (rc, err)   # dead letters
    counts = export_counts(SINGLE, s)
    assert all(v == 1 for v in counts.values()), counts
    st = check_balanced(SINGLE, s, p)
    assert st["processed"] == len(counts) and st["dead"] > 0, st
    assert st["dead"] == st.get("dead:rejected"), st
    rc, out, _ = run(["dlq", "list", "--redis", SINGLE.url, "--stream", s])
    rows = [json.loads(x) for x in out.splitlines()]
    assert rows and all("another --id-field" in r["error"] for r in rows)


@test
def a_cluster_spreads_partitions_over_its_masters():
    c = cluster()
    t = ctarget(c)
    s, p = "ce", 6
    f = gen("ce.jsonl", "--events", str(N), "--duplicates", "0.2",
            "--words", "50", "--seed", str(SEED + 5))
    events = read_events(f)
    ids = [e["id"] for e in events]
    uniq = len(set(ids))
    # send given one node of the cluster: it finds the others.
    one = f"redis://127.0.0.1:{c.ports[1]}"
    out = send(t, s, f, "--partitions", str(p), "--dedup-window", "0",
               url=one)
    assert out.strip().startswith(f"sent {len(events)},"), out
    assert t.hget(s + ":meta", "partitions") == str(p)
    check_routing(t, s, p, ids)
    masters = {c.port_of_key(part(s, k)) for k in range(p)}
    assert len(masters) > 1, f"every partition on {masters}"
    # Read on each node without redirections: a partition's stream is
    # on the master that serves its slot, and no other.
    holding = set()
    for k in range(p):
        on = [port for port in c.ports
              if c.cli_at(port, "EXISTS", part(s, k)) == "1"]
        assert on == [c.port_of_key(part(s, k))], (k, on)
        holding.update(on)
    assert len(holding) > 1, "the partitions' streams are on one master"
    assert sum(1 for port in c.ports if c.dbsize(port) > 0) > 1
    ps = [consumer(t, s, f"c{i}", "-w", "2") for i in range(3)]
    for q in ps:
        rc, _, err = finish(q, LONG)
        assert rc == 0, (rc, err)
    want = expected_words(events)
    assert redis_counts(t, s, p) == want, "counts in Redis"
    assert export_counts(t, s, url=one) == want, "export"
    st = check_balanced(t, s, p)
    assert st["sent"] == len(events) and st["processed"] == uniq, st
    assert st["duplicates"] == len(events) - uniq, st
    for i in range(3):
        check_stream_stats(stats_of(s, f"c{i}"), st)


@test
def a_consumer_holds_few_connections_to_each_primary():
    # One connection per primary and thread, however many partitions: a
    # consumer -w 2 holds at most 2 x 2 + 3 connections to a master (the
    # workers' readers and writers, the heartbeat's, the housekeeper's,
    # the main one), with 24 partitions over 3 masters (one connection
    # per partition and thread would be about 8 x 6 a master).
    c = cluster()
    t = ctarget(c)
    s, p, w = "cn", 24, 2
    f = gen("cn.jsonl", "--events", "400", "--duplicates", "0",
            "--seed", str(SEED + 9))
    send(t, s, f, "--partitions", str(p), "--dedup-window", "0")
    slow = "exec:sh -c 'cat >/dev/null; sleep 0.01'"
    q = consumer(t, s, "cn1", "-w", str(w), "--handler", slow, drain=False)
    try:
        wait_for(lambda: summed_stats(t, s, p).get("processed", 0) >= 100,
                 LONG, "the consumer's first hundred events")
        per = {}
        for port in c.ports:
            lines = c.cli_at(port, "CLIENT", "LIST").splitlines()
            per[port] = sum(1 for ln in lines if " name=onceq:cn1:" in ln)
        assert all(n <= 2 * w + 3 for n in per.values()), per
        assert sum(1 for n in per.values() if n > 0) == len(c.ports), per
        rc, _, err = finish(consumer(t, s, "cn2", "-w", "2", "--handler",
                                     "exec:cat"), LONG)
        assert rc == 0, (rc, err)
    finally:
        kill(q)
    st = check_balanced(t, s, p)
    assert st["processed"] == 400, st


@test
def a_cluster_refuses_a_stream_without_partitions_and_request_reply():
    c = cluster()
    t = ctarget(c)
    f = path("cf.jsonl")
    with open(f, "w") as g:
        g.write('{"id":"1","word":"a"}\n')
    for args in (["send", "--redis", c.url, "--stream", "cf", f],
                 ["run", "--redis", c.url, "--stream", "cf", "--group", "g",
                  "--drain"]):
        err = one_line_exit_2(args)
        assert "--partitions" in err, err
    assert t.cli("EXISTS", "cf") == 0 and t.cli("EXISTS", "cf:meta") == 0
    assert t.cli("EXISTS", part("cf", 0)) == 0
    # Request-reply is not for a cluster.
    for args in (["send", "--redis", c.url, "--stream", "cr",
                  "--partitions", "2", "--reply-to", "crr", f],
                 ["request", "--redis", c.url, "--stream", "cr",
                  "--partitions", "2", "--reply-timeout", "1s", f],
                 ["request", "--redis", c.url, "--stream", "cr",
                  "--reply-timeout", "1s", f],
                 ["run", "--redis", c.url, "--stream", "crr", "--group",
                  "g", "--partitions", "2", "--join-requests", "--drain"]):
        rc, out, err = run(args, timeout=60)
        assert rc == 2, (args, rc, err)
    assert t.cli("EXISTS", "cr:meta") == 0 and \
        t.cli("EXISTS", part("cr", 0)) == 0 and \
        t.cli("EXISTS", part("cr", 1)) == 0


@test
def a_cluster_master_killed_and_restarted_loses_nothing():
    # kill -9 of the redis-server of a master holding partitions, mid-run,
    # and its restart on the same port with the same directory (AOF,
    # nodes-P.conf). Meanwhile the cluster is down (cluster_state:fail:
    # the other masters answer -CLUSTERDOWN once it is marked failed; no
    # replica takes over): the consumers, and a send that is feeding
    # events from a pipe, wait (reconnect backoff) and go on. Every event
    # sent (what send reported sent) committed exactly once.
    # The servers run with appendfsync always: with everysec, Redis may
    # answer a write before write(2)-ing it to the AOF when an fsync is
    # slow (it postpones the write up to 2 s), so even a crash of the
    # process alone could lose acknowledged commits, and "exactly once"
    # would not be Redis's to keep.
    c = cluster()
    t = ctarget(c)
    s, p = "cg", 6
    n = 600 if SLOW else 2000
    f = gen("cg.jsonl", "--events", str(n), "--duplicates", "0.1",
            "--seed", str(SEED + 6))
    events = read_events(f)
    send(t, s, f, "--partitions", str(p), "--dedup-window", "0")
    victim_port = c.port_of_key(part(s, 0))
    h = reply_handler()
    ps = [consumer(t, s, f"c{i}", "-w", "4", "--handler", h,
                   "--visibility-timeout", f"{2 * WAIT}s")
          for i in range(2)]
    # The late send: one event per Lua call (--batch 1), from a pipe that
    # a thread feeds, 100 a second, from before the kill to after the
    # restart.
    late = None
    written = []
    stop = threading.Event()

    def feed(pipe):
        try:
            while not stop.is_set():
                i = len(written)
                pipe.write(json.dumps({"id": f"late-{i}", "word": "w"})
                           .encode() + b"\n")
                pipe.flush()
                written.append(f"late-{i}")
                time.sleep(0.01)
        finally:
            pipe.close()
    th = None
    try:
        late = subprocess.Popen(
            [ONCEQ, "send", "--redis", c.url, "--stream", s,
             "--dedup-window", "0", "--batch", "1", "-"], cwd=TMP,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        th = threading.Thread(target=feed, args=(late.stdin,))
        late.stdin = None     # the thread's: communicate() leaves it
        th.start()
        wait_for(lambda: summed_stats(t, s, p).get("processed", 0) >= n // 4
                 and summed_stats(t, s, p).get("sent", 0) > len(events),
                 LONG, "a quarter processed, and late events sent")
        c.kill9(victim_port)
        # Until the others mark it failed (node timeout 2 s): from then on
        # they answer -CLUSTERDOWN, which is waited out too.
        live = next(x for x in c.ports if x != victim_port)
        wait_for(lambda: c.info_of(live).get("cluster_state") == "fail",
                 30, "cluster_state:fail")
        time.sleep(0.5)
        assert all(q.poll() is None for q in ps), \
            [finish(q) for q in ps if q.poll() is not None]
        assert late.poll() is None, finish(late)
        c.restart(victim_port)
        time.sleep(0.5)
        stop.set()
        th.join(30)
        rc, out, err = finish(late, LONG)
        assert rc == 0 and out.strip().startswith(f"sent {len(written)},"), \
            (rc, out, err, len(written))
        for i, q in enumerate(ps):
            rc, _, err = finish(q, LONG)
            assert rc == 0, (i, rc, err)
        # What the late send put in after a consumer's last look.
        q = consumer(t, s, "c9", "-w", "4", "--handler", h)
        rc, _, err = finish(q, LONG)
        assert rc == 0, (rc, err)
    finally:
        stop.set()
        for q in ps + [late]:
            kill(q)
        if th is not None:
            th.join(30)
        if c.procs[victim_port].poll() is not None:
            c.restart(victim_port)
    ids = {e["id"] for e in events} | set(written)
    got = Counter(record_ids(export(t, s)))
    twice = sorted(i for i, k in got.items() if k > 1)
    assert not twice, f"committed more than once: {twice[:5]}"
    assert set(got) == ids, f"never committed: {sorted(ids - set(got))[:5]}"
    st = check_balanced(t, s, p)
    assert st["sent"] == len(events) + len(written), st
    assert st["processed"] == len(ids), st
    assert max(stats_of(s, f"c{i}")["reconnects"] for i in range(2)) >= 1


@test
def a_half_moved_slot_leaves_no_half_commit():
    # A slot moved key by key: a partition's done-mark and dedup buckets
    # already on the new master, its stream, stats, meta and claims still
    # on the old one (so a SEND script, whose declared keys are all there,
    # runs there and meets the moved buckets). The scripts read every
    # bucket they will write before their first write (a commit that
    # failed after marking ids done would lose their counts), and wait
    # ("non local key" is transient) until the move ends; every event is
    # applied once. Before: send exited 3 at once.
    c = cluster()
    t = ctarget(c)
    s = "hm"
    f1 = gen("hm1.jsonl", "--events", "300", "--duplicates", "0.2",
             "--seed", str(SEED + 21))
    f2 = gen("hm2.jsonl", "--events", "300", "--duplicates", "0.2",
             "--seed", str(SEED + 22))
    with open(path("hm2b.jsonl"), "w") as g:
        g.write(open(f1).read())
        for e in read_events(f2):
            e["id"] = "n-" + e["id"]
            g.write(json.dumps(e, separators=(",", ":")) + "\n")
    send(t, s, f1, "--partitions", "1")
    rc, _, err = finish(consumer(t, s, "h0", "-w", "2"), LONG)
    assert rc == 0, (rc, err)
    slot = c.keyslot(part(s, 0))
    src = c.port_of_slot(slot)
    dst = next(q for q in c.master_ports() if q != src)
    # Entries read while the move waited may outlive their delivery:
    # taken over a visibility timeout later.
    vt = f"{3 * WAIT}s"
    marks = c.cli_at(src, "KEYS", part(s, 0) + ":d*").split()
    assert any(":dd:" in k for k in marks), ("no dedup buckets", marks)
    late = []

    def half_moved():
        late.append(start(["send", "--redis", t.url, "--stream", s,
                           path("hm2b.jsonl")]))
        late.append(consumer(t, s, "h1", "-w", "2",
                             "--visibility-timeout", vt))
        time.sleep(1.5 if not SLOW else 4)
        for q in late:
            assert q.poll() is None, ("ended with the slot half moved",
                                      q.args, q.poll())

    try:
        c.migrate_slot(slot, dst, first=marks, between=half_moved)
        for q in late:
            rc, out, err = finish(q, LONG)
            assert rc == 0, (q.args, rc, err)
    finally:
        for q in late:
            kill(q)
    # The send waited for the move: h1's drain may have ended before its
    # events came. Another drain takes what is left.
    rc, _, err = finish(consumer(t, s, "h2", "-w", "2",
                                 "--visibility-timeout", vt), LONG)
    assert rc == 0, (rc, err)
    events = read_events(f1) + read_events(path("hm2b.jsonl"))
    got, want = export_counts(t, s), expected_words(events)
    assert got == want, {k: (got.get(k), want.get(k))
                         for k in set(got) | set(want)
                         if got.get(k) != want.get(k)}
    st = check_balanced(t, s, 1)
    assert st["processed"] == len({e["id"] for e in events}), st


@test
def a_partitions_slot_moved_mid_run_is_followed():
    # The slot of partition 0 moves to another master while consumers
    # (running, not draining) read and commit, and sends add events in
    # small files one after the other (keys migrated a few at a time:
    # meanwhile ASK and TRYAGAIN, then MOVED). Counts exact.
    c = cluster()
    t = ctarget(c)
    s, p = "ch", 6
    n = N // 2
    f = gen("ch.jsonl", "--events", str(n), "--duplicates", "0.1",
            "--words", "40", "--seed", str(SEED + 7))
    f2 = gen("ch2.jsonl", "--events", str(n), "--duplicates", "0.1",
             "--words", "40", "--seed", str(SEED + 8))
    ev2 = []
    for e in read_events(f2):
        e["id"] = "b-" + e["id"]
        ev2.append(e)
    chunks = []
    for i in range(0, len(ev2), 200):
        chunks.append(path(f"ch2-{i // 200}.jsonl"))
        with open(chunks[-1], "w") as g:
            for e in ev2[i:i + 200]:
                g.write(json.dumps(e, separators=(",", ":")) + "\n")
    events = read_events(f) + ev2
    uniq = len({e["id"] for e in events})
    send(t, s, f, "--partitions", str(p), "--dedup-window", "0")
    slot = c.keyslot(part(s, 0))
    src = c.port_of_slot(slot)
    dst = next(x for x in c.ports if x != src)
    ps = [consumer(t, s, f"c{i}", "-w", "2", drain=False) for i in range(2)]
    sends = []

    def sender():
        for ch in chunks:
            t0 = time.time()
            r = run(["send", "--redis", c.url, "--stream", s,
                     "--dedup-window", "0", ch], timeout=LONG)
            sends.append(r + (t0, time.time()))
            time.sleep(0.02)
    th = threading.Thread(target=sender)
    try:
        wait_for(lambda: summed_stats(t, s, p).get("processed", 0) > 0,
                 LONG, "the first commits")
        th.start()
        m0 = time.time()
        moved = c.migrate_slot(slot, dst, batch=2, pause=0.05)
        m1 = time.time()
        assert moved > 0, "nothing in the slot"
        assert c.port_of_key(part(s, 0)) == dst
        assert c.cli_at(dst, "EXISTS", part(s, 0)) == "1"
        assert c.cli_at(src, "CLUSTER", "COUNTKEYSINSLOT", slot) == "0"
        th.join(LONG)
        assert not th.is_alive(), "the sends did not end"
        assert len(sends) == len(chunks), "a send did not run"
        for rc, out, err, _, _ in sends:
            assert rc == 0 and out.startswith("sent "), (rc, out, err)
        assert sum(int(x[1].split()[1].rstrip(",")) for x in sends) == \
            len(ev2)
        # (What this test is about: sends ran while the slot moved.)
        assert any(a < m1 and b > m0 for _, _, _, a, b in sends), \
            "no send overlapped the migration"
        # Everything settled by the running consumers, then stopped.
        wait_for(lambda: (lambda st: st.get("sent", 0) == len(events) and
                          st.get("processed", 0) + st.get("duplicates", 0)
                          == len(events))(summed_stats(t, s, p)),
                 LONG, "every event settled")
        for i, q in enumerate(ps):
            assert q.poll() is None, (i, finish(q))
            q.send_signal(signal.SIGTERM)
            rc, _, err = finish(q, LONG)
            assert rc in (0, 143), (i, rc, err)
        q = consumer(t, s, "c9", "-w", "2")
        rc, _, err = finish(q, LONG)
        assert rc == 0, (rc, err)
    finally:
        for q in ps:
            kill(q)
        th.join(LONG) if th.is_alive() else None
    want = expected_words(events)
    assert redis_counts(t, s, p) == want, "counts in Redis"
    assert export_counts(t, s) == want, "export"
    st = check_balanced(t, s, p)
    assert st["sent"] == len(events), st
    assert st["processed"] == uniq, st


def main():
    global SINGLE
    try:
        port, url = rh.start_server()
    except Exception as e:  # a missing server is a failure, not a skip
        print(f"test_redis_partitions: cannot start redis-server: {e}")
        print(f"0 passed, {len(tests)} failed")
        return 1
    SINGLE = Target(url, rh.cli)
    try:
        return suite.run(TMP, seed=SEED, only_env="OQ_REDIS_TESTS")
    finally:
        if _CLUSTER is not None:
            _CLUSTER.stop()
        rh.stop_server()


if __name__ == "__main__":
    sys.exit(main())
