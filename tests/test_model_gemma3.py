"""EmbeddingGemma (engine/gemma3.py) against sentence-transformers' own pipeline over transformers'
Gemma3TextModel, on the same random weights (fixed seeds), in EmbeddingGemma's layout: a sentence-transformers
folder (Transformer over Gemma3TextModel with bidirectional attention -> mean Pooling -> Dense -> Dense ->
Normalize) with its prompts, and a Gemma-style tokenizer (BPE with byte fallback, spaces as "▁", <bos> ... <eos>
added by the post-processor) trained here on a small corpus.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from convert.pipeline import convert_checkpoint
from engine import gemma3, ragged, registry
from engine.errors import ModelConfigError, PrecisionError, WeightFormatError

# config_sentence_transformers.json's prompts as google/embeddinggemma-300m ships them
PROMPTS = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "BitextMining": "task: search result | query: ",
    "Clustering": "task: clustering | query: ",
    "Classification": "task: classification | query: ",
    "InstructionRetrieval": "task: code retrieval | query: ",
    "MultilabelClassification": "task: classification | query: ",
    "PairClassification": "task: sentence similarity | query: ",
    "Reranking": "task: search result | query: ",
    "Retrieval": "task: search result | query: ",
    "Retrieval-query": "task: search result | query: ",
    "Retrieval-document": "title: none | text: ",
    "STS": "task: sentence similarity | query: ",
    "Summarization": "task: summarization | query: ",
}

TEXTS = [
    "A photo of a cat",
    "",
    "Hello World, UPPER and lower Case",
    "Ünïcode café naïve résumé — 日本語のテキスト 🎉",
    "two  spaces,\ttabs\nand new lines",
    "x <eos> y <bos> z <pad>",  # Gemma's own special tokens inside a text
    "the quick brown fox jumps over the lazy dog " * 12,  # ~ 100+ tokens: past the odd geometry's window
    "word " * 400,  # past every max_seq_length here but the real geometry's: truncated, <eos> kept
]
_CORPUS = ["the quick brown fox jumps over the lazy dog", "a photo of a cat on the beach", "hello world",
           "search result query text title none clustering classification summarization sentence similarity",
           "Ünïcode café naïve résumé", "task: search result | query: ", "title: none | text: ", "word word word"]

# (Gemma3TextConfig kwargs, Dense modules (out_features, activation, bias), max_seq_length)
GEOMETRIES = {
    # small and fast, EmbeddingGemma's shape otherwise: 1 key/value head, head_dim wider than hidden / heads
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=512,
                  layer_types=["sliding_attention", "full_attention"], max_position_embeddings=2048),
             ((256, "Identity", False), (64, "Identity", False)), 256),
    # google/embeddinggemma-300m's widths (its config.json) with 3 of its 24 layers and the vocabulary cut to 4,096
    "300m": (dict(hidden_size=768, intermediate_size=1152, num_hidden_layers=3, num_attention_heads=3,
                  num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                  max_position_embeddings=2048, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0),
             ((3072, "Identity", False), (768, "Identity", False)), 2048),
    # odd: window 16 (a query sees 8 tokens each side), 4 heads over 2 key/value heads, head_dim 24 (not 80 / 4),
    # query_pre_attn_scalar 30 (not head_dim), biased projections, other thetas and eps, one Tanh Dense with bias
    "odd": (dict(hidden_size=80, intermediate_size=200, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=30, sliding_window=16,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"], attention_bias=True,
                 max_position_embeddings=160, rms_norm_eps=1e-5, rope_theta=100_000.0, rope_local_base_freq=5_000.0),
            ((48, "Tanh", True),), 120),
}
VOCAB = {"tiny": 640, "300m": 4096, "odd": 600}  # rows of embed_tokens (the tokenizer uses the first ~420)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _tokenizer(out: Path):
    """A Gemma tokenizer as transformers' GemmaTokenizer makes one: <pad> <eos> <bos> <unk> <mask> as ids 0-4, the
    256 byte tokens <0x00>..<0xFF> (byte fallback: CJK and emoji become bytes), BPE merges trained on a small
    corpus, and <bos> $A <eos> in the post-processor, as EmbeddingGemma's tokenizer adds them."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    bpe.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(vocab_size=160, show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=True)
    tok.save_pretrained(str(out))
    return tok


def _embedding_gemma(out: Path, geometry: str, seed: int = 0) -> Path:
    """An EmbeddingGemma-layout sentence-transformers folder of ``geometry`` with random weights (``seed``)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import Gemma3TextConfig, Gemma3TextModel

    kwargs, dense, max_seq = GEOMETRIES[geometry]
    hf = out / "hf"
    tok = _tokenizer(hf)
    assert len(tok) <= VOCAB[geometry]
    config = Gemma3TextConfig(vocab_size=VOCAB[geometry], use_bidirectional_attention=True, **kwargs)
    torch.manual_seed(seed)
    model = Gemma3TextModel(config).eval()
    with torch.no_grad():  # RMSNorm weights start at 0 (a factor of 1): make (1 + weight) and every norm matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
    model.save_pretrained(str(hf))
    del model
    modules = [Transformer(str(hf), max_seq_length=max_seq)]
    width = kwargs["hidden_size"]
    modules.append(Pooling(width, pooling_mode="mean"))
    torch.manual_seed(seed + 1)
    for n_out, act, bias in dense:
        modules.append(Dense(width, n_out, bias=bias, activation_function=getattr(torch.nn, act)()))
        with torch.no_grad():  # weights that matter (Dense's default init is small)
            modules[-1].linear.weight.normal_(0, width ** -0.5)
        width = n_out
    modules.append(Normalize())
    SentenceTransformer(modules=modules, prompts=PROMPTS, default_prompt_name=None, device="cpu").save(str(out / "st"))
    return out / "st"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Sentence-transformers folders (built on first use) and their conversions: ``folders["tiny"]`` is the
    source, ``folders["tiny-converted"]`` the converted model directory."""
    root = tmp_path_factory.mktemp("gemma3")

    class _Lazy(dict):
        def __missing__(self, key: str) -> Path:
            name, _, what = key.partition("-")
            if what:
                convert_checkpoint(self[name], root / key, progress=False)
                self[key] = root / key
            else:
                self[key] = _embedding_gemma(root / key, key)
            return self[key]

    return _Lazy()


def _reference(src: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(src), device="cpu")


def _check_parity(src: Path, model: engine.Model, names=(None, "query", "document"), texts=TEXTS) -> dict:
    """Ours against sentence-transformers' encode for each prompt name: (min cosine, max abs) per name.
    sentence-transformers runs once per prompt text (several names share one)."""
    ref = _reference(src)
    numbers, wanted = {}, {}
    for name in names:
        prompt = None if name is None else ref.prompts[name]
        if prompt not in wanted:
            wanted[prompt] = ref.encode(texts, prompt_name=name, convert_to_numpy=True, normalize_embeddings=True)
        want = wanted[prompt]
        got = model.encode_text(texts, prompt_name=name)
        cos, diff = float(_cos(want, got).min()), float(np.abs(want - got).max())
        assert cos >= 0.99999 and diff <= 1e-4, (name, cos, diff)
        numbers[name] = (cos, diff)
    return numbers


def test_tiny_parity_with_every_prompt(folders):
    src, out = folders["tiny"], folders["tiny-converted"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "gemma3" and manifest["architecture"] == "Gemma3TextModel"
    model = engine.load_model(out)
    assert model.info.kind == "gemma3" and model.info.dim == 64 and model.config.max_seq_length == 256
    assert dict(model.info.prompts) == PROMPTS and model.info.default_prompt is None
    _check_parity(src, model, names=(None, *PROMPTS))


def test_odd_geometry_parity_and_batch_invariance(folders):
    """Window 16 with texts far longer than it (and rows padded far past it inside a batch), GQA 4 / 2,
    head_dim 24, biased projections, a Tanh Dense with bias."""
    src = folders["odd"]
    model = engine.load_model(folders["odd-converted"])
    cfg = model.config
    assert (cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.reach, cfg.max_seq_length) == (4, 2, 24, 8, 120)
    _check_parity(src, model)
    texts = ["the quick brown fox jumps over the lazy dog " * 8, "a cat", "hello world " * 5, ""]
    rows, _ = model.prepare_texts(texts)
    # the long row runs its sliding layers in blocks of queries (engine.ragged), the short ones densely
    assert len(rows[0]) >= ragged.BANDED_MIN_BLOCKS * cfg.sliding_window and len(rows[1]) < cfg.reach
    assert len(model.text_groups([len(r) for r in rows])) == 1  # one padded batch
    together = model.encode_text(texts)
    alone = np.concatenate([model.encode_text([t]) for t in texts])
    assert np.abs(together - alone).max() <= 1e-5


def test_banded_sliding_attention_equals_the_dense_band_mask(folders, monkeypatch):
    """Long rows run sliding layers in blocks over their key band; with the switch moved, the dense (T, T) band
    mask gives the same embeddings, padded rows and skipped blocks included."""
    model = engine.load_model(folders["odd-converted"])
    rows, _ = model.prepare_texts(["a cat", "hello world " * 5, "the quick brown fox jumps over the lazy dog " * 8])
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.from_numpy(r)
    lengths = torch.tensor([len(r) for r in rows])
    with torch.inference_mode():
        monkeypatch.setattr(ragged, "BANDED_MIN_BLOCKS", 10**9)
        dense = model.net(ids, lengths)
        monkeypatch.setattr(ragged, "BANDED_MIN_BLOCKS", 1)
        banded = model.net(ids, lengths)
    assert dense.shape == (3, model.info.dim)
    np.testing.assert_allclose(banded.numpy(), dense.numpy(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_embeddinggemma_300m_widths(folders):
    """hidden 768, 3 heads over 1 key/value head of 256, MLP 1152, query_pre_attn_scalar 256, window 512 (a text of
    ~320 tokens reaches past a query's 256 each side), thetas 1e6 / 1e4, Dense 768 -> 3072 -> 768; 3 of the 24
    layers (sliding, sliding, full), vocabulary cut to 4,096 rows. bf16 and int8 against fp32 on the same texts."""
    src, out = folders["300m"], folders["300m-converted"]
    model = engine.load_model(out)
    cfg = model.config
    assert (model.info.dim, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.reach, cfg.max_seq_length) == (
        768, 3, 1, 256, 256, 2048)
    texts = TEXTS[:6] + ["a photo of a cat on the beach, " * 35]
    assert max(len(r) for r in model.prepare_texts(texts)[0]) > cfg.reach + 1
    _check_parity(src, model, names=("query", "document"), texts=texts)  # no prompt: the other geometries
    for precision, goal in (("bf16", gemma3.BF16_MIN_COSINE), ("int8", gemma3.INT8_MIN_COSINE)):
        cos = _cos(model.encode_text(texts, prompt_name="query"),
                   engine.load_model(out, precision=precision).encode_text(texts, prompt_name="query"))
        assert cos.min() >= goal, (precision, cos)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_cpu_precisions(folders, precision):
    out = folders["odd-converted"]
    ref, low = engine.load_model(out), engine.load_model(out, precision=precision)
    for name in (None, "query"):
        cos = _cos(ref.encode_text(TEXTS, prompt_name=name), low.encode_text(TEXTS, prompt_name=name))
        goal = gemma3.BF16_MIN_COSINE if precision == "bf16" else gemma3.INT8_MIN_COSINE
        assert cos.min() >= goal, (name, cos)


def test_float16_is_refused(folders):
    model = engine.load_model(folders["tiny-converted"])
    model.net.half()
    with pytest.raises(PrecisionError, match="bf16"):
        model.net.encode_text(torch.tensor([[2, 100, 1]]), torch.tensor([3]))


def test_tokenization_equals_the_folders_own_tokenizer(folders):
    """Ours (tokenizer.json) against AutoTokenizer on the sentence-transformers folder, with the truncation
    sentence-transformers uses, with and without each kind of prompt; <bos> first, <eos> last, even when cut."""
    from transformers import AutoTokenizer

    src = folders["odd"]
    model = engine.load_model(folders["odd-converted"])
    tok = AutoTokenizer.from_pretrained(str(src))
    texts = TEXTS + ["日本語", "🎉🎉", "é", " leading and trailing ", "ÜNÏCODE CAFÉ"]
    for name in (None, "query", "document"):
        prompt = model.prompt(name)
        want = tok([prompt + t for t in texts], truncation=True, max_length=model.config.max_seq_length).input_ids
        got = model.prepare_texts(texts, prompt_name=name)[0]
        assert [list(r) for r in got] == want, name
        assert all(r[0] == 2 and r[-1] == 1 for r in got)
    assert len(got[TEXTS.index("word " * 400)]) == model.config.max_seq_length
    assert list(model.prepare_texts([""])[0][0]) == [2, 1]
    assert any(b >= 5 and b < 261 for b in model.prepare_texts(["日本語"])[0][0])  # byte-fallback tokens


def test_token_ids_and_trailing_pads(folders):
    model = engine.load_model(folders["tiny-converted"])
    rows, _ = model.prepare_texts(["a photo of a cat"])
    ids = [int(i) for i in rows[0]]
    np.testing.assert_allclose(model.encode_tokens([ids, ids + [0, 0]]), model.encode_text(["a photo of a cat"] * 2),
                               atol=1e-6)


def test_detection_is_exact(folders):
    src = folders["tiny"]
    config = json.loads((src / "config.json").read_text())
    assert registry.detect(config, src).kind == "gemma3"
    # other families' detectors do not claim it, and it claims no other family's folder
    others = [a for a in registry._REGISTRY.values() if a.kind != "gemma3"]
    assert not any(a.detect(config, src) for a in others)
    gemma = registry.get("gemma3")
    for model_type in ("bert", "modernbert", "gemma3", "gemma2", "clip"):
        assert not gemma.detect(dict(config, model_type=model_type), src)
    assert registry.detect(dict(config, model_type="bert"), src).kind == "sentence-transformer"
    # a causal Gemma 3 under a sentence-transformer is not run: stored
    assert registry.detect(dict(config, use_bidirectional_attention=False), src).kind == "store"
    no_modules = src.parent / "plain"
    shutil.copytree(src / ".." / "hf", no_modules)  # the bare Gemma3TextModel folder: not a sentence-transformer
    assert registry.detect(config, no_modules).kind == "store"


def test_causal_lm_layout_converts_and_unknown_tensors_fail(folders, tmp_path):
    """A Gemma3ForCausalLM file (base model under model., an lm_head) converts with the prefix stripped and the head
    dropped; a tensor of no known module is an error that names it."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "st"
    shutil.copytree(folders["tiny"], src)
    state = load_file(str(src / "model.safetensors"))
    lm = {f"model.{k}": v for k, v in state.items()}
    lm["lm_head.weight"] = state["embed_tokens.weight"].clone()
    save_file(lm, str(src / "model.safetensors"), metadata={"format": "pt"})
    convert_checkpoint(src, tmp_path / "out", progress=False)
    model = engine.load_model(tmp_path / "out")
    ref = engine.load_model(folders["tiny-converted"])
    np.testing.assert_array_equal(model.encode_text(TEXTS[:3]), ref.encode_text(TEXTS[:3]))
    lm["vision_tower.patch.weight"] = torch.zeros(2)
    save_file(lm, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightFormatError, match="vision_tower.patch.weight"):
        convert_checkpoint(src, tmp_path / "bad", progress=False)


def _edited(folders, tmp_path, edit: dict) -> Path:
    """A copy of the converted tiny model with config.json updated by ``edit`` (a value of ``...``: key removed)."""
    out = tmp_path / "edited"
    shutil.copytree(folders["tiny-converted"], out)
    config = json.loads((out / "config.json").read_text())
    config.update(edit)
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))
    return out


@pytest.mark.parametrize("edit,match", [
    ({"use_bidirectional_attention": False}, "causal Gemma 3"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "rope_type 'linear'"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ({"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"num_hidden_layers": 3, "layer_types": ...}, "num_hidden_layers is 3, but weights.arrow holds 2 blocks"),
    ({"head_dim": 16}, "head_dim"),
    ({"intermediate_size": 100}, "intermediate_size is 100"),
    ({"hidden_activation": "softplus"}, "hidden_activation 'softplus'"),
])
def test_config_faults_are_clear_errors(folders, tmp_path, edit, match):
    with pytest.raises(ModelConfigError, match=match):
        engine.load_model(_edited(folders, tmp_path, edit))


def test_older_config_keys_and_default_layer_pattern(folders, tmp_path):
    """transformers 4.x's config.json (rope_theta / rope_local_base_freq, no rope_parameters) and a config
    without layer_types (every 6th layer full, as Gemma3TextConfig) read as transformers reads them."""
    from engine.gemma3 import gemma3_config

    out = _edited(folders, tmp_path, {"rope_parameters": ..., "rope_theta": 5e5, "rope_local_base_freq": 2e3,
                                      "rope_scaling": None})
    cfg = gemma3_config(out)
    assert (cfg.rope_theta, cfg.rope_local_theta) == (5e5, 2e3)
    config = json.loads((out / "config.json").read_text())
    del config["layer_types"]
    (out / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=7)))
    assert gemma3_config(out).layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")


def test_served_over_flight_equals_in_process(folders):
    from engine.scheduler import Scheduler
    from flight_client import EmbeddingClient
    from flight_server.config import ServerConfig
    from flight_server.servicer import EmbeddingServer

    model = engine.load_model(folders["tiny-converted"])
    with Scheduler(model) as scheduler, \
            EmbeddingServer({"m": scheduler}, ServerConfig(port=0)) as server, \
            EmbeddingClient(f"grpc://127.0.0.1:{server.port}") as client:
        for name in (None, "query", "document"):
            np.testing.assert_array_equal(client.embed_texts(TEXTS, prompt_name=name),
                                          model.encode_text(TEXTS, prompt_name=name))
        (meta,) = client.models()
        assert meta["prompts"] == PROMPTS and meta["dimension"] == 64 and meta["kind"] == "gemma3"
