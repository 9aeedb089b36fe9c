"""Why engine.layers keeps cuDNN attention off on CUDA: our towers with and without it, same run.

    python bench/gpu_attention.py [--model DIR] [--precision fp16]   # default: bench's cached B/16 model

Times CLIP text on mixed-length captions (every length bucket is a new attention shape) and the vision
tower at batch 256 and batch 1, once with engine.layers.CUDA_ATTENTION_BACKENDS (flash, memory-efficient,
math) and once with every backend torch has (cuDNN included, torch's own choice). Prints a table and
writes bench/results/gpu_attention.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

import engine  # noqa: E402
from engine import layers  # noqa: E402

ROOT = Path(__file__).resolve().parent


def timed(fn, min_s: float = 1.0) -> float:
    """Seconds per call: after one warm-up, as many calls as fit in ``min_s`` (at least 3)."""
    fn()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / ".cache" / "clip-b16-seed0" / "arrow"))
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu_attention.json"))
    args = ap.parse_args()
    model = engine.load_model(args.model, device="cuda", precision=args.precision)
    words = "a photo of the red bus parked near an old stone bridge over a quiet river at dusk".split()
    captions = [" ".join(words[: 1 + (i * 7) % len(words)] * (1 + i % 4)) for i in range(512)]
    pixels = torch.randn(256, 3, 224, 224, device="cuda", dtype=model._compute_dtype)
    ours = list(layers.CUDA_ATTENTION_BACKENDS)
    every = [SDPBackend.CUDNN_ATTENTION, *ours]
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "precision": args.precision}
    for name, backends in (("ours", ours), ("torch default (cuDNN allowed)", every), ("ours again", ours)):
        layers.CUDA_ATTENTION_BACKENDS = backends
        with torch.inference_mode():
            first = time.perf_counter()
            model.encode_text(captions[:64])  # new shapes: what a fresh server pays
            first = time.perf_counter() - first
            text = timed(lambda: model.encode_text(captions))
            vision = timed(lambda: model.net.encode_image(pixels))
            one = timed(lambda: model.net.encode_image(pixels[:1]), 0.5)
        res[name] = {"text_per_s": len(captions) / text, "first_64_texts_s": first,
                     "vision_b256_img_per_s": 256 / vision, "vision_b1_ms": one * 1e3}
        print(f"{name:32s} text {len(captions) / text:8.0f}/s (first 64: {first:6.3f} s)  vision b256 "
              f"{256 / vision:7.0f} img/s  b1 {one * 1e3:6.2f} ms", flush=True)
    layers.CUDA_ATTENTION_BACKENDS = ours
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
