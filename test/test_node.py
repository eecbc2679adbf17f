#!/usr/bin/env python3
"""Description: `onceq node`, the JSON-lines node protocol, against the real binary.

What it checks:
  - every case in ../shared/protocol-cases (the task statement's) and in
    test/node_cases (ours): the replies, in order, with exactly the expected
    fields and values (strictly: true is not 1, 1 is not "1");
  - behaviour a case file cannot express: replies are flushed one by one
    (an interactive client gets each answer before it sends the next line),
    exit status 0 at end of input, skipped lines are logged to stderr only,
    bytes that are not UTF-8, long strings, a closed stdout, usage errors;
  - a long generated session of mixed messages (word count, checkpoints,
    queue operations, kafka, errors, bad lines), every reply checked against
    a small reference model written here, not against the code under test.

Environment: ONCEQ (the binary; default build/onceq), BUILD (a name with
"tsan" or "asan" shrinks the session), OQ_NODE_SESSION (session length),
OQ_NODE_SEED or --seed (the session's seed, printed), OQ_TIME_MULT (stretches
timeouts). Prints "N passed, N failed" last; exits 1 on any failure.
"""
import argparse
import collections
import json
import os
import random
import select
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.environ.get("BUILD", "build")
ONCEQ = os.environ.get("ONCEQ", os.path.join(ROOT, BUILD, "onceq"))
if not os.path.isabs(ONCEQ):
    ONCEQ = os.path.join(ROOT, ONCEQ)
SANITIZED = "tsan" in BUILD or "asan" in BUILD
TIME_MULT = float(os.environ.get("OQ_TIME_MULT", "10" if SANITIZED else "1"))
SHARED_CASES = os.path.join(os.path.dirname(ROOT), "shared", "protocol-cases")
OUR_CASES = os.path.join(HERE, "node_cases")

results = {"pass": 0, "fail": 0}


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def run_test(name, fn):
    t0 = time.time()
    try:
        fn()
    except Failure as e:
        results["fail"] += 1
        print("FAIL %s: %s" % (name, e))
        return
    except Exception as e:  # a crash of the test itself is a failure too
        results["fail"] += 1
        print("FAIL %s: %s: %s" % (name, type(e).__name__, e))
        return
    results["pass"] += 1
    print("ok   %s (%.2fs)" % (name, time.time() - t0))


def run_node(data, args=(), timeout=60):
    """Feeds data (bytes or list of str lines) to `onceq node`."""
    if isinstance(data, list):
        data = "".join(l + "\n" for l in data).encode()
    p = subprocess.run([ONCEQ, "node"] + list(args), input=data,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout * TIME_MULT)
    return p.returncode, p.stdout, p.stderr


def no_repeated_keys(pairs):
    keys = [k for k, _ in pairs]
    check(len(keys) == len(set(keys)), "an object repeats a key: %r" % keys)
    return dict(pairs)


def reject_constant(c):
    raise Failure("not strict JSON: %s" % c)


def loads(line):
    """json.loads, stricter: no repeated keys, no NaN or Infinity."""
    return json.loads(line, object_pairs_hook=no_repeated_keys,
                      parse_constant=reject_constant)


def reply_lines(out):
    text = out.decode("utf-8")  # strict: the node must write valid UTF-8
    check(text == "" or text.endswith("\n"), "output does not end in a newline")
    return [loads(l) for l in text.split("\n")[:-1]] if text else []


# ------------------------------------------------------------ comparison

def strict_eq(a, b):
    """JSON equality without Python's True == 1 and 1 == "1" slips."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(strict_eq(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_eq(x, y) for x, y in zip(a, b))
    return a == b


def is_whole_message(d):
    return isinstance(d, dict) and "body" in d and "type" not in d


def compare_reply(expected, got, where):
    if is_whole_message(expected):
        check(strict_eq(expected, got),
              "%s: expected %s, got %s" % (where, json.dumps(expected),
                                           json.dumps(got)))
        return
    check(isinstance(got, dict) and set(got) == {"src", "dest", "body"},
          "%s: not a src/dest/body message: %s" % (where, json.dumps(got)))
    check(strict_eq(expected, got["body"]),
          "%s: expected body %s, got %s" % (where, json.dumps(expected),
                                            json.dumps(got["body"])))


# ---------------------------------------------------------------- cases

def case_test(directory, name):
    def fn():
        base = os.path.join(directory, name)
        with open(base + ".in.jsonl", "rb") as f:
            data = f.read()
        with open(base + ".expected.jsonl", encoding="utf-8") as f:
            expected = [json.loads(l) for l in f if l.strip()]
        args = []
        if os.path.exists(base + ".args"):
            with open(base + ".args") as f:
                args = f.read().split()
        rc, out, err = run_node(data, ["-q"] + args)
        check(rc == 0, "exit status %d (stderr: %s)" % (rc, err.decode(errors="replace")))
        got = reply_lines(out)
        for i, (e, g) in enumerate(zip(expected, got)):
            compare_reply(e, g, "reply %d" % (i + 1))
        check(len(got) == len(expected),
              "%d replies, expected %d" % (len(got), len(expected)))
    return fn


def case_names(directory):
    return sorted(f[: -len(".in.jsonl")] for f in os.listdir(directory)
                  if f.endswith(".in.jsonl"))


# ------------------------------------------------------- behaviour tests

def msg(body, src="c1", dest="n1"):
    return json.dumps({"src": src, "dest": dest, "body": body})


def t_interactive_flush():
    """Each reply arrives before the next request is written."""
    p = subprocess.Popen([ONCEQ, "node"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for i in range(1, 6):
            p.stdin.write((msg({"type": "process", "msg_id": i,
                                "event_id": "e%d" % (i % 3), "word": "w"})
                           + "\n").encode())
            p.stdin.flush()
            ready, _, _ = select.select([p.stdout], [], [], 10 * TIME_MULT)
            check(ready, "no reply to message %d within the timeout" % i)
            line = p.stdout.readline()
            body = json.loads(line)["body"]
            check(body["in_reply_to"] == i, "reply to %r, expected %d"
                  % (body.get("in_reply_to"), i))
        p.stdin.close()
        rc = p.wait(timeout=10 * TIME_MULT)
        check(rc == 0, "exit status %d at end of input" % rc)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def t_empty_input():
    rc, out, err = run_node(b"")
    check(rc == 0 and out == b"", "rc %d, output %r" % (rc, out))


def t_bad_lines_logged():
    data = b'garbage\n{"src":"c"}\n\n{"src":"c","dest":"n","body":{"type":"commit","msg_id":1}}\n[1]'
    rc, out, err = run_node(data)
    check(rc == 0, "exit status %d" % rc)
    got = reply_lines(out)
    check(len(got) == 1 and got[0]["body"]["type"] == "committed",
          "stdout holds only the one reply: %r" % out)
    e = err.decode()
    for n in (1, 2, 5):
        check("line %d" % n in e, "stderr does not mention line %d: %r" % (n, e))
    check("line 3" not in e and "line 4" not in e,
          "blank or good lines were logged: %r" % e)
    rc, out, err = run_node(data, ["--quiet"])
    check(rc == 0 and err == b"", "--quiet still logged: %r" % err)


def t_no_trailing_newline():
    data = msg({"type": "commit", "msg_id": 9}).encode()
    rc, out, _ = run_node(data)
    got = reply_lines(out)
    check(rc == 0 and len(got) == 1 and got[0]["body"]["in_reply_to"] == 9,
          "last line without newline not answered: %r" % out)


def t_invalid_utf8():
    data = (b'{"src":"c","dest":"n","body":{"type":"process","msg_id":1,'
            b'"event_id":"e\xc3","word":"a\xffb\xe6\x97\xa5c\xe6\x97"}}\n')
    rc, out, _ = run_node(data)
    got = reply_lines(out)  # raises if the reply is not UTF-8
    check(got[0]["body"]["word"] == "a\ufffdb\u65e5c\ufffd\ufffd",
          "word %r" % got[0]["body"]["word"])


def t_long_strings():
    word = "x" * 1000000 + "\"\\\n"
    payload = list(range(100000))
    lines = [msg({"type": "process", "msg_id": 1, "event_id": "big", "word": word}),
             msg({"type": "enqueue", "msg_id": 2, "id": "big", "payload": payload}),
             msg({"type": "receive", "msg_id": 3, "max": 1})]
    rc, out, _ = run_node(lines)
    got = reply_lines(out)
    check(rc == 0 and len(got) == 3, "rc %d, %d replies" % (rc, len(got)))
    check(got[0]["body"]["word"] == word, "long word mangled")
    check(got[2]["body"]["messages"][0]["payload"] == payload, "long payload mangled")


def t_receipts_are_integers():
    lines = [msg({"type": "enqueue", "msg_id": 1, "id": "a", "payload": 1}),
             msg({"type": "receive", "msg_id": 2, "max": 1}),
             msg({"type": "init", "msg_id": 2 ** 53, "node_id": "n", "node_ids": []})]
    _, out, _ = run_node(lines)
    text = out.decode()
    check('"receipt":1,' in text and '"attempts":1}' in text,
          "receipt/attempts not plain integers: %s" % text)
    check('"in_reply_to":9007199254740992' in text, "big msg_id: %s" % text)


def t_stdout_closed():
    """A reader that went away ends the node (status 1), not a crash."""
    p = subprocess.Popen([ONCEQ, "node"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    line = (msg({"type": "process", "msg_id": 1, "event_id": "e", "word": "w"})
            + "\n").encode()
    try:
        p.stdin.write(line * 2000)
        p.stdin.close()
    except BrokenPipeError:
        pass
    rc = p.wait(timeout=30 * TIME_MULT)
    p.stderr.close()
    check(rc == 1, "exit status %d, expected 1" % rc)


def t_usage():
    p = subprocess.run([ONCEQ, "node", "--help"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30 * TIME_MULT)
    check(p.returncode == 0 and b"usage: onceq node" in p.stdout,
          "--help: rc %d" % p.returncode)
    for bad in (["--bogus"], ["--max-receives", "x"], ["--visibility-timeout", "0"],
                ["--ttl", "-1"], ["extra"]):
        p = subprocess.run([ONCEQ, "node"] + bad, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=30 * TIME_MULT)
        check(p.returncode == 2, "%s: rc %d, expected 2" % (bad, p.returncode))
        # One line, "onceq node: ...", as every command says it (a bad
        # option printed getopt's "node: ..." and the whole usage).
        check(p.stderr.startswith(b"onceq node: ") and
              p.stderr.count(b"\n") == 1, "%s: stderr %r" % (bad, p.stderr))


def t_poll_cap():
    """poll answers at most 1000 messages per key, from the given offset."""
    lines = [msg({"type": "send", "msg_id": i, "key": "k", "msg": i}) for i in range(1005)]
    lines += [msg({"type": "poll", "msg_id": 2000, "offsets": {"k": 0}}),
              msg({"type": "poll", "msg_id": 2001, "offsets": {"k": 5}}),
              msg({"type": "poll", "msg_id": 2002, "offsets": {"k": 1000}})]
    rc, out, _ = run_node(lines)
    got = reply_lines(out)[-3:]
    check(got[0]["body"]["msgs"]["k"] == [[i, i] for i in range(1000)], "poll from 0")
    check(got[1]["body"]["msgs"]["k"] == [[i, i] for i in range(5, 1005)], "poll from 5")
    check(got[2]["body"]["msgs"]["k"] == [[i, i] for i in range(1000, 1005)], "poll from 1000")


def t_many_checkpoints():
    """Checkpoints are independent copies; a restore keeps what is committed."""
    lines, expect = [], []
    mid = 0
    for i in range(200):
        mid += 1
        lines.append(msg({"type": "process", "msg_id": mid, "event_id": "e%d" % i,
                          "word": "w%d" % (i % 7)}))
        mid += 1
        lines.append(msg({"type": "checkpoint", "msg_id": mid, "checkpoint_id": "c%d" % i}))
        if i % 3 == 0:
            mid += 1
            lines.append(msg({"type": "rollback" if i % 2 else "commit", "msg_id": mid}))
    for i in range(199, -1, -1):
        mid += 1
        lines.append(msg({"type": "restore", "msg_id": mid, "checkpoint_id": "c%d" % i}))
        expect.append((mid, i))
    rc, out, _ = run_node(lines)
    got = {r["body"]["in_reply_to"]: r["body"] for r in reply_lines(out)}
    # What each restore must answer, from the reference model.
    m = Model(0, 10000)
    want = {}
    for l in lines:
        b = json.loads(l)["body"]
        r = m.apply(b)
        if b["type"] == "restore":
            want[b["msg_id"]] = r["counts"]
    for mid, i in expect:
        check(got[mid]["counts"] == want[mid],
              "restore c%d: %r != %r" % (i, got[mid]["counts"], want[mid]))


def raw(body, src="c1", dest="n1"):
    """A request line with body given as raw JSON text (bytes)."""
    return (b'{"src":"%s","dest":"%s","body":' % (src.encode(), dest.encode())
            + body + b'}\n')


def t_invalid_utf8_values():
    """Bytes that are not UTF-8 in a kafka msg or a queue payload (values
    and keys) come back as U+FFFD: every reply parses strictly."""
    data = (raw(b'{"type":"send","msg_id":1,"key":"k","msg":{"a\xff":"b\xc3","c":["\xed\xa0\x80"]}}')
            + raw(b'{"type":"poll","msg_id":2,"offsets":{"k":0}}')
            + raw(b'{"type":"enqueue","msg_id":3,"id":"q","payload":"x\xfe\xe6\x97"}')
            + raw(b'{"type":"receive","msg_id":4}'))
    rc, out, _ = run_node(data)
    got = reply_lines(out)
    check(rc == 0 and len(got) == 4, "rc %d, %d replies" % (rc, len(got)))
    check(got[1]["body"]["msgs"]["k"] == [[0, {"a\ufffd": "b\ufffd",
                                                "c": ["\ufffd\ufffd\ufffd"]}]],
          "poll: %r" % got[1]["body"])
    check(got[3]["body"]["messages"][0]["payload"] == "x\ufffd\ufffd\ufffd",
          "receive: %r" % got[3]["body"])


def t_no_repeated_keys():
    """No reply repeats a key: words that differ only in bytes that are not
    UTF-8 are one word (U+FFFD); a key listed twice is answered once; a
    request object with a repeated key is refused (error 12)."""
    data = (raw(b'{"type":"process","msg_id":1,"event_id":"e1","word":"\xff"}')
            + raw(b'{"type":"process","msg_id":2,"event_id":"e2","word":"\xfe"}')
            + raw(b'{"type":"checkpoint","msg_id":3,"checkpoint_id":"c"}')
            + raw(b'{"type":"restore","msg_id":4,"checkpoint_id":"c"}')
            + raw(b'{"type":"commit_offsets","msg_id":5,"offsets":{"k":3}}')
            + raw(b'{"type":"list_committed_offsets","msg_id":6,"keys":["k","k","x","k"]}')
            + raw(b'{"type":"send","msg_id":7,"key":"k","msg":{"a":1,"a":2}}')
            + raw(b'{"type":"poll","msg_id":8,"offsets":{"k":0,"k":1}}')
            + raw(b'{"type":"poll","msg_id":9,"offsets":{"k\xff":0,"k\xfe":1}}'))
    rc, out, _ = run_node(data)
    got = [r["body"] for r in reply_lines(out)]  # raises on a repeated key
    check(len(got) == 9, "%d replies" % len(got))
    check(got[1]["count"] == 2 and got[3]["counts"] == {"\ufffd": 2},
          "restore: %r" % got[3])
    check(got[5]["offsets"] == {"k": 3}, "list: %r" % got[5])
    for i in (6, 7, 8):
        check(got[i]["type"] == "error" and got[i]["code"] == 12
              and "repeated key" in got[i]["text"], "reply %d: %r" % (i + 1, got[i]))


def t_huge_delays():
    """delay_ms and visibility_timeout_ms up to INT64_MAX mean "not for a
    very long time" (cut to 2^62 ms), never "at once"."""
    big = 2 ** 63 - 1
    lines = [msg({"type": "enqueue", "msg_id": 1, "id": "a", "payload": 1, "delay_ms": big}),
             msg({"type": "enqueue", "msg_id": 2, "id": "b", "payload": 2}),
             msg({"type": "receive", "msg_id": 3, "visibility_timeout_ms": big}),
             msg({"type": "receive", "msg_id": 4}),
             msg({"type": "enqueue", "msg_id": 5, "id": "c", "payload": 3}),
             msg({"type": "receive", "msg_id": 6}),
             msg({"type": "nack", "msg_id": 7, "receipt": 2, "delay_ms": big}),
             msg({"type": "receive", "msg_id": 8})]
    for args in ([], ["--visibility-timeout", str(big)]):
        rc, out, err = run_node(lines, args)
        got = [r["body"] for r in reply_lines(out)]
        check(rc == 0 and len(got) == 8, "%s: rc %d, %d replies: %s"
              % (args, rc, len(got), err[-300:]))
        ids = [[m["id"] for m in got[i]["messages"]] for i in (2, 3, 5, 7)]
        check(ids == [["b"], [], ["c"], []], "%s: received %r" % (args, ids))
        check(got[6]["type"] == "nack_ok", "nack: %r" % got[6])


def t_init_ok_from_new_id():
    """init_ok comes from the node id that init just set, with or without dest."""
    lines = [json.dumps({"src": "c", "body": {"type": "init", "msg_id": 1,
                                              "node_id": "n7", "node_ids": []}}),
             msg({"type": "init", "msg_id": 2, "node_id": "n8", "node_ids": []})]
    _, out, _ = run_node(lines)
    got = reply_lines(out)
    check([g["src"] for g in got] == ["n7", "n8"], "srcs: %r" % got)


def t_exact_numbers():
    """msg_id above 2^53 and numbers in a msg come back as sent."""
    data = (raw(b'{"type":"send","msg_id":9007199254740993,"key":"k",'
                b'"msg":[9007199254740993,0.30000000000000004,-0.0,1E+2,'
                b'12345678901234567890123]}')
            + raw(b'{"type":"poll","msg_id":-9223372036854775808,"offsets":{"k":0}}')
            + raw(b'{"type":"enqueue","msg_id":3,"id":"q","payload":{"x":1.50}}')
            + raw(b'{"type":"receive","msg_id":4}')
            + raw(b'{"type":"commit","msg_id":9223372036854775808}'))
    rc, out, _ = run_node(data)
    text = out.decode()
    reply_lines(out)
    for frag in ('"in_reply_to":9007199254740993,',
                 '[[0,[9007199254740993,0.30000000000000004,-0.0,1E+2,'
                 '12345678901234567890123]]]',
                 '"in_reply_to":-9223372036854775808,', '"payload":{"x":1.50}',
                 '"in_reply_to":null,'):
        check(frag in text, "%s not in %s" % (frag, text))


def t_unparsable_json():
    """JSON that cJSON cannot take (a lone surrogate, nesting over its limit)
    is answered with error 12 when it has src and body; not-JSON is not."""
    deep = b"[" * 1500 + b"]" * 1500
    data = (raw(b'{"type":"process","msg_id":9007199254740993,"event_id":"e","word":"\\ud800"}',
                src="c\\u00e9")
            + raw(b'{"type":"send","msg_id":2,"key":"k","msg":' + deep + b'}')
            + b'{"src":"c","body":{"msg_id":3,"x":"\\udc00"}, "src":"d", "body":7}\n'
            + raw(b'{"type":"process","event_id":"\\ud800"}')
            + b'{"src":"c","body":{"msg_id":5,"x":"\\udc00"}} x\n'
            + raw(b'{"msg_id":6,"x":"\\ud800","y":01}')
            + raw(b'{"msg_id":7,"x":"\\ud800\x01"}')
            + raw(b'{"type":"commit","msg_id":8,"x":01}')
            + raw(b'{"type":"commit","msg_id":9,"x":"\x01"}')
            + raw(b'{"type":"commit","msg_id":10}'))
    rc, out, err = run_node(data)
    got = reply_lines(out)
    ids = [g["body"]["in_reply_to"] for g in got]
    check(ids == [9007199254740993, 2, 3, None, 10], "replies to %r" % ids)
    check(got[0]["dest"] == "c\u00e9" and got[0]["src"] == "n1", "envelope %r" % got[0])
    for g in got[:4]:
        check(g["body"]["type"] == "error" and g["body"]["code"] == 12, "%r" % g)
    check(err.count(b"not JSON") == 5, "stderr: %r" % err)


def t_scanner_read_arounds():
    """What the strict scanner refuses but the node answers, read as
    docs/NODE.md says: strings keep an escaped NUL; escapes in names and
    keys are decoded; 1.0e1 is an integer; a BOM is skipped; a lone surrogate
    in a key, a repeated key deep in a msg (the rest of the line is still
    checked, up to 16 repeated keys), and a malformed part inside a value
    nested deeper than 1000 levels (not checked) are answered with error 12;
    a malformed part elsewhere is not JSON."""
    deep = b"[" * 1200 + b"1,,2" + b"]" * 1200
    data = (raw(b'{"type":"process","msg_id":1,"event_id":"a\\u0000b","word":"x\\u0000y"}')
            + raw(b'{"type":"process","msg_id":2,"event_id":"a","word":"x"}')
            + raw(b'{"type":"com\\u006dit","msg_id":1.0e1}')
            + b'\xef\xbb\xbf' + raw(b'{"type":"commit","msg_id":4}')
            + raw(b'{"type":"poll","msg_id":5,"offsets":{"\\udbff":0}}')
            + raw(b'{"type":"send","msg_id":6,"key":"k","msg":[{"b":1,"b":2}]}')
            + raw(b'{"type":"send","msg_id":7,"key":"k","msg":' + deep + b'}')
            + raw(b'{"type":"send","msg_id":8,"key":"k","msg":' + deep + b',01}')
            + raw(b'{"type":"send","msg_id":11,"key":"k","msg":[{"b":1,"b":2}],"x":01}')
            + raw(b'{"type":"send","msg_id":12,"key":"k","msg":{' + b'"b":1,' * 40 + b'"c":2}}')
            + raw(b'{"type":"commit","msg_id":9}'))
    rc, out, err = run_node(data)
    got = [r["body"] for r in reply_lines(out)]
    check(rc == 0 and [g["in_reply_to"] for g in got] == [1, 2, 10, 4, 5, 6, 7, 12, 9],
          "replies %r; stderr %r" % (got, err))
    check(got[0]["word"] == "x\u0000y" and got[1]["was_duplicate"] is False,
          "NUL in strings: %r %r" % (got[0], got[1]))
    check(got[2]["type"] == "committed" and got[2]["output_count"] == 2, "%r" % got[2])
    check(got[3]["type"] == "committed", "BOM: %r" % got[3])
    for g in got[4:8]:
        check(g["type"] == "error" and g["code"] == 12, "%r" % g)
    check("repeated key 'b'" in got[5]["text"], "%r" % got[5])
    check(err.count(b"not JSON") == 2 and b"line 8" in err and b"line 9" in err,
          "stderr: %r" % err)


def t_restore_keeps_commits():
    """checkpoint, commit, restore, commit commits nothing twice."""
    lines = [msg({"type": "process", "msg_id": 1, "event_id": "e1", "word": "w"}),
             msg({"type": "checkpoint", "msg_id": 2, "checkpoint_id": "c"}),
             msg({"type": "commit", "msg_id": 3}),
             msg({"type": "restore", "msg_id": 4, "checkpoint_id": "c"}),
             msg({"type": "commit", "msg_id": 5}),
             msg({"type": "process", "msg_id": 6, "event_id": "e2", "word": "w"}),
             msg({"type": "rollback", "msg_id": 7}),
             msg({"type": "process", "msg_id": 8, "event_id": "e1", "word": "w"})]
    _, out, _ = run_node(lines)
    got = [r["body"] for r in reply_lines(out)]
    check(got[2]["output_count"] == 1 and got[4]["output_count"] == 0,
          "commits: %r, %r" % (got[2], got[4]))
    check(got[3]["counts"] == {"w": 1}, "restored %r" % got[3])
    check(got[7]["was_duplicate"] is True and got[7]["count"] == 1, "%r" % got[7])


# ------------------------------------------------------ reference model

class QMsg:
    __slots__ = ("id", "payload", "rc")

    def __init__(self, id_, payload):
        self.id, self.payload, self.rc = id_, payload, 0


class Model:
    """What the node must answer, written from the spec (docs/NODE.md)."""

    HUGE = 10 ** 9  # a delay that never ends within a session

    def __init__(self, max_receives, dedup_window):
        self.max_receives = max_receives
        self.dedup_window = dedup_window
        self.node_id = None
        self.counter = 0
        # word count: state = last commit + pending
        self.counts, self.seen, self.pending, self.cps = {}, set(), [], {}
        # queue
        self.ready = collections.deque()
        self.inflight = {}  # receipt -> QMsg
        self.next_receipt = 0
        self.dead = []
        self.window = collections.deque()
        self.window_set = set()
        # kafka
        self.logs, self.mids, self.committed = {}, {}, {}

    def apply(self, b):
        return getattr(self, "m_" + b["type"])(b)

    def m_init(self, b):
        self.node_id = b["node_id"]
        self.counter += 1
        return {"msg_id": self.counter - 1}

    def m_process(self, b):
        e, w = b["event_id"], b["word"]
        if e in self.seen:
            return {"word": w, "count": self.counts.get(w, 0), "was_duplicate": True}
        self.seen.add(e)
        self.counts[w] = self.counts.get(w, 0) + 1
        self.pending.append((e, w))
        return {"word": w, "count": self.counts[w], "was_duplicate": False}

    def m_checkpoint(self, b):
        # A checkpoint holds the pending outputs; what is committed stays.
        self.cps[b["checkpoint_id"]] = list(self.pending)
        return {"checkpoint_id": b["checkpoint_id"]}

    def m_restore(self, b):
        cp = self.cps.get(b["checkpoint_id"])
        if cp is None:
            return ("error", 20, b["checkpoint_id"])
        self.m_rollback(b)  # back to the last commit
        for e, w in cp:  # then the outputs not committed since
            if e not in self.seen:
                self.m_process({"event_id": e, "word": w})
        return {"counts": dict(self.counts)}

    def m_commit(self, b):
        n, self.pending = len(self.pending), []
        return {"output_count": n}

    def m_rollback(self, b):
        n = len(self.pending)
        for e, w in reversed(self.pending):
            self.seen.discard(e)
            self.counts[w] -= 1
            if self.counts[w] == 0:
                del self.counts[w]
        self.pending = []
        return {"discarded_count": n}

    def m_enqueue(self, b):
        i = b["id"]
        if i in self.window_set:
            return {"duplicate": True}
        self.window.append(i)
        self.window_set.add(i)
        while len(self.window) > self.dedup_window:
            self.window_set.discard(self.window.popleft())
        if b.get("delay_ms", 0) < self.HUGE:
            self.ready.append(QMsg(i, b["payload"]))
        return {"duplicate": False}

    def m_receive(self, b):
        mx, vt = min(b.get("max", 10), 1000), b.get("visibility_timeout_ms")
        out, got = [], []
        while len(out) < mx and self.ready:
            m = self.ready.popleft()
            if self.max_receives and m.rc >= self.max_receives:
                self.dead.append({"id": m.id, "reason": "max_attempts", "attempts": m.rc})
                continue
            self.next_receipt += 1
            m.rc += 1
            self.inflight[self.next_receipt] = m
            got.append(self.next_receipt)
            out.append({"id": m.id, "payload": m.payload,
                        "receipt": self.next_receipt, "attempts": m.rc})
        if vt == 0:  # visible again at once, in the order received
            for r in got:
                self.ready.append(self.inflight.pop(r))
        return {"messages": out}

    def m_ack(self, b):
        if self.inflight.pop(b["receipt"], None) is None:
            return ("error", 22, "receipt")
        return {}

    def m_nack(self, b):
        m = self.inflight.pop(b["receipt"], None)
        if m is None:
            return ("error", 22, "receipt")
        if b.get("delay_ms", 0) < self.HUGE:
            self.ready.append(m)
        return {}

    def m_dead_letters(self, b):
        return {"messages": [dict(d) for d in self.dead]}

    def m_send(self, b):
        mid = b.get("message_id")  # idempotent per key
        k = None if mid is None else (b["key"], type(mid).__name__, mid)
        if k is not None and k in self.mids:
            return {"offset": self.mids[k], "duplicate": True}
        log = self.logs.setdefault(b["key"], [])
        log.append(b["msg"])
        if k is not None:
            self.mids[k] = len(log) - 1
        return {"offset": len(log) - 1}

    def m_poll(self, b):
        msgs = {}
        for k, off in b["offsets"].items():
            log = self.logs.get(k, [])
            msgs[k] = [[o, log[o]] for o in range(off, min(len(log), off + 1000))]
        return {"msgs": msgs}

    def m_commit_offsets(self, b):
        for k, off in b["offsets"].items():
            self.committed[k] = max(off, self.committed.get(k, off))
        return {}

    def m_list_committed_offsets(self, b):
        return {"offsets": {k: self.committed[k] for k in b["keys"]
                            if k in self.committed}}


REPLY_TYPE = {
    "init": "init_ok", "process": "processed", "checkpoint": "checkpoint_saved",
    "restore": "restored", "commit": "committed", "rollback": "rolled_back",
    "enqueue": "enqueue_ok", "receive": "receive_ok", "ack": "ack_ok",
    "nack": "nack_ok", "dead_letters": "dead_letters_ok", "send": "send_ok",
    "poll": "poll_ok", "commit_offsets": "commit_offsets_ok",
    "list_committed_offsets": "list_committed_offsets_ok",
}

# ----------------------------------------------------- session generator

WORDS = ["apple", "pear", "the", "a", "", "quo\"te", "back\\slash", "tab\there",
         "new\nline", "é", "日本", "🎉", "ctl\u0001\u001f"] + ["w%d" % i for i in range(30)]
KEYS = ["k%d" % i for i in range(8)] + ["k\"q", "ключ"]
CHARS = "abcxyz \"\\\n\t\u0001é日🎉/"


class Session:
    def __init__(self, rng, n, max_receives, dedup_window):
        self.rng, self.n = rng, n
        self.model = Model(max_receives, dedup_window)
        self.msg_id = 0
        self.events = max(50, n // 10)
        self.issued = []  # every receipt handed out

    def text(self):
        return "".join(self.rng.choice(CHARS) for _ in range(self.rng.randrange(8)))

    def value(self, depth=0):
        r = self.rng.random()
        if r < 0.25:
            return self.rng.randrange(-10 ** 9, 10 ** 9)
        if r < 0.35:
            return round(self.rng.uniform(-1000, 1000), 3)
        if r < 0.55:
            return self.text()
        if r < 0.6:
            return self.rng.choice([True, False, None])
        if depth > 2:
            return self.text()
        if r < 0.8:
            return [self.value(depth + 1) for _ in range(self.rng.randrange(4))]
        return {self.text(): self.value(depth + 1) for _ in range(self.rng.randrange(4))}

    def receipt(self):
        r = self.rng.random()
        if r < 0.6 and self.model.inflight:
            return self.rng.choice(list(self.model.inflight)) \
                if len(self.model.inflight) < 64 else next(iter(self.model.inflight))
        if r < 0.9 and self.issued:
            return self.rng.choice(self.issued)
        return self.rng.choice([0, 10 ** 12, self.model.next_receipt + 1])

    def body(self, kind):
        rng = self.rng
        if kind == "process":
            eid = "e%d" % rng.randrange(self.events)
            if rng.random() < 0.02:
                eid += self.text()
            return {"event_id": eid, "word": rng.choice(WORDS)}
        if kind in ("checkpoint", "restore"):
            return {"checkpoint_id": "cp%d" % rng.randrange(5 if kind == "checkpoint" else 7)}
        if kind == "enqueue":
            b = {"id": "q%d" % rng.randrange(self.n // 8 + 10), "payload": self.value()}
            r = rng.random()
            if r < 0.1:
                b["delay_ms"] = Model.HUGE
            elif r < 0.2:
                b["delay_ms"] = 0
            return b
        if kind == "receive":
            b = {}
            if rng.random() < 0.8:
                b["max"] = rng.randrange(7)
            r = rng.random()
            if r < 0.15:
                b["visibility_timeout_ms"] = 0
            elif r < 0.5:
                b["visibility_timeout_ms"] = 3600000
            return b
        if kind in ("ack", "nack"):
            b = {"receipt": self.receipt()}
            if kind == "nack":
                r = rng.random()
                if r < 0.15:
                    b["delay_ms"] = Model.HUGE
                elif r < 0.6:
                    b["delay_ms"] = 0
            return b
        if kind == "send":
            b = {"key": rng.choice(KEYS), "msg": rng.choice([rng.randrange(10 ** 6), self.text()])}
            if rng.random() < 0.3:
                r = rng.randrange(self.n // 30 + 10)
                b["message_id"] = r if rng.random() < 0.5 else "m%d" % r
            return b
        if kind == "poll":
            # Mostly near the end of each log (as a consumer would), some
            # from the start: long replies are slow to check.
            ks = rng.sample(KEYS + ["nokey"], rng.randrange(1, 4))
            return {"offsets": {k: 0 if rng.random() < 0.02 else
                                max(0, len(self.model.logs.get(k, [])) - rng.randrange(-2, 30))
                                for k in ks}}
        if kind == "commit_offsets":
            ks = rng.sample(KEYS, rng.randrange(1, 4))
            return {"offsets": {k: rng.randrange(len(self.model.logs.get(k, [])) + 3)
                                for k in ks}}
        if kind == "list_committed_offsets":
            return {"keys": rng.sample(KEYS + ["nokey"], rng.randrange(0, 5))}
        if kind == "init":
            return {"node_id": "n%d" % rng.randrange(5), "node_ids": ["n0", "n1"]}
        return {}

    MIX = [("process", 45), ("commit", 2), ("rollback", 2), ("checkpoint", 0.4),
           ("restore", 0.8), ("enqueue", 9), ("receive", 7), ("ack", 4), ("nack", 2.5),
           ("dead_letters", 0.3), ("send", 8), ("poll", 3), ("commit_offsets", 1.5),
           ("list_committed_offsets", 1.5), ("init", 0.05), ("unknown", 0.7),
           ("malformed", 1.5), ("badline", 1)]

    MALFORMED = [("process", {"event_id": "e1"}, "word"),
                 ("process", {"event_id": 5, "word": "w"}, "event_id"),
                 ("checkpoint", {}, "checkpoint_id"),
                 ("enqueue", {"id": "x"}, "payload"),
                 ("receive", {"max": -2}, "max"),
                 ("ack", {"receipt": "1"}, "receipt"),
                 ("nack", {"receipt": 1, "delay_ms": -1}, "delay_ms"),
                 ("send", {"msg": 1}, "key"),
                 ("poll", {"offsets": []}, "offsets"),
                 ("list_committed_offsets", {"keys": "k1"}, "keys")]

    BADLINES = ["not json {", '{"src":"c1"}', '{"body":{"type":"commit","msg_id":1}}', "[]",
                '{"src":"c1","dest":"n","body":{"type":"rollback","msg_id":1}} extra',
                '{"src":"c1","dest":"n","body":{"type":"rollback","msg_id":1}',
                '{"src":"c1","dest":"n","body":7}']

    def line(self, kind, pre_init=False):
        """One input line and its expected reply (None: no reply)."""
        rng = self.rng
        if kind == "badline":
            return rng.choice(self.BADLINES), None
        self.msg_id += 1
        src, dest = rng.choice(["c1", "c2", "stream"]), "pre" if pre_init else "n"
        need = None
        if kind == "unknown":
            b = {"type": rng.choice(["frobnicate", "Process", "", "init_ok"])}
            exp = ("error", 10, "unsupported")
        elif kind == "malformed":
            t, fields, need = rng.choice(self.MALFORMED)
            b = dict(fields, type=t)
            exp = ("error", 12, "'%s'" % need)
        else:
            b = dict(self.body(kind), type=kind)
            exp = None
        b["msg_id"] = self.msg_id
        if exp is None:
            exp = self.model.apply(b)
        reply_src = self.model.node_id or dest  # init_ok: from the new id
        if isinstance(exp, dict):
            if b["type"] == "receive":
                self.issued += [m["receipt"] for m in exp["messages"]]
            exp = dict(exp, type=REPLY_TYPE[b["type"]], in_reply_to=self.msg_id)
        else:
            exp = {"type": "error", "in_reply_to": self.msg_id, "code": exp[1],
                   "text": exp[2]}  # text: a fragment the real text contains
        ensure_ascii = rng.random() < 0.5
        text = json.dumps({"src": src, "dest": dest, "body": b},
                          ensure_ascii=ensure_ascii, separators=(",", ":"))
        return text, {"src": reply_src, "dest": src, "body": exp}

    def generate(self):
        kinds = [k for k, _ in self.MIX]
        weights = [w for _, w in self.MIX]
        out = [self.line("process", pre_init=True), self.line("commit", pre_init=True),
               self.line("init")]
        for k in self.rng.choices(kinds, weights, k=self.n - 5):
            out.append(self.line(k))
        # End with the whole state on the wire.
        out.append(self.line_fixed({"type": "checkpoint", "checkpoint_id": "final"}))
        out.append(self.line_fixed({"type": "restore", "checkpoint_id": "final"}))
        return out

    def line_fixed(self, b):
        self.msg_id += 1
        b = dict(b, msg_id=self.msg_id)
        exp = dict(self.model.apply(b), type=REPLY_TYPE[b["type"]], in_reply_to=self.msg_id)
        return (json.dumps({"src": "c1", "dest": "n", "body": b}),
                {"src": self.model.node_id, "dest": "c1", "body": exp})


def compare_session_reply(exp, got, where):
    eb, gb = exp["body"], got.get("body")
    if eb["type"] == "error":
        check(isinstance(gb, dict) and set(gb) == {"type", "in_reply_to", "code", "text"}
              and gb["type"] == "error" and strict_eq(gb["in_reply_to"], eb["in_reply_to"])
              and gb["code"] == eb["code"] and eb["text"] in gb["text"],
              "%s: expected error %d mentioning %r, got %s"
              % (where, eb["code"], eb["text"], json.dumps(got)))
        check(got["src"] == exp["src"] and got["dest"] == exp["dest"],
              "%s: envelope %s" % (where, json.dumps(got)))
        return
    compare_reply(exp, got, where)


def t_session(seed, n):
    def fn():
        rng = random.Random(seed)
        sess = Session(rng, n, max_receives=3, dedup_window=400)
        pairs = sess.generate()
        data = "".join(l + "\n" for l, _ in pairs).encode("utf-8")
        expected = [(i, e) for i, (_, e) in enumerate(pairs) if e is not None]
        rc, out, err = run_node(data, ["-q", "--max-receives", "3", "--dedup-window", "400",
                                       "--visibility-timeout", "3600000"], timeout=120)
        check(rc == 0, "exit status %d: %s" % (rc, err[-500:]))
        got = reply_lines(out)
        for (i, e), g in zip(expected, got):
            compare_session_reply(e, g, "line %d (%s)" % (i + 1, pairs[i][0][:300]))
        check(len(got) == len(expected), "%d replies, expected %d" % (len(got), len(expected)))
        kinds = collections.Counter(json.loads(l)["body"]["type"] for l, e in pairs if e)
        print("     session: %d lines, %d replies, %d dead letters, %d receipts; %s"
              % (len(pairs), len(got), len(sess.model.dead), sess.model.next_receipt,
                 ", ".join("%s %d" % (k or "''", v) for k, v in sorted(kinds.items()))))
    return fn


# ------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int,
                    default=int(os.environ.get("OQ_NODE_SEED", "0")) or None)
    ap.add_argument("--session", type=int,
                    default=int(os.environ.get("OQ_NODE_SESSION", "0"))
                    or (20000 if SANITIZED else 100000))
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2 ** 31)
    print("test_node: binary %s, seed %d (rerun: OQ_NODE_SEED=%d), session %d"
          % (ONCEQ, seed, seed, args.session))
    if not os.access(ONCEQ, os.X_OK):
        print("FAIL: no executable at %s" % ONCEQ)
        print("0 passed, 1 failed")
        return 1

    if os.path.isdir(SHARED_CASES):
        for name in case_names(SHARED_CASES):
            run_test("shared case " + name, case_test(SHARED_CASES, name))
    else:
        print("skip: no shared cases at %s" % SHARED_CASES)
    for name in case_names(OUR_CASES):
        run_test("case " + name, case_test(OUR_CASES, name))

    for name, fn in [("interactive flush", t_interactive_flush),
                     ("empty input", t_empty_input),
                     ("bad lines logged, skipped", t_bad_lines_logged),
                     ("no trailing newline", t_no_trailing_newline),
                     ("invalid utf-8", t_invalid_utf8),
                     ("long strings", t_long_strings),
                     ("receipts are integers", t_receipts_are_integers),
                     ("stdout closed", t_stdout_closed),
                     ("usage", t_usage),
                     ("poll cap", t_poll_cap),
                     ("many checkpoints", t_many_checkpoints),
                     ("invalid utf-8 in values", t_invalid_utf8_values),
                     ("no repeated keys", t_no_repeated_keys),
                     ("huge delays", t_huge_delays),
                     ("init_ok from the new id", t_init_ok_from_new_id),
                     ("exact numbers", t_exact_numbers),
                     ("unparsable json", t_unparsable_json),
                     ("restore keeps commits", t_restore_keeps_commits),
                     ("scanner read-arounds", t_scanner_read_arounds)]:
        run_test(name, fn)
    run_test("session of %d (seed %d)" % (args.session, seed), t_session(seed, args.session))

    print("%d passed, %d failed" % (results["pass"], results["fail"]))
    return 1 if results["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
