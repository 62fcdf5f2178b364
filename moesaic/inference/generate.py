"""Autoregressive sampling with a KV cache (each new token costs one position, not a recompute),
one prompt at a time (``generate_ids``) or a batch of them together (``generate_batch``).
``generate_ids`` also samples from a language model without ``MoELM``'s cache (``LSTMMoE``) by
recomputing the whole prefix at each step.

Shape legend (docs/shapes.md): B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from moesaic.context import routing_context
from moesaic.models.lm import KVCache, MoELM

__all__ = ["generate_ids", "generate_batch"]


@torch.inference_mode()
def generate_ids(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> list[int]:
    """Sample ``max_new_tokens`` ids after ``prompt_ids``; deterministic for a given ``seed``.

    Args:
        temperature: 0 picks the most likely token (greedy); > 0 divides the logits.
        top_k: sample only among the k most likely tokens (None: all).
        top_p: nucleus sampling (Holtzman et al. 2020): only the most likely tokens whose
            probabilities sum to at least ``top_p``, in (0, 1] (None: all).
        use_cache: False recomputes the whole prefix each step (the reference for the cache).
            Only ``MoELM`` has a cache: any other model whose ``model(idx_BS)`` gives logits
            (B, S, V) always recomputes.
    """
    _check(model, prompt_ids, max_new_tokens, temperature, top_k, top_p)
    use_cache = use_cache and isinstance(model, MoELM)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = [int(i) for i in prompt_ids]
    cache = KVCache(model.cfg.n_layers) if use_cache else None
    pending = torch.tensor([ids], device=device)
    try:
        for _ in range(max_new_tokens):
            logits_BSV = (
                model(pending, cache) if use_cache else model(torch.tensor([ids], device=device))
            )
            nxt = _sample(logits_BSV[0, -1].float().cpu(), temperature, top_k, top_p, gen)
            ids.append(nxt)
            pending = torch.tensor([[nxt]], device=device)
    finally:
        model.train(was_training)
    return ids[len(prompt_ids) :]


@torch.inference_mode()
def generate_batch(
    model: MoELM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop: Callable[[list[int]], bool] | None = None,
    use_cache: bool = True,
    task: int | None = None,
) -> list[list[int]]:
    """Sample continuations of several prompts together: row i gives what
    ``generate_ids(model, prompts[i], ..., seed=seed + i)`` gives alone.

    The prompts are left-padded to one length; ``MoELM``'s ``pad_B`` hides the padding from
    attention and starts each row's positions at its first real token. A row stops after
    ``max_new_tokens`` tokens or as soon as ``stop(its new ids)`` is true (that last token is
    kept); the batch stops when every row has. ``task``: the task id a task-routed model
    (TaskMoE) decodes under (``ms.routing_context(task=task)``). Rows are independent only
    where routing is:
    dropless layers (``capacity_factor=None``) with a per-token router, which a batch-level
    router (expert choice, BASE) or a capacity that pads can take slots from is not.

    Returns:
        the new ids of each prompt, in prompt order.
    """
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    for prompt in prompts:
        _check(model, prompt, max_new_tokens, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    B, width = len(prompts), max(len(p) for p in prompts)
    pad_B = torch.tensor([width - len(p) for p in prompts], device=device)
    ids_BS = torch.stack([torch.tensor([0] * (width - len(p)) + list(p)) for p in prompts])
    ids_BS = ids_BS.to(device)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(B)]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [max_new_tokens == 0] * B
    cache = KVCache(model.cfg.n_layers) if use_cache else None
    pending = ids_BS
    context = routing_context(task=task) if task is not None else contextlib.nullcontext()
    with context:
        try:
            while not all(done):
                logits_BSV = model(pending if use_cache else ids_BS, cache, pad_B)
                last_BV = logits_BSV[:, -1].float().cpu()
                nxt = [_sample(last_BV[b], temperature, top_k, top_p, gens[b]) for b in range(B)]
                for b in range(B):
                    if not done[b]:
                        out[b].append(nxt[b])
                        done[b] = len(out[b]) >= max_new_tokens or bool(stop and stop(out[b]))
                pending = torch.tensor(nxt, device=device)[:, None]
                ids_BS = torch.cat([ids_BS, pending], dim=1)
        finally:
            model.train(was_training)
    return out


def _sample(logits_V: torch.Tensor, temperature: float, top_k: int | None, top_p, gen) -> int:
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V / temperature
    if top_k is not None and top_k < logits_V.numel():
        kth = logits_V.topk(top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = logits_V.softmax(-1)
    if top_p is not None and top_p < 1:
        sorted_V, order_V = probs_V.sort(descending=True)
        # keep a token when the mass before it is < top_p (so the most likely one always stays)
        drop_V = (sorted_V.cumsum(-1) - sorted_V) >= top_p
        probs_V = probs_V.scatter(0, order_V, sorted_V.masked_fill(drop_V, 0.0))
    return int(torch.multinomial(probs_V, 1, generator=gen))


def _check(model, prompt_ids, max_new_tokens, temperature, top_k, top_p) -> None:
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
    total = len(prompt_ids) + max_new_tokens
    max_seq_len = getattr(model.cfg, "max_seq_len", None)  # None: no limit (a recurrent model)
    if max_seq_len is not None and total > max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the model's max_seq_len={model.cfg.max_seq_len}"
        )
    if not isinstance(temperature, (int, float)) or temperature < 0 or temperature != temperature:
        raise ValueError(f"temperature={temperature!r} must be a number >= 0")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an int >= 1 (or None)")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p={top_p!r} must be a number in (0, 1] (or None)")
