#!/usr/bin/env python3
"""Description: heartbeats and metrics of `onceq run`, on the real binary.
A command that runs several visibility timeouts completes once, is never
killed nor delivered again, and its lease was extended; with --timeout
below its run time it is killed and retried; a kill -9 mid-handler with
--state is redone by the rerun, once. The --metrics file parses with the
Prometheus client's parser at every rewrite and its counters equal --stats
at the end; --metrics-listen serves GET /metrics while the run goes on.
Prints "N passed, N failed".

Environment: ONCEQ (the binary; default ./onceq), BUILD (a sanitizer
build gets more time)."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Suite, parse_metrics  # noqa: E402
import urllib.error
import urllib.request


ONCEQ = os.path.abspath(os.environ.get("ONCEQ", "./onceq"))
BUILD = os.environ.get("BUILD", "build")
SLOW = "tsan" in BUILD or "asan" in BUILD
TMP = tempfile.mkdtemp(prefix="onceq-metrics-test-")
print(f"test_metrics: binary {ONCEQ}")

suite = Suite()
test = suite.test
tests = suite.tests


def path(name):
    return os.path.join(TMP, name)


def run(args, stdin=None, timeout=120):
    p = subprocess.run([ONCEQ] + args, input=stdin, capture_output=True,
                       timeout=timeout, cwd=TMP)
    return p.returncode, p.stdout.decode("utf-8", "replace"), \
        p.stderr.decode("utf-8", "replace")


metrics = parse_metrics


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@test
def a_long_command_keeps_its_lease():
    f = path("long.jsonl")
    open(f, "w").write('{"id":"a"}\n')
    st = path("long.stats")
    # 1.5 s of work with a 300 ms lease: five leases.
    rc, out, err = run(["run", "-w", "2", "--handler",
                        "exec:sleep 1.5; echo $ONCEQ_ATTEMPT",
                        "--visibility-timeout", "300ms", "--max-attempts",
                        "1", "--stats", st, f])
    assert rc == 0, (rc, err)
    assert out == "1\n", out  # one attempt, never killed
    s = json.load(open(st))
    assert s["processed"] == 1 and s["redelivered"] == 0, s
    assert s["fenced"] == 0, s
    assert s["lease_extensions"] >= 3, s


@test
def the_timeout_kills_and_retries():
    f = path("capped.jsonl")
    open(f, "w").write('{"id":"a"}\n')
    t0 = time.time()
    rc, out, err = run(["run", "--handler",
                        "exec:[ $ONCEQ_ATTEMPT = 1 ] && sleep 30; "
                        "echo $ONCEQ_ATTEMPT",
                        "--visibility-timeout", "300ms", "--timeout", "400ms",
                        "--kill-grace", "100ms", "--backoff", "10ms", f])
    assert rc == 0, (rc, err)
    assert out == "2\n", out
    assert time.time() - t0 < 20


@test
def a_command_that_beats_runs_past_its_timeout():
    """ONCEQ_HEARTBEAT_FD: a command that writes a line there every 200ms
    runs 1.4s under --timeout 500ms, once; one that stops writing is killed
    a timeout after its last line and retried."""
    f = path("beat.jsonl")
    open(f, "w").write('{"id":"a"}\n')
    beat = ("exec:for i in 1 2 3 4 5 6 7; do sleep 0.2; "
            "echo >&$ONCEQ_HEARTBEAT_FD; done; echo $ONCEQ_ATTEMPT")
    rc, out, err = run(["run", "--handler", beat, "--visibility-timeout",
                        "300ms", "--timeout", "500ms", "--max-attempts", "1",
                        f])
    assert rc == 0 and out == "1\n", (rc, out, err)
    quiet = ("exec:[ $ONCEQ_ATTEMPT = 1 ] && { echo >&$ONCEQ_HEARTBEAT_FD; "
             "sleep 30; }; echo $ONCEQ_ATTEMPT")
    t0 = time.time()
    rc, out, err = run(["run", "--handler", quiet, "--visibility-timeout",
                        "300ms", "--timeout", "500ms", "--kill-grace",
                        "100ms", "--backoff", "10ms", f])
    assert rc == 0 and out == "2\n", (rc, out, err)
    assert time.time() - t0 < 20


@test
def kill_9_mid_handler_is_redone_once():
    f, db = path("k9.jsonl"), path("k9.db")
    log = path("k9.log")
    open(f, "w").write("".join(f'{{"id":"e{i}"}}\n' for i in range(5)))
    cmd = (f"exec:echo $ONCEQ_EVENT_ID >> {log}; "
           f"[ -e {path('k9.go')} ] || sleep 30; echo $ONCEQ_EVENT_ID")
    args = ["run", "-w", "1", "--state", db, "--handler", cmd,
            "--visibility-timeout", "300ms", "-o", path("k9.out"), f]
    p = subprocess.Popen([ONCEQ] + args, cwd=TMP, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline and not (os.path.exists(log) and
                                          open(log).read()):
        time.sleep(0.02)
    time.sleep(0.5)  # past the lease: heartbeats keep it
    p.kill()
    p.wait()
    open(path("k9.go"), "w").close()
    rc, out, err = run(args)
    assert rc == 0, (rc, err)
    got = open(path("k9.out")).read().split()
    assert sorted(got) == [f"e{i}" for i in range(5)], got


@test
def the_metrics_file_parses_at_every_rewrite_and_balances():
    mfile, st = path("m.prom"), path("m.stats")
    p = subprocess.Popen([ONCEQ, "run", "-w", "2", "--metrics", mfile,
                          "--metrics-interval", "100ms", "--stats", st,
                          "--dlq", path("m.dlq"), "-o", path("m.out"), "-"],
                         cwd=TMP, stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = 0
    for i in range(30):
        lines = [f'{{"id":"e{i}-{k}","word":"w{k}"}}' for k in range(50)]
        lines += ['{"id":"e0-1"}', "not json"]
        p.stdin.write(("\n".join(lines) + "\n").encode())
        p.stdin.flush()
        time.sleep(0.03)
        if os.path.exists(mfile):
            m = metrics(open(mfile).read())  # never a half-written file
            assert ("onceq_queue_ready", ()) in m
            seen += 1
    p.stdin.close()
    p.wait(timeout=60)
    err = p.stderr.read().decode()
    assert p.returncode == 1, err  # the "not json" lines
    assert seen >= 10, seen
    m = metrics(open(mfile).read())
    s = json.load(open(st))
    ev = {o: m[("onceq_events_total", (("outcome", o),))]
          for o in ("processed", "duplicate", "dead", "retried")}
    assert ev["processed"] == s["processed"], (ev, s)
    assert ev["duplicate"] == s["duplicates"], (ev, s)
    assert ev["dead"] == s["dead"], (ev, s)
    assert m[("onceq_dead_letters_total", (("reason", "parse_error"),))] == 30
    # One observation a handler call (wordcount: one per processed
    # event): not one per message (duplicates and dead letters made none).
    assert m[("onceq_handler_duration_seconds_count", ())] == \
        s["processed"], (m, s)
    assert m[("onceq_fenced_total", ())] == s["fenced"]


@test
def metrics_listen_serves_while_running():
    port = free_port()
    p = subprocess.Popen([ONCEQ, "run", "--metrics-listen",
                          f"127.0.0.1:{port}", "-o", "/dev/null", "-"],
                         cwd=TMP, stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        p.stdin.write(b'{"id":"a","word":"x"}\n{"id":"a","word":"x"}\n')
        p.stdin.flush()
        url = f"http://127.0.0.1:{port}/metrics"
        body = None
        for _ in range(200):
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    assert r.headers["Content-Type"].startswith("text/plain")
                    body = r.read().decode()
                m = metrics(body)
                if m[("onceq_events_total", (("outcome", "duplicate"),))] == 1:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.05)
        m = metrics(body)
        assert m[("onceq_events_total", (("outcome", "processed"),))] == 1, body
        assert m[("onceq_events_total", (("outcome", "duplicate"),))] == 1, body
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other",
                                   timeout=5)
            raise AssertionError("/other answered")
        except urllib.error.HTTPError as e:
            assert e.code == 404, e.code
        # Clients that connect and say nothing: 16 of them took the
        # endpoint down (every GET refused while they stayed).
        idle = [socket.create_connection(("127.0.0.1", port))
                for _ in range(40)]
        try:
            time.sleep(0.2)
            with urllib.request.urlopen(url, timeout=5) as r:
                assert r.status == 200
        finally:
            for c in idle:
                c.close()
    finally:
        p.stdin.close()
        p.wait(timeout=60)
    assert p.returncode == 0, p.stderr.read()


@test
def bad_metrics_options_are_refused_before_running():
    f = path("one.jsonl")
    open(f, "w").write('{"id":"a"}\n')
    rc, out, err = run(["run", "--metrics", path("no/such/dir/m.prom"), f])
    assert rc == 2 and "cannot write metrics" in err, (rc, err)
    # Renamed over at every write: never a device, a FIFO or a link.
    link = path("m.link")
    os.symlink(path("m.target"), link)
    fifo = path("m.fifo")
    os.mkfifo(fifo)
    # (No device here: a regression would replace it for the whole machine.)
    for target in (fifo, link):
        rc, out, err = run(["run", "--metrics", target, f])
        assert rc == 2 and "not a regular file" in err, (target, rc, err)
    assert os.path.islink(link)
    for bad in ("nonsense", "127.0.0.1:0", "127.0.0.1:99999", "1.2.3:80"):
        rc, out, err = run(["run", "--metrics-listen", bad, f])
        assert rc == 2 and "--metrics-listen" in err, (bad, rc, err)
    rc, out, err = run(["run", "--metrics-interval", "10ms", f])
    assert rc == 2 and "--metrics-interval" in err, (rc, err)
    rc, out, err = run(["run", "--timeout", "0", f])
    assert rc == 2 and "--timeout" in err, (rc, err)


def main():
    return suite.run(TMP)


if __name__ == "__main__":
    sys.exit(main())
