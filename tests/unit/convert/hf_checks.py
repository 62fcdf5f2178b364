"""Checks the Hugging Face converter tests share (Mixtral, Qwen2-MoE)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moesaic.layer import MoE, aux_loss
from moesaic.models.lm import MoELM


def check_aux_coefficient(
    model: MoELM,
    export: Callable[[MoELM, Path], Path],
    import_: Callable[[Path], MoELM],
    hf_class: type,
    load_balancing_loss_func: Callable,
    directory: Path,
) -> float:
    """At uniform router probabilities (zero gate weights) transformers' load-balancing loss
    times the exported coefficient equals ours (``aux_loss_weight * L / k`` for L MoE layers),
    and import gives ``aux_loss_weight`` back; returns the exported coefficient."""
    layers = [block.ffn for block in model.blocks if isinstance(block.ffn, MoE)]
    with torch.no_grad():
        for layer in layers:
            layer.router.gate.weight.zero_()
    export(model, directory)
    hf = hf_class.from_pretrained(directory)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    model.train()
    model(ids)
    ours = aux_loss(model)
    out = hf(ids, output_router_logits=True)
    assert len(out.router_logits) == len(layers)
    moe = model.cfg.moe
    k = moe.experts_per_token
    theirs = load_balancing_loss_func(out.router_logits, moe.num_experts, k)
    assert hf.config.router_aux_loss_coef == pytest.approx(moe.aux_loss_weight * len(layers) / k)
    torch.testing.assert_close(hf.config.router_aux_loss_coef * theirs, ours.detach())
    assert import_(directory).cfg.moe.aux_loss_weight == pytest.approx(moe.aux_loss_weight)
    return hf.config.router_aux_loss_coef
