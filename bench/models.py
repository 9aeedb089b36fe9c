"""SigLIP, ModernBERT, Qwen3-Embedding and EmbeddingGemma: ArrowEngine vs HuggingFace / sentence-transformers in one
run: ``python -m bench.models`` (or ``python bench/models.py``).

Random-weight checkpoints at the real full geometries (``bench/models_build.py``, built once and cached in
``bench/.cache/models``, ~2 min) with stand-in tokenizers and real English texts (``bench/models_text.py``); real
photographs from JPEG bytes (``bench/data.py``'s image set). Every system runs in its own process
(``bench/models_worker.py``): one warm-up pass over the inputs, then ``--passes`` timed passes, best kept.

    siglip                 HF SiglipModel + AutoProcessor (get_image_features) vs ours fp32 / bf16 / int8, batch 32
    modernbert qwen3 gemma SentenceTransformer(folder).encode(texts, batch_size=32) vs ours fp32 / bf16 / int8
                           (encode_text of all the texts; the engine groups them by length)

Goals: images fp32 >= 1.2x HF, texts fp32 >= 1.5x sentence-transformers, the best CPU mode whose embeddings keep a
min cosine >= 0.99 to our fp32 >= 3x. Writes ``bench/results/models-<machine>.json``, ``.md`` and, with matplotlib,
``models-<machine>-ratios.png``.

    python -m bench.models                    # ~12-15 min on 2 cores (after the one-time build)
    python -m bench.models --models siglip,gemma --n-texts 64 --passes 1
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # `python bench/models.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import data, models_build, models_report, models_text  # noqa: E402

log = logging.getLogger("bench.models")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("siglip", "modernbert", "qwen3", "gemma")
PRECISIONS = ("fp32", "bf16", "int8")


def cpu_info() -> dict:
    """The CPU's name (lscpu) and the instruction sets the precisions depend on (/proc/cpuinfo)."""
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), name)
    except (OSError, subprocess.SubprocessError):
        pass
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    want = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"model_name": name, "cores": os.cpu_count(), **{f: f in flags for f in want}}


def run_worker(tmp: Path, label: str, timeout: float, failures: list[str], **args) -> dict | None:
    path = tmp / f"{label.replace('/', '-').replace(' ', '-')}.json"
    path.write_text(json.dumps(args))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="true")
    log.info("%-18s ...", label)
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.models_worker", str(path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        failures.append(f"{label}: timed out after {timeout:.0f} s")
        log.error("%s timed out", label)
        return None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            res = json.loads(line[len("BENCH_RESULT "):])
            res["wall_s"] = time.time() - t0
            log.info("%-18s done in %.0f s: %s", label, res["wall_s"], ", ".join(
                f"{p} {res[p]['per_s']:.2f}/s" for p in ("fp32", *PRECISIONS[1:]) if p in res))
            return res
    tail = proc.stderr.strip().splitlines()[-15:]
    failures.append(f"{label}: exit {proc.returncode}: {tail[-1] if tail else ''}")
    log.error("%s failed (exit %s):\n%s", label, proc.returncode, "\n".join(tail))
    return None


def cosines(ref_path: Path, other_path: Path) -> dict | None:
    import numpy as np

    if not (ref_path.exists() and other_path.exists()):
        return None
    a, b = np.load(ref_path), np.load(other_path)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    c = (a * b).sum(axis=1)
    return {"min": float(c.min()), "mean": float(c.mean()), "n": len(c)}


def merge_rounds(runs: list[dict]) -> dict | None:
    """One system's figures over ``--rounds`` processes: per precision the round with the highest rate (a shared
    machine only ever slows a run down), every round's rate kept in ``per_round``."""
    if not runs:
        return None
    out = dict(runs[0])
    for p in PRECISIONS:
        rounds = [x[p] for x in runs if p in x]
        if rounds:
            out[p] = dict(max(rounds, key=lambda f: f["per_s"]), per_round=[f["per_s"] for f in rounds])
    if len(runs) > 1:
        out["rounds"] = len(runs)
        out["probe_start_gflops"] = min(x.get("probe_start_gflops", float("nan")) for x in runs)
        out["probe_end_gflops"] = min(x.get("probe_end_gflops", float("nan")) for x in runs)
    return out


def _token_stats(texts: list[str], b: models_build.Built) -> dict:
    count = models_text.token_counter(models_build.tokenizer_json(b), models_build.prompt_text(b))
    n = [count(t) for t in texts]
    words = sum(len(t.split()) for t in texts)
    plain = models_text.token_counter(models_build.tokenizer_json(b))
    return {"min": min(n), "mean": round(statistics.mean(n), 1), "max": max(n), "total": sum(n),
            "tokens_per_word_no_prompt": round(sum(plain(t) for t in texts) / words, 3)}


def run(args: argparse.Namespace) -> dict:
    t_start = time.time()
    names = [m for m in args.models.split(",") if m]
    if unknown := set(names) - set(MODELS):
        raise SystemExit(f"--models: unknown {sorted(unknown)}; choose from {', '.join(MODELS)}")
    built = {m: models_build.build(m) for m in names}
    r: dict = {"machine": args.machine or socket.gethostname(),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_info(),
               "versions": _versions(), "git": _git(), "passes": args.passes, "rounds": args.rounds,
               "models": {}, "failures": [],
               "build_s": {m: round(b.build_s, 1) for m, b in built.items()}}
    texts: list[str] = []
    if set(names) - {"siglip"}:
        counter = models_text.token_counter(models_build.tokenizer_json(models_build.build("modernbert")))
        texts = models_text.make_texts(max(args.n_texts, args.n_texts_qwen3), counter)
    with tempfile.TemporaryDirectory(prefix="arrowengine-models-") as tmp_name:
        tmp = Path(tmp_name)
        r["matmul_start"] = run_worker(tmp, "matmul start", 120, r["failures"], task="matmul")
        for name in names:
            b = built[name]
            emb = str(tmp / f"{name}-{{precision}}.npy")
            common = dict(source=str(b.source), arrow=str(b.arrow), passes=args.passes)
            if name == "siglip":
                folder = data.make_image_set(max(args.n_images * 3 // 2, 48))
                jpegs = [p for p in data.image_files(folder) if data.is_jpeg(p)][: args.n_images]
                inputs = {"task": "image", "images": [str(p) for p in jpegs], "batch": args.batch}
                info = {"kind": "image", "inputs": data.describe_images(jpegs), "batch": args.batch}
                ref_sys = "hf"
            else:
                n = args.n_texts_qwen3 if name == "qwen3" else args.n_texts
                inputs = {"task": "text", "texts": texts[:n], "prompt_name": models_build.PROMPT_NAME[name]}
                info = {"kind": "text", "n": n, "prompt_name": models_build.PROMPT_NAME[name],
                        "tokens": _token_stats(texts[:n], b), "st_batch_size": 32}
                ref_sys = "st"
            ref_emb = emb.replace("{precision}", "ref-{precision}")
            sides = {ref_sys: dict(system=ref_sys, precisions=["fp32"], emb=ref_emb),
                     "ours": dict(system="ours", precisions=list(PRECISIONS), emb=emb)}
            runs: dict[str, list[dict]] = {ref_sys: [], "ours": []}
            for rnd in range(args.rounds):  # alternating order; best of the rounds kept for both sides
                for side in (ref_sys, "ours") if rnd % 2 == 0 else ("ours", ref_sys):
                    res = run_worker(tmp, f"{name} {side} r{rnd + 1}", args.timeout, r["failures"], **sides[side],
                                     **common, **inputs)
                    if res:
                        runs[side].append(res)
            hf, ours = merge_rounds(runs[ref_sys]), merge_rounds(runs["ours"])
            acc = {"fp32_vs_ref": cosines(tmp / f"{name}-ref-fp32.npy", tmp / f"{name}-fp32.npy")}
            for p in PRECISIONS[1:]:
                acc[f"{p}_vs_fp32"] = cosines(tmp / f"{name}-fp32.npy", tmp / f"{name}-{p}.npy")
            r["models"][name] = {**info, "ref_system": ref_sys, "ref": hf, "ours": ours, "accuracy": acc}
        r["matmul_end"] = run_worker(tmp, "matmul end", 120, r["failures"], task="matmul")
    r["wall_s"] = round(time.time() - t_start, 1)
    return r


def _git() -> dict:
    """The commit measured, and the engine / convert files that differed from it (another engineer may be editing
    the same tree)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": git("status", "--porcelain", "--", "engine", "convert").splitlines()}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "sentence-transformers", "tokenizers", "pillow", "opencv-python-headless"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--n-images", type=int, default=64, help="SigLIP: JPEG photographs (default 64)")
    ap.add_argument("--batch", type=int, default=32, help="SigLIP: images per batch on both sides (default 32)")
    ap.add_argument("--n-texts", type=int, default=128, help="texts for ModernBERT and EmbeddingGemma (default 128)")
    ap.add_argument("--n-texts-qwen3", type=int, default=24, help="texts for Qwen3-Embedding-0.6B (default 24, "
                    "the first of the same list: its 28 layers of 1024 cost ~4x the others per token)")
    ap.add_argument("--passes", type=int, default=2, help="timed passes after the warm-up pass (default 2)")
    ap.add_argument("--rounds", type=int, default=1, help="measure each model's pair of systems N times, in "
                    "alternating order, and keep the best rate of each (a shared machine; default 1)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per worker process (default 900)")
    ap.add_argument("--machine", help="results name (default: hostname)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default bench/results)")
    ap.add_argument("--rewrite", metavar="JSON", help="measure nothing: rewrite the table (and chart) of a results "
                                                      "JSON into --out, e.g. after installing matplotlib")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    r = json.loads(Path(args.rewrite).read_text()) if args.rewrite else run(args)
    js, md = models_report.write(r, Path(args.out))
    sys.stdout.write(md.read_text())
    log.info("wrote %s, %s (%s s in all)", js, md, r["wall_s"])
    if r["failures"]:
        log.error("some measurements failed: %s", "; ".join(r["failures"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
