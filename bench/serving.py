"""Serving throughput: Arrow Flight end to end vs the in-process engine, and many small
clients vs one big one, on the same JPEGs in one run.

Makes a random-weight CLIP (``--geometry tiny`` for a quick run, ``b32`` for ViT-B/32, ``b16`` for a GPU),
converts it, re-encodes ``--images`` JPEGs of 256-1024 px from tests/data/photos, starts
``arrowengine serve`` (``python -m flight_server.serve``) as a subprocess, and measures
(images/s, best of ``--repeat``):

(a) in-process ``model.embed_images(all)`` vs one Flight client streaming batches of 32
    (writer thread ahead of the reader), the two alternating, goal >= 90 %;
(b) 8 concurrent clients each sending 4 images and waiting for their embeddings before
    the next 4, vs 1 client doing the same with 32 at a time, goal >= 80 %.

Prints one table and writes ``bench/results/serving-<hostname>.json``.

    python bench/serving.py [--geometry tiny|b32|b16] [--images 96] [--repeat 3]
    python bench/serving.py --device cuda --precision bf16 --geometry b16 --images 2048 --rows 128
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import set_thread_defaults  # noqa: E402

set_thread_defaults()  # before torch loads: as `arrowengine serve`, so the in-process baseline runs the same way

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.flight as flight  # noqa: E402

from bench.server_process import ServerProcess  # noqa: E402

PHOTOS = ROOT / "tests" / "data" / "photos"
def make_model(out: Path, geometry: str) -> Path:
    """A random-weight HF CLIPModel (seed 0) converted to an ArrowEngine model directory."""
    from bench.data import make_random_clip
    from convert.pipeline import convert_checkpoint

    convert_checkpoint(make_random_clip(out / "hf", geometry), out / "model", progress=False)
    return out / "model"


def make_images(count: int) -> list[bytes]:
    """``count`` JPEGs (quality 90) cut from the test photos, long side 256..1024 px."""
    photos = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in sorted(PHOTOS.iterdir())
              if p.suffix in (".png", ".jpg")]
    rng = np.random.default_rng(0)
    cuts = [(i % len(photos), rng.integers(0, 1 << 30, 2), int(rng.integers(256, 1025))) for i in range(count)]

    def cut(spec) -> bytes:
        k, (ry, rx), side = spec
        pic = photos[k]
        h, w = pic.shape[:2]
        crop = pic[ry % max(1, h // 4):, rx % max(1, w // 4):]
        scale = side / max(crop.shape[:2])
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        return cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # OpenCV releases the GIL
        return list(pool.map(cut, cuts))


def command() -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps({"model": "clip", "input": "image"}).encode())


def stream(port: int, images: pa.Array, rows: int) -> np.ndarray:
    """One client, one exchange: a writer thread streams ``rows``-image batches; we read results."""
    with flight.connect(f"grpc://127.0.0.1:{port}") as client:
        writer, reader = client.do_exchange(command())
        batches = [pa.record_batch({"image": images.slice(s, rows)}) for s in range(0, len(images), rows)]

        def write() -> None:
            writer.begin(batches[0].schema)
            for batch in batches:
                writer.write_batch(batch)
            writer.done_writing()

        t = threading.Thread(target=write)
        t.start()
        out = [chunk.data.column("embedding").values.to_numpy() for chunk in reader]
        t.join()
        writer.close()
    return np.concatenate(out).reshape(len(images), -1)


def lockstep(port: int, images: pa.Array, rows: int) -> np.ndarray:
    """One client: send ``rows`` images, wait for their embeddings, send the next ``rows``."""
    out = []
    with flight.connect(f"grpc://127.0.0.1:{port}") as client:
        writer, reader = client.do_exchange(command())
        writer.begin(pa.schema([("image", pa.binary())]))
        for s in range(0, len(images), rows):
            writer.write_batch(pa.record_batch({"image": images.slice(s, rows)}))
            out.append(reader.read_chunk().data.column("embedding").values.to_numpy())
        writer.done_writing()
        writer.close()
    return np.concatenate(out).reshape(len(images), -1)


def clients(port: int, images: pa.Array, n: int, rows: int) -> np.ndarray:
    """``n`` concurrent lockstep clients, each with an equal share of the images."""
    share = len(images) // n
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = lockstep(port, images.slice(i * share, share), rows)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.concatenate(results)


def best_rate(fn, count: int, repeat: int) -> tuple[float, np.ndarray]:
    """Best images/s over ``repeat`` timed runs (after one untimed run), and the last output."""
    out = fn()
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        rates.append(count / (time.perf_counter() - t0))
    return max(rates), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", choices=["b32", "b16", "tiny"], default="tiny")
    ap.add_argument("--images", type=int, default=None, help="default: 128 (tiny) or 64 (b32, b16)")
    ap.add_argument("--model", type=Path, help="a converted CLIP directory (default: make a random one)")
    ap.add_argument("--rows", type=int, default=32, help="images per Flight batch the streaming client sends")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:n], for the server and the in-process engine")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-wait-ms", type=float, default=50.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    count = args.images or (128 if args.geometry == "tiny" else 64)
    count -= count % args.rows
    import engine

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_model(Path(tmp), args.geometry)
        images = pa.array(make_images(count), pa.binary())
        model = engine.load_model(model_dir, device=args.device, precision=args.precision)
        server = ServerProcess(model_dir, "clip", ("--batch-wait-ms", str(args.batch_wait_ms),
                                                   "--max-concurrent-exchanges", "16", "--device", args.device,
                                                   "--precision", args.precision))
        port = server.port
        try:
            # (a) alternates in-process and Flight runs, so both see the machine's slow and fast moments
            def in_process(m=model) -> np.ndarray:
                return m.embed_images(images).embeddings

            def via_server() -> np.ndarray:
                return stream(port, images, args.rows)

            local, via_flight = in_process(), via_server()  # untimed first runs
            local_rate = flight_rate = 0.0
            for _ in range(args.repeat):
                for fn in (in_process, via_server):
                    t0 = time.perf_counter()
                    out = fn()
                    rate = count / (time.perf_counter() - t0)
                    if fn is in_process:
                        local, local_rate = out, max(local_rate, rate)
                    else:
                        via_flight, flight_rate = out, max(flight_rate, rate)
            model.image_processor.close()
            del model
            one_rate, one = best_rate(lambda: lockstep(port, images, 32), count, args.repeat)
            many_rate, many = best_rate(lambda: clients(port, images, 8, 4), count, args.repeat)
        finally:
            server.stop()
    diff = max(float(np.abs(x - local).max()) for x in (via_flight, one, many))
    rows = [("in-process engine, embed_images(all)", local_rate, None),
            (f"Flight, 1 client streaming {args.rows}/batch", flight_rate, flight_rate / local_rate),
            ("Flight, 1 client 32 at a time (lockstep)", one_rate, None),
            ("Flight, 8 clients 4 at a time (lockstep)", many_rate, many_rate / one_rate)]
    print(f"\nCLIP {args.geometry} {args.precision} on {args.device}, {count} JPEGs 256-1024 px, "
          f"{os.cpu_count()} CPUs, best of {args.repeat}")
    print(f"{'case':44s} {'img/s':>8s} {'ratio':>7s}")
    for name, rate, ratio in rows:
        print(f"{name:44s} {rate:8.1f} {'' if ratio is None else f'{ratio:6.1%}':>7s}")
    print(f"(a) Flight / in-process = {flight_rate / local_rate:.1%} (goal >= 90%)")
    print(f"(b) 8x4 / 1x32          = {many_rate / one_rate:.1%} (goal >= 80%)")
    print(f"max |embedding - in-process| over all Flight runs: {diff:.2e}")
    result = {
        "host": socket.gethostname(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "geometry": str(args.model) if args.model else args.geometry, "device": args.device, "precision": args.precision, "rows": args.rows,
        "images": count, "repeat": args.repeat, "batch_wait_ms": args.batch_wait_ms,
        "images_per_s": {"in_process": local_rate, "flight_stream": flight_rate,
                         "flight_1_client_32": one_rate, "flight_8_clients_4": many_rate},
        "flight_vs_in_process": flight_rate / local_rate, "8x4_vs_1x32": many_rate / one_rate,
        "max_abs_diff_vs_in_process": diff,
    }
    out = Path(__file__).parent / "results" / f"serving-{socket.gethostname()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
