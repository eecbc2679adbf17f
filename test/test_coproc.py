#!/usr/bin/env python3
"""Description: end-to-end tests of fast command handlers (issue 17) on the
real binary. exec: runs a command of plain words without the shell and
anything else through /bin/sh -c: both give the same records, dead letters
and exit status, and a command with shell syntax is never split. coproc:
keeps one co-process per worker: with -w 4 every unique event is processed
exactly once (checked against an independent count in Python), also when
the co-process crashes every 100 events, hangs past the lease, writes
garbage, or asks for a retry on the first attempt; a kill -9 of a durable
run followed by a rerun equals one clean run, and no co-process outlives
onceq (kill -9 or SIGTERM); ids with NUL and other odd characters reach the
co-process as valid JSON; stderr comes out as "[coproc N] " lines. Prints
"N passed, N failed".

Environment: ONCEQ (the binary; default ./onceq), OQ_RUN_SEED (default:
time), BUILD (a sanitizer build gets smaller inputs)."""
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Suite  # noqa: E402

ONCEQ = os.path.abspath(os.environ.get("ONCEQ", "./onceq"))
BUILD = os.environ.get("BUILD", "build")
SLOW = "tsan" in BUILD or "asan" in BUILD
SEED = int(os.environ.get("OQ_RUN_SEED", str(int(time.time()) % 100000)))
TMP = tempfile.mkdtemp(prefix="onceq-coproc-test-")
PY = sys.executable
N = 600 if SLOW else 3000
print(f"test_coproc: seed {SEED} (OQ_RUN_SEED), binary {ONCEQ}")
rng = random.Random(SEED)

suite = Suite()
test = suite.test
tests = suite.tests


def path(name):
    return os.path.join(TMP, name)


def run(args, timeout=300):
    """Runs onceq in TMP; returns (exit status, stdout, stderr)."""
    p = subprocess.run([ONCEQ] + args, capture_output=True, timeout=timeout,
                       cwd=TMP)
    return p.returncode, p.stdout.decode("utf-8", "replace"), \
        p.stderr.decode("utf-8", "replace")


def write_events(name, events, dup_every=7):
    """Writes events (dicts) as JSON lines, every dup_every-th repeated
    later (upstream delivers at least once); returns the path."""
    lines = [json.dumps(e, separators=(",", ":")) for e in events]
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        if i % dup_every == 3:
            out.append(lines[rng.randrange(0, i + 1)])
    with open(path(name), "w") as f:
        f.write("\n".join(out) + "\n")
    return path(name)


def unique_ids(p):
    """The ids of p's lines, each once, in first-seen order."""
    seen, order = set(), []
    with open(p, "rb") as f:
        for raw in f:
            i = json.loads(raw)["id"]
            if i not in seen:
                seen.add(i)
                order.append(i)
    return order


def script(name, body):
    """A co-process script in TMP; returns the coproc: spec that runs it."""
    p = path(name)
    with open(p, "w") as f:
        f.write(body)
    return f"coproc:{PY} {p}"


def records(out):
    # Not splitlines(): it splits on U+2028 too.
    return [json.loads(line) for line in out.split("\n") if line.strip()]


def alive_with(marker):
    """Pids of live (not zombie) processes whose command line holds
    marker."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{d}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd and state != b"Z":
            pids.append(int(d))
    return pids


def assert_none_left(marker, within=3.0):
    until = time.time() + within
    while alive_with(marker):
        assert time.time() < until, f"co-processes left: {alive_with(marker)}"
        time.sleep(0.05)


# A co-process with behaviours chosen per event (see the event's fields):
# it counts the requests it has seen, crashes on its every CRASH-th
# without answering, hangs on "hang" events at attempt 1, writes garbage
# on "garbage" events at attempt 1, answers retry on "flaky" events at
# attempt 1, fail on "poison" events, and ok otherwise, with the id and
# attempt as the output.
BEHAVE = r"""
import json, os, sys, time
crash = int(os.environ.get("CO_CRASH", "0"))
seen = 0
out = sys.stdout
sys.stderr.write("started %d\n" % os.getpid())
sys.stderr.flush()
for line in sys.stdin:
    seen += 1
    req = json.loads(line)
    ev, att = req["event"], req["attempt"]
    if crash and seen % crash == 0:
        os._exit(1)
    if ev.get("hang") and att == 1:
        time.sleep(60)
    if ev.get("garbage") and att == 1:
        out.write(["not json", '{"status":"ok"', '{"status":"maybe"}',
                   '[1]'][len(req["id"]) % 4] + "\n")
    elif ev.get("flaky") and att == 1:
        out.write(json.dumps({"status": "retry", "error": "flaky"}) + "\n")
    elif ev.get("poison"):
        out.write(json.dumps({"status": "fail",
                              "error": "poison " + req["id"]}) + "\n")
    else:
        out.write(json.dumps({"status": "ok",
                              "output": {"id": req["id"], "attempt": att}})
                  + "\n")
    out.flush()
"""


def behave_run(name, events, extra=(), env_crash=0, workers=4):
    f = write_events(name + ".jsonl", events)
    spec = script(name + ".py", BEHAVE)
    dlq = path(name + "-dlq.jsonl")
    stats = path(name + ".stats")
    env = dict(os.environ, CO_CRASH=str(env_crash))
    p = subprocess.run([ONCEQ, "run", "-w", str(workers), "--handler", spec,
                        "--backoff", "5ms,20ms", "--dlq", dlq, "--stats",
                        stats] + list(extra) + [f], capture_output=True,
                       timeout=300, cwd=TMP, env=env)
    assert_none_left(path(name + ".py"))
    return (p.returncode, records(p.stdout.decode()), p.stderr.decode(), f,
            dlq, json.load(open(stats)))


def check_exactly_once(recs, f, skip=()):
    want = [i for i in unique_ids(f) if i not in skip]
    got = [r["id"] for r in recs]
    assert sorted(got) == sorted(want), \
        f"{len(got)} records, {len(set(got))} distinct, want {len(want)}"
    assert got == want, "records in input order"


# ----------------------------------------------------------------- exec


@test
def exec_direct_and_shell_agree():
    """A plain command runs without the shell; `exec CMD` (a builtin) is
    the same command through /bin/sh -c. Records, dead letters and exit
    status must be equal: stdin, environment, exit 0/75/other, timeouts."""
    sh = path("by_attempt.sh")
    with open(sh, "w") as f:
        f.write('line=$(cat)\n'
                'case "$line" in *poison*) echo "bad $ONCEQ_EVENT_ID" >&2; '
                'exit 3;; *flaky*) [ "$ONCEQ_ATTEMPT" = 1 ] && exit 75;; '
                '*slow*) [ "$ONCEQ_ATTEMPT" = 1 ] && exec sleep 5;; esac\n'
                'printf "%s %s %s\\n" "$ONCEQ_EVENT_ID" "$ONCEQ_ATTEMPT" '
                '"$line"\n')
    events = []
    for i in range(40):
        e = {"id": f"e{i}", "word": "w"}
        e.update([{}, {"poison": 1}, {"flaky": 1}, {}][i % 4])
        if i in (5, 17):
            e["slow"] = 1
        events.append(e)
    f = write_events("agree.jsonl", events)
    few = write_events("agree-few.jsonl", events[:3], 10**9)
    cmds = ["tr a-z A-Z", "printenv ONCEQ_EVENT_ID ONCEQ_ATTEMPT",
            "sh " + sh, "no-such-program-xyz", "sleep 5"]
    for cmd in cmds:
        f = few if cmd == "sleep 5" else f
        res = []
        for spec in ("exec:" + cmd, "exec:exec " + cmd):
            dlq = path("agree-dlq.jsonl")
            rc, out, err = run(["run", "-w", "2", "--handler", spec,
                                "--visibility-timeout", "600ms",
                                "--kill-grace", "100ms", "--max-attempts", "2",
                                "--backoff", "5ms,10ms", "--dlq", dlq, f])
            dead = []
            if os.path.exists(dlq):
                dead = sorted((d["id"], d["reason"], d["attempts"])
                              for d in (json.loads(x) for x in open(dlq)))
            res.append((rc, out, dead))
        assert res[0] == res[1], f"{cmd}: direct {res[0]} != shell {res[1]}"
        assert res[0][0] in (0, 1), (cmd, res[0])


@test
def exec_shell_syntax_is_never_split():
    """Each command has shell syntax; split on spaces it would print
    something else. Through the shell it prints what sh prints."""
    d = path("globdir")
    os.makedirs(d, exist_ok=True)
    for n in ("g1.txt", "g2.txt"):
        open(os.path.join(d, n), "w").close()
    cases = [
        ('echo "a  b"', "a  b"),
        ("echo 'x;y'", "x;y"),
        ("echo $ONCEQ_ATTEMPT", "1"),
        ("echo a; echo b", "a\nb"),
        ("echo ab | tr a z", "zb"),
        ("echo a && echo c", "a\nc"),
        ("echo hi > /dev/stdout", "hi"),
        (f"cd {d} && echo *.txt", "g1.txt g2.txt"),
        ("echo a\\ b", "a b"),
        ("x=5; echo $x", "5"),
        ("echo ~ | grep -c /", "1"),
        ("echo a#b # comment", "a#b"),
    ]
    f = write_events("split.jsonl", [{"id": "s1", "word": "w"}], 10**9)
    for cmd, want in cases:
        rc, out, err = run(["run", "--handler", "exec:" + cmd, f])
        assert rc == 0, (cmd, rc, err)
        assert out == want + "\n", (cmd, out, want)


# --------------------------------------------------------------- coproc


@test
def coproc_example_exactly_once_w4():
    f = write_events("ex.jsonl", [{"id": f"x{i}", "word": f"w{i % 50}"}
                                  for i in range(N)])
    example = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "..", "examples", "coproc_echo.py")
    rc, out, err = run(["run", "-w", "4", "--handler",
                        f"coproc:{PY} {os.path.abspath(example)}", f])
    assert rc == 0, (rc, err)
    recs = records(out)
    check_exactly_once(recs, f)
    # The output is the event as read, next to its id.
    events = {}
    for raw in open(f, "rb"):
        e = json.loads(raw)
        events.setdefault(e["id"], e)
    for r in recs:
        assert r["event"] == events[r["id"]], r
    assert_none_left(os.path.abspath(example))


@test
def coproc_crash_every_100():
    events = [{"id": f"c{i}", "n": i} for i in range(N)]
    rc, recs, err, f, dlq, st = behave_run("crash", events,
                                           ["--max-attempts", "20"],
                                           env_crash=100)
    assert rc == 0, (rc, err[-2000:])
    check_exactly_once(recs, f)
    assert st["retried"] >= N // 100 // 2, st
    assert not os.path.exists(dlq)
    # Each crash restarted a child: more starts than workers.
    assert err.count("] started ") > 4, err[-2000:]


@test
def coproc_hang_past_the_lease():
    events = [{"id": f"h{i}", "n": i} for i in range(200)]
    for i in (3, 50, 120):
        events[i]["hang"] = True
    t0 = time.time()
    rc, recs, err, f, dlq, st = behave_run(
        "hang", events, ["--visibility-timeout", "700ms", "--timeout",
                         "700ms", "--kill-grace", "100ms"])
    took = time.time() - t0
    assert rc == 0, (rc, err[-2000:])
    check_exactly_once(recs, f)
    att = {r["id"]: r["attempt"] for r in recs}
    for i in (3, 50, 120):
        # 2, or more when a redelivery waited behind a hanging batch-mate.
        assert att[f"h{i}"] >= 2, (i, att[f"h{i}"])
    assert took < 30, took


@test
def coproc_a_late_extra_line_is_not_the_next_reply():
    """A child that writes an extra reply for e3 after a pause: with the
    request id echoed, that line arrives as e4's reply, is refused, and e4
    is retried; nothing but each event's own output is committed."""
    script = path("late.py")
    open(script, "w").write(
        "import sys, json, time\n"
        "for line in sys.stdin:\n"
        "    r = json.loads(line)\n"
        "    print(json.dumps({'id': r['id'], 'status': 'ok',\n"
        "                      'output': {'id': r['id']}}), flush=True)\n"
        "    if r['id'] == 'e3' and r['attempt'] == 1:\n"
        "        time.sleep(0.3)\n"
        "        print(json.dumps({'id': 'e3', 'status': 'ok',\n"
        "                          'output': {'id': 'e3-extra'}}), flush=True)\n")
    f = write_events("late.jsonl", [{"id": f"e{i}"} for i in range(1, 7)], 10**9)
    rc, out, err = run(["run", "-q", "-w", "1", "--handler",
                        "coproc:python3 " + script, f])
    assert rc == 0, (rc, err)
    assert [json.loads(x)["id"] for x in out.splitlines()] == \
        [f"e{i}" for i in range(1, 7)], out


@test
def coproc_garbage_replies():
    events = [{"id": f"g{i}", "n": i} for i in range(300)]
    for i in range(0, 300, 13):
        events[i]["garbage"] = True
    rc, recs, err, f, dlq, st = behave_run("garbage", events)
    assert rc == 0, (rc, err[-2000:])
    check_exactly_once(recs, f)
    att = {r["id"]: r["attempt"] for r in recs}
    for i in range(0, 300, 13):
        assert att[f"g{i}"] == 2, (i, att[f"g{i}"])
    # A copy of an event, delivered while the first waits for its retry,
    # is a first attempt too: at least one retry per garbage event.
    assert st["retried"] >= len(range(0, 300, 13)), st


@test
def coproc_retry_on_first_attempt_and_fail():
    events = [{"id": f"r{i}", "n": i, "flaky": True} for i in range(N // 2)]
    events[7] = {"id": "r7", "poison": True}
    rc, recs, err, f, dlq, st = behave_run("flaky", events)
    assert rc == 1, (rc, err[-2000:])  # the poison event
    check_exactly_once(recs, f, skip={"r7"})
    assert all(r["attempt"] == 2 for r in recs)
    assert st["retried"] >= N // 2 - 1, st
    dead = [json.loads(x) for x in open(dlq)]
    assert [(d["id"], d["reason"], d["error"]) for d in dead] == \
        [("r7", "failed", "poison r7")], dead


@test
def coproc_stderr_is_prefixed():
    events = [{"id": f"p{i}"} for i in range(50)]
    rc, recs, err, f, dlq, st = behave_run("stderr", events, workers=2)
    assert rc == 0, (rc, err)
    lines = [x for x in err.splitlines() if "started" in x]
    assert lines, err
    for x in lines:
        assert x.startswith("[coproc 1] started ") or \
            x.startswith("[coproc 2] started "), x


@test
def coproc_odd_ids_arrive_as_valid_json():
    spec = script("ids.py", r"""
import json, sys
for raw in sys.stdin.buffer:
    text = raw.decode("utf-8")  # strict: invalid UTF-8 raises
    req = json.loads(text)
    sys.stdout.write(json.dumps({"status": "ok", "output": {
        "id": req["id"], "event_id": req["event"]["id"],
        "ascii": text.isascii()}}) + "\n")
    sys.stdout.flush()
""")
    ids = ["x\u0000y", "x\u0000z", "caf\u00e9", "\U0001F600", 'a"b\\c',
           "tab\there", "\u2028", "\u007f", "sp ace"]
    lines = [json.dumps({"id": i}) for i in ids]
    lines += ['{"id":9007199254740993}', '{"id":"\\u0000"}',
              '{"id":"caf\u00e9"}']  # raw UTF-8: the same id as above
    with open(path("ids.jsonl"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    rc, out, err = run(["run", "-w", "2", "--handler", spec,
                        path("ids.jsonl")])
    assert rc == 0, (rc, err)
    recs = records(out)
    got = [r["id"] for r in recs]
    assert got == ids + ["9007199254740993", "\u0000"], got
    for r in recs:
        if isinstance(r["event_id"], str):
            assert r["event_id"] == r["id"], r


def durable_args(db, f, spec, out):
    return [ONCEQ, "run", "-q", "-w", "4", "--state", db, "--handler", spec,
            "--backoff", "5ms,20ms", "-o", out, f]


@test
def coproc_kill9_durable_rerun_equals_clean_run():
    events = [{"id": f"k{i}", "n": i} for i in range(N)]
    for i in range(0, N, 17):
        events[i]["flaky"] = True
    f = write_events("kill.jsonl", events)
    spec = script("kill.py", BEHAVE)
    marker = path("kill.py")
    clean_out = path("clean.out")
    t0 = time.time()
    p = subprocess.run(durable_args(path("clean.db"), f, spec, clean_out),
                       capture_output=True, timeout=300, cwd=TMP)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    clean = open(clean_out).read()
    span = time.time() - t0  # kills fall within a run's length
    for it in range(3):
        db = path(f"kill{it}.db")
        out = path(f"kill{it}.out")
        proc = subprocess.Popen(durable_args(db, f, spec, out),
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=TMP)
        delay = rng.uniform(0.05, max(0.1, span * 0.9))
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        print(f"  kill {it}: after {delay:.3f}s (clean run {span:.3f}s)")
        # The death signal ends the co-processes with onceq.
        assert_none_left(marker)
        p = subprocess.run(durable_args(db, f, spec, out),
                           capture_output=True, timeout=300, cwd=TMP)
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        got = open(out).read()
        assert got == clean, f"iteration {it} (kill after {delay:.3f}s): " \
            f"{len(got.splitlines())} records, want {len(clean.splitlines())}"
        assert_none_left(marker)


@test
def coproc_sigterm_stops_children():
    events = [{"id": f"t{i}", "hang": True} for i in range(20)]
    f = write_events("term.jsonl", events, 10**9)
    spec = script("term.py", BEHAVE)
    proc = subprocess.Popen([ONCEQ, "run", "-w", "3", "--handler", spec,
                             "--kill-grace", "200ms", f],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=TMP)
    until = time.time() + 10
    while len(alive_with(path("term.py"))) < 3 and time.time() < until:
        time.sleep(0.05)
    time.sleep(0.2)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (proc.returncode, err.decode()[-2000:])
    assert time.time() - t0 < 10
    assert_none_left(path("term.py"), within=0.5)


def main():
    return suite.run(TMP, seed=SEED)


if __name__ == "__main__":
    sys.exit(main())
