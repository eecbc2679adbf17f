#!/usr/bin/env python3
"""Description: placeholder, filled in by the coproc work (issue 17)."""
print("0 passed, 0 failed")
