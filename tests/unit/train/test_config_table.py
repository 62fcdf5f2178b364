"""Every config field, set to a bad value from the command line, fails with one line that names
the field; so do wrong types and incompatible combinations."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from moesaic.train.config import ConfigError, RunConfig, apply_overrides
from moesaic.train.recipes import get_recipe

# field path: (bad value as typed after --set path=, a piece of the expected message)
BAD = {
    "recipe": ("a/b", "recipe='a/b' must be a non-empty name without '/'"),
    "model.vocab_size": ("0", "model.vocab_size=0 must be >= 1"),
    "model.max_seq_len": ("-4", "model.max_seq_len=-4 must be >= 1"),
    "model.d_model": ("0", "model.d_model=0 must be >= 1"),
    "model.n_layers": ("0", "model.n_layers=0 must be >= 1"),
    "model.n_heads": ("0", "model.n_heads=0 must be >= 1"),
    "model.n_kv_heads": ("3", "model.n_kv_heads=3 must divide model.n_heads=2"),
    "model.qkv_bias": ("maybe", "--set model.qkv_bias='maybe': expected bool"),
    "model.d_ff": ("-1", "model.d_ff=-1 must be >= 1"),
    "model.activation": ("tanh", "model.activation='tanh' is not one of"),
    "model.positions": ("alibi", "model.positions='alibi' is not one of"),
    "model.rope_theta": ("0", "model.rope_theta=0.0 must be > 0"),
    "model.norm": ("batchnorm", "model.norm='batchnorm' is not one of"),
    "model.norm_eps": ("-1e-5", "model.norm_eps=-1e-05 must be a finite float >= 0"),
    "model.tie_embeddings": ("maybe", "--set model.tie_embeddings='maybe': expected bool"),
    "model.dropout": ("1.5", "model.dropout=1.5 must be < 1"),
    "model.moe_every": ("0", "model.moe_every=0 must be >= 1"),
    "model.expert_d_ff": ("0", "model.expert_d_ff=0 must be >= 1"),
    "model.first_dense_layers": ("-1", "model.first_dense_layers=-1 must be an int >= 0"),
    "model.moe_experts": (
        "[0, 8, 0]",
        "model.moe_experts=[0, 8, 0] must be a list of model.n_layers=2",
    ),
    "model.moe.d_model": ("0", "model.moe.d_model=0 must be >= 1"),
    "model.moe.d_ff": ("-1", "model.moe.d_ff=-1 must be >= 1"),
    "model.moe.num_experts": ("0", "model.moe.num_experts=0 must be >= 1"),
    "model.moe.router": ("nope", "model.moe.router='nope' is not one of"),
    "model.moe.top_k": ("0", "model.moe.top_k=0 must be"),
    "model.moe.capacity_factor": ("0", "model.moe.capacity_factor=0.0 must be > 0"),
    "model.moe.drop_policy": ("random", "model.moe.drop_policy='random' is not one of"),
    "model.moe.activation": ("tanh", "model.moe.activation='tanh' is not one of"),
    "model.moe.expert_bias": ("maybe", "--set model.moe.expert_bias='maybe': expected bool"),
    "model.moe.shared_d_ff": ("-1", "model.moe.shared_d_ff=-1 must be an int >= 0"),
    "model.moe.shared_gate": ("maybe", "--set model.moe.shared_gate='maybe': expected bool"),
    "model.moe.residual_coefficient": (
        "maybe",
        "--set model.moe.residual_coefficient='maybe': expected bool",
    ),
    "model.moe.aux_loss_weight": (
        "-0.1",
        "model.moe.aux_loss_weight=-0.1 must be a finite float >= 0",
    ),
    "model.moe.z_loss_weight": ("nan", "model.moe.z_loss_weight=nan must be a finite float >= 0"),
    "model.moe.jitter": ("1.5", "model.moe.jitter=1.5 must be a float in [0, 1)"),
    "model.moe.router_dtype": ("int32", "model.moe.router_dtype=torch.int32 must be a floating"),
    "model.moe.router_options": ('{"bogus": 1}', "model.moe.router_options for router='switch'"),
    "model.moe.expert_backend": ("cuda", "model.moe.expert_backend='cuda' is not one of"),
    "model.moe.expert_dropout": ("1", "model.moe.expert_dropout=1.0 must be < 1"),
    "model.matched_d_ff": ("0", "model.matched_d_ff=0 must be >= 1"),
    "finetune.task": ("imdb", "finetune.task='imdb' is not one of"),
    "finetune.init": ("  ", "finetune.init='  ' must be a run directory"),
    "finetune.method": ("lora", "finetune.method='lora' is not one of"),
    "finetune.dropout": ("1.5", "finetune.dropout=1.5 must be < 1"),
    "finetune.expert_dropout": ("-0.1", "finetune.expert_dropout=-0.1 must be a finite float"),
    "finetune.freeze_router": ("maybe", "--set finetune.freeze_router='maybe': expected bool"),
    "finetune.prompt_tokens": ("0", "finetune.prompt_tokens=0 must be >= 1"),
    "finetune.pool": ("max", "finetune.pool='max' is not one of"),
    "finetune.num_classes": ("1", "finetune.num_classes=1 must be 0 (all) or >= 2"),
    "finetune.per_class": ("-1", "finetune.per_class=-1 must be an int >= 0"),
    "distill.teacher": ("", "distill.teacher='' must be the teacher's run directory"),
    "distill.temperature": ("0", "distill.temperature=0.0 must be > 0"),
    "distill.weight": ("2", "distill.weight=2.0 must be <= 1"),
    "distill.until": ("-1", "distill.until=-1 must be an int >= 0"),
    "distill.schedule": ("cosine", "distill.schedule='cosine' is not one of"),
    "distill.init_from_teacher": ("maybe", "--set distill.init_from_teacher='maybe': expected"),
    "retgen.mode": ("rag", "retgen.mode='rag' is not one of"),
    "retgen.k": ("0", "retgen.k=0 must be >= 1"),
    "retgen.candidates": ("2", "retgen.candidates=2 must be >= retgen.k=4"),
    "retgen.joint": ("maybe", "--set retgen.joint='maybe': expected bool"),
    "retgen.bm25_scale": ("0", "retgen.bm25_scale=0.0 must be > 0"),
    "retgen.embed_dim": ("0", "retgen.embed_dim=0 must be >= 1"),
    "retgen.sources": ("../etc", "retgen.sources='../etc' must be comma-separated path prefixes"),
    "retgen.kinds": ("why", "retgen.kinds='why' must be a comma-separated subset"),
    "retgen.passage_bytes": ("32", "retgen.passage_bytes=32 must be >= 64"),
    "retgen.doc_tokens": ("0", "retgen.doc_tokens=0 must be >= 1"),
    "retgen.question_tokens": ("0", "retgen.question_tokens=0 must be >= 1"),
    "retgen.answer_tokens": ("0", "retgen.answer_tokens=0 must be >= 1"),
    "retgen.train_questions": ("-1", "retgen.train_questions=-1 must be an int >= 0"),
    "retgen.val_questions": ("-1", "retgen.val_questions=-1 must be an int >= 0"),
    "retgen.test_questions": ("-1", "retgen.test_questions=-1 must be an int >= 0"),
    "retgen.init": ("  ", "retgen.init='  ' must be a language-model run directory"),
    "data.corpus": ("wiki", "data.corpus='wiki' is not one of"),
    "data.tokenizer": ("word", "data.tokenizer='word' is not one of"),
    "data.bpe_vocab_size": ("0", "data.bpe_vocab_size=0 must be >= 1"),
    "data.seq_len": ("0", "data.seq_len=0 must be >= 1"),
    "data.batch_size": ("0", "data.batch_size=0 must be >= 1"),
    "data.val_fraction": ("1.0", "data.val_fraction=1.0 must be in (0, 1)"),
    "data.eval_batches": ("0", "data.eval_batches=0 must be >= 1"),
    "data.seed": ("-1", "data.seed=-1 must be an int >= 0"),
    "train.checkpoint_activations": (
        "maybe",
        "--set train.checkpoint_activations='maybe': expected bool",
    ),
    "data.holdout_domain": ("  ", "data.holdout_domain='  ' must name a domain of data.corpus"),
    "optim.lr": ("0", "optim.lr=0.0 must be in (0, 1.0]"),
    "optim.min_lr_ratio": ("2", "optim.min_lr_ratio=2.0 must be <= 1"),
    "optim.warmup_steps": ("-1", "optim.warmup_steps=-1 must be >= 0"),
    "optim.weight_decay": ("-1", "optim.weight_decay=-1.0 must be a finite float >= 0"),
    "optim.beta1": ("1", "optim.beta1=1.0 must be < 1"),
    "optim.beta2": ("inf", "optim.beta2=inf must be a finite float >= 0"),
    "optim.grad_clip": ("-1", "optim.grad_clip=-1.0 must be a finite float >= 0"),
    "train.steps": ("0", "train.steps=0 must be >= 1"),
    "train.eval_every": ("0", "train.eval_every=0 must be >= 1"),
    "train.checkpoint_every": ("-5", "train.checkpoint_every=-5 must be >= 1"),
    "train.keep_checkpoints": ("0", "train.keep_checkpoints=0 must be >= 1"),
    "train.log_every": ("0", "train.log_every=0 must be >= 1"),
    "train.seed": ("-1", "train.seed=-1 must be an int >= 0"),
    "train.threads": ("-2", "train.threads=-2 must be an int >= 0"),
    "train.sample_tokens": ("-1", "train.sample_tokens=-1 must be an int >= 0"),
    "train.sample_prompt": ("", "train.sample_prompt='' must be a non-empty str"),
    "parallel.expert": ("0", "parallel.expert=0 must be >= 1"),
    "parallel.shard": ("-1", "parallel.shard=-1 must be an int >= 0"),
    "guard.nonfinite": ("ignore", "guard.nonfinite='ignore' is not one of ['skip', 'stop']"),
    "guard.max_skipped": ("-1", "guard.max_skipped=-1 must be >= 0"),
    "guard.spike_window": ("1", "guard.spike_window=1 must be >= 2"),
    "guard.spike_z": ("-3", "guard.spike_z=-3.0 must be a finite float >= 0"),
    "guard.collapse_share": ("1.5", "guard.collapse_share=1.5 must be in (0, 1]"),
    "guard.collapse_evals": ("0", "guard.collapse_evals=0 must be >= 1"),
}

# The image sections: their own fields, then the MoE sections of each vision model, whose
# messages are model.moe's with the section's path (the recipe below routes with "vmoe").
VISION_RECIPES = {"vision.mixer": "sparse-mlp-fashion", "vision": "vmoe-fashion"}
BAD |= {
    "vision.dataset": ("cifar", "vision.dataset='cifar' is not one of"),
    "vision.train_examples": ("-1", "vision.train_examples=-1 must be an int >= 0"),
    "vision.augment": ("mixup", "vision.augment='mixup' is not one of"),
    "vision.objective": ("mae", "vision.objective='mae' is not one of"),
    "vision.temperature": ("0", "vision.temperature=0.0 must be > 0"),
    "vision.eval_capacity_factor": ("0", "vision.eval_capacity_factor=0.0 must be > 0"),
}
for model in ("vision.vit", "vision.mixer"):
    BAD |= {
        f"{model}.image_size": ("0", f"{model}.image_size=0 must be >= 1"),
        f"{model}.channels": ("0", f"{model}.channels=0 must be >= 1"),
        f"{model}.patch_size": ("5", f"{model}.patch_size=5 must divide image_size=28"),
        f"{model}.num_classes": ("0", f"{model}.num_classes=0 must be >= 1"),
        f"{model}.d_model": ("0", f"{model}.d_model=0 must be >= 1"),
        f"{model}.n_layers": ("0", f"{model}.n_layers=0 must be >= 1"),
        f"{model}.d_ff": ("0", f"{model}.d_ff=0 must be >= 1"),
        f"{model}.activation": ("tanh", f"{model}.activation='tanh' is not one of"),
        f"{model}.dropout": ("1.5", f"{model}.dropout=1.5 must be < 1"),
        f"{model}.moe_every": ("0", f"{model}.moe_every=0 must be >= 1"),
        f"{model}.moe_last": ("-1", f"{model}.moe_last=-1 must be an int >= 0"),
        f"{model}.matched_d_ff": ("64", f"{model}.matched_d_ff=64 is for dense models"),
    }
    sections = ["moe"] + (["token_moe"] if model == "vision.mixer" else [])
    for section in sections:
        for path, (raw, message) in list(BAD.items()):
            if path.startswith("model.moe."):
                field = path.removeprefix("model.moe.")
                text = message.replace("model.moe.", f"{model}.{section}.")
                BAD[f"{model}.{section}.{field}"] = (raw, text.replace("'switch'", "'vmoe'"))
BAD |= {
    "vision.vit.n_heads": ("0", "vision.vit.n_heads=0 must be >= 1"),
    "vision.vit.pool": ("max", "vision.vit.pool='max' is not one of"),
    "vision.mixer.token_d_ff": ("0", "vision.mixer.token_d_ff=0 must be >= 1"),
    "vision.mixer.rerep_patches": ("0", "vision.mixer.rerep_patches=0 and rerep_channels=32"),
    "vision.mixer.rerep_channels": ("-1", "vision.mixer.rerep_channels=-1 must be an int >= 0"),
    "vision.mixer.matched_token_d_ff": ("64", "vision.mixer.matched_token_d_ff=64 is for dense"),
}

# The LSTM-MoE section: its own fields, then its MoE section, whose messages are model.moe's
# with the section's path (the recipe below routes with "noisy_topk").
LSTM_RECIPES = {"lstm": "lstm-moe-test"}
BAD |= {
    "lstm.vocab_size": ("0", "lstm.vocab_size=0 must be >= 1"),
    "lstm.d_model": ("0", "lstm.d_model=0 must be >= 1"),
    "lstm.n_layers": ("1", "lstm.n_layers=1 must be >= 2"),
    "lstm.d_ff": ("0", "lstm.d_ff=0 must be >= 1"),
    "lstm.activation": ("tanh", "lstm.activation='tanh' is not one of"),
    "lstm.dropout": ("1.5", "lstm.dropout=1.5 must be < 1"),
    "lstm.tie_embeddings": ("maybe", "--set lstm.tie_embeddings='maybe': expected bool"),
    "lstm.matched_d_ff": ("64", "lstm.matched_d_ff=64 is for dense models"),
}
for path, (raw, message) in list(BAD.items()):
    if path.startswith("model.moe."):
        text = message.replace("model.moe.", "lstm.moe.").replace("'switch'", "'noisy_topk'")
        BAD[path.replace("model.moe.", "lstm.moe.")] = (raw, text)


def _recipe(path: str) -> str:
    """The recipe a bad value of ``path`` is set on: one that holds its section."""
    for prefix, name in {**VISION_RECIPES, **LSTM_RECIPES}.items():
        if path.startswith(prefix + "."):
            return name
    return "lm-moe-test"


# Combinations each field allows alone but not together (the message names both fields).
INCOMPATIBLE = [
    (["parallel.expert=3"], "model.moe.num_experts=4 must be divisible by parallel.expert=3"),
    (["model.moe.router=topk", "model.moe.top_k=5"], "model.moe.top_k=5 must be <= num_experts=4"),
    (["model.max_seq_len=16"], "data.seq_len=32 must be <= model.max_seq_len=16"),
    (["model.d_model=33"], "model.d_model=33 must be divisible by model.n_heads=2"),
    (["model.n_heads=8", "model.d_model=24"], "model.positions='rope' needs an even head dim"),
    (["model.matched_d_ff=128"], "model.matched_d_ff is for dense models (model.moe=None)"),
    (["model.moe.shared_gate=true"], "model.moe.shared_gate=True needs shared_d_ff > 0"),
    (
        ["model.moe_experts=[0, 1]", "model.moe.top_k=2", "model.moe.router=topk"],
        "model.moe_experts[1]=1 must be >= model.moe.top_k=2",
    ),
    (["model.moe_experts=eight"], "model.moe_experts='eight' must be a list of expert counts"),
    (["model.first_dense_layers=2"], "model.first_dense_layers=2 must be < model.n_layers=2"),
    (["model.moe.d_ff=128", "model.expert_d_ff=32"], "d_ff=128 conflicts with model.expert_d_ff"),
    (
        ["model.moe.router_options.score_func=relu"],
        "model.moe: score_func='relu' is not one of ['sigmoid', 'softmax']",
    ),
    (
        ["model.moe.score_func=sigmoid"],
        "use --set model.moe.router_options.score_func=sigmoid",
    ),
    (["data.tokenizer=bpe", "data.bpe_vocab_size=200"], "data.bpe_vocab_size=200 must be > 256"),
    (
        ["data.holdout_domain=wiki", "data.corpus=mixture"],
        "data.holdout_domain='wiki' is not one of the mixture's domains",
    ),
    (["model.moe.router=task"], "missing 1 required keyword-only argument: 'num_tasks'"),
    (["model.moe.router=gshard", "model.moe.top_k=1"], "model.moe.top_k=1 must be 2 for router"),
    (["model.moe.d_ff=128"], "model.moe.d_ff=128 conflicts with model.d_ff=64"),
    (["model.moe.activation=relu"], "model.moe.activation='relu' conflicts with model.activation"),
    (["model.top_k=2"], "--set model.top_k: moved to model.moe.top_k: use --set model.moe.top_k=2"),
    (["model.num_experts=0"], "use --set model.moe.num_experts=0 (model.moe=none removes"),
    (["lstm.dropout=0", "finetune.task=fortune"], "lstm: an LSTM language-model run takes no"),
    (["lstm.dropout=0", "parallel.expert=2"], "parallel.expert=2: LSTM runs train on one"),
    (["lstm.moe.d_ff=128"], "lstm.moe.d_ff=128 conflicts with d_ff=64"),
    (["lstm.dropout=0", "parallel.shard=2"], "parallel.shard=2: FSDP sharding is for Transformer"),
    (
        ["lstm.dropout=0", "train.checkpoint_activations=true"],
        "train.checkpoint_activations=True checkpoints the blocks of the Transformer",
    ),
]


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, typing.Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        section = [a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)] or [kind]
        if dataclasses.is_dataclass(section[0]):  # a section, or one that may be None
            out += _leaves(section[0], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", kind))
    return out


def _fails(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        apply_overrides(get_recipe(_recipe(overrides[0])), overrides)
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_the_table_covers_every_config_field():
    assert sorted(BAD) == sorted(path for path, _ in _leaves(RunConfig))


@pytest.mark.parametrize("path", sorted(BAD))
def test_a_bad_value_fails_in_one_line_naming_the_field(path):
    raw, message = BAD[path]
    text = _fails([f"{path}={raw}"])
    assert message in text and path in text


@pytest.mark.parametrize(
    "path",
    [p for p, kind in _leaves(RunConfig) if str not in (kind, *typing.get_args(kind), typing.Any)],
)
def test_a_value_of_the_wrong_type_fails_naming_the_field_and_type(path):
    text = _fails([f"{path}=[oops]"])
    assert text.startswith(f"--set {path}='[oops]': expected "), text


@pytest.mark.parametrize(
    "overrides,message", INCOMPATIBLE, ids=[" ".join(o) for o, _ in INCOMPATIBLE]
)
def test_incompatible_combinations_fail_naming_the_fields(overrides, message):
    assert message in _fails(overrides)


# Values that pass every lower bound but have no sensible meaning: refused by an upper bound.
TOO_LARGE = {
    "optim.lr": ("1e308", "optim.lr=1e+308 must be in (0, 1.0]"),
    "train.steps": ("100000000000000000000000", "train.steps=100000000000000000000000 must be <="),
}


@pytest.mark.parametrize("path", sorted(TOO_LARGE))
def test_a_value_past_its_upper_bound_fails_in_one_line(path):
    raw, message = TOO_LARGE[path]
    assert message in _fails([f"{path}={raw}"])
