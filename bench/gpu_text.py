"""CLIP text on CUDA: how shapes and attention backends change throughput, each variant in a fresh process.

    python bench/gpu_text.py [--model DIR] [--hf-model DIR] [--precision fp16]   # default: bench's cached B/16

Variants: ours with the CUDA defaults (lengths rounded up to 8, no padding cut, cuDNN attention off); ours
with the CPU text policy (exact lengths, a new group past 10 % padding); ours with cuDNN attention allowed;
HF CLIPModel (batches of 256 padded to the longest, as ``bench.worker`` runs it). Each reports the first
pass over the captions (every shape is new: what a fresh server pays), a second pass, and batch-1
latency. Writes bench/results/gpu_text.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from engine import set_thread_defaults  # noqa: E402

set_thread_defaults()  # before torch loads: the process-wide settings `arrowengine serve` runs with

VARIANTS = ("ours", "ours-cpu-policy", "ours-cudnn", "hf")


def captions(model_dir: str, n: int = 1024) -> list[str]:
    from bench.data import make_captions

    return make_captions(n, Path(model_dir) / "tokenizer.json")


def run_variant(name: str, args: argparse.Namespace) -> dict:
    import torch

    texts = captions(args.model)
    single = texts[:48]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    from bench.worker import HF, Ours

    a = {"system": name, "precision": args.precision, "device": args.device, "hf_dir": args.hf_model,
         "model_dir": args.model, "batch": 128, "text_batch": 256}  # HF: batches of 256, padded to the longest
    if name == "hf":
        system = HF(a)
    else:
        from engine import layers
        from engine.model import BatchLimits

        system = Ours(a)
        if name == "ours-cpu-policy":
            system.limits = BatchLimits(text_pad_to=1, text_max_padding=0.1)
        if name == "ours-cudnn":
            from torch.nn.attention import SDPBackend

            layers.CUDA_ATTENTION_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *layers.CUDA_ATTENTION_BACKENDS]
    system.load()
    embed = system.embed_texts
    embed(["warm up"])
    sync()
    out: dict = {}
    for label in ("first", "second"):
        t0 = time.perf_counter()
        embed(texts)
        out[f"{label}_pass_per_s"] = len(texts) / (time.perf_counter() - t0)
        lat = []
        for t in single:
            t0 = time.perf_counter()
            embed([t])
            lat.append(time.perf_counter() - t0)
        out[f"{label}_b1_p50_ms"] = sorted(lat)[len(lat) // 2] * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / ".cache" / "clip-b16-seed0" / "arrow"))
    ap.add_argument("--hf-model", default=str(ROOT / ".cache" / "clip-b16-seed0" / "hf"))
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke test of this script
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu_text.json"))
    args = ap.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args)), flush=True)
        return
    if not Path(args.model).exists():
        from bench.data import default_clip

        default_clip("b16")
    import torch

    res: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                 "torch": torch.__version__, "precision": args.precision, "captions": len(captions(args.model))}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name, "--model", args.model, "--hf-model", args.hf_model,
               "--precision", args.precision, "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        res[name] = json.loads(line[7:]) if line else {"error": proc.stderr.strip().splitlines()[-1:]}
        r = res[name]
        if "error" in r:
            print(f"{name:18s} failed: {r['error']}", flush=True)
            continue
        print(f"{name:18s} texts/s first pass {r['first_pass_per_s']:7.0f}, second {r['second_pass_per_s']:7.0f}; "
              f"batch-1 p50 first {r['first_b1_p50_ms']:6.2f} ms, second {r['second_b1_p50_ms']:6.2f} ms", flush=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
