"""SigLIP v1's tokenizer.json, built at convert time from spiece.model (convert/siglip_tokenizer.py), against
transformers' own SiglipTokenizer / SiglipProcessor on the same folder.

A SentencePiece unigram model is trained here, offline, on Python's own help texts (pydoc_data) plus accented,
Greek, CJK and emoji lines, with T5's special pieces (<pad> 0, </s> 1, <unk> 2) and nmt_nfkc normalization, as
SigLIP's spiece.model; the folder gets tokenizer_config.json and special_tokens_map.json as google/siglip-* ship
them and a tiny SiglipModel. transformers needs sentencepiece and protobuf for the reference; the conversion needs
neither.
"""
from __future__ import annotations

import io
import json
import random
import string
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

import google.protobuf  # noqa: E402,F401  the test extra's: transformers' SiglipTokenizer, the reference, needs both
import sentencepiece  # noqa: E402,F401

from test_model_siglip import random_model, write_gemma_tokenizer, write_preprocessor_config

import engine
from convert.pipeline import convert_checkpoint
from convert.siglip_tokenizer import SPIECE_FILE, build_siglip_tokenizer, read_spiece
from engine.errors import InputError

LENGTH = 64

# google/siglip-base-patch16-224's tokenizer_config.json and special_tokens_map.json
TOKENIZER_CONFIG = {
    "added_tokens_decoder": {
        "1": {"content": "</s>", "lstrip": True, "normalized": False, "rstrip": True, "single_word": False,
              "special": True},
        "2": {"content": "<unk>", "lstrip": True, "normalized": False, "rstrip": True, "single_word": False,
              "special": True}},
    "additional_special_tokens": [], "clean_up_tokenization_spaces": True, "do_lower_case": True,
    "eos_token": "</s>", "model_input_names": ["input_ids"], "model_max_length": 64, "pad_token": "</s>",
    "processor_class": "SiglipProcessor", "sp_model_kwargs": {}, "tokenizer_class": "SiglipTokenizer",
    "unk_token": "<unk>"}
SPECIAL_TOKENS_MAP = {key: {"content": value, "lstrip": True, "normalized": False, "rstrip": True,
                            "single_word": False}
                      for key, value in (("eos_token", "</s>"), ("pad_token", "</s>"), ("unk_token", "<unk>"))}

_EXTRA_LINES = ["Café naïve résumé façade über Ünïcode déjà vu São Paulo Ærøskøbing",
                "日本語のテキスト 東京 京都 中文 文本 北京", "emoji 🚀🐱 ok 😀 👍🏽",
                "ΟΔΟΣ οδός Σίσυφος Ελληνικά", "Straße größer İstanbul", "ﬁnancial ＡＢＣ ①② ½ ㎏"]

TEXTS = [
    "a photo of a cat", "", " ", "   \t\n ", "A diagram of the Falcon 9 rocket, on its launch pad at dawn!",
    # punctuation
    "!!! hello", "...", "a-b_c/d\\e", "(a) [b] {c} <d>", "\"quoted\" and 'single'", "x = f(y) + g[z] * 2;",
    "e-mail: someone@example.com, https://example.com/path?q=1&r=2#frag", "3.14159 $100 50% #1 ~tilde~ `tick`",
    "!a", "?!?! b !?!?", "end.", "-leading dash", "a , b , c",
    # case
    "UPPER CASE TEXT", "MiXeD CaSe", "ΟΔΟΣ ΣΊΣΥΦΟΣ", "İstanbul", "STRASSE Straße", "ǅ ǈ ǋ",
    # accents, decomposed forms, compatibility characters
    "Ünïcode: café, naïve, 日本語", "cafe\u0301 nai\u0308ve", unicodedata.normalize("NFD", "Việt Nam tiếng Việt"),
    unicodedata.normalize("NFD", "한국어 텍스트"), "ﬁnancial ﬂow", "ＡＢＣ１２３ ｈｅｌｌｏ", "①② ½ ㎏ ™ x²",
    "ｶﾞｷﾞ ﾃﾞｰﾀ ﾊﾟﾝ", "10時～12時", "ª̀ º́", "\u00a8x", "x \u00a8",
    # CJK, emoji
    "日本語のテキスト", "中文文本 ok", "한국어", "emoji 🚀🐱 ok", "🚀", "👍🏽 ❤️ 1️⃣ 🇯🇵", "👨‍👩‍👧",
    # whitespace
    "  spaced   out  ", "tab\tnew\nline\r\nend", "\u3000ideographic\u3000space", "nbsp\u00a0here", "a\x1cb\x1dc\x1fd",
    "a\x85b", "zero\u200bwidth", "\u200b", "a\u2028b\u2029c",
    # the "▁" SentencePiece writes for spaces, and special tokens spelled in the text
    "▁lead", " ▁ x", "a▁▁b", "a </s> b", "</s>", "x </s>", "</s> a", "<unk> hi", "  </s>  hi", "!!</s>b",
    "a</s></s>", "a </s> \u200b", "x</s>!!\u200b ", "<unk><unk>", "日<unk>本", "A</s>Σb", "AΣ</s>", "<pad> is text", "</S> not special",
    # longer than the 64 tokens the model reads: cut, end-of-text kept
    "word " * 120, "supercalifragilisticexpialidocious " * 30, "日本" * 200, "a" * 5000,
]

# documented differences (convert/siglip_tokenizer.py): NFKC composes these where SentencePiece does not, and a
# control piece spelled by NFKC is matched as that piece
KNOWN_DIFFERENT = ["ﬁ\u0301", "a\u0327\u0300", "＜pad＞"]


def _train_spiece(lines: list[str], vocab_size: int = 2000, **kwargs) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=2, num_threads=1, **{"model_type": "unigram", **kwargs})
    return out.getvalue()


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    lines = [line.strip() for text in topics.values() for line in text.splitlines() if line.strip()]
    return lines + _EXTRA_LINES * 20


def make_siglip_v1(out: Path, spiece: bytes, seed: int = 0) -> Path:
    """A SigLIP v1 folder as the hub has it: spiece.model, tokenizer_config.json, special_tokens_map.json,
    preprocessor_config.json, a tiny SiglipModel; no tokenizer.json."""
    from transformers import SiglipConfig, SiglipModel

    out.mkdir(parents=True)
    (out / SPIECE_FILE).write_bytes(spiece)
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2))
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = dict(vocab_size=len(read_spiece(spiece).pieces), **small)
    model = random_model(SiglipModel, SiglipConfig(text_config=text, vision_config=dict(
        image_size=32, patch_size=16, **small)), seed)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(10.0)))
        model.logit_bias.fill_(-2.0)
    model.save_pretrained(str(out))
    write_preprocessor_config(out, 32)
    return out


@pytest.fixture(scope="module")
def spiece() -> bytes:
    return _train_spiece(_corpus())


@pytest.fixture(scope="module")
def converted(tmp_path_factory, spiece) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("siglip-v1")
    src = make_siglip_v1(root / "hf", spiece)
    assert not (src / "tokenizer.json").exists()
    return src, convert_checkpoint(src, root / "model", progress=False).out_dir


def _hf_ids(tok, texts: list[str]) -> list[list[int]]:
    """SiglipTokenizer's ids as SiglipProcessor is called for text (padded to 64, cut at 64), pads removed."""
    enc = tok(texts, padding="max_length", max_length=LENGTH, truncation=True, return_attention_mask=True)
    return [ids[:sum(mask)] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]


def _sweep() -> list[str]:
    """Characters of every kind, each between two letters; letters with combining marks as NFD writes them."""
    rng = random.Random(0)
    chars = [chr(c) for c in range(0x20, 0x30000) if unicodedata.category(chr(c)) not in ("Cs", "Co", "Cn")]
    texts = ["a" + c + "b" for c in chars[::11]] + [c for c in chars[5::97]]
    texts += sorted({unicodedata.normalize(form, c) for c in chars[::3] for form in ("NFD", "NFKD")} - set(chars))
    alphabet = list("abcAB Σσ!.,-  \t\n日本é\u0301ＡＢ①🚀▁<>/s") + ["</s>", "<unk>", "  ", "ｶﾞ", "～"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16))) for _ in range(1500)]
    return texts


# ---------------------------------------------------------------- ids and embeddings


def test_ids_equal_siglip_processor(converted):
    from transformers import AutoTokenizer, SiglipProcessor

    src, out = converted
    manifest = json.loads((out / "manifest.json").read_text())
    assert "tokenizer.json" in manifest["files"] and SPIECE_FILE in manifest["files"]
    processor = SiglipProcessor.from_pretrained(str(src))
    tok = AutoTokenizer.from_pretrained(str(src))
    assert type(tok).__name__ == type(processor.tokenizer).__name__ == "SiglipTokenizer"  # the slow reference
    model = engine.load_model(out)
    assert model.config.pad_id == 1 and model.config.text_length == LENGTH

    rows, errors = model.prepare_texts(TEXTS)
    assert errors == [None] * len(TEXTS)
    ours = [r.tolist() for r in rows]
    want = _hf_ids(processor.tokenizer, TEXTS)
    bad = [(t, w, o) for t, w, o in zip(TEXTS, want, ours) if w != o]
    assert not bad, bad[:5]
    assert max(len(r) for r in ours) == LENGTH and ours[1] == [1] and all(r[-1] == 1 for r in ours)

    texts = _sweep()
    rows, _ = model.prepare_texts(texts)
    want = tok(texts, truncation=True, max_length=LENGTH)["input_ids"]
    bad = [(t, w, r.tolist()) for t, w, r in zip(texts, want, rows) if w != r.tolist()]
    print(f"{len(TEXTS)} texts and {len(texts)} sweep texts: {len(bad)} differ")
    assert not bad, bad[:5]

    known = _hf_ids(tok, KNOWN_DIFFERENT)
    for text, w, r in zip(KNOWN_DIFFERENT, known, model.prepare_texts(KNOWN_DIFFERENT)[0]):
        print(f"documented difference {text!r}: SiglipTokenizer {tok.convert_ids_to_tokens(w)}, "
              f"tokenizer.json {tok.convert_ids_to_tokens(r.tolist())}")


def test_text_embeddings_equal_transformers(converted):
    from transformers import SiglipModel, SiglipProcessor

    src, out = converted
    hf = SiglipModel.from_pretrained(str(src)).eval()
    ids = SiglipProcessor.from_pretrained(str(src))(text=TEXTS, padding="max_length", max_length=LENGTH,
                                                   truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=ids).pooler_output.numpy()
    ours = engine.load_model(out).encode_text(TEXTS, normalize=False)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"text embeddings: min cosine {cos.min():.7f}, max abs diff {np.abs(ours - ref).max():.2e}")
    assert cos.min() >= 0.99999 and np.abs(ours - ref).max() <= 1e-4


def test_read_spiece_matches_protobuf(spiece):
    from sentencepiece import sentencepiece_model_pb2

    ref = sentencepiece_model_pb2.ModelProto.FromString(spiece)
    sp = read_spiece(spiece)
    assert sp.pieces == [(p.piece, p.score, p.type) for p in ref.pieces]
    assert sp.charsmap == ref.normalizer_spec.precompiled_charsmap and len(sp.charsmap) > 1000
    assert (sp.model_type, sp.unk_id, sp.byte_fallback) == (1, 2, False)
    assert (sp.add_dummy_prefix, sp.remove_extra_whitespaces, sp.escape_whitespaces) == (True, True, True)


# ---------------------------------------------------------------- when it is (not) built


def test_built_without_sentencepiece_or_protobuf(tmp_path, spiece, monkeypatch):
    """The conversion reads spiece.model itself: with sentencepiece and protobuf not importable, the same
    tokenizer.json."""
    src = make_siglip_v1(tmp_path / "hf", spiece)
    for name in ("sentencepiece", "google.protobuf"):
        monkeypatch.setitem(sys.modules, name, None)
    out = convert_checkpoint(src, tmp_path / "model", progress=False).out_dir
    monkeypatch.undo()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    rows, _ = engine.load_model(out).prepare_texts(TEXTS)
    assert [r.tolist() for r in rows] == _hf_ids(tok, TEXTS)


def test_folder_with_tokenizer_json_is_left_as_it_is(tmp_path, spiece):
    """SigLIP 2's Gemma layout (tokenizer.json, no spiece.model) and a v1 folder that has a tokenizer.json beside
    spiece.model: the converted folder holds the source's tokenizer.json, byte for byte."""
    from transformers import SiglipConfig, SiglipModel

    gemma = tmp_path / "siglip2"
    gemma.mkdir()
    vocab = write_gemma_tokenizer(gemma)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    random_model(SiglipModel, SiglipConfig(text_config=dict(vocab_size=vocab, **small),
                                           vision_config=dict(image_size=32, patch_size=16, **small)), 1
                 ).save_pretrained(str(gemma))
    v1 = make_siglip_v1(tmp_path / "v1", spiece)
    (v1 / "tokenizer.json").write_text((gemma / "tokenizer.json").read_text())  # any tokenizer.json
    for src in (gemma, v1):
        out = convert_checkpoint(src, tmp_path / f"out-{src.name}", progress=False).out_dir
        assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("case", ["garbage", "bpe", "byte_fallback", "other_class"])
def test_unusable_spiece_warns_and_converts(tmp_path, spiece, case, caplog):
    """A spiece.model that cannot be rebuilt exactly (not a SentencePiece model, BPE, byte fallback) or a folder
    naming another tokenizer class: the conversion succeeds with a warning; images and token ids still work."""
    src = make_siglip_v1(tmp_path / "hf", spiece)
    if case == "garbage":
        (src / SPIECE_FILE).write_bytes(b"\xff\xff\xff not a sentencepiece model")
    elif case == "bpe":
        (src / SPIECE_FILE).write_bytes(_train_spiece(_corpus()[:3000], 500, model_type="bpe"))
    elif case == "byte_fallback":
        (src / SPIECE_FILE).write_bytes(_train_spiece(_corpus()[:3000], 800, byte_fallback=True))
    else:
        (src / "tokenizer_config.json").write_text(json.dumps({**TOKENIZER_CONFIG, "tokenizer_class": "T5Tokenizer"}))
    out = convert_checkpoint(src, tmp_path / "model", progress=False).out_dir
    assert not (out / "tokenizer.json").exists()
    assert "tokenizer.json" in caplog.text and "token ids" in caplog.text, caplog.text
    model = engine.load_model(out)
    assert model.encode_tokens([[5, 6, 1]]).shape == (1, 64)
    with pytest.raises(InputError, match="tokenizer.json is missing"):
        model.encode_text(["a cat"])


def test_do_lower_case_false_and_other_max_length(tmp_path, spiece):
    """tokenizer_config.json's do_lower_case false keeps the case; model_max_length 16 cuts at 16."""
    from transformers import AutoTokenizer

    src = make_siglip_v1(tmp_path / "hf", spiece)
    (src / "tokenizer_config.json").write_text(json.dumps({**TOKENIZER_CONFIG, "do_lower_case": False,
                                                           "model_max_length": 16}))
    out = convert_checkpoint(src, tmp_path / "model", progress=False).out_dir
    tok = AutoTokenizer.from_pretrained(str(src))
    texts = TEXTS[:40] + ["ΟΔΟΣ Upper Lower"]
    rows, _ = engine.load_model(out).prepare_texts(texts)
    assert [r.tolist() for r in rows] == tok(texts, truncation=True, max_length=16)["input_ids"]
    assert rows[-1].tolist() != engine.load_model(tmp_path / "model").prepare_texts(["οδος upper lower"])[0][0].tolist()


def test_special_token_pieces_must_exist(spiece):
    from convert.siglip_tokenizer import SpieceError

    with pytest.raises(SpieceError, match="not a piece"):
        build_siglip_tokenizer(spiece, {**TOKENIZER_CONFIG, "eos_token": "<eos>"})
    punct = "".join(sorted(set(string.punctuation)))
    assert build_siglip_tokenizer(spiece, TOKENIZER_CONFIG).encode(punct).ids == [1]  # all removed: </s> alone
