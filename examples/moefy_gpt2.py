"""moefy a Hugging Face GPT-2 (built from a small config, nothing downloaded) and fine-tune it.

    pip install "moesaic[hf]"
    python examples/moefy_gpt2.py

Every second GPT-2 MLP becomes an 8-expert MoE whose experts start as copies of that MLP
(sparse upcycling); with the renormalised top-2 router the converted model computes exactly what
the dense one did, which the script checks before training. The training loss adds
``ms.aux_loss(model)``, the routers' load-balancing loss, so it reaches the optimizer.
"""

from __future__ import annotations

import inspect
import json

import torch
import transformers

import moesaic as ms


def batches(seq_len: int = 64, batch_size: int = 8, seed: int = 0):
    """Random windows of bytes of Python's json package source (ids < 256)."""
    text = inspect.getsource(json.decoder).encode()
    data = torch.tensor(list(text), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=g)
        yield torch.stack([data[s : s + seq_len] for s in starts.tolist()])


def main(steps: int = 20) -> tuple[float, list[float]]:
    """Returns max |logits change| from the conversion and the LM loss of each step."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=256,
        n_positions=64,
        n_embd=64,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    dense = transformers.GPT2LMHeadModel(config).eval()
    ids = next(batches())
    with torch.no_grad():
        before = dense(ids).logits

    model = ms.moefy(dense, num_experts=8, router="topk", top_k=2, every=2)  # in place
    with torch.no_grad():
        change = (model(ids).logits - before).abs().max().item()
    layers = sum(isinstance(m, ms.MoE) for m in model.modules())
    print(f"converted: {layers} MoE layers; max |logits after - before| = {change:.2e}")

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step, ids in zip(range(1, steps + 1), batches()):
        lm = model(ids, labels=ids).loss
        aux = ms.aux_loss(model)  # sum over the MoE layers of this forward, already weighted
        (lm + aux).backward()
        opt.step()
        opt.zero_grad()
        losses.append(lm.item())
        if step % 5 == 0 or step == 1:
            print(f"step {step:3d}  lm loss {lm.item():.3f}  aux loss {aux.item():.4f}")
    return change, losses


if __name__ == "__main__":
    main()
