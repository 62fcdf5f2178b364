"""V-MoE in a few lines of plain PyTorch: train ``vmoe-tiny`` on sklearn's digits, then trade
accuracy for compute at inference with Batch Prioritized Routing.

    pip install 'moesaic[vision]'
    python examples/vmoe_digits.py          # about 20 s on 2 CPU cores

``moesaic train --recipe vmoe-digits`` trains the same kind of model with checkpoints, resume and
reports; this file shows the library calls underneath.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import moesaic as ms
from moesaic.data.images import image_splits
from moesaic.inference.capacity import capacity_override, processed_fraction
from moesaic.models.vit import VisionTransformer


def main(steps: int = 600, seed: int = 0) -> list[tuple[float, float, float]]:
    """Train, then return (capacity ratio, processed share, test accuracy) per ratio."""
    torch.manual_seed(seed)
    data = image_splits("digits", val_fraction=0.1, seed=seed)
    x, y = (torch.from_numpy(a) for a in data.splits["train"])
    x_test, y_test = (torch.from_numpy(a) for a in data.splits["test"])
    cfg = ms.models.model_config("vmoe-tiny")  # 8 experts, top-2, vmoe router, capacity 1.05
    cfg = dataclasses.replace(cfg, image_size=8, patch_size=2, n_layers=2, d_model=32, d_ff=64)
    model = VisionTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx]) + ms.aux_loss(model)  # + the router losses
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    curve = []
    with torch.no_grad():
        for ratio in (1.0, 0.5, 0.25):
            with capacity_override(model, ratio, "priority") as layers:
                accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
                curve.append((ratio, processed_fraction(layers), accuracy))
    return curve


if __name__ == "__main__":
    for ratio, processed, accuracy in main():
        print(
            f"capacity ratio {ratio:<5} patches processed {processed:.2f}  accuracy {accuracy:.3f}"
        )
