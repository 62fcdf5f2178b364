"""Where the experts' CPU time goes: torch.mm vs oneDNN, workers vs the loop, weight traffic.

    python benchmarks/gemm.py               # every part (a few minutes on 2 threads)
    python benchmarks/gemm.py products      # one product, M rows x 512 x 2048
    python benchmarks/gemm.py workers       # the layer on the T/E/k grid
    python benchmarks/gemm.py sizes         # training steps by expert size, oneDNN vs torch.mm
    python benchmarks/gemm.py packed        # forward-only with packed expert weights
    python benchmarks/gemm.py weights       # experts with distinct vs shared (cached) weights

The implementation lives in moesaic/bench/gemm.py. Reports: benchmarks/reports/.
"""

import sys

from moesaic.bench.gemm import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
