"""The document mixture (RetGen): its arithmetic on a hand-worked example, identical documents
decode as one, an oracle document's posterior rises under teacher forcing, the gradient on the
retriever's scores is posterior - prior, and the batched likelihood and decoding agree with
slow one-sequence references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moesaic.data import ByteTokenizer
from moesaic.data.retrieval import BM25Index, LearnedRetriever, Passage
from moesaic.inference.generate import generate_ids
from moesaic.models.lm import MoELM
from moesaic.models.registry import model_config
from moesaic.models.retgen import (
    DocumentMixture,
    mixture_next_token,
    mixture_posteriors,
    mixture_token_logp,
    update_posterior,
)

TOK = ByteTokenizer()


class Latin1:
    """Bytes as Latin-1 characters: every id sequence decodes and re-encodes to itself (UTF-8
    would replace the invalid bytes an untrained model emits)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("latin-1"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("latin-1")


class FixedRetriever(nn.Module):
    """Candidates 0..C-1 for every query, with learnable scores (C,)."""

    def __init__(self, texts: list[str], scores: list[float]) -> None:
        super().__init__()
        self.texts = texts
        self.scores = nn.Parameter(torch.tensor(scores))

    def forward(self, queries):
        B, C = len(queries), len(self.texts)
        return torch.arange(C).expand(B, C), self.scores.expand(B, C)

    def passage_text(self, pid: int) -> str:
        return self.texts[pid]


def _lm() -> MoELM:
    torch.manual_seed(0)
    return MoELM(model_config("lm-moe-test", max_seq_len=256)).eval()


def test_the_hand_worked_two_document_mixture():
    # Two documents, prior (0.6, 0.4); two tokens {a, b}; document 1's generator says a with
    # 0.9 at every step, document 2's with 0.2; the answer is "a a".
    # t=0: w = (0.6, 0.4); p(a) = 0.6*0.9 + 0.4*0.2 = 0.62.
    # t=1: w ∝ (0.54, 0.08) = (27/31, 4/31); p(a) = (27*0.9 + 4*0.2)/31 = 25.1/31 = 251/310.
    # end: w ∝ (0.486, 0.016) = (243/251, 8/251); p(y) = 0.62 * 251/310 = 0.502.
    log_prior = torch.tensor([[0.6, 0.4]]).log()
    logp_KV = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).log()  # per document: (p(a), p(b))
    token_logp = torch.stack([logp_KV[:, 0], logp_KV[:, 0]], dim=-1)[None]  # (1, 2, 2)
    log_marginal, log_w = mixture_posteriors(log_prior, token_logp)
    assert log_marginal.exp().item() == pytest.approx(0.502, abs=1e-6)
    expected_w = [[0.6, 27 / 31, 243 / 251], [0.4, 4 / 31, 8 / 251]]
    torch.testing.assert_close(log_w.exp()[0], torch.tensor(expected_w), atol=1e-6, rtol=0)
    per_token = mixture_token_logp(log_w, token_logp).exp()[0]
    torch.testing.assert_close(per_token, torch.tensor([0.62, 251 / 310]), atol=1e-6, rtol=0)
    # the same numbers step by step, as decoding computes them
    w = log_prior
    mixed = mixture_next_token(w, logp_KV[None]).exp()[0]
    torch.testing.assert_close(mixed, torch.tensor([0.62, 0.38]), atol=1e-6, rtol=0)
    w = update_posterior(w, logp_KV[None, :, 0])
    mixed = mixture_next_token(w, logp_KV[None]).exp()[0]
    torch.testing.assert_close(mixed, torch.tensor([251 / 310, 59 / 310]), atol=1e-6, rtol=0)


def test_per_token_mixtures_multiply_to_the_marginal_likelihood():
    torch.manual_seed(1)
    log_prior = torch.log_softmax(torch.randn(3, 5), dim=1)
    token_logp = torch.log_softmax(torch.randn(3, 5, 7, 11), dim=-1)[..., 0]
    log_marginal, log_w = mixture_posteriors(log_prior, token_logp)
    total = mixture_token_logp(log_w, token_logp).sum(-1)
    torch.testing.assert_close(total, log_marginal, atol=1e-5, rtol=0)
    slow = torch.logsumexp(log_prior + token_logp.sum(-1), dim=1)  # the definition
    torch.testing.assert_close(log_marginal, slow, atol=1e-5, rtol=0)


def test_an_oracle_documents_posterior_rises_under_teacher_forcing():
    # Toy bigram generators over 8 symbols. The oracle document's moves s -> s+1 with
    # probability 0.4 (the rest uniform); distractor j moves s -> s+1 with 0.3 and s -> s+1+j
    # with 0.4 (the rest uniform). The reference follows s -> s+1, so the oracle gives each
    # reference token 0.4 and every distractor 0.3: w_o(t+1) / w_o(t) = 0.4 / mixture > 1 at
    # every token, and the odds against the oracle shrink by (3/4)^20 over 20 tokens:
    # from 9:1 (prior 0.1) to 9 * 0.75^20 = 0.029, a final weight of 1 / 1.029 = 0.972.
    V, T = 8, 20
    ahead = (torch.arange(V) + 1) % V

    def bigram(jump: int | None) -> torch.Tensor:
        p = torch.full((V, V), 0.6 / (V - 1) if jump is None else 0.3 / (V - 2))
        p[torch.arange(V), ahead] = 0.4 if jump is None else 0.3
        if jump is not None:
            p[torch.arange(V), (torch.arange(V) + 1 + jump) % V] = 0.4
        return p

    models = [bigram(None), bigram(1), bigram(2), bigram(3)]  # document 0 is the oracle
    assert all(torch.allclose(m.sum(1), torch.ones(V)) for m in models)
    y = [(3 + t) % V for t in range(T + 1)]  # y_0 is the last prompt symbol
    token_logp = torch.tensor([[[m[y[t], y[t + 1]].log() for t in range(T)] for m in models]])
    log_prior = torch.tensor([[0.1, 0.3, 0.3, 0.3]]).log()  # the retriever ranks it last
    _, log_w = mixture_posteriors(log_prior, token_logp)
    oracle = log_w.exp()[0, 0]
    assert torch.all(oracle[1:] > oracle[:-1])
    assert oracle[-1].item() == pytest.approx(1 / (1 + 9 * 0.75**20), abs=1e-5)
    assert oracle[-1] > 0.9


def test_the_marginal_likelihoods_gradient_on_the_scores_is_posterior_minus_prior():
    torch.manual_seed(2)
    scores = torch.randn(4, 6, requires_grad=True)
    token_logp = torch.log_softmax(torch.randn(4, 6, 9, 5), dim=-1)[..., 0]
    log_prior = torch.log_softmax(scores, dim=1)
    log_marginal, log_w = mixture_posteriors(log_prior, token_logp)
    log_marginal.sum().backward()
    formula = log_w[..., -1].exp() - log_prior.exp()
    torch.testing.assert_close(scores.grad, formula.detach(), atol=1e-6, rtol=0)


def test_through_the_model_the_score_gradient_is_posterior_minus_prior_on_the_top_k():
    lm = _lm()
    texts = ["alpha beta gamma", "delta epsilon", "json dumps serialises", "zeta"]
    retriever = FixedRetriever(texts, [0.3, -0.2, 1.0, 0.5])
    mix = DocumentMixture(lm, retriever, 3, tokenizer=TOK, doc_tokens=32)
    out = mix.log_likelihood(["What does json.dumps do?"], ["It serialises."])
    out.log_marginal_B.sum().backward()
    assert out.retrieved.passage_ids == [[2, 3, 0]]  # the top 3 by score, best first
    expected = torch.zeros(4)
    expected[[2, 3, 0]] = (out.final_posterior() - out.log_posterior_BKT1[..., 0].exp())[0]
    torch.testing.assert_close(retriever.scores.grad, expected.detach(), atol=1e-5, rtol=0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.parameters() if p.dim())


def test_joint_training_reaches_the_learned_retrievers_parameters():
    passages = [
        Passage(0, "a", "", ".. function:: json.dumps(obj) Serialize obj to a str."),
        Passage(1, "a", "", ".. function:: json.loads(s) Deserialize s to an object."),
        Passage(2, "b", "", "The json module encodes and decodes json documents."),
    ]
    retriever = LearnedRetriever(BM25Index(passages), candidates=3, dim=8, buckets=64)
    mix = DocumentMixture(_lm(), retriever, 2, tokenizer=TOK, doc_tokens=64)
    mix.log_likelihood(
        ["What does json.dumps do?"], ["Serialize obj to a str."]
    ).log_marginal_B.sum().backward()
    assert retriever.log_scale.grad is not None and retriever.log_scale.grad != 0
    assert retriever.bilinear.grad.abs().sum() > 0  # W starts at 0, its gradient does not


def _slow_log_likelihood(lm, prompts, answer_ids, log_prior):
    """One sequence at a time, the whole vocabulary's log-softmax at every position."""
    sums = []
    for prompt in prompts:
        ids = torch.tensor([prompt + answer_ids])
        logp = torch.log_softmax(lm(ids)[0].float(), dim=-1)
        start = len(prompt)
        sums.append(sum(logp[start - 1 + t, a] for t, a in enumerate(answer_ids)))
    return torch.logsumexp(log_prior + torch.stack(sums), dim=0)


def test_the_batched_likelihood_equals_one_sequence_at_a_time():
    lm = _lm()
    texts = ["short", "a somewhat longer passage of text", "mid length text"]
    retriever = FixedRetriever(texts, [0.1, 0.7, -0.4])
    mix = DocumentMixture(lm, retriever, 3, tokenizer=TOK, doc_tokens=20, answer_tokens=12)
    questions, answers = ["What is x?", "Why?"], ["x is a letter in the text", "no"]
    with torch.no_grad():
        out = mix.log_likelihood(questions, answers)
        for b, (q, a) in enumerate(zip(questions, answers)):
            docs = out.retrieved.documents[b]
            prompts = [mix.prompt(doc, q) for doc in docs]
            answer_ids = list(TOK.encode(a)[:12]) + [10]
            slow = _slow_log_likelihood(lm, prompts, answer_ids, out.retrieved.log_prior_BK[b])
            assert out.log_marginal_B[b].item() == pytest.approx(slow.item(), abs=1e-4)
            assert out.num_tokens_B[b] == len(answer_ids)


def test_k_identical_documents_decode_exactly_as_one_document():
    lm = _lm()
    text = "json.dumps(obj) serialises obj to a JSON formatted str."
    question = "What does json.dumps do?"
    many = DocumentMixture(
        lm, FixedRetriever([text] * 3, [0.9, -0.3, 0.2]), 3, tokenizer=TOK, doc_tokens=64
    )
    one = DocumentMixture(lm, FixedRetriever([text], [0.0]), 1, tokenizer=TOK, doc_tokens=64)
    got = many.generate([question], 24)[0]
    alone = one.generate([question], 24)[0]
    prompt = one.prompt(list(TOK.encode(text)), question)
    reference = generate_ids(lm, prompt, 24, temperature=0)  # plain single-sequence decoding
    cut = reference.index(10) if 10 in reference else len(reference)
    assert got.ids == alone.ids == reference[:cut]
    torch.testing.assert_close(
        torch.tensor(got.token_logp), torch.tensor(alone.token_logp), atol=1e-5, rtol=0
    )
    # equal likelihoods leave the posterior at the prior
    torch.testing.assert_close(
        torch.tensor(got.posterior), torch.tensor(got.prior), atol=1e-5, rtol=0
    )
    with torch.no_grad():
        a = many.log_likelihood([question], ["It serialises obj."]).log_marginal_B
        b = one.log_likelihood([question], ["It serialises obj."]).log_marginal_B
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)  # a sum of ~20 float32 terms


def test_decoding_and_teacher_forcing_agree_on_the_posterior():
    lm = _lm()
    texts = ["first passage text", "second one, rather different", "third"]
    mix = DocumentMixture(
        lm, FixedRetriever(texts, [0.2, 0.1, 0.0]), 3, tokenizer=Latin1(), answer_tokens=16
    )
    questions = ["What does a do?", "And b?"]
    gens = mix.generate(questions, 16)
    assert [len(g.ids) for g in gens] != [0, 0]
    with torch.no_grad():
        out = mix.log_likelihood(questions, [g.text for g in gens])
    for b, g in enumerate(gens):
        T = len(g.ids)  # the teacher-forced answer also scores the end mark after these
        forced = out.log_posterior_BKT1[b, :, T].exp()
        torch.testing.assert_close(forced, torch.tensor(g.posterior), atol=1e-4, rtol=0)
        per_token = mixture_token_logp(out.log_posterior_BKT1, out.token_logp_BKT)[b, :T]
        torch.testing.assert_close(per_token, torch.tensor(g.token_logp), atol=1e-4, rtol=0)


def test_the_baselines_read_one_prompt():
    lm = _lm()
    mix = DocumentMixture(
        lm, FixedRetriever(["aa", "bb", "cc"], [0.0, 1.0, 2.0]), 2, tokenizer=TOK, doc_tokens=8
    )
    none = mix.retrieve(["q"], "none")
    concat = mix.retrieve(["q"], "concat")
    assert none.documents == [[[]]] and none.passage_ids == [[]]
    assert concat.passage_ids == [[2, 1]]
    assert concat.documents == [[list(TOK.encode("cc\nbb"))]]
    for got in (none, concat):
        assert got.log_prior_BK.shape == (1, 1) and got.log_prior_BK.item() == 0.0
    assert mix.max_length("concat") == 2 * 8 + 1 + len("\nQuestion: \nAnswer: ") + 64 + 96 + 1
    with pytest.raises(ValueError, match="mode='rag' is not one of"):
        mix.retrieve(["q"], "rag")
    long = DocumentMixture(
        lm, FixedRetriever(["x" * 200] * 2, [0.0, 0.0]), 2, tokenizer=TOK, doc_tokens=200
    )
    long.log_likelihood(["q"], ["a"], mode="mixture")  # one passage fits the context
    with pytest.raises(ValueError, match="exceeds the generator's model.max_seq_len=256"):
        long.log_likelihood(["q"], ["a"], mode="concat")
    assert math.isfinite(mix.log_likelihood(["q"], ["a"], mode="none").nats_per_token.item())
