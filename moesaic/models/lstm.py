"""The LSTM-MoE language model of Shazeer et al. 2017 ("Outrageously Large Neural Networks").

Shazeer et al. 2017, §2-3: a sparsely-gated MoE layer with noisy top-k gating (§2.1) applied
*convolutionally* between stacked LSTM layers: the same ``ms.MoE`` runs on the state of every
timestep, so one forward routes all B*S positions of a batch together. Appendix C.1 gives the
language model: embedding -> LSTM -> MoE -> LSTM -> softmax, every layer's output (softmax
aside) dropped out and added to its input (a residual), the MoE's output passed through a
sigmoid before its dropout, ReLU experts, k=4 and w_importance = w_load = 0.1. With n_layers
LSTM layers there is an MoE between each adjacent pair (n_layers - 1 of them).

With ``moe=None`` the same class is the dense baseline: a ReLU FFN at each MoE site, like the
paper's "MoE-1-Wide" baseline (one expert as wide as the k experts together).
``LSTMConfig.dense_equivalent()`` gives it the MoE model's activated FLOPs per token.

Shape legend (docs/shapes.md): B batch, S sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from moesaic._validate import check_choice, check_dropout, check_positive_int, prefixed_errors
from moesaic.config import MoEConfig, check_model_moe
from moesaic.context import routing_context
from moesaic.experts import ACTIVATIONS
from moesaic.layer import MoE
from moesaic.models.lm import DenseFFN

__all__ = ["LSTMConfig", "LSTMMoE"]


def _paper_moe() -> MoEConfig:
    # Shazeer et al. 2017, §2.1 and Appendix C.1: noisy top-k gating with importance and load
    # losses of weight 0.1 each (the router weighs both 1.0; the layer scales the sum by 0.1).
    # The paper uses k=4; at CPU scale 16 experts with k=2.
    return MoEConfig(num_experts=16, top_k=2, router="noisy_topk", aux_loss_weight=0.1)


@dataclasses.dataclass(kw_only=True)
class LSTMConfig:
    """Architecture of ``LSTMMoE``; every field is checked in ``__post_init__``.

    Args:
        vocab_size: V (a training run sets it from the tokenizer).
        d_model: D, the width of the embedding, of every LSTM layer and of the MoE's input and
            output.
        n_layers: stacked LSTM layers (>= 2); an MoE sits between each adjacent pair.
        d_ff: hidden width of each expert (of the dense FFN, for a dense model without
            ``matched_d_ff``).
        activation: of the experts' hidden layer; ReLU as in the paper.
        dropout: applied to every layer's output before the residual sum (not to the logits).
        tie_embeddings: the output projection shares the embedding's weight.
        moe: the MoE layers' options (``ms.MoEConfig``; None: the dense model). Its ``d_model``,
            ``d_ff`` and ``activation`` are this config's: leave them None there.
        matched_d_ff: dense models only: the FFN width at the MoE sites
            (``dense_equivalent()`` sets it to ``top_k * d_ff + moe.shared_d_ff``).
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    d_ff: int = 384
    activation: str = "relu"
    dropout: float = 0.0
    tie_embeddings: bool = True
    moe: MoEConfig | None = dataclasses.field(default_factory=_paper_moe)
    matched_d_ff: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_ff"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("n_layers", self.n_layers)
        if self.n_layers < 2:
            raise ValueError(
                f"n_layers={self.n_layers} must be >= 2 (the MoE sits between stacked LSTM layers)"
            )
        check_choice("activation", self.activation, ACTIVATIONS)
        check_dropout("dropout", self.dropout)
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"tie_embeddings={self.tie_embeddings!r} must be a bool")
        if self.matched_d_ff is not None:
            check_positive_int("matched_d_ff", self.matched_d_ff)
            if self.moe is not None:
                raise ValueError(f"matched_d_ff={self.matched_d_ff} is for dense models (moe=None)")
        if self.moe is not None:
            check_model_moe("moe", self.moe)
            self.moe_config()  # d_model, d_ff and activation agree

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def ffn_width(self) -> int:
        """Hidden width of the dense FFN at each MoE site (``matched_d_ff`` or ``d_ff``)."""
        return self.d_ff if self.matched_d_ff is None else self.matched_d_ff

    def moe_config(self) -> MoEConfig:
        """``moe`` with ``d_model``, ``d_ff`` and ``activation`` filled in from this config."""
        if self.moe is None:
            raise ValueError("moe is None: a dense LSTM has no MoE layers")
        with prefixed_errors("moe", MoEConfig):
            return self.moe.inherit(
                "", d_model=self.d_model, d_ff=self.d_ff, activation=self.activation
            )

    def dense_equivalent(self) -> LSTMConfig:
        """The dense model with this model's activated FLOPs per token: where this model has an
        MoE of k experts of width F (and a shared expert of width S), an FFN of width k*F + S.
        The MoE model additionally pays its router's gate products."""
        if self.moe is None:
            return self
        width = self.moe.experts_per_token * self.d_ff + self.moe.shared_d_ff
        return dataclasses.replace(self, moe=None, matched_d_ff=width)


class LSTMMoE(nn.Module):
    """Stacked LSTM language model with an ``ms.MoE`` between each pair of LSTM layers
    (Shazeer et al. 2017, §2-3; Appendix C.1 for the language model).

    Per layer, ``x = x + dropout(layer(x))``; at an MoE site ``layer(x)`` is
    ``sigmoid(MoE(x))``, the MoE applied to every timestep's state independently (with the
    default dropless capacity, its output at position t depends only on ``x[:, t]``). A dense
    model (``moe=None``) has a ``DenseFFN`` there instead.

    Example::

        >>> model = LSTMMoE(LSTMConfig())                 # 16 experts, noisy top-2
        >>> logits = model(torch.randint(0, 256, (2, 64)))
        >>> loss = model.loss(idx, targets) + ms.aux_loss(model)

    Shape:
        idx (B, S) token ids -> logits (B, S, V).
    """

    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, D)
        self.lstms = nn.ModuleList(nn.LSTM(D, D, batch_first=True) for _ in range(cfg.n_layers))
        self.ffns = nn.ModuleList(self._site(cfg) for _ in range(cfg.n_layers - 1))
        self.head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # Hash routing (Roller et al. 2021) hashes the current token's id; the model knows them.
        self._token_ids = any(m.router.reads_token_ids for m in self.moe_layers())

    @staticmethod
    def _site(cfg: LSTMConfig) -> nn.Module:
        if cfg.is_moe:
            return MoE(cfg.moe_config())
        return DenseFFN(cfg.d_model, cfg.ffn_width, cfg.activation)

    def reset_parameters(self) -> None:
        # N(0, 0.02) for the embedding and the FFN / expert weights, so MoE and dense start
        # alike; the LSTMs keep torch's uniform(+-1/sqrt(D)) and routers their paper's zeros.
        for name, p in self.named_parameters():
            if name.startswith("lstms.") or "router" in name or p.dim() < 2:
                continue
            nn.init.normal_(p, 0.0, 0.02)

    def moe_layers(self) -> list[MoE]:
        """The model's MoE layers, the lowest first (empty for a dense model)."""
        return [m for m in self.ffns if isinstance(m, MoE)]

    def forward(self, idx_BS: torch.Tensor) -> torch.Tensor:
        """Logits (B, S, V)."""
        self._check(idx_BS)
        if self._token_ids:
            with routing_context(token_ids=idx_BS):
                return self.head(self.features(idx_BS))
        return self.head(self.features(idx_BS))

    def features(self, idx_BS: torch.Tensor) -> torch.Tensor:
        """The hidden states (B, S, D) the output projection reads."""
        x_BSD = self.drop(self.embed(idx_BS))
        for i, lstm in enumerate(self.lstms):
            x_BSD = x_BSD + self.drop(lstm(x_BSD)[0])
            if i < len(self.ffns):
                # the same MoE on every timestep's state: all B*S positions routed at once
                x_BSD = x_BSD + self.drop(torch.sigmoid(self.ffns[i](x_BSD)))
        return x_BSD

    def loss(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (the aux losses are read with ``ms.aux_loss(model)``)."""
        if not isinstance(targets_BS, torch.Tensor) or targets_BS.shape != idx_BS.shape:
            got = tuple(targets_BS.shape) if isinstance(targets_BS, torch.Tensor) else targets_BS
            raise ValueError(f"targets.shape={got} must equal idx.shape={tuple(idx_BS.shape)}")
        if targets_BS.dtype != torch.int64:
            raise TypeError(f"targets.dtype={targets_BS.dtype} must be torch.int64 (token ids)")
        logits_BSV = self(idx_BS)
        return F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())

    def _check(self, idx_BS: torch.Tensor) -> None:
        if not isinstance(idx_BS, torch.Tensor) or idx_BS.dtype not in (torch.int64, torch.int32):
            raise TypeError("idx must be a LongTensor of token ids with shape (batch, seq)")
        if idx_BS.dim() != 2:
            raise ValueError(f"idx.shape={tuple(idx_BS.shape)} must be (batch, seq)")
        if idx_BS.device != self.embed.weight.device:
            raise ValueError(
                f"idx.device={idx_BS.device} must match the model's device "
                f"{self.embed.weight.device}"
            )
        if idx_BS.numel() and (int(idx_BS.min()) < 0 or int(idx_BS.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, vocab_size={self.cfg.vocab_size})")
