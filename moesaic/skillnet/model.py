"""SkillNet (Dai et al. 2022): one sparsely activated model for text, image,
sound, video and code.

Each modality has its own front-end (byte tokens for text and code, patch embeddings for images
and video frames, stacked log-mel frames for sound) feeding one shared Transformer trunk. The
trunk's skill sites (``"ffn"``, ``"attn_qkv"`` or both) hold one copy of their parameters per
skill; encoding an input of modality m activates only m's skill (plus the always-on general
skill when ``general_skill=True``). The ``skill`` router (``ms.ROUTERS["skill"]``) reads the
modality from ``ms.routing_context(task=...)``: there is no learned gate and no aux loss, and
with ``general_skill=False`` every example activates exactly the parameters of one dense model.

Tasks (``SkillNetConfig.tasks``) name the modalities they use: a classification task
``(modality,)`` with a linear head, a retrieval task ``(query modality, item modality)`` with a
projection per side into a joint space and a learned temperature.

Shape legend (docs/shapes.md): B batch, S tokens per example, D model dim, P projection dim.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from moesaic._validate import check_choice, check_positive_int
from moesaic.context import routing_context
from moesaic.experts import ACTIVATIONS
from moesaic.layer import MoE
from moesaic.models.registry import register_model
from moesaic.skillnet.parts import (
    BytesFrontEnd,
    PatchFrontEnd,
    SkillBlock,
    SkillLinear,
    SoundFrontEnd,
)

__all__ = [
    "MODALITIES", "SKILL_SITES", "DEFAULT_TASKS", "SkillNetConfig", "SkillNet", "PairHead",
]  # fmt: skip

MODALITIES = ("text", "image", "sound", "video", "code")
SKILL_SITES = ("ffn", "attn_qkv")
# task -> (modality,) for classification with that many classes, or (query, item) for retrieval
DEFAULT_TASKS: dict[str, tuple] = {
    "text_cls": ("text", 10),
    "sound_cls": ("sound", 20),
    "t2i_en": ("text", "image"),
    "t2i_zh": ("text", "image"),
    "t2v": ("text", "video"),
    "t2c": ("text", "code"),
}


@dataclasses.dataclass(kw_only=True)
class SkillNetConfig:
    """Architecture of ``SkillNet``; checked in ``__post_init__``.

    ``skill_sites`` empty gives the dense multitask model (every site shared by all modalities);
    ``tasks`` maps a task name to ``(modality, num_classes)`` or ``(query, item)`` modalities.
    """

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    activation: str = "gelu"
    skill_sites: frozenset[str] = frozenset({"ffn"})
    general_skill: bool = False
    proj_dim: int = 64
    text_len: int = 64
    code_len: int = 128
    image_size: int = 32
    image_patch: int = 8
    video_frames: int = 8
    video_size: int = 32
    video_patch: int = 8
    video_tubelet: int = 2
    sound_frames: int = 64
    n_mels: int = 32
    sound_stack: int = 2
    tasks: dict[str, tuple] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TASKS))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.type == "int":
                check_positive_int(f"model.{f.name}", getattr(self, f.name))
        check_choice("model.activation", self.activation, ACTIVATIONS)
        self.skill_sites = frozenset(self.skill_sites)
        for site in self.skill_sites:
            check_choice("model.skill_sites[]", site, SKILL_SITES)
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by n_heads")
        for name in self.tasks:
            self.task_kind(name)  # validates

    def task_kind(self, task: str) -> str:
        """ "classify" or "retrieve", after checking ``tasks[task]``."""
        if task not in self.tasks:
            raise ValueError(f"task={task!r} is not one of {sorted(self.tasks)}")
        spec = self.tasks[task]
        if len(spec) == 2 and spec[0] in MODALITIES and isinstance(spec[1], int) and spec[1] > 1:
            return "classify"
        if len(spec) == 2 and spec[0] in MODALITIES and spec[1] in MODALITIES:
            return "retrieve"
        raise ValueError(
            f"model.tasks[{task!r}]={spec!r} must be (modality, num_classes >= 2) or "
            f"(query modality, item modality), modalities in {MODALITIES}"
        )

    def task_modalities(self, task: str) -> tuple[str, ...]:
        spec = self.tasks[task]
        return (spec[0],) if self.task_kind(task) == "classify" else tuple(spec)

    @property
    def skills(self) -> tuple[str, ...]:
        """Skill names in expert-index order: one per modality, then "general" if enabled."""
        return MODALITIES + (("general",) if self.general_skill else ())

    def skill_table(self) -> list[list[int]]:
        """The skill ids each modality activates (row m for ``MODALITIES[m]``)."""
        general = [len(MODALITIES)] if self.general_skill else []
        return [[m] + general for m in range(len(MODALITIES))]


class SkillNet(nn.Module):
    """One trunk for five modalities with per-skill parameters (see the module docstring).

    Example::

        >>> model = ms.models.create("skillnet-tiny")
        >>> logits = model.classify("text_cls", text_bytes)         # (B, 10)
        >>> q, k = model.embed_pair("t2i_en", captions, images)     # (B, P) each, unit norm
    """

    def __init__(self, cfg: SkillNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.frontends = nn.ModuleDict({
            "text": BytesFrontEnd(D, cfg.text_len),
            "code": BytesFrontEnd(D, cfg.code_len),
            "image": PatchFrontEnd(D, cfg.image_size, cfg.image_patch),
            "video": PatchFrontEnd(
                D, cfg.video_size, cfg.video_patch, cfg.video_frames, cfg.video_tubelet
            ),
            "sound": SoundFrontEnd(D, cfg.sound_frames, cfg.n_mels, cfg.sound_stack),
        })  # fmt: skip
        table = cfg.skill_table()
        self.blocks = nn.ModuleList(
            SkillBlock(D, cfg.n_heads, cfg.d_ff, cfg.activation, table, cfg.skill_sites)
            for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(D)
        self.heads = nn.ModuleDict()
        for task, spec in cfg.tasks.items():
            if cfg.task_kind(task) == "classify":
                self.heads[task] = nn.Linear(D, spec[1])
            else:
                self.heads[task] = PairHead(D, cfg.proj_dim)

    def encode(
        self, modality: str, x: torch.Tensor, hide: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean-pooled trunk output of a batch of one modality, with that modality's skills
        active (``hide``: see ``encode_tokens``). Shape: x (B, ...) -> (B, D)."""
        h, mask = self.encode_tokens(modality, x, hide)
        w = mask.unsqueeze(-1).to(h.dtype)
        return self.norm((h * w).sum(1) / w.sum(1))

    def encode_tokens(
        self, modality: str, x: torch.Tensor, hide: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token trunk output of a batch of one modality, with that modality's skills active,
        and the padding mask. ``hide`` (bool (B, S), S tokens after the front-end) replaces those
        tokens' content by nothing, keeping only their position: the input of masked prediction
        (sparse pretraining). Shape: x (B, ...) -> ((B, S, D), bool (B, S))."""
        check_choice("modality", modality, MODALITIES)
        frontend = self.frontends[modality]
        h, mask = frontend(x)
        if hide is not None:
            if hide.shape != h.shape[:2]:
                raise ValueError(
                    f"hide has shape {tuple(hide.shape)}; {modality} input x gives "
                    f"{tuple(h.shape[:2])} tokens (see frontends[{modality!r}].token_targets)"
                )
            pos = frontend.positions(h.shape[1]).to(h.dtype)
            h = torch.where(hide.unsqueeze(-1), pos, h)
        with routing_context(task=MODALITIES.index(modality)):
            for block in self.blocks:
                h = block(h, mask)
        return h, mask

    def classify(self, task: str, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) of a classification task."""
        if self.cfg.task_kind(task) != "classify":
            raise ValueError(f"task={task!r} is a retrieval task: use embed_pair")
        return self.heads[task](self.encode(self.cfg.tasks[task][0], x))

    def embed_pair(
        self, task: str, query: torch.Tensor | None, item: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Unit-norm joint-space embeddings (B, P) of queries and items (either may be None)."""
        if self.cfg.task_kind(task) != "retrieve":
            raise ValueError(f"task={task!r} is a classification task: use classify")
        q_mod, i_mod = self.cfg.tasks[task]
        head = self.heads[task]
        q = None if query is None else head.query(self.encode(q_mod, query))
        k = None if item is None else head.item(self.encode(i_mod, item))
        return q, k

    def skill_usage(self, task: str) -> list[str]:
        """The skills ``task`` activates, in ``cfg.skills`` order."""
        ids = {
            s
            for m in self.cfg.task_modalities(task)
            for s in self.cfg.skill_table()[MODALITIES.index(m)]
        }
        return [self.cfg.skills[i] for i in sorted(ids)]

    def parameter_counts(self, task: str) -> tuple[int, int]:
        """(total, activated) parameters of ``task``: its front-ends and head, the shared trunk,
        and of each skill site only the copies of the skills the task activates."""
        used = set(self.cfg.task_modalities(task))
        total = sum(p.numel() for p in self.parameters())
        inactive = sum(
            p.numel() for m, fe in self.frontends.items() if m not in used for p in fe.parameters()
        )
        inactive += sum(
            p.numel() for t, h in self.heads.items() if t != task for p in h.parameters()
        )
        active_rows = {s for m in used for s in self.cfg.skill_table()[MODALITIES.index(m)]}
        for module in self.modules():
            if isinstance(module, MoE):
                skill_params, E = list(module.experts.parameters()), module.num_experts
            elif isinstance(module, SkillLinear):
                skill_params, E = [module.weight, module.bias], module.weight.shape[0]
            else:
                continue
            if E > 1:  # a shared site (E == 1) is always active
                idle = E - len(active_rows & set(range(E)))
                inactive += sum(p.numel() for p in skill_params) * idle // E
        return total, total - inactive


class PairHead(nn.Module):
    """Query and item projections into a P-dim joint space, and a learned logit scale
    (CLIP's temperature, initialised to 1 / 0.07)."""

    def __init__(self, d_model: int, proj_dim: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d_model, proj_dim)
        self.k_proj = nn.Linear(d_model, proj_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def query(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.q_proj(h), dim=-1)

    def item(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.k_proj(h), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100)).exp()


@register_model("skillnet-tiny", SkillNet)
def skillnet_tiny() -> SkillNetConfig:
    """SkillNet with one FFN skill per modality (text, image, sound, video, code): D=64, 2
    layers, the default six tasks. Small enough to train every task in minutes on 2 CPU cores."""
    return SkillNetConfig()


@register_model("skillnet-dense-tiny", SkillNet)
def skillnet_dense_tiny() -> SkillNetConfig:
    """``skillnet-tiny``'s dense multitask baseline: every site shared by all modalities, the
    same parameters activated per example."""
    return SkillNetConfig(skill_sites=frozenset())
