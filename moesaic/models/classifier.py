"""A sequence classifier on a (pretrained) language model: pooled hidden states -> classes.

Fine-tuning trains everything (``moesaic finetune``); prompt tuning (Lester et al. 2021; CPM-2
§4, Zhang et al. 2021) freezes the language model and trains only ``prompt_tokens`` soft-prompt
vectors put before the text, and the classifier.

Shape legend (docs/shapes.md): B batch, S text positions, P prompt positions, D model width,
C classes.
"""

from __future__ import annotations

import torch
from torch import nn

from moesaic._validate import check_choice, check_positive_int
from moesaic.models.lm import MoELM

__all__ = ["SequenceClassifier"]


class SequenceClassifier(nn.Module):
    """``forward(idx_BS, mask_BS) -> logits_BC``.

    Args:
        lm: the language model whose final hidden states are pooled (its output head is
            unused).
        num_classes: C.
        pool: "mean" over the text's real tokens, or the "last" real token (the causal model's
            summary of the whole text).
        prompt_tokens: P soft-prompt vectors before the text (0: none). They start as the
            embeddings of P token ids drawn from the vocabulary, as Lester et al. (2021, §2.2)
            initialise from the vocabulary.

    ``mask_BS`` is True on real tokens; texts are right-padded, so under causal attention the
    padding never changes a real position's state.
    """

    def __init__(
        self, lm: MoELM, num_classes: int, pool: str = "mean", prompt_tokens: int = 0
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_choice("pool", pool, ("mean", "last"))
        if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int):
            raise TypeError(f"prompt_tokens={prompt_tokens!r} must be an int")
        if prompt_tokens < 0:
            raise ValueError(f"prompt_tokens={prompt_tokens} must be >= 0")
        self.lm, self.pool = lm, pool
        D = lm.cfg.d_model
        self.prompt = None
        if prompt_tokens:
            ids = torch.randint(0, lm.cfg.vocab_size, (prompt_tokens,))
            self.prompt = nn.Parameter(lm.embed.weight.detach()[ids].clone())
        self.classifier = nn.Linear(D, num_classes)
        nn.init.normal_(self.classifier.weight, 0.0, 0.02)
        nn.init.zeros_(self.classifier.bias)

    @property
    def prompt_tokens(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[0]

    def forward(self, idx_BS: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
        if mask_BS.shape != idx_BS.shape:
            raise ValueError(
                f"mask.shape={tuple(mask_BS.shape)} must equal idx.shape={tuple(idx_BS.shape)}"
            )
        B = idx_BS.shape[0]
        prefix = None if self.prompt is None else self.prompt.expand(B, -1, -1)
        h_BSD = self.lm.features(idx_BS, prefix_BPD=prefix)[:, self.prompt_tokens :]
        mask = mask_BS.to(h_BSD.dtype)
        if self.pool == "mean":
            pooled = (h_BSD * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        else:
            last = (mask_BS.long().sum(1) - 1).clamp_min(0)
            pooled = h_BSD[torch.arange(B, device=h_BSD.device), last]
        return self.classifier(pooled)

    def task_parameters(self) -> list[nn.Parameter]:
        """What prompt tuning trains: the soft prompt and the classifier."""
        extra = [] if self.prompt is None else [self.prompt]
        return extra + list(self.classifier.parameters())
