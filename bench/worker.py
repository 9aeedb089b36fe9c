"""One benchmark measurement in its own process: ``python -m bench.worker TASK ARGS.json``.

Each system (ArrowEngine, HuggingFace transformers, sentence-transformers) runs in a fresh process so
peak memory (``VmHWM``) and import costs are its own. The result is one line on stdout:
``BENCH_RESULT {json}``; logs go to stderr.

Tasks:
    suite   system=ours|hf, precision: warm load, latency (batch 1), throughput, preprocessing, profile, RSS
    first   system=ours|hf: imports + load + one image embedding, timed from process start (by the parent)
    minilm  system=ours|st: MiniLM text throughput (ours: each precision in turn)
    matmul  torch matmul GFLOP/s (fp32, bf16/fp16) on this machine's threads: the compute ceiling
    decode  decode ceilings on the JPEGs: our OpenCV processor alone, and nvJPEG on the GPU (CUDA runs)
"""
from __future__ import annotations

import time

T_PROCESS = time.time()  # before any heavy import: the "first" task's clock starts at process spawn (parent)

import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

log = logging.getLogger("bench.worker")


# ---------------------------------------------------------------------------------------------- helpers
def vm_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmHWM = peak RSS, VmRSS) in KiB; ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def timed_loop(fn, items: list, min_iters: int, max_iters: int, budget_s: float) -> list[float]:
    """Call ``fn(item)`` round-robin over ``items``; stop after ``max_iters`` or once ``budget_s`` is spent
    (but not before ``min_iters``). Returns seconds per call."""
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while i < max_iters and (i < min_iters or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn(items[i % len(items)])
        times.append(time.perf_counter() - t0)
        i += 1
    return times


def latency(times: list[float]) -> dict:
    return {"p50_ms": pct(times, 0.5) * 1e3, "p95_ms": pct(times, 0.95) * 1e3, "n": len(times)}


def read_files(paths: list[str]) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]


def save_npy(path: str | None, arr) -> None:
    if path:
        import numpy as np

        np.save(path, np.ascontiguousarray(arr, dtype=np.float32))


# ---------------------------------------------------------------------------------------------- systems
def engine_mode(name: str) -> tuple[str, bool]:
    """A bench precision name -> (engine precision, pack_weights): "fp32-packed" is fp32 with packed weights."""
    precision, _, variant = name.partition("-")
    return precision, variant == "packed"


class Ours:
    """ArrowEngine, in process."""

    def __init__(self, a: dict) -> None:
        import engine
        from engine.model import BatchLimits

        self.engine, self.a = engine, a
        self.limits = BatchLimits(image_batch=a["batch"])
        self.model = None

    def unload(self) -> None:
        self.model = None
        gc.collect()

    def load(self) -> None:
        precision, pack = engine_mode(self.a["precision"])
        self.model = self.engine.load_model(self.a["model_dir"], device=self.a["device"], precision=precision,
                                            limits=self.limits, pack_weights=pack)

    def embed_images(self, blobs: list[bytes]):
        return self.model.encode_image(blobs)

    def embed_texts(self, texts: list[str]):
        return self.model.encode_text(texts)

    def preprocess(self, blobs: list[bytes]) -> int:
        b = self.a["batch"]
        n = sum(len(self.model.image_processor(blobs[s:s + b]).index) for s in range(0, len(blobs), b))
        if self.model.image_processor.device_decoding:  # JPEGs were decoded on the GPU: wait for it
            import torch

            torch.cuda.synchronize()
        return n

    def model_pixels(self, blobs: list[bytes]):
        """Pixels of ``blobs`` on the device in the compute dtype (for :func:`model_only`)."""
        import torch

        px = torch.as_tensor(self.model.image_processor(blobs).pixels)
        return px.to(self.model._device, self.model._compute_dtype)

    def model_forward(self, x):
        import torch

        with torch.inference_mode():
            return self.model.net.encode_image(x)

    def profile(self, blobs: list[bytes], texts: list[str]) -> dict:
        b = blobs[: self.a["batch"]]
        t0 = time.perf_counter()
        px = self.model.image_processor(b).pixels
        t1 = time.perf_counter()
        self.model.encode_pixels(px)
        t2 = time.perf_counter()
        rows, _ = self.model.tokenizer.encode(texts)
        t3 = time.perf_counter()
        lengths = [len(r) for r in rows]
        padded = sum(len(g) * t for g, t in self.model.text_groups(lengths))
        return {"image_pre_ms_per_img": (t1 - t0) / len(b) * 1e3, "image_model_ms_per_img": (t2 - t1) / len(b) * 1e3,
                "text_tokenize_ms_per_text": (t3 - t2) / len(texts) * 1e3,
                "text_real_tokens": sum(lengths), "text_padded_tokens": padded}


class HF:
    """HuggingFace transformers CLIPModel + CLIPProcessor, used the way their documentation shows."""

    def __init__(self, a: dict) -> None:
        import torch
        from PIL import Image
        from transformers import CLIPModel, CLIPProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.torch, self.Image, self.CLIPModel, self.CLIPProcessor, self.a = torch, Image, CLIPModel, CLIPProcessor, a
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a["precision"]]
        self.model = self.processor = None
        self.model_only_load_s = None

    def unload(self) -> None:
        self.model = self.processor = None
        gc.collect()

    def load(self) -> None:
        t0 = time.perf_counter()
        model = self.CLIPModel.from_pretrained(self.a["hf_dir"])
        self.model_only_load_s = time.perf_counter() - t0
        self.model = model.to(device=self.a["device"], dtype=self.dtype).eval()
        self.processor = self.CLIPProcessor.from_pretrained(self.a["hf_dir"])

    def _features(self, out):
        y = out.pooler_output if hasattr(out, "pooler_output") else out
        y = y.float()
        return (y / y.norm(dim=-1, keepdim=True)).cpu().numpy()

    def pixels(self, blobs: list[bytes]):
        images = [self.Image.open(io.BytesIO(b)) for b in blobs]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def image_model(self, pixel_values):
        with self.torch.inference_mode():
            pv = pixel_values.to(device=self.a["device"], dtype=self.dtype)
            return self._features(self.model.get_image_features(pixel_values=pv))

    def embed_images(self, blobs: list[bytes]):
        import numpy as np

        b = self.a["batch"]
        return np.concatenate([self.image_model(self.pixels(blobs[s:s + b])) for s in range(0, len(blobs), b)])

    def model_pixels(self, blobs: list[bytes]):
        return self.pixels(blobs).to(device=self.a["device"], dtype=self.dtype)

    def model_forward(self, x):
        with self.torch.inference_mode():
            out = self.model.get_image_features(pixel_values=x)
            return out.pooler_output if hasattr(out, "pooler_output") else out

    def tokens(self, texts: list[str]):
        return self.processor.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")

    def embed_texts(self, texts: list[str]):
        import numpy as np

        out = []
        for s in range(0, len(texts), self.a["text_batch"]):
            inputs = self.tokens(texts[s:s + self.a["text_batch"]]).to(self.a["device"])
            with self.torch.inference_mode():
                out.append(self._features(self.model.get_text_features(**inputs)))
        return np.concatenate(out)

    def preprocess(self, blobs: list[bytes]) -> int:
        b = self.a["batch"]
        return sum(len(self.pixels(blobs[s:s + b])) for s in range(0, len(blobs), b))

    def profile(self, blobs: list[bytes], texts: list[str]) -> dict:
        b = blobs[: self.a["batch"]]
        t0 = time.perf_counter()
        px = self.pixels(b)
        t1 = time.perf_counter()
        self.image_model(px)
        t2 = time.perf_counter()
        real = padded = 0
        for s in range(0, len(texts), self.a["text_batch"]):
            mask = self.tokens(texts[s:s + self.a["text_batch"]])["attention_mask"]
            real, padded = real + int(mask.sum()), padded + mask.numel()
        t3 = time.perf_counter()
        return {"image_pre_ms_per_img": (t1 - t0) / len(b) * 1e3, "image_model_ms_per_img": (t2 - t1) / len(b) * 1e3,
                "text_tokenize_ms_per_text": (t3 - t2) / len(texts) * 1e3,
                "text_real_tokens": real, "text_padded_tokens": padded}


# ---------------------------------------------------------------------------------------------- tasks
def task_suite(a: dict) -> dict:
    """Everything measured on one loaded model, in order; peak RSS covers the whole suite."""
    t_imp = time.perf_counter()
    sys_ = Ours(a) if a["system"] == "ours" else HF(a)
    res: dict = {"import_s": time.perf_counter() - t_imp, "loadavg_start": os.getloadavg()}
    jpegs, mixed = read_files(a["jpeg_files"]), read_files(a["mixed_files"])
    texts = a["captions"]

    loads, tokenizer_loads = [], []
    for _ in range(1 + a["load_repeats"]):  # the first load pays lazy imports and page-cache misses
        sys_.unload()  # freeing the previous copy is not part of loading (it costs either side ~0.1 s)
        t0 = time.perf_counter()
        sys_.load()
        loads.append(time.perf_counter() - t0)
        if isinstance(sys_, Ours) and sys_.model.tokenizer is not None:  # ours parses tokenizer.json lazily
            t0 = time.perf_counter()
            sys_.model.tokenizer.load()
            tokenizer_loads.append(time.perf_counter() - t0)
    res["load_first_s"], res["load_s"], res["load_runs_s"] = loads[0], pct(loads[1:], 0.5), loads[1:]
    if tokenizer_loads:
        res["tokenizer_load_s"] = pct(tokenizer_loads[1:], 0.5)
    if isinstance(sys_, HF):
        res["hf_model_only_load_s"] = sys_.model_only_load_s
    else:
        res["weights_mb"] = os.path.getsize(os.path.join(a["model_dir"], "weights.arrow")) / 2 ** 20
        res["jpeg_on_device"] = sys_.model.image_processor.device_decoding
    res["rss_after_load_mb"] = vm_kb("VmRSS") / 1024  # imports + runtime; weights are mapped but mostly untouched

    if a.get("light"):  # this precision is not native here: embed a few rows for accuracy and memory only
        save_npy(a.get("image_emb"), sys_.embed_images(jpegs[:4]))
        save_npy(a.get("text_emb"), sys_.embed_texts(texts[:16]))
        res["light"] = True
        res["peak_rss_mb"] = vm_kb("VmHWM") / 1024
        res["loadavg_end"] = os.getloadavg()
        return res
    # warm-up, both systems alike: first-call allocations, thread pools, kernel selection, and one full batch so
    # that the throughput figure is the steady state of a long job (ours: int8 makes oneDNN's copy of its
    # weights on the first big call, ~0.2 s for B/32)
    sys_.embed_images(jpegs[:2])
    sys_.embed_images(jpegs[:a["batch"]])
    sys_.embed_texts(texts[:4])

    q = a["budget"]
    res["image_latency"] = latency(timed_loop(lambda b: sys_.embed_images([b]), jpegs, 5, a["lat_iters"], q["img_lat"]))
    res["text_latency"] = latency(timed_loop(lambda t: sys_.embed_texts([t]), texts, 10, 4 * a["lat_iters"], q["txt_lat"]))

    thr = jpegs[: a["n_throughput"]]
    t0 = time.perf_counter()
    emb = sys_.embed_images(thr)
    dt = time.perf_counter() - t0
    for _ in range(a.get("thr_passes", 1) - 1):  # more passes over the same images: a fast system's run is short
        sys_.embed_images(thr)
    dt_all = time.perf_counter() - t0
    passes = a.get("thr_passes", 1)
    res["image_throughput"] = {"per_s": passes * len(thr) / dt_all, "n": passes * len(thr), "seconds": dt_all,
                               "first_pass_per_s": len(thr) / dt}
    save_npy(a.get("image_emb"), emb)
    if a.get("model_only"):
        res["model_only"] = model_only(sys_, jpegs, a["model_only"])

    t0 = time.perf_counter()
    emb = sys_.embed_texts(texts)
    dt = time.perf_counter() - t0
    res["text_throughput"] = {"per_s": len(texts) / dt, "n": len(texts), "seconds": dt}
    save_npy(a.get("text_emb"), emb)

    if a.get("preprocess"):
        sys_.preprocess(mixed[:4])
        t0 = time.perf_counter()
        ok = sys_.preprocess(mixed)
        dt = time.perf_counter() - t0
        res["preprocess"] = {"per_s": len(mixed) / dt, "n": len(mixed), "ok": ok, "seconds": dt}
    if a.get("profile"):
        res["profile"] = sys_.profile(jpegs, texts)
    res["peak_rss_mb"] = vm_kb("VmHWM") / 1024
    res["loadavg_end"] = os.getloadavg()
    return res


def model_only(sys_, jpegs: list[bytes], batch: int, min_s: float = 1.0) -> dict:
    """Vision tower alone on device-resident pixels (decoded once, outside the clock): img/s at ``batch``."""
    import torch

    blobs = (jpegs * (batch // len(jpegs) + 1))[:batch]
    x = sys_.model_pixels(blobs)
    cuda = x.is_cuda
    for _ in range(3):  # warm-up: kernel selection, allocator
        sys_.model_forward(x)
    if cuda:
        torch.cuda.synchronize()
    iters, t0 = 0, time.perf_counter()
    while iters < 3 or time.perf_counter() - t0 < min_s:
        sys_.model_forward(x)
        iters += 1
        if cuda and iters % 4 == 0:
            torch.cuda.synchronize()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"per_s": iters * batch / dt, "batch": batch, "iters": iters, "seconds": dt}


def task_first(a: dict) -> dict:
    """New process -> first image embedding. The parent subtracts its spawn time from ``t_done``."""
    blob = Path(a["image"]).read_bytes()
    t0 = time.time()
    if a["system"] == "ours":
        import engine
        import engine.model  # noqa: F401  (engine imports lazily; import torch here so the breakdown is honest)

        t1 = time.time()
        model = engine.load_model(a["model_dir"], device=a["device"], precision="fp32")
        t2 = time.time()
        model.encode_image([blob])
    else:
        import torch
        from PIL import Image
        from transformers import CLIPModel, CLIPProcessor

        t1 = time.time()
        model = CLIPModel.from_pretrained(a["hf_dir"]).to(a["device"]).eval()
        processor = CLIPProcessor.from_pretrained(a["hf_dir"])
        t2 = time.time()
        with torch.inference_mode():
            inputs = processor(images=[Image.open(io.BytesIO(blob))], return_tensors="pt").to(a["device"])
            model.get_image_features(**inputs).pooler_output.cpu().numpy()
    t3 = time.time()
    return {"t_done": t3, "t_process": T_PROCESS, "import_s": t1 - t0, "load_s": t2 - t1, "embed_s": t3 - t2,
            "peak_rss_mb": vm_kb("VmHWM") / 1024}


def task_minilm(a: dict) -> dict:
    texts = a["captions"]
    res: dict = {}
    if a["system"] == "st":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(a["st_dir"], device=a["device"])
        model.encode(texts, batch_size=32, normalize_embeddings=True)  # warm-up pass, as ours gets: steady state
        t0 = time.perf_counter()
        emb = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        dt = time.perf_counter() - t0
        res["fp32"] = {"per_s": len(texts) / dt, "seconds": dt}
        save_npy(a["emb"].format(precision="st"), emb)
    else:
        import engine

        for precision in a["precisions"]:
            p, pack = engine_mode(precision)
            model = engine.load_model(a["model_dir"], device=a["device"], precision=p, pack_weights=pack)
            model.encode_text(texts)  # warm-up pass (int8: oneDNN's first call at each row count sets it up)
            t0 = time.perf_counter()
            emb = model.encode_text(texts)
            dt = time.perf_counter() - t0
            res[precision] = {"per_s": len(texts) / dt, "seconds": dt}
            save_npy(a["emb"].format(precision=precision), emb)
            del model
            gc.collect()
    return res


def task_matmul(a: dict) -> dict:
    """Best GFLOP/s of square matmuls (n=2048) within a short time budget: the hardware's compute limit."""
    import torch

    dev = torch.device(a["device"])
    res: dict = {"threads": torch.get_num_threads()}
    dtypes = (("fp32", torch.float32), ("bf16", torch.bfloat16))
    if dev.type == "cuda":
        dtypes += (("fp16", torch.float16),)
    n_max = 2048 if dev.type == "cpu" else 8192
    for name, dtype in dtypes:
        n = 256
        while True:  # grow n until one matmul takes ~50 ms (a slow dtype stays small and cheap)
            x = torch.randn(n, n, device=dev).to(dtype)
            y = torch.randn(n, n, device=dev).to(dtype)
            _sync(x @ y)  # the first call sets up the library (cuBLAS handles, heuristics): not the rate
            t0 = time.perf_counter()
            _sync(x @ y)
            if n >= n_max or time.perf_counter() - t0 > 0.05:
                break
            n *= 2
        best, start = 0.0, time.perf_counter()
        while time.perf_counter() - start < a["seconds"]:
            t0 = time.perf_counter()
            _sync(x @ y)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
        res[f"{name}_gflops"], res[f"{name}_n"] = best, n
    res["n"] = res["fp32_n"]
    if dev.type == "cpu" and torch.backends.quantized.engine != "none":
        res.update(_int8_gemm(a["seconds"]))
    if dev.type == "cpu" and a.get("tower"):
        res.update(_tower_gemms(a["tower"]))
    return res


def _tower_gemms(t: dict, repeats: int = 20) -> dict:
    """The vision tower's own GEMMs alone, as the engine runs them, best of ``repeats`` each, weights
    cache-hot: at batch 1 their sum is the floor of the model's latency, since at a few dozen rows a GEMM
    runs far below the square-matmul rate. Every block but the last runs q, k, v, out, fc1, fc2 on every
    token; the last one (engine.clip: only the class token is pooled) k and v on every token, the rest on
    one row. fp32 through engine.layers.linear and engine.packing.PackedLinear (q, k, v apart);
    int8 through engine.quantize.Int8Linear (fused)."""
    import torch
    from torch import nn

    from engine.layers import linear
    from engine.packing import PackedLinear, packing_available
    from engine.quantize import Int8Linear

    def best(fn) -> float:
        fn()
        top = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            top = min(top, time.perf_counter() - t0)
        return top

    d, mlp, tokens, layers = t["width"], t["mlp"], t["tokens"], t["layers"]
    g = torch.Generator().manual_seed(0)

    def lin(k: int, n: int) -> nn.Linear:
        m = nn.Linear(k, n)
        m.weight.data, m.bias.data = torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g)
        return m

    def tower_ms(make, make_fused) -> float:
        """(layers - 1) full blocks + the last block, in ms."""
        q, k, v, o, f1, f2 = (lin(d, d), lin(d, d), lin(d, d), lin(d, d), lin(d, mlp), lin(mlp, d))
        fused = make_fused([q, k, v]) if make_fused else None
        mods = {name: make(m) for name, m in (("q", q), ("k", k), ("v", v), ("o", o), ("f1", f1), ("f2", f2))}
        xs = {r: (torch.randn(r, d, generator=g), torch.randn(r, mlp, generator=g)) for r in (tokens, 1)}

        def run(name: str, rows: int) -> float:
            m = fused if name == "qkv" else mods[name]
            return best(lambda: m(xs[rows][1 if name == "f2" else 0]))

        attn_in = ["qkv"] if fused else ["q", "k", "v"]
        full = sum(run(n, tokens) for n in attn_in + ["o", "f1", "f2"])
        last = sum(run(n, tokens) for n in (["qkv"] if fused else ["k", "v"]))
        last += sum(run(n, 1) for n in ([] if fused else ["q"]) + ["o", "f1", "f2"])
        return 1e3 * ((layers - 1) * full + last)

    class Plain(nn.Module):
        def __init__(self, m: nn.Linear) -> None:
            super().__init__()
            self.w, self.b = m.weight.detach(), m.bias.detach()

        def forward(self, x):
            return linear(x, self.w, self.b)

    with torch.inference_mode():
        out = {"b1_gemm_ms_fp32": tower_ms(Plain, None), "b1_gemm_ms_int8": tower_ms(Int8Linear, Int8Linear.concat)}
        if packing_available():
            out["b1_gemm_ms_fp32_packed"] = tower_ms(PackedLinear, None)
    flops = 2 * ((layers - 1) * tokens * (4 * d * d + 2 * d * mlp) + tokens * 2 * d * d + 2 * d * d + 2 * d * mlp)
    out["b1_gemm_gflops_fp32"] = flops / out["b1_gemm_ms_fp32"] / 1e6
    return out


def _int8_gemm(seconds: float) -> dict:
    """Best GOP/s of the int8 GEMM engine.quantize.Int8Linear runs on a ViT-B MLP at batch 32 (1600 x 768 x 3072
    and back; oneDNN's where it has it, else fbgemm's), on levels ready for it: the compute limit of the int8
    mode (row quantization and the rest come on top)."""
    import torch
    from torch import nn

    from engine.quantize import Int8Linear

    rows, shapes, best, kernel = 1600, ((768, 3072), (3072, 768)), [], "fbgemm"
    for k, n in shapes:
        layer = Int8Linear(nn.Linear(k, n))
        (start, stop, on_onednn), *more = layer._plan(rows)
        assert not more and (start, stop) == (0, rows), "the limit is measured on one unpadded call"
        codes = torch.randint(0, 128, (rows, k), dtype=torch.uint8)
        levels = codes.float()
        kernel = "oneDNN" if on_onednn else "fbgemm"
        with torch.inference_mode():
            gemm = (lambda: layer._onednn_gemm(codes)) if on_onednn else (lambda: layer._fbgemm_gemm(levels))
            gemm()
            top, start = 0.0, time.perf_counter()
            while time.perf_counter() - start < seconds / 2:
                t0 = time.perf_counter()
                gemm()
                top = max(top, 2 * rows * k * n / (time.perf_counter() - t0) / 1e9)
        best.append(top)
    return {"int8_gops": len(best) / sum(1 / b for b in best), "int8_shapes": [list(s) for s in shapes],
            "int8_kernel": kernel}


def task_decode(a: dict) -> dict:
    """Decode ceilings for the GPU goal, on the same JPEGs: our OpenCV processor on every core, alone; and
    the engine's device stage (engine.device_jpeg: nvJPEG + resize + crop + normalize on the GPU), alone."""
    import numpy as np
    import torch

    from engine.image_config import ImageConfig
    from engine.image_processor import ArrowImageProcessor

    jpegs = read_files(a["jpeg_files"])
    batch, passes = a["batch"], a.get("passes", 2)
    res: dict = {"n": len(jpegs) * passes, "batch": batch, "threads": os.cpu_count()}
    cfg = ImageConfig.from_dir(a["model_dir"])
    with ArrowImageProcessor(cfg) as proc:
        proc(jpegs[:batch])
        t0 = time.perf_counter()
        for _ in range(passes):
            for s in range(0, len(jpegs), batch):
                proc(jpegs[s:s + batch])
        res["opencv_per_s"] = len(jpegs) * passes / (time.perf_counter() - t0)
    with ArrowImageProcessor(cfg, threads=1, device=a["device"]) as on_device:
        stage = on_device._device_stage  # the JPEG stage the engine runs on this device, timed alone
    if stage is None:
        res["nvjpeg_note"] = "not measured: no torchvision nvJPEG decoder or no CUDA device"
        return res
    views = [np.frombuffer(b, dtype=np.uint8) for b in jpegs]
    try:
        stage(views[:batch])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(passes):
            for s in range(0, len(views), batch):
                stage(views[s:s + batch])
        torch.cuda.synchronize()
        res["nvjpeg_per_s"] = len(views) * passes / (time.perf_counter() - t0)
    except Exception as exc:  # e.g. out of device memory: say so, keep the OpenCV figure
        res["nvjpeg_note"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
    return res


def _sync(t) -> None:
    if t.is_cuda:
        import torch

        torch.cuda.synchronize()


TASKS = {"suite": task_suite, "first": task_first, "minilm": task_minilm, "matmul": task_matmul,
         "decode": task_decode}


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="worker %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    task, args = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    out = TASKS[task](args)
    sys.stdout.write("BENCH_RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
