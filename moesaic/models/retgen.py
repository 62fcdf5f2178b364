"""A language model grounded in retrieved documents, mixed over them (RetGen, Zhang et al. 2021).

For a question x the retriever gives the top-K documents z_1..z_K with scores s_k; the prior is
their softmax over the retrieved set, ``p(z_k | x) = softmax_k(s)``. Each document is its own
generator: the language model reads ``document, "\\nQuestion: ", x, "\\nAnswer: "`` and
continues with y, ``p(y_t | x, z_k, y_<t)``; the K prompts run as one batch. Their mixture is
(Zhang et al. 2021, §3)::

    p(y_t | x, y_<t) = sum_k w_k(t) p(y_t | x, z_k, y_<t)
    w_k(t) = p(z_k | x, y_<t) ∝ p(z_k | x) prod_{τ<t} p(y_τ | x, z_k, y_<τ)

so each document's weight is its posterior given the answer so far: decoding "locks on" to the
documents that explain what it has written. Everything is in log space: ``log w(t)`` is the
log prior plus the running sum of each document's token log-probabilities, normalised by a
logsumexp. The product of the per-token mixtures telescopes into the marginal likelihood::

    log p(y | x) = log sum_k p(z_k | x) prod_t p(y_t | x, z_k, y_<t)

which joint training maximises; its gradient with respect to the scores is
``posterior_k - prior_k`` (``w_k(T) - w_k(0)``), so the retriever learns to rank first the
documents that best explain y while the generator learns to use them.

Two baselines share the code: ``mode="none"`` is the same language model without retrieval
(the prompt holds the question only) and ``mode="concat"`` puts the K documents, concatenated,
into one prompt. Both are a "mixture" over one document of weight 1.

Shape legend (docs/shapes.md): B batch (questions), K documents per question, T answer tokens,
R rows (B * K sequences), S sequence, V vocabulary, D model dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.models.lm import KVCache, MoELM

__all__ = [
    "MODES",
    "QUESTION_PROMPT",
    "ANSWER_PROMPT",
    "END",
    "Retriever",
    "Retrieved",
    "MixtureLikelihood",
    "Generation",
    "DocumentMixture",
    "mixture_posteriors",
    "mixture_token_logp",
    "mixture_next_token",
    "update_posterior",
    "sequence_length",
]

MODES = ("mixture", "concat", "none")
QUESTION_PROMPT = "\nQuestion: "
ANSWER_PROMPT = "\nAnswer: "
END = "\n"  # an answer ends at the first newline


def mixture_posteriors(
    log_prior_BK: torch.Tensor, token_logp_BKT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y|x) (B,), log w (B, K, T+1)) under teacher forcing (Zhang et al. 2021, §3).

    ``token_logp_BKT[b, k, t] = log p(y_t | x, z_k, y_<t)`` (0 past an answer's end);
    ``log w[:, :, t]`` is the posterior the t-th token is mixed with: column 0 is the prior,
    column T the posterior after the whole answer.
    """
    B, K, T = token_logp_BKT.shape
    running_BKT1 = F.pad(token_logp_BKT.float().cumsum(-1), (1, 0))  # sum_{τ<t}, t = 0..T
    joint_BKT1 = log_prior_BK.float()[..., None] + running_BKT1
    log_marginal_B = torch.logsumexp(joint_BKT1[..., -1], dim=1)
    return log_marginal_B, joint_BKT1 - torch.logsumexp(joint_BKT1, dim=1, keepdim=True)


def mixture_token_logp(log_w_BKT1: torch.Tensor, token_logp_BKT: torch.Tensor) -> torch.Tensor:
    """log p(y_t | x, y_<t) (B, T): each token's log-probability under the mixture weighted by
    the posterior before it; summed over t it is ``log p(y|x)``."""
    return torch.logsumexp(log_w_BKT1[..., :-1] + token_logp_BKT.float(), dim=1)


def mixture_next_token(log_w_BK: torch.Tensor, logp_BKV: torch.Tensor) -> torch.Tensor:
    """log p(y_t = v | x, y_<t) (B, V): the documents' next-token distributions mixed by the
    current posterior."""
    return torch.logsumexp(log_w_BK.float()[..., None] + logp_BKV.float(), dim=1)


def update_posterior(log_w_BK: torch.Tensor, token_logp_BK: torch.Tensor) -> torch.Tensor:
    """The posterior after one more token: ``w_k ∝ w_k p(y_t | x, z_k, y_<t)``, renormalised."""
    return torch.log_softmax(log_w_BK + token_logp_BK, dim=1)


def sequence_length(
    mode: str,
    *,
    k: int,
    doc_tokens: int,
    question_tokens: int,
    answer_tokens: int,
    tokenizer: Any,
) -> int:
    """The longest sequence (prompt, answer and end mark) ``mode`` builds with these caps: the
    generator's ``max_seq_len`` must be at least this."""
    _check_mode(mode)
    end = len(tokenizer.encode(END))
    docs = {"mixture": doc_tokens, "concat": k * doc_tokens + (k - 1) * end, "none": 0}[mode]
    prompts = len(tokenizer.encode(QUESTION_PROMPT)) + len(tokenizer.encode(ANSWER_PROMPT))
    return docs + prompts + question_tokens + answer_tokens + end


class Retriever(Protocol):
    """What ``DocumentMixture`` needs of a retriever (``moesaic.data.retrieval.LearnedRetriever``
    is one): ``retriever(queries)`` gives ``(passage ids (B, C), scores (B, C))`` of C >= K
    candidates per query, the scores differentiable where the retriever learns, and
    ``passage_text(id)`` the text of a passage."""

    def __call__(self, queries: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def passage_text(self, pid: int) -> str: ...


@dataclasses.dataclass
class Retrieved:
    """The documents of each question: ``passage_ids`` (B lists of K ids; empty lists for
    ``mode="none"``), the prompt ids of each document (B lists of K' id lists) and the log prior
    over them (B, K'), with K' = K for "mixture" and 1 otherwise."""

    passage_ids: list[list[int]]
    documents: list[list[list[int]]]
    log_prior_BK: torch.Tensor


@dataclasses.dataclass
class MixtureLikelihood:
    """Teacher-forced answers: ``log_marginal_B`` is log p(y|x), ``num_tokens_B`` the answer
    tokens scored (the end mark included), ``token_logp_BKT`` each document's token
    log-probabilities (0 past an answer's end), ``log_posterior_BKT1`` the document posteriors
    (column 0 the prior, column T the final posterior)."""

    log_marginal_B: torch.Tensor
    num_tokens_B: torch.Tensor
    token_logp_BKT: torch.Tensor
    log_posterior_BKT1: torch.Tensor
    retrieved: Retrieved

    @property
    def nats_per_token(self) -> torch.Tensor:
        """The negative log-likelihood of all the answers per answer token."""
        return -self.log_marginal_B.sum() / self.num_tokens_B.sum()

    def final_posterior(self) -> torch.Tensor:
        """(B, K) each document's weight after its question's whole answer (past an answer's
        end its tokens add 0, so the last column holds it)."""
        return self.log_posterior_BKT1[..., -1].exp()


@dataclasses.dataclass
class Generation:
    """One decoded answer: its ``text`` and ``ids`` (without the end mark), the documents'
    ``passage_ids``, their ``prior`` and final ``posterior`` weights, and the mixture's
    log-probability of each generated id (``token_logp``)."""

    text: str
    ids: list[int]
    passage_ids: list[int]
    prior: list[float]
    posterior: list[float]
    token_logp: list[float]


class DocumentMixture(nn.Module):
    """A generator ``lm`` grounded in the top ``k`` documents of ``retriever``, mixed by their
    posterior (see the module docstring).

    Args:
        lm: the generator, an ``MoELM``.
        retriever: a ``Retriever``; a module's parameters train with the generator's.
        k: documents per question.
        tokenizer: the generator's tokenizer (``encode`` / ``decode``).
        doc_tokens, question_tokens, answer_tokens: each document, question and answer is cut
            to its first so many tokens.

    Example::

        >>> mix = DocumentMixture(lm, LearnedRetriever(index), 4, tokenizer=ByteTokenizer())
        >>> mix.log_likelihood(["What does len do?"], ["Return the length."]).nats_per_token
        >>> mix.generate(["What does len do?"], max_tokens=64)[0].text
    """

    def __init__(
        self,
        lm: MoELM,
        retriever: Retriever,
        k: int,
        *,
        tokenizer: Any,
        doc_tokens: int = 384,
        question_tokens: int = 64,
        answer_tokens: int = 96,
    ) -> None:
        super().__init__()
        for name, value in (
            ("k", k),
            ("doc_tokens", doc_tokens),
            ("question_tokens", question_tokens),
            ("answer_tokens", answer_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        self.lm, self.retriever, self.k, self.tokenizer = lm, retriever, k, tokenizer
        self.doc_tokens, self.question_tokens = doc_tokens, question_tokens
        self.answer_tokens = answer_tokens
        self._question_ids = self._encode(QUESTION_PROMPT)
        self._answer_ids = self._encode(ANSWER_PROMPT)
        self._end_ids = self._encode(END)
        self._doc_ids: dict[int, list[int]] = {}

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, doc_tokens={self.doc_tokens}, question_tokens={self.question_tokens}, "
            f"answer_tokens={self.answer_tokens}"
        )

    def max_length(self, mode: str = "mixture") -> int:
        """The longest sequence (prompt and answer with its end mark) ``mode`` can build."""
        return sequence_length(
            mode,
            k=self.k,
            doc_tokens=self.doc_tokens,
            question_tokens=self.question_tokens,
            answer_tokens=self.answer_tokens,
            tokenizer=self.tokenizer,
        )

    def _encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def _document(self, pid: int) -> list[int]:
        if pid not in self._doc_ids:
            text = self.retriever.passage_text(pid)
            self._doc_ids[pid] = self._encode(text)[: self.doc_tokens]
        return self._doc_ids[pid]

    def retrieve(self, questions: Sequence[str], mode: str = "mixture") -> Retrieved:
        """Each question's top-``k`` documents by the retriever's scores (equal scores keep the
        retriever's order) and the prior over the prompt's documents: the softmax of their
        scores for "mixture", one document of weight 1 for "concat" and "none"."""
        _check_mode(mode)
        B = len(questions)
        if mode == "none":
            return Retrieved([[] for _ in range(B)], [[[]] for _ in range(B)], torch.zeros(B, 1))
        ids_BC, scores_BC = self.retriever(list(questions))
        if ids_BC.shape[1] < self.k:
            raise ValueError(
                f"the retriever gave {ids_BC.shape[1]} candidates per question, fewer than "
                f"k={self.k}"
            )
        top_BK = torch.sort(scores_BC, dim=1, descending=True, stable=True).indices[:, : self.k]
        pids = ids_BC.gather(1, top_BK).tolist()
        if mode == "concat":
            docs = [[self._concatenated(row)] for row in pids]
            return Retrieved(pids, docs, torch.zeros(B, 1))
        log_prior_BK = torch.log_softmax(scores_BC.gather(1, top_BK).float(), dim=1)
        docs = [[self._document(pid) for pid in row] for row in pids]
        return Retrieved(pids, docs, log_prior_BK)

    def _concatenated(self, pids: list[int]) -> list[int]:
        out: list[int] = []
        for i, pid in enumerate(pids):
            out += (self._end_ids if i else []) + self._document(pid)
        return out

    def prompt(self, document: list[int], question: str) -> list[int]:
        """The generator's prompt: ``document, "\\nQuestion: ", question, "\\nAnswer: "``."""
        q = self._encode(question)[: self.question_tokens]
        return document + self._question_ids + q + self._answer_ids

    def _answer(self, answer: str) -> list[int]:
        return self._encode(answer)[: self.answer_tokens] + self._end_ids

    def log_likelihood(
        self, questions: Sequence[str], answers: Sequence[str], mode: str = "mixture"
    ) -> MixtureLikelihood:
        """log p(answer | question) of each pair, marginalised over the documents, with the
        per-token posteriors (teacher forcing; gradients reach the generator and, in "mixture"
        mode, the retriever's scores)."""
        if isinstance(questions, str) and isinstance(answers, str):
            questions, answers = [questions], [answers]
        if isinstance(questions, str) or len(questions) != len(answers) or not questions:
            raise ValueError("questions and answers must be equally long non-empty lists")
        got = self.retrieve(questions, mode)
        answers_ids = [self._answer(a) for a in answers]
        rows, starts, lengths = [], [], []
        for docs, q, a in zip(got.documents, questions, answers_ids):
            for doc in docs:
                prompt = self.prompt(doc, q)
                rows.append(prompt + a)
                starts.append(len(prompt))
                lengths.append(len(a))
        token_logp_RT = self._answer_logp(rows, starts, lengths)
        B, K = got.log_prior_BK.shape
        token_logp_BKT = token_logp_RT.view(B, K, -1)
        log_marginal_B, log_w_BKT1 = mixture_posteriors(got.log_prior_BK, token_logp_BKT)
        num_B = torch.tensor([len(a) for a in answers_ids])
        return MixtureLikelihood(log_marginal_B, num_B, token_logp_BKT, log_w_BKT1, got)

    def _answer_logp(self, rows: list[list[int]], starts: list[int], lengths: list[int]):
        """(R, T) log-probability of each row's answer tokens (0 past its end): one forward over
        the right-padded rows, the output head applied at the answer positions only. Causal
        attention keeps the padding out of every real position; it is still routed, so the MoE
        layers' aux losses count it."""
        self._check_length(max(len(r) for r in rows))
        device = self.lm.embed.weight.device
        S, T = max(len(r) for r in rows), max(lengths)
        ids_RS = torch.zeros(len(rows), S, dtype=torch.long)
        for i, row in enumerate(rows):
            ids_RS[i, : len(row)] = torch.tensor(row)
        ids_RS = ids_RS.to(device)
        start_R = torch.tensor(starts, device=device)
        t_T = torch.arange(T, device=device)
        # the state at position p predicts token p + 1
        pos_RT = (start_R[:, None] - 1 + t_T[None, :]).clamp(max=S - 2)
        h_RSD = self.lm.features(ids_RS[:, :-1])
        h_RTD = h_RSD.gather(1, pos_RT[..., None].expand(-1, -1, h_RSD.shape[-1]))
        logp_RTV = torch.log_softmax(self.lm.head(h_RTD).float(), dim=-1)
        target_RT = ids_RS.gather(1, pos_RT + 1)
        token_logp_RT = logp_RTV.gather(2, target_RT[..., None]).squeeze(2)
        real_RT = t_T[None, :] < torch.tensor(lengths, device=device)[:, None]
        return torch.where(real_RT, token_logp_RT, torch.zeros_like(token_logp_RT))

    def _check_length(self, length: int) -> None:
        if length > self.lm.cfg.max_seq_len:
            raise ValueError(
                f"a prompt and answer of {length} tokens exceeds the generator's "
                f"model.max_seq_len={self.lm.cfg.max_seq_len}"
            )

    @torch.no_grad()
    def generate(
        self,
        questions: Sequence[str] | str,
        max_tokens: int | None = None,
        *,
        mode: str = "mixture",
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[Generation]:
        """Decode an answer to each question from the per-step mixture, the posterior updated
        after every token (Zhang et al. 2021, §3). The K documents of every question run as one
        batch with a KV cache; a question stops at its end mark or after ``max_tokens``
        (``answer_tokens`` when None). ``temperature`` 0 is greedy; above 0 samples from the
        mixture with a generator seeded by ``seed + question index``."""
        if isinstance(questions, str):
            questions = [questions]
        max_tokens = self.answer_tokens if max_tokens is None else max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} must be an int >= 1")
        if not (temperature >= 0):
            raise ValueError(f"temperature={temperature!r} must be >= 0")
        was_training = self.training
        self.eval()
        try:
            return self._decode(list(questions), max_tokens, mode, temperature, seed)
        finally:
            self.train(was_training)

    def _decode(self, questions, max_tokens, mode, temperature, seed) -> list[Generation]:
        got = self.retrieve(questions, mode)
        B, K = got.log_prior_BK.shape
        prompts = [self.prompt(doc, q) for docs, q in zip(got.documents, questions) for doc in docs]
        width = max(len(p) for p in prompts)
        self._check_length(width + max_tokens)
        device = self.lm.embed.weight.device
        pad_R = torch.tensor([width - len(p) for p in prompts], device=device)
        ids_RS = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        log_w_BK = got.log_prior_BK.float().to(device)
        gens = [torch.Generator().manual_seed(seed + b) for b in range(B)]
        out: list[list[int]] = [[] for _ in range(B)]
        token_logp: list[list[float]] = [[] for _ in range(B)]
        done = [False] * B
        cache = KVCache(self.lm.cfg.n_layers)
        logits_RV = self.lm(ids_RS, cache, pad_R)[:, -1]
        for _ in range(max_tokens):
            logp_BKV = torch.log_softmax(logits_RV.float(), dim=-1).view(B, K, -1)
            mixed_BV = mixture_next_token(log_w_BK, logp_BKV)
            next_B = _pick(mixed_BV, temperature, gens)
            chosen_BK = logp_BKV.gather(2, next_B.view(B, 1, 1).expand(B, K, 1)).squeeze(2)
            active_B = torch.tensor([not d for d in done], device=device)
            log_w_BK = torch.where(
                active_B[:, None], update_posterior(log_w_BK, chosen_BK), log_w_BK
            )  # a finished question keeps the posterior of its whole answer
            for b in range(B):
                if not done[b]:
                    out[b].append(int(next_B[b]))
                    token_logp[b].append(float(mixed_BV[b, next_B[b]]))
                    done[b] = self._ended(out[b])
            if all(done):
                break
            logits_RV = self.lm(next_B.repeat_interleave(K)[:, None], cache, pad_R)[:, -1]
        prior = got.log_prior_BK.exp().tolist()
        posterior = log_w_BK.exp().tolist()
        return [
            self._generation(out[b], got.passage_ids[b], prior[b], posterior[b], token_logp[b])
            for b in range(B)
        ]

    def _ended(self, ids: list[int]) -> bool:
        n = len(self._end_ids)
        return len(ids) >= n and ids[-n:] == self._end_ids

    def _generation(self, ids, pids, prior, posterior, token_logp) -> Generation:
        n = len(self._end_ids)
        kept = ids[:-n] if self._ended(ids) else ids
        text = self.tokenizer.decode(kept).split(END)[0]  # an end mark a merged token hid
        return Generation(text, kept, list(pids), prior, posterior, token_logp)


def _pick(logp_BV: torch.Tensor, temperature: float, gens: list[torch.Generator]) -> torch.Tensor:
    """The next id of each row: greedy at temperature 0, else sampled."""
    if temperature == 0:
        return logp_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logp_BV.cpu() / temperature, dim=-1)
    picks = [torch.multinomial(probs_BV[b], 1, generator=gens[b]) for b in range(len(gens))]
    return torch.cat(picks).to(logp_BV.device)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
