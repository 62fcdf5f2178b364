"""The MoE layer on another device (a GPU) against experts/reference.py on CPU.

    python benchmarks/device_check.py --device cuda

The implementation lives in moesaic/bench/device_check.py.
"""

import sys

from moesaic.bench.device_check import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
