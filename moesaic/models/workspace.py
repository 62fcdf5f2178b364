"""Shared global workspace (Goyal et al. 2022, "Coordination Among Neural Modules Through a Shared
Global Workspace", ICLR) and a Transformer that mixes its positions through one.

Goyal et al. 2022, §2: the n positions of a layer are specialists that do not talk to each other
directly. Instead, each layer has two steps:

1. **Write.** A workspace of m memory slots queries the positions; every slot keeps only its
   top-k positions (the competition: a limited-capacity channel) and is updated as a
   Relational Memory Core (Santoro et al. 2018) slot: ``M = LN(M + A V)``,
   ``M = LN(M + MLP(M))``, optionally through LSTM-like input and forget gates.
2. **Broadcast.** Every position queries the updated slots (no top-k: everyone reads) and adds
   what it reads to its state.

In a Transformer (``WorkspaceTransformer``) the two steps replace pairwise self-attention: the
score tensors are (B, H, m, n) and (B, H, n, m), so a layer costs O(n m) instead of O(n^2). The
workspace state is carried from layer to layer, starting from learned slots. ``top_k=None`` is
the paper's "soft" workspace (SSW, no competition); the paper shares the layers' parameters
(``share_layers``).

Shape legend (docs/shapes.md): B batch, S positions (the paper's n specialists), M workspace
slots (the paper's m), H heads, D width, C classes.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from moesaic._validate import check_choice, check_dropout, check_positive_int, prefixed_errors
from moesaic.config import MoEConfig
from moesaic.experts import ACTIVATIONS
from moesaic.layer import MoE
from moesaic.models.lm import DenseFFN

__all__ = [
    "WorkspaceConfig",
    "WorkspaceOutput",
    "SharedWorkspace",
    "WorkspaceTransformer",
    "MODES",
    "keep_top_k",
    "identity_slots",
    "attention_baseline",
    "workspace_tiny",
    "workspace_soft_tiny",
    "workspace_moe_tiny",
    "attention_tiny",
]

# "replace": write + broadcast instead of self-attention (the paper's TR+HSW / TR+SSW);
# "beside": both, summed into the residual; "attention": the plain Transformer baseline.
MODES = ("replace", "beside", "attention")


def identity_slots(num_slots: int, d_model: int) -> torch.Tensor:
    """The RMC's initial memory (Santoro et al. 2018; the released workspace code): an identity
    matrix zero-padded or truncated to (num_slots, d_model), so every slot starts distinct."""
    return torch.eye(num_slots, d_model)


def keep_top_k(probs: torch.Tensor, k: int | None, renormalize: bool = False) -> torch.Tensor:
    """Each row (last dim) keeps its ``k`` largest entries; the others become exactly 0.

    The released code (Goyal et al. 2022) multiplies the softmax by the top-k mask and does not
    renormalise: the kept weights then sum to less than 1, and how much less tells the slot how
    strongly the positions it did not keep competed. ``renormalize=True`` divides the kept
    weights by their sum instead. ``k=None`` keeps everything; a ``k`` at least the row length
    keeps the whole row (through the same selection).
    """
    if k is None:
        return probs
    top, index = probs.topk(min(k, probs.shape[-1]), dim=-1)
    if renormalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, index, top)


def _heads(x_BND: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, N, D = x_BND.shape
    return x_BND.view(B, N, n_heads, D // n_heads).transpose(1, 2)  # (B, H, N, D / H)


def _merge(x_BHND: torch.Tensor) -> torch.Tensor:
    B, H, N, hd = x_BHND.shape
    return x_BHND.transpose(1, 2).reshape(B, N, H * hd)  # (B, N, D)


@dataclasses.dataclass(frozen=True)
class WorkspaceOutput:
    """One write + broadcast step of ``SharedWorkspace``.

    Attributes:
        read: (B, S, D) what each position read from the updated workspace; the caller adds it
            to the positions' states (its residual).
        memory: (B, M, D) the updated workspace.
        write_weights: (B, H, M, S) each slot's attention over the positions after the top-k
            competition (exact zeros where a position lost).
        read_weights: (B, H, S, M) each position's attention over the slots.
    """

    read: torch.Tensor
    memory: torch.Tensor
    write_weights: torch.Tensor
    read_weights: torch.Tensor


class SharedWorkspace(nn.Module):
    """m slots that the positions compete to write to and that every position then reads
    (Goyal et al. 2022, §2).

    Args:
        d_model: D, the width of positions and slots.
        num_slots: m.
        top_k: positions each slot keeps per head (the competition); None: the soft workspace.
        n_heads: H; the slot queries, and the top-k, are per head.
        slot_d_ff: hidden width of the slots' MLP (None: ``d_model``).
        activation: the slots' MLP activation (a name in ``moesaic.experts.ACTIVATIONS``).
        gate: update the slots through the RMC's LSTM-like input and forget gates (Santoro et
            al. 2018, eq. 7; the released workspace code's ``gate_style="unit"``).
        renormalize: rescale each slot's kept weights to sum to 1 (the released code does not).
        initial_slots: hold the learned initial state (``slots``, (M, D), identity-padded); False
            for a workspace that always continues another's state (a later layer of an
            unshared stack).
        device, dtype: for the parameters.

    Shape:
        h (B, S, D), memory (B, M, D) or None (the learned slots) -> ``WorkspaceOutput``.

    Example::

        >>> ws = SharedWorkspace(64, num_slots=8, top_k=4, n_heads=4)
        >>> out = ws(h_BSD)
        >>> h_BSD = h_BSD + out.read
    """

    def __init__(
        self,
        d_model: int,
        num_slots: int = 8,
        top_k: int | None = None,
        n_heads: int = 1,
        *,
        slot_d_ff: int | None = None,
        activation: str = "gelu",
        gate: bool = True,
        renormalize: bool = False,
        initial_slots: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_workspace(d_model, num_slots, top_k, n_heads, slot_d_ff, activation)
        for name, value in (("gate", gate), ("renormalize", renormalize)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be a bool")
        kw = {"device": device, "dtype": dtype}
        D = d_model
        self.d_model, self.num_slots, self.top_k, self.n_heads = D, num_slots, top_k, n_heads
        self.renormalize = renormalize
        self.write_q = nn.Linear(D, D, bias=False, **kw)  # slots -> queries
        self.write_kv = nn.Linear(D, 2 * D, bias=False, **kw)  # positions -> keys, values
        self.read_q = nn.Linear(D, D, bias=False, **kw)  # positions -> queries
        self.read_kv = nn.Linear(D, 2 * D, bias=False, **kw)  # slots -> keys, values
        self.norm1, self.norm2 = nn.LayerNorm(D, **kw), nn.LayerNorm(D, **kw)
        self.mlp = DenseFFN(D, slot_d_ff or D, activation).to(**kw)
        # RMC gates: input-gate and forget-gate pre-activations from the positions (their
        # mean) and from tanh of each slot's previous state.
        self.gate_input = nn.Linear(D, 2 * D, **kw) if gate else None
        self.gate_memory = nn.Linear(D, 2 * D, bias=False, **kw) if gate else None
        self.slots = nn.Parameter(torch.empty(num_slots, D, **kw)) if initial_slots else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():  # the projections, norms and MLP: torch's own inits
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if self.slots is not None:
            with torch.no_grad():
                self.slots.copy_(identity_slots(self.num_slots, self.d_model))
        if self.gate_input is not None:
            # RMC's biases: input gate 0, forget gate 1 (keep the previous state at first)
            nn.init.zeros_(self.gate_input.bias[: self.d_model])
            nn.init.ones_(self.gate_input.bias[self.d_model :])

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_slots={self.num_slots}, top_k={self.top_k}, "
            f"n_heads={self.n_heads}, renormalize={self.renormalize}"
        )

    def initial_state(self, batch: int) -> torch.Tensor:
        """The learned slots for ``batch`` sequences, (B, M, D)."""
        if self.slots is None:
            raise ValueError("this workspace has no initial slots (initial_slots=False)")
        return self.slots.unsqueeze(0).expand(batch, -1, -1)

    def forward(
        self, h_BSD: torch.Tensor, memory_BMD: torch.Tensor | None = None
    ) -> WorkspaceOutput:
        """Write ``h`` into the workspace, then broadcast it back: ``WorkspaceOutput``."""
        self._check(h_BSD, memory_BMD)
        if memory_BMD is None:
            memory_BMD = self.initial_state(h_BSD.shape[0])
        memory_BMD, write_BHMS = self.write(h_BSD, memory_BMD)
        read_BSD, read_BHSM = self.broadcast(h_BSD, memory_BMD)
        return WorkspaceOutput(read_BSD, memory_BMD, write_BHMS, read_BHSM)

    def write(self, h_BSD: torch.Tensor, memory_BMD: torch.Tensor):
        """The competition and the slot update: (new memory (B, M, D), weights (B, H, M, S))."""
        q = _heads(self.write_q(memory_BMD), self.n_heads)  # (B, H, M, hd)
        k, v = (_heads(t, self.n_heads) for t in self.write_kv(h_BSD).chunk(2, dim=-1))
        weights_BHMS = keep_top_k(self._attend(q, k), self.top_k, self.renormalize)
        m_BMD = self.norm1(memory_BMD + _merge(weights_BHMS.to(v.dtype) @ v))
        m_BMD = self.norm2(m_BMD + self.mlp(m_BMD))
        if self.gate_input is not None:
            m_BMD = self._gated(h_BSD, memory_BMD, m_BMD)
        return m_BMD, weights_BHMS

    def broadcast(self, h_BSD: torch.Tensor, memory_BMD: torch.Tensor):
        """Every position reads the slots: (read (B, S, D), weights (B, H, S, M))."""
        q = _heads(self.read_q(h_BSD), self.n_heads)  # (B, H, S, hd)
        k, v = (_heads(t, self.n_heads) for t in self.read_kv(memory_BMD).chunk(2, dim=-1))
        weights_BHSM = self._attend(q, k)
        return _merge(weights_BHSM.to(v.dtype) @ v), weights_BHSM

    def _attend(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # Scaled by 1/sqrt(head dim) as in Vaswani et al. (the released code does not scale).
        # Softmax in at least fp32 so that which positions win the top-k does not hinge on
        # bf16 rounding.
        scores = q @ k.transpose(-1, -2)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        return (scores / math.sqrt(q.shape[-1])).softmax(dim=-1)

    def _gated(self, h_BSD, before_BMD, update_BMD) -> torch.Tensor:
        # Santoro et al. 2018, eq. 7: M_t = sigmoid(i) * tanh(M~) + sigmoid(f) * M_{t-1}. The
        # released code flattens all n inputs into the gate (which fixes n and makes the gate
        # depend on the positions' order); their mean keeps the workspace permutation-invariant.
        gates = self.gate_input(h_BSD.mean(dim=1, keepdim=True))
        gates = gates + self.gate_memory(torch.tanh(before_BMD))  # (B, M, 2D)
        i, f = gates.sigmoid().chunk(2, dim=-1)
        return i * torch.tanh(update_BMD) + f * before_BMD

    def _check(self, h_BSD: torch.Tensor, memory_BMD: torch.Tensor | None) -> None:
        if h_BSD.dim() != 3 or h_BSD.shape[-1] != self.d_model:
            raise ValueError(f"h.shape={tuple(h_BSD.shape)} must be (B, S, d_model={self.d_model})")
        want = (h_BSD.shape[0], self.num_slots, self.d_model)
        if memory_BMD is not None and tuple(memory_BMD.shape) != want:
            raise ValueError(f"memory.shape={tuple(memory_BMD.shape)} must be (B, M, D) = {want}")


def _check_workspace(d_model, num_slots, top_k, n_heads, slot_d_ff, activation) -> None:
    """The workspace's arguments (shared by ``SharedWorkspace`` and ``WorkspaceConfig``)."""
    for name, value in (("d_model", d_model), ("num_slots", num_slots), ("n_heads", n_heads)):
        check_positive_int(name, value)
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    for name, value in (("top_k", top_k), ("slot_d_ff", slot_d_ff)):
        if value is not None:
            check_positive_int(name, value)
    check_choice("activation", activation, ACTIVATIONS)


@dataclasses.dataclass(kw_only=True)
class WorkspaceConfig:
    """Architecture of ``WorkspaceTransformer``; every field is checked in ``__post_init__``.

    Inputs are token ids (B, S) embedded by a table of ``vocab_size`` rows, or, with
    ``vocab_size=None``, features (B, S, ``d_in``) through a linear projection. Positions are
    learned embeddings (up to ``max_seq_len``). ``mode`` picks how positions mix (``MODES``):
    "replace" (write + broadcast through the workspace instead of self-attention), "beside" (both,
    summed) or "attention" (the plain Transformer: ``attention_baseline()`` sizes it to the
    workspace model's parameter count). ``top_k=None`` is the soft workspace. ``moe`` makes every
    block's FFN an ``ms.MoE`` (its ``d_model``, ``d_ff`` and ``activation`` are this config's:
    leave them None there).
    """

    vocab_size: int | None = 16
    d_in: int | None = None  # feature inputs (B, S, d_in) when vocab_size is None
    num_classes: int = 2
    max_seq_len: int = 64
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 128
    activation: str = "gelu"
    dropout: float = 0.0
    mode: str = "replace"
    num_slots: int = 8  # m
    top_k: int | None = 4  # positions each slot keeps; None: the soft workspace
    renormalize: bool = False
    gate: bool = True
    slot_d_ff: int | None = None  # None: d_model
    share_layers: bool = True  # one block's parameters for every layer, as the paper
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if (self.vocab_size is None) == (self.d_in is None):
            raise ValueError(
                f"vocab_size={self.vocab_size!r}, d_in={self.d_in!r}: set exactly one "
                "(token ids, or features of width d_in)"
            )
        for name in ("vocab_size", "d_in"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        for name in ("num_classes", "max_seq_len", "n_layers", "d_ff"):
            check_positive_int(name, getattr(self, name))
        _check_workspace(
            self.d_model, self.num_slots, self.top_k, self.n_heads, self.slot_d_ff, self.activation
        )
        if self.top_k is not None and self.top_k > self.max_seq_len:
            raise ValueError(
                f"top_k={self.top_k} must be <= max_seq_len={self.max_seq_len} "
                "(None: the soft workspace, every position writes)"
            )
        check_choice("mode", self.mode, MODES)
        check_dropout("dropout", self.dropout)
        for name in ("renormalize", "gate", "share_layers"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be a bool")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise TypeError(f"moe={self.moe!r} must be an ms.MoEConfig or None (dense)")
            if not isinstance(self.moe.router, str):
                raise TypeError("moe.router must be a name in ms.ROUTERS (configs are saved)")
            self.moe_config()

    @property
    def uses_workspace(self) -> bool:
        return self.mode != "attention"

    def moe_config(self) -> MoEConfig:
        """``moe`` with ``d_model``, ``d_ff`` and ``activation`` filled in from this config."""
        if self.moe is None:
            raise ValueError("moe is None: the FFNs are dense")
        with prefixed_errors("moe", MoEConfig):
            return self.moe.inherit(
                "", d_model=self.d_model, d_ff=self.d_ff, activation=self.activation
            )


class _SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention: the pairwise (B, H, S, S) baseline."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(t, self.n_heads) for t in self.qkv(x_BSD).chunk(3, dim=-1))
        return self.out(_merge(F.scaled_dot_product_attention(q, k, v)))


class WorkspaceBlock(nn.Module):
    """Pre-norm block: positions mix (workspace, attention or both), then a dense or MoE FFN."""

    def __init__(self, cfg: WorkspaceConfig, initial_slots: bool) -> None:
        super().__init__()
        D = cfg.d_model
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = _SelfAttention(D, cfg.n_heads) if cfg.mode != "replace" else None
        self.workspace = None
        if cfg.uses_workspace:
            self.workspace = SharedWorkspace(
                D, cfg.num_slots, cfg.top_k, cfg.n_heads, slot_d_ff=cfg.slot_d_ff,
                activation=cfg.activation, gate=cfg.gate, renormalize=cfg.renormalize,
                initial_slots=initial_slots,
            )  # fmt: skip
        moe = cfg.moe is not None
        self.ffn = MoE(cfg.moe_config()) if moe else DenseFFN(D, cfg.d_ff, cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: torch.Tensor, memory_BMD: torch.Tensor | None):
        h_BSD = self.ln1(x_BSD)
        mixed = self.attn(h_BSD) if self.attn is not None else torch.zeros_like(h_BSD)
        if self.workspace is not None:
            ws = self.workspace(h_BSD, memory_BMD)
            mixed, memory_BMD = mixed + ws.read, ws.memory
        x_BSD = x_BSD + self.drop(mixed)
        return x_BSD + self.drop(self.ffn(self.ln2(x_BSD))), memory_BMD


class WorkspaceTransformer(nn.Module):
    """Sequence classifier whose positions coordinate through a shared workspace (Goyal et al.
    2022, §2), or, with ``mode="attention"``, the plain Transformer baseline.

    ``features(x)`` gives the final normed per-position states (B, S, D); ``forward(x)`` their
    mean through the linear head, logits (B, C). ``x`` is token ids (B, S) or, when
    ``cfg.vocab_size`` is None, features (B, S, d_in). The workspace state starts from the first
    block's learned slots and is carried from layer to layer; with ``share_layers`` one block
    runs ``n_layers`` times.

    Example::

        >>> model = WorkspaceTransformer(WorkspaceConfig(vocab_size=16, num_classes=8))
        >>> logits = model(torch.randint(0, 16, (2, 32)))
    """

    def __init__(self, cfg: WorkspaceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        if cfg.vocab_size is not None:
            self.embed: nn.Module = nn.Embedding(cfg.vocab_size, D)
        else:
            self.embed = nn.Linear(cfg.d_in, D)
        self.pos = nn.Parameter(torch.randn(cfg.max_seq_len, D) * 0.02)
        n_blocks = 1 if cfg.share_layers else cfg.n_layers
        self.blocks = nn.ModuleList(WorkspaceBlock(cfg, i == 0) for i in range(n_blocks))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.num_classes)
        self.drop = nn.Dropout(cfg.dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S) ids or (B, S, d_in) features -> (B, S, D)."""
        self._check(x)
        h_BSD = self.drop(self.embed(x) + self.pos[: x.shape[1]])
        memory_BMD = None
        for i in range(self.cfg.n_layers):
            h_BSD, memory_BMD = self.blocks[0 if self.cfg.share_layers else i](h_BSD, memory_BMD)
        return self.norm(h_BSD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=1))

    def _check(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        if cfg.vocab_size is not None:
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"x: {x.dtype} {tuple(x.shape)} must be token ids (B, S)")
        elif x.dim() != 3 or x.shape[-1] != cfg.d_in or not x.dtype.is_floating_point:
            raise ValueError(f"x: {x.dtype} {tuple(x.shape)} must be features (B, S, {cfg.d_in})")
        if x.shape[1] > cfg.max_seq_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_seq_len={cfg.max_seq_len}")


def _parameters(cfg: WorkspaceConfig) -> int:
    with torch.device("meta"):  # counts without allocating
        return sum(p.numel() for p in WorkspaceTransformer(cfg).parameters())


def attention_baseline(cfg: WorkspaceConfig) -> WorkspaceConfig:
    """``cfg`` with ``mode="attention"`` and the FFN width ``d_ff`` whose parameter count is
    closest to ``cfg``'s (the workspace's projections, slot MLP and gates go to a wider FFN), so
    the two can be compared at equal parameters."""
    target = _parameters(cfg)
    base = dataclasses.replace(cfg, mode="attention")
    p1 = _parameters(dataclasses.replace(base, d_ff=1))
    p2 = _parameters(dataclasses.replace(base, d_ff=2))
    width = max(1, round(1 + (target - p1) / (p2 - p1)))  # parameters grow linearly with d_ff
    return dataclasses.replace(base, d_ff=width)


# Configs to register (moesaic.models.registry): a sequence classifier over 16 symbols at CPU
# scale, the paper's 8 slots and shared layers.


def workspace_tiny() -> WorkspaceConfig:
    """Top-k workspace Transformer (the paper's TR+HSW): 8 slots, top-4, 4 shared layers."""
    return WorkspaceConfig(vocab_size=16, num_classes=8, max_seq_len=64, d_model=64, n_heads=4)


def workspace_soft_tiny() -> WorkspaceConfig:
    """``workspace_tiny`` without the competition (the paper's soft workspace, TR+SSW)."""
    return dataclasses.replace(workspace_tiny(), top_k=None)


def workspace_moe_tiny() -> WorkspaceConfig:
    """``workspace_tiny`` whose FFN is 8 Switch experts (top-1, dropless)."""
    moe = MoEConfig(num_experts=8, top_k=1, router="switch", capacity_factor=None)
    return dataclasses.replace(workspace_tiny(), moe=moe)


def attention_tiny() -> WorkspaceConfig:
    """``workspace_tiny``'s plain Transformer with the same parameter count."""
    return attention_baseline(workspace_tiny())
