"""MoE layer speed: moesaic vs a naive masked loop vs a dense FFN of equal active FLOPs.

    python benchmarks/moe_layer.py            # T=8192, D=512, F=2048, E in {8, 32}, k in {1, 2}
    python benchmarks/moe_layer.py --quick    # T=2048, under a minute (also: moesaic bench --quick)

The implementation is ``moesaic bench`` (moesaic/cli/bench.py), shipped with the package so that
it works from any install; this file is the repository's entry point. Reports: benchmarks/reports/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

from moesaic.cli.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
