"""Batched generation: each row equals that prompt generated alone with its seed; cached
decoding equals recomputing the whole prefix; rows stop on their own."""

import dataclasses

import pytest
import torch

import moesaic as ms
from moesaic.inference.generate import generate_batch, generate_ids
from moesaic.models.lm import KVCache

PROMPTS = [[5, 6, 7, 8, 9, 10], [3], [200, 1, 17]]


def _model(**overrides):
    cfg = ms.models.model_config("lm-moe-test", **{"max_seq_len": 48, **overrides})
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=None))
    return ms.models.registry.MoELM(cfg).eval()


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize(
    "sampling", [{"temperature": 0}, {"temperature": 1.0, "top_k": 30}], ids=["greedy", "sampled"]
)
def test_batched_generation_equals_one_by_one_for_the_same_seeds(positions, sampling):
    model = _model(positions=positions)
    batched = generate_batch(model, PROMPTS, 16, seed=11, **sampling)
    alone = [generate_ids(model, p, 16, seed=11 + i, **sampling) for i, p in enumerate(PROMPTS)]
    assert batched == alone and all(len(ids) == 16 for ids in batched)


def test_cached_decoding_equals_recomputing_the_prefix_token_for_token():
    model = _model()
    kw = {"temperature": 1.0, "seed": 2}
    assert generate_batch(model, PROMPTS, 20, **kw) == generate_batch(
        model, PROMPTS, 20, use_cache=False, **kw
    )
    # and the logits themselves: padded batch, cache vs one full forward
    pad = torch.tensor([0, 5, 3])
    idx = torch.tensor(
        [[0] * int(p) + q + [4] * (6 - len(q) - int(p) + 3) for p, q in zip(pad, PROMPTS)]
    )
    with torch.no_grad():
        full = model(idx, None, pad)
        cache = KVCache(model.cfg.n_layers)
        steps = [model(idx[:, :6], cache, pad)] + [
            model(idx[:, i : i + 1], cache, pad) for i in range(6, idx.shape[1])
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_padding_leaves_a_row_as_it_is_alone():
    model = _model()
    with torch.no_grad():
        alone = model(torch.tensor([PROMPTS[1]]))
        padded = model(torch.tensor([[0, 0, 0] + PROMPTS[1]]), None, torch.tensor([3]))
    torch.testing.assert_close(padded[:, -1], alone[:, -1], rtol=1e-5, atol=1e-5)


def test_each_row_stops_on_its_own_and_keeps_its_stop_token():
    model = _model()
    free = generate_batch(model, PROMPTS, 12, temperature=0)
    marker = free[0][3]  # row 0 stops at its 4th token (or earlier, at the same id)
    out = generate_batch(model, PROMPTS, 12, temperature=0, stop=lambda ids: ids[-1] == marker)
    for row, full in zip(out, free):
        cut = full.index(marker) + 1 if marker in full else len(full)
        assert row == full[:cut]
    assert len(out[0]) <= 4


@pytest.mark.parametrize(
    "prompts,message",
    [([], "prompts is empty"), ([[1], []], "prompt is empty"), ([[1] * 40], "exceeds")],
)
def test_bad_prompts_fail_with_one_line(prompts, message):
    with pytest.raises(ValueError) as err:
        generate_batch(_model(), prompts, 10)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_generate_decodes_several_prompts_and_prints_tokens_per_second(tmp_path, capsys):
    from moesaic.cli import generate as generate_cli
    from moesaic.data import build_tokenizer
    from moesaic.train.recipes import get_recipe
    from moesaic.train.run import write_run

    cfg = get_recipe("lm-moe-test")
    model = _model(max_seq_len=32)
    write_run(
        tmp_path, dataclasses.replace(cfg, model=model.cfg), model, build_tokenizer("byte"), 1
    )
    args = ["--run", str(tmp_path), "--prompt", "def f(", "--prompt", "x", "--seed", "3"]
    assert generate_cli.main([*args, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    texts = out.split("\n\n")
    assert texts[0].startswith("def f(") and texts[1].startswith("x")
    assert "16 new tokens in 2 sequences" in err and "tokens/s" in err
    alone = generate_ids(model, list(b"x"), 8, temperature=0, seed=4)
    assert texts[1].rstrip("\n") == "x" + build_tokenizer("byte").decode(alone)
    stop = build_tokenizer("byte").decode(alone[2:4])  # row 1 stops once its text holds it
    assert (
        generate_cli.main([*args, "--max-new-tokens", "8", "--temperature", "0", "--stop", stop])
        == 0
    )
    out, err = capsys.readouterr()
    assert out.split("\n\n")[1].rstrip("\n").endswith(stop)
    assert "in 2 sequences" in err and "16 new tokens" not in err
