"""What the Redis end-to-end scripts (test_redis.py, test_reqreply_redis.py)
share: a real redis-server started on a free loopback port (and stopped
after), redis-cli readers that parse its --json output, the onceq binary
run or started in the scratch directory, and waits on conditions with a
timeout (no sleeps standing in for them).

The server's port and URL are this module's PORT and URL once start_server()
has returned them; a script that uses them in its own code keeps its own
copies of what start_server() returned.

Environment: ONCEQ (the binary; default ./onceq), OQ_RUN_SEED, BUILD (a
sanitizer build, tsan or asan in its name, is SLOW: smaller inputs and
longer waits)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ONCEQ = os.path.abspath(os.environ.get("ONCEQ", "./onceq"))
BUILD = os.environ.get("BUILD", "build")
SLOW = "tsan" in BUILD or "asan" in BUILD
SEED = int(os.environ.get("OQ_RUN_SEED", str(int(time.time()) % 100000)))
_SCRIPT = os.path.splitext(os.path.basename(sys.argv[0] or "redis"))[0]
TMP = tempfile.mkdtemp(prefix=f"onceq-{_SCRIPT}-")
# onceq takes the password from REDISCLI_AUTH when the URL has none: one set
# in the caller's environment must not reach the test servers.
os.environ.pop("REDISCLI_AUTH", None)

PORT = None
URL = None
SERVER = None


def path(name):
    return os.path.join(TMP, name)


# ------------------------------------------------------------ the server

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server():
    """Starts the shared redis-server; returns (PORT, URL)."""
    global PORT, URL, SERVER
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found (run make deps)")
    PORT = free_port()
    URL = f"redis://127.0.0.1:{PORT}"
    SERVER = subprocess.Popen(
        [exe, "--port", str(PORT), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--daemonize", "no", "--dir", TMP],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        if subprocess.run(["redis-cli", "-p", str(PORT), "PING"],
                          capture_output=True, text=True).stdout.strip() \
                == "PONG":
            return PORT, URL
        time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def stop_server():
    if SERVER is not None:
        SERVER.terminate()
        try:
            SERVER.wait(timeout=10)
        except subprocess.TimeoutExpired:
            SERVER.kill()


def cli(*args):
    """redis-cli with JSON output; returns the parsed reply. (redis-cli's
    --json writes strings as UTF-8 with control characters escaped, so a
    value comes back exactly; invalid UTF-8 raises.)"""
    p = subprocess.run(["redis-cli", "-p", str(PORT), "--json"] +
                       [str(a) for a in args], capture_output=True,
                       encoding="utf-8", timeout=60)
    out = p.stdout.strip()
    if out.startswith("error:"):
        raise RuntimeError(f"redis-cli {args}: {out}")
    return json.loads(out) if out else None


def cli_raw(*args):
    return subprocess.run(["redis-cli", "-p", str(PORT)] +
                          [str(a) for a in args], capture_output=True,
                          text=True, timeout=60).stdout


def hash_of(key):
    h = cli("HGETALL", key)
    if isinstance(h, dict):
        return {k: int(v) for k, v in h.items()}
    return {h[i]: int(h[i + 1]) for i in range(0, len(h or []), 2)}


def fields_of(fields):
    """An entry's fields (a dict in RESP3, a flat list in RESP2)."""
    if isinstance(fields, dict):
        return fields
    return {fields[i]: fields[i + 1] for i in range(0, len(fields), 2)}


def entries(key):
    """A stream's entries as a list of field dicts."""
    return [fields_of(fields) for _, fields in cli("XRANGE", key, "-", "+")]


def pending(stream, group):
    return cli("XPENDING", stream, group)[0]


def pending_of(stream, name, group="g"):
    """Messages pending with one consumer of group."""
    try:
        info = cli("XINFO", "CONSUMERS", stream, group) or []
    except RuntimeError:  # no group yet
        return 0
    for c in info:
        d = fields_of(c)
        if d["name"] == name:
            return int(d["pending"])
    return 0


# ------------------------------------------------------------- onceq

def run(args, timeout=120, env=None, input=None):
    """Runs onceq to its end: (status, stdout, stderr). input (bytes), when
    given, is its stdin; else it inherits ours."""
    p = subprocess.run([ONCEQ] + args, capture_output=True, timeout=timeout,
                       cwd=TMP, env=env, input=input)
    return p.returncode, p.stdout.decode("utf-8", "replace"), \
        p.stderr.decode("utf-8", "replace")


def start(args, env=None):
    return subprocess.Popen([ONCEQ] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=TMP, env=env)


def finish(p, timeout=120):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out.decode("utf-8", "replace"), \
        err.decode("utf-8", "replace")


def one_line_exit_2(args, input=None):
    rc, out, err = run(args, timeout=30, input=input)
    assert rc == 2, (rc, err)
    assert len(err.strip().splitlines()) == 1, err
    return err


def wait_for(cond, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------- files

def script_file(name, body):
    f = path(name)
    with open(f, "w") as g:
        g.write("#!/bin/sh\n" + body)
    os.chmod(f, 0o755)
    return f


def lines_of(f):
    if not os.path.exists(f):
        return []
    with open(f) as g:
        return [x.strip() for x in g if x.strip()]
