"""ModernBERT sentence-transformers (gte-modernbert-base: CLS pooling; modernbert-embed-base: mean pooling and
search_query / search_document prompts) against transformers' ModernBertModel and sentence-transformers' encode.

Each checkpoint is built here: random weights at a fixed seed saved by transformers (ModernBertModel, or
ModernBertForMaskedLM for the head-dropping case), a small byte-level BPE tokenizer.json with ModernBERT's
[CLS] ... [SEP] post-processor built with ``tokenizers``, wrapped by sentence-transformers and saved.
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
from engine import modernbert, ragged, registry
from engine.errors import ModelConfigError, WeightFormatError
from engine.model import BatchLimits

_WORDS = ("the quick brown fox jumps over the lazy dog while a photo of a cat sits on the beach near two dogs "
          "search query document passage embedding model token window attention rotary global local")
_CORPUS = [_WORDS, _WORDS.upper(), "Ünïcode café naïve résumé façade", "日本語のテキスト 中文 한국어",
           "numbers 0123456789 and punctuation: , . ; ! ? ( ) [ ] { } - _ = + * / \\ # @ $ % ^ & ~"] * 5
_LONG = " ".join(f"{w}{i % 7}" for i, w in enumerate(_WORDS.split() * 8))  # hundreds of tokens
TEXTS = [
    "A photo of a cat",
    "",
    "Ünïcode café naïve 日本語のテキスト, 中文 and 한국어",
    "emoji 🙂🚀👩‍👩‍👧 and symbols ∑ ≥ ∞",
    "the quick brown fox jumps over the lazy dog " * 3,
    _LONG[:300],
    _LONG,  # past every max_seq_length here: truncated
]
PROMPTS = {"query": "search_query: ", "document": "search_document: "}

# name -> (ModernBertConfig kwargs, sentence-transformers head, config.json layout)
GEOMETRIES = {
    # modernbert-embed-base's head (mean, Normalize, prompts); 4 layers: global, local, local, global
    "tiny": (dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=4,
                  local_attention=16, global_attn_every_n_layers=3),
             dict(pooling="mean", normalize=True, max_seq=128, prompts=PROMPTS), "transformers-5"),
    # odd: 5 heads of 24, window 22 (11 each way), every 2nd layer global, every bias on, another activation and
    # eps, other thetas, a Dense head, CLS pooling (gte's), config.json in the hub's older layout
    "odd": (dict(hidden_size=120, num_attention_heads=5, intermediate_size=200, num_hidden_layers=3,
                 local_attention=22, global_attn_every_n_layers=2, norm_bias=True, attention_bias=True,
                 mlp_bias=True, norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                 rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50_000.0},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}),
            dict(pooling="cls", normalize=False, max_seq=96, dense=((48, "Tanh"),)), "hub"),
}


def _tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer as ModernBERT's: NFC, ByteLevel pre-tokenizer and decoder, special tokens after
    the merges ([UNK] [CLS] [SEP] [PAD] [MASK]), and a [CLS] $A [SEP] post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]", model_max_length=8192,
                                   model_input_names=["input_ids", "attention_mask"])


def _hf_modernbert(out: Path, kwargs: dict, layout: str = "transformers-5", masked_lm: bool = False,
                   vocab_size: int = 600, seed: int = 0) -> Path:
    """A random-weight ModernBertModel (ModernBertForMaskedLM with ``masked_lm``) and its tokenizer in ``out``.
    ``layout`` "hub": config.json rewritten as the hub's checkpoints have it (global_attn_every_n_layers,
    global_rope_theta / local_rope_theta; no layer_types or rope_parameters)."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM, ModernBertModel

    tok = _tokenizer(vocab_size)
    ids = {name: tok.convert_tokens_to_ids(name) for name in ("[CLS]", "[SEP]", "[PAD]")}
    config = ModernBertConfig(vocab_size=-(-len(tok) // 64) * 64, pad_token_id=ids["[PAD]"],
                              bos_token_id=ids["[CLS]"], cls_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"],
                              sep_token_id=ids["[SEP]"], **kwargs)
    with torch.device("meta"):  # transformers' truncated-normal init takes seconds at full width: our own below
        model = (ModernBertForMaskedLM if masked_lm else ModernBertModel)(config)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():  # attention that matters (logits of a few units, not transformers' near-uniform init):
        std = 2 / config.hidden_size ** 0.5  # a wrong window, position or bias must show in the cosine
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, std)
            elif "Wqkv" in name or "attn.Wo" in name or name.endswith("bias"):
                p.normal_(0.0, std)
            else:  # embeddings, the MLP (and the masked-LM head)
                p.normal_(0.0, p.shape[-1] ** -0.5)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    if layout == "hub":
        cfg = json.loads((out / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg.pop("layer_types")
        cfg.update(global_rope_theta=rope["full_attention"]["rope_theta"],
                   local_rope_theta=rope["sliding_attention"]["rope_theta"])
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def _sentence_transformer(hf_dir: Path, out: Path, pooling: str, normalize: bool, max_seq: int,
                          prompts: dict | None = None, dense: tuple = ()) -> Path:
    """``dense``: (out_features, torch.nn activation class name) of each Dense module after pooling."""
    from sentence_transformers import SentenceTransformer
    try:  # sentence-transformers >= 6
        from sentence_transformers.base.modules import Dense, Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

    modules = [Transformer(str(hf_dir), max_seq_length=max_seq)]
    dim = getattr(modules[0], "get_embedding_dimension", None) or modules[0].get_word_embedding_dimension
    width = dim()
    modules.append(Pooling(width, pooling_mode=pooling))
    torch.manual_seed(1)
    for n_out, act in dense:
        modules.append(Dense(width, n_out, activation_function=getattr(torch.nn, act)()))
        with torch.no_grad():
            modules[-1].linear.weight.normal_(0, 0.5)
        width = n_out
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu", prompts=prompts or {}).save(str(out))
    return out


def _source(root: Path, geometry: str) -> tuple[Path, Path]:
    """(the transformers folder, the sentence-transformers folder) of a named geometry."""
    kwargs, head, layout = GEOMETRIES[geometry]
    hf = _hf_modernbert(root / geometry / "hf", kwargs, layout)
    st = _sentence_transformer(hf, root / geometry / "st", head["pooling"], head["normalize"], head["max_seq"],
                               head.get("prompts"), head.get("dense", ()))
    return hf, st


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """geometry -> (transformers folder, sentence-transformers folder, converted folder)."""
    root = tmp_path_factory.mktemp("modernbert")
    out = {}
    for geometry in GEOMETRIES:
        hf, st = _source(root, geometry)
        convert_checkpoint(st, root / geometry / "converted", progress=False)
        out[geometry] = (hf, st, root / geometry / "converted")
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _hf_states(hf_dir: Path, texts: list[str], max_length: int, attn: str = "sdpa"):
    """transformers' ModernBertModel on a padded batch: (last_hidden_state, attention_mask)."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(hf_dir), attn_implementation=attn).eval()
    enc = AutoTokenizer.from_pretrained(str(hf_dir))(texts, padding=True, truncation=True, max_length=max_length,
                                                     return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state, \
            enc["attention_mask"].bool()


# -- conversion and detection ------------------------------------------------------------------------------------

def test_detected_and_converted_as_modernbert_and_no_other_family(sources):
    from engine.config import read_json
    from engine.weights import load_weights

    hf, st, converted = sources["tiny"]
    config = read_json(st, "config.json")
    assert registry.detect(config, st).kind == "modernbert"
    claims = [k for k in registry.known_kinds() if k != registry.STORE and registry.get(k).detect(config, st)]
    assert claims == ["modernbert"]  # no other family's detector claims it
    assert registry.detect(read_json(hf, "config.json"), hf).kind == "store"  # no sentence-transformers modules
    bert_like = dict(config, model_type="bert")  # a BERT sentence-transformer is not ours
    assert not registry.get("modernbert").detect(bert_like, st)
    assert registry.detect(bert_like, st).kind == "sentence-transformer"
    manifest = json.loads((converted / "manifest.json").read_text())
    assert (manifest["kind"], manifest["architecture"]) == ("modernbert", "ModernBertModel")
    names = set(load_weights(converted))
    assert {"embeddings.tok_embeddings.weight", "embeddings.norm.weight", "layers.0.attn.Wqkv.weight",
            "layers.0.attn.Wo.weight", "layers.0.mlp_norm.weight", "layers.0.mlp.Wi.weight", "layers.0.mlp.Wo.weight",
            "layers.1.attn_norm.weight", "final_norm.weight"} <= names
    assert "layers.0.attn_norm.weight" not in names and not any(n.endswith(".bias") for n in names)  # tiny: no bias
    assert engine.load_model(converted).info.kind == "modernbert"


def test_weights_saved_from_modernbert_for_masked_lm_convert_with_the_head_dropped(tmp_path):
    from safetensors import safe_open

    kwargs, head, _ = GEOMETRIES["tiny"]
    hf = _hf_modernbert(tmp_path / "hf", kwargs, masked_lm=True)
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any(n.startswith("head.") for n in names) and "decoder.bias" in names
    assert all(n.startswith(("model.", "head.", "decoder.")) for n in names)
    st = _sentence_transformer(hf, tmp_path / "st", "mean", True, 64)
    shutil.copy(hf / "model.safetensors", st / "model.safetensors")  # ST saves the base model: put the MLM file back
    convert_checkpoint(st, tmp_path / "out", progress=False)
    _check_against_sentence_transformers(st, tmp_path / "out", TEXTS)


def test_an_unknown_tensor_name_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    kwargs, head, _ = GEOMETRIES["tiny"]
    hf = _hf_modernbert(tmp_path / "hf", kwargs)
    st = _sentence_transformer(hf, tmp_path / "st", "mean", True, 64)
    state = load_file(str(st / "model.safetensors"))
    state["pooler.dense.weight"] = torch.zeros(2, 2)
    save_file(state, str(st / "model.safetensors"))
    with pytest.raises(WeightFormatError, match="pooler.dense.weight"):
        convert_checkpoint(st, tmp_path / "out", progress=False)


# -- parity ------------------------------------------------------------------------------------------------------

def _check_against_sentence_transformers(st: Path, converted: Path, texts: list[str], prompts: tuple = (None,)
                                         ) -> engine.Model:
    """fp32 embeddings equal sentence-transformers' encode (with each prompt_name): cosine >= 0.99999 and max abs
    difference <= 1e-4 on every row."""
    from sentence_transformers import SentenceTransformer

    model = engine.load_model(converted)
    ref = SentenceTransformer(str(st), device="cpu")
    assert model.config.max_seq_length == ref.max_seq_length
    for name in prompts:
        want = ref.encode(texts, prompt_name=name, convert_to_numpy=True, normalize_embeddings=True)
        got = model.encode_text(texts, prompt_name=name)
        cos = _cos(want, got)
        assert cos.min() >= 0.99999, (name, cos)
        assert np.abs(want - got).max() <= 1e-4, name
    return model


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_matches_sentence_transformers_encode_with_each_prompt(sources, geometry):
    hf, st, converted = sources[geometry]
    kwargs, head, _ = GEOMETRIES[geometry]
    model = _check_against_sentence_transformers(st, converted, TEXTS, (None, *(head.get("prompts") or {})))
    lengths = [len(r) for r in model.prepare_texts(TEXTS)[0]]
    assert max(lengths) == head["max_seq"] > 2 * kwargs["local_attention"]  # the sliding window matters
    assert model.info.dim == (head["dense"][-1][0] if "dense" in head else kwargs["hidden_size"])
    if "prompts" in head:
        assert dict(model.info.prompts) == head["prompts"]
    cfg = model.config
    assert (cfg.local_attention, cfg.heads, cfg.layers) == (kwargs["local_attention"], kwargs["num_attention_heads"],
                                                            kwargs["num_hidden_layers"])
    every = kwargs["global_attn_every_n_layers"]
    assert cfg.layer_types == tuple("sliding_attention" if i % every else "full_attention"
                                    for i in range(cfg.layers))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_token_states_equal_transformers_on_a_padded_batch(sources, attn):
    """Every real token's last hidden state equals transformers' ModernBertModel (SDPA and eager attention) on
    the same rows padded into one batch; and mean pooling of them equals ours before normalization."""
    hf, st, converted = sources["tiny"]
    model = engine.load_model(converted)
    want, keep = _hf_states(hf, TEXTS, model.config.max_seq_length, attn)
    rows, _ = model.prepare_texts(TEXTS)
    ids, lengths = _padded(rows)
    assert torch.equal(keep, torch.arange(ids.shape[1])[None, :] < lengths[:, None])
    with torch.inference_mode():
        got, _ = model.net.token_states(ids, lengths)  # (N, C) packed
    np.testing.assert_allclose(got.numpy(), want[keep].numpy(), atol=1e-4, rtol=0)
    m = keep[..., None].float()
    pooled = ((want * m).sum(1) / m.sum(1)).numpy()
    ours = model.encode_text(TEXTS, normalize=False)
    assert _cos(ours, pooled).min() >= 0.99999 and np.abs(ours - pooled).max() <= 1e-4


def _padded(rows: list[np.ndarray], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.from_numpy(r)
    return ids, lengths


def test_padding_free_linears_see_only_real_tokens_and_rows_are_batch_invariant(sources):
    """One group of mixed lengths: every Linear gets the N real tokens, never a padded position; each row's
    embedding inside the batch equals the row alone (<= 1e-5)."""
    hf, st, converted = sources["tiny"]
    model = engine.load_model(converted, limits=BatchLimits(text_max_padding=1e9))  # one group, padded
    rows, _ = model.prepare_texts(TEXTS)
    assert len(model.text_groups([len(r) for r in rows])) == 1
    ids, lengths = _padded(rows)
    seen: dict[str, list[int]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(
        args[0].shape[0] if args[0].dim() == 2 else -1)) for name, m in model.net.named_modules()
        if isinstance(m, torch.nn.Linear)]
    try:
        with torch.inference_mode():
            model.net.encode_text(ids, lengths)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 4 * model.config.layers
    assert all(calls == [int(lengths.sum())] for calls in seen.values()), seen  # N rows, 2-D, once each
    assert int(lengths.sum()) < ids.numel()  # there was padding to leave out
    together = model.encode_text(TEXTS)
    alone = np.concatenate([model.encode_text([t]) for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def test_one_forward_group_with_attention_in_spans(sources, monkeypatch):
    """Default limits, texts of very different lengths: one forward pass (every Linear called once, on all the
    real tokens), attention in several spans of similar lengths; each row equals the row alone (<= 1e-5)."""
    hf, st, converted = sources["tiny"]
    model = engine.load_model(converted)
    texts = [" ".join((_WORDS.split() * 3)[:n]) for n in (0, 1, 1, 2, 3, 3, 4, 5, 6, 8, 9, 11, 13, 16, 20, 24, 30, 38,
                                                    45, 55, 66, 80)]
    rows, _ = model.prepare_texts(texts)
    assert len(model.text_groups([len(r) for r in rows])) == 1
    spans: list[int] = []
    make_spans = ragged._spans
    monkeypatch.setattr(ragged, "_spans", lambda *a: spans.append(len(make_spans(*a))) or make_spans(*a))
    seen: list[int] = []
    layer = model.net.layers[1].attn.Wqkv
    hook = layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    try:
        together = model.encode_text(texts)
    finally:
        hook.remove()
    assert seen == [sum(len(r) for r in rows)] and spans[0] >= 2, (seen, spans)
    alone = np.concatenate([model.encode_text([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_banded_local_attention_equals_the_dense_band_mask(sources, monkeypatch, geometry):
    """Long rows run local layers in blocks over their key band; with the switch moved the dense (T, T) mask gives
    the same states, padded rows and skipped blocks included."""
    hf, st, converted = sources[geometry]
    model = engine.load_model(converted)
    rows, _ = model.prepare_texts(["a cat", TEXTS[4], _LONG[:200], _LONG])
    ids, lengths = _padded(rows)
    with torch.inference_mode():
        monkeypatch.setattr(ragged, "BANDED_MIN_BLOCKS", 10**9)
        dense, _ = model.net.token_states(ids, lengths)
        monkeypatch.setattr(ragged, "BANDED_MIN_BLOCKS", 1)
        banded, batch = model.net.token_states(ids, lengths)
    assert len(batch.spans) == 1  # token_states' default: the whole group in one attention span
    banded_masks = [m for key, m in batch.spans[0]._masks.items() if isinstance(key, tuple) and key[0] == "banded"]
    assert banded_masks and banded_masks[0][1] is not None  # blocks past short rows skipped
    np.testing.assert_allclose(banded.numpy(), dense.numpy(), atol=1e-5, rtol=0)


# -- tokenization ------------------------------------------------------------------------------------------------

def test_token_ids_equal_the_hf_tokenizer(sources):
    from transformers import AutoTokenizer

    hf, st, converted = sources["tiny"]
    model = engine.load_model(converted)
    tok = AutoTokenizer.from_pretrained(str(st))
    texts = TEXTS + ["  leading and trailing spaces  ", "tab\tand\nnewline", "Ａ full-width ｔｅｘｔ", "e\u0301 vs é"]
    for name in (None, "query", "document"):
        prompt = model.prompt(name)
        want = tok([prompt + t for t in texts], truncation=True, max_length=model.config.max_seq_length)["input_ids"]
        got, errors = model.prepare_texts(texts, prompt_name=name)
        assert errors == [None] * len(texts)
        assert [r.tolist() for r in got] == want, name
    assert [r.tolist() for r in model.prepare_texts([""])[0]] == [[tok.cls_token_id, tok.sep_token_id]]
    # token-id rows as HF pads them: trailing [PAD] ids are cut off
    padded = tok(["a cat", "the quick brown fox jumps"], padding=True)["input_ids"]
    np.testing.assert_allclose(model.encode_tokens(padded), model.encode_text(["a cat", "the quick brown fox jumps"]),
                               atol=1e-6)


# -- precisions and serving --------------------------------------------------------------------------------------

# Minimum cosine to fp32 over TEXTS_PRECISION x every prompt, measured (tiny / odd / gte-modernbert-base widths at 3
# layers): bf16 0.9987 / 0.9979 / 0.9992, int8 0.9955 / 0.9843 / 0.9955. The weakest rows are the shortest texts
# (an emoji after the query prompt) and, for int8, Wqkv: these random weights make sharp attention (logits of a few
# units), which magnifies rounding in q and k.
TEXTS_PRECISION = TEXTS + ["a photo of a dog", "search for the window attention", "x", _LONG[:600], "日本語", "🙂"]


@pytest.mark.parametrize("precision,floor", [("bf16", 0.998), ("int8", 0.99)])
def test_bf16_and_int8_stay_close_to_fp32(sources, precision, floor):
    hf, st, converted = sources["tiny"]
    fp32, low = engine.load_model(converted), engine.load_model(converted, precision=precision)
    cos = np.concatenate([_cos(fp32.encode_text(TEXTS_PRECISION, prompt_name=name),
                               low.encode_text(TEXTS_PRECISION, prompt_name=name)) for name in (None, *PROMPTS)])
    # AVX2 without VNNI gives int8 activations 7 bits instead of 8 (engine.quantize): mean 0.9979 there
    from engine.quantize import LEVELS_VNNI, activation_levels

    mean_floor = 0.999 if precision == "bf16" or activation_levels() == LEVELS_VNNI else 0.997
    assert cos.min() >= floor and cos.mean() >= mean_floor, (cos.min(), cos.mean())


def test_served_over_flight_equals_in_process(sources):
    from engine.scheduler import Scheduler
    from flight_client import EmbeddingClient
    from flight_server.config import ServerConfig
    from flight_server.servicer import EmbeddingServer

    hf, st, converted = sources["tiny"]
    model = engine.load_model(converted)
    with Scheduler(model) as scheduler, \
            EmbeddingServer({"m": scheduler}, ServerConfig(port=0)) as server, \
            EmbeddingClient(f"grpc://127.0.0.1:{server.port}") as client:
        for name in (None, "query", "document"):
            np.testing.assert_array_equal(client.embed_texts(TEXTS, prompt_name=name),
                                          model.encode_text(TEXTS, prompt_name=name))
        (meta,) = client.models()
        assert (meta["kind"], meta["dimension"], meta["prompts"]) == ("modernbert", 64, PROMPTS)


# -- config faults -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types should list 4"),
    (dict(layer_types=["full_attention", "chunked_attention", "sliding_attention", "full_attention"]),
     "layer_types"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0},
                           "sliding_attention": {"rope_type": "default"}}), "RoPE type 'yarn'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10.0}), "rope_parameters should map"),
    (dict(num_attention_heads=3), "not divisible"),
    (dict(num_attention_heads=64), "must be even"),
    (dict(hidden_activation="mish"), "hidden_activation 'mish'"),
    (dict(num_hidden_layers=5, layer_types=None), "num_hidden_layers is 5, but weights.arrow holds 4"),
    (dict(intermediate_size=100), "intermediate_size is 100"),
    (dict(norm_bias=True), "final_norm.bias"),
])
def test_config_faults_are_clear_errors(sources, tmp_path, change, match):
    hf, st, converted = sources["tiny"]
    shutil.copytree(converted, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(change)
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    with pytest.raises((ModelConfigError, WeightFormatError), match=match):
        engine.load_model(tmp_path / "m")


def test_sliding_window_in_config_json_sets_the_window_as_transformers_does(sources, tmp_path):
    """transformers' ModernBertConfig.sliding_window setter: local_attention = 2 x sliding_window."""
    hf, st, converted = sources["tiny"]
    shutil.copytree(converted, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), sliding_window=5)))
    assert modernbert.modernbert_config(tmp_path / "m").local_attention == 10


# -- the real geometry -------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("geometry", ["gte-modernbert-base", "odd-wide"])
def test_full_widths(tmp_path, geometry):
    """gte-modernbert-base: Alibaba-NLP/gte-modernbert-base's widths (768, 12 heads of 64, MLP 1152, window 128,
    global every 3rd layer, thetas 160,000 / 10,000; CLS pooling, Normalize) at 3 layers (global, local, local).
    odd-wide: 10 heads of 48 (480 wide), MLP 1000, window 64, every 2nd layer global, 3 layers, under
    modernbert-embed-base's head (mean pooling, Normalize, search_query / search_document prompts). Vocabulary cut
    to ~640 ids (the test tokenizer's); texts up to 800 tokens, so windows, bands and skipped blocks all occur."""
    if geometry == "gte-modernbert-base":
        kwargs, head = dict(num_hidden_layers=3), dict(pooling="cls")
    else:
        kwargs = dict(hidden_size=480, num_attention_heads=10, intermediate_size=1000, num_hidden_layers=3,
                      local_attention=64, global_attn_every_n_layers=2)
        head = dict(pooling="mean", prompts=PROMPTS)
    hf = _hf_modernbert(tmp_path / "hf", kwargs, vocab_size=2000)
    st = _sentence_transformer(hf, tmp_path / "st", head["pooling"], True, 800, head.get("prompts"))
    convert_checkpoint(st, tmp_path / "out", progress=False)
    texts = [TEXTS[0], TEXTS[2], TEXTS[3], _LONG[:500], _LONG[:900], _LONG * 3]
    model = _check_against_sentence_transformers(st, tmp_path / "out", texts, ("query",) if "prompts" in head else
                                                 (None,))
    cfg = model.config
    if geometry == "gte-modernbert-base":
        assert (cfg.width, cfg.heads, cfg.mlp_width, cfg.local_attention, cfg.global_theta, cfg.local_theta) == \
            (768, 12, 1152, 128, 160_000.0, 10_000.0)
        assert cfg.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    else:
        assert (cfg.width, cfg.heads, cfg.head_dim, cfg.local_attention) == (480, 10, 48, 64)
        assert cfg.layer_types == ("full_attention", "sliding_attention", "full_attention")
    lengths = [len(r) for r in model.prepare_texts(texts)[0]]
    assert max(lengths) == 800 >= ragged.BANDED_MIN_BLOCKS * cfg.local_attention  # banded local layers
    assert any(2 * cfg.local_attention < n < ragged.BANDED_MIN_BLOCKS * cfg.local_attention for n in lengths)
