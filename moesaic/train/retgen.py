"""Retrieval-grounded question answering on the Python docs: the ``RetGenTask`` the one trainer
runs for a config with a ``retgen`` section (``moesaic retgen train``).

The model is a ``DocumentMixture`` (moesaic/models/retgen.py): an ``MoELM`` generator over the
top-k passages of a ``LearnedRetriever`` (moesaic/data/retrieval.py), mixed by their posterior
(RetGen, Zhang et al. 2021, §3). The loss is the negative marginal log-likelihood of the answer
tokens, ``-log sum_k p(z_k|x) p(y|x, z_k)`` per answer token: its gradient trains the generator
and, through the prior, the retriever's scores (jointly, unless ``retgen.joint=false``). The
baselines train through the same task: ``retgen.mode="concat"`` (the k passages in one prompt)
and ``retgen.mode="none"`` (the question alone).

The run directory holds, beside the trainer's files, the BM25 index (``index/``) and the
question splits (``qa.json``) it was built with: a resumed run, ``moesaic retgen ask`` and
``moesaic retgen eval`` read those, never the docs again.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moesaic.data import build_tokenizer, tokenizer_from_json
from moesaic.data.pydocs_qa import QAPair, load_pydocs_qa
from moesaic.data.retrieval import BM25Index, LearnedRetriever
from moesaic.models.lm import LMConfig, MoELM
from moesaic.models.registry import model_config
from moesaic.models.retgen import MODES, DocumentMixture, sequence_length
from moesaic.train.checkpoint import (
    list_checkpoints,
    load_newest_fitting,
    write_atomic,
)
from moesaic.train.classify import ExampleSampler
from moesaic.train.config import (
    ConfigError,
    DataConfig,
    OptimConfig,
    RetGenConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
)
from moesaic.train.data import TOKENIZER_FILE
from moesaic.train.tasks import Task

__all__ = [
    "INDEX_DIR",
    "QA_FILE",
    "QABatch",
    "QASampler",
    "RetGenTask",
    "LoadedRetGen",
    "retgen_defaults",
    "required_length",
    "load_retgen",
    "answer_metrics",
]

INDEX_DIR = "index"
QA_FILE = "qa.json"


def required_length(r: RetGenConfig, tokenizer: Any) -> int:
    """The generator context a retgen run needs: the longest of its modes' sequences, so that
    one run can be evaluated with and without retrieval and with concatenated passages."""
    caps = dict(
        k=r.k,
        doc_tokens=r.doc_tokens,
        question_tokens=r.question_tokens,
        answer_tokens=r.answer_tokens,
        tokenizer=tokenizer,
    )
    return max(sequence_length(mode, **caps) for mode in MODES)


def retgen_defaults() -> RunConfig:
    """``moesaic retgen train``'s run: ``lm-moe-tiny``'s generator with the context the
    concatenation baseline needs, the 4 best of BM25's 16 passages, 8 questions per step, 600
    steps (a few minutes on 2 CPU cores)."""
    from moesaic.data import ByteTokenizer

    r = RetGenConfig()
    model = model_config("lm-moe-tiny", max_seq_len=required_length(r, ByteTokenizer()))
    return RunConfig(
        recipe="retgen-pydocs",
        model=model,
        # data.seq_len is not read (the retgen caps set the lengths): small, so it never
        # conflicts with a shorter model.max_seq_len
        data=DataConfig(corpus="pydocs", seq_len=64, batch_size=8, eval_batches=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.01),
        train=TrainConfig(
            steps=600, eval_every=100, checkpoint_every=200, log_every=10, sample_tokens=0
        ),
        retgen=r,
    )


@dataclasses.dataclass
class QABatch:
    """Questions ``x`` (B, S) as token ids (right-padded, ``mask`` True on real ones), their
    kind ids ``domain`` (B,) (the routing log's labels), and the pairs' text: ``questions``,
    ``answers`` and the ``gold`` passage id holding each answer."""

    x: torch.Tensor
    mask: torch.Tensor
    domain: torch.Tensor
    questions: list[str]
    answers: list[str]
    gold: list[int]


class QASampler(ExampleSampler):
    """``ExampleSampler``'s seeded epochs and checkpointed cursor over question-answer pairs."""

    def __init__(self, pairs, encoded, batch_size, seed, rank=0, world_size=1) -> None:
        super().__init__(encoded, batch_size, seed, rank, world_size)
        self.pairs = pairs

    def next_batch(self) -> QABatch:
        rows = self.next_rows()
        per_rank = self.batch_size // self.world_size
        return _batch(
            self.pairs, (self.ids, self.mask, self.y), rows[self.rank * per_rank :][:per_rank]
        )


def _batch(pairs: list[QAPair], encoded: tuple, rows: list[int]) -> QABatch:
    ids, mask, kinds = encoded
    idx = torch.tensor(rows, dtype=torch.long)
    chosen = [pairs[i] for i in rows]
    return QABatch(
        ids[idx],
        mask[idx],
        kinds[idx],
        [p.question for p in chosen],
        [p.answer for p in chosen],
        [p.passage_id for p in chosen],
    )


def _pairs_to_json(splits: dict[str, list[QAPair]]) -> str:
    rows = {name: [dataclasses.astuple(p) for p in pairs] for name, pairs in splits.items()}
    return json.dumps({"fields": [f.name for f in dataclasses.fields(QAPair)], "splits": rows})


def _pairs_from_json(text: str) -> dict[str, list[QAPair]]:
    data = json.loads(text)
    return {name: [QAPair(*row) for row in rows] for name, rows in data["splits"].items()}


def _say(message: str) -> None:
    print(f"moesaic: {message}", file=sys.stderr, flush=True)


class RetGenTask(Task):
    """Joint retrieval and generation training on ``cfg.retgen`` (see the module docstring)."""

    unit = "questions"

    def __init__(self, cfg: RunConfig) -> None:
        if cfg.retgen is None:
            raise ValueError("RetGenTask needs a run config with a retgen section")
        if cfg.finetune is not None or cfg.distill is not None or cfg.vision is not None:
            raise ConfigError(
                "retgen: a retrieval run takes no finetune, distill or vision section"
            )
        if cfg.parallel.expert != 1:
            raise ConfigError(
                f"parallel.expert={cfg.parallel.expert}: retgen runs train on one process or "
                f"data-parallel (parallel.expert=1)"
            )
        self.cfg, self.r = cfg, cfg.retgen

    def prepare(self, run_dir: Path, is_main: bool) -> None:
        r = self.r
        self.started = bool(list_checkpoints(run_dir / "checkpoints"))
        index_dir, qa_file = run_dir / INDEX_DIR, run_dir / QA_FILE
        if (index_dir / "passages.json").exists() and qa_file.exists():
            self.index = BM25Index.load(index_dir)  # a resumed run: the data it started with
            self.splits = _pairs_from_json(qa_file.read_text())
        else:
            caps = {
                "train": r.train_questions,
                "val": r.val_questions,
                "test": r.test_questions,
            }
            try:
                qa = load_pydocs_qa(
                    sources=r.source_prefixes,
                    passage_bytes=r.passage_bytes,
                    kinds=r.question_kinds,
                    answer_bytes=r.answer_tokens,
                    caps=caps,
                )
            except ValueError as err:
                raise ConfigError(f"retgen.sources={r.sources!r}: {err}") from None
            self.index, self.splits = BM25Index(qa.passages), qa.splits
            if is_main:
                self.index.save(index_dir)
                write_atomic(qa_file, _pairs_to_json(self.splits))
        for split in ("train", "val"):
            if not self.splits[split]:
                raise ConfigError(
                    f"retgen.sources={r.sources!r} gives no {split} questions: take more files"
                )
        self.tokenizer = self._tokenizer(run_dir, is_main)
        needed = required_length(r, self.tokenizer)
        if self.cfg.model.max_seq_len < needed:
            raise ConfigError(
                f"model.max_seq_len={self.cfg.model.max_seq_len} must be >= {needed}: "
                f"retgen.k={r.k} passages of retgen.doc_tokens={r.doc_tokens} concatenated, "
                f"a question of {r.question_tokens} and an answer of {r.answer_tokens} tokens"
            )
        self.labels = r.question_kinds
        kind_ids = {kind: i for i, kind in enumerate(self.labels)}
        self.encoded = {
            split: self._encode(pairs, kind_ids) for split, pairs in self.splits.items()
        }
        self.units_per_step = self.cfg.data.batch_size

    def _tokenizer(self, run_dir: Path, is_main: bool):
        saved = run_dir / TOKENIZER_FILE
        if self.started and saved.exists():
            return tokenizer_from_json(saved.read_text())
        if self.r.init:
            self._check_init()
            source = Path(self.r.init) / TOKENIZER_FILE
            if is_main:
                shutil.copyfile(source, saved)
            return tokenizer_from_json(source.read_text())
        d = self.cfg.data
        texts = (p.text for p in self.index.passages)
        tokenizer = (
            build_tokenizer("byte")
            if d.tokenizer == "byte"
            else build_tokenizer("bpe", texts, d.bpe_vocab_size)
        )
        if is_main:
            write_atomic(saved, tokenizer.to_json())
        return tokenizer

    def _check_init(self) -> None:
        """The generator's model section must be the initial run's (its context may grow)."""
        from moesaic.train.run import read_run_config

        init = self.r.init
        try:
            data = read_run_config(Path(init))
        except FileNotFoundError as err:
            raise ConfigError(f"retgen.init={init!r}: {err}") from None
        if data.get("retgen") or data.get("finetune") or data.get("vision"):
            raise ConfigError(f"retgen.init={init!r} must be a language-model run")
        saved = config_from_dict(LMConfig, data["model"])
        mine = self.cfg.model
        grown = mine.max_seq_len != saved.max_seq_len
        if dataclasses.replace(mine, max_seq_len=saved.max_seq_len) != saved or (
            grown and mine.positions != "rope"
        ):
            raise ConfigError(
                f"retgen.init={init!r}: this run's model section differs from that run's (only "
                f"model.max_seq_len may change, and only with rotary positions): take it from "
                f"that run's config"
            )

    def _encode(self, pairs: list[QAPair], kind_ids: dict[str, int]) -> tuple[torch.Tensor, ...]:
        width = max([1] + [len(self.tokenizer.encode(p.question)) for p in pairs])
        width = min(width, self.r.question_tokens)
        ids = torch.zeros(len(pairs), width, dtype=torch.long)
        mask = torch.zeros(len(pairs), width, dtype=torch.bool)
        for i, p in enumerate(pairs):
            row = torch.as_tensor(self.tokenizer.encode(p.question)[:width], dtype=torch.long)
            ids[i, : len(row)], mask[i, : len(row)] = row, True
        kinds = torch.tensor([kind_ids.get(p.kind, 0) for p in pairs], dtype=torch.long)
        return ids, mask, kinds

    def build_model(self, expert_group: object | None) -> nn.Module:
        r = self.r
        lm = MoELM(dataclasses.replace(self.cfg.model, vocab_size=self.tokenizer.vocab_size))
        if r.init and not self.started:
            self._load_init(lm)
        retriever = LearnedRetriever(
            self.index, candidates=r.candidates, dim=r.embed_dim, bm25_scale=r.bm25_scale
        )
        if not r.joint:
            retriever.requires_grad_(False)
        return DocumentMixture(
            lm,
            retriever,
            r.k,
            tokenizer=self.tokenizer,
            doc_tokens=r.doc_tokens,
            question_tokens=r.question_tokens,
            answer_tokens=r.answer_tokens,
        )

    def _load_init(self, lm: MoELM) -> None:
        if load_newest_fitting(lm, Path(self.r.init) / "checkpoints", _say) is None:
            raise ConfigError(f"retgen.init={self.r.init!r} holds no checkpoint yet")

    def sampler(self, rank: int, world_size: int) -> QASampler:
        d = self.cfg.data
        pairs, encoded = self.splits["train"], self.encoded["train"]
        return QASampler(pairs, encoded, d.batch_size, d.seed, rank, world_size)

    def batches(self, split: str, limit: int | None = None) -> list[QABatch]:
        """Split ``split`` in order, in batches of ``data.batch_size`` (the first ``limit``)."""
        pairs, B = self.splits[split], self.cfg.data.batch_size
        out = [
            _batch(pairs, self.encoded[split], list(range(i, min(i + B, len(pairs)))))
            for i in range(0, len(pairs), B)
        ]
        return out[:limit]

    def eval_batches(self) -> list[QABatch]:
        return self.batches("val", self.cfg.data.eval_batches)

    def loss(self, model: nn.Module, batch: QABatch, step: int) -> tuple[torch.Tensor, dict]:
        out = model.log_likelihood(batch.questions, batch.answers, mode=self.r.mode)
        logs = {"nll": out.nats_per_token.detach()}
        if self.r.mode != "none":
            logs["recall"] = torch.tensor(_recall(out.retrieved.passage_ids, batch.gold))
        return out.nats_per_token, logs

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list) -> dict[str, float]:
        was_training = model.training
        model.eval()
        nll = tokens = 0.0
        hits: list[float] = []
        for b in batches:
            out = model.log_likelihood(b.questions, b.answers, mode=self.r.mode)
            nll -= out.log_marginal_B.sum().item()
            tokens += out.num_tokens_B.sum().item()
            hits.append(_recall(out.retrieved.passage_ids, b.gold) * len(b.gold))
        model.train(was_training)
        metrics = {"val_loss": nll / tokens}
        if self.r.mode != "none":
            metrics["val_recall"] = sum(hits) / sum(len(b.gold) for b in batches)
        return metrics


def _recall(retrieved: list[list[int]], gold: list[int]) -> float:
    """The share of questions whose answer's passage is among their retrieved documents."""
    return sum(g in row for row, g in zip(retrieved, gold)) / len(gold)


def answer_metrics(
    model: DocumentMixture,
    pairs: Sequence[QAPair],
    mode: str,
    batch_size: int = 16,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Held-out answers under ``mode``: ``nats_per_token`` (the answers' negative
    log-likelihood per token, end mark included), ``exact_match`` (greedy answers equal to the
    reference after stripping spaces), ``recall`` (answer passage among the k retrieved; not
    for "none"), ``questions``, and the same per question kind in ``by_kind``."""
    rows = []  # (kind, nll, tokens, exact, found) per question
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(pairs), batch_size):
                chunk = list(pairs[i : i + batch_size])
                qs, ans = [p.question for p in chunk], [p.answer for p in chunk]
                out = model.log_likelihood(qs, ans, mode=mode)
                answers = model.generate(qs, max_tokens, mode=mode)
                for b, (p, g) in enumerate(zip(chunk, answers)):
                    rows.append(
                        (
                            p.kind,
                            -out.log_marginal_B[b].item(),
                            out.num_tokens_B[b].item(),
                            g.text.strip() == p.answer.strip(),
                            p.passage_id in out.retrieved.passage_ids[b],
                        )
                    )
    finally:
        model.train(was_training)
    metrics = _summary(rows, mode)
    kinds = sorted({row[0] for row in rows})
    metrics["by_kind"] = {k: _summary([r for r in rows if r[0] == k], mode) for k in kinds}
    return metrics


def _summary(rows: list[tuple], mode: str) -> dict[str, float]:
    n = len(rows)
    metrics = {
        "questions": n,
        "nats_per_token": sum(r[1] for r in rows) / sum(r[2] for r in rows),
        "exact_match": sum(r[3] for r in rows) / n,
    }
    if mode != "none":
        metrics["recall"] = sum(r[4] for r in rows) / n
    return metrics


@dataclasses.dataclass
class LoadedRetGen:
    """A retgen run opened for inference: its config, model (in eval mode), question splits and
    the step of the checkpoint loaded."""

    cfg: RunConfig
    model: DocumentMixture
    splits: dict[str, list[QAPair]]
    step: int


def load_retgen(run_dir: str | Path) -> LoadedRetGen:
    """Open a retgen run: its config, tokenizer, index and questions, and the newest checkpoint
    that verifies."""
    from moesaic.train.run import read_run_config

    run_dir = Path(run_dir)
    cfg = config_from_dict(RunConfig, read_run_config(run_dir))
    if cfg.retgen is None:
        raise ConfigError(f"{run_dir} is not a retgen run (its config has no retgen section)")
    for needed in (TOKENIZER_FILE, QA_FILE, f"{INDEX_DIR}/passages.json"):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(f"{run_dir / needed} is missing: is {run_dir} a retgen run?")
    if not list_checkpoints(run_dir / "checkpoints"):
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no checkpoint yet")
    task = RetGenTask(cfg)
    task.prepare(run_dir, is_main=False)  # reads the run's own index, questions and tokenizer
    model = task.build_model(None)
    state = load_newest_fitting(model, run_dir / "checkpoints", _say)
    if state is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no usable checkpoint")
    model.eval()
    return LoadedRetGen(cfg, model, task.splits, int(state["step"]))
