"""Text front end: the exact CLIP tokenizer, truncation, token-id validation, buckets."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from engine.errors import InputError
from engine.tokenizer import TextTokenizer, length_buckets, token_rows


@pytest.fixture(scope="module")
def clip_tok(tiny_clip_source):
    return TextTokenizer.from_dir(tiny_clip_source, 77)


def test_known_clip_ids(clip_tok):
    rows, errors = clip_tok.encode(["a photo of a cat", ""])
    assert errors == [None, None]
    assert rows[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert rows[1].tolist() == [49406, 49407]


def test_truncation_keeps_end_of_text_and_matches_hf(clip_tok, tiny_clip_source):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_clip_source))
    texts = ["word " * 200, "Ünïcode, punctuation!!  and   spaces\tand\nnewlines", "短い日本語のテキスト"]
    rows, _ = clip_tok.encode(texts)
    ref = hf(texts, truncation=True, max_length=77)["input_ids"]
    for r, e in zip(rows, ref):
        assert r.tolist() == e
    assert len(rows[0]) == 77 and rows[0][-1] == 49407


def test_null_and_non_string_rows_are_row_errors(clip_tok):
    rows, errors = clip_tok.encode(pa.array(["ok", None, "fine"]))
    assert rows[1] is None and "null" in errors[1]
    assert errors[0] is None and errors[2] is None
    rows, errors = clip_tok.encode(["ok", 5])
    assert rows[1] is None and "string" in errors[1]


def test_every_arrow_string_layout_gives_the_same_ids(clip_tok):
    texts = ["a photo of a cat", None, "", "Ünïcode café"]
    want = clip_tok.encode(pa.array(texts, pa.string()))
    for array in (pa.array(texts, pa.large_string()), pa.array(texts, pa.string_view()),  # Polars: string_view
                  pa.array(texts, pa.string()).dictionary_encode()):
        rows, errors = clip_tok.encode(array)
        assert errors == want[1] and all((a is None and b is None) or a.tolist() == b.tolist()
                                         for a, b in zip(rows, want[0])), array.type


def test_wrong_arrow_type_is_request_error(clip_tok):
    with pytest.raises(InputError, match="string"):
        clip_tok.encode(pa.array([1, 2]))
    with pytest.raises(InputError, match="single string"):
        clip_tok.encode("just one")


def test_token_rows_validation_from_arrow():
    arr = pa.array([[1, 2, 3], [], None, [0, 99], [5] * 10, [1, None]], type=pa.list_(pa.int32()))
    rows, errors = token_rows(arr, vocab_size=50, max_length=8)
    assert rows[0].tolist() == [1, 2, 3] and errors[0] is None
    assert "empty" in errors[1]
    assert "null" in errors[2]
    assert "99" in errors[3] and "[0, 50)" in errors[3]
    assert "8 positions" in errors[4]
    assert "null" in errors[5]


def test_token_rows_are_views_of_arrow_values():
    arr = pa.array([[1, 2, 3], [4, 5]], type=pa.large_list(pa.int64()))
    rows, _ = token_rows(arr, vocab_size=10, max_length=8)
    base = arr.values.buffers()[1].address
    assert rows[1].ctypes.data == base + 3 * 8


def test_token_rows_from_python_lists():
    rows, errors = token_rows([[1, 2], ["a"], [[1, 2]], [-1]], vocab_size=10, max_length=4)
    assert rows[0].tolist() == [1, 2]
    assert all(e is not None for e in errors[1:])
    with pytest.raises(InputError):
        token_rows(pa.array(["x"]), 10, 4)


def test_length_buckets_cover_every_row_once_and_respect_budgets():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 78, size=500).tolist()
    groups = length_buckets(lengths, max_rows=64, max_tokens=2048)
    seen = np.concatenate(groups)
    assert sorted(seen.tolist()) == list(range(500))
    for g in groups:
        assert len(g) <= 64
        assert len(g) * max(lengths[i] for i in g) <= 2048 or len(g) == 1


def test_invalid_utf8_in_a_string_column_is_a_row_error(clip_tok):
    values = pa.py_buffer(b"okbad\xff\xfe")
    offsets = pa.py_buffer(np.array([0, 2, 7], dtype=np.int32).tobytes())
    arr = pa.Array.from_buffers(pa.string(), 2, [None, offsets, values])
    rows, errors = clip_tok.encode(arr)
    assert errors[0] is None and rows[0] is not None
    assert rows[1] is None and "UTF-8" in errors[1]


def test_lazy_tokenizer_parses_on_first_use_and_only_once(tiny_clip_source, monkeypatch):
    import engine.tokenizer as tk

    calls = []
    real = tk.Tokenizer.from_str  # the loader parses the bytes it read and checked (engine.files)
    monkeypatch.setattr(tk.Tokenizer, "from_str", staticmethod(lambda s: calls.append(s) or real(s)))
    tok = TextTokenizer.from_dir(tiny_clip_source, 77, lazy=True)
    assert not tok.loaded and calls == []
    rows, _ = tok.encode(["a photo of a cat"])
    assert rows[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    tok.encode(["again"])
    assert tok.loaded and len(calls) == 1


def test_lazy_tokenizer_reports_a_broken_file_when_it_is_used(tmp_path):
    from engine.errors import ModelConfigError

    (tmp_path / "tokenizer.json").write_text("{ not json")
    tok = TextTokenizer.from_dir(tmp_path, 77, lazy=True)  # existence is checked now, parsing later
    with pytest.raises(ModelConfigError, match="could not be read"):
        tok.encode(["text"])
    with pytest.raises(ModelConfigError, match="missing"):
        TextTokenizer.from_dir(tmp_path / "nowhere", 77, lazy=True)


# ---- long texts: only the window truncation can keep is tokenized ------------------------------

def _long_texts(seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["hello", "world", "naïve", "東京", "🙂", "supercalifragilistic", "x" * 150, "\t", "...",
             "1234567890" * 3, "Ω≈ç√", "don't", "e-mail"]
    prose = " ".join(rng.choice(words, 6000))
    return [prose, "東京大阪" * 4000, " " * 40_000 + "hello there", "a" * 60_000, prose[:9000] + " " * 30_000,
            "word " * 10 + "\u200b" * 50_000 + prose[:500], prose[::-1], "é" * 9000]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_length", [256, 16])
def test_a_long_text_gives_the_ids_of_the_whole_text(minilm_source, side, max_length):
    """Cut to its window (grown where the window holds too few tokens), a long text gives exactly the ids
    the tokenizer gives the whole text, from a list and from an Arrow column, with a prompt before it."""
    from tokenizers import Tokenizer

    path = minilm_source / "tokenizer.json"
    ours = TextTokenizer(path, max_length, truncation_side=side, prefix="query: ")
    whole = Tokenizer.from_file(str(path))
    whole.no_padding()
    whole.enable_truncation(max_length, direction=side)
    texts = _long_texts()
    want = [whole.encode("query: " + t).ids for t in texts]
    for given in (texts, pa.array(texts), pa.array(texts, pa.large_string())):
        rows, errors = ours.encode(given)
        assert errors == [None] * len(texts)
        assert [r.tolist() for r in rows] == want


def test_a_long_clip_text_gives_the_ids_of_the_whole_text(clip_tok, tiny_clip_source):
    from tokenizers import Tokenizer

    whole = Tokenizer.from_file(str(tiny_clip_source / "tokenizer.json"))
    whole.no_padding()
    whole.enable_truncation(77)
    texts = _long_texts(1)
    rows, errors = clip_tok.encode(pa.array(texts))
    assert errors == [None] * len(texts)
    assert [r.tolist() for r in rows] == [whole.encode(t).ids for t in texts]


def test_a_huge_text_costs_what_its_window_costs(minilm_source):
    """A 25 MB text row: tokenizing it whole took ~90 s and ~3.5 GB here; its window takes milliseconds and no
    memory to speak of. A text whose window never fills (25 MB of spaces) is a row error that says why."""
    script = f"""
import json, pyarrow as pa
from pathlib import Path
from engine.tokenizer import TextTokenizer
def hwm(): return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
tok = TextTokenizer(Path({str(minilm_source / "tokenizer.json")!r}), 256).load()
texts = pa.array(["lorem ipsum dolor sit amet " * 1_000_000, " " * 25_000_000, "fine"])
base = hwm()
rows, errors = tok.encode(texts)
print(json.dumps([hwm() - base, len(rows[0]), errors]))
"""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    grew, kept, errors = json.loads(out.stdout)
    assert grew < 100 * 1024 ** 2  # bytes of peak RSS above the process with the input in it
    assert kept == 256 and errors[0] is None and errors[2] is None
    assert errors[1].startswith("text of 25000000 characters: the 256 tokens the model keeps could not be told from "
                                "its first 262144 characters")
