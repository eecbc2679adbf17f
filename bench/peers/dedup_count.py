#!/usr/bin/env python3
"""The straightforward script: dedup + word count with threads.

What people write by hand for "count the words of these events, each event
once": a reader thread puts lines on a queue.Queue, N worker threads take
them, parse the JSON, check-and-add the id to a set under a lock, and count
the word in a dict under a lock. Prints the counts as onceq's wordcount
does ({"word":"w1","count":N} per word, sorted by word), and a summary on
stderr.

usage: dedup_count.py [-w N] FILE
"""
import argparse
import json
import queue
import sys
import threading

STOP = None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-w", "--workers", type=int, default=2)
    ap.add_argument("file")
    args = ap.parse_args()

    q = queue.Queue(maxsize=10000)
    seen = set()
    seen_lock = threading.Lock()
    counts = {}
    counts_lock = threading.Lock()
    dups = [0]

    def reader():
        with open(args.file, "rb") as f:
            for line in f:
                q.put(line)
        for _ in range(args.workers):
            q.put(STOP)

    def worker():
        while True:
            line = q.get()
            if line is STOP:
                return
            ev = json.loads(line)
            eid = ev["id"]
            with seen_lock:
                if eid in seen:
                    dups[0] += 1
                    continue
                seen.add(eid)
            words = ev["word"].split() if "word" in ev else ev["text"].split()
            with counts_lock:
                for w in words:
                    counts[w] = counts.get(w, 0) + 1

    threads = [threading.Thread(target=reader)]
    threads += [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    out = sys.stdout
    for w in sorted(counts):
        out.write(json.dumps({"word": w, "count": counts[w]},
                             separators=(",", ":")) + "\n")
    print("processed %d duplicates %d" % (len(seen), dups[0]), file=sys.stderr)


if __name__ == "__main__":
    main()
