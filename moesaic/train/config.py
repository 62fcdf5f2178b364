"""Typed run configuration, nested like the modules, and ``--set a.b=value`` overrides.

A run is a ``RunConfig`` with sections ``model``, ``data``, ``optim``, ``train``, ``parallel`` and
``guard`` (moesaic/train/guard.py).
Recipes (moesaic/train/recipes.py) are Python functions returning one; the command line changes
single fields with ``--set train.steps=200 model.num_experts=32``. Every override is parsed by
the field's declared type and the whole config is validated again, so a bad value fails with one
line naming the field before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

import torch

from moesaic._validate import check_nonnegative_float, check_positive_int
from moesaic.data.corpora import CORPORA
from moesaic.models.lm import LMConfig
from moesaic.routing.registry import build_router
from moesaic.train.guard import GuardConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "ParallelConfig",
    "GuardConfig",
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

    def __post_init__(self) -> None:
        check_positive_int("parallel.expert", self.expert)


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    recipe: str = "custom"
    model: LMConfig = dataclasses.field(default_factory=LMConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, str) or not self.recipe or "/" in self.recipe:
            raise ValueError(f"recipe={self.recipe!r} must be a non-empty name without '/'")
        if self.model.max_seq_len < self.data.seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} must be <= model.max_seq_len="
                f"{self.model.max_seq_len}"
            )
        if self.model.is_moe and self.model.num_experts % self.parallel.expert:
            raise ValueError(
                f"model.num_experts={self.model.num_experts} must be divisible by "
                f"parallel.expert={self.parallel.expert}"
            )
        if self.model.is_moe:  # router_options are checked by building one router now,
            # without touching the global RNG (the model's initial weights must not depend on it)
            try:  # on the meta device: no memory, whatever num_experts and d_model ask for
                with torch.random.fork_rng(devices=[]), torch.device("meta"):
                    _check_router(self.model)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"model.router={self.model.router!r} with model.router_options="
                    f"{self.model.router_options}: {err}"
                ) from None


def _check_router(model) -> None:
    build_router(
        model.router,
        d_model=model.d_model,
        num_experts=model.num_experts,
        top_k=model.top_k,
        router_dtype=torch.float32,
        jitter=None,
        capacity_factor=model.capacity_factor,
        options=model.router_options,
    )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from ``config_to_dict`` output."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, kind = data[f.name], hints[f.name]
        kwargs[f.name] = config_from_dict(kind, value) if dataclasses.is_dataclass(kind) else value
    return cls(**kwargs)


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """``cfg`` with each ``section.field=value`` applied; raises ``ConfigError`` on any mistake."""
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
                raise ConfigError(
                    f"--set {path}: unknown key {key!r} in {where}; "
                    f"valid keys: {', '.join(sorted(fields))}"
                )
            kind = typing.get_type_hints(cls)[key]
            if depth < len(keys) - 1:
                if not dataclasses.is_dataclass(kind):
                    raise ConfigError(f"--set {path}: {'.'.join(keys[: depth + 1])} has no fields")
                cls, node = kind, node[key]
            else:
                if dataclasses.is_dataclass(kind):
                    raise ConfigError(
                        f"--set {path}: is a section; set one of its fields, e.g. "
                        f"{path}.{dataclasses.fields(kind)[0].name}=..."
                    )
                node[key] = parse_value(path, raw, kind)
    try:
        return config_from_dict(RunConfig, data)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def parse_value(path: str, raw: str, kind: Any) -> Any:
    """Parse ``raw`` as the declared type ``kind`` (int, float, bool, str, dict, X | None)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null"):
            return None
        (kind,) = [a for a in args if a is not type(None)]
    try:
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
