"""Does the MoE layer compute the same thing on another device? Routers dropless and with
capacity, GELU and SwiGLU experts, fp32 and bf16, every expert path the device takes: the layer's
output (forward-only and training calls) and expert-weight gradients on the device against
experts/reference.py run on CPU in fp32 on the same weights (bf16-rounded in bf16) and the same
routing.

    python benchmarks/device_check.py --device cuda     # a table; exit status 1 on a mismatch

A case that raises is reported as ERROR (and fails the check) and the others still run.

Errors are relative to the largest reference entry: fp32 within 1e-4, bf16 within 3e-2 (the
layer's bf16 tolerance in docs/performance.md is 2e-2 elementwise; this check takes the max over
a whole tensor). Runs in seconds; the reference loops over assignments on CPU.

Shape legend (docs/shapes.md): T tokens, D model dim, F expert hidden, E experts.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

from benchmarks.harness import DTYPES, device_arg, environment
from moesaic.experts.reference import reference_moe
from moesaic.layer import MoE
from moesaic.routing.base import Routing

__all__ = ["CASES", "check_case", "main"]

# (router, top_k, capacity_factor); routers that need a task context are left out
CASES = (
    ("topk", 1, None),
    ("topk", 2, None),
    ("topk", 2, 1.0),
    ("switch", 1, 1.25),
    ("gshard", 2, 1.0),
    ("noisy_topk", 2, None),
    ("prototype", 2, None),
    ("expert_choice", 2, None),
    ("hash", 2, None),
    ("cluster", 1, None),
)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
T, D, FF, E = 48, 32, 64, 4


@dataclasses.dataclass(frozen=True)
class Result:
    case: str
    out_err: float
    grad_err: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.out_err <= self.tolerance and self.grad_err <= self.tolerance


def _cpu(routing: Routing) -> Routing:
    def move(v):
        if not isinstance(v, torch.Tensor):
            return v
        v = v.detach().cpu()
        return v.float() if v.is_floating_point() else v

    return dataclasses.replace(
        routing, **{f.name: move(getattr(routing, f.name)) for f in dataclasses.fields(routing)}
    )


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float().cpu(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


def check_case(
    router: str,
    top_k: int,
    capacity_factor: float | None,
    activation: str,
    impl: str,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Result:
    """One layer on ``device`` in ``dtype`` against the CPU fp32 reference."""
    torch.manual_seed(0)
    layer = MoE(
        D, FF, E, router=router, top_k=top_k, capacity_factor=capacity_factor,
        activation=activation, expert_backend=impl,
    ).eval()  # fmt: skip
    layer.to(device=device, dtype=dtype)
    seen: list[Routing] = []
    layer.router.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(T, D).to(device=device, dtype=dtype)
    g = torch.randn(T, D)
    with torch.inference_mode():  # the forward-only path (fused combine, packed weights)
        y_fwd = layer(x)
    y = layer(x)
    (y.float() * g.to(device)).sum().backward()
    experts = copy.deepcopy(layer.experts).to(device="cpu", dtype=torch.float32)
    experts.zero_grad(set_to_none=True)
    ref = reference_moe(
        x.detach().cpu().float(), _cpu(seen[-1]), experts, layer.capacity(T),
        layer.drop_policy.name,
    )  # fmt: skip
    (ref * g).sum().backward()
    names = ["w1", "w2"] + (["w3"] if layer.experts.w3 is not None else [])
    grad_err = max(_rel(getattr(layer.experts, n).grad, getattr(experts, n).grad) for n in names)
    name = f"{router} k={top_k} cf={capacity_factor} {activation} {impl} {str(dtype)[6:]}"
    out_err = max(_rel(y, ref), _rel(y_fwd, ref))
    return Result(name, out_err, grad_err, TOLERANCE[dtype])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/device_check.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES))
    args = parser.parse_args(argv)
    print(f"MoE layer on {args.device} against experts/reference.py on CPU")
    print(environment(args.device) + "\n")
    print("| case | output error | expert gradient error | tolerance | |")
    print("|---|---|---|---|---|")
    failed = 0
    for dtype in (getattr(torch, d) for d in args.dtype):
        # "auto" is what users get (grouped_mm for bf16 on CUDA); "torch" the plain per-expert loop
        for impl in ("auto", "torch"):
            for router, k, cf in CASES:
                for activation in ("gelu", "swiglu"):
                    try:
                        r = check_case(router, k, cf, activation, impl, args.device, dtype)
                    except Exception as err:  # one broken path must not hide the others
                        failed += 1
                        case = f"{router} k={k} cf={cf} {activation} {impl} {str(dtype)[6:]}"
                        print(f"| {case} | ERROR {type(err).__name__}: {err} | | | ERROR |")
                        continue
                    failed += not r.ok
                    print(
                        f"| {r.case} | {r.out_err:.1e} | {r.grad_err:.1e} | {r.tolerance:.0e} | "
                        f"{'ok' if r.ok else 'MISMATCH'} |",
                        flush=True,
                    )
    print(f"\n{failed} failed cases" if failed else "\nall cases match the reference")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
