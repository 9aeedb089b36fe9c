"""Bounded, deterministic fuzzing of everything that reads bytes a client controls.

Each target may only fail the way its contract says: the Flight command parser with ``ProtocolError``, the
image header reader with ``HeaderError``, the image processor and the text/token front ends with row error
strings (never an exception for a bad row), the weight-file reader with ``WeightFormatError``. A crash of the
process (a decoder segfault) fails the whole run, which is the point.

Hypothesis runs derandomized (the same examples on every run, no example database), with ``max_examples``
sized so the whole file takes well under a minute on 2 busy cores. Inputs that once broke a target are pinned
with ``@example`` or a test of their own, so they are tried first on every run.
"""
from __future__ import annotations

import io
import itertools
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from tokenizers import Tokenizer

from convert.writer import Tensor, write_tensors
from engine.errors import InputError, WeightFormatError
from engine.image_header import PARSED_FORMATS, HeaderError, read_header, sniff_format
from engine.image_processor import ArrowImageProcessor, ImageConfig
from engine.tokenizer import TextTokenizer, token_rows
from engine.weights import WeightFile
from flight_server import protocol
from flight_server.protocol import ProtocolError, parse_command

pytestmark = pytest.mark.slow  # ~30-60 s in all on 2 busy cores

PHOTOS = Path(__file__).parent / "data" / "photos"


def fuzz(max_examples: int):
    """Derandomized settings: the same examples every run, no deadline (a busy CI core is slow), no database."""
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ================================================================== (1) the Flight command parser

def _json_key(key: str) -> str:
    return json.dumps(key)


_json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
              | st.text(max_size=12) | st.sampled_from(list(protocol.INPUT_KINDS) + ["", "id", "error", "embedding"]))
_json_value = st.recursive(
    _json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
# JSON text json.dumps does not write: huge numbers, deep nesting, escapes, special floats.
_raw_literal = (
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "1E-400", '"\\u0000"', '"\\ud800"',
                     '"\\udfff\\ud800"', "true", "null", '""', "[]", "{}", '["id", "id"]', '["error"]'])
    | st.integers(4290, 6000).map(lambda n: "9" * n)
    | st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)
    | st.integers(1, 1500).map(lambda n: '{"a": ' * n + "1" + "}" * n)
    | st.lists(st.text(max_size=4), max_size=300).map(json.dumps)  # long passthrough lists
)
_field_value = (st.sampled_from(protocol.INPUT_KINDS).map(json.dumps)  # so that other fields get checked too
                | _json_value.map(json.dumps) | _raw_literal)
_field_key = st.sampled_from(protocol.COMMAND_KEYS) | st.sampled_from(protocol.COMMAND_KEYS) | st.text(max_size=8)


@st.composite
def _command_json(draw) -> bytes:
    pairs = draw(st.lists(st.tuples(_field_key, _field_value), max_size=7))
    if draw(st.booleans()):
        pairs.insert(0, ("input", draw(st.sampled_from(protocol.INPUT_KINDS).map(json.dumps))))
    text = "{" + ", ".join(f"{_json_key(k)}: {v}" for k, v in pairs) + "}"
    return text.encode("utf-8", "surrogatepass")


def _check_command(raw: bytes | str) -> None:
    """parse_command either gives a well-typed command that survives a round trip, or raises ProtocolError."""
    try:
        cmd = parse_command(raw)
    except ProtocolError as exc:
        assert str(exc)
        return
    assert cmd.input in protocol.INPUT_KINDS
    assert isinstance(cmd.column, str) and cmd.column
    assert cmd.model is None or (isinstance(cmd.model, str) and cmd.model)
    assert isinstance(cmd.normalize, bool)
    assert isinstance(cmd.passthrough, tuple) and all(isinstance(p, str) for p in cmd.passthrough)
    assert parse_command(cmd.to_json()) == cmd


@fuzz(400)
@given(st.binary(max_size=300) | st.binary(max_size=40).map(lambda b: b'{"input": "text"' + b))
def test_parse_command_arbitrary_bytes(raw):
    _check_command(raw)


@fuzz(200)
@given(st.lists(st.characters() | st.characters(categories=["Cs"]), max_size=200).map("".join))  # surrogates too
def test_parse_command_arbitrary_text(raw):
    _check_command(raw)


@fuzz(1000)
@given(_command_json())
@example(b"1" * 4301)  # json.loads raises ValueError (Python's 4300-digit limit on int parsing)
@example(b'{"input": ' + b"[" * 600 + b"]" * 600 + b"}")  # quote() recurses once per level: RecursionError
def test_parse_command_json_objects_with_wrong_types_and_huge_values(raw):
    _check_command(raw)


# ================================================================== (2) image headers and the processor

def _pil(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _cv(image: np.ndarray, ext: str, *params: int) -> bytes:
    return cv2.imencode(ext, image, list(params))[1].tobytes()


def _image_seeds() -> list[bytes]:
    """Small real-photo crops in every allowed format and layout, and two whole photo files."""
    bgr = np.ascontiguousarray(cv2.imread(str(PHOTOS / "coffee.png"), cv2.IMREAD_COLOR)[120:168, 200:264])
    bgra = np.dstack([bgr, np.linspace(0, 255, bgr.shape[0] * bgr.shape[1]).astype(np.uint8).reshape(bgr.shape[:2])])
    rgb = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
    rgba = Image.fromarray(np.ascontiguousarray(bgra[:, :, [2, 1, 0, 3]]))
    return [
        _cv(bgr, ".jpg"), _cv(bgr, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1), _cv(bgr[:, :, 1], ".jpg"),
        _pil(rgb.convert("CMYK"), "JPEG"),
        _cv(bgr, ".png"), _cv(bgra.astype(np.uint16) * 257, ".png"), _cv(bgr[:, :, 0].astype(np.uint16) * 257, ".png"),
        _pil(rgb.quantize(16), "PNG", transparency=0), _pil(rgb.convert("LA"), "PNG"),
        _pil(rgb, "WEBP"), _pil(rgba, "WEBP"), _pil(rgba, "WEBP", lossless=True),
        _pil(rgb, "WEBP", save_all=True, append_images=[rgb.rotate(180)]),
        _pil(rgb.quantize(16), "GIF", transparency=0),
        _pil(rgb.quantize(16), "GIF", save_all=True, append_images=[rgb.rotate(90).quantize(8)], disposal=2),
        _pil(rgb, "BMP"), _pil(rgb.quantize(16), "BMP"), _cv(bgra, ".bmp"),
        (PHOTOS / "rocket.jpg").read_bytes(), (PHOTOS / "camera.png").read_bytes(),
    ]


IMAGE_SEEDS = _image_seeds()
_MAGIC = [b"\xff\xd8\xff", b"\xff\xd8\xff\xc0\x00\x11\x08",
          b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
          b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"RIFF\x00\x00\x00\x00WEBPVP8L", b"RIFF\x00\x00\x00\x00WEBPVP8X",
          b"GIF89a", b"GIF87a", b"BM", b"BM" + bytes(12) + b"\x28\x00\x00\x00", b"II*\x00", b"\x00\x00\x01\x00"]


def _header_ranges(blob: bytes) -> list[tuple[int, int]]:
    """Byte ranges worth mutating: the first 64 bytes, and a JPEG's frame header (after its tables)."""
    ranges = [(0, min(64, len(blob)))]
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = blob.find(marker)
        if at > 0:
            ranges.append((at, min(at + 12, len(blob))))
    return ranges


@st.composite
def _mutated_image(draw) -> bytes:
    kind = draw(st.sampled_from(["flip", "set", "truncate", "extend", "magic", "splice"]))
    if kind == "magic":  # random bytes after real magic bytes
        return draw(st.sampled_from(_MAGIC)) + draw(st.binary(max_size=200))
    blob = bytearray(draw(st.sampled_from(IMAGE_SEEDS)))
    if kind == "truncate":
        return bytes(blob[: draw(st.integers(0, len(blob) - 1))])
    if kind == "extend":
        return bytes(blob + draw(st.binary(min_size=1, max_size=64)))
    if kind == "splice":  # a header, then something else
        return bytes(blob[: draw(st.integers(1, 80))] + draw(st.sampled_from(IMAGE_SEEDS))[draw(st.integers(0, 80)):])
    for _ in range(draw(st.integers(1, 6))):
        lo, hi = draw(st.sampled_from(_header_ranges(bytes(blob)) + [(0, len(blob))]))
        at = draw(st.integers(lo, hi - 1))
        if kind == "flip":
            blob[at] ^= 1 << draw(st.integers(0, 7))
        else:
            blob[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]) | st.integers(0, 255))
    if blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) >= 33 and draw(st.booleans()):  # let libpng read the IHDR
        blob[29:33] = struct.pack(">I", zlib.crc32(bytes(blob[12:29])))
    return bytes(blob)


@pytest.fixture(scope="module")
def image_processor():
    with ArrowImageProcessor(ImageConfig(), threads=2) as proc:
        yield proc


def _check_header(data: bytes):
    """sniff_format never raises; read_header raises only HeaderError; a header it gives is sane."""
    view = np.frombuffer(data, np.uint8)
    fmt = sniff_format(view)
    assert fmt is None or isinstance(fmt, str)
    if fmt not in PARSED_FORMATS:
        return None
    try:
        header = read_header(view, fmt)
    except HeaderError as exc:
        assert str(exc)
        return None
    assert header.format == fmt and header.width >= 1 and header.height >= 1
    assert header.channels in (1, 3, 4) and header.bytes_per_sample in (1, 2)
    return header


@fuzz(1200)
@given(st.lists(_mutated_image(), min_size=1, max_size=3), st.booleans())
def test_mutated_images_only_give_row_errors(image_processor, blobs, as_arrow):
    headers = [_check_header(b) for b in blobs]
    rows = pa.array(blobs, pa.binary()) if as_arrow else blobs
    batch = image_processor(rows)  # must not raise
    assert len(batch.errors) == len(blobs) and batch.pixels.shape[0] == batch.errors.count(None)
    assert batch.index.tolist() == [k for k, e in enumerate(batch.errors) if e is None]
    assert np.isfinite(batch.pixels).all()
    for blob, header, error in zip(blobs, headers, batch.errors):
        if error is not None:
            assert isinstance(error, str) and error
            assert not error.startswith("failed to process"), error  # the processor's catch-all: a path it missed
            continue
        assert header is not None  # a row that decoded had a header read_header accepted
        # The decoded-size cap is an upper bound of what the decoder really allocated, even for mangled files.
        flags = cv2.IMREAD_UNCHANGED
        if header.format == "jpeg":
            flags = cv2.IMREAD_GRAYSCALE if header.components == 1 else cv2.IMREAD_COLOR
            flags |= cv2.IMREAD_IGNORE_ORIENTATION
        decoded = cv2.imdecode(np.frombuffer(blob, np.uint8), flags)
        if decoded is not None:
            assert decoded.shape[:2] == (header.height, header.width)
            assert decoded.nbytes <= header.decoded_bytes


# ================================================================== (3) the weight-file reader

def _weight_tensors():
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g).half(),
               "scale": torch.tensor(1.5), "empty": torch.zeros(0, 2), "ids": torch.arange(3)}
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
        yield Tensor(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), memoryview(raw))


@dataclass
class _WeightFiles:
    """The bytes of a small valid weights.arrow, and a folder for mutated copies (a fresh name for each)."""

    good: bytes
    root: Path
    names: itertools.count

    def path(self) -> Path:
        return self.root / f"m{next(self.names)}.arrow"

    def __repr__(self) -> str:  # Hypothesis prints the arguments of a failing example
        return f"<weights.arrow of {len(self.good)} bytes>"


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> _WeightFiles:
    root = tmp_path_factory.mktemp("fuzz-weights")
    write_tensors(root / "weights.arrow", "arrow", _weight_tensors())
    return _WeightFiles((root / "weights.arrow").read_bytes(), root, itertools.count())


def _open_weights(path: Path) -> None:
    """WeightFile.open raises only WeightFormatError; a file it accepts gives in-bounds tensors."""
    try:
        wf = WeightFile.open(path)
    except WeightFormatError as exc:
        assert str(exc)
        return
    for name, t in wf.tensors().items():
        assert t.numel() * t.element_size() == wf.info(name).nbytes
        t.reshape(-1).view(torch.uint8).sum()  # touch every byte: the views lie inside the map


@st.composite
def _mutated_weights(draw, good: bytes) -> bytes:
    blob = bytearray(good)
    kind = draw(st.sampled_from(["flip", "set", "truncate", "extend", "zero-run"]))
    if kind == "truncate":
        return bytes(blob[: draw(st.integers(0, len(blob) - 1))])
    if kind == "extend":
        return bytes(blob + draw(st.binary(min_size=1, max_size=128)))
    # the metadata (schema at the start, footer at the end) is where a change matters; tensor bytes are opaque
    where = st.integers(0, 511) | st.integers(len(blob) - 512, len(blob) - 1) | st.integers(0, len(blob) - 1)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(where)
        if kind == "flip":
            blob[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            blob[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]) | st.integers(0, 255))
        else:
            end = min(len(blob), at + draw(st.integers(1, 16)))
            blob[at:end] = bytes(end - at)
    return bytes(blob)


@fuzz(800)
@given(data=st.data())
def test_mutated_weight_files_only_raise_weight_format_error(weight_files, data):
    path = weight_files.path()
    path.write_bytes(data.draw(_mutated_weights(weight_files.good)))
    try:
        _open_weights(path)
    finally:
        path.unlink()


_COLUMN_TYPES = {
    "utf8": (pa.utf8(), st.sampled_from(["float32", "float16", "int64", "bfloat16", "", "x", "a" * 64])),
    "list<int64>": (pa.list_(pa.int64()), st.lists(st.integers(-3, 2**40), max_size=3)),
    "large_binary": (pa.large_binary(), st.binary(max_size=24)),
    "binary": (pa.binary(), st.binary(max_size=8)),
    "int64": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
}


@st.composite
def _weight_schema_file(draw) -> bytes:
    """An Arrow IPC file with columns drawn from the format's names (duplicates too), of random types."""
    names = draw(st.lists(st.sampled_from(["name", "dtype", "shape", "sha256", "data", "_pad", "x"]),
                          min_size=1, max_size=7))
    kinds = [draw(st.sampled_from(sorted(_COLUMN_TYPES))) for _ in names]
    rows = draw(st.integers(0, 2))
    arrays = [pa.array([draw(_COLUMN_TYPES[k][1]) for _ in range(rows)], _COLUMN_TYPES[k][0]) for k in kinds]
    meta = draw(st.sampled_from([None, {"arrowengine.format": "arrowengine", "arrowengine.format_version": "1"},
                                 {"arrowengine.format": "arrowengine", "arrowengine.format_version": "9"}]))
    schema = pa.schema([pa.field(n, a.type) for n, a in zip(names, arrays)], metadata=meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
    return sink.getvalue().to_pybytes()


@fuzz(300)
@given(data=st.data())
def test_weight_files_with_odd_schemas_only_raise_weight_format_error(weight_files, data):
    path = weight_files.path()
    path.write_bytes(data.draw(_weight_schema_file()))
    try:
        _open_weights(path)
    finally:
        path.unlink()


def test_weight_file_with_a_duplicated_column_name_is_a_weight_format_error(tmp_path):
    """Found by the schema fuzzer (and by a single byte set to 0x80 in the footer of a real file): a schema naming
    a column twice made pyarrow's Schema.field raise KeyError out of WeightFile.open."""
    names = ["name", "dtype", "shape", "sha256", "shape", "data"]
    types = [pa.utf8(), pa.utf8(), pa.list_(pa.int64()), pa.utf8(), pa.list_(pa.int64()), pa.large_binary()]
    schema = pa.schema([pa.field(n, t) for n, t in zip(names, types)],
                       metadata={"arrowengine.format": "arrowengine", "arrowengine.format_version": "1"})
    arrays = [pa.array([], t) for t in types]
    with pa.OSFile(str(tmp_path / "weights.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
    with pytest.raises(WeightFormatError):
        WeightFile.open(tmp_path / "weights.arrow")


# ================================================================== (4) token ids and texts

_token = (st.integers(-5, 300) | st.integers(-(2**70), 2**70) | st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1])
          | st.none() | st.booleans() | st.floats() | st.text(max_size=3))
_token_row = (
    st.lists(st.integers(-5, 300), max_size=20)
    | st.lists(_token, max_size=10)
    | st.lists(st.lists(st.integers(0, 9) | st.none(), max_size=3), max_size=4)  # nested
    | st.none() | st.integers() | st.text(max_size=5) | st.binary(max_size=5)
    | st.dictionaries(st.integers(0, 5), st.integers(0, 5), max_size=2)
    | st.tuples(st.sampled_from(["int8", "uint8", "int32", "uint64", "float32", "bool"]),
                st.lists(st.integers(0, 255), max_size=8)).map(lambda t: np.array(t[1]).astype(t[0]))
)


def _check_token_result(n: int, rows, errors, vocab: int, max_length: int) -> None:
    assert len(rows) == len(errors) == n
    for row, error in zip(rows, errors):
        if error is not None:
            assert row is None and isinstance(error, str) and error
            continue
        assert isinstance(row, np.ndarray) and row.dtype == np.int64 and row.ndim == 1
        assert 1 <= row.size <= max_length and row.min() >= 0 and row.max() < vocab


@fuzz(800)
@given(st.lists(_token_row, max_size=6), st.integers(1, 2**40) | st.integers(1, 400), st.integers(1, 40),
       st.none() | st.integers(-2, 300))
def test_token_rows_give_row_errors_for_anything(rows, vocab, max_length, pad_id):
    out, errors = token_rows(rows, vocab, max_length, pad_id=pad_id)  # must not raise
    _check_token_result(len(rows), out, errors, vocab, max_length)


@fuzz(300)
@given(st.lists(st.none() | st.lists(st.none() | st.integers(-(2**31), 2**31 - 1), max_size=12), max_size=6),
       st.sampled_from([pa.int32(), pa.int64()]), st.sampled_from([pa.list_, pa.large_list]),
       st.integers(1, 400), st.integers(1, 40), st.none() | st.integers(0, 300))
def test_arrow_token_rows_give_row_errors_for_anything(rows, value_type, list_type, vocab, max_length, pad_id):
    arr = pa.array(rows, list_type(value_type))
    if len(arr) > 1:
        arr = arr.slice(1)  # an offset into the buffers
        rows = rows[1:]
    out, errors = token_rows(arr, vocab, max_length, pad_id=pad_id)
    _check_token_result(len(rows), out, errors, vocab, max_length)


_text_chars = st.characters(exclude_categories=("Cs",))  # a Python str that Arrow could carry
_text_piece = (
    st.text(_text_chars, max_size=30)
    | st.sampled_from(["\x00", " ", "  \t\n", "\u200b", "\u0301", "\ufeff", "😀", "a photo of a cat", "İ", "ß",
                       "ﬃ"])
    | st.tuples(st.text(_text_chars, min_size=1, max_size=3), st.integers(1, 12_000)).map(lambda t: t[0] * t[1])
    | st.integers(500, 9000).map(lambda n: " " * n)  # runs the tokenizer drops: a window may hold too few tokens
    | st.integers(10, 1500).map(lambda n: "the cat sat " * n)
    | st.integers(100, 6000).map(lambda n: "x" * n + " ")  # one long word across the window's edge
)
_text = st.lists(_text_piece, max_size=5).map("".join)
ORACLE_MAX_CHARS = 60_000  # the whole-text encode the windowed one is compared with costs ~2 ms per 1,000 chars


def _whole_text_tokenizer(model_dir: Path, side: str) -> Tokenizer:
    """A plain tokenizers.Tokenizer that reads whole texts, cutting them at 77 tokens on ``side``: the oracle."""
    whole = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    whole.no_padding()
    whole.enable_truncation(77, direction=side)
    return whole


@pytest.fixture(scope="module")
def tokenizers(tiny_clip_dir) -> tuple[TextTokenizer, Tokenizer]:
    """(the engine's TextTokenizer of the tiny CLIP model, its whole-text oracle)."""
    tok = TextTokenizer.from_dir(tiny_clip_dir, 77)
    return tok, _whole_text_tokenizer(tiny_clip_dir, tok.truncation_side)


@pytest.fixture(scope="module")
def left_tokenizers(tiny_clip_dir) -> tuple[TextTokenizer, Tokenizer]:
    """The same model's tokenizer cutting on the left (tokenizer_config.json's truncation_side), and its oracle."""
    tok = TextTokenizer(Path(tiny_clip_dir) / "tokenizer.json", 77, truncation_side="left").load()
    return tok, _whole_text_tokenizer(tiny_clip_dir, "left")


@fuzz(400)
@given(st.lists(_text | st.none() | st.integers() | st.floats() | st.binary(max_size=4), max_size=5),
       st.sampled_from(["list", "string", "large_string", "dictionary"]))
@example(["a" * 300_000, " " * 300_000 + "word", "\x00" * 100_000, "😀" * 60_000], "list")
def test_text_tokenizer_gives_row_errors_and_the_whole_texts_ids(tokenizers, texts, container):
    tok, whole = tokenizers
    rows = texts
    if container != "list":
        texts = [t if isinstance(t, str) else None for t in texts]
        rows = pa.array(texts, pa.large_string() if container == "large_string" else pa.string())
        if container == "dictionary":
            rows = rows.dictionary_encode()
    ids, errors = tok.encode(rows)  # must not raise
    vocab = whole.get_vocab_size()
    _check_token_result(len(texts), ids, errors, vocab, 77)
    for text, row, error in zip(texts, ids, errors):
        if not isinstance(text, str):
            assert error is not None
        elif error is None and len(text) <= ORACLE_MAX_CHARS:  # reading a window gives the whole text's ids
            assert row.tolist() == whole.encode(text, add_special_tokens=True).ids


@fuzz(60)
@given(_text)
@example("x" * 4097)  # one word just over the 4096-character window
def test_left_truncation_window_gives_the_whole_texts_ids(left_tokenizers, text):
    """A tokenizer that cuts on the left reads the last window of a long text; the ids must still be those of
    the whole text. Found by the fuzzer: BPE splits a long word from its start, so the last window of one word
    can end in other tokens than the whole word does ('xxxx</w>' for 'xxxxx</w>' here)."""
    tok, whole = left_tokenizers
    (ids,), (error,) = tok.encode([text])
    if error is None and len(text) <= ORACLE_MAX_CHARS:
        assert ids.tolist() == whole.encode(text, add_special_tokens=True).ids


# ================================================================== findings outside the fuzzed alphabets

@pytest.mark.parametrize("target", ["token_rows", "TextTokenizer.encode"])
@pytest.mark.parametrize("value", [None, 5, 1.5])
def test_a_non_sequence_input_is_an_input_error(tokenizers, target, value):
    """Found by fuzzing the top-level argument: token_rows(None) and TextTokenizer.encode(None) raised TypeError
    ('NoneType' object is not iterable), where a bad container is a request-level InputError elsewhere
    (row_views for images, a bare str for texts)."""
    with pytest.raises(InputError):
        if target == "token_rows":
            token_rows(value, 100, 8)
        else:
            tokenizers[0].encode(value)


def test_a_text_with_a_lone_surrogate_is_a_row_error(tokenizers):
    """Outside the alphabet the brief fuzzes (Arrow strings cannot hold surrogates), but a Python caller's list
    can: the row should fail, not the call."""
    ids, errors = tokenizers[0].encode(["fine", "a\ud800b"])
    assert errors[0] is None and errors[1] is not None and ids[1] is None
