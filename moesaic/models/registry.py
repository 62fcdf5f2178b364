"""Model registry: one name per architecture, so one test battery covers every model.

>>> model = ms.models.create("lm-moe-tiny")
>>> dense = ms.models.create("lm-dense-tiny", n_layers=2)
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from moesaic.config import MoEConfig
from moesaic.models.lm import LMConfig, MoELM
from moesaic.models.lstm import LSTMConfig, LSTMMoE
from moesaic.models.mixer import MixerConfig, MixerModel
from moesaic.models.vit import VisionTransformer, ViTConfig
from moesaic.models.workspace import (
    WorkspaceTransformer,
    attention_tiny,
    workspace_moe_tiny,
    workspace_soft_tiny,
    workspace_tiny,
)

__all__ = ["MODELS", "register_model", "create", "model_config"]

# name -> function returning the default config of that model
MODELS: dict[str, Callable[[], Any]] = {}
_BUILDERS: dict[str, Callable[[Any], nn.Module]] = {}

# model-name prefix -> the application module that registers those models when imported. The
# core never imports an application package (DESIGN.md, package layout): it names each by
# string here and imports it only when one of its models is asked for.
APPLICATIONS: dict[str, str] = {"skillnet": "moesaic.skillnet.model"}


def register_model(name: str, builder: Callable[[Any], nn.Module]):
    """Decorator on a config factory: ``create(name)`` builds ``builder(factory())``."""

    def wrap(factory: Callable[[], Any]) -> Callable[[], Any]:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is already registered")
        MODELS[name], _BUILDERS[name] = factory, builder
        return factory

    return wrap


def model_config(name: str, **overrides: Any) -> Any:
    """The registered config of ``name`` with field overrides applied (and validated)."""
    if name not in MODELS:
        _import_application(name)
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not one of {sorted(MODELS)}")
    cfg = MODELS[name]()
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for model {name!r}; valid: {sorted(names)}")
    return dataclasses.replace(cfg, **overrides)


def _import_application(name: str) -> None:
    """Import the application that registers ``name`` (every application for an unknown name, so
    the error lists all models)."""
    prefixes = [p for p in APPLICATIONS if name.startswith(p)] or list(APPLICATIONS)
    for prefix in prefixes:
        importlib.import_module(APPLICATIONS[prefix])


def create(name: str, **overrides: Any) -> nn.Module:
    """Build the model registered as ``name``; keyword arguments override config fields."""
    cfg = model_config(name, **overrides)
    return _BUILDERS[name](cfg)


@register_model("lm-moe-tiny", MoELM)
def lm_moe_tiny() -> LMConfig:
    """The default recipe's model: a small Switch-style byte-level MoE LM.

    Deliberately narrow (D=64, 2 layers): on 2 CPU cores a few minutes of training feed it ~25M
    tokens, enough that the dense baseline is limited by its capacity, which is the regime where
    experts pay off (docs/compare.md has the measured comparison).
    """
    return LMConfig(
        vocab_size=256,
        max_seq_len=256,
        d_model=64,
        n_layers=2,
        n_heads=2,
        d_ff=256,
        moe=MoEConfig(num_experts=32, top_k=1, router="switch", capacity_factor=None),
        moe_every=2,
    )


@register_model("lm-dense-tiny", MoELM)
def lm_dense_tiny() -> LMConfig:
    """``lm-moe-tiny``'s dense baseline with the same activated FLOPs per token."""
    return lm_moe_tiny().dense_equivalent()


@register_model("lm-mixtral-tiny", MoELM)
def lm_mixtral_tiny() -> LMConfig:
    """A byte-level model in Mixtral's architecture, exportable to transformers
    (``ms.convert.export_mixtral``): RMSNorm, rotary positions, grouped-query attention, SwiGLU
    experts in every layer, a top-2 softmax router renormalised over the two."""
    return LMConfig(
        vocab_size=256,
        max_seq_len=256,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        activation="swiglu",
        norm="rmsnorm",
        tie_embeddings=False,
        moe=MoEConfig(num_experts=8, top_k=2, router="topk", capacity_factor=None),
        moe_every=1,
    )


@register_model("lm-qwen2moe-tiny", MoELM)
def lm_qwen2moe_tiny() -> LMConfig:
    """A byte-level model in Qwen2-MoE's architecture, exportable to transformers
    (``ms.convert.export_qwen2_moe``): ``lm-mixtral-tiny``'s plus biases on the query, key and
    value projections, a sigmoid-gated shared expert in every layer, narrower experts and a top-2
    router that keeps the raw softmax probabilities (``norm_topk_prob=False``)."""
    mixtral = lm_mixtral_tiny()
    qwen_moe = {"router_options": {"normalize": False}, "shared_d_ff": 128, "shared_gate": True}
    return dataclasses.replace(
        mixtral,
        qkv_bias=True,
        d_ff=64,
        norm_eps=1e-6,
        moe=dataclasses.replace(mixtral.moe, **qwen_moe),
    )


@register_model("lm-deepseekmoe-tiny", MoELM)
def lm_deepseekmoe_tiny() -> LMConfig:
    """A byte-level model in DeepSeekMoE's layout (Dai et al. 2024) with DeepSeek-V3's router.

    Fine-grained experts: 16 routed SwiGLU experts a quarter of the dense FFN's width
    (``expert_d_ff = d_ff / 4``), one always-on shared expert of the same width, 3 routed experts
    per token: 3 + 1 expert widths make one ``d_ff``, so a token activates the FLOPs of the dense
    FFN (DeepSeekMoE keeps the activated count fixed and takes the shared experts out of the
    routed top-k). The first layer stays dense. The router is DeepSeek-V3's: sigmoid scores,
    renormalised over the chosen experts, balanced by the auxiliary-loss-free bias
    (``balance_rate=1e-3``, V3's gamma) with no aux loss. D=64 and two layers like
    ``lm-moe-tiny``, whose dense layer and MoE site it shares.
    """
    return LMConfig(
        vocab_size=256,
        max_seq_len=256,
        d_model=64,
        n_layers=2,
        n_heads=2,
        d_ff=256,
        expert_d_ff=64,
        activation="swiglu",
        norm="rmsnorm",
        moe=MoEConfig(
            num_experts=16,
            top_k=3,
            router="topk",
            capacity_factor=None,
            shared_d_ff=64,
            aux_loss_weight=0.0,
            router_options={"score_func": "sigmoid", "balance_rate": 1e-3},
        ),
        moe_every=1,
        first_dense_layers=1,
    )


# The multi-domain corpus has six domains (moesaic.data.corpora.MIXTURE_DOMAINS): the tasks.
MIXTURE_TASKS = 6


@register_model("lm-taskmoe-tiny", MoELM)
def lm_taskmoe_tiny() -> LMConfig:
    """TaskMoE (Kudugunta et al. 2021, "Beyond Distillation"): every MoE layer routes by the
    task (the domain) alone, ``g = softmax(W emb(task))``, top-2 of 32 experts as in the paper's
    GShard setting, dropless; a task's sub-network is then ``ms.inference.extract``-able."""
    return LMConfig(
        vocab_size=256,
        max_seq_len=256,
        d_model=64,
        n_layers=4,
        n_heads=2,
        d_ff=256,
        moe=MoEConfig(
            num_experts=32,
            top_k=2,
            router="task",
            capacity_factor=None,
            router_options={"num_tasks": MIXTURE_TASKS},
        ),
        moe_every=2,
    )


@register_model("lm-tokenmoe-tiny", MoELM)
def lm_tokenmoe_tiny() -> LMConfig:
    """``lm-taskmoe-tiny`` with token-level top-2 routing: the same experts, widths and
    activated FLOPs per token (the comparison of Kudugunta et al. 2021)."""
    task = lm_taskmoe_tiny()
    moe = dataclasses.replace(task.moe, router="topk", router_options={})
    return dataclasses.replace(task, moe=moe)


@register_model("lm-moe-4l", MoELM)
def lm_moe_4l() -> LMConfig:
    """A standard Switch MoE LM (Fedus et al.; DeepSpeed-MoE's "standard MoE"): four layers,
    32 top-1 experts in every other one; ``lm-prmoe-tiny``'s baseline."""
    return dataclasses.replace(lm_moe_tiny(), n_layers=4)


@register_model("lm-prmoe-tiny", MoELM)
def lm_prmoe_tiny() -> LMConfig:
    """PR-MoE (Rajbhandari et al. 2022, DeepSpeed-MoE section 4.1): ``lm-moe-4l`` with a
    pyramid (16 experts in the first MoE layer, 32 in the last: deeper layers gain more from
    experts) and Residual-MoE (a dense MLP every token takes plus one top-1 expert, mixed by the
    released code's learned per-token coefficient)."""
    base = lm_moe_4l()
    moe = dataclasses.replace(base.moe, shared_d_ff=base.d_ff, residual_coefficient=True)
    return dataclasses.replace(base, moe=moe, moe_experts=[0, 16, 0, 32])


@register_model("lm-moe-test", MoELM)
def lm_moe_test() -> LMConfig:
    """A model small enough for unit tests (a few ms per step)."""
    return LMConfig(
        vocab_size=256,
        max_seq_len=32,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        moe=MoEConfig(num_experts=4, top_k=1, router="switch"),
        moe_every=2,
    )


# Vision models (moesaic.models.vit, moesaic.models.mixer): 28x28 grey images, 10 classes by
# default; a training run sets image_size, channels and num_classes from its dataset.


@register_model("vmoe-tiny", VisionTransformer)
def vmoe_tiny() -> ViTConfig:
    """V-MoE (Riquelme et al. 2021) at CPU scale: a 4-block ViT (D=64, 4x4 patches) whose MLP
    is, in every other block ("Every-2"), 8 experts with V-MoE's noisy top-2 router (importance
    and load losses, 0.005 each), capacity ratio 1.05 in training and Batch Prioritized
    Routing."""
    moe = MoEConfig(
        num_experts=8,
        top_k=2,
        router="vmoe",
        capacity_factor=1.05,
        drop_policy="priority",
        aux_loss_weight=0.005,
    )
    return ViTConfig(d_model=64, n_layers=4, n_heads=4, d_ff=128, patch_size=4, moe=moe)


@register_model("vit-tiny", VisionTransformer)
def vit_tiny() -> ViTConfig:
    """``vmoe-tiny``'s dense ViT of equal activated FLOPs per patch (MLP width 2 x 128 where
    the MoE model has experts)."""
    return vmoe_tiny().dense_equivalent()


@register_model("sparse-mlp-tiny", MixerModel)
def sparse_mlp_tiny() -> MixerConfig:
    """Sparse-MLP (Lou et al. 2021) at CPU scale: a 4-block MLP-Mixer (D=64, 4x4 patches) whose
    last two blocks are sparse: the token-mixing MoE (MoE_s, 4 experts, top-1, routed along the
    patch dimension between re-represent layers that give it C/2 channel-rows of 2S patches)
    and the channel-mixing MoE (MoE_c, 8 experts, top-2), both with V-MoE's router and
    priority routing at capacity ratio 1.05."""
    common = {
        "router": "vmoe",
        "capacity_factor": 1.05,
        "drop_policy": "priority",
        "aux_loss_weight": 0.005,
    }
    return MixerConfig(
        d_model=64,
        n_layers=4,
        patch_size=4,
        token_d_ff=64,
        d_ff=128,
        moe=MoEConfig(num_experts=8, top_k=2, **common),
        token_moe=MoEConfig(num_experts=4, top_k=1, **common),
        moe_every=1,
        moe_last=2,
        rerep_patches=98,
        rerep_channels=32,
    )


@register_model("mixer-tiny", MixerModel)
def mixer_tiny() -> MixerConfig:
    """``sparse-mlp-tiny``'s dense MLP-Mixer of equal activated FLOPs per image: at the sparse
    blocks its MLPs are as wide as the k activated experts, and its token-mixing MLPs there are
    widened further by the re-represent layers' FLOPs (which a dense Mixer does not have)."""
    sparse = sparse_mlp_tiny()
    dense = sparse.dense_equivalent()
    # a token-MLP hidden unit costs 2 multiply-adds per channel and patch, forward: 4*C*S FLOPs
    per_unit = 4 * sparse.d_model * sparse.num_patches * sum(sparse.sparse_sites())
    extra = round(sparse.stage_flops()["rerep"] / per_unit)
    return dataclasses.replace(dense, matched_token_d_ff=dense.matched_token_d_ff + extra)


# Shared global workspace (Goyal et al. 2022) and its pairwise-attention baseline of equal
# parameters (moesaic.models.workspace).
register_model("workspace-tiny", WorkspaceTransformer)(workspace_tiny)
register_model("workspace-soft-tiny", WorkspaceTransformer)(workspace_soft_tiny)
register_model("workspace-moe-tiny", WorkspaceTransformer)(workspace_moe_tiny)
register_model("attention-tiny", WorkspaceTransformer)(attention_tiny)


# The LSTM-MoE of Shazeer et al. 2017 (moesaic.models.lstm) and its dense twin.
@register_model("lstm-moe-tiny", LSTMMoE)
def lstm_moe_tiny() -> LSTMConfig:
    """The LSTM-MoE (Shazeer et al. 2017, §2-3) at CPU scale: a byte-level LM of two 64-wide LSTM
    layers with 16 ReLU experts of width 384 between them, noisy top-2 gating. Sized to the
    activated FLOPs per token of ``lm-moe-tiny`` at its 256-token windows (``ms.metrics.count``
    gives both the same forward FLOPs, routers included)."""
    return LSTMConfig(vocab_size=256, d_model=64, n_layers=2, d_ff=384)


@register_model("lstm-dense-tiny", LSTMMoE)
def lstm_dense_tiny() -> LSTMConfig:
    """``lstm-moe-tiny``'s dense twin of equal activated FLOPs per token: one FFN of width
    2 x 384 between the LSTM layers (the paper's "MoE-1-Wide" baseline)."""
    return lstm_moe_tiny().dense_equivalent()
