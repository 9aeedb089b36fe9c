"""Sentence-transformers beyond all-MiniLM-L6-v2: BERT, RoBERTa, XLM-R, MPNet, DistilBERT and ALBERT encoders, every
pooling mode, do_lower_case, and the checkpoint layouts of sentence-transformers before 6.x and since.

Each checkpoint is tiny (random weights, fixed seed), saved by the installed sentence-transformers, converted,
and compared with sentence-transformers' own ``encode`` on the same directory.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import engine
from convert.pipeline import convert_checkpoint
from engine.errors import ModelConfigError

from checkpoints import minilm_dir

TEXTS = [
    "A photo of a cat",
    "",
    "Hello World, UPPER and lower Case",
    "Ünïcode café naïve 日本語",
    "x <pad> y </s> z <s>",  # RoBERTa's own special tokens inside a text
    "word " * 100,  # past every max_seq_length here: truncated
]
_CORPUS = [t.lower() for t in TEXTS[:5]] + ["the quick brown fox jumps over the lazy dog"] * 20


def _hf_encoder(out: Path, arch: str, masked_lm: bool = False) -> Path:
    """A random-weight HF encoder of ``arch`` (bert, roberta, xlm-roberta, mpnet, distilbert) with a tokenizer,
    saved to ``out``; with ``masked_lm``, saved from the masked-LM model (base weights under a prefix, a head)."""
    import transformers
    from transformers import (AlbertConfig, BertConfig, BertModel, BertTokenizerFast, DistilBertConfig, MPNetConfig,
                              RobertaConfig, RobertaModel, RobertaTokenizerFast, XLMRobertaConfig, XLMRobertaModel)

    geometry = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    if arch == "bert":
        tok = BertTokenizerFast.from_pretrained(str(minilm_dir()))
        model = BertModel(BertConfig(vocab_size=len(tok), max_position_embeddings=64, **geometry))
    elif arch in ("mpnet", "distilbert", "albert"):
        if arch == "mpnet":  # 160 rows of positions, so bias buckets past 8 and past 128 tokens both occur
            tok = _mpnet_tokenizer(out / "vocab")
            config = MPNetConfig(vocab_size=len(tok), max_position_embeddings=160, pad_token_id=1, **geometry)
        elif arch == "distilbert":
            tok = BertTokenizerFast.from_pretrained(str(minilm_dir()))
            config = DistilBertConfig(vocab_size=len(tok), max_position_embeddings=64, dim=32, n_layers=2, n_heads=4,
                                      hidden_dim=64)
        else:  # ALBERT: 16-wide embeddings mapped to 32; 5 layers over 2 groups of 2 blocks (HF: 0,0,0,1,1)
            tok = BertTokenizerFast.from_pretrained(str(minilm_dir()))
            config = AlbertConfig(vocab_size=len(tok), max_position_embeddings=64, embedding_size=16, hidden_size=32,
                                  num_hidden_layers=5, num_hidden_groups=2, inner_group_num=2, num_attention_heads=4,
                                  intermediate_size=64)
        name = {"mpnet": "MPNet", "distilbert": "DistilBert", "albert": "Albert"}[arch]
        full = getattr(transformers, f"{name}ForMaskedLM" if masked_lm else f"{name}Model")(config)
        model = getattr(full, arch, full)  # the base model inside a masked-LM one
        with torch.no_grad():  # attention that matters: a wrong bias, bucket or mask must show in the cosine
            blocks = {"distilbert": lambda: model.transformer.layer, "mpnet": lambda: model.encoder.layer,
                      "albert": lambda: [b for g in model.encoder.albert_layer_groups for b in g.albert_layers]}[arch]()
            for layer in blocks:
                a = layer.attention
                projections = {"distilbert": lambda: (a.v_lin, a.out_lin), "mpnet": lambda: (a.attn.v, a.attn.o),
                               "albert": lambda: (a.value, a.dense)}[arch]()
                for proj in projections:
                    proj.weight.normal_(0, 0.3)
            if arch == "mpnet":
                model.encoder.relative_attention_bias.weight.normal_(0, 2.0)
            model.embeddings.position_embeddings.weight.normal_(0, 1.0)
        full.save_pretrained(str(out / "hf"))
        tok.save_pretrained(str(out / "hf"))
        return out / "hf"
    else:
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(_CORPUS, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        (out / "bpe").mkdir(parents=True)
        bpe.save_model(str(out / "bpe"))
        tok = RobertaTokenizerFast.from_pretrained(str(out / "bpe"))
        assert len(tok) == bpe.get_vocab_size() > 100
        # RoBERTa's position table: pad_token_id (1) + 1 rows before the first token's, as the real ones (514)
        cfg_cls, model_cls = (RobertaConfig, RobertaModel) if arch == "roberta" else (XLMRobertaConfig,
                                                                                     XLMRobertaModel)
        model = model_cls(cfg_cls(vocab_size=len(tok), max_position_embeddings=34, pad_token_id=1, **geometry))
    with torch.no_grad():  # a random position table that matters: wrong positions must show in the cosine
        model.embeddings.position_embeddings.weight.normal_(0, 1.0)
    model.save_pretrained(str(out / "hf"))
    tok.save_pretrained(str(out / "hf"))
    return out / "hf"


def _mpnet_tokenizer(out: Path):
    """MPNet's tokenizer as all-mpnet-base-v2 has it: BERT's WordPiece vocabulary behind <s> <pad> </s> <unk>
    (pad is id 1) and <mask> last, 30,527 entries."""
    from transformers import MPNetTokenizerFast

    vocab = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    out.mkdir(parents=True)
    (out / "vocab.txt").write_text("\n".join(specials + [w for w in vocab if w not in specials]) + "\n<mask>\n",
                                   encoding="utf-8")
    tok = MPNetTokenizerFast.from_pretrained(str(out), unk_token="<unk>")
    assert tok.pad_token_id == 1
    return tok


def _sentence_transformer(hf_dir: Path, out: Path, pooling: str, normalize: bool, max_seq: int,
                          lowercase: bool = False, dense: tuple = ()) -> Path:
    """``dense``: (out_features, torch.nn activation class name, bias) of each Dense module after pooling."""
    from sentence_transformers import SentenceTransformer
    try:  # sentence-transformers >= 6
        from sentence_transformers.base.modules import Dense, Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

    modules = [Transformer(str(hf_dir), max_seq_length=max_seq, do_lower_case=lowercase)]
    dim = getattr(modules[0], "get_embedding_dimension", None) or modules[0].get_word_embedding_dimension
    modules.append(Pooling(dim(), pooling_mode=pooling))
    width = dim()
    torch.manual_seed(1)
    for n_out, act, bias in dense:
        modules.append(Dense(width, n_out, bias=bias, activation_function=getattr(torch.nn, act)()))
        with torch.no_grad():  # weights that matter (Dense's default init is small)
            modules[-1].linear.weight.normal_(0, 0.5)
        width = n_out
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


def _legacy_layout(src: Path, out: Path) -> Path:
    """``src`` rewritten as sentence-transformers 2.x-5.x wrote it: ``sentence_transformers.models.*`` module
    types, one boolean per pooling mode, max_seq_length in sentence_bert_config.json."""
    shutil.copytree(src, out)
    modules = json.loads((out / "modules.json").read_text())
    for m in modules:
        m["type"] = "sentence_transformers.models." + m["type"].rsplit(".", 1)[-1]
    (out / "modules.json").write_text(json.dumps(modules))
    pool = json.loads((out / "1_Pooling" / "config.json").read_text())
    legacy = {"word_embedding_dimension": pool["embedding_dimension"]}
    legacy.update({key: pool["pooling_mode"] == mode for key, mode in (
        ("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"), ("pooling_mode_max_tokens", "max"),
        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
        ("pooling_mode_weightedmean_tokens", "weightedmean"), ("pooling_mode_lasttoken", "lasttoken"))})
    (out / "1_Pooling" / "config.json").write_text(json.dumps(legacy))
    for m in modules:  # sentence-transformers 2.x saved a Dense module's weights as pytorch_model.bin
        weights = out / m["path"] / "model.safetensors"
        if m["type"].endswith(".Dense") and weights.exists():
            from safetensors.torch import load_file

            torch.save(load_file(str(weights)), out / m["path"] / "pytorch_model.bin")
            weights.unlink()
    st_cfg = json.loads((out / "sentence_bert_config.json").read_text())
    max_seq = json.loads((out / "tokenizer_config.json").read_text())["model_max_length"]
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_seq, "do_lower_case": st_cfg.get("do_lower_case", False)}))
    return out


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st-encoders")
    return {arch: _hf_encoder(root / arch, arch)
            for arch in ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "albert")}


def _check(src: Path, tmp: Path, precision: str = "fp32") -> engine.Model:
    from sentence_transformers import SentenceTransformer

    convert_checkpoint(src, tmp / "converted", progress=False)
    model = engine.load_model(tmp / "converted", precision=precision)
    ref = SentenceTransformer(str(src), device="cpu")
    want = ref.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    got = model.encode_text(TEXTS)
    cos = (want * got).sum(1)
    assert cos.min() >= (0.99999 if precision == "fp32" else 0.99), (precision, cos)
    assert model.config.max_seq_length == ref.max_seq_length
    return model


@pytest.mark.parametrize("arch,pooling,normalize", [
    ("bert", "mean", True), ("bert", "cls", False), ("bert", "max", True),
    ("bert", "mean_sqrt_len_tokens", False), ("bert", "weightedmean", True), ("bert", "lasttoken", False),
    ("roberta", "mean", True), ("roberta", "cls", False), ("xlm-roberta", "mean", True), ("mpnet", "mean", True),
    ("mpnet", "cls", False), ("distilbert", "mean", True), ("distilbert", "cls", False), ("albert", "mean", True),
    ("albert", "cls", False)])
@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_matches_sentence_transformers(encoders, tmp_path, arch, pooling, normalize, layout):
    src = _sentence_transformer(encoders[arch], tmp_path / "st", pooling, normalize, max_seq=24)
    if layout == "legacy":
        src = _legacy_layout(src, tmp_path / "legacy")
    model = _check(src, tmp_path)
    assert model.config.pooling == pooling and model.config.normalize == normalize
    assert model.config.model_type == arch


def test_roberta_positions_start_after_the_pad_token(encoders, tmp_path):
    """RoBERTa's 34-row table holds 32 positions (rows 0-1 come before the first token's): texts are cut at 32
    tokens even when max_seq_length says 64, and token-id rows may be 32 ids long, no longer. (Past 32 tokens
    sentence-transformers itself fails: it caps at max_position_embeddings, 34.)"""
    src = _sentence_transformer(encoders["roberta"], tmp_path / "st", "mean", True, max_seq=64)
    convert_checkpoint(src, tmp_path / "converted", progress=False)
    model = engine.load_model(tmp_path / "converted")
    assert model.config.position_offset == 2 and model.info.max_tokens == 32 and model.config.max_seq_length == 32
    rows, _ = model.prepare_texts(["word " * 100])
    assert len(rows[0]) == 32 and rows[0][-1] == 2  # still ends with </s>
    result = model.embed_tokens([[0] + [5] * 30 + [2], [0] + [5] * 31 + [2]])
    assert result.errors[0] is None and "32" in result.errors[1]
    assert np.isfinite(model.encode_text(["word " * 100])).all()


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_roberta_in_every_cpu_precision(encoders, tmp_path, precision):
    src = _sentence_transformer(encoders["roberta"], tmp_path / "st", "mean", True, max_seq=24)
    _check(src, tmp_path, precision)


def test_do_lower_case_lowercases_before_a_cased_tokenizer(tmp_path):
    """``do_lower_case: true`` in sentence_bert_config.json over a cased tokenizer, as sentence-transformers
    reads it in either layout (6.2 itself writes the Lowercase into tokenizer.json instead)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(minilm_dir()), do_lower_case=False)  # cased: "Hello" is unknown
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(str(tmp_path / "hf"))
    tok.save_pretrained(str(tmp_path / "hf"))
    src = _sentence_transformer(tmp_path / "hf", tmp_path / "st", "mean", True, max_seq=24)
    legacy = _legacy_layout(src, tmp_path / "legacy")
    for path in (src, legacy):
        st_cfg = path / "sentence_bert_config.json"
        st_cfg.write_text(json.dumps(dict(json.loads(st_cfg.read_text()), do_lower_case=True)))
        model = _check(path, tmp_path / f"out-{path.name}")
        assert model.config.lowercase
        hello = model.prepare_texts(["Hello World"])[0][0]
        assert (hello == model.prepare_texts(["hello world"])[0][0]).all() and 100 not in hello  # 100: [UNK]


def test_truncation_side_left_keeps_the_end_of_a_long_text(encoders, tmp_path):
    from sentence_transformers import SentenceTransformer

    src = _sentence_transformer(encoders["bert"], tmp_path / "st", "mean", True, max_seq=24)
    tok_cfg = src / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps(dict(json.loads(tok_cfg.read_text()), truncation_side="left")))
    model = _check(src, tmp_path)
    text = " ".join(f"word{i} the quick brown fox" for i in range(30))  # its start and end differ
    want = SentenceTransformer(str(src), device="cpu").encode([text], normalize_embeddings=True)
    assert float((model.encode_text([text]) * want).sum()) >= 0.99999
    ids = model.prepare_texts([text])[0][0]
    assert len(ids) == 24 and ids[0] == 101 and ids[-1] == 102  # [CLS] ... the end of the text ... [SEP]


def test_unsupported_layouts_are_clear_errors(encoders, tmp_path):
    src = _sentence_transformer(encoders["bert"], tmp_path / "st", "mean", True, max_seq=24)
    convert_checkpoint(src, tmp_path / "ok", progress=False)
    pool = tmp_path / "ok" / "1_Pooling" / "config.json"
    pool.write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": ["mean", "max"]}))
    with pytest.raises(ModelConfigError, match="pooling"):
        engine.load_model(tmp_path / "ok")
    pool.write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "mean"}))
    modules = json.loads((tmp_path / "ok" / "modules.json").read_text())
    (tmp_path / "ok" / "modules.json").write_text(json.dumps(modules[:1]))  # no Pooling module
    with pytest.raises(ModelConfigError, match="Pooling"):
        engine.load_model(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "ok" / "config.json").write_text(json.dumps(dict(config, position_embedding_type="relative_key")))
    with pytest.raises(ModelConfigError, match="relative_key"):
        engine.load_model(tmp_path / "ok")


def test_sentence_transformer_over_an_encoder_the_engine_does_not_run_is_stored_with_a_warning(encoders, tmp_path,
                                                                                               caplog):
    src = _sentence_transformer(encoders["bert"], tmp_path / "st", "mean", True, max_seq=24)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, model_type="t5")))
    manifest = convert_checkpoint(src, tmp_path / "out", progress=False).manifest
    assert manifest.kind == "store"
    assert any("t5" in r.getMessage() and "store mode" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("precision", ["fp32", "int8", "bf16"])
def test_mpnet_position_bias_over_long_texts_and_padded_batches(encoders, tmp_path, precision):
    """MPNet's relative-position bias in every bucket range (exact < 8, log-spaced, capped past 128) and with
    padded keys: texts up to 150 tokens against sentence-transformers, and a row batched with a shorter one
    equal to the row alone."""
    from sentence_transformers import SentenceTransformer

    src = _sentence_transformer(encoders["mpnet"], tmp_path / "st", "mean", True, max_seq=150)
    convert_checkpoint(src, tmp_path / "converted", progress=False)
    model = engine.load_model(tmp_path / "converted", precision=precision)
    assert model.config.model_type == "mpnet" and model.config.position_offset == 2
    texts = ["the quick brown fox " * 40, "a cat " * 60, "a photo of a dog on the beach", ""]
    want = SentenceTransformer(str(src), device="cpu").encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    got = model.encode_text(texts)
    assert (want * got).sum(1).min() >= (0.99999 if precision == "fp32" else 0.99)
    a, b = "one two three four five six seven eight nine ten " * 10, "one two three four five six " * 15
    rows, _ = model.prepare_texts([a, b])
    assert len(rows[0]) > len(rows[1]) and len(model.text_groups([len(r) for r in rows])) == 1  # b is padded
    together = model.encode_text([a, b])
    alone = np.concatenate([model.encode_text([a]), model.encode_text([b])])
    np.testing.assert_allclose(together, alone, atol=1e-5 if precision == "fp32" else 2e-2, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch,max_seq", [("mpnet", 384), ("distilbert", 512)])
def test_full_geometry_of_all_mpnet_base_v2_and_multi_qa_distilbert(tmp_path, arch, max_seq):
    """MPNetConfig's and DistilBertConfig's defaults are all-mpnet-base-v2's and multi-qa-distilbert-cos-v1's
    geometry (768 wide, 12 heads, MLP 3072, 514 or 512 positions), with the depth cut to 2 of their 12 or 6
    identical layers (the suite's time and disk; layer count is checked by the tiny tests); random weights (seed
    0), their max_seq_length, mean pooling and Normalize as those models have."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertModel, MPNetConfig, MPNetModel

    if arch == "mpnet":
        tok = _mpnet_tokenizer(tmp_path / "vocab")
        make = lambda: MPNetModel(MPNetConfig(vocab_size=len(tok), num_hidden_layers=2))  # noqa: E731
    else:
        tok = BertTokenizerFast.from_pretrained(str(minilm_dir()))
        make = lambda: DistilBertModel(DistilBertConfig(vocab_size=len(tok), n_layers=2))  # noqa: E731
    torch.manual_seed(0)
    model = make()
    model.save_pretrained(str(tmp_path / "hf"))
    tok.save_pretrained(str(tmp_path / "hf"))
    del model
    src = _sentence_transformer(tmp_path / "hf", tmp_path / "st", "mean", True, max_seq=max_seq)
    convert_checkpoint(src, tmp_path / "converted", progress=False)
    ours = engine.load_model(tmp_path / "converted")
    assert ours.info.dim == 768 and ours.config.max_seq_length == max_seq
    texts = TEXTS + ["a long caption about a photo " * 120]  # past max_seq_length: truncated
    want = SentenceTransformer(str(src), device="cpu").encode(texts, convert_to_numpy=True,
                                                              normalize_embeddings=True)
    got = ours.encode_text(texts)
    assert (want * got).sum(1).min() >= 0.99999
    assert np.abs(want - got).max() <= 1e-4


@pytest.mark.parametrize("arch", ["mpnet", "distilbert", "albert"])
def test_weights_saved_from_a_masked_lm_model_convert_with_the_head_dropped(tmp_path, arch):
    hf = _hf_encoder(tmp_path / "enc", arch, masked_lm=True)
    src = _sentence_transformer(hf, tmp_path / "st", "mean", True, max_seq=24)
    shutil.copy(hf / "model.safetensors", src / "model.safetensors")  # ST saves the base model: put the MLM file back
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert all(n.startswith((f"{arch}.", "lm_head.", "vocab_", "predictions.")) for n in names) and not any(
        n.startswith(("embeddings.", "encoder.", "transformer.")) for n in names)
    model = _check(src, tmp_path)
    assert model.config.model_type == arch


@pytest.mark.parametrize("arch,dense,normalize", [
    ("bert", ((16, "Tanh", True),), True),
    ("distilbert", ((24, "Tanh", True), (16, "Identity", False)), False),
    ("mpnet", ((48, "ReLU", True),), True)])
@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_dense_modules_after_pooling(encoders, tmp_path, arch, dense, normalize, layout):
    """Dense heads (LaBSE, distiluse-base-multilingual-cased's layout): their weights move into weights.arrow
    from the module folder (model.safetensors, or pytorch_model.bin as sentence-transformers 2.x saved it)."""
    src = _sentence_transformer(encoders[arch], tmp_path / "st", "mean", normalize, max_seq=24, dense=dense)
    if layout == "legacy":
        src = _legacy_layout(src, tmp_path / "legacy")
        assert (src / "2_Dense" / "pytorch_model.bin").exists() and not (src / "2_Dense" / "model.safetensors").exists()
    model = _check(src, tmp_path)
    assert model.info.dim == dense[-1][0] and [d.act for d in model.config.dense] == [d[1] for d in dense]
    assert not list((tmp_path / "converted").rglob("*.bin")) and not list((tmp_path / "converted").rglob(
        "model.safetensors"))  # the Dense weights live in weights.arrow only


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_dense_modules_in_every_cpu_precision(encoders, tmp_path, precision):
    src = _sentence_transformer(encoders["bert"], tmp_path / "st", "cls", True, max_seq=24,
                                dense=((24, "Tanh", True),))
    _check(src, tmp_path, precision)


def test_dense_module_faults_are_clear(encoders, tmp_path, caplog):
    src = _sentence_transformer(encoders["bert"], tmp_path / "st", "mean", True, max_seq=24,
                                dense=((16, "Tanh", True),))
    convert_checkpoint(src, tmp_path / "ok", progress=False)
    cfg_path = tmp_path / "ok" / "2_Dense" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, activation_function="torch.nn.modules.activation.Softplus")))
    with pytest.raises(ModelConfigError, match="Softplus"):
        engine.load_model(tmp_path / "ok")
    cfg_path.write_text(json.dumps(dict(cfg, in_features=99)))
    with pytest.raises(ModelConfigError, match="in_features 99"):
        engine.load_model(tmp_path / "ok")
    (src / "2_Dense" / "model.safetensors").unlink()  # weights gone: stored, with a warning, not half-converted
    assert convert_checkpoint(src, tmp_path / "store", progress=False).manifest.kind == "store"
    assert any("Dense" in r.getMessage() and "store mode" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("layout", ["current", "before-3.x"])
def test_sentence_transformers_clip_folders_convert_as_clip(tmp_path, layout):
    """sentence-transformers' CLIP checkpoints: 6.x saves the transformers CLIPModel at the folder's root;
    before 3.x it sat in ``0_CLIPModel/`` beside modules.json (sentence-transformers/clip-ViT-B-32 on the hub).
    Both convert as CLIP and embed texts and images as sentence-transformers does."""
    from PIL import Image
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.modules import CLIPModel
    except ImportError:
        from sentence_transformers.models import CLIPModel

    from checkpoints import make_clip_checkpoint

    st = SentenceTransformer(modules=[CLIPModel(str(make_clip_checkpoint(tmp_path / "clip")))], device="cpu")
    st.save(str(tmp_path / "st"))
    src = tmp_path / "st"
    if layout == "before-3.x":
        src = tmp_path / "old"
        (src / "0_CLIPModel").mkdir(parents=True)
        for f in (tmp_path / "st").iterdir():
            top = f.name in ("modules.json", "README.md", "config_sentence_transformers.json")
            shutil.copy(f, src / f.name if top else src / "0_CLIPModel" / f.name)
        modules = json.loads((src / "modules.json").read_text())
        modules[0].update(path="0_CLIPModel", type="sentence_transformers.models.CLIPModel")
        (src / "modules.json").write_text(json.dumps(modules))
    manifest = convert_checkpoint(src, tmp_path / "converted", progress=False).manifest
    assert (manifest.kind, manifest.architecture) == ("clip", "CLIPModel")
    model = engine.load_model(tmp_path / "converted")
    texts = ["a photo of a cat", "two dogs on a beach", ""]
    want = st.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    assert (model.encode_text(texts) * want).sum(1).min() >= 0.99999
    photo = sorted((Path(__file__).parent / "data" / "photos").glob("*.jpg"))[0]
    want = st.encode([Image.open(photo).convert("RGB")], convert_to_numpy=True, normalize_embeddings=True)
    got = model.encode_image([photo.read_bytes()])
    assert float((got * want).sum()) >= 0.999  # our resampling differs from PIL's bicubic by design (README)


def test_a_default_prompt_goes_before_every_text_as_sentence_transformers_puts_it(encoders, tmp_path):
    """config_sentence_transformers.json's default_prompt_name: sentence-transformers' encode puts that prompt
    before every text; so do we (token-id rows are taken as they are)."""
    src = _sentence_transformer(encoders["bert"], tmp_path / "st", "mean", True, max_seq=24)
    st_cfg = json.loads((src / "config_sentence_transformers.json").read_text())
    st_cfg.update(prompts={"query": "query: ", "passage": "passage: "}, default_prompt_name="query")
    (src / "config_sentence_transformers.json").write_text(json.dumps(st_cfg))
    model = _check(src, tmp_path)
    assert model.config.prompt == "query: "
    rows, _ = model.prepare_texts(["a cat"])
    assert model.tokenizer.load()._tok.encode("query: a cat").ids == rows[0].tolist()  # the raw tokenizer
    # Pooling that leaves the prompt out is not supported: a clear error, not different embeddings
    pool_cfg = tmp_path / "converted" / "1_Pooling" / "config.json"
    pool_cfg.write_text(json.dumps(dict(json.loads(pool_cfg.read_text()), include_prompt=False)))
    with pytest.raises(ModelConfigError, match="include_prompt"):
        engine.load_model(tmp_path / "converted")
    st_cfg["default_prompt_name"] = "nope"
    (tmp_path / "converted" / "config_sentence_transformers.json").write_text(json.dumps(st_cfg))
    with pytest.raises(ModelConfigError, match="nope"):
        engine.load_model(tmp_path / "converted")


def test_a_request_picks_a_prompt_by_name_as_sentence_transformers_encode_does(encoders, tmp_path):
    """prompt_name in-process, through the scheduler and over Flight gives what sentence-transformers'
    encode(prompt_name=...) gives; an unknown name is a request error that lists the model's prompts."""
    import pyarrow.flight as flight
    from sentence_transformers import SentenceTransformer

    from engine.scheduler import Scheduler
    from flight_client import EmbeddingClient
    from flight_server.config import ServerConfig
    from flight_server.servicer import EmbeddingServer

    src = _sentence_transformer(encoders["bert"], tmp_path / "st", "mean", True, max_seq=24)
    st_cfg = json.loads((src / "config_sentence_transformers.json").read_text())
    st_cfg.update(prompts={"query": "search_query: ", "document": "search_document: "}, default_prompt_name=None)
    (src / "config_sentence_transformers.json").write_text(json.dumps(st_cfg))
    convert_checkpoint(src, tmp_path / "converted", progress=False)
    model = engine.load_model(tmp_path / "converted")
    ref = SentenceTransformer(str(src), device="cpu")
    assert dict(model.info.prompts) == {"query": "search_query: ", "document": "search_document: "}
    assert model.info.default_prompt is None
    for name in (None, "query", "document"):
        want = ref.encode(TEXTS, prompt_name=name, convert_to_numpy=True, normalize_embeddings=True)
        got = model.encode_text(TEXTS, prompt_name=name)
        assert (want * got).sum(1).min() >= 0.99999, name
    with pytest.raises(engine.InputError, match=r"unknown prompt_name 'passage' .*its prompts are "
                                                r"\['document', 'query'\]"):
        model.encode_text(["x"], prompt_name="passage")
    with Scheduler(model) as scheduler, \
            EmbeddingServer({"st": scheduler}, ServerConfig(port=0)) as server, \
            EmbeddingClient(f"grpc://127.0.0.1:{server.port}") as client:
        local = model.encode_text(TEXTS, prompt_name="query")
        np.testing.assert_array_equal(scheduler.embed_texts(TEXTS, prompt_name="query").embeddings, local)
        np.testing.assert_array_equal(client.embed_texts(TEXTS, prompt_name="query"), local)
        (meta,) = client.models()
        assert meta["prompts"] == {"query": "search_query: ", "document": "search_document: "}
        assert meta["default_prompt"] is None
        with pytest.raises(flight.FlightServerError, match="unknown prompt_name 'passage' for model 'st'"):
            client.embed_texts(["x"], prompt_name="passage")
        command = json.dumps({"input": "tokens", "prompt_name": "query"}).encode()
        writer, reader = client._client.do_exchange(flight.FlightDescriptor.for_command(command))
        with pytest.raises(flight.FlightServerError, match='"prompt_name" applies to "text" and "pairs" input'):
            writer.begin(pa.schema([("input_ids", pa.list_(pa.int64()))]))
            writer.done_writing()
            reader.read_all()


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_albert_shared_blocks_in_every_cpu_precision(encoders, tmp_path, precision):
    src = _sentence_transformer(encoders["albert"], tmp_path / "st", "mean", True, max_seq=24)
    model = _check(src, tmp_path, precision)
    assert len(model.net.blocks) == 10  # 5 layers x 2 blocks per group, 4 distinct blocks
