"""Typed run configuration, nested like the modules, and ``--set a.b=value`` overrides.

A run is a ``RunConfig`` with sections ``model``, ``data``, ``optim``, ``train``, ``parallel`` and
``guard`` (moesaic/train/guard.py); optional sections select other tasks or models (``lstm``: the
LSTM-MoE language model instead of ``model``).
Recipes (moesaic/train/recipes.py) are Python functions returning one; the command line changes
single fields with ``--set train.steps=200 model.moe.num_experts=32``. Every override is parsed by
the field's declared type and the whole config is validated again, so a bad value fails with one
line naming the field before any work starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from typing import Any

import torch

from moesaic._validate import (
    check_choice,
    check_dropout,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
    prefixed_errors,
)
from moesaic.config import MoEConfig
from moesaic.data.corpora import CORPORA, MIXTURE_DOMAINS
from moesaic.models.lm import LMConfig, migrate_lm_dict
from moesaic.models.lstm import LSTMConfig
from moesaic.models.mixer import MixerConfig
from moesaic.models.vit import ViTConfig
from moesaic.routing import ROUTERS
from moesaic.train.guard import GuardConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "ParallelConfig",
    "GuardConfig",
    "FinetuneConfig",
    "DistillConfig",
    "VisionConfig",
    "RetGenConfig",
    "RunConfig",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
]


MAX_LR = 1.0
MAX_STEPS = 10**9  # a billion steps: beyond any run this trainer is for


class ConfigError(ValueError):
    """A user's configuration mistake; the command line prints it as one line and exits 2."""


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    corpus: str = "stdlib"
    tokenizer: str = "byte"  # "byte" | "bpe" (extra: bpe)
    bpe_vocab_size: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    val_fraction: float = 0.05
    eval_batches: int = 16
    seed: int = 0
    # One domain left out of training and of the validation loss, evaluated on its own as
    # out-of-domain data (Artetxe et al. 2022's in- vs out-of-domain comparison); None: none.
    holdout_domain: str | None = None

    def __post_init__(self) -> None:
        for name in ("bpe_vocab_size", "seq_len", "batch_size", "eval_batches"):
            check_positive_int(f"data.{name}", getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"data.seed={self.seed!r} must be an int >= 0")
        if self.tokenizer == "bpe" and self.bpe_vocab_size <= 256:
            raise ValueError(
                f"data.bpe_vocab_size={self.bpe_vocab_size} must be > 256 (the byte alphabet)"
            )
        check_nonnegative_float("data.val_fraction", self.val_fraction)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.corpus not in CORPORA:
            raise ValueError(f"data.corpus={self.corpus!r} is not one of {sorted(CORPORA)}")
        if self.tokenizer not in ("byte", "bpe"):
            raise ValueError(f"data.tokenizer={self.tokenizer!r} is not one of ['bpe', 'byte']")
        if self.holdout_domain is not None:
            if not self.holdout_domain.strip():
                raise ValueError(
                    f"data.holdout_domain={self.holdout_domain!r} must name a domain of "
                    f"data.corpus (or be none)"
                )
            # the mixture's domains are known here; another corpus's when it is loaded
            if self.corpus == "mixture" and self.holdout_domain not in MIXTURE_DOMAINS:
                raise ValueError(
                    f"data.holdout_domain={self.holdout_domain!r} is not one of the mixture's "
                    f"domains {sorted(MIXTURE_DOMAINS)}"
                )


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "beta1", "beta2"):
            check_nonnegative_float(f"optim.{name}", getattr(self, name))
        if not 0 < self.lr <= MAX_LR:
            raise ValueError(
                f"optim.lr={self.lr} must be in (0, {MAX_LR}] (AdamW moves every weight by "
                f"about lr per step)"
            )
        for name in ("beta1", "beta2", "min_lr_ratio"):
            if getattr(self, name) >= 1 and name != "min_lr_ratio":
                raise ValueError(f"optim.{name}={getattr(self, name)} must be < 1")
        if self.min_lr_ratio > 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be <= 1")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
            raise TypeError(f"optim.warmup_steps={self.warmup_steps!r} must be an int")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000
    eval_every: int = 100
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    threads: int = 0  # 0: torch's default
    sample_tokens: int = 200  # length of the sample printed at the end (0: none)
    sample_prompt: str = "def "
    # recompute each Transformer block's activations in backward instead of storing them
    checkpoint_activations: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every"):
            check_positive_int(f"train.{name}", getattr(self, name))
        if self.steps > MAX_STEPS:
            raise ValueError(f"train.steps={self.steps} must be <= {MAX_STEPS:.0e}")
        for name in ("seed", "threads", "sample_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"train.{name}={value!r} must be an int >= 0")
        if not isinstance(self.sample_prompt, str) or (
            self.sample_tokens and not self.sample_prompt
        ):
            raise ValueError(
                f"train.sample_prompt={self.sample_prompt!r} must be a non-empty str "
                f"(or train.sample_tokens=0)"
            )


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    expert: int = 1  # expert-parallel group size (torchrun)
    # FSDP2: dense parameters sharded over this many ranks (0: plain data parallelism);
    # checkpoints are then torch.distributed.checkpoint shards, loadable on any layout
    shard: int = 0

    def __post_init__(self) -> None:
        check_positive_int("parallel.expert", self.expert)
        if isinstance(self.shard, bool) or not isinstance(self.shard, int) or self.shard < 0:
            raise ValueError(
                f"parallel.shard={self.shard!r} must be an int >= 0 (0: no FSDP sharding)"
            )


FINETUNE_METHODS = ("full", "prompt")
POOLING = ("mean", "last")


@dataclasses.dataclass(kw_only=True)
class FinetuneConfig:
    """Fine-tuning a pretrained language model on a labelled task (``moesaic finetune``).

    ``init`` is the pretrained run's directory (its newest good checkpoint; "" starts from
    random weights, the no-pretraining baseline). ``data.seq_len`` is the text length in tokens
    (longer texts are cut), ``data.batch_size`` the examples per step. The defaults are Switch
    Transformer's fine-tuning recipe (Fedus et al. 2022, §4.2): dropout 0.1 outside the experts
    and 0.4 inside them. ``method="prompt"`` freezes the whole language model and trains
    ``prompt_tokens`` soft-prompt vectors and the classifier (prompt tuning, Lester et al. 2021;
    CPM-2 §4, Zhang et al. 2021).
    """

    task: str = "supersense"
    init: str = ""
    method: str = "full"
    dropout: float = 0.1
    expert_dropout: float = 0.4
    freeze_router: bool = False
    prompt_tokens: int = 20
    pool: str = "mean"
    num_classes: int = 0  # keep the most frequent classes (0: all)
    per_class: int = 0  # at most this many texts per class (0: all)

    def __post_init__(self) -> None:
        from moesaic.data.labelled import LABELLED_TASKS

        check_choice("finetune.task", self.task, LABELLED_TASKS)
        check_choice("finetune.method", self.method, FINETUNE_METHODS)
        check_choice("finetune.pool", self.pool, POOLING)
        if not isinstance(self.init, str) or (self.init and not self.init.strip()):
            raise ValueError(
                f"finetune.init={self.init!r} must be a run directory (or '' for random weights)"
            )
        check_dropout("finetune.dropout", self.dropout)
        check_dropout("finetune.expert_dropout", self.expert_dropout)
        if not isinstance(self.freeze_router, bool):
            raise TypeError(f"finetune.freeze_router={self.freeze_router!r} must be a bool")
        check_positive_int("finetune.prompt_tokens", self.prompt_tokens)
        for name in ("num_classes", "per_class"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"finetune.{name}={value!r} must be an int >= 0 (0: all)")
        if self.num_classes == 1:
            raise ValueError("finetune.num_classes=1 must be 0 (all) or >= 2")


@dataclasses.dataclass(kw_only=True)
class DistillConfig:
    """A teacher run whose softened predictions the model also learns from.

    The loss is ``(1 - w) * CE + w * T^2 * KL(teacher_T || student_T)`` (Hinton et al. 2015)
    with ``w = kd_weight(step, weight, until, schedule)`` (moesaic/train/distill.py): "constant"
    up to ``until`` steps then 0 is staged KD (Rajbhandari et al. 2022, §5.2); "linear" decays
    to 0 at ``until``, knowledge inheritance (CPM-2 §3). ``until=0`` keeps the teacher all run.
    ``init_from_teacher`` starts the student from the teacher's weights wherever their names
    and shapes agree (Switch distillation, Fedus et al. 2022, §5: non-expert weights from the
    teacher; a shallower student takes the teacher's first layers).
    """

    teacher: str = ""
    temperature: float = 1.0
    weight: float = 0.5
    until: int = 0
    schedule: str = "constant"
    init_from_teacher: bool = False

    def __post_init__(self) -> None:
        check_positive_float("distill.temperature", self.temperature)
        check_nonnegative_float("distill.weight", self.weight)
        if self.weight > 1:
            raise ValueError(f"distill.weight={self.weight} must be <= 1 (the teacher's share)")
        if isinstance(self.until, bool) or not isinstance(self.until, int) or self.until < 0:
            raise ValueError(f"distill.until={self.until!r} must be an int >= 0 (0: every step)")
        check_choice("distill.schedule", self.schedule, ("constant", "linear"))
        if not isinstance(self.init_from_teacher, bool):
            raise TypeError(f"distill.init_from_teacher={self.init_from_teacher!r} must be a bool")
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise ValueError(
                f"distill.teacher={self.teacher!r} must be the teacher's run directory"
            )


AUGMENTATIONS = ("crop+flip", "crop", "none")
VISION_OBJECTIVES = ("classify", "contrastive")


@dataclasses.dataclass(kw_only=True)
class VisionConfig:
    """An image run (``moesaic train --recipe vmoe-fashion``): the dataset, the model (exactly
    one of ``vit``, a ViT / V-MoE, and ``mixer``, an MLP-Mixer / Sparse-MLP) and the objective.

    A run with this section trains its model on images; its ``model`` section (the language
    model) is unused. ``data.batch_size`` is images per step, ``data.eval_batches`` the
    validation batches, ``data.val_fraction`` and ``data.seed`` the validation split. The
    model's ``image_size``, ``channels`` and ``num_classes`` are set from the dataset.
    ``augment``: random crops (pad 2, 1 for 8x8 images) and, with "crop+flip", horizontal flips.
    ``objective="contrastive"`` pre-trains the representation without labels (SimCLR's NT-Xent
    on two augmented views through a projection MLP, Chen et al. 2020, at ``temperature``);
    ``moesaic vision probe`` then fits a linear probe on it. ``eval_capacity_factor`` is the
    MoE layers' capacity ratio at evaluation (V-MoE's inference capacity, Riquelme et al. 2021,
    §4; None: the training one).
    """

    dataset: str = "fashion-mnist"
    train_examples: int = 0  # use the first N of the shuffled training split (0: all)
    augment: str = "crop+flip"
    objective: str = "classify"
    temperature: float = 0.5
    vit: ViTConfig | None = None
    mixer: MixerConfig | None = None
    eval_capacity_factor: float | None = None

    def __post_init__(self) -> None:
        from moesaic.data.images import IMAGE_DATASETS

        check_choice("vision.dataset", self.dataset, IMAGE_DATASETS)
        check_choice("vision.augment", self.augment, AUGMENTATIONS)
        check_choice("vision.objective", self.objective, VISION_OBJECTIVES)
        check_positive_float("vision.temperature", self.temperature)
        n = self.train_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"vision.train_examples={n!r} must be an int >= 0 (0: all)")
        if (self.vit is None) == (self.mixer is None):
            raise ValueError(
                "vision: set exactly one of vision.vit (ViT / V-MoE) and vision.mixer "
                "(MLP-Mixer / Sparse-MLP)"
            )
        if self.eval_capacity_factor is not None:
            check_positive_float("vision.eval_capacity_factor", self.eval_capacity_factor)

    @property
    def model(self) -> ViTConfig | MixerConfig:
        return self.vit if self.vit is not None else self.mixer


RETGEN_MODES = ("mixture", "concat", "none")
RETGEN_KINDS = ("what", "arguments")


@dataclasses.dataclass(kw_only=True)
class RetGenConfig:
    """Retrieval-grounded question answering on the Python docs (``moesaic retgen``; RetGen,
    Zhang et al. 2021): the generator (the ``model`` section) reads each of the ``k`` passages
    the retriever finds for a question and the answer is their mixture, the passages weighted by
    their posterior (``mode="mixture"``). ``mode="concat"`` puts the k passages into one prompt
    and ``mode="none"`` gives the question alone: the baselines.

    The retriever re-scores BM25's ``candidates`` best passages with a learned term
    (moesaic/data/retrieval.py) starting from ``bm25_scale`` times BM25's score; with ``joint``
    the generator's likelihood trains it too. Passages are cut from the reST files under
    ``sources`` (comma-separated path prefixes, e.g. "library/" or "library/json,library/os")
    into at most ``passage_bytes`` bytes; the questions of ``kinds`` ("what", "arguments") are
    split by object into train, val and test, capped at ``train_questions``,
    ``val_questions`` and ``test_questions`` (0: all); a question whose answer is longer than
    ``answer_tokens`` bytes is not asked. In the prompt each passage is cut to ``doc_tokens``
    tokens, the question to ``question_tokens`` and the answer to ``answer_tokens``. ``init``
    is a language-model run to start the generator from ("": random weights).
    ``data.batch_size`` is questions per step and ``data.eval_batches`` the validation batches.
    """

    mode: str = "mixture"
    k: int = 4
    candidates: int = 16
    joint: bool = True
    bm25_scale: float = 0.25
    embed_dim: int = 32
    sources: str = "library/"
    kinds: str = "what,arguments"
    passage_bytes: int = 384
    doc_tokens: int = 384
    question_tokens: int = 64
    answer_tokens: int = 96
    train_questions: int = 0
    val_questions: int = 256
    test_questions: int = 256
    init: str = ""

    def __post_init__(self) -> None:
        check_choice("retgen.mode", self.mode, RETGEN_MODES)
        for name in ("k", "candidates", "embed_dim", "doc_tokens", "question_tokens"):
            check_positive_int(f"retgen.{name}", getattr(self, name))
        check_positive_int("retgen.answer_tokens", self.answer_tokens)
        if self.candidates < self.k:
            raise ValueError(
                f"retgen.candidates={self.candidates} must be >= retgen.k={self.k} (the k "
                f"documents are the best of the candidates)"
            )
        if not isinstance(self.joint, bool):
            raise TypeError(f"retgen.joint={self.joint!r} must be a bool")
        check_positive_float("retgen.bm25_scale", self.bm25_scale)
        check_positive_int("retgen.passage_bytes", self.passage_bytes)
        if self.passage_bytes < 64:
            raise ValueError(f"retgen.passage_bytes={self.passage_bytes} must be >= 64")
        for name in ("train_questions", "val_questions", "test_questions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"retgen.{name}={value!r} must be an int >= 0 (0: all)")
        prefixes = self.source_prefixes
        if not prefixes or any(".." in p or p.startswith("/") for p in prefixes):
            raise ValueError(
                f"retgen.sources={self.sources!r} must be comma-separated path prefixes under "
                f"the docs' _sources folder, e.g. 'library/'"
            )
        kinds = self.question_kinds
        if not kinds or any(k not in RETGEN_KINDS for k in kinds):
            raise ValueError(
                f"retgen.kinds={self.kinds!r} must be a comma-separated subset of "
                f"{list(RETGEN_KINDS)}"
            )
        if not isinstance(self.init, str) or (self.init and not self.init.strip()):
            raise ValueError(
                f"retgen.init={self.init!r} must be a language-model run directory "
                f"(or '' for random weights)"
            )

    @property
    def source_prefixes(self) -> list[str]:
        if not isinstance(self.sources, str):
            return []
        return [p.strip() for p in self.sources.split(",") if p.strip()]

    @property
    def question_kinds(self) -> list[str]:
        if not isinstance(self.kinds, str):
            return []
        return list(dict.fromkeys(k.strip() for k in self.kinds.split(",") if k.strip()))


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    recipe: str = "custom"
    model: LMConfig = dataclasses.field(default_factory=LMConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)
    finetune: FinetuneConfig | None = None
    distill: DistillConfig | None = None
    vision: VisionConfig | None = None
    retgen: RetGenConfig | None = None
    # The LSTM-MoE language model (Shazeer et al. 2017) on ``data``; ``model`` is then unused.
    lstm: LSTMConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, str) or not self.recipe or "/" in self.recipe:
            raise ValueError(f"recipe={self.recipe!r} must be a non-empty name without '/'")
        prompt = (
            self.finetune.prompt_tokens if self.finetune and self.finetune.method == "prompt" else 0
        )
        if self.lstm is not None:
            self._check_lstm()
        elif self.model.max_seq_len < self.data.seq_len + prompt:
            what = f" + finetune.prompt_tokens={prompt}" if prompt else ""
            raise ValueError(
                f"data.seq_len={self.data.seq_len}{what} must be <= model.max_seq_len="
                f"{self.model.max_seq_len}"
            )
        if self.model.is_moe and self.model.moe.num_experts % self.parallel.expert:
            raise ValueError(
                f"model.moe.num_experts={self.model.moe.num_experts} must be divisible by "
                f"parallel.expert={self.parallel.expert}"
            )
        if self.train.checkpoint_activations and (self.lstm or self.vision) is not None:
            raise ValueError(
                "train.checkpoint_activations=True checkpoints the blocks of the Transformer "
                f"language model; this run's model is its {'lstm' if self.lstm else 'vision'} "
                "section's"
            )
        sharded_with = [
            n for n in ("vision", "finetune", "distill", "retgen") if getattr(self, n) is not None
        ]
        if self.parallel.shard and (sharded_with or self.lstm is not None):
            raise ValueError(
                f"parallel.shard={self.parallel.shard}: FSDP sharding is for Transformer "
                f"language-model runs; this run has a {(sharded_with or ['lstm'])[0]} section"
            )
        if self.vision is not None:
            if self.finetune is not None or self.distill is not None:
                raise ValueError("vision: an image run takes no finetune or distill section")
            if self.parallel.expert != 1:
                raise ValueError(
                    f"parallel.expert={self.parallel.expert}: image runs train on one process "
                    f"or data-parallel (parallel.expert=1)"
                )

    def _check_lstm(self) -> None:
        """An LSTM run is language modelling with its own model: no other task, no sharding."""
        others = [n for n in ("vision", "finetune", "retgen") if getattr(self, n) is not None]
        if others:
            raise ValueError(
                f"lstm: an LSTM language-model run takes no {' or '.join(others)} section"
            )
        if self.parallel.expert != 1:
            raise ValueError(
                f"parallel.expert={self.parallel.expert}: LSTM runs train on one process or "
                f"data-parallel (parallel.expert=1)"
            )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """``cfg`` as plain JSON-able data (a torch.dtype by its name, e.g. "float32")."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: _plain(v) for k, v in items})


def _plain(value: Any) -> Any:
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value


def config_from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Rebuild a (nested) config dataclass from ``config_to_dict`` output. A model section
    written before the MoE options moved into ``model.moe`` is migrated (``migrate_lm_dict``).
    Errors of a nested section name its path (``model.moe.top_k=9 must be ...``)."""
    if cls is LMConfig:
        data = migrate_lm_dict(data)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, kind = data[f.name], _section(hints[f.name])
        if kind is not None and value is not None:
            where = f"{path}.{f.name}" if path else f.name
            with prefixed_errors(where, kind):
                value = config_from_dict(kind, value, where)
        kwargs[f.name] = value
    return cls(**kwargs)


def _optional(kind: Any) -> bool:
    return type(None) in typing.get_args(kind)


def _section(kind: Any) -> type | None:
    """The dataclass a field of type ``kind`` holds (``X`` or ``X | None``), else None."""
    options = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    if len(options) == 1 and dataclasses.is_dataclass(options[0]):
        return options[0]
    return None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """``cfg`` with each ``section.field=value`` applied; raises ``ConfigError`` on any mistake.

    A section that may be None (``model.moe``) is removed with ``model.moe=none``; setting one
    of its fields while it is None starts it from its defaults. One key of a dict field is set
    with ``field.key=value`` (``model.moe.router_options.score_func=sigmoid``), the value read as
    JSON (``4``, ``1e-3``, ``true``, ``null``) or else as a string; the other keys stay."""
    data = config_to_dict(cfg)
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path or not path.isprintable():
            raise ConfigError(f"--set {item!r} must look like section.field=value")
        cls, node, keys = RunConfig, data, path.split(".")
        for depth, key in enumerate(keys):
            fields = {f.name: f for f in dataclasses.fields(cls)}
            where = ".".join(keys[:depth]) or "the run config"
            if key not in fields:
                raise ConfigError(_unknown_key(path, key, where, cls, raw))
            kind = typing.get_type_hints(cls)[key]
            section = _section(kind)
            if depth == len(keys) - 2 and _is_dict(kind):
                node[key] = {**(node.get(key) or {}), keys[-1]: _json_or_str(raw)}
                break
            if depth < len(keys) - 1:
                if section is None:
                    raise ConfigError(f"--set {path}: {'.'.join(keys[: depth + 1])} has no fields")
                if node.get(key) is None:  # a section that is None, or not yet in a new one
                    node[key] = {}
                cls, node = section, node[key]
            elif section is not None and not (_optional(kind) and raw.lower() == "none"):
                raise ConfigError(
                    f"--set {path}: is a section; set one of its fields, e.g. "
                    f"{path}.{dataclasses.fields(section)[0].name}=..."
                )
            else:
                node[key] = parse_value(path, raw, kind)
    try:
        return config_from_dict(RunConfig, data)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def _is_dict(kind: Any) -> bool:
    """Whether a field of type ``kind`` holds a dict (``dict[str, Any]``, ``dict | None``)."""
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    options = typing.get_args(kind) if union else (kind,)
    return any(o is dict or typing.get_origin(o) is dict for o in options)


def _json_or_str(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _router_option_names() -> set[str]:
    """Every keyword argument a registered router's constructor takes (its own or a base's)."""
    names = set()
    for router in ROUTERS.values():
        for cls in router.__mro__:
            if "__init__" in vars(cls):
                params = inspect.signature(vars(cls)["__init__"]).parameters.values()
                names |= {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    return names


def _unknown_key(path: str, key: str, where: str, cls: type, raw: str) -> str:
    """The error for ``key`` unknown in ``cls``; when a section of ``cls`` has that field (the
    MoE options moved from ``model.top_k`` to ``model.moe.top_k``), it names the new key; a
    router's option set as a field of ``model.moe`` names its key in ``router_options``."""
    if cls is MoEConfig and key in _router_option_names():
        new = f"{where}.router_options.{key}"
        return f"--set {path}: {key} is a router option: use --set {new}={raw}"
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = _section(hints[f.name])
        if section is not None and key in {g.name for g in dataclasses.fields(section)}:
            new = f"{where}.{f.name}.{key}"
            gone = (
                f" ({where}.{f.name}=none removes the section)" if _optional(hints[f.name]) else ""
            )
            return f"--set {path}: moved to {new}: use --set {new}={raw}{gone}"
    valid = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
    return f"--set {path}: unknown key {key!r} in {where}; valid keys: {valid}"


def parse_value(path: str, raw: str, kind: Any) -> Any:
    """Parse ``raw`` as the declared type ``kind`` (int, float, bool, str, dict, X | None)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        kind = str if str in options else options[0]  # ``str | Router``: by name
    try:
        if kind is torch.dtype:
            dtype = getattr(torch, raw.removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError
            return dtype
        if kind is bool:
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return raw
        if typing.get_origin(kind) is dict or kind is dict:
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except ValueError:
        name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"--set {path}={raw!r}: expected {name}") from None
    raise ConfigError(f"--set {path}: fields of type {kind} cannot be set from the command line")
