"""moesaic's MoE layer against transformers (Mixtral, Qwen2-MoE, SwitchTransformers) and
DeepSpeed, FLOP-matched per FFN family, interleaved in one process.

    pip install -e ".[bench]"
    python benchmarks/peers.py            # T in {2048, 8192}, E in {8, 32}, k in {1, 2}
    python benchmarks/peers.py --quick

The implementation lives in moesaic/bench/peers.py. Reports: benchmarks/reports/.
"""

import sys

from moesaic.bench.peers import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
