"""Every expert backend computes the same function: the plain "torch" loop is the definition,
the per-token reference checks it, and the CPU kernels are optional (deleting them leaves every
router, the layer and ``moesaic train`` working)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import moesaic as ms
from moesaic.experts.reference import reference_moe
from tests.cases import ROUTER_CASES, RouterCase, capture_routing, expert_backend

BACKENDS = {
    "torch": "torch",
    "grouped": "grouped",
    "cpu": expert_backend(),
    "cpu-loop-onednn": expert_backend("loop", "onednn"),
    "cpu-threads": expert_backend("threads", "torch"),
}


def _run(layer: ms.MoE, case: RouterCase, x: torch.Tensor):
    layer.eval()  # no router noise or jitter: the same routing for every backend
    torch.manual_seed(1)
    with case.context(x.shape[0]):
        y = layer(x)
    g = torch.randn_like(y)
    params = [x, *layer.parameters()]
    return y.detach(), torch.autograd.grad((y * g).sum(), params, allow_unused=True)


@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_every_backend_equals_the_torch_loop_forward_and_backward(case, capacity_factor):
    torch.manual_seed(0)
    x = torch.randn(6, 5, 16, requires_grad=True)
    results = {}
    for name, backend in BACKENDS.items():
        torch.manual_seed(0)
        layer = case.layer(16, 24, 4, capacity_factor=capacity_factor, expert_backend=backend)
        results[name] = _run(layer, case, x)
    y_ref, grads_ref = results.pop("torch")
    for name, (y, grads) in results.items():
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=name)
        for a, b in zip(grads, grads_ref):
            if a is None or b is None:
                assert a is None and b is None, name
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_the_torch_loop_equals_the_per_token_reference(activation):
    torch.manual_seed(0)
    layer = ms.MoE(16, 24, 4, router="topk", top_k=2, activation=activation)
    layer.experts.backend = "torch"
    x = torch.randn(30, 16)
    seen = capture_routing(layer)
    with torch.no_grad():
        y = layer(x)
        ref = reference_moe(x, seen[-1], layer.experts)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_an_unknown_backend_is_named_with_the_choices():
    with pytest.raises(ValueError, match=r"backend='cuda' is not one of \('auto'"):
        ms.Experts(2, 4, 8, backend="cuda")


_WITHOUT_KERNELS = """
import sys

class _NoKernels:
    def find_spec(self, name, path=None, target=None):
        if name == "moesaic.kernels" or name.startswith("moesaic.kernels."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, _NoKernels())
"""


def test_without_the_kernel_package_every_router_and_moesaic_train_still_work(tmp_path):
    script = _WITHOUT_KERNELS + textwrap.dedent(
        f"""
        import torch
        import moesaic as ms
        from moesaic.experts.reference import reference_moe
        from tests.cases import ROUTER_CASES, capture_routing

        assert "cpu" not in ms.backend_names(), ms.backend_names()
        for case in ROUTER_CASES:
            torch.manual_seed(0)
            layer = case.layer(16, 24, 4, capacity_factor=1.0).eval()
            x = torch.randn(20, 16, requires_grad=True)
            seen = capture_routing(layer)
            with case.context(20):
                y = layer(x)
            y.sum().backward()
            with torch.no_grad():
                ref = reference_moe(x, seen[-1], layer.experts, layer.capacity(20))
            torch.testing.assert_close(y.detach(), ref, rtol=1e-5, atol=1e-5)
            assert layer.experts.backend_for(x).name == "torch"
        from moesaic.cli.main import main
        code = main(["train", "--recipe", "lm-moe-test", "--run-dir", r"{tmp_path / "run"}",
                     "--set", "train.steps=3", "--set", "train.eval_every=3", "--no-progress"])
        assert code in (0, None), code
        assert not [m for m in sys.modules if m.startswith("moesaic.kernels")]
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
