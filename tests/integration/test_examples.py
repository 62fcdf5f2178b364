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


def test_vmoe_example_trains_and_drops_patches_at_low_capacity():
    main = runpy.run_path(str(EXAMPLES / "vmoe_digits.py"))["main"]
    curve = main(steps=20)
    assert [ratio for ratio, _, _ in curve] == [1.0, 0.5, 0.25]
    processed = [p for _, p, _ in curve]
    assert processed[0] > processed[1] > processed[2] and 0.2 < processed[2] <= 0.26
    assert all(0 <= accuracy <= 1 for _, _, accuracy in curve)
