"""The runnable examples stay runnable (short versions)."""

import math
import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_moefy_gpt2_example_converts_exactly_and_trains():
    main = runpy.run_path(str(EXAMPLES / "moefy_gpt2.py"))["main"]
    change, losses = main(steps=3)
    assert change < 1e-5  # upcycled with a renormalised router: the dense model's logits
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
