#!/usr/bin/env python3
"""A co-process for `onceq run --handler 'coproc:python3 examples/coproc_echo.py'`.

onceq starts it once per worker and writes one request per line to its
stdin, {"id":ID,"attempt":N,"event":EVENT}; it answers each with one line on
stdout, here {"status":"ok","output":{"id":ID,"event":EVENT}} (the output is
the result record), with the request's "id" echoed so that onceq can tell
a reply from a stray line. {"status":"retry","error":"..."} asks for a
retry with backoff, {"status":"fail","error":"..."} dead-letters the
event. It ends when its stdin closes. Anything on stderr is passed on, line
by line."""
import json
import sys

out = sys.stdout
for line in sys.stdin:
    req = json.loads(line)
    out.write(json.dumps({"id": req["id"], "status": "ok",
                          "output": {"id": req["id"], "event": req["event"]}},
                         separators=(",", ":")) + "\n")
    out.flush()
