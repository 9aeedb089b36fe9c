"""Weight loading: ArrowEngine's mapped Arrow file vs HuggingFace ``from_pretrained``.

Makes a B/32-geometry CLIP (``CLIPModel(CLIPConfig())``, seed 0; ~151M params,
~600 MB fp32) unless ``--model DIR`` gives a HF CLIP directory, converts it to
Arrow and Parquet, then times in this one warm process (median of ``--repeat``):

* ``load_weights(arrow dir)``  -- validated, zero-copy tensors
* ``load_weights(parquet dir)`` -- decompressed copies
* ``CLIPModel.from_pretrained(hf dir)`` -- HF's own loader (builds the module too)

Prints one table and writes ``bench/results/load-<hostname>.json``.

    python bench/load.py [--model DIR] [--repeat 7]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import set_thread_defaults  # noqa: E402

set_thread_defaults()  # before torch loads: the process-wide settings `arrowengine serve` runs with

import torch  # noqa: E402

from convert.pipeline import convert_checkpoint  # noqa: E402
from engine.weights import load_weights  # noqa: E402


def _time(fn, repeat: int) -> tuple[float, list[float]]:
    fn()  # warm-up (page cache, lazy imports)
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        runs.append((time.perf_counter() - t0) * 1000)
        del out
    return statistics.median(runs), runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF CLIP checkpoint directory (default: make a random B/32)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from transformers import CLIPConfig, CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(args.model) if args.model else Path(tmp) / "hf"
        if not args.model:
            torch.manual_seed(0)
            CLIPModel(CLIPConfig()).save_pretrained(hf_dir)
        arrow = convert_checkpoint(hf_dir, Path(tmp) / "arrow", progress=False)
        parquet = convert_checkpoint(hf_dir, Path(tmp) / "parquet", fmt="parquet", progress=False)
        pq_file = Path(tmp) / "parquet" / "weights.parquet"
        arrow_file = Path(tmp) / "arrow" / "weights.arrow"

        ours, ours_runs = _time(lambda: load_weights(arrow.out_dir), args.repeat)
        pq_ms, pq_runs = _time(lambda: load_weights(parquet.out_dir), max(3, args.repeat // 2))
        hf_ms, hf_runs = _time(lambda: CLIPModel.from_pretrained(hf_dir), max(3, args.repeat // 2))

        sd = load_weights(arrow.out_dir)
        touch_t0 = time.perf_counter()
        checksum = sum(float(t.float().sum()) for t in sd.values() if t.is_floating_point())
        touch_ms = (time.perf_counter() - touch_t0) * 1000

        result = {
            "host": socket.gethostname(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "model": str(args.model or "random CLIPModel(CLIPConfig()) B/32, seed 0"),
            "tensors": arrow.manifest.tensors, "parameters": arrow.manifest.parameters,
            "arrow_bytes": arrow_file.stat().st_size, "parquet_bytes": pq_file.stat().st_size,
            "convert_arrow_s": round(arrow.seconds, 2), "convert_parquet_s": round(parquet.seconds, 2),
            "load_arrow_ms": round(ours, 2), "load_parquet_ms": round(pq_ms, 1),
            "hf_from_pretrained_ms": round(hf_ms, 1), "hf_over_arrow": round(hf_ms / ours, 1),
            "first_touch_all_arrow_ms": round(touch_ms, 1), "checksum": checksum,
            "runs_ms": {"arrow": [round(r, 2) for r in ours_runs],
                        "parquet": [round(r, 1) for r in pq_runs], "hf": [round(r, 1) for r in hf_runs]},
        }
    rows = [
        ("load_weights (arrow, mapped)", f"{ours:.2f}", f"{result['arrow_bytes'] / 2**20:.0f}", "1.0"),
        ("load_weights (parquet, zstd)", f"{pq_ms:.1f}", f"{result['parquet_bytes'] / 2**20:.0f}",
         f"{pq_ms / ours:.0f}"),
        ("CLIPModel.from_pretrained", f"{hf_ms:.1f}", "-", f"{hf_ms / ours:.0f}"),
    ]
    print(f"{'loader':32} {'median ms':>10} {'file MiB':>9} {'x arrow':>8}")
    for r in rows:
        print(f"{r[0]:32} {r[1]:>10} {r[2]:>9} {r[3]:>8}")
    print(f"({result['tensors']} tensors, {result['parameters']:,} params; first touch of all arrow "
          f"tensors {touch_ms:.0f} ms; convert {arrow.seconds:.1f} s arrow / {parquet.seconds:.1f} s parquet)")
    out = Path(__file__).parent / "results" / f"load-{socket.gethostname()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
