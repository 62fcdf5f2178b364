"""Fault drills: SIGKILL mid-train and mid-save, SIGINT / SIGTERM at random moments, damaged
checkpoints, a NaN loss, a non-finite update, two runs on one directory, a full disk, step
numbers past a million, a torchrun rank killed; prints survived / total and the work lost as a
Markdown table.

    python benchmarks/faults.py                  # 5 drills per scenario
    python benchmarks/faults.py --repeats 1 --scenarios sigkill-train nan-loss   # quick

The implementation lives in moesaic/bench/faults.py. Reports: benchmarks/reports/.
"""

import sys

from moesaic.bench.faults import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
