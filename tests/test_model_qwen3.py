"""Qwen3 decoder embedders (Qwen/Qwen3-Embedding-0.6B's layout) against transformers' Qwen3Model and
sentence-transformers' ``encode`` on the same weights.

Each checkpoint is built here: a random-weight Qwen3Model (fixed seed) saved by transformers, wrapped by the installed
sentence-transformers as Transformer -> Pooling(lasttoken) -> Normalize with Qwen3-Embedding's prompts, beside a small
byte-level BPE tokenizer.json made like Qwen's (NFC, the Qwen2 split regex, byte-level) whose TemplateProcessing
post-processor appends ``<|endoftext|>`` to every text, as Qwen3-Embedding's does. "real" rewrites the folder as the
hub repository has it (sentence-transformers 2.x module names and pooling keys, max_seq_length 8192 in
sentence_bert_config.json, ``rope_theta`` / ``rope_scaling: null`` in a Qwen3ForCausalLM config.json).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from convert.pipeline import convert_checkpoint
from engine import registry
from engine.errors import ModelConfigError, WeightFormatError

from checkpoints import minilm_dir

QUERY = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
PROMPTS = {"query": QUERY, "document": ""}
TEXTS = [
    "What is the capital of China?",
    "",
    "The capital of China is Beijing.",
    "Ünïcode: café, naïve, Ångström, résumé",
    "日本語のテキストと中文句子",
    "emoji 🙂🚀 and symbols <|endoftext|> ∑ → ©",
    "word " * 300,  # past every max_seq_length here: truncated, <|endoftext|> kept
    "Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects.",
]
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# transformers' Qwen2Tokenizer pattern (tokenization_qwen2.py), as Qwen's tokenizer.json has it
SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
         r"""|\s+(?!\S)|\s+""")

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32)  # 4 x 32 query width != hidden 64, as in the real model (16 x 128 != 1024)
# Qwen/Qwen3-Embedding-0.6B's widths with 2 of its 28 layers (vocabulary cut to the test tokenizer's 4,003)
REAL = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("qwen3-tokenizer"))


def write_tokenizer(out: Path) -> Path:
    """Qwen-style tokenizer files (tokenizer.json, tokenizer_config.json as Qwen3-Embedding's) in ``out``, trained on
    the words of MiniLM's WordPiece vocabulary (accents, CJK, symbols): 4,000 byte-level BPE tokens, then the
    specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    words = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.train_from_iterator((" ".join(words[i:i + 16]) for i in range(0, len(words), 16)),
                            trainers.BpeTrainer(vocab_size=4000, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(list(SPECIALS))  # after the BPE vocabulary, as Qwen's (151643 <|endoftext|> ...)
    eot = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(  # as Qwen3-Embedding's tokenizer.json
        single="$A:0 <|endoftext|>:0", pair="$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", eot)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "padding_side": "left", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None}))
    return out


def _qwen3_model(geometry: dict, vocab: int, seed: int = 0, causal_lm: bool = False):
    """A random-weight Qwen3Model (or Qwen3ForCausalLM) whose every RMSNorm weight is random too, so a norm that
    is mixed up or skipped shows in the cosine."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    eot = vocab - len(SPECIALS)
    config = Qwen3Config(vocab_size=vocab, bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=not causal_lm,
                         **{"max_position_embeddings": 512, **geometry})
    torch.manual_seed(seed)
    model = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def _st_folder(tokenizer_dir: Path, out: Path, geometry: dict, layout: str = "current", max_seq: int = 48,
               pooling: str = "lasttoken", normalize: bool = True, dense: tuple = (), seed: int = 0,
               causal_lm: bool = False) -> Path:
    """A sentence-transformers folder over a random Qwen3Model; ``dense``: (out_features, activation) modules."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    hf = out / "hf"
    hf.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, hf / f)
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]) + 3
    model = _qwen3_model(geometry, vocab, seed, causal_lm)
    model.save_pretrained(str(hf))
    modules = [Transformer(str(hf), max_seq_length=max_seq)]
    width = geometry["hidden_size"]
    modules.append(Pooling(width, pooling_mode=pooling))
    torch.manual_seed(seed + 1)
    for n_out, act in dense:
        modules.append(Dense(width, n_out, activation_function=getattr(torch.nn, act)()))
        width = n_out
    if normalize:
        modules.append(Normalize())
    st = out / "st"
    SentenceTransformer(modules=modules, device="cpu").save(str(st))
    st_cfg = json.loads((st / "config_sentence_transformers.json").read_text())
    (st / "config_sentence_transformers.json").write_text(json.dumps(dict(st_cfg, prompts=PROMPTS,
                                                                          default_prompt_name=None)))
    if causal_lm:  # sentence-transformers saved the inner Qwen3Model: put the causal LM's file back
        shutil.copy(hf / "model.safetensors", st / "model.safetensors")
    if layout == "real":
        _real_layout(st, max_seq)
    return st


def _real_layout(st: Path, max_seq: int) -> None:
    """Rewrite a folder saved by sentence-transformers 6.x / transformers 5.x as Qwen/Qwen3-Embedding-0.6B's repository
    has it (written by sentence-transformers 3.x and transformers 4.51)."""
    config = json.loads((st / "config.json").read_text())
    rope = config.pop("rope_parameters")
    for key in ("layer_types", "dtype", "pad_token_id"):
        config.pop(key, None)
    config.update(architectures=["Qwen3ForCausalLM"], rope_theta=rope["rope_theta"], rope_scaling=None,
                  sliding_window=None, use_sliding_window=False, max_window_layers=28, torch_dtype="float32",
                  transformers_version="4.51.3")
    (st / "config.json").write_text(json.dumps(config))
    modules = json.loads((st / "modules.json").read_text())
    for m in modules:
        m["type"] = "sentence_transformers.models." + m["type"].rsplit(".", 1)[-1]
    (st / "modules.json").write_text(json.dumps(modules))
    pool = json.loads((st / "1_Pooling" / "config.json").read_text())
    legacy = {"word_embedding_dimension": pool["embedding_dimension"]}
    legacy.update({f"pooling_mode_{key}": pool["pooling_mode"] == mode for key, mode in (
        ("cls_token", "cls"), ("mean_tokens", "mean"), ("max_tokens", "max"),
        ("mean_sqrt_len_tokens", "mean_sqrt_len_tokens"), ("weightedmean_tokens", "weightedmean"),
        ("lasttoken", "lasttoken"))})
    (st / "1_Pooling" / "config.json").write_text(json.dumps(dict(legacy, include_prompt=True)))
    (st / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq, "do_lower_case": False}))
    st_cfg = json.loads((st / "config_sentence_transformers.json").read_text())
    st_cfg["__version__"] = {"sentence_transformers": "3.4.1", "transformers": "4.51.3", "pytorch": "2.6.0"}
    (st / "config_sentence_transformers.json").write_text(json.dumps(st_cfg))


def _check_st(src: Path, model, texts=TEXTS, names=(None, "query", "document")) -> dict:
    """Our embeddings against sentence-transformers' encode for each prompt name; returns (min cosine, max abs)
    per name."""
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(src), device="cpu")
    assert model.config.max_seq_length == ref.max_seq_length
    out = {}
    for name in names:
        want = ref.encode(list(texts), prompt_name=name, convert_to_numpy=True, normalize_embeddings=True)
        got = model.encode_text(list(texts), prompt_name=name)
        out[name] = (float(_cos(want, got).min()), float(np.abs(want - got).max()))
        assert out[name][0] >= 0.99999 and out[name][1] <= 1e-4, (name, out[name])
    return out


def _convert(src: Path, out: Path, **kw):
    manifest = convert_checkpoint(src, out, progress=False).manifest
    assert manifest.kind == "qwen3"
    return engine.load_model(out, **kw)


@pytest.mark.parametrize("layout", ["current", "real"])
def test_tiny_matches_sentence_transformers_with_each_prompt(tokenizer_dir, tmp_path, layout):
    """Detection, conversion and load; embeddings for no prompt, 'query' (the instruction before the text) and
    'document' (none) as sentence-transformers' encode(prompt_name=...) gives them; the tokenizer's ids as
    transformers' AutoTokenizer gives them, every row ending with <|endoftext|>."""
    from transformers import AutoTokenizer

    src = _st_folder(tokenizer_dir, tmp_path, TINY, layout)
    config = json.loads((src / "config.json").read_text())
    assert registry.detect(config, src).kind == "qwen3"
    model = _convert(src, tmp_path / "converted")
    assert model.info.kind == "qwen3" and model.info.dim == 64 and model.info.max_tokens == 512
    assert dict(model.info.prompts) == PROMPTS and model.info.default_prompt is None
    assert model.config.max_seq_length == 48 and model.config.pooling == "lasttoken"
    _check_st(src, model)

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "converted"))
    eot = hf.convert_tokens_to_ids("<|endoftext|>")
    for prompt in ("", QUERY):
        texts = [prompt + t for t in TEXTS]
        want = hf(texts, truncation=True, max_length=48)["input_ids"]
        rows, errors = model.prepare_texts(TEXTS, "query" if prompt else None)
        assert errors == [None] * len(TEXTS)
        assert [r.tolist() for r in rows] == want
        assert all(r[-1] == eot for r in rows) and max(len(r) for r in rows) == 48


def test_left_padded_transformers_batch_equals_right_padded_rows(tokenizer_dir, tmp_path):
    """transformers' Qwen3Model on a left-padded batch of mixed lengths (positions counted from the padding, an
    attention mask), pooled at the last position and normalized as sentence-transformers does, equals our
    right-padded rows (no mask, positions from 0); and a row alone equals the row inside that batch."""
    from transformers import AutoTokenizer, Qwen3Model

    src = _st_folder(tokenizer_dir, tmp_path, TINY, max_seq=512)
    model = _convert(src, tmp_path / "converted")
    hf_tok = AutoTokenizer.from_pretrained(str(src))
    texts = ["a", "the quick brown fox jumps over the lazy dog " * 6, "Ünïcode café 日本語", "two words",
             "a photo of a cat " * 3]
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    assert hf_tok.padding_side == "left" and len(set(batch["attention_mask"].sum(1).tolist())) == len(texts)
    hf = Qwen3Model.from_pretrained(str(src)).eval()
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state[:, -1]
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    rows, _ = model.prepare_texts(texts)
    assert len(model.text_groups([len(r) for r in rows])) == 1  # one padded batch
    got = model.encode_text(texts)
    assert _cos(got, ref).min() >= 0.99999 and np.abs(got - ref).max() <= 1e-4
    alone = np.concatenate([model.encode_text([t]) for t in texts])
    assert np.abs(alone - got).max() <= 1e-5


@pytest.mark.parametrize("geometry,pooling,dense,normalize", [
    # GQA ratio 3, head_dim 20 (not 72 / 6), biases on q/k/v/o, 3 layers, other eps and theta
    (dict(hidden_size=72, intermediate_size=100, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
          head_dim=20, attention_bias=True, rms_norm_eps=1e-5, rope_theta=5000.0), "lasttoken", (), True),
    # ratio 1 (multi-head), head_dim 10 (not 40 / 3), gelu; mean pooling and a Dense head, no Normalize
    (dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
          head_dim=10, hidden_act="gelu"), "mean", ((24, "Tanh"),), False),
], ids=["gqa3-bias", "mha-mean-dense"])
def test_odd_geometries(tokenizer_dir, tmp_path, geometry, pooling, dense, normalize):
    src = _st_folder(tokenizer_dir, tmp_path, geometry, "real", pooling=pooling, dense=dense, normalize=normalize)
    model = _convert(src, tmp_path / "converted")
    cfg = model.config
    assert (cfg.heads, cfg.kv_heads, cfg.head_dim) == (geometry["num_attention_heads"],
                                                       geometry["num_key_value_heads"], geometry["head_dim"])
    assert model.info.dim == (dense[-1][0] if dense else geometry["hidden_size"])
    _check_st(src, model, names=(None, "query"))


def test_causal_lm_weights_convert_with_the_head_dropped_and_linear_rope(tokenizer_dir, tmp_path):
    """Weights saved from Qwen3ForCausalLM (``model.`` prefix, an lm_head) and a linear RoPE scaling in
    rope_scaling, against transformers' own Qwen3Model with that config."""
    from safetensors import safe_open

    src = _st_folder(tokenizer_dir, tmp_path, TINY, "real", causal_lm=True)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "lm_head.weight" in names and all(n.startswith("model.") for n in names if n != "lm_head.weight")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, rope_scaling={"rope_type": "linear", "factor": 4.0})))
    model = _convert(src, tmp_path / "converted")
    assert model.config.rope_factor == 4.0
    _check_st(src, model, names=("query",))


def test_flight_serves_the_in_process_embeddings(tokenizer_dir, tmp_path):
    from engine.scheduler import Scheduler
    from flight_client import EmbeddingClient
    from flight_server.config import ServerConfig
    from flight_server.servicer import EmbeddingServer

    model = _convert(_st_folder(tokenizer_dir, tmp_path, TINY), tmp_path / "converted")
    with Scheduler(model) as scheduler, \
            EmbeddingServer({"m": scheduler}, ServerConfig(port=0)) as server, \
            EmbeddingClient(f"grpc://127.0.0.1:{server.port}") as client:
        for name in (None, "query"):
            np.testing.assert_array_equal(client.embed_texts(TEXTS, prompt_name=name),
                                          model.encode_text(TEXTS, prompt_name=name))
        (meta,) = client.models()
        assert meta["prompts"] == PROMPTS and meta["default_prompt"] is None


@pytest.mark.parametrize("precision,floor", [("bf16", 0.999), ("int8", 0.99)])
def test_reduced_precisions_stay_close_to_fp32(tokenizer_dir, tmp_path, precision, floor):
    src = _st_folder(tokenizer_dir, tmp_path, TINY)
    convert_checkpoint(src, tmp_path / "converted", progress=False)
    fp32 = engine.load_model(tmp_path / "converted").encode_text(TEXTS, prompt_name="query")
    low = engine.load_model(tmp_path / "converted", precision=precision).encode_text(TEXTS, prompt_name="query")
    assert _cos(fp32, low).min() >= floor


def _edited(src: Path, out: Path, edit) -> Path:
    """A converted copy of ``src`` whose config.json ``edit`` changed (a dict -> dict)."""
    convert_checkpoint(src, out, progress=False)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(edit(config)))
    return out


@pytest.mark.parametrize("edit,match", [
    (lambda c: dict(c, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "'yarn' is not"),
    (lambda c: dict(c, rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic' is not"),
    (lambda c: dict(c, layer_types=["full_attention", "sliding_attention"], use_sliding_window=True,
                    sliding_window=16), "sliding-window"),
    (lambda c: dict({k: v for k, v in c.items() if k != "layer_types"}, use_sliding_window=True, sliding_window=16,
                    max_window_layers=1), "sliding-window"),
    (lambda c: dict(c, num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (lambda c: dict(c, num_hidden_layers=5), "num_hidden_layers is 5, but weights.arrow holds 2 blocks"),
    (lambda c: dict(c, head_dim=16), "head_dim is 16, but layers.0.self_attn.q_norm.weight"),
    (lambda c: dict(c, num_key_value_heads=4), "num_key_value_heads 4 x head_dim 32"),
    (lambda c: dict(c, attention_bias=True), "self_attn.q_proj.bias"),
])
def test_what_is_not_implemented_or_does_not_match_the_weights_is_a_clear_error(tokenizer_dir, tmp_path, edit, match):
    src = _st_folder(tokenizer_dir, tmp_path, TINY)
    out = _edited(src, tmp_path / "converted", edit)
    with pytest.raises((ModelConfigError, WeightFormatError), match=match):
        engine.load_model(out)


def test_detection_claims_only_qwen3_sentence_transformers(tokenizer_dir, tmp_path):
    """A plain Qwen3 folder (an LLM, no modules.json) is stored, not claimed; a BERT sentence-transformer is not
    ours; an unknown tensor name is an error."""
    src = _st_folder(tokenizer_dir, tmp_path, TINY)
    plain = tmp_path / "plain"
    shutil.copytree(tmp_path / "hf", plain)
    assert convert_checkpoint(plain, tmp_path / "plain-out", progress=False).manifest.kind == "store"
    minilm = minilm_dir()
    assert registry.detect(json.loads((minilm / "config.json").read_text()), minilm).kind == "sentence-transformer"
    arch = registry.get("qwen3")
    assert arch.plan(["model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.norm.weight"]) == [
        ("model.layers.0.mlp.up_proj.weight", "layers.0.mlp.up_proj.weight"), ("model.norm.weight", "norm.weight")]
    with pytest.raises(WeightFormatError, match="visual.patch_embed"):
        arch.plan(["embed_tokens.weight", "visual.patch_embed.weight"])
    assert registry.detect(json.loads((src / "config.json").read_text()), src).kind == "qwen3"


@pytest.fixture(scope="module")
def real_source(tokenizer_dir, tmp_path_factory) -> Path:
    return _st_folder(tokenizer_dir, tmp_path_factory.mktemp("qwen3-real"), REAL, "real", max_seq=8192)


@pytest.mark.slow
def test_real_widths_of_qwen3_embedding_06b(real_source, tmp_path):
    """Qwen3-Embedding-0.6B's geometry (hidden 1024, 16 query / 8 key-value heads of 128, MLP 3072, theta 1e6, eps
    1e-6, 32,768 positions, max_seq_length 8192) with 2 layers and the test tokenizer's 4,003-token vocabulary;
    bf16 and int8 against fp32."""
    model = _convert(real_source, tmp_path / "converted")
    assert (model.info.dim, model.config.max_seq_length, model.info.max_tokens) == (1024, 8192, 32768)
    texts = [t for t in TEXTS if len(t) < 500] + ["a passage about the history of the city and its people " * 8]
    _check_st(real_source, model, texts, names=("query", "document"))
    fp32 = model.encode_text(texts, prompt_name="query")
    for precision, floor in (("bf16", 0.999), ("int8", 0.99)):
        low = engine.load_model(tmp_path / "converted", precision=precision).encode_text(texts, prompt_name="query")
        assert _cos(fp32, low).min() >= floor, precision


_LONG_ROW = textwrap.dedent("""
    import json, sys
    import numpy as np
    import engine

    def peak_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM"))

    model = engine.load_model(sys.argv[1])
    model.encode_tokens([[5, 6, 7]])  # first call: kernels and allocator warmed, weights paged in
    before = peak_mb()
    row = (np.arange(8192) % 3900 + 50).tolist()
    out = model.encode_tokens([row])
    print(json.dumps({"before_mb": before, "after_mb": peak_mb(), "finite": bool(np.isfinite(out).all())}))
""")


@pytest.mark.slow
def test_one_8192_token_row_needs_no_quadratic_memory(real_source, tmp_path):
    """One 8192-token row at the real widths (2 layers, in a fresh process): the peak resident memory grows by far
    less than one 8192 x 8192 fp32 score matrix per head (16 x 256 MiB = 4 GiB) would take."""
    convert_checkpoint(real_source, tmp_path / "converted", progress=False)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run([sys.executable, "-c", _LONG_ROW, str(tmp_path / "converted")], capture_output=True,
                          text=True, timeout=300, check=False, env=env, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("8192-token row, VmHWM MB:", result)
    assert result["finite"] and result["after_mb"] - result["before_mb"] < 1024
