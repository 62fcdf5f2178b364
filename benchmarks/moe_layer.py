"""MoE layer speed: moesaic vs a naive masked loop vs a dense FFN of equal active FLOPs.

    python benchmarks/moe_layer.py            # T=8192, D=512, F=2048, E in {8, 32}, k in {1, 2}
    python benchmarks/moe_layer.py --quick    # T=2048, under a minute (also: moesaic bench --quick)

The implementation lives in moesaic/bench/layer.py so that ``moesaic bench`` works from any
install; this file is the repository's entry point. Reports: benchmarks/reports/.
"""

import sys

from moesaic.bench.layer import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
