"""Expert parallelism: bytes per MoE layer against the 2*k*T*D floor, all-to-all and step time.

    python benchmarks/expert_parallel.py                 # W in {1, 2, 4}, gloo on CPU
    python benchmarks/expert_parallel.py --tokens 512    # quick

The implementation lives in moesaic/bench/expert_parallel.py. Reports: benchmarks/reports/.
"""

import sys

from moesaic.bench.expert_parallel import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
