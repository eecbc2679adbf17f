"""What the Redis end-to-end scripts (test_redis.py, test_reqreply_redis.py)
share: a real redis-server started on a free loopback port (and stopped
after), redis-cli readers that parse its --json output, the onceq binary
run or started in the scratch directory, and waits on conditions with a
timeout (no sleeps standing in for them). Cluster: a Redis Cluster of N
masters on loopback (redis-server --cluster-enabled yes, redis-cli
--cluster create), with kill -9 and restart of a node (AOF), a slot's
migration to another master, and redis-cli -c readers
(test_redis_partitions.py).

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
from collections import Counter

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


def cli_json(opts, args):
    """redis-cli OPTS --json ARGS; returns the parsed reply. (redis-cli's
    --json writes strings as UTF-8 with control characters escaped, so a
    value comes back exactly; invalid UTF-8 raises.)"""
    p = subprocess.run(["redis-cli"] + opts + ["--json"] +
                       [str(a) for a in args], capture_output=True,
                       encoding="utf-8", timeout=60)
    out = p.stdout.strip()
    if out.startswith("error:"):
        raise RuntimeError(f"redis-cli {opts} {args}: {out}")
    return json.loads(out) if out else None


def cli(*args):
    """redis-cli on the shared server (cli_json)."""
    return cli_json(["-p", str(PORT)], args)


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


# ------------------------------------------------------- a Redis Cluster

def free_cluster_port():
    """A loopback port P below the kernel's ephemeral range (32768 on) for
    a cluster node, with its cluster bus port P + 10000 free too (neither
    is an outgoing connection's port meanwhile, nor past 65535)."""
    import random
    rnd = random.Random()
    for _ in range(1000):
        p = rnd.randrange(10000, 22000)
        ok = True
        for q in (p, p + 10000):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", q))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            return p
    raise RuntimeError("no free port pair for a cluster node")


class Cluster:
    """A Redis Cluster of `masters` masters (and `replicas` replicas per
    master) on loopback, each redis-server with its own directory under
    TMP (its nodes-P.conf, and its AOF when appendonly): started by
    start(), which returns the ports; url is the comma-separated list of
    every master's URL (onceq takes them as seeds). kill9(port) and
    restart(port) kill a node's process with SIGKILL and start it again
    with the same directory and config (so with appendonly it comes back
    with its AOF and its nodes-P.conf); stop() stops them all.

    appendfsync: with appendonly, 'always' by default: a kill -9 (the
    process, not the machine) loses nothing with 'everysec' either (what
    was written reached the kernel), but 'always' also holds for a test
    that wants "nothing acknowledged is lost" to mean the disk."""

    def __init__(self, masters=3, replicas=0, appendonly=False,
                 appendfsync="always", node_timeout=2000, extra=(),
                 name="cl"):
        self.masters = masters
        self.replicas = replicas
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.node_timeout = node_timeout
        self.extra = [str(x) for x in extra]
        self.name = name
        self.ports = []
        self.procs = {}
        self.url = None

    # -------------------------------------------------------- processes

    def dir_of(self, port):
        return path(f"{self.name}-{port}")

    def _spawn(self, port):
        d = self.dir_of(port)
        os.makedirs(d, exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(self.node_timeout),
                "--dir", d, "--save", "", "--daemonize", "no",
                "--logfile", os.path.join(d, "redis.log")]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync",
                     self.appendfsync]
        else:
            args += ["--appendonly", "no"]
        self.procs[port] = subprocess.Popen(
            args + self.extra, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        # Up (answering, maybe -LOADING) or dead.
        for _ in range(1000):
            if self.procs[port].poll() is not None:
                raise RuntimeError(f"redis-server on {port} exited: see "
                                   f"{d}/redis.log")
            out = subprocess.run(["redis-cli", "-p", str(port), "PING"],
                                 capture_output=True, text=True).stdout
            if "PONG" in out or "LOADING" in out:
                return
            time.sleep(0.01)
        raise RuntimeError(f"redis-server on {port} did not start")

    def start(self, timeout=60):
        """Starts the nodes, creates the cluster, waits for
        cluster_state:ok everywhere; returns the masters' ports."""
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server not found (run make deps)")
        n = self.masters * (1 + self.replicas)
        try:
            for _ in range(n):
                p = free_cluster_port()
                self.ports.append(p)
                self._spawn(p)
            if self.masters >= 3:
                args = ["redis-cli", "--cluster", "create"] + \
                    [f"127.0.0.1:{p}" for p in self.ports] + \
                    ["--cluster-yes"]
                if self.replicas:
                    args += ["--cluster-replicas", str(self.replicas)]
                r = subprocess.run(args, capture_output=True, text=True,
                                   timeout=timeout)
                if r.returncode != 0:
                    raise RuntimeError(f"redis-cli --cluster create: "
                                       f"{r.stdout[-2000:]} {r.stderr}")
            else:
                # redis-cli --cluster create wants 3 masters at least:
                # by hand, as it does (equal slot ranges, distinct config
                # epochs, MEET).
                assert not self.replicas, "replicas need 3 masters"
                for i, p in enumerate(self.ports):
                    a = i * 16384 // n
                    b = (i + 1) * 16384 // n - 1
                    for cmd in (["ADDSLOTSRANGE", a, b],
                                ["SET-CONFIG-EPOCH", i + 1]) + \
                            ((["MEET", "127.0.0.1", self.ports[0]],)
                             if i else ()):
                        r = self.cli_at(p, "CLUSTER", *cmd)
                        assert r == "OK", (p, cmd, r)
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        self.ports = self.master_ports()
        self.url = ",".join(f"redis://127.0.0.1:{p}" for p in self.ports)
        return self.ports

    def pid_of(self, port):
        return self.procs[port].pid

    def kill9(self, port):
        """SIGKILL to the node's redis-server (waited for)."""
        p = self.procs[port]
        p.kill()
        p.wait()

    def restart(self, port, wait=True, timeout=60):
        """Starts the node again with the same port, directory and config
        (its AOF and nodes-P.conf); waits for cluster_state:ok on every
        node unless wait is False."""
        assert self.procs[port].poll() is not None, "still running"
        self._spawn(port)
        if wait:
            self.wait_ok(timeout)

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # ----------------------------------------------------------- state

    def info_of(self, port):
        """CLUSTER INFO of one node as a dict ({} when it does not
        answer, or answers -LOADING)."""
        out = subprocess.run(["redis-cli", "-p", str(port), "CLUSTER",
                              "INFO"], capture_output=True, text=True,
                             timeout=10).stdout
        return dict(x.strip().split(":", 1) for x in out.splitlines()
                    if ":" in x)

    def nodes_of(self, port):
        """CLUSTER NODES of one node: [{id, port, flags, slots}]."""
        out = subprocess.run(["redis-cli", "-p", str(port), "CLUSTER",
                              "NODES"], capture_output=True, text=True,
                             timeout=10).stdout
        nodes = []
        for line in out.splitlines():
            f = line.split()
            if len(f) < 8:
                continue
            nodes.append({"id": f[0],
                          "port": int(f[1].split("@")[0].rsplit(":", 1)[1]),
                          "flags": f[2].split(","), "link": f[7],
                          "slots": f[8:]})
        return nodes

    def is_ok(self):
        """Every node running says cluster_state:ok, knows every node
        connected and none failing, and they agree on who serves what."""
        views = set()
        for port, p in self.procs.items():
            if p.poll() is not None:
                return False
            if self.info_of(port).get("cluster_state") != "ok":
                return False
            nodes = self.nodes_of(port)
            if len(nodes) != len(self.procs):
                return False
            for n in nodes:
                if "fail" in n["flags"] or "fail?" in n["flags"] or \
                        n["link"] != "connected" or "handshake" in n["flags"]:
                    return False
            views.add(tuple(sorted((n["id"], tuple(n["slots"]))
                                   for n in nodes if "master" in n["flags"])))
        return len(views) == 1

    def wait_ok(self, timeout=60):
        wait_for(self.is_ok, timeout, "cluster_state:ok on every node")

    def master_ports(self):
        any_port = next(p for p, x in self.procs.items() if x.poll() is None)
        return sorted(n["port"] for n in self.nodes_of(any_port)
                      if "master" in n["flags"] and n["slots"])

    def node_id(self, port):
        return subprocess.run(["redis-cli", "-p", str(port), "CLUSTER",
                               "MYID"], capture_output=True, text=True,
                              timeout=10).stdout.strip()

    def keyslot(self, key):
        return int(self.cli_at(self.ports[0], "CLUSTER", "KEYSLOT", key))

    def port_of_slot(self, slot):
        """The master serving slot (as the first master sees it)."""
        port = self.port_of_slot_at(self.ports[0], slot)
        if port is None:
            raise RuntimeError(f"no master serves slot {slot}")
        return port

    def port_of_key(self, key):
        return self.port_of_slot(self.keyslot(key))

    # ---------------------------------------------------------- clients

    def cli(self, *args, port=None):
        """redis-cli -c (follows MOVED/ASK) with --json, through port (the
        first master by default); returns the parsed reply."""
        return cli_json(["-c", "-p", str(port or self.ports[0])], args)

    def cli_raw(self, *args, port=None):
        return subprocess.run(["redis-cli", "-c", "-p",
                               str(port or self.ports[0])] +
                              [str(a) for a in args], capture_output=True,
                              text=True, timeout=60).stdout

    def cli_at(self, port, *args):
        """redis-cli -p port, no redirections (a node's own view)."""
        return subprocess.run(["redis-cli", "-p", str(port)] +
                              [str(a) for a in args], capture_output=True,
                              text=True, timeout=60).stdout.strip()

    def hash_of(self, key):
        h = self.cli("HGETALL", key)
        if isinstance(h, dict):
            return {k: int(v) for k, v in h.items()}
        return {h[i]: int(h[i + 1]) for i in range(0, len(h or []), 2)}

    def dbsize(self, port):
        return int(self.cli_at(port, "DBSIZE") or 0)

    # ------------------------------------------------------- resharding

    def migrate_slot(self, slot, dst, batch=10, pause=0.0, first=(),
                     between=None):
        """Moves slot from its master to the master on port dst, as
        redis-cli --cluster reshard does (SETSLOT IMPORTING/MIGRATING,
        MIGRATE of its keys `batch` at a time with `pause` seconds between
        batches, SETSLOT NODE on every master). The keys `first` move
        first, then between() is called (the slot half moved), then the
        rest. Returns the number of keys moved."""
        src = self.port_of_slot(slot)
        assert src != dst, "the slot is there already"
        sid, did = self.node_id(src), self.node_id(dst)
        for port, args in ((dst, ("IMPORTING", sid)),
                           (src, ("MIGRATING", did))):
            r = self.cli_at(port, "CLUSTER", "SETSLOT", slot, *args)
            assert r == "OK", (port, args, r)
        moved = 0
        if first:
            r = self.cli_at(src, "MIGRATE", "127.0.0.1", dst, "", 0, 5000,
                            "REPLACE", "KEYS", *first)
            assert r == "OK", f"MIGRATE: {r}"
            moved += len(first)
        if between:
            between()
        while True:
            keys = self.cli_at(src, "CLUSTER", "GETKEYSINSLOT", slot,
                               batch).split()
            if not keys:
                break
            r = self.cli_at(src, "MIGRATE", "127.0.0.1", dst, "", 0, 5000,
                            "REPLACE", "KEYS", *keys)
            assert r in ("OK", "NOKEY"), f"MIGRATE: {r}"
            moved += len(keys)
            if pause:
                time.sleep(pause)
        # The target first (so the slot is never served by nobody), then
        # the source, then the others.
        for port in [dst, src] + [p for p in self.master_ports()
                                  if p not in (src, dst)]:
            r = self.cli_at(port, "CLUSTER", "SETSLOT", slot, "NODE", did)
            assert r == "OK", (port, r)
        wait_for(lambda: all(self.port_of_slot_at(p, slot) == dst
                             for p in self.procs), 30,
                 f"every node to see slot {slot} on {dst}")
        return moved

    def port_of_slot_at(self, port, slot):
        """The master serving slot as node port sees it (None: none)."""
        for n in self.nodes_of(port):
            if "master" not in n["flags"]:
                continue
            for r in n["slots"]:
                if r.startswith("["):
                    continue
                a, _, b = r.partition("-")
                if int(a) <= slot <= int(b or a):
                    return n["port"]
        return None


# ----------------------------------------------- events and their results

def stats_of(stream, name):
    with open(path(f"{stream}-{name}.stats")) as f:
        return json.load(f)


def read_events(p):
    with open(p, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def expected_words(events, poison=frozenset()):
    """Word counts of the first occurrence of each id, poison left out."""
    seen, counts = set(), Counter()
    for ev in events:
        if ev["id"] in seen:
            continue
        seen.add(ev["id"])
        if ev["id"] in poison:
            continue
        if "word" in ev:
            counts[ev["word"]] += 1
        else:
            counts.update(ev["text"].split())
    return dict(counts)


def with_poison(src, dst):
    """Drops the word of gen's poison events, so wordcount fails them (a
    permanent failure: dead letter, reason failed). Returns the ids."""
    ids = set()
    with open(src) as f, open(dst, "w") as g:
        for line in f:
            ev = json.loads(line)
            if ev.get("poison"):
                ids.add(ev["id"])
                ev = {"id": ev["id"], "poison": True}
            g.write(json.dumps(ev, separators=(",", ":")) + "\n")
    return ids
