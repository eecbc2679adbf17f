#!/usr/bin/env python3
"""Description: end-to-end tests of onceq over Redis Streams (`onceq send`,
`onceq run --redis`, `onceq dlq|export --redis`) against a real
redis-server started on a free loopback port (and stopped after). Several
onceq processes consume one stream at once; each test computes the right
answer independently, in Python, from the input file, and checks what Redis
holds (read with redis-cli, not with onceq): counts applied exactly once,
dead letters exactly the poison and bad events, every entry acked. Faults:
kill -9 of a consumer (a survivor takes its messages over after the
visibility timeout), SIGSTOP past the lease then SIGCONT (fencing refuses
the late commit), CLIENT KILL of a consumer's connections (it reconnects;
nothing is applied twice). Prints "N passed, N failed". redis-server
missing is a failure (make deps installs it).

Environment: ONCEQ (the binary; default ./onceq), OQ_RUN_SEED, BUILD (a
sanitizer build gets smaller inputs and longer waits), OQ_REDIS_TESTS
(comma-separated parts of test names: run only those)."""
import json
import re
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Suite, parse_metrics  # noqa: E402
import redis_harness as rh  # noqa: E402
from redis_harness import (  # noqa: E402
    stats_of, read_events, expected_words, with_poison,
    ONCEQ, SLOW, SEED, TMP, path, free_port, cli, cli_raw, hash_of,
    entries, pending, pending_of, run, start, finish, wait_for,
    one_line_exit_2, script_file, lines_of)

print(f"test_redis: seed {SEED} (OQ_RUN_SEED), binary {ONCEQ}")

suite = Suite()
tests = suite.tests
test = suite.test
# The shared server's, set by main() from rh.start_server().
PORT = None
URL = None


# ------------------------------------------------------------- onceq

def gen(name, *args):
    rc, out, err = run(["gen", "-o", path(name)] + list(args))
    assert rc == 0, f"gen failed: {err}"
    return path(name)


def send(stream, f, *extra):
    rc, out, err = run(["send", "--redis", URL, "--stream", stream] +
                       list(extra) + [f])
    assert rc == 0, f"send: {rc} {err}"
    return out


def consumer(stream, name, *extra, stats=True):
    args = ["run", "--redis", URL, "--stream", stream, "--group", "g",
            "--consumer", name, "--drain", "-q"]
    if stats:
        args += ["--stats", path(f"{stream}-{name}.stats")]
    return start(args + list(extra))


def check_balanced(stream):
    st = hash_of(f"{stream}:stats")
    assert st.get("sent", 0) == st.get("processed", 0) + \
        st.get("duplicates", 0) + st.get("dead", 0), st
    assert pending(stream, "g") == 0, "messages still pending"
    return st


N = 6000 if SLOW else 60000
WAIT = 4 if SLOW else 1          # visibility timeouts in fault tests, s


# ---------------------------------------------------------------- tests

@test
def three_consumers_apply_each_event_once():
    raw = gen("three.jsonl", "--events", str(N), "--duplicates", "0.1",
              "--poison", "0.01", "--seed", str(SEED))
    f = path("three-p.jsonl")
    poison = with_poison(raw, f)
    events = read_events(f)
    send("three", f, "--dedup-window", "0")
    ps = [consumer("three", f"c{i}", "-w", "2") for i in range(3)]
    for p in ps:
        rc, _, err = finish(p)
        assert rc in (0, 1), f"consumer exit {rc}: {err}"
    assert hash_of("three:counts") == expected_words(events, poison)
    st = check_balanced("three")
    uniq = len({e["id"] for e in events})
    assert st["processed"] == uniq - len(poison), st
    assert st["duplicates"] == len(events) - uniq, st
    done = sum(stats_of("three", f"c{i}")["processed"] for i in range(3))
    assert done == uniq - len(poison), done


@test
def dead_letters_are_exactly_the_poison_and_bad_events():
    raw = gen("dl.jsonl", "--events", "3000", "--duplicates", "0.2",
              "--poison", "0.03", "--seed", str(SEED + 1))
    f = path("dl-p.jsonl")
    poison = with_poison(raw, f)
    with open(f, "a") as g:
        g.write('not json\n{"no_id":1}\n{"id":""}\n\n')
    send("dl", f, "--dedup-window", "0")
    ps = [consumer("dl", f"c{i}", "-w", "2") for i in range(3)]
    for p in ps:
        assert finish(p)[0] in (0, 1)
    dead = entries("dl:dlq")
    failed = sorted(d["id"] for d in dead if d["reason"] == "failed")
    assert failed == sorted(poison), (len(failed), len(poison))
    others = Counter(d["reason"] for d in dead if d["reason"] != "failed")
    assert others == {"parse_error": 1, "bad_id": 2}, others
    for d in dead:
        assert d["source"].startswith(f + ":"), d
    check_balanced("dl")


@test
def output_matches_the_in_process_run():
    f = gen("same.jsonl", "--events", "5000", "--duplicates", "0.1",
            "--text", "--seed", str(SEED + 2))
    send("same", f)
    p = consumer("same", "c0", "-o", path("same.out"))
    assert finish(p)[0] == 0
    rc, ref, err = run(["run", "-w", "2", f])
    assert rc == 0, err
    assert open(path("same.out")).read() == ref


@test
def send_rejects_duplicates_within_the_window():
    f = gen("dup.jsonl", "--events", "4000", "--duplicates", "0.25",
            "--seed", str(SEED + 3))
    uniq = len({e["id"] for e in read_events(f)})
    out = send("dup", f)
    assert out.strip() == f"sent {uniq}, rejected {4000 - uniq} duplicates", \
        out
    assert cli("XLEN", "dup") == uniq
    out = send("dup", f)
    assert out.strip() == f"sent 0, rejected 4000 duplicates", out


@test
def transient_failures_are_retried_through_the_delayed_set():
    f = gen("retry.jsonl", "--events", "60", "--seed", str(SEED + 4))
    script = path("flaky.sh")
    with open(script, "w") as g:
        g.write('#!/bin/sh\n[ "$ONCEQ_ATTEMPT" -lt 2 ] && exit 75\ncat\n')
    os.chmod(script, 0o755)
    send("retry", f)
    p = consumer("retry", "c0", "-w", "4", "--handler", f"exec:{script}",
                 "--backoff", "10ms,50ms")
    rc, _, err = finish(p)
    assert rc == 0, err
    got = sorted(json.loads(e["r"])["id"] for e in entries("retry:results"))
    assert got == sorted(e["id"] for e in read_events(f))
    st = check_balanced("retry")
    assert st["retried"] == 60 and cli("ZCARD", "retry:delayed") == 0, st


@test
def max_attempts_dead_letters_with_the_last_error():
    f = gen("maxa.jsonl", "--events", "5", "--seed", str(SEED + 5))
    send("maxa", f)
    p = consumer("maxa", "c0", "--handler", "exec:echo down >&2; exit 75",
                 "--max-attempts", "3", "--backoff", "5ms,20ms")
    assert finish(p)[0] == 1
    dead = entries("maxa:dlq")
    assert len(dead) == 5, dead
    for d in dead:
        assert d["reason"] == "max_attempts" and d["attempts"] == "3", d
        assert "down" in d["error"], d


@test
def kill_9_consumer_is_taken_over_after_the_visibility_timeout():
    f = gen("crash.jsonl", "--events", str(N), "--duplicates", "0.1",
            "--seed", str(SEED + 6))
    events = read_events(f)
    send("crash", f, "--dedup-window", "0")
    vt = f"{WAIT}s"
    victim = consumer("crash", "victim", "-w", "2", "--batch", "64",
                      "--visibility-timeout", vt, stats=False)
    # Stop it while it holds messages, then kill it: they are orphaned.
    for _ in range(200):
        time.sleep(0.02)
        victim.send_signal(signal.SIGSTOP)
        if pending_of("crash", "victim") > 0:
            break
        victim.send_signal(signal.SIGCONT)
    orphaned = pending_of("crash", "victim")
    assert orphaned > 0, "the victim never held a message"
    victim.kill()
    victim.wait()
    surv = consumer("crash", "survivor", "-w", "2",
                    "--visibility-timeout", vt)
    rc, _, err = finish(surv)
    assert rc == 0, err
    assert hash_of("crash:counts") == expected_words(events)
    check_balanced("crash")
    assert stats_of("crash", "survivor")["redelivered"] >= orphaned


@test
def sigstop_past_the_lease_is_fenced():
    f = gen("hang.jsonl", "--events", "400", "--seed", str(SEED + 7))
    ids = sorted(e["id"] for e in read_events(f))
    send("hang", f)
    # The first handler call anywhere (one of a's) marks its start and
    # takes a second: a is stopped inside it, holding a claimed id, and not
    # merely between a read and its claims (nothing to fence then).
    marker = path("hang-started")
    slow = (f"exec:if [ ! -e {marker} ]; then : > {marker}; sleep 1; fi; "
            "sleep 0.01; cat")
    vt = f"{WAIT}s"
    a = consumer("hang", "a", "-w", "2", "--handler", slow,
                 "--visibility-timeout", vt)
    # Stop a while it holds claimed ids (in a handler call).
    wait_for(lambda: os.path.exists(marker) and pending_of("hang", "a") > 0,
             30, "a to start a handler")
    a.send_signal(signal.SIGSTOP)
    held = pending_of("hang", "a")
    b = consumer("hang", "b", "-w", "2", "--handler", slow,
                  "--visibility-timeout", vt)
    # b finishes everything, a's messages after the lease (b drains them).
    rc, _, err = finish(b)
    a.send_signal(signal.SIGCONT)
    rca, _, erra = finish(a)
    assert rc == 0 and rca == 0, (rc, err, rca, erra)
    got = sorted(json.loads(e["r"])["id"] for e in entries("hang:results"))
    assert got == ids, "an id was applied twice or never"
    sa = stats_of("hang", "a")
    assert held > 0 and sa["fenced"] + sa["settled_elsewhere"] >= 1, sa
    check_balanced("hang")


@test
def client_kill_mid_run_changes_nothing():
    f = gen("kill.jsonl", "--events", str(N), "--duplicates", "0.1",
            "--seed", str(SEED + 8))
    events = read_events(f)
    send("kill", f, "--dedup-window", "0")
    vt = f"{WAIT}s"
    a = consumer("kill", "a", "-w", "2", "--batch", "32",
                 "--visibility-timeout", vt)
    b = consumer("kill", "b", "-w", "2", "--batch", "32",
                 "--visibility-timeout", vt)
    # Kill a's connections as soon as they are there, three rounds: a
    # fast consumer (the sanitizer builds are not always slower) may
    # otherwise be done before the first look.
    killed = rounds = 0
    deadline = time.time() + 30
    while rounds < 3 and time.time() < deadline:
        found = 0
        for c in cli_raw("CLIENT", "LIST").splitlines():
            d = dict(kv.split("=", 1) for kv in c.split(" ") if "=" in kv)
            if d.get("name", "").startswith("onceq:a:"):
                cli("CLIENT", "KILL", "ID", d["id"])
                found += 1
        killed += found
        rounds += found > 0
        time.sleep(0.05 if found else 0.005)
    assert killed > 0, "found no connection of consumer a"
    for p in (a, b):
        rc, _, err = finish(p)
        assert rc == 0, err
    assert hash_of("kill:counts") == expected_words(events)
    check_balanced("kill")
    assert stats_of("kill", "a")["reconnects"] >= 1


def result_ids(stream):
    return [json.loads(e["r"])["id"] for e in entries(f"{stream}:results")]


@test
def own_pending_entry_redelivered_while_busy_is_committed_once():
    # x1's id is held by a foreign claim for 1.5 s: the consumer keeps its
    # entry BUSY, longer than the visibility timeout (0.3 s), so the
    # entry's idle time would let XAUTOCLAIM hand it back to the same
    # consumer, again and again, while a copy waits in memory. When the
    # claim ends, one commit: the word is counted once. ("warm" first, so
    # the worker knows the handler is fast and reads big batches.)
    with open(path("own.jsonl"), "w") as g:
        g.write('{"id":"warm","word":"a"}\n{"id":"x1","word":"b"}\n')
    cli("SET", "own:id:x1", "someone-else", "PX", "1500")
    send("own", path("own.jsonl"))
    p = consumer("own", "c0", "-w", "1", "--visibility-timeout", "300ms")
    rc, _, err = finish(p)
    assert rc == 0, err
    assert hash_of("own:counts") == {"a": 1, "b": 1}, hash_of("own:counts")
    st = check_balanced("own")
    assert st["processed"] == 2, st


@test
def crashed_backlog_taken_over_by_a_slow_survivor_commits_each_id_once():
    # A consumer that read 250 entries and crashed ("ghost": read with
    # redis-cli, never handled), and one killed with -9 mid-run: a single
    # survivor (one worker, a handler of about 10 ms) takes both backlogs
    # over, more than it can finish in one visibility timeout. Each id is
    # committed once, and S:stats balances. (Before the fix, entries taken
    # over again while a copy waited in memory were committed twice in
    # about one run out of three.)
    f = gen("bl.jsonl", "--events", "300", "--seed", str(SEED + 9))
    ids = sorted({e["id"] for e in read_events(f)})
    cli("XGROUP", "CREATE", "bl", "g", "0", "MKSTREAM")
    send("bl", f)
    cli("XREADGROUP", "GROUP", "g", "ghost", "COUNT", "250", "STREAMS", "bl",
        ">")
    slow = script_file("bl.sh", "sleep 0.005; cat\n")
    vt = "500ms"
    victim = consumer("bl", "victim", "-w", "2", "--handler",
                      f"exec:{slow}", "--visibility-timeout", vt,
                      stats=False)
    wait_for(lambda: pending_of("bl", "victim") > 0, 30, "victim to read")
    victim.kill()
    victim.wait()
    surv = consumer("bl", "survivor", "-w", "1", "--handler",
                    f"exec:{slow}", "--visibility-timeout", vt)
    rc, _, err = finish(surv)
    assert rc == 0, err
    got = Counter(result_ids("bl"))
    twice = sorted(i for i, c in got.items() if c > 1)
    assert not twice, f"committed more than once: {twice}"
    assert sorted(got) == ids, "an id was never committed"
    st = check_balanced("bl")
    assert st["processed"] == len(ids) and st.get("dead", 0) == 0, st


@test
def hanging_events_do_not_dead_letter_their_batch_mates():
    # 10 events that hang (killed at --timeout, each time)
    # among 60 healthy ones, two consumers, default --max-attempts: the
    # hanging ones end as max_attempts dead letters, once each; every
    # healthy one runs once and is committed once.
    evs = []
    for i in range(70):
        kind = "hang" if i % 7 == 3 else "ok"
        evs.append({"id": f"{kind}-{i}", "word": f"w{i}"})
    with open(path("hb.jsonl"), "w") as g:
        for e in evs:
            g.write(json.dumps(e) + "\n")
    log = path("hb.log")
    h = script_file("hb.sh", f'echo "$ONCEQ_EVENT_ID" >> {log}\n'
                    'case "$ONCEQ_EVENT_ID" in hang*) exec sleep 30;; esac\n'
                    'cat\n')
    send("hb", path("hb.jsonl"))
    ps = [consumer("hb", f"c{i}", "-w", "3", "--handler", f"exec:{h}",
                   "--visibility-timeout", "500ms", "--timeout", "500ms",
                   "--kill-grace", "0")
          for i in range(2)]
    for p in ps:
        rc, _, err = finish(p)
        assert rc in (0, 1), err
    hang = sorted(e["id"] for e in evs if e["id"].startswith("hang"))
    ok = sorted(e["id"] for e in evs if e["id"].startswith("ok"))
    dead = entries("hb:dlq")
    assert sorted(d["id"] for d in dead) == hang, \
        sorted(d["id"] for d in dead)
    assert all(d["reason"] == "max_attempts" for d in dead), dead
    assert sorted(result_ids("hb")) == ok
    ran = Counter(x for x in lines_of(log) if x.startswith("ok"))
    twice = sorted(i for i, c in ran.items() if c != 1)
    assert not twice and sorted(ran) == ok, f"healthy ids run twice: {twice}"
    st = check_balanced("hb")
    assert st["processed"] == len(ok) and st["dead"] == len(hang), st


@test
def copies_at_max_attempts_are_one_dead_letter():
    # Three copies of one id (no producer dedup) whose handler always asks
    # for a retry: the id is dead-lettered once, when its first copy runs
    # out of attempts; the other copies are duplicates of that outcome.
    with open(path("cp.jsonl"), "w") as g:
        g.write('{"id":"c1","word":"a"}\n' * 3)
    send("cp", path("cp.jsonl"), "--dedup-window", "0")
    p = consumer("cp", "c0", "-w", "1", "--handler", "exec:exit 75",
                 "--max-attempts", "2", "--backoff", "5ms,10ms")
    assert finish(p)[0] == 1
    dead = entries("cp:dlq")
    assert [d["id"] for d in dead] == ["c1"], dead
    st = check_balanced("cp")
    assert st["dead"] == 1 and st["duplicates"] == 2, st


@test
def drain_on_an_empty_stream_exits_at_once():
    t0 = time.time()
    rc, _, err = run(["run", "--redis", URL, "--stream", "empty", "--group",
                      "g", "--drain", "-q"])
    assert rc == 0, err
    assert time.time() - t0 < 10
    assert cli("EXISTS", "empty") == 1  # created with MKSTREAM


# ------------------------------------------------- heartbeats and metrics

metrics = parse_metrics


def attempts_log(stream, body):
    """A command that logs "id attempt" when it starts and when it ends."""
    log = path(f"{stream}.log")
    h = script_file(f"{stream}.sh",
                    f'echo "start $ONCEQ_EVENT_ID $ONCEQ_ATTEMPT" >> {log}\n'
                    + body +
                    f'echo "end $ONCEQ_EVENT_ID $ONCEQ_ATTEMPT" >> {log}\n'
                    'cat\n')
    return h, log


@test
def a_long_command_keeps_its_lease_with_a_consumer_beside_it():
    # 1.5 s of work with a 300 ms lease (five leases), and a second
    # consumer that would take the entry over if its lease ran out: the
    # heartbeats keep it, so it runs once, with attempt 1, and ends.
    with open(path("lk.jsonl"), "w") as g:
        g.write('{"id":"a","word":"x"}\n')
    h, log = attempts_log("lk", "sleep 1.5\n")
    send("lk", path("lk.jsonl"))
    p0 = consumer("lk", "c0", "--handler", f"exec:{h}",
                  "--visibility-timeout", "300ms")
    wait_for(lambda: lines_of(log), 30, "the command to start")
    p1 = consumer("lk", "c1", "--handler", f"exec:{h}",
                  "--visibility-timeout", "300ms")
    for p in (p0, p1):
        rc, _, err = finish(p)
        assert rc == 0, err
    assert lines_of(log) == ["start a 1", "end a 1"], lines_of(log)
    st0, st1 = stats_of("lk", "c0"), stats_of("lk", "c1")
    assert st0["processed"] == 1 and st1["processed"] == 0, (st0, st1)
    assert st0["lease_extensions"] > 0, st0
    assert st0["fenced"] == 0 and st1["redelivered"] == 0, (st0, st1)
    st = check_balanced("lk")
    assert st["processed"] == 1, st


@test
def a_command_past_its_timeout_is_killed_and_retried():
    # --timeout 400ms below the command's first run (1.5 s): killed, and
    # retried (attempt 2), which ends in time.
    with open(path("to.jsonl"), "w") as g:
        g.write('{"id":"a","word":"x"}\n')
    h, log = attempts_log("to", 'if [ "$ONCEQ_ATTEMPT" = 1 ]; then '
                          'sleep 1.5; fi\n')
    send("to", path("to.jsonl"))
    p = consumer("to", "c0", "--handler", f"exec:{h}",
                 "--visibility-timeout", "300ms", "--timeout", "400ms",
                 "--kill-grace", "0", "--backoff", "5ms,10ms")
    rc, _, err = finish(p)
    assert rc == 0, err
    assert lines_of(log) == ["start a 1", "start a 2", "end a 2"], \
        lines_of(log)
    s = stats_of("to", "c0")
    assert s["processed"] == 1 and s["retried"] == 1, s
    assert s["lease_extensions"] > 0, s
    st = check_balanced("to")
    assert st["processed"] == 1, st


@test
def a_command_that_beats_runs_past_its_timeout():
    # ONCEQ_HEARTBEAT_FD: a line every 200 ms keeps a 1.4 s command alive
    # under --timeout 500ms, on its first attempt.
    with open(path("hbfd.jsonl"), "w") as g:
        g.write('{"id":"a","word":"x"}\n')
    h, log = attempts_log("hbfd", 'for i in 1 2 3 4 5 6 7; do sleep 0.2; '
                          'echo >&$ONCEQ_HEARTBEAT_FD; done\n')
    send("hbfd", path("hbfd.jsonl"))
    p = consumer("hbfd", "c0", "--handler", f"exec:{h}",
                 "--visibility-timeout", "300ms", "--timeout", "500ms",
                 "--max-attempts", "1")
    rc, _, err = finish(p)
    assert rc == 0, err
    assert lines_of(log) == ["start a 1", "end a 1"], lines_of(log)
    st = check_balanced("hbfd")
    assert st["processed"] == 1, st


@test
def a_stopped_consumers_backlog_waits_for_busy_workers():
    # A is stopped past several leases while B's workers all run long
    # handlers: B must not take A's entries over again and again (each
    # takeover a delivery) until they reach --max-attempts unrun.
    events = "".join(f'{{"id":"s{i}","word":"w"}}\n' for i in range(8))
    with open(path("stop.jsonl"), "w") as g:
        g.write(events)
    h, log = attempts_log("stop", "sleep 1\n")
    send("stop", path("stop.jsonl"))
    args = ["-w", "2", "--handler", f"exec:{h}", "--visibility-timeout",
            "300ms", "--max-attempts", "3"]
    a = consumer("stop", "a", *args)
    b = consumer("stop", "b", *args)
    wait_for(lambda: os.path.exists(log) and
             len(lines_of(log)) >= 2, 30, "a start")
    a.send_signal(signal.SIGSTOP)
    time.sleep(2.5)
    a.send_signal(signal.SIGCONT)
    rca, _, erra = finish(a)
    rcb, _, errb = finish(b)
    assert rca == 0 and rcb == 0, (rca, erra, rcb, errb)
    assert entries("stop:dlq") == [], entries("stop:dlq")
    st = check_balanced("stop")
    assert st["processed"] == 8 and st.get("dead", 0) == 0, st


@test
def a_killed_consumer_is_retried_one_lease_later():
    # kill -9 mid-handler (the command would run 30 s): another consumer
    # runs the entry again about one lease (300 ms) later, not one
    # timeout (60 s) later, and it is committed once.
    with open(path("kh.jsonl"), "w") as g:
        g.write('{"id":"a","word":"x"}\n')
    pidf = path("kh.pid")
    h, log = attempts_log("kh", 'if [ "$ONCEQ_ATTEMPT" = 1 ]; then '
                          f'echo $$ > {pidf}; exec sleep 30; fi\n')
    send("kh", path("kh.jsonl"))
    vt = ["--visibility-timeout", "300ms", "--timeout", "60s"]
    victim = consumer("kh", "victim", "--handler", f"exec:{h}", *vt,
                      stats=False)
    wait_for(lambda: lines_of(log), 30, "the command to start")
    time.sleep(0.5)  # past one lease: heartbeats keep it meanwhile
    victim.kill()
    victim.wait()
    t0 = time.time()
    surv = consumer("kh", "survivor", "--handler", f"exec:{h}", *vt)
    wait_for(lambda: "end a 2" in lines_of(log), 20, "the retry")
    took = time.time() - t0
    rc, _, err = finish(surv)
    assert rc == 0, err
    assert took < (8 if SLOW else 3), took
    assert lines_of(log) == ["start a 1", "start a 2", "end a 2"], \
        lines_of(log)
    assert result_ids("kh") == ["a"]
    st = check_balanced("kh")
    assert st["processed"] == 1, st
    try:  # the orphaned command of the killed consumer
        os.kill(int(open(pidf).read()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


@test
def metrics_listen_serves_and_the_file_equals_stats():
    f = path("mx.jsonl")
    with open(f, "w") as g:
        for i in range(200):
            g.write(f'{{"id":"e{i}","word":"w{i % 7}"}}\n')
        g.write('{"id":"e3","word":"w3"}\nnot json\n{"word":"no id"}\n')
    send("mx", f, "--dedup-window", "0")
    port = free_port()
    mfile = path("mx.prom")
    go = path("mx.go")
    # Held back until the first GET has answered: the consumer is running.
    h = script_file("mx.sh", f"while [ ! -e {go} ]; do sleep 0.01; done\n"
                    "cat\n")
    p = consumer("mx", "c0", "-w", "2", "--handler", f"exec:{h}",
                 "--metrics", mfile, "--metrics-interval", "100ms",
                 "--metrics-listen", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/metrics"
    body = None
    for _ in range(400):
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = r.read().decode()
            m = metrics(body)
            if m[("onceq_queue_in_flight", ())] > 0:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)
    assert body is not None, "no answer on /metrics"
    m = metrics(body)
    assert m[("onceq_queue_in_flight", ())] > 0, body
    assert ("onceq_queue_ready", ()) in m, body
    open(go, "w").close()
    rc, _, err = finish(p)
    assert rc == 1, err  # the two bad lines
    m = metrics(open(mfile).read())
    s = stats_of("mx", "c0")
    ev = {o: m[("onceq_events_total", (("outcome", o),))]
          for o in ("processed", "duplicate", "dead", "retried")}
    assert ev == {"processed": s["processed"], "duplicate": s["duplicates"],
                  "dead": s["dead"], "retried": s["retried"]}, (ev, s)
    assert s["processed"] == 200 and s["duplicates"] == 1, s
    assert s["dead"] == 2, s
    for reason, n in s["dead_by_reason"].items():
        assert m[("onceq_dead_letters_total", (("reason", reason),))] == n
    assert m[("onceq_lease_extensions_total", ())] == s["lease_extensions"]
    assert m[("onceq_fenced_total", ())] == s["fenced"]
    # Drained: the last write says nothing waits (it said the backlog the
    # housekeeper had read a second before).
    assert m[("onceq_queue_ready", ())] == 0, m
    assert m[("onceq_queue_oldest_ready_age_seconds", ())] == 0, m
    assert m[("onceq_queue_in_flight", ())] == 0
    assert m[("onceq_handler_duration_seconds_count", ())] >= s["processed"]
    check_balanced("mx")


@test
def bad_url_is_refused():
    err = one_line_exit_2(["run", "--redis", "http://x", "--stream", "s",
                           "--group", "g"])
    assert "bad Redis URL" in err, err
    # The message never shows a password.
    err = one_line_exit_2(["run", "--redis",
                           "redis://u:hunter2@127.0.0.1:99999", "--stream",
                           "s", "--group", "g"])
    assert "bad Redis URL" in err and "hunter2" not in err, err


@test
def a_comma_password_and_a_user_without_role():
    # A list is split where the next redis:// starts, so a password may
    # hold a comma; a user not allowed ROLE is taken to be on the primary.
    port = free_port()
    srv = server_on(port, "--requirepass", "pa,ss")
    try:
        f = path("cp.jsonl")
        with open(f, "w") as g:
            g.write('{"id":"1","word":"a"}\n')
        rc, out, err = run(["send", "--redis",
                            f"redis://:pa,ss@127.0.0.1:{port}", "--stream",
                            "cp", f])
        assert rc == 0 and out.startswith("sent 1,"), (rc, out, err)
        cli_at(port, "-a", "pa,ss", "ACL", "SETUSER", "lim", "on", ">pw",
               "~*", "+@all", "-role")
        rc, out, err = run(["send", "--redis",
                            f"redis://lim:pw@127.0.0.1:{port}", "--stream",
                            "cp2", f])
        assert rc == 0 and out.startswith("sent 1,"), (rc, out, err)
    finally:
        stop(srv)


@test
def unsupported_and_bad_options_are_refused():
    base = ["run", "--redis", f"redis://127.0.0.1:{PORT}", "--stream", "s",
            "--group", "g"]
    # --progress works with --redis now (progress_line_with_redis); an
    # option of the in-memory engine is refused instead.
    err = one_line_exit_2(base + ["--state", path("x.db")])
    assert "--state cannot be used with --redis" in err, err
    err = one_line_exit_2(base + ["--backoff", "5s,1s"])
    assert "--backoff" in err, err


@test
def progress_line_with_redis():
    with open(path("pg.jsonl"), "w") as g:
        g.write("".join(f'{{"id":"{i}","word":"w{i % 7}"}}\n'
                        for i in range(3000)))
        g.write('{"id":"5","word":"w5"}\nnot json\n')
    send("pg", path("pg.jsonl"), "--dedup-window", "0")
    rc, out, err = run(["run", "--redis", URL, "--stream", "pg", "--group",
                        "g", "--consumer", "c0", "--drain", "--progress",
                        "-w", "2", "--stats", path("pg.stats")])
    assert rc == 1, (rc, err)  # one dead letter: the bad line
    assert "ev/s" in err and "done " in err, err
    # The summary in the in-memory run's words, for this consumer.
    assert "onceq: consumer c0: 3002 lines: 3000 processed, 1 duplicates, " \
        "1 dead-lettered, 0 blank in " in err, err
    assert "onceq: dead letters in pg:dlq: parse_error 1" in err, err
    st = json.load(open(path("pg.stats")))
    # The in-memory stats' fields (but bytes: input read), plus Redis's.
    f = gen("pg-local.jsonl", "--events", "10")
    rc2, _, err2 = run(["run", "-q", "--stats", path("pg-local.stats"), f])
    assert rc2 == 0, err2
    local = json.load(open(path("pg-local.stats")))
    missing = set(local) - set(st) - {"bytes"}
    assert not missing, missing
    assert st["lines"] == 3002 and st["processed"] == 3000, st
    assert st["dead_by_reason"]["parse_error"] == 1, st
    for k in ("busy", "settled_elsewhere", "reconnects", "consumer",
              "stream"):
        assert k in st, k
    check_balanced("pg")


@test
def unreachable_server_is_refused():
    err = one_line_exit_2(["send", "--redis",
                           f"redis://127.0.0.1:{free_port()}", "--stream",
                           "s", "/dev/null"])
    assert "cannot connect" in err, err


@test
def auth_failure_is_refused():
    cli("ACL", "SETUSER", "tester", "on", ">right", "~*", "+@all")
    err = one_line_exit_2(["run", "--redis",
                           f"redis://tester:wrong@127.0.0.1:{PORT}",
                           "--stream", "s", "--group", "g"])
    assert "AUTH" in err, err
    rc, _, err = run(["send", "--redis",
                      f"redis://tester:right@127.0.0.1:{PORT}/2",
                      "--stream", "authok", "/dev/null"])
    assert rc == 0, err


def redis_cli_wired(cmd):
    rc, _, err = run([cmd, "--redis", URL, "--stream", "x"] +
                     (["list"] if cmd == "dlq" else []))
    return "not implemented" not in err


@test
def dlq_redrive_sends_a_failed_event_back():
    if not redis_cli_wired("dlq"):
        print("  (skipped: state_cli.c does not hand dlq --redis over yet)")
        return
    with open(path("rd.jsonl"), "w") as g:
        g.write('{"id":"p1"}\n{"id":"ok","word":"w"}\n')
    send("rd", path("rd.jsonl"))
    assert finish(consumer("rd", "c0"))[0] == 1
    rc, out, err = run(["dlq", "list", "--redis", URL, "--stream", "rd"])
    assert rc == 0 and json.loads(out)["id"] == "p1", (out, err)
    rc, out, _ = run(["dlq", "redrive", "--redis", URL, "--stream", "rd",
                      "--reason", "failed"])
    assert out.strip() == "redrove 1 dead letters", out
    assert cli("XLEN", "rd:dlq") == 0
    # Fixed (here: still failing, so it comes back: the id was unsettled).
    assert finish(consumer("rd", "c1"))[0] == 1
    assert cli("XLEN", "rd:dlq") == 1


@test
def export_writes_the_counts():
    if not redis_cli_wired("export"):
        print("  (skipped: state_cli.c does not hand export --redis over "
              "yet)")
        return
    with open(path("ex.jsonl"), "w") as g:
        g.write('{"id":"1","word":"b"}\n{"id":"2","word":"a"}\n'
                '{"id":"3","word":"b"}\n')
    send("ex", path("ex.jsonl"))
    assert finish(consumer("ex", "c0"))[0] == 0
    rc, out, err = run(["export", "--redis", URL, "--stream", "ex"])
    assert rc == 0, err
    assert out == '{"word":"a","count":1}\n{"word":"b","count":2}\n', out


# ------------------------------------------------- servers of their own

def server_on(port, *extra, wait_ready=True):
    """A redis-server of a test's own (a config the shared one must not
    get), on port, its files in its own directory under TMP."""
    d = path(f"srv{port}")
    os.makedirs(d, exist_ok=True)
    p = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", d]
        + [str(x) for x in extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):
        out = subprocess.run(["redis-cli", "-p", str(port), "PING"],
                             capture_output=True, text=True).stdout
        if "PONG" in out or "NOAUTH" in out or "LOADING" in out:
            return p
        time.sleep(0.01)
    p.kill()
    raise RuntimeError("redis-server did not start")


def cli_at(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port)] +
                          [str(a) for a in args], capture_output=True,
                          text=True, timeout=60).stdout.strip()


def stop(p):
    p.terminate()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@test
def an_evicting_maxmemory_policy_is_refused():
    with open(path("ev.jsonl"), "w") as g:
        g.write('{"id":"1","word":"a"}\n')
    try:
        for policy in ("allkeys-lru", "volatile-ttl"):
            cli("CONFIG", "SET", "maxmemory-policy", policy)
            for args in (["send", "--redis", URL, "--stream", "ev",
                          path("ev.jsonl")],
                         ["run", "--redis", URL, "--stream", "ev", "--group",
                          "g", "--drain"]):
                err = one_line_exit_2(args)
                assert f"maxmemory-policy {policy}" in err and \
                    "noeviction" in err, err
        assert cli("EXISTS", "ev", "ev:meta") == 0, "refused, yet it wrote"
    finally:
        cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
    # With CONFIG renamed away (as managed services do), INFO tells.
    port = free_port()
    srv = server_on(port, "--rename-command", "CONFIG", "",
                    "--maxmemory-policy", "allkeys-lfu")
    try:
        err = one_line_exit_2(["send", "--redis", f"redis://127.0.0.1:{port}",
                               "--stream", "ev", path("ev.jsonl")])
        assert "maxmemory-policy allkeys-lfu" in err, err
    finally:
        stop(srv)
    # noeviction (the shared server's again): it runs.
    send("ev", path("ev.jsonl"))
    assert finish(consumer("ev", "c0"))[0] == 0
    assert hash_of("ev:counts") == {"a": 1}


def busy_script(seconds):
    """Another client's script that runs for `seconds`: past
    busy-reply-threshold, every other command is answered -BUSY."""
    lua = ("local function now() local t = redis.call('TIME') "
           "return tonumber(t[1]) + tonumber(t[2]) / 1e6 end "
           "local t0 = now() while now() - t0 < tonumber(ARGV[1]) do end "
           "return 1")
    return subprocess.Popen(["redis-cli", "-p", str(PORT), "EVAL", lua, "0",
                             str(seconds)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@test
def busy_server_is_waited_for_not_fatal():
    with open(path("busy.jsonl"), "w") as g:
        g.write("".join(f'{{"id":"{i}","word":"w{i % 7}"}}\n'
                        for i in range(60)))
    h = script_file("busy.sh", "sleep 0.05\ncat\n")
    cli("CONFIG", "SET", "busy-reply-threshold", "100")
    b = None
    try:
        # send's first connection meets -BUSY: it waits, then sends.
        b = busy_script(1.5)
        time.sleep(0.4)
        rc, out, err = run(["send", "--redis", URL, "--stream", "busy", path("busy.jsonl")])
        b.wait()
        assert rc == 0, (rc, err)
        # Consumers (their workers, housekeeper and heartbeats) meet -BUSY
        # mid-run: 60 events of 50 ms take them about 1.5 s.
        ps = [consumer("busy", f"c{i}", "-w", "2", "--handler", f"exec:{h}")
              for i in range(2)]
        wait_for(lambda: cli("XLEN", "busy:results") > 0, 30,
                 "the first results")
        b = busy_script(1.5)
        time.sleep(0.3)
        assert all(p.poll() is None for p in ps), "done before the script"
        b.wait()
        for p in ps:
            rc, _, err = finish(p)
            assert rc == 0, (rc, err)
    finally:
        if b is not None:
            b.wait()
        cli("CONFIG", "SET", "busy-reply-threshold", "5000")
    assert sorted(result_ids("busy"), key=int) == \
        [str(i) for i in range(60)], "an event ran twice or never"
    check_balanced("busy")


@test
def a_restart_with_loading_is_waited_for():
    # A server restarted from its RDB answers -LOADING until it has read it
    # (key-load-delay: 20,000 filler keys take about 2 s; without
    # loading-process-events-interval-bytes a small RDB is loaded before
    # any client is answered): consumers reconnect and wait, and a send
    # started meanwhile waits too.
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    srv = server_on(port)
    p = None
    try:
        cli_at(port, "EVAL", "for i = 1, 20000 do "
               "redis.call('SET', 'filler' .. i, i) end", "0")
        with open(path("ld.jsonl"), "w") as g:
            g.write("".join(f'{{"id":"{i}","word":"w{i % 5}"}}\n'
                            for i in range(40)))
        with open(path("ld2.jsonl"), "w") as g:
            g.write("".join(f'{{"id":"x{i}","word":"w{i % 5}"}}\n'
                            for i in range(40)))
        rc, _, err = run(["send", "--redis", url, "--stream", "ld",
                          path("ld.jsonl")])
        assert rc == 0, err
        h = script_file("ld.sh", "sleep 0.05\ncat\n")
        p = start(["run", "--redis", url, "--stream", "ld", "--group", "g",
                   "--drain", "-q", "--handler", f"exec:{h}",
                   "--stats", path("ld.stats")])
        wait_for(lambda: cli_at(port, "XLEN", "ld:results") not in
                 ("", "0"), 30, "the first results")
        cli_at(port, "SHUTDOWN", "SAVE")
        srv.wait(timeout=30)
        srv = server_on(port, "--key-load-delay", "100",
                        "--loading-process-events-interval-bytes", "1024")
        assert "LOADING" in cli_at(port, "GET", "x"), "not loading"
        rc2, _, err2 = run(["send", "--redis", url, "--stream", "ld",
                            path("ld2.jsonl")])
        assert rc2 == 0, (rc2, err2)
        rc, _, err = finish(p)
        assert rc == 0, (rc, err)
        got = Counter(json.loads(x)["id"] for x in
                      cli_at(port, "EVAL", "local o = {} for _, e in "
                             "ipairs(redis.call('XRANGE', KEYS[1], '-', "
                             "'+')) do o[#o + 1] = e[2][4] end "
                             "return o", "1", "ld:results").splitlines())
        ids = [str(i) for i in range(40)]
        # The second batch was sent after the run's drain could end; what
        # of it ran, ran once.
        assert all(got[i] == 1 for i in ids), got
        assert max(got.values()) == 1, got
        assert json.load(open(path("ld.stats")))["reconnects"] >= 1
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        stop(srv)


@test
def the_results_kind_and_the_group_are_fixed_at_the_first_run():
    """A later consumer with a handler that writes another kind of
    results rewrote S:meta, and `export` then showed nothing (or mixed two
    handlers' counts in one hash); a second group took every event for a
    duplicate and unbalanced S:stats. Both refused (exit 2), nothing
    changed."""
    f = path("fx.jsonl")
    with open(f, "w") as g:
        g.write('{"id":"a","word":"x","c":"k"}\n{"id":"b","word":"y"}\n')
    send("fx", f)
    base = ["run", "--redis", URL, "--stream", "fx", "--drain", "-q"]
    rc, _, err = run(base + ["--group", "g"])
    assert rc == 0, err
    rc, want, err = run(["export", "--redis", URL, "--stream", "fx"])
    assert rc == 0 and want.count("\n") == 2, (rc, want, err)
    meta = cli("HGETALL", "fx:meta")
    for extra, word in ((["--handler", "noop"], "hide"),
                        (["--handler", "count:c"], "mix")):
        rc, out, err = run(base + ["--group", "g"] + extra)
        assert rc == 2 and word in err and "holds counts" in err, \
            (extra, rc, err)
    # The same kind by another handler is accepted.
    rc, _, err = run(base + ["--group", "g", "--handler", "count:word"])
    assert rc == 0, err
    rc, _, err = run(base + ["--group", "other"])
    assert rc == 2 and "consumed by group 'g'" in err, (rc, err)
    assert cli("HGETALL", "fx:meta") == meta
    rc, out, err = run(["export", "--redis", URL, "--stream", "fx"])
    assert rc == 0 and out == want, (out, want)
    st = check_balanced("fx")
    assert st["processed"] == 2 and st.get("duplicates", 0) == 0, st


@test
def the_last_attempt_ends_alike_in_every_mode():
    """A handler that always asks for a retry: in memory, with --state and
    with --redis the same stats (2 retries an event, not 3: the RETRY at
    the last attempt is dead-lettered at once) and the same dead-letter
    text (the memory queue delivered it once more, as dying, and counted
    one more retry; the texts differed)."""
    f = path("la.jsonl")
    with open(f, "w") as g:
        g.write('{"id":"a","word":"x"}\n{"id":"b","word":"y"}\n')
    common = ["--handler", "exec:echo busy >&2; exit 75", "--max-attempts",
              "3", "--backoff", "10ms", "-q"]
    got = {}
    for mode in ("memory", "state", "redis"):
        st, dl = path(f"la-{mode}.stats"), path(f"la-{mode}.dlq")
        if mode == "redis":
            send("la", f)
            rc, _, err = run(["run", "--redis", URL, "--stream", "la",
                              "--group", "g", "--drain", "--stats", st] +
                             common)
            dead = [{"reason": d["reason"], "error": d["error"]}
                    for d in entries("la:dlq")]
        else:
            extra = ["--state", path("la.db")] if mode == "state" else []
            rc, _, err = run(["run", "--stats", st, "--dlq", dl] + extra +
                             common + [f])
            dead = [{"reason": d["reason"], "error": d["error"]}
                    for d in read_events(dl)]
        assert rc == 1, (mode, rc, err)
        s = json.load(open(st))
        got[mode] = ({k: s[k] for k in ("processed", "dead", "retried")},
                     sorted(d["reason"] for d in dead),
                     sorted(d["error"] for d in dead))
    assert got["memory"] == got["state"] == got["redis"], got
    counts, reasons, errors = got["memory"]
    assert counts == {"processed": 0, "dead": 2, "retried": 4}, counts
    assert reasons == ["max_attempts"] * 2, reasons
    assert all(e.startswith("no attempts left") and "busy" in e
               for e in errors), errors


@test
def a_signal_does_not_use_up_the_last_attempt():
    """SIGTERM stops a running exec: handler: the event is scheduled again
    without counting that delivery, so with --max-attempts 1 the next
    consumer runs it (it was dead-lettered: no attempts left)."""
    f = path("sg.jsonl")
    with open(f, "w") as g:
        g.write('{"id":"a","word":"x"}\n{"id":"b","word":"y"}\n')
    send("sg", f)
    flag = path("sg.slow")
    open(flag, "w").close()
    h = f"exec:sh -c 'cat; while [ -e {flag} ]; do sleep 0.05; done'"
    args = ["run", "--redis", URL, "--stream", "sg", "--group", "g", "-q",
            "-w", "2", "--max-attempts", "1", "--handler", h,
            "--backoff", "10ms"]
    p = start(args)

    def taken():
        try:
            return pending("sg", "g") == 2
        except RuntimeError:    # NOGROUP: the consumer is still starting
            return False
    try:
        wait_for(taken, 90 if SLOW else 30, "both events taken")
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        rc, _, err = finish(p)
        assert rc == 143, (rc, err)
    finally:
        if p.poll() is None:    # a failed wait: no consumer left behind
            p.kill()
            p.wait()
        os.unlink(flag)
    rc, _, err = run(args + ["--drain"])
    assert rc == 0, (rc, err)
    st = check_balanced("sg")
    assert st["processed"] == 2 and st.get("dead", 0) == 0, st


@test
def a_stream_that_does_not_exist_is_refused_by_export_and_dlq():
    # A mistyped --stream exited 0 with nothing written.
    for args in (["export"], ["dlq", "list"]):
        rc, out, err = run(args + ["--redis", URL, "--stream", "no-such"])
        assert rc == 2 and "has no stream 'no-such'" in err and out == "", \
            (args, rc, err)


@test
def a_server_that_says_nothing_is_given_up_in_10_s():
    # A TCP server that accepts and never answers (not Redis): it took
    # 61 s and "Resource temporarily unavailable".
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        t0 = time.time()
        rc, _, err = run(["export", "--redis", f"redis://127.0.0.1:{port}",
                          "--stream", "s"], timeout=60)
        took = time.time() - t0
        assert rc == 2 and "no answer in 10 s" in err, (rc, err)
        assert took < 30, took
    finally:
        srv.close()


@test
def hand_made_attempt_fields_are_read_strictly():
    # An entry added by hand with a = -5 and f = -1 was dead-lettered with
    # 4294967292 attempts and first_seen "1970-01-01T00:00:00.-01Z".
    cli("XADD", "hm2", "*", "e", '{"id":"j","word":"ok"}', "s", "hand",
        "a", "-5", "f", "-1")
    cli("HINCRBY", "hm2:stats", "sent", 1)
    rc, _, err = run(["run", "--redis", URL, "--stream", "hm2", "--group",
                      "g", "--drain", "-q", "--handler", "exec:exit 1"])
    assert rc == 1, (rc, err)
    rc, out, err = run(["dlq", "list", "--redis", URL, "--stream", "hm2"])
    assert rc == 0, err
    d = json.loads(out.splitlines()[0])
    assert d["attempts"] == 1, d
    iso = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"
    assert re.match(iso, d["first_seen"]) and re.match(iso, d["last_seen"]), d


@test
def lost_data_stops_the_run_with_exit_3():
    # FLUSHALL mid-run (as a restart without persistence would): the
    # consumer must not re-create the group and drain an empty stream.
    with open(path("lost.jsonl"), "w") as g:
        g.write("".join(f'{{"id":"{i}","word":"w"}}\n' for i in range(30)))
    send("lost", path("lost.jsonl"))
    h = script_file("lost.sh", "sleep 0.05\ncat\n")
    p = consumer("lost", "c0", "--handler", f"exec:{h}")
    wait_for(lambda: cli("XLEN", "lost:results") > 0, 30, "the first results")
    cli("FLUSHALL")
    rc, _, err = finish(p)
    assert rc == 3, (rc, err)
    assert "the Redis data of stream 'lost'" in err and \
        "(restart without persistence, or FLUSHALL?)" in err, err
    assert cli("EXISTS", "lost") == 0, "the stream was started over"


@test
def lost_data_on_reconnect_stops_the_run():
    # A restart without persistence: the consumer's reconnect finds the
    # stream's epoch gone.
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    srv = server_on(port)
    p = None
    try:
        # Many quick events: the workers are claiming and committing
        # when the server goes.
        with open(path("lr.jsonl"), "w") as g:
            g.write("".join(f'{{"id":"{i}","word":"w{i % 7}"}}\n'
                            for i in range(100000)))
        rc, _, err = run(["send", "--redis", url, "--stream", "lr",
                          path("lr.jsonl")])
        assert rc == 0, err
        p = start(["run", "--redis", url, "--stream", "lr", "--group", "g",
                   "--drain", "-q", "-w", "4", "--batch", "16"])
        wait_for(lambda: cli_at(port, "HLEN", "lr:counts") not in
                 ("", "0"), 30, "the first results")
        cli_at(port, "SHUTDOWN", "NOSAVE")
        srv.wait(timeout=30)
        srv = server_on(port)
        rc, _, err = finish(p)
        assert rc == 3, (rc, err)
        assert "the Redis data of stream 'lr'" in err, err
        # Nothing written to the emptied server: a worker whose reconnect
        # found the data lost kept its connection and committed on it
        # (a claim, fenced counts, a done-mark with no sent).
        keys = cli_at(port, "KEYS", "*")
        assert keys in ("", []), keys
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        stop(srv)


@test
def password_from_rediscli_auth():
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    srv = server_on(port, "--requirepass", "s3cr et")
    try:
        with open(path("pw.jsonl"), "w") as g:
            g.write('{"id":"1","word":"a"}\n')
        env = dict(os.environ, REDISCLI_AUTH="s3cr et")
        rc, out, err = run(["send", "--redis", url, "--stream", "pw",
                            path("pw.jsonl")], env=env)
        assert rc == 0, err
        rc, _, err = run(["run", "--redis", url, "--stream", "pw", "--group",
                          "g", "--drain", "-q"], env=env)
        assert rc == 0, err
        assert cli_at(port, "-a", "s3cr et", "--no-auth-warning", "HGET",
                      "pw:counts", "a") == "1"
        # No password anywhere: one line that says where to give it.
        err = one_line_exit_2(["send", "--redis", url, "--stream", "pw",
                               path("pw.jsonl")])
        assert "NOAUTH" in err and "REDISCLI_AUTH" in err, err
        # A wrong one is refused, and not shown.
        rc, _, err = run(["run", "--redis", url, "--stream", "pw", "--group",
                          "g"], env=dict(os.environ,
                                         REDISCLI_AUTH="wrong-secret"))
        assert rc == 2 and "AUTH" in err and "wrong-secret" not in err, err
    finally:
        stop(srv)


@test
def password_from_a_file():
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    srv = server_on(port, "--requirepass", "s3cr et")
    try:
        with open(path("pwf.jsonl"), "w") as g:
            g.write('{"id":"1","word":"a"}\n')
        pw = path("redis.pw")
        with open(pw, "w") as g:
            g.write("s3cr et\n")
        os.chmod(pw, 0o600)
        # A wrong REDISCLI_AUTH: the file wins.
        env = dict(os.environ, REDISCLI_AUTH="wrong-secret")
        rc, out, err = run(["send", "--redis", url, "--stream", "pwf",
                            "--redis-password-file", pw, path("pwf.jsonl")],
                           env=env)
        assert rc == 0 and err == "", (rc, err)
        p = start(["run", "--redis", url, "--stream", "pwf", "--group", "g",
                   "--drain", "-q", "--redis-password-file", pw])
        # Not on the command line (what ps shows).
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            assert b"s3cr" not in f.read()
        rc, _, err = finish(p)
        assert rc == 0, err
        assert cli_at(port, "-a", "s3cr et", "--no-auth-warning", "HGET",
                      "pwf:counts", "a") == "1"
        for cmd in (["export"], ["dlq", "list"]):
            rc, out, err = run(cmd + ["--redis", url, "--stream", "pwf",
                                      "--redis-password-file", pw])
            assert rc == 0, (cmd, rc, err)
        # Readable by everyone: it works, with a warning.
        os.chmod(pw, 0o644)
        rc, out, err = run(["export", "--redis", url, "--stream", "pwf",
                            "--redis-password-file", pw])
        assert rc == 0 and "readable by every user" in err and \
            "s3cr" not in err, (rc, err)
        # Missing, empty, or a password given twice: refused.
        err = one_line_exit_2(["send", "--redis", url, "--stream", "pwf",
                               "--redis-password-file", path("none.pw"),
                               path("pwf.jsonl")])
        assert "cannot read --redis-password-file" in err, err
        open(path("empty.pw"), "w").close()
        err = one_line_exit_2(["run", "--redis", url, "--stream", "pwf",
                               "--group", "g", "--redis-password-file",
                               path("empty.pw")])
        assert "is empty" in err, err
        err = one_line_exit_2(["dlq", "list", "--redis",
                               f"redis://:x@127.0.0.1:{port}", "--stream",
                               "pwf", "--redis-password-file", pw])
        assert "give it once" in err, err
    finally:
        stop(srv)


@test
def rediss_is_refused_with_the_way_that_works():
    for args in (["send", "--stream", "s"],
                 ["run", "--stream", "s", "--group", "g"],
                 ["export", "--stream", "s"]):
        err = one_line_exit_2(args[:1] + ["--redis", "rediss://127.0.0.1:1"]
                              + args[1:])
        assert "rediss://" in err and "no TLS" in err and "stunnel" in err, \
            err


def wait_replica(port, master):
    wait_for(lambda: "master_link_status:up" in
             cli_at(port, "INFO", "replication"), 30,
             f"the replica of {master}")


@test
def replicas_have_everything_that_was_reported_done():
    # A primary and a replica on loopback. With --replicas 1, what send
    # reports sent and what a drained consumer committed is on the replica
    # when they return: read there at once, with no wait.
    port, rport, r2port = free_port(), free_port(), free_port()
    url = f"redis://127.0.0.1:{port}"
    srv = server_on(port)
    rep = server_on(rport, "--replicaof", "127.0.0.1", port)
    rep2 = p = q = None
    try:
        wait_replica(rport, port)
        raw = gen("rp.jsonl", "--events", "3000", "--duplicates", "0.1",
                  "--seed", str(SEED + 11))
        events = read_events(raw)
        rc, out, err = run(["send", "--redis", url, "--stream", "rp",
                            "--replicas", "1", raw])
        assert rc == 0, err
        assert int(cli_at(rport, "XLEN", "rp")) == len(events) - \
            int(out.split("rejected ")[1].split()[0]), out
        rc, _, err = run(["run", "--redis", url, "--stream", "rp", "--group",
                          "g", "--drain", "-q", "--replicas", "1", "-w", "2"])
        assert rc == 0, err
        got = cli_at(rport, "HGETALL", "rp:counts").split("\n")
        counts = {got[i]: int(got[i + 1]) for i in range(0, len(got), 2)}
        assert counts == expected_words(events), "the replica lacks commits"
        # --replicas 2 with one replica: send waits (it has not reported
        # the batch) until a second replica has it.
        with open(path("rp2.jsonl"), "w") as g:
            g.write('{"id":"late","word":"z"}\n')
        p = start(["send", "--redis", url, "--stream", "rp", "--replicas",
                   "2", path("rp2.jsonl")])
        # And a consumer with --replicas 2 that commits it waits too: its
        # drain does not end, and it has not counted the event processed.
        # (The stream still holds the first events: wait for this one, or
        # the consumer below may drain before it is there and exit.)
        wait_for(lambda: '"late"' in cli_at(port, "XREVRANGE", "rp", "+",
                                            "-", "COUNT", "1"),
                 90 if SLOW else 30, "the send")
        # (A 1 s visibility timeout: each WAIT lasts 1 s, and the drain,
        # found while it waits, must not end the wait: it did, exit 0.)
        q = start(["run", "--redis", url, "--stream", "rp", "--group", "g",
                   "--drain", "-q", "--replicas", "2", "--stats",
                   path("rp-q.stats"), "--visibility-timeout", "1s"])
        # (A sanitizer build on a loaded machine once needed more than
        # 30 s to start the consumer and commit.)
        wait_for(lambda: cli_at(port, "HGET", "rp:counts", "z") == "1",
                 90 if SLOW else 30, "the commit on the primary")
        time.sleep(3)
        assert p.poll() is None, "reported sent with one replica of two"
        assert q.poll() is None, "drained with one replica of two"
        rep2 = server_on(r2port, "--replicaof", "127.0.0.1", port)
        rc, out, err = finish(p, timeout=60)
        assert rc == 0 and out.startswith("sent 1,"), (rc, out, err)
        rc, _, err = finish(q, timeout=60)
        assert rc == 0, (rc, err)
        assert json.load(open(path("rp-q.stats")))["processed"] == 1
        assert cli_at(r2port, "HGET", "rp:counts", "z") == "1"
        # Bad values are refused.
        err = one_line_exit_2(["run", "--redis", url, "--stream", "rp",
                               "--group", "g", "--replicas", "x"])
        assert "--replicas" in err, err
        err = one_line_exit_2(["send", "--redis", url, "--stream", "rp",
                               "--replicas", "-1", raw])
        assert "--replicas" in err, err
    finally:
        for x in (p, q):
            if x is not None and x.poll() is None:
                x.kill()
                x.wait()
        for x in (rep2, rep, srv):
            if x is not None:
                stop(x)


@test
def a_failover_is_followed_and_loses_nothing_acknowledged():
    # A primary and two replicas; send and two consumers are given all
    # three (--redis A,B,C) and --replicas 1. Mid-run the primary is
    # killed -9 and B promoted (C follows B): every connection looks for
    # the new primary and goes on. What was reported sent or committed was
    # on a replica, so B has every event, and each is committed once.
    ports = [free_port() for _ in range(3)]
    url = ",".join(f"redis://127.0.0.1:{p}" for p in ports)
    srv = [server_on(ports[0])]
    cons = []
    try:
        srv += [server_on(p, "--replicaof", "127.0.0.1", ports[0])
                for p in ports[1:]]
        for p in ports[1:]:
            wait_replica(p, ports[0])
        raw = gen("fo.jsonl", "--events", "600" if SLOW else "2000",
                  "--duplicates", "0.1", "--seed", str(SEED + 17))
        ids = {e["id"] for e in read_events(raw)}
        rc, out, err = run(["send", "--redis", url, "--stream", "fo",
                            "--replicas", "1", raw])
        assert rc == 0, err
        h = script_file("fo.sh", "read -r l\nsleep 0.005\n"
                        "printf '{\"k\":\"%s\"}\\n' \"$ONCEQ_EVENT_ID\"\n")
        for c in ("c1", "c2"):
            cons.append(start(["run", "--redis", url, "--stream", "fo",
                               "--group", "g", "--consumer", c, "--drain",
                               "-q", "-w", "4", "--replicas", "1",
                               "--handler", "exec:" + h,
                               "--visibility-timeout", f"{2 * WAIT}s"]))
        wait_for(lambda: int(cli_at(ports[0], "HGET", "fo:stats",
                                    "processed") or 0) >= len(ids) // 4,
                 90 if SLOW else 30, "a quarter processed")
        srv[0].kill()
        srv[0].wait()
        cli_at(ports[1], "REPLICAOF", "NO", "ONE")
        cli_at(ports[2], "REPLICAOF", "127.0.0.1", ports[1])
        for p in cons:
            rc, _, err = finish(p, timeout=180)
            assert rc == 0, (rc, err)
        got = cli_at(ports[1], "XRANGE", "fo:results", "-", "+")
        recs = [json.loads(x)["k"] for x in got.split("\n")
                if x.startswith("{")]
        twice = [k for k, n in Counter(recs).items() if n > 1]
        assert not twice, f"committed twice: {twice[:5]}"
        assert set(recs) == ids, f"missing {len(ids - set(recs))}"
        st = cli_at(ports[1], "HGETALL", "fo:stats").split("\n")
        st = {st[i]: int(st[i + 1]) for i in range(0, len(st) - 1, 2)}
        assert st["processed"] == len(ids) == st["sent"], st
        # A list that is not all URLs, or names two databases, is refused.
        err = one_line_exit_2(["send", "--redis", url + ",nope://x",
                               "--stream", "fo", raw])
        assert "bad Redis URL" in err, err
        err = one_line_exit_2(["send", "--redis", f"{url}/0,{url}/1",
                               "--stream", "fo", raw])
        assert "databases" in err, err
    finally:
        for p in cons:
            if p.poll() is None:
                p.kill()
                p.wait()
        for x in srv:
            if x.poll() is None:
                stop(x)


@test
def two_primaries_or_a_replica_alone_are_waited_out():
    # Two servers that both say they are the primary (a stale one back
    # after a failover, not yet demoted): send writes to neither until one
    # is demoted, then to the one left. A single URL naming a replica: the
    # same wait, until it is promoted.
    pa, pb, pc = free_port(), free_port(), free_port()
    srv = [server_on(pa), server_on(pb)]
    p = q = None
    try:
        f = path("two.jsonl")
        with open(f, "w") as g:
            g.write('{"id":"t1","word":"a"}\n')
        p = start(["send", "--redis", f"redis://127.0.0.1:{pa},"
                   f"redis://127.0.0.1:{pb}", "--stream", "two", f])
        time.sleep(1.5)   # what is being checked is that nothing happens
        assert p.poll() is None, finish(p)
        assert cli_at(pa, "EXISTS", "two") == "0" and \
            cli_at(pb, "EXISTS", "two") == "0"
        cli_at(pb, "REPLICAOF", "127.0.0.1", pa)
        rc, out, err = finish(p, timeout=60)
        assert rc == 0 and out.startswith("sent 1,"), (rc, out, err)
        assert cli_at(pa, "XLEN", "two") == "1"
        srv.append(server_on(pc, "--replicaof", "127.0.0.1", pa))
        wait_replica(pc, pa)
        q = start(["send", "--redis", f"redis://127.0.0.1:{pc}", "--stream",
                   "two2", f])
        time.sleep(1.5)
        assert q.poll() is None, finish(q)
        cli_at(pc, "REPLICAOF", "NO", "ONE")
        rc, out, err = finish(q, timeout=60)
        assert rc == 0 and out.startswith("sent 1,"), (rc, out, err)
        assert cli_at(pc, "XLEN", "two2") == "1"
    finally:
        for x in (p, q):
            if x is not None and x.poll() is None:
                x.kill()
                x.wait()
        for x in srv:
            if x.poll() is None:
                stop(x)


@test
def clashing_stream_names_are_refused_and_commit_nothing():
    # "orders:counts" is also the counts hash of the stream "orders".
    with open(path("or.jsonl"), "w") as g:
        g.write("".join(f'{{"id":"{i}","word":"w{i}"}}\n' for i in range(5)))
    send("orders:counts", path("or.jsonl"))
    send("orders", path("or.jsonl"))
    err = one_line_exit_2(["run", "--redis", URL, "--stream", "orders",
                           "--group", "g", "--drain"])
    assert "'orders:counts' is a stream" in err, err
    assert cli("KEYS", "orders:id:*") == [], "refused, yet it claimed"
    # The clash appears while a consumer of "orders2" runs: its commit
    # writes nothing (no "D", no ack, no count) and the run stops.
    p = start(["run", "--redis", URL, "--stream", "orders2", "--group", "g",
               "-q"])
    wait_for(lambda: cli("EXISTS", "orders2") == 1, 30, "the group")
    send("orders2:counts", path("or.jsonl"))
    send("orders2", path("or.jsonl"))
    rc, _, err = finish(p, timeout=60)
    assert rc == 3, (rc, err)
    assert "WRONGTYPE orders2:counts is a stream" in err and \
        "nothing was committed" in err, err
    marks = [cli("GET", k) for k in cli("KEYS", "orders2:id:*")]
    assert "D" not in marks, marks
    assert done_marks("orders2") == 0, "marked without its counts"
    # The entries it read (one, or more) are not acked.
    assert pending("orders2", "g") >= 1, "acked without its counts"
    assert "processed" not in hash_of("orders2:stats")
    assert cli("XLEN", "orders2:counts") == 5
    # And send refuses a stream whose name is a hash of another's.
    err = one_line_exit_2(["send", "--redis", URL, "--stream", "orders2:stats",
                           path("or.jsonl")])
    assert "'orders2:stats' is a hash" in err, err


# ------------------------------------------------ bounded memory

def done_marks(stream):
    """The done-marks of a stream's buckets (every generation), counted
    here from the keys, not by onceq: every field but the sentinel."""
    n = 0
    for k in cli("KEYS", f"{stream}:d:*:*"):
        n += cli("HLEN", k) - 1
    return n


def mark_buckets(stream):
    return cli("KEYS", f"{stream}:d:*:*")


@test
def done_marks_are_compact_buckets_and_exact():
    raw = gen("dm.jsonl", "--events", str(N // 3), "--duplicates", "0.2",
              "--seed", str(SEED + 7))
    events = read_events(raw)
    uniq = len({e["id"] for e in events})
    send("dm", raw, "--dedup-window", "0")
    ps = [consumer("dm", f"c{i}", "-w", "2") for i in range(2)]
    for p in ps:
        rc, _, err = finish(p)
        assert rc == 0, (rc, err)
    assert hash_of("dm:counts") == expected_words(events)
    st = check_balanced("dm")
    assert st["processed"] == uniq and \
        st["duplicates"] == len(events) - uniq, st
    # One mark per processed id, in buckets; no claim key is left behind.
    assert done_marks("dm") == uniq, (done_marks("dm"), uniq)
    assert cli("KEYS", "dm:id:*") == [], "claims left after their commits"
    state = hash_of("dm:d:0")
    buckets = mark_buckets("dm")
    assert len(buckets) == 2 ** state["L"] + state["nx"], (state, buckets)
    assert state["n"] == uniq, state
    # The buckets stay small enough for the compact encoding, so a mark
    # costs a few tens of bytes (the old layout: 90 to 126).
    enc = Counter(cli("OBJECT", "ENCODING", k) for k in buckets)
    assert enc.get("listpack", 0) >= 0.95 * len(buckets), enc
    size = sum(cli("MEMORY", "USAGE", k) for k in buckets + ["dm:d:0"])
    assert size / uniq <= 40, f"{size / uniq:.1f} bytes per id"
    # And they are what the claims find: a second run of the same events
    # has only duplicates.
    send("dm", raw, "--dedup-window", "0")
    rc, _, err = finish(consumer("dm", "c9", "-w", "2"))
    assert rc == 0, err
    assert hash_of("dm:counts") == expected_words(events)
    assert stats_of("dm", "c9")["duplicates"] == len(events)


@test
def dedup_marks_are_compact_and_expire():
    # send's dedup window keeps marks in buckets by generations of the
    # window (no key per id): a few tens of bytes an id, gone after two
    # windows at most; within the window every copy is rejected.
    f = gen("ddm.jsonl", "--events", "5000", "--duplicates", "0.2",
            "--seed", str(SEED + 11))
    uniq = len({e["id"] for e in read_events(f)})
    # (Long enough that a loaded machine sends the second copy within it:
    # 1 s once let 807 through.)
    win = 8 if SLOW else 3
    out = send("ddm", f, "--dedup-window", f"{win}s")
    assert out.strip() == f"sent {uniq}, rejected {5000 - uniq} duplicates"
    assert cli("KEYS", "ddm:dedup:*") == [], "a dedup key per id"
    keys = cli("KEYS", "ddm:dd:*")
    buckets = [k for k in keys if k.count(":") == 3]
    assert buckets and all(0 < cli("PTTL", k) <= 2000 * win for k in keys), \
        [(k, cli("PTTL", k)) for k in keys][:5]
    size = sum(cli("MEMORY", "USAGE", k) for k in keys)
    assert size / uniq <= 40, f"{size / uniq:.1f} bytes per id"
    out = send("ddm", f, "--dedup-window", f"{win}s")
    assert out.strip() == "sent 0, rejected 5000 duplicates", out
    wait_for(lambda: cli("KEYS", "ddm:dd:*") == [], 3 * win + 2,
             "the dedup marks to expire")
    out = send("ddm", f, "--dedup-window", f"{win}s")
    assert out.strip() == f"sent {uniq}, rejected {5000 - uniq} duplicates"


@test
def retention_forgets_done_marks_after_it():
    with open(path("ret.jsonl"), "w") as g:
        g.write('{"id":"a","word":"x"}\n{"id":"b","word":"y"}\n')
    # Long enough for a sanitizer build to run the second consumer within
    # it.
    ret = 4 if SLOW else 1
    send("ret", path("ret.jsonl"), "--dedup-window", "0")
    assert finish(consumer("ret", "c0", "--retention", f"{ret}s"))[0] == 0
    # Within the retention: duplicates.
    send("ret", path("ret.jsonl"), "--dedup-window", "0")
    assert finish(consumer("ret", "c1"))[0] == 0
    assert hash_of("ret:counts") == {"x": 1, "y": 1}
    assert stats_of("ret", "c1")["duplicates"] == 2
    assert all(0 < cli("PTTL", k) <= 2000 * ret
               for k in mark_buckets("ret")), \
        "a bucket without its expiry"
    # The stream's retention is fixed at its first run.
    err = one_line_exit_2(["run", "--redis", URL, "--stream", "ret",
                           "--group", "g", "--retention", "2s", "--drain"])
    assert f"keeps its done-marks for {ret}s" in err, err
    assert finish(consumer("retf", "c0"))[0] == 0   # forever, fixed
    err = one_line_exit_2(["run", "--redis", URL, "--stream", "retf",
                           "--group", "g", "--retention", "2s", "--drain"])
    assert "forever" in err, err
    # After two generations (at most 2 s) the marks are gone: the same
    # ids run again, as documented.
    wait_for(lambda: mark_buckets("ret") == [], 3 * ret + 2,
             "the marks to expire")
    send("ret", path("ret.jsonl"), "--dedup-window", "0")
    assert finish(consumer("ret", "c2"))[0] == 0
    assert hash_of("ret:counts") == {"x": 2, "y": 2}
    assert stats_of("ret", "c2")["processed"] == 2
    check_balanced("ret")


@test
def done_marks_of_the_old_layout_are_still_honoured():
    # A stream written by an onceq before the buckets: its done-marks are
    # "D" strings at S:id:<id>. They still make duplicates, and redrive
    # still unsettles them.
    with open(path("old.jsonl"), "w") as g:
        g.write('{"id":"1","word":"a"}\n{"id":"2","word":"b"}\n'
                '{"id":"3","word":"c"}\n')
    cli("SET", "old:id:1", "D")
    cli("SET", "old:id:3", "D")
    send("old", path("old.jsonl"), "--dedup-window", "0")
    assert finish(consumer("old", "c0"))[0] == 0
    assert hash_of("old:counts") == {"b": 1}, hash_of("old:counts")
    assert stats_of("old", "c0")["duplicates"] == 2
    cli("XADD", "old:dlq", "*", "id", "3", "reason", "failed", "error", "e",
        "attempts", "1", "event", '{"id":"3","word":"c"}', "source", "x:3",
        "first_seen", "1", "last_seen", "1")
    rc, out, err = run(["dlq", "redrive", "--redis", URL, "--stream", "old"])
    assert rc == 0 and "redrove 1" in out, (rc, out, err)
    assert cli("EXISTS", "old:id:3") == 0
    assert finish(consumer("old", "c1"))[0] == 0
    assert hash_of("old:counts") == {"b": 1, "c": 1}
    assert done_marks("old") == 2


@test
def redrive_unsettles_a_bucket_mark():
    with open(path("rdm.jsonl"), "w") as g:
        g.write('{"id":"p1","poison":true}\n{"id":"ok","word":"w"}\n')
    send("rdm", path("rdm.jsonl"))
    assert finish(consumer("rdm", "c0"))[0] == 1
    assert done_marks("rdm") == 2      # the failure settled its id
    rc, out, err = run(["dlq", "redrive", "--redis", URL, "--stream", "rdm"])
    assert rc == 0 and "redrove 1" in out, (rc, out, err)
    assert done_marks("rdm") == 1
    # The redriven copy runs (and fails again): not a duplicate.
    assert finish(consumer("rdm", "c1"))[0] == 1
    assert stats_of("rdm", "c1")["dead"] == 1


@test
def settled_entries_are_trimmed_pending_ones_kept():
    n = 3000
    with open(path("tr.jsonl"), "w") as g:
        g.write("".join(f'{{"id":"{i}","word":"w{i % 10}"}}\n'
                        for i in range(n)))
    send("tr", path("tr.jsonl"))
    # A consumer holds entries pending (stopped mid-batch) while another
    # settles everything else: the trims must keep what it holds, or the
    # takeover finds it gone and its event never runs.
    h = script_file("tr.sh", "sleep 0.05\ncat\n")
    p = start(["run", "--redis", URL, "--stream", "tr", "--group", "g",
               "--consumer", "stuck", "-q", "-w", "1", "--handler",
               f"exec:{h}", "--visibility-timeout", f"{WAIT}s"])
    wait_for(lambda: pending_of("tr", "stuck") > 0, 30, "a pending entry")
    p.send_signal(signal.SIGSTOP)
    try:
        # (exec: too, records like the stuck one's: a handler that writes
        # another kind of results is refused on the stream.)
        q = start(["run", "--redis", URL, "--stream", "tr", "--group", "g",
                   "--consumer", "c1", "--drain", "-q", "-w", "2",
                   "--handler", "exec:cat",
                   "--visibility-timeout", f"{WAIT}s", "--stats",
                   path("tr-c1.stats")])
        rc, _, err = finish(q)
        assert rc == 0, (rc, err)
    finally:
        p.send_signal(signal.SIGCONT)
        p.kill()
        p.wait()
    assert stats_of("tr", "c1")["redelivered"] >= 1
    check_balanced("tr")
    # Everything settled: the stream is trimmed (whole nodes of 100
    # entries: what is left is at most a node or two).
    assert cli("XLEN", "tr") <= 200, cli("XLEN", "tr")
    rc, out, err = run(["export", "--redis", URL, "--stream", "tr"])
    assert rc == 0, (rc, err)
    ids = sorted(int(json.loads(x)["id"]) for x in out.splitlines())
    assert ids == list(range(n)), (len(ids), ids[:5])


@test
def a_group_that_has_not_read_keeps_the_stream():
    n = 1000
    with open(path("tg.jsonl"), "w") as g:
        g.write("".join(f'{{"id":"{i}","word":"w"}}\n' for i in range(n)))
    send("tg", path("tg.jsonl"))
    # Another application's group on the stream (not onceq's).
    cli("XGROUP", "CREATE", "tg", "h", "0")
    assert finish(consumer("tg", "c0"))[0] == 0
    assert cli("XLEN", "tg") == n, cli("XLEN", "tg")
    # A second onceq group is refused: it would take every event for a
    # duplicate.
    rc, _, err = run(["run", "--redis", URL, "--stream", "tg", "--group",
                      "h", "--drain", "-q"])
    assert rc == 2 and "consumed by group 'g'" in err, (rc, err)
    # Once group h has read and acked them, the next trim takes them.
    cli("XREADGROUP", "GROUP", "h", "x", "COUNT", n, "STREAMS", "tg", ">")
    ids = [e[0] for e in cli("XRANGE", "tg", "-", "+")]
    cli("XACK", "tg", "h", *ids)
    assert finish(consumer("tg", "c1"))[0] == 0
    assert cli("XLEN", "tg") <= 200, cli("XLEN", "tg")
    assert hash_of("tg:counts") == {"w": n}
    check_balanced("tg")


def main():
    global PORT, URL
    try:
        PORT, URL = rh.start_server()
    except Exception as e:  # a missing server is a failure, not a skip
        print(f"test_redis: cannot start redis-server: {e}")
        print(f"0 passed, {len(tests)} failed")
        return 1
    try:
        return suite.run(TMP, seed=SEED, only_env="OQ_REDIS_TESTS")
    finally:
        rh.stop_server()


if __name__ == "__main__":
    sys.exit(main())
