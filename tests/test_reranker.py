"""Cross-encoder rerankers (BertForSequenceClassification, XLMRobertaForSequenceClassification) against
sentence-transformers' own ``CrossEncoder.predict`` on the same folders: pair tokenization ids-for-ids against the HF
tokenizer, scores with and without the sigmoid at tiny, odd and full widths, the activation as CrossEncoder finds
it in each config layout, the engine API's row errors, and the scheduler coalescing pairs of several callers.

Checkpoints are random-weight (fixed seeds), built by tests/checkpoints.py with transformers; the XLM-R tokenizer
is a SentencePiece unigram trained on CPython's documentation text.
"""
from __future__ import annotations

import json
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import engine
from checkpoints import minilm_dir, strengthen_reranker
from convert.pipeline import convert_checkpoint
from engine.errors import InputError, ModalityError, ModelConfigError
from engine.tokenizer import TextTokenizer, longest_first

IDENTITY, SIGMOID = "torch.nn.modules.linear.Identity", "torch.nn.modules.activation.Sigmoid"
_WORDS = ("how many people live in berlin the population was 3,520,031 in 2019 museums are well known "
          "Ünïcode café naïve 日本語 [SEP] </s> <s> x-ray e-mail don't").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def pairs_for_test(seed: int = 0, n: int = 40) -> list[tuple[str, str]]:
    """Varied pairs: short, empty, unicode, special tokens inside texts, and pairs past the model's length (one
    side or both, of different and of equal lengths)."""
    rng = random.Random(seed)
    pairs = [(_text(rng, rng.randint(0, 12)), _text(rng, rng.randint(0, 60))) for _ in range(n)]
    pairs += [("How many people live in Berlin?", "Berlin had a population of 3,520,031 registered inhabitants."),
              ("", ""), ("a", ""), ("", "b"), ("word " * 90, "dog"), ("query", "doc " * 120),
              ("word " * 70, "dog " * 80), ("the fox " * 40, "the fox " * 40), ("  spaced\tout\n", " x ")]
    return pairs


@pytest.fixture(scope="session")
def xlmr_tok(checkpoints) -> Path:
    return checkpoints.xlmr_tokenizer()


@pytest.fixture(scope="session")
def rerankers(checkpoints):
    """(arch, geometry, labels, activation, max_length) -> (HF folder, converted folder), built on first use."""
    def get(arch: str, geometry: str = "tiny", labels: int = 1, activation: str | None = None,
            max_length: int | None = None) -> tuple[Path, Path]:
        src = checkpoints.reranker_source(arch, geometry, labels, activation, max_length)
        return src, checkpoints.converted(src, src.name)
    return get


def _predict(src: Path, pairs, **kwargs) -> tuple[np.ndarray, object]:
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(src), device="cpu", **kwargs)
    return ce.predict(pairs, batch_size=16), ce


def _check_parity(model: engine.Model, ce, pairs, want: np.ndarray) -> None:
    """Scores within 1e-4 of CrossEncoder.predict, on the ids CrossEncoder's own preprocessing makes."""
    got = model.score_pairs([q for q, _ in pairs], [d for _, d in pairs]).raise_for_errors()
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    # scores that barely differ would not show a wrong position, token type or head (the tolerance is 1e-4)
    assert want.std(axis=0).min() > 0.01, want.std(axis=0)
    features = ce.preprocess(pairs)  # what CrossEncoder feeds its model, padded
    rows, errors = model.prepare_pairs([q for q, _ in pairs], [d for _, d in pairs])
    assert errors == [None] * len(pairs)
    for i, row in enumerate(rows):
        n = int(features["attention_mask"][i].sum())
        assert row[0].tolist() == features["input_ids"][i, :n].tolist(), i
        if "token_type_ids" in features:
            assert row[1].tolist() == features["token_type_ids"][i, :n].tolist(), i


# ---- pair tokenization ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
@pytest.mark.parametrize("max_length", [24, 25, 64])  # odd and even room for the two sides
def test_pairs_tokenize_as_the_hf_tokenizer_ids_for_ids(arch, max_length, xlmr_tok, tmp_path):
    from transformers import AutoTokenizer

    folder = minilm_dir() if arch == "bert" else xlmr_tok
    hf = AutoTokenizer.from_pretrained(str(folder))
    ours = TextTokenizer.from_dir(folder, max_length)
    pairs = pairs_for_test(seed=max_length, n=120)
    # past the first window of characters (4,096) tokenized; both sides cut (which is longer decides the odd token)
    pairs += [("x" * 6000 + " end", "y " * 40), ("long " * 300, "longer " * 320), ("b " * 320, "a " * 300),
              ("q " * 5000, "d " * 30)]
    rows, errors = ours.encode_pairs([q for q, _ in pairs], pa.array([d for _, d in pairs]))
    assert errors == [None] * len(pairs)
    want = hf([q for q, _ in pairs], [d for _, d in pairs], truncation="longest_first", max_length=max_length,
              return_token_type_ids=True)
    for i, row in enumerate(rows):
        assert row.dtype == np.int64 and row.shape[0] == 2
        assert row[0].tolist() == want["input_ids"][i], (i, pairs[i][:2])
        assert row[1].tolist() == want["token_type_ids"][i], i
    assert max(len(r[0]) for r in rows) == max_length


@pytest.mark.parametrize("max_length", [24, 25])
def test_pairs_with_truncate_false_fail_exactly_when_hf_would_cut_them(max_length):
    """truncate=False: a pair over the limit is a row error naming HF's own token count; one within it gives the
    same ids as with truncate=True."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(minilm_dir()))
    ours = TextTokenizer.from_dir(minilm_dir(), max_length)
    pairs = pairs_for_test(seed=3, n=40) + [("x " * 3000, "y")]  # the last: past the first window of characters
    queries, documents = [q for q, _ in pairs], [d for _, d in pairs]
    kept, _ = ours.encode_pairs(queries, documents)
    rows, errors = ours.encode_pairs(queries, documents, truncate=False)
    whole = hf(queries, documents, truncation=False)["input_ids"]
    assert any(len(w) > max_length for w in whole) and any(len(w) <= max_length for w in whole)
    for i, w in enumerate(whole):
        if len(w) <= max_length:
            assert errors[i] is None and rows[i].tolist() == kept[i].tolist(), i
        else:
            assert rows[i] is None, i
            # the long query is read over its first window (4,096 characters: 2,048 "x"), then "y" and 3 specials
            count = f"at least {2048 + 1 + 3}" if i == len(pairs) - 1 else f"{len(w)}"
            assert errors[i].startswith(f"the pair is {count} tokens long"), (i, errors[i], len(w))
            assert f"over the model's limit of {max_length} tokens; the request set truncate=false" in errors[i]


def test_longest_first_is_the_tokenizers_rule():
    """Every split of two side lengths into a room, against the tokenizers library itself."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    for room in range(2, 14):
        tok.enable_truncation(room + 3)  # [CLS] a [SEP] b [SEP]
        for n_a in range(0, 20):
            for n_b in range(0, 20):
                enc = tok.encode(" ".join(["cat"] * n_a), " ".join(["dog"] * n_b))
                assert (enc.ids.count(4937), enc.ids.count(3899)) == longest_first(n_a, n_b, room), (room, n_a, n_b)


def test_bad_pair_rows_are_row_errors_and_bad_calls_raise():
    tok = TextTokenizer.from_dir(minilm_dir(), 32)
    rows, errors = tok.encode_pairs(["ok", None, "fine", 5, "x"], pa.array(["doc", "doc", None, "doc", "y"]))
    assert rows[0] is not None and rows[4] is not None and rows[1] is rows[2] is rows[3] is None
    assert errors[0] is None and errors[4] is None
    assert errors[1].startswith("query: null") and errors[2].startswith("document: null")
    assert errors[3] == "query: expected a string, got int"
    bad = pa.array([b"\xff\xfe", b"ok"], pa.binary()).cast(pa.string(), safe=False)  # not UTF-8
    _, errors = tok.encode_pairs(["q", "q"], bad)
    assert "document: text is not valid UTF-8" in errors[0] and errors[1] is None
    with pytest.raises(InputError, match="one document per query, got 2 queries and 1 documents"):
        tok.encode_pairs(["a", "b"], ["c"])
    with pytest.raises(InputError, match="single string"):
        tok.encode_pairs("a", ["c"])


# ---- scores against CrossEncoder.predict ------------------------------------------------------------------

@pytest.mark.parametrize("arch,geometry,labels,max_length", [
    ("bert", "tiny", 1, 45),  # 45 - 3 specials: an odd room, so over-long pairs split unevenly
    ("bert", "odd", 3, None),
    ("xlm-roberta", "tiny", 1, 47),
    ("xlm-roberta", "odd", 2, None),
])
def test_scores_match_cross_encoder_with_and_without_sigmoid(rerankers, arch, geometry, labels, max_length):
    pairs = pairs_for_test()
    src, out = rerankers(arch, geometry, labels, None, max_length)
    model = engine.load_model(out)
    want, ce = _predict(src, pairs)  # CrossEncoder's default: sigmoid for 1 label, else the logits
    assert model.info.score_activation == ("Sigmoid" if labels == 1 else "Identity") == type(ce.activation_fn).__name__
    assert model.info.kind == "reranker" and model.info.modalities == ("pairs",) and model.info.dim == labels
    _check_parity(model, ce, pairs, want)
    if labels > 1:
        assert want.shape == (len(pairs), labels)
        return
    assert ((want > 0) & (want < 1)).all()
    src, out = rerankers(arch, geometry, labels, IDENTITY, max_length)  # config.json says: raw logits
    model = engine.load_model(out)
    want_logits, ce = _predict(src, pairs)
    assert model.info.score_activation == "Identity" and (np.abs(want_logits) > 1).any()
    _check_parity(model, ce, pairs, want_logits)
    np.testing.assert_allclose(1 / (1 + np.exp(-want_logits)), want, atol=1e-5)  # same weights, same seed


@pytest.mark.slow
@pytest.mark.parametrize("arch,geometry", [("bert", "minilm"), ("xlm-roberta", "bge-base")])
def test_full_geometry_matches_cross_encoder(rerankers, arch, geometry, tmp_path):
    """ms-marco-MiniLM-L6-v2's and bge-reranker-base's widths (2 layers), pairs up to 512 tokens."""
    pairs = pairs_for_test(seed=3, n=12) + [("long query " * 200, "long document " * 400)]
    src, out = rerankers(arch, geometry)
    model = engine.load_model(out)
    want, ce = _predict(src, pairs)
    _check_parity(model, ce, pairs, want)
    assert max(len(r[0]) for r in model.prepare_pairs([q for q, _ in pairs], [d for _, d in pairs])[0]) == 512
    # the same weights with config.json saying Identity, as cross-encoder/ms-marco-MiniLM-L6-v2's does
    logits_dir = tmp_path / "logits"
    shutil.copytree(out, logits_dir)
    config = json.loads((out / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": IDENTITY}
    (logits_dir / "config.json").write_text(json.dumps(config))
    from sentence_transformers import CrossEncoder

    want_logits = CrossEncoder(str(src), device="cpu", activation_fn=torch.nn.Identity()).predict(pairs)
    _check_parity(engine.load_model(logits_dir), ce, pairs, want_logits)


def test_roberta_cross_encoder_saved_by_sentence_transformers_6(tmp_path):
    """RobertaForSequenceClassification (byte-level BPE tokenizer), in the folder CrossEncoder.save writes."""
    from sentence_transformers import CrossEncoder
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(_WORDS)] * 20, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(tmp_path))
    tok = RobertaTokenizerFast.from_pretrained(str(tmp_path), model_max_length=40)
    torch.manual_seed(2)
    net = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=len(tok), max_position_embeddings=42, pad_token_id=1, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=1))
    strengthen_reranker(net)
    net.save_pretrained(str(tmp_path / "hf"))
    tok.save_pretrained(str(tmp_path / "hf"))
    CrossEncoder(str(tmp_path / "hf"), device="cpu", activation_fn=torch.nn.Identity()).save(str(tmp_path / "st"))
    assert json.loads((tmp_path / "st" / "modules.json").read_text())[0]["type"].endswith("Transformer")
    convert_checkpoint(tmp_path / "st", tmp_path / "out", progress=False)
    model = engine.load_model(tmp_path / "out")
    pairs = pairs_for_test(seed=5, n=20)
    want, ce = _predict(tmp_path / "st", pairs)
    assert model.info.score_activation == "Identity" == type(ce.activation_fn).__name__
    _check_parity(model, ce, pairs, want)


# ---- the activation, as CrossEncoder finds it -------------------------------------------------------------

def _layout(src: Path, out: Path, layout: str, activation) -> Path:
    """``src`` (a HF folder without sentence-transformers metadata) with ``activation`` where ``layout`` keeps it."""
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config.pop("sentence_transformers", None)
    if layout == "config.json":  # sentence-transformers 4.x-5.x
        config["sentence_transformers"] = {"activation_fn": activation, "version": "5.1.0"}
    elif layout == "legacy":  # before 4.0
        config["sbert_ce_default_activation_function"] = activation
    elif layout == "st6":  # sentence-transformers 6.x CrossEncoder.save
        transformer = "sentence_transformers.base.modules.transformer.Transformer"
        (out / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": transformer}]))
        (out / "config_sentence_transformers.json").write_text(json.dumps(
            {"model_type": "CrossEncoder", "activation_fn": activation, "prompts": {}, "default_prompt_name": None}))
        (out / "sentence_bert_config.json").write_text(json.dumps({"transformer_task": "sequence-classification"}))
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("layout,activation,expected", [
    ("config.json", IDENTITY, "Identity"),
    ("config.json", "torch.nn.Tanh", "Tanh"),
    ("config.json", None, "Sigmoid"),  # no path: the default for one label
    ("config.json", "my_package.Scale", "Sigmoid"),  # not torch: not trusted, the default
    ("legacy", IDENTITY, "Identity"),
    ("st6", IDENTITY, "Identity"),
    ("st6", SIGMOID, "Sigmoid"),
    ("st6", "my_package.Scale", "Sigmoid"),
])
def test_the_activation_is_read_where_cross_encoder_reads_it(rerankers, tmp_path, layout, activation, expected):
    src, _ = rerankers("bert")
    folder = _layout(src, tmp_path / "src", layout, activation)
    convert_checkpoint(folder, tmp_path / "out", progress=False)
    model = engine.load_model(tmp_path / "out")
    pairs = pairs_for_test(n=6)
    want, ce = _predict(folder, pairs)
    assert model.info.score_activation == expected == type(ce.activation_fn).__name__
    got = model.score_pairs([q for q, _ in pairs], [d for _, d in pairs]).scores
    assert np.abs(got - want).max() <= 1e-4


def test_an_activation_the_engine_lacks_is_a_clear_error(rerankers, tmp_path):
    src, _ = rerankers("bert")
    folder = _layout(src, tmp_path / "src", "config.json", "torch.nn.modules.activation.LogSigmoid")
    convert_checkpoint(folder, tmp_path / "out", progress=False)
    with pytest.raises(ModelConfigError, match="LogSigmoid.*supported: torch.nn's"):
        engine.load_model(tmp_path / "out")


# ---- conversion -------------------------------------------------------------------------------------------

def test_conversion_keeps_the_head_and_a_sentence_transformer_is_not_a_reranker(rerankers, tmp_path):
    import pyarrow.ipc as ipc

    src, out = rerankers("bert")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "reranker" and manifest["architecture"] == "BertForSequenceClassification"
    names = ipc.open_file(str(out / "weights.arrow")).read_all().column("name").to_pylist()
    assert {"pooler.dense.weight", "classifier.weight", "classifier.bias"} <= set(names)
    assert not any(n.startswith("bert.") for n in names)
    src_x, out_x = rerankers("xlm-roberta")
    names = ipc.open_file(str(out_x / "weights.arrow")).read_all().column("name").to_pylist()
    assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= set(names)
    assert not any(n.startswith(("roberta.", "pooler.")) for n in names)
    # modules.json with pooling over the classifier's encoder: a sentence-transformer, not claimed here
    from engine import registry

    folder = _layout(src, tmp_path / "st", "st6", IDENTITY)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    config = json.loads((folder / "config.json").read_text())
    assert registry.detect(config, folder).kind != "reranker"


# ---- the engine API ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reranker(rerankers):
    return engine.load_model(rerankers("bert", max_length=45)[1])


def test_rows_fail_alone_and_scores_do_not_depend_on_the_batch(reranker):
    pairs = pairs_for_test(seed=7, n=4)  # 13 pairs of mixed lengths, some past the model's length
    queries, documents = [q for q, _ in pairs], [d for _, d in pairs]
    queries[3], documents[5], queries[8] = None, None, 42
    result = reranker.score_pairs(queries, documents)
    assert result.errors[3] == "query: null text: expected a string"
    assert result.errors[5] == "document: null text: expected a string"
    assert result.errors[8] == "query: expected a string, got int"
    assert list(result.ok).count(False) == 3 and result.scores[[3, 5, 8]].tolist() == [0, 0, 0]
    good = [i for i, e in enumerate(result.errors) if e is None]
    alone = [reranker.score_pairs([queries[i]], [documents[i]]).scores[0] for i in good]
    np.testing.assert_allclose(result.scores[good], alone, atol=1e-5, rtol=0)
    arrow = reranker.score_pairs(pa.array([None if i == 8 else q for i, q in enumerate(queries)]),
                                 pa.array(documents, pa.large_string()))
    np.testing.assert_array_equal(arrow.scores[good], result.scores[good])
    with pytest.raises(engine.RowErrors):
        reranker.score_pairs(["a"], [None]).raise_for_errors()
    ranked = reranker.rerank("how many people live in berlin", documents[:4])
    np.testing.assert_array_equal(ranked.scores, reranker.score_pairs(["how many people live in berlin"] * 4,
                                                                      documents[:4]).scores)
    with pytest.raises(InputError, match="expected one string"):
        reranker.rerank(["a", "b"], ["c", "d"])
    with pytest.raises(InputError, match="one document per query"):
        reranker.score_pairs(["a", "b", "c"], ["d"])
    queries, documents = ["word " * 90, "a short query"], ["dog", "a dog"]  # the first: 90 + 1 + 3 > 45 tokens
    strict = reranker.score_pairs(queries, documents, truncate=False)
    assert strict.errors[0].startswith("the pair is 94 tokens long") and strict.errors[1] is None
    assert strict.scores[0] == 0  # the other row scores as with truncation (another batch: padding differs)
    np.testing.assert_allclose(strict.scores[1], reranker.score_pairs(queries, documents).scores[1], atol=1e-5, rtol=0)
    assert reranker.rerank("word " * 90, ["dog"], truncate=False).errors == strict.errors[:1]
    with pytest.raises(InputError, match="truncate must be True or False"):
        reranker.score_pairs(["a"], ["b"], truncate="no")


def test_a_reranker_embeds_nothing_and_an_embedding_model_scores_no_pairs(reranker, minilm_model_dir):
    with pytest.raises(ModalityError, match="is a reranker: it scores .query, document. pairs"):
        reranker.embed_texts(["a"])
    with pytest.raises(ModalityError, match="is a reranker"):
        reranker.encode_tokens([[101, 102]])
    minilm = engine.load_model(minilm_model_dir)
    with pytest.raises(ModalityError, match="is an embedding model .text.; scoring pairs needs a reranker"):
        minilm.score_pairs(["a"], ["b"])


@pytest.mark.parametrize("precision,tolerance", [("bf16", 0.05), ("int8", 0.05)])
def test_cpu_precisions_stay_close_and_int8_keeps_the_head_in_float(rerankers, precision, tolerance):
    from engine.quantize import Int8Linear

    _, out = rerankers("bert", max_length=45)
    pairs = pairs_for_test(seed=11, n=30)
    fp32 = engine.load_model(out).score_pairs([q for q, _ in pairs], [d for _, d in pairs]).scores
    model = engine.load_model(out, precision=precision)
    got = model.score_pairs([q for q, _ in pairs], [d for _, d in pairs]).scores
    assert np.abs(got - fp32).max() <= tolerance, np.abs(got - fp32).max()
    assert np.corrcoef(got, fp32)[0, 1] > 0.99
    if precision == "int8":
        assert not isinstance(model.net.classifier, Int8Linear) and not isinstance(model.net.pooler.dense, Int8Linear)
        assert isinstance(model.net.encoder.layer[0].intermediate.dense, Int8Linear)


# ---- the scheduler ----------------------------------------------------------------------------------------

def test_the_scheduler_coalesces_pairs_of_several_callers(reranker):
    from engine.scheduler import Scheduler, SchedulerConfig

    per_caller = [pairs_for_test(seed=20 + i, n=9) for i in range(4)]
    batches: list[tuple[str, int]] = []
    inside = threading.Barrier(4)
    prepare = reranker.prepare_pairs

    def prepare_together(queries, documents, prompt_name=None, truncate=True):  # every caller is preparing at once
        inside.wait(60)
        return prepare(queries, documents, prompt_name, truncate=truncate)

    results: list = [None] * 4
    with Scheduler(reranker, SchedulerConfig(max_wait_ms=60_000),
                   on_batch=lambda q, rows, s: batches.append((q, rows))) as sched:
        sched.model.prepare_pairs = prepare_together
        try:
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, sched.score_pairs(
                [q for q, _ in per_caller[i]], [d for _, d in per_caller[i]]))) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        finally:
            del sched.model.prepare_pairs
    assert batches and all(q == "pairs" for q, _ in batches)
    assert max(rows for _, rows in batches) > len(per_caller[0])  # rows of several callers in one device batch
    assert sum(rows for _, rows in batches) == sum(len(p) for p in per_caller)
    for pairs, result in zip(per_caller, results):
        want = reranker.score_pairs([q for q, _ in pairs], [d for _, d in pairs])
        assert result.errors == want.errors
        np.testing.assert_allclose(result.scores, want.scores, atol=1e-5, rtol=0)
    with Scheduler(reranker) as sched:  # a lone caller: the direct call's bits
        pairs = pairs_for_test(seed=30, n=10)
        got = sched.score_pairs([q for q, _ in pairs] + [None], [d for _, d in pairs] + ["x"])
    want = reranker.score_pairs([q for q, _ in pairs] + [None], [d for _, d in pairs] + ["x"])
    assert np.array_equal(got.scores, want.scores) and got.errors == want.errors
