"""Per-block activation checkpointing of the MoE LM: activation memory kept for backward and
the training step's time, with and without, side by side in one process.

Memory is the bytes of the storages autograd saves for backward during the forward (what
checkpointing removes; parameters excluded; ``harness.saved_for_backward_bytes``); time is
forward + backward, interleaved rounds, median. The model is a registry LM (default
``lm-moe-tiny``) in training mode.

    python benchmarks/activation_checkpointing.py                       # lm-moe-tiny, 32 x 256
    python benchmarks/activation_checkpointing.py --model lm-moe-4l --batch 16
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python benchmarks/<name>.py

import torch

import moesaic as ms
from benchmarks.harness import environment, saved_for_backward_bytes, time_interleaved


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lm-moe-tiny", help="a registry language model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ms.models.create(args.model).train()
    ids = torch.randint(0, model.cfg.vocab_size, (args.batch, args.seq_len + 1))

    def step(on: bool) -> None:
        model.checkpoint_activations = on
        (model.loss(ids[:, :-1], ids[:, 1:]) + ms.aux_loss(model)).backward()
        model.zero_grad(set_to_none=True)

    memory = {}
    for on in (False, True):
        model.checkpoint_activations = on
        memory[on] = saved_for_backward_bytes(
            lambda: model.loss(ids[:, :-1], ids[:, 1:]), list(model.parameters())
        )
    seconds = time_interleaved({"stored": lambda: step(False), "recomputed": lambda: step(True)},
                               args.rounds)  # fmt: skip
    print(f"# Activation checkpointing: {args.model}, batch {args.batch} x {args.seq_len}")
    print(environment())
    print("| activations | saved for backward | fwd+bwd s |")
    print("|---|---:|---:|")
    for on, name in ((False, "stored"), (True, "recomputed")):
        print(f"| {name} | {memory[on] / 2**20:.1f} MiB | {seconds[name]:.3f} |")
    slower = seconds["recomputed"] / seconds["stored"]
    print(f"recomputed / stored: memory {memory[True] / memory[False]:.2f}x, time {slower:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
