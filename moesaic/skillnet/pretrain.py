"""Sparse self-supervised pretraining of SkillNet (Dai et al. 2022): every objective runs
with only its modality's skills active, exactly as the downstream tasks will.

Objectives, one batch each per step (their sum is minimised):

- ``mlm/text``, ``mlm/code``: masked byte prediction; 15% of a row's bytes are hidden (their
  token keeps only its position embedding) and predicted by cross-entropy over the 256 bytes;
- ``mim/image``, ``mim/video``: masked patch (tubelet) prediction; half of the patches are
  hidden and their pixels regressed (mean squared error of each patch's standardised pixels,
  MAE's normalised-pixel target);
- ``mfm/sound``: masked frame prediction; 30% of the stacked log-mel frames are hidden and
  their standardised values regressed;
- ``view/<modality>``: two views of each input, each with a different random share of its
  tokens hidden (the rates above), pulled together by a contrastive loss on the pooled
  embeddings (SimCSE-style); this trains the pooled embedding that classification and retrieval
  read, where masked prediction trains token states (measured: without it pretraining lowered
  the retrieval tasks' R@1, with it every task gained, docs/skillnet.md);
- ``itc/en``, ``itc/zh``: image-text contrastive (symmetric InfoNCE) on captioned images, the
  caption through the text skill, the image through the image skill.

The prediction heads (``PretrainHeads``) live outside the model and are dropped after
pretraining: the pretrained ``SkillNet`` has exactly the parameters of a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from moesaic.skillnet.model import PairHead, SkillNet
from moesaic.skillnet.pretrain_data import PretrainData
from moesaic.skillnet.tasks import distinct_label_batch
from moesaic.skillnet.train import SkillNetRecipe, contrastive_loss, optimize

__all__ = [
    "MASK_RATES", "PretrainHeads", "hide_tokens", "masked_loss", "view_loss", "pretrain_skillnet",
]  # fmt: skip

MASK_RATES = {"text": 0.15, "code": 0.15, "image": 0.5, "video": 0.5, "sound": 0.3}
_OBJECTIVE = {"text": "mlm", "code": "mlm", "image": "mim", "video": "mim", "sound": "mfm"}


class PretrainHeads(nn.Module):
    """Per-modality token prediction heads (LayerNorm + linear), per-modality view projections
    and one image-text pair head."""

    def __init__(self, model: SkillNet) -> None:
        super().__init__()
        cfg, D = model.cfg, model.cfg.d_model
        widths = {
            "text": 256,
            "code": 256,
            "image": cfg.image_patch**2,
            "video": cfg.video_tubelet * cfg.video_patch**2,
            "sound": cfg.sound_stack * cfg.n_mels,
        }
        self.predict = nn.ModuleDict(
            {m: nn.Sequential(nn.LayerNorm(D), nn.Linear(D, w)) for m, w in widths.items()}
        )
        self.pairs = PairHead(D, cfg.proj_dim)
        self.views = nn.ModuleDict({m: PairHead(D, cfg.proj_dim) for m in widths})


def hide_tokens(valid_BS: torch.Tensor, rate: float) -> torch.Tensor:
    """Bool (B, S): ``round(rate * n)`` (at least one) of each row's n valid tokens, at random."""
    n_B = valid_BS.sum(1)
    k_B = (n_B.float() * rate).round().long().clamp(min=1).minimum(n_B)
    scores = torch.rand(valid_BS.shape, device=valid_BS.device).masked_fill(~valid_BS, 2.0)
    rank = scores.argsort(1).argsort(1)
    return rank < k_B[:, None]


def _targets(model: SkillNet, modality: str, x: torch.Tensor):
    """(the front-end's per-token targets, bool (B, S) of the tokens that are not padding)."""
    target = model.frontends[modality].token_targets(x)
    if target.dtype == torch.long:  # byte ids, 0 = padding
        return target, target != 0
    return target, torch.ones(target.shape[:2], dtype=torch.bool, device=target.device)


def masked_loss(model: SkillNet, heads: PretrainHeads, modality: str, x: torch.Tensor):
    """The masked-prediction loss of one batch of ``modality`` inputs (see the module docstring)."""
    target, valid = _targets(model, modality, x)
    is_bytes = target.dtype == torch.long
    hide = hide_tokens(valid, MASK_RATES[modality])
    h_BSD, _ = model.encode_tokens(modality, x, hide)
    pred, target = heads.predict[modality](h_BSD[hide]), target[hide]
    if is_bytes:
        return F.cross_entropy(pred, target)
    if modality in ("image", "video"):  # MAE's normalised pixels: each patch standardised
        target = (target - target.mean(1, keepdim=True)) / (target.std(1, keepdim=True) + 1e-2)
    return F.mse_loss(pred, target)


def view_loss(model: SkillNet, heads: PretrainHeads, modality: str, x: torch.Tensor):
    """Contrastive loss between two views of each input, each with a different random share
    of its tokens hidden (SimCSE-style): teaches the pooled embedding to tell inputs apart."""
    _, valid = _targets(model, modality, x)
    head = heads.views[modality]
    a = head.query(model.encode(modality, x, hide_tokens(valid, MASK_RATES[modality])))
    b = head.query(model.encode(modality, x, hide_tokens(valid, MASK_RATES[modality])))
    return contrastive_loss(a, b, head.scale())


def pretrain_skillnet(
    model: SkillNet,
    data: PretrainData,
    recipe: SkillNetRecipe,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Pretrain ``model`` in place on ``data``; returns one record per step (``loss/mlm/text``,
    ..., ``loss/itc/zh``). Only the objectives whose data is present run."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng([recipe.seed, 1])
    heads = PretrainHeads(model)
    B = recipe.batch_size

    def losses() -> dict[str, torch.Tensor]:
        out = {}
        for m, x in data.inputs.items():
            idx = torch.from_numpy(rng.integers(0, x.shape[0], size=B))
            out[f"{_OBJECTIVE[m]}/{m}"] = masked_loss(model, heads, m, x[idx])
            out[f"view/{m}"] = view_loss(model, heads, m, x[idx])
        for lang, pairs in data.pairs.items():
            idx = torch.from_numpy(distinct_label_batch(pairs["labels"], B, rng))
            q = heads.pairs.query(model.encode("text", pairs["query"][idx]))
            k = heads.pairs.item(model.encode("image", pairs["item"][idx]))
            out[f"itc/{lang}"] = contrastive_loss(q, k, heads.pairs.scale())
        return out

    params = list(model.parameters()) + list(heads.parameters())
    return optimize(model, params, losses, recipe, log)
