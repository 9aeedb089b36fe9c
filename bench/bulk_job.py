"""Bulk job throughput: ``arrowengine embed`` over a folder of images, in-process vs 1 vs 2 servers.

Makes ``--images`` JPEGs (random crops of tests/data/photos, longest side 256-1024 px,
seed 0), a tiny CLIP (bench/data.make_random_clip, converted) unless ``--model
DIR`` names a converted model, starts two servers as subprocesses (``python -m
flight_server.serve --model bench=DIR --port 0``), then times in this one run:

* the job with the engine in this process (no server; model loaded and warmed first),
* the job through one server,
* the job through both servers (batches shared, results in input order),

each ``--repeat`` times, interleaved; the median is reported.

Prints one table and writes ``bench/results/bulk_job-<hostname>.json``.

    python bench/bulk_job.py [--images 1000] [--batch-rows 32] [--model DIR]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import set_thread_defaults  # noqa: E402

set_thread_defaults()  # before torch loads: the process-wide settings `arrowengine serve` runs with

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from flight_client.job_io import read_output  # noqa: E402
from flight_client.jobs import JobConfig, run_job  # noqa: E402
from flight_client.pool import LocalEmbedder  # noqa: E402
from bench.server_process import ServerProcess  # noqa: E402

PHOTOS = ROOT / "tests" / "data" / "photos"


def make_images(folder: Path, count: int, seed: int = 0) -> int:
    """``count`` JPEG crops of the test photos, longest side 256..1024 px; returns total bytes."""
    rng = np.random.default_rng(seed)
    sources = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in sorted(PHOTOS.iterdir())
               if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    folder.mkdir(parents=True)
    total = 0
    for i in range(count):
        img = sources[i % len(sources)]
        h, w = img.shape[:2]
        ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = img[y:y + ch, x:x + cw]  # (h, w, 3)
        side = int(rng.integers(256, 1025))
        scale = side / max(ch, cw)
        crop = cv2.resize(crop, (max(1, round(cw * scale)), max(1, round(ch * scale))),
                          interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        ok, data = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        (folder / f"img-{i:05d}.jpg").write_bytes(data.tobytes())
        total += len(data)
    return total


def make_model(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from bench.data import make_random_clip

    from convert.pipeline import convert_checkpoint

    source = make_random_clip(folder / "hf", "tiny")
    convert_checkpoint(source, folder / "model", progress=False)
    return folder / "model"


def run(images: Path, out: Path, servers: tuple[str, ...], batch_rows: int, local: object) -> dict:
    """One job; in-process when ``servers`` is empty (``local``: the already loaded, warm model)."""
    config = JobConfig(input=images, output=out, kind="image", model="bench" if servers else None,
                       servers=servers, batch_rows=batch_rows, shard_rows=512, progress=False)
    summary = run_job(config, None if servers else [LocalEmbedder(local, "image")])
    table = read_output(out)
    assert table.num_rows == summary.rows and summary.errors == 0, (summary.rows, summary.errors)
    shutil.rmtree(out)
    return {"rows": summary.rows, "errors": summary.errors, "seconds": round(summary.seconds, 3),
            "rows_per_s": round(summary.rows_per_s, 1), "batches": summary.batches}


def warm_local(model_dir: Path, images: Path) -> object:
    """Load the model in this process and run it once over a few images (as the server's warm-up does)."""
    import engine

    model = engine.load_model(model_dir)
    model.embed_images([p.read_bytes() for p in sorted(images.iterdir())[:64]])
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-rows", type=int, default=32)
    ap.add_argument("--model", type=Path, help="a converted model directory (default: make a tiny CLIP)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per setup; the median is reported")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        image_bytes = make_images(tmp / "images", args.images)
        model_dir = args.model or make_model(tmp)
        local = warm_local(model_dir, tmp / "images")
        servers = [ServerProcess(model_dir), ServerProcess(model_dir)]
        setups = {"in-process": (), "1 server": (servers[0].location,),
                  "2 servers": tuple(s.location for s in servers)}
        runs: dict[str, list[dict]] = {name: [] for name in setups}
        try:
            for _ in range(args.repeat):  # interleaved, so load changes hit every setup alike
                for name, locations in setups.items():
                    runs[name].append(run(tmp / "images", tmp / "out", locations, args.batch_rows, local))
        finally:
            for server in servers:
                server.stop()
        results = {name: {**sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2],
                          "all_seconds": [r["seconds"] for r in rs]} for name, rs in runs.items()}
    print(f"bulk job: {args.images} JPEGs ({image_bytes / 1e6:.1f} MB, 256-1024 px), batch {args.batch_rows}, "
          f"model {args.model or 'tiny CLIP'}, {os.cpu_count()} CPUs")
    print(f"{'run':<12} {'rows':>6} {'seconds':>8} {'rows/s':>8}  batches per endpoint  (median of "
          f"{args.repeat}; load average {os.getloadavg()[0]:.1f})")
    for name, r in results.items():
        print(f"{name:<12} {r['rows']:>6} {r['seconds']:>8.2f} {r['rows_per_s']:>8.1f}  "
              f"{list(r['batches'].values())}  runs: {r['all_seconds']}")
    host = socket.gethostname()
    doc = {"bench": "bulk_job", "host": host, "platform": platform.platform(), "cpus": os.cpu_count(),
           "load_average": os.getloadavg(), "repeat": args.repeat, "images": args.images,
           "image_bytes": image_bytes, "batch_rows": args.batch_rows,
           "model": str(args.model or "tiny CLIP (bench/data.py)"),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results}
    path = ROOT / "bench" / "results" / f"bulk_job-{host}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
