"""One system of ``bench/models.py`` in its own process: ``python -m bench.models_worker ARGS.json``.

ARGS: task ("image" | "text" | "matmul": the fp32 / bf16 matmul limit), system ("hf" | "st" | "ours"), precisions
(ours: measured one after the other in this process), the model folders, the inputs, passes, emb (a path with
``{precision}`` for the embeddings, .npy). Every system gets one untimed warm-up pass over all the inputs, then
``passes`` timed passes; the best is its figure.
Prints one line ``BENCH_RESULT {json}``; logs go to stderr.

    image  hf: SiglipModel + AutoProcessor (PIL images from the JPEG bytes, batches of ``batch``, get_image_features)
           ours: engine.load_model(...).encode_image(JPEG bytes) with BatchLimits(image_batch=batch)
    text   st: SentenceTransformer(folder).encode(texts, batch_size=32, prompt_name=...)
           ours: engine.load_model(...).encode_text(texts, prompt_name=...) (all texts; the engine groups by length)
"""
from __future__ import annotations

import gc
import io
import json
import os
import sys
import time
from pathlib import Path

SPLIT = 8  # images of the preprocessing / model split (one small batch: cheap, indicative)


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _save(path: str, arr) -> None:
    import numpy as np

    np.save(path, np.ascontiguousarray(arr, dtype=np.float32))


def timed(fn, n: int, passes: int) -> dict:
    """One warm-up pass (first-call allocations, oneDNN's set-up per shape, thread pools), then ``passes`` timed
    passes; returns the last output with the rates."""
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    seconds, out = [], None
    for _ in range(passes):
        t0 = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
    best = min(seconds)
    return {"per_s": n / best, "n": n, "seconds": seconds, "warmup_s": warm, "out": out}


def _finish(res: dict, key: str, fig: dict, emb: str) -> None:
    _save(emb.format(precision=key), fig.pop("out"))
    res[key] = fig


# ---------------------------------------------------------------------------------------------- image
def _hf_image(a: dict, blobs: list[bytes], res: dict) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, SiglipModel

    t0 = time.perf_counter()
    model = SiglipModel.from_pretrained(a["source"]).eval()
    processor = AutoProcessor.from_pretrained(a["source"])
    res["load_s"] = time.perf_counter() - t0
    res["processor"] = type(getattr(processor, "image_processor", processor)).__name__
    b = a["batch"]

    def embed():
        out = []
        for s in range(0, len(blobs), b):
            images = [Image.open(io.BytesIO(x)) for x in blobs[s:s + b]]
            inputs = processor(images=images, return_tensors="pt")
            with torch.inference_mode():
                y = model.get_image_features(**inputs)
                y = getattr(y, "pooler_output", y)
                out.append(torch.nn.functional.normalize(y.float(), dim=-1).numpy())
        return np.concatenate(out)

    _finish(res, "fp32", timed(embed, len(blobs), a["passes"]), a["emb"])
    # where HF's time goes, on 8 images: preprocessing (PIL) vs the model
    images = [Image.open(io.BytesIO(x)) for x in blobs[:SPLIT]]
    t0 = time.perf_counter()
    px = processor(images=images, return_tensors="pt")["pixel_values"]
    t1 = time.perf_counter()
    with torch.inference_mode():
        model.get_image_features(pixel_values=px)
    res["split_ms_per_img"] = {"pre": (t1 - t0) / len(images) * 1e3,
                               "model": (time.perf_counter() - t1) / len(images) * 1e3}


def _ours_image(a: dict, blobs: list[bytes], res: dict) -> None:
    import engine
    from engine.model import BatchLimits

    for p in a["precisions"]:
        t0 = time.perf_counter()
        model = engine.load_model(a["arrow"], precision=p, limits=BatchLimits(image_batch=a["batch"]))
        res.setdefault("load_s", {})[p] = time.perf_counter() - t0
        _finish(res, p, timed(lambda m=model: m.encode_image(blobs), len(blobs), a["passes"]), a["emb"])
        batch = blobs[:SPLIT]
        t0 = time.perf_counter()
        px = model.prepare_images(batch).pixels
        t1 = time.perf_counter()
        model.encode_pixels(px)
        res.setdefault("split_ms_per_img", {})[p] = {"pre": (t1 - t0) / len(batch) * 1e3,
                                                     "model": (time.perf_counter() - t1) / len(batch) * 1e3}
        del model
        gc.collect()


# ---------------------------------------------------------------------------------------------- text
def _st_text(a: dict, texts: list[str], res: dict) -> None:
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    model = SentenceTransformer(a["source"], device="cpu")
    res["load_s"] = time.perf_counter() - t0
    kw = dict(batch_size=32, prompt_name=a["prompt_name"], normalize_embeddings=True, convert_to_numpy=True,
              show_progress_bar=False)
    _finish(res, "fp32", timed(lambda: model.encode(texts, **kw), len(texts), a["passes"]), a["emb"])
    # tokens the model ran: sentence-transformers sorts the texts by length (characters) and pads each batch of 32
    # to its longest
    prompted = [(model.prompts.get(a["prompt_name"], "") if a["prompt_name"] else "") + t for t in texts]
    lengths = model.tokenize(prompted)["attention_mask"].sum(1).tolist()
    order = sorted(range(len(texts)), key=lambda i: -len(prompted[i]))
    batches = [[lengths[i] for i in order[s:s + 32]] for s in range(0, len(order), 32)]
    res["tokens"] = {"real": int(sum(lengths)), "padded": int(sum(max(b) * len(b) for b in batches))}
    res["attn_implementation"] = getattr(model[0].auto_model.config, "_attn_implementation", None)


def _ours_text(a: dict, texts: list[str], res: dict) -> None:
    import torch

    import engine

    for p in a["precisions"]:
        t0 = time.perf_counter()
        model = engine.load_model(a["arrow"], precision=p)
        res.setdefault("load_s", {})[p] = time.perf_counter() - t0
        _finish(res, p, timed(lambda m=model: m.encode_text(texts, prompt_name=a["prompt_name"]), len(texts),
                              a["passes"]), a["emb"])
        if "tokens" not in res:
            rows, _ = model.prepare_texts(texts, a["prompt_name"])
            lengths = [len(r) for r in rows]
            groups = model.text_groups(lengths)
            res["tokens"] = {"real": sum(lengths), "padded": sum(len(g) * t for g, t in groups), "groups": len(groups)}
            if getattr(model.net, "RAGGED_TEXT", False):  # padded only inside attention, in spans (engine.ragged)
                from engine.ragged import RaggedRows

                spans = [s for g, t in groups for s in RaggedRows(
                    torch.tensor([lengths[i] for i in g]), t, model.text_max_padding).spans]
                res["tokens"].update(padded=sum(s.B * s.T for s in spans), spans=len(spans))
            t0 = time.perf_counter()
            model.prepare_texts(texts, a["prompt_name"])
            res["tokenize_s"] = time.perf_counter() - t0
        del model
        gc.collect()


def probe(seconds: float = 0.6) -> float:
    """fp32 GFLOP/s of 1024 x 1024 matmuls right now: taken before and after a system's measurements, so a run on a
    machine whose cores were taken by other work (a shared host) shows which figures it touched."""
    import torch

    x, y = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x @ y
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        x @ y
        best = max(best, 2 * 1024 ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def _matmul(res: dict, seconds: float = 1.5) -> None:
    """Best GFLOP/s of 2048 x 2048 matmuls in fp32 and bf16 on this process's threads: the compute limit, measured
    at the start and the end of a run (a machine shared with other work shows here)."""
    import torch

    x, y = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = x.to(dtype), y.to(dtype)
        a @ b
        best, start = 0.0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9)
        res[f"{name}_gflops"] = best


def main() -> None:
    a = json.loads(Path(sys.argv[1]).read_text())
    import torch

    res: dict = {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "loadavg_start": os.getloadavg()}
    if a["task"] == "matmul":
        _matmul(res)
    else:
        res["probe_start_gflops"] = probe()
        if a["task"] == "image":
            blobs = [Path(p).read_bytes() for p in a["images"]]
            (_hf_image if a["system"] == "hf" else _ours_image)(a, blobs, res)
        else:
            (_st_text if a["system"] == "st" else _ours_text)(a, a["texts"], res)
        res["probe_end_gflops"] = probe()
    res["peak_rss_mb"], res["loadavg_end"] = _peak_mb(), os.getloadavg()
    sys.stdout.write("BENCH_RESULT " + json.dumps(res) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
