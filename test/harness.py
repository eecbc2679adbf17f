"""The runner every end-to-end test script of onceq shares: a registry of
test functions and one loop that runs them, prints a line per test and the
closing "N passed, N failed" line (test/run.sh reads it), and keeps the
scratch directory of a failed run for a look."""
import os
import shutil
import sys
import time
import traceback


class Suite:
    def __init__(self):
        self.tests = []

    def test(self, fn):
        """Decorator: registers fn as a test."""
        self.tests.append(fn)
        return fn

    def run(self, tmp=None, seed=None, only_env="OQ_TESTS"):
        """Runs the tests (those whose name contains one of the
        comma-separated words in $only_env or in argv, when given).
        Returns the exit status."""
        only = sys.argv[1:] + [x for x in os.environ.get(only_env, "")
                               .split(",") if x]
        passed = failed = 0
        for t in self.tests:
            if only and not any(o in t.__name__ for o in only):
                continue
            t0 = time.time()
            try:
                t()
                passed += 1
                print(f"[ OK ] {t.__name__} ({time.time() - t0:.2f}s)")
            except Exception:
                failed += 1
                print(f"[FAIL] {t.__name__}"
                      + (f" (seed {seed})" if seed is not None else ""))
                traceback.print_exc()
            sys.stdout.flush()
        if tmp:
            if failed:
                print(f"scratch files kept in {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        print(f"{passed} passed, {failed} failed")
        return 1 if failed else 0


def parse_metrics(text):
    """{(name, labels as a sorted tuple): value} of a Prometheus text
    exposition; the parser (python3-prometheus-client) raises on anything
    that is not valid exposition format."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:  # Debian's package, for a python3 that is not Debian's
        sys.path.append("/usr/lib/python3/dist-packages")
        from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
