"""Code: docstring -> function retrieval over the Python standard library (DATA.md 5, task B).

Each documented function of the stdlib's own sources (no tests, no site-packages) gives a pair:
the query is the docstring's first paragraph, the document the function's source with the
docstring removed. Files are split between train, val and test, so sibling methods never leak
across splits. The data depend on the interpreter; ``sys.version`` is part of the cache key.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from moesaic.skillnet.data.common import SPLITS, Splits, cached, encode_bytes, split_by_key

__all__ = ["load_doc_code", "extract_functions"]

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib",
              "__pycache__", "encodings", "lib2to3", "turtledemo"}  # fmt: skip


def _stdlib_files(root: Path) -> list[str]:
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in _SKIP_DIRS)
        rel = Path(folder).relative_to(root)
        paths += [(rel / f).as_posix() for f in files if f.endswith(".py") and "test" not in f]
    return sorted(paths)


def extract_functions(source: str) -> list[tuple[str, str]]:
    """(first docstring paragraph, source without the docstring) of every documented function.

    Lines are sliced from ``lineno`` / ``end_lineno`` (``ast.get_source_segment`` per node is
    quadratic, DATA.md 5).
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2:
            continue
        query = " ".join(doc.split("\n\n")[0].split())
        first = node.body[0]
        body = lines[node.lineno - 1 : first.lineno - 1] + lines[first.end_lineno : node.end_lineno]
        indent = len(body[0]) - len(body[0].lstrip())
        out.append((query, "\n".join(line[indent:] for line in body)))
    return out


def load_doc_code(
    n_train: int = 2000,
    n_eval: int = 300,
    query_len: int = 64,
    code_len: int = 128,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> Splits:
    """``text`` uint8 (N, query_len) docstrings, ``item`` uint8 (N, code_len) code bytes,
    ``label`` int64 (N,) = arange(N) (every pair is its own class), ``file`` str (N,) the
    source file relative to the stdlib root."""
    params = dict(
        n_train=n_train, n_eval=n_eval, query_len=query_len, code_len=code_len, seed=seed,
        python=sys.version,
    )  # fmt: skip

    def build() -> Splits:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _stdlib_files(root)
        if not files:
            raise FileNotFoundError(f"dataset 'doc-code' found no .py files under {root}")
        split_of = split_by_key(files, (0.1, 0.1), seed)
        order = np.random.default_rng(seed).permutation(len(files))
        want = {"train": n_train, "val": n_eval, "test": n_eval}
        pairs: dict[str, list[tuple[str, str, str]]] = {s: [] for s in SPLITS}
        for i in order:  # parse files in a seeded order until every split is full
            split = SPLITS[split_of[i]]
            if len(pairs[split]) < want[split]:
                text = (root / files[i]).read_bytes().decode("utf-8", errors="replace")
                found = extract_functions(text)[: want[split] - len(pairs[split])]
                pairs[split] += [(q, c, files[i]) for q, c in found]
            if all(len(pairs[s]) >= want[s] for s in SPLITS):
                break
        return {
            s: {
                "text": encode_bytes([p[0] for p in pairs[s]], query_len),
                "item": encode_bytes([p[1] for p in pairs[s]], code_len),
                "file": np.array([p[2] for p in pairs[s]]),
                "label": np.arange(len(pairs[s]), dtype=np.int64),
            }
            for s in SPLITS
        }

    return cached("doc-code", params, build, data_dir)
