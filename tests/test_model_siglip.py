"""SigLIP (and fixed-resolution SigLIP 2) parity against transformers' own SiglipModel / SiglipVisionModel /
SiglipTextModel on the same weights, the tokenizers of both families, conversion and the model API.

Every checkpoint is built here with transformers at a fixed seed; the tokenizers with the ``tokenizers`` library:
a T5-style SentencePiece unigram one as SigLIP's (``</s>`` is both end-of-text and pad, id 1; SigLIP's text
canonicalization: lowercase, ASCII punctuation removed, spaces collapsed) and a Gemma-style byte-fallback BPE one as
SigLIP 2's (``<pad>`` 0, ``<eos>`` 1 appended, right padding, as transformers' conversion script saves it).
"""
from __future__ import annotations

import io
import json
import re
import string
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from convert.pipeline import convert_checkpoint
from engine import registry
from engine.errors import ModalityError, ModelConfigError, NotRunnableError, WeightFormatError

PHOTOS = Path(__file__).parent / "data" / "photos"

TEXTS = [
    "a photo of a cat",
    "",
    "A diagram of the Falcon 9 rocket, on its launch pad at dawn!",
    "word " * 120,  # longer than the 64 tokens the model reads: cut, end-of-text kept
    "Ünïcode: café, naïve, 日本語",
    "emoji 🚀🐱 ok",
    "  spaced   out  ",
]

_WORDS = "a photo of the cat dog rocket launch pad at dawn with steam rising diagram falcon on its word".split()
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789éïüç日本語"


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _assert_parity(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    cos, diff = float(_cos(ours, ref).min()), float(np.abs(ours - ref).max())
    assert cos >= 0.99999 and diff <= 1e-4, (cos, diff)
    return cos, diff


# ---------------------------------------------------------------- checkpoints


def write_t5_tokenizer(out: Path, max_length: int = 64) -> int:
    """A SigLIP-style tokenizer (T5-style SentencePiece unigram); returns its vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -9.0)]
    vocab += [("▁" + w, -5.0 - 0.1 * len(w)) for w in _WORDS]
    vocab += [p for c in _CHARS for p in (("▁" + c, -12.0), (c, -11.0))]
    vocab = list(dict(vocab).items())  # unique pieces, first score
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([  # SiglipTokenizer.canonicalize_text
        normalizers.Lowercase(), normalizers.Replace(Regex("[" + re.escape(string.punctuation) + "]"), ""),
        normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="</s>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=max_length).save_pretrained(str(out))
    return tok.get_vocab_size()


def write_gemma_tokenizer(out: Path) -> int:
    """A SigLIP 2-style tokenizer (Gemma: byte-fallback BPE, ``$A <eos>``, pad ``<pad>`` 0, padding right, as
    transformers' convert_siglip2_to_hf saves it); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
    for c in "▁" + _CHARS + _CHARS.upper()[:26] + ".,:!?'-":
        vocab.setdefault(c, len(vocab))
    merges = []
    for w in _WORDS:
        cur = "▁"
        for ch in w:
            if cur + ch not in vocab:
                vocab[cur + ch] = len(vocab)
                merges.append((cur, ch))
            cur += ch
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": False, "add_eos_token": True, "padding_side": "right",
        "pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
        "mask_token": "<mask>", "model_max_length": 1000000000000000019884624838656,
        "model_input_names": ["input_ids"]}))
    return tok.get_vocab_size()


def write_preprocessor_config(out: Path, size: int) -> None:
    """SiglipImageProcessor's config as the hub checkpoints ship it: a fixed (height, width) resize, no crop keys."""
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor"}))


# name -> (text kwargs, vision kwargs, tokenizer)
GEOMETRIES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=16), "t5"),
    # odd head counts (3 and 5), head_dim 32 / 16, text width 96 projected to the vision width 80, MLP widths that
    # are no multiple of anything, gelu, eps 1e-5, image 70 with patch 16 (4x4 patches: HF's conv drops 6 pixels),
    # 48 text positions, SigLIP 2's Gemma tokenizer (pad 0) with config.json saying nothing about the pad
    "odd": (dict(hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=3,
                 projection_size=80, hidden_act="gelu", layer_norm_eps=1e-5, max_position_embeddings=48),
            dict(hidden_size=80, intermediate_size=152, num_hidden_layers=3, num_attention_heads=5, image_size=70,
                 patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5), "gemma"),
    # google/siglip-so400m-patch14-384's widths, heads, head_dim (72), MLP (4304), patch and image size; 2 layers a
    # tower and the vocabulary cut from 32,000 to 4,096 to keep the test light
    "so400m": (dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16,
                    vocab_size=4096),
               dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16,
                    image_size=384, patch_size=14), "t5"),
}


def random_model(cls, config, seed: int):
    """``cls(config)`` with random weights from ``seed``: fan-in scaled normal matrices, LayerNorm weights near 1,
    small biases. Much faster than transformers' own init at so400m's width (~1 s instead of ~13 s here)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model


def make_siglip(out: Path, geometry: str, seed: int = 0) -> Path:
    """A random-weight SiglipModel of ``geometry`` saved as a HF folder with its tokenizer and processor config;
    logit_scale / logit_bias set to trained-like values (log 10, -2) so the sigmoid similarity is not flat."""
    from transformers import SiglipConfig, SiglipModel

    text, vision, tokenizer = GEOMETRIES[geometry]
    out.mkdir(parents=True, exist_ok=True)
    vocab = (write_t5_tokenizer if tokenizer == "t5" else write_gemma_tokenizer)(out)
    text = {"vocab_size": vocab, **text}
    model = random_model(SiglipModel, SiglipConfig(text_config=text, vision_config=vision), seed)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(10.0)))
        model.logit_bias.fill_(-2.0)
    model.save_pretrained(str(out))
    write_preprocessor_config(out, vision["image_size"])
    if tokenizer == "gemma":  # as google/siglip2-*-224's config.json: no pad_token_id (the class default is 1)
        cfg = json.loads((out / "config.json").read_text())
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            cfg["text_config"].pop(key, None)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(geometry)`` -> (HF folder, converted folder), made once per module."""
    root = tmp_path_factory.mktemp("siglip")
    made = {}

    def get(geometry: str) -> tuple[Path, Path]:
        if geometry not in made:
            src = make_siglip(root / f"hf-{geometry}", geometry)
            made[geometry] = (src, convert_checkpoint(src, root / f"model-{geometry}", progress=False).out_dir)
        return made[geometry]
    return get


def _hf_text(hf, tok, texts, length: int) -> np.ndarray:
    """transformers' reference: padding="max_length", no attention mask (SigLIP's processor returns none)."""
    ids = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return hf.get_text_features(input_ids=ids).pooler_output.numpy()


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check_parity(src: Path, out: Path) -> dict[str, tuple[float, float]]:
    """Texts (with our tokenizer against transformers' tokenizer and model) and images (the same pixels) against
    SiglipModel; returns (min cosine, max abs diff) per modality."""
    from transformers import AutoTokenizer, SiglipModel

    hf = SiglipModel.from_pretrained(str(src)).eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    model = engine.load_model(out)
    length = model.config.text_length
    # tokenization: the ids transformers' tokenizer gives (truncated at the model's length), pads aside
    hf_ids = tok(TEXTS, truncation=True, max_length=length)["input_ids"]
    ours_ids = [r.tolist() for r in model.prepare_texts(TEXTS)[0]]
    assert ours_ids == hf_ids
    assert max(len(r) for r in ours_ids) == length and ours_ids[1] == [tok.eos_token_id]
    ours = model.encode_text(TEXTS, normalize=False)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), model.info.dim)
    report = {"text": _assert_parity(ours, _hf_text(hf, tok, TEXTS, length))}
    size = model.config.vision.image_size
    px = _pixels(2, size)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=px).pooler_output.numpy()
    report["image"] = _assert_parity(model.encode_pixels(px.numpy(), normalize=False), ref)
    return report


# ---------------------------------------------------------------- parity


def test_tiny_siglip_parity_similarity_and_batches(built):
    from transformers import AutoTokenizer, SiglipModel

    src, out = built("tiny")
    assert registry.detect(json.loads((src / "config.json").read_text()), src).kind == "siglip"
    assert json.loads((out / "manifest.json").read_text())["kind"] == "siglip"
    print("tiny", _check_parity(src, out))
    model = engine.load_model(out)
    assert model.info.modalities == ("text", "image") and model.info.dim == 64 and model.info.max_tokens == 64
    assert model.config.pad_id == 1 and model.config.text_length == 64  # SigLIP: </s> pads

    # similarity: sigmoid(exp(logit_scale) cos + logit_bias), as torch.sigmoid(logits_per_text)
    hf = SiglipModel.from_pretrained(str(src)).eval()
    ids = AutoTokenizer.from_pretrained(str(src))(TEXTS, padding="max_length", truncation=True, max_length=64,
                                                  return_tensors="pt")["input_ids"]
    px = _pixels(3, 64, seed=1)
    with torch.no_grad():
        want = torch.sigmoid(hf(input_ids=ids, pixel_values=px).logits_per_text).numpy()
    got = model.similarity(model.encode_text(TEXTS), model.encode_pixels(px.numpy()))
    assert got.shape == (len(TEXTS), 3) and np.abs(got - want).max() <= 1e-5
    assert want.std() > 0.01  # not a flat sigmoid: the test can tell scores apart

    # every row costs 64 tokens: rows of any length go to the device together, not in length groups
    assert [(len(g), t) for g, t in model.text_groups([1, 5, 30, 64, 12, 3, 9, 40, 2, 7])] == [(10, 64)]
    # a row alone, in a batch of mixed lengths, reordered: the same embedding
    alone = np.concatenate([model.encode_text([t]) for t in TEXTS])
    assert np.abs(alone - model.encode_text(TEXTS)).max() <= 1e-5
    assert np.abs(alone - model.encode_text(TEXTS[::-1])[::-1]).max() <= 1e-5
    images = np.concatenate([model.encode_pixels(p[None].numpy()) for p in px])
    assert np.abs(images - model.encode_pixels(px.numpy())).max() <= 1e-5

    # token ids: as the tokenizer gives them, and padded to 64 with the pad id (HF's padding="max_length")
    rows = [r.tolist() for r in model.prepare_texts(TEXTS)[0]]
    padded = [r + [1] * (64 - len(r)) for r in rows]
    assert np.abs(model.encode_tokens(rows) - alone).max() <= 1e-5
    assert np.abs(model.encode_tokens(padded) - alone).max() <= 1e-5


def test_odd_geometry_with_siglip2_gemma_tokenizer(built):
    """Odd head counts, projection != width, image not a multiple of the patch, 48 positions; SigLIP 2's Gemma
    tokenizer pads with <pad> (0) although SiglipTextConfig's default pad_token_id is 1 (<eos> there)."""
    from transformers import AutoTokenizer, SiglipModel

    src, out = built("odd")
    print("odd", _check_parity(src, out))
    model = engine.load_model(out)
    assert model.config.pad_id == 0 and model.config.text_length == 48 and model.info.dim == 80
    assert model.config.vision.grid == 4 and model.config.text.tower.heads == 3
    # the pad id matters: padding with config.json's default (1) gives other embeddings
    hf = SiglipModel.from_pretrained(str(src)).eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    ids = [r + [1] * (48 - len(r)) for r in tok(TEXTS[:3], truncation=True, max_length=48)["input_ids"]]
    with torch.no_grad():
        wrong = hf.get_text_features(input_ids=torch.tensor(ids)).pooler_output.numpy()
    assert _cos(model.encode_text(TEXTS[:3], normalize=False), wrong).min() < 0.999


@pytest.mark.slow
def test_so400m_geometry_parity(built):
    """google/siglip-so400m-patch14-384's geometry (1152 wide, 16 heads of 72, MLP 4304, patch 14 on 384 px:
    27x27 patches, the last 6 pixels dropped as HF's conv drops them), 2 layers a tower, vocabulary cut to 4,096."""
    src, out = built("so400m")
    print("so400m", _check_parity(src, out))
    model = engine.load_model(out)
    assert model.info.dim == 1152 and model.config.vision.grid == 27
    # its processor resizes to 384 x 384 and does not crop
    photo = (PHOTOS / "rocket.jpg").read_bytes()
    assert model.image_processor([photo]).pixels.shape == (1, 3, 384, 384)


# ---------------------------------------------------------------- one tower


def _save_tower(root: Path, kind: str, prefixed: bool) -> Path:
    """SiglipVisionModel / SiglipTextModel as transformers 5 saves it (bare names), or with the ``vision_model.`` /
    ``text_model.`` prefix transformers 4 wrote (and hub checkpoints have)."""
    from safetensors.torch import load_file, save_file
    from transformers import SiglipTextConfig, SiglipTextModel, SiglipVisionConfig, SiglipVisionModel

    src = root / f"{kind}-{'prefixed' if prefixed else 'bare'}"
    src.mkdir(parents=True)
    small = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    if kind == "vision":
        model = random_model(SiglipVisionModel, SiglipVisionConfig(image_size=48, patch_size=12, **small), 5)
        write_preprocessor_config(src, 48)
    else:
        vocab = write_t5_tokenizer(src)
        model = random_model(SiglipTextModel, SiglipTextConfig(vocab_size=vocab, projection_size=40, **small), 5)
    model.save_pretrained(str(src))
    if prefixed:
        state = load_file(str(src / "model.safetensors"))
        prefix = "vision_model." if kind == "vision" else "text_model."
        save_file({prefix + k: v for k, v in state.items()}, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("prefixed", [False, True])
@pytest.mark.parametrize("kind", ["vision", "text"])
def test_one_tower_in_both_layouts(tmp_path, kind, prefixed):
    """SiglipVisionModel (image only: the MAP head's pooler output) and SiglipTextModel (text only), saved bare
    (transformers 5) or under their prefix (transformers 4): equal to transformers' pooler_output."""
    from transformers import AutoTokenizer, SiglipTextModel, SiglipVisionModel

    src = _save_tower(tmp_path, kind, prefixed)
    out = convert_checkpoint(src, tmp_path / "model", progress=False).out_dir
    model = engine.load_model(out)
    assert model.info.kind == "siglip"
    if kind == "vision":
        hf = SiglipVisionModel.from_pretrained(str(src)).eval()  # loads the prefixed layout too
        px = _pixels(2, 48)
        with torch.no_grad():
            ref = hf(pixel_values=px).pooler_output.numpy()
        assert model.info.modalities == ("image",) and model.info.dim == 48
        _assert_parity(model.encode_pixels(px.numpy(), normalize=False), ref)
        with pytest.raises(ModalityError):
            model.encode_text(["a cat"])
        assert not hasattr(model.net, "similarity")  # one tower: cosine similarity
    else:
        hf = SiglipTextModel.from_pretrained(str(src)).eval()
        ids = AutoTokenizer.from_pretrained(str(src))(TEXTS, padding="max_length", truncation=True, max_length=64,
                                                      return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = hf(input_ids=ids).pooler_output.numpy()
        assert model.info.modalities == ("text",) and model.info.dim == 40
        _assert_parity(model.encode_text(TEXTS, normalize=False), ref)


# ---------------------------------------------------------------- conversion and detection


def test_naflex_siglip2_converts_in_store_mode_and_does_not_run(tmp_path, caplog):
    from transformers import Siglip2Config, Siglip2Model

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    Siglip2Model(Siglip2Config(text_config=dict(vocab_size=300, **small), vision_config=dict(num_patches=16, **small))
                 ).eval().save_pretrained(str(tmp_path / "naflex"))
    result = convert_checkpoint(tmp_path / "naflex", tmp_path / "out", progress=False)
    assert result.manifest.kind == "store"
    assert "NaFlex SigLIP 2" in caplog.text and "stored, not runnable" in caplog.text
    with pytest.raises(NotRunnableError, match="stored, not runnable"):
        engine.load_model(result.out_dir)


def test_detection_claims_siglip_only():
    detect = registry.get("siglip").detect
    root = Path(".")
    for config in ({"architectures": ["SiglipModel"], "model_type": "siglip"},
                   {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model"},
                   {"architectures": ["SiglipTextModel"], "model_type": "siglip_text_model"},
                   {"model_type": "siglip"}):
        assert detect(config, root), config
    for config in ({"architectures": ["SiglipForImageClassification"], "model_type": "siglip"},
                   {"architectures": ["CLIPModel"], "model_type": "clip"}, {"model_type": "clip"},
                   {"architectures": ["Siglip2Model"], "model_type": "siglip2"}, {"model_type": "bert"}):
        assert not detect(config, root), config
    assert registry.get("clip").detect({"architectures": ["SiglipModel"], "model_type": "siglip"}, root) is False


def test_unknown_tensors_are_a_conversion_error(built, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src, _ = built("tiny")
    folder = tmp_path / "extra"
    shutil.copytree(src, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["classifier.weight"] = torch.zeros(3, 64)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightFormatError, match="classifier.weight"):
        convert_checkpoint(folder, tmp_path / "out", progress=False)


def test_config_errors_name_the_file_and_field(built, tmp_path):
    import shutil

    _, out = built("tiny")

    def variant(name, edit):
        folder = tmp_path / name
        shutil.copytree(out, folder)
        cfg = json.loads((folder / "config.json").read_text())
        edit(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
        return folder

    with pytest.raises(ModelConfigError, match="num_hidden_layers is 7, but .* holds 2 blocks"):
        engine.load_model(variant("layers", lambda c: c["vision_config"].update(num_hidden_layers=7)))
    with pytest.raises(ModelConfigError, match="vision_use_head"):
        engine.load_model(variant("nohead", lambda c: c["vision_config"].update(vision_use_head=False)))
    with pytest.raises(ModelConfigError, match="projection_size 32 differs from vision_config.hidden_size 64"):
        engine.load_model(variant("proj", lambda c: c["text_config"].update(projection_size=32)))
    with pytest.raises(ModelConfigError, match="hidden_size 64 is not divisible by num_attention_heads 5"):
        engine.load_model(variant("heads", lambda c: c["text_config"].update(num_attention_heads=5)))


# ---------------------------------------------------------------- precisions, images, serving


def test_bf16_and_int8_stay_close_to_fp32(built):
    from engine.quantize import LEVELS_VNNI, activation_levels

    _, out = built("odd")
    fp32 = engine.load_model(out)
    px = _pixels(8, 70, seed=2).numpy()
    ref_t, ref_i = fp32.encode_text(TEXTS), fp32.encode_pixels(px)
    for precision, floor in (("bf16", 0.999), ("int8", 0.99)):
        model = engine.load_model(out, precision=precision)
        t, i = _cos(model.encode_text(TEXTS), ref_t).min(), _cos(model.encode_pixels(px), ref_i).min()
        print(f"{precision}: text min cosine {t:.5f}, image min cosine {i:.5f}")
        assert t >= floor and i >= floor, (precision, t, i)
        sim = model.similarity(model.encode_text(TEXTS), model.encode_pixels(px))
        # int8 on AVX2 without VNNI has 7-bit activations (engine.quantize): up to 0.025 measured there
        bound = 0.02 if precision == "bf16" or activation_levels() == LEVELS_VNNI else 0.04
        assert np.abs(sim - fp32.similarity(ref_t, ref_i)).max() <= bound, precision
    packed = engine.load_model(out, pack_weights=True)  # oneDNN-packed fp32 Linears, the patch embedding's too
    assert np.abs(packed.encode_text(TEXTS) - ref_t).max() <= 1e-5
    assert np.abs(packed.encode_pixels(px) - ref_i).max() <= 1e-5


def test_image_processor_matches_siglip_processor(built):
    """The folder's SiglipImageProcessor config (resize to height x width, no crop, mean/std 0.5) against
    transformers' PIL processor on real photos: pixels close (INTER_AREA / INTER_CUBIC vs PIL bicubic) and image
    embeddings of the tiny model close."""
    from PIL import Image
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    src, out = built("tiny")
    model = engine.load_model(out)
    cfg = json.loads((src / "preprocessor_config.json").read_text())
    hf = SiglipImageProcessorPil(**{k: v for k, v in cfg.items() if k not in ("image_processor_type",
                                                                                "processor_class")})
    blobs = [p.read_bytes() for p in sorted(PHOTOS.glob("*.[pj][np]g"))]
    ref = np.stack([hf(Image.open(io.BytesIO(b)), return_tensors="np")["pixel_values"][0] for b in blobs])
    batch = model.prepare_images(blobs)
    assert batch.errors == [None] * len(blobs) and batch.pixels.shape == ref.shape == (len(blobs), 3, 64, 64)
    mad = np.abs(batch.pixels - ref).mean(axis=(1, 2, 3))
    assert mad.max() <= 0.03 and mad.mean() <= 0.015, mad
    assert _cos(model.encode_pixels(batch.pixels), model.encode_pixels(ref)).min() >= 0.995


@pytest.mark.parametrize("processor_config", [
    None,  # no preprocessor_config.json: SigLIP's processor defaults at the model's image size
    {"size": {"height": 64, "width": 64}},  # a file that names no processor class: the model's (SigLIP's) defaults
    {"image_processor_type": "SiglipImageProcessor", "size": {"height": 64, "width": 64}},
])
def test_processor_defaults_are_siglips_not_clips(built, tmp_path, processor_config):
    """Keys a SigLIP folder's processor config leaves out (or the whole file) take SiglipImageProcessor's
    defaults, as transformers builds it for the folder: resize to height x width, no crop, mean and std 0.5 (it
    took CLIPImageProcessor's: a centre crop and OpenAI's mean/std, mean abs pixel error up to 0.64)."""
    import shutil

    from PIL import Image
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    _, out = built("tiny")
    folder = tmp_path / "model"
    shutil.copytree(out, folder)
    (folder / "preprocessor_config.json").unlink()
    if processor_config is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor_config))
    model = engine.load_model(folder)
    hf = SiglipImageProcessorPil(size={"height": 64, "width": 64})  # every other setting: the class default
    blobs = [p.read_bytes() for p in sorted(PHOTOS.glob("*.[pj][np]g"))]
    ref = np.stack([hf(Image.open(io.BytesIO(b)), return_tensors="np")["pixel_values"][0] for b in blobs])
    pixels = model.prepare_images(blobs).pixels
    assert pixels.shape == ref.shape == (len(blobs), 3, 64, 64)
    mad = np.abs(pixels - ref).mean(axis=(1, 2, 3))
    assert mad.max() <= 0.03 and mad.mean() <= 0.015, mad


def test_processor_kind_follows_the_class_a_file_names():
    """A file's ``image_processor_type`` picks the defaults (transformers builds that class), over the model's."""
    from engine.image_config import HALF, OPENAI_CLIP_MEAN, ImageConfig

    siglip = ImageConfig.from_hf({"image_processor_type": "SiglipImageProcessorFast"}, kind="clip")
    assert (siglip.resize_hw, siglip.do_center_crop, siglip.image_mean, siglip.image_std) == ((224, 224), False,
                                                                                              HALF, HALF)
    clip = ImageConfig.from_hf({"image_processor_type": "CLIPImageProcessor"}, kind="siglip")
    assert clip == ImageConfig() and clip.image_mean == OPENAI_CLIP_MEAN
    assert ImageConfig.from_hf({}, kind="siglip") == siglip
    assert ImageConfig.from_hf({"feature_extractor_type": "CLIPFeatureExtractor"}, kind="siglip") == ImageConfig()


def test_so400m_processor_config_resizes_to_384_without_a_crop(tmp_path):
    """A SigLIP processor config has no crop keys: ImageConfig must not fall back to CLIP's 224 centre crop (it
    did, and so400m's 384 px tower refused the folder); pixels against transformers' at 384 px."""
    from PIL import Image
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from engine.image_processor import ArrowImageProcessor, ImageConfig

    write_preprocessor_config(tmp_path, 384)
    config = ImageConfig.from_dir(tmp_path)
    assert config.output_hw == (384, 384) and not config.do_center_crop
    hf = SiglipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    blobs = [p.read_bytes() for p in sorted(PHOTOS.glob("*.[pj][np]g"))]
    ref = np.stack([hf(Image.open(io.BytesIO(b)), return_tensors="np")["pixel_values"][0] for b in blobs])
    with ArrowImageProcessor(config, threads=1) as proc:
        pixels = proc(blobs).pixels
    assert pixels.shape == ref.shape == (len(blobs), 3, 384, 384)
    mad = np.abs(pixels - ref).mean(axis=(1, 2, 3))
    assert mad.max() <= 0.03 and mad.mean() <= 0.015, mad


def test_served_over_flight_equals_in_process(built):
    from engine.scheduler import Scheduler
    from flight_client import EmbeddingClient
    from flight_server.config import ServerConfig
    from flight_server.servicer import EmbeddingServer

    _, out = built("tiny")
    model = engine.load_model(out)
    photo = (PHOTOS / "rocket.jpg").read_bytes()
    rows = [r.tolist() for r in model.prepare_texts(TEXTS)[0]]
    with Scheduler(model) as scheduler, EmbeddingServer({"m": scheduler}, ServerConfig(port=0)) as server, \
            EmbeddingClient(f"grpc://127.0.0.1:{server.port}") as client:
        np.testing.assert_allclose(client.embed_texts(TEXTS, model="m"), model.encode_text(TEXTS), atol=1e-6)
        np.testing.assert_allclose(client.embed_images([photo], model="m"), model.encode_image([photo]), atol=1e-6)
        np.testing.assert_allclose(client.embed_tokens(rows, model="m"), model.encode_text(TEXTS), atol=1e-5)


def test_without_tokenizer_json_images_and_token_ids_still_work(built, tmp_path):
    """SigLIP's hub checkpoints ship spiece.model (a SentencePiece model, read by transformers' SiglipTokenizer)
    and no tokenizer.json: the model loads, pads with config.json's pad_token_id, embeds images and token ids,
    and a text request says what is missing."""
    import shutil

    from engine.errors import InputError

    _, out = built("tiny")
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(out, folder)
    (folder / "tokenizer.json").unlink()
    base, model = engine.load_model(out), engine.load_model(folder)
    assert model.config.pad_id == 1
    rows = [r.tolist() for r in base.prepare_texts(TEXTS)[0]]
    np.testing.assert_allclose(model.encode_tokens(rows), base.encode_text(TEXTS), atol=1e-6)
    px = _pixels(2, 64).numpy()
    np.testing.assert_array_equal(model.encode_pixels(px), base.encode_pixels(px))
    with pytest.raises(InputError, match="tokenizer.json is missing.*token ids"):
        model.encode_text(["a cat"])
