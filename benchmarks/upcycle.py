"""Sparse upcycling: upcycled MoE vs MoE from scratch vs dense continued, same data and steps.

    python benchmarks/upcycle.py                                  # lm-dense-tiny, 600 + 300 steps
    python benchmarks/upcycle.py --dense-steps 20 --steps 10      # quick

The implementation lives in moesaic/bench/upcycle.py. Reports: benchmarks/reports/.
"""

import sys

from moesaic.bench.upcycle import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
