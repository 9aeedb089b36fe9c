"""Request options: ``dimensions`` (Matryoshka truncation), ``output_dtype`` and ``truncate``.

engine.output's conversion against its definition and sentence-transformers' ``quantize_embeddings``; the output
columns wrapped without a copy; every bad value in-process and over Flight; Flight results equal to the
in-process ones (tiny CLIP, real MiniLM); the declared Matryoshka sizes from the converter to the ``models``
action; the client's keywords and the ``arrowengine embed`` flags.
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

import engine
from convert.matryoshka import declared_sizes
from convert.pipeline import convert_checkpoint
from engine.errors import InputError, ModelConfigError
from engine.output import OUTPUT_DTYPES, OutputOptions, convert, dequantize
from engine.scheduler import Scheduler
from flight_client import EmbeddingClient
from flight_client.cli import main
from flight_client.job_io import read_output
from flight_server import protocol
from flight_server.config import ServerConfig
from flight_server.servicer import EmbeddingServer

try:
    from sentence_transformers.util.quantization import quantize_embeddings
except ImportError:  # sentence-transformers before 5
    from sentence_transformers.quantization import quantize_embeddings

TEXTS = ["a photo of a cat", "a dog on a boat", "", "the quick brown fox jumps over the lazy dog"]


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    x[1, ::3] = 0.0  # exact zeros: a zero is not > 0 (a 0 bit)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---- engine.output ----------------------------------------------------------------------------------------

def test_default_options_give_the_engines_own_array():
    x = unit_rows(4, 16)
    assert convert(x, OutputOptions(), normalize=True).values is x


@pytest.mark.parametrize("normalize", [True, False])
def test_dimensions_keep_the_first_components_normalized_again(normalize):
    x = unit_rows(5, 16) * 3  # not unit length: normalize=False must keep the scale
    out = convert(x, OutputOptions.create(5), normalize).values
    head = x[:, :5]
    want = head / np.linalg.norm(head, axis=1, keepdims=True) if normalize else head
    assert out.shape == (5, 5) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, want, rtol=1e-6)
    zeros = convert(np.zeros((2, 16), np.float32), OutputOptions.create(5), True).values  # failed rows stay zero
    assert not zeros.any()


def test_float16_is_a_rounding_of_the_float32_values():
    x = unit_rows(3, 12)
    out = convert(x, OutputOptions.create(None, "float16"), True).values
    assert out.dtype == np.float16 and np.array_equal(out, x.astype(np.float16))


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("dimensions", [None, 7])
def test_scalar_quantization_dequantizes_within_half_a_step(dtype, dimensions):
    x = np.concatenate([unit_rows(6, 20), np.zeros((1, 20), np.float32)])  # a failed row: zeros
    options = OutputOptions.create(dimensions, dtype)
    out = convert(x, options, normalize=True)
    reference = convert(x, OutputOptions.create(dimensions), normalize=True).values  # the float32 embedding
    assert out.values.dtype == np.dtype(dtype) and out.values.shape == reference.shape
    assert out.scale.dtype == np.float32 and out.scale.shape == (7,)
    recovered = out.dequantize()
    assert np.all(np.abs(recovered - reference) <= out.scale[:, None] / 2 + 1e-6)  # the quantization step
    np.testing.assert_array_equal(recovered, dequantize(out.values, out.scale, out.offset))
    if dtype == "int8":  # symmetric: scale = max|x| / 127, x ~ scale * q
        assert out.offset is None
        np.testing.assert_allclose(out.scale, np.abs(reference).max(axis=1) / 127, rtol=1e-6)
        assert np.abs(out.values[:-1]).max(axis=1).tolist() == [127] * 6
    else:  # min-max: offset = min x, scale = (max x - min x) / 255, x ~ offset + scale * q
        np.testing.assert_allclose(out.offset, reference.min(axis=1), rtol=1e-6)
        np.testing.assert_allclose(out.scale, (reference.max(axis=1) - reference.min(axis=1)) / 255, rtol=1e-5)
        assert out.values[:-1].min(axis=1).tolist() == [0] * 6 and out.values[:-1].max(axis=1).tolist() == [255] * 6
    assert out.scale[-1] == 0 and not out.values[-1].any() and not recovered[-1].any()  # zeros come back zeros


@pytest.mark.parametrize("dimensions", [None, 13, 8, 1])
def test_binary_is_sentence_transformers_quantize_embeddings(dimensions):
    x = unit_rows(9, 21)
    k = dimensions or 21
    for dtype, dtype_np in (("binary", np.int8), ("ubinary", np.uint8)):
        out = convert(x, OutputOptions.create(dimensions, dtype), normalize=True).values
        want = quantize_embeddings(x[:, :k], precision=dtype)
        assert out.dtype == dtype_np and out.shape == (9, -(-k // 8))
        np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="binary codes"):
        dequantize(convert(x, OutputOptions.create(None, "ubinary"), True).values)


@pytest.mark.parametrize("dimensions", [0, -3, 2.5, "8", True, [4]])
def test_dimensions_must_be_a_positive_integer(dimensions):
    with pytest.raises(InputError, match="dimensions must be a positive integer"):
        OutputOptions.create(dimensions)


def test_unknown_output_dtype_lists_the_valid_ones():
    with pytest.raises(InputError, match=r"output_dtype must be one of \['float32', 'float16', 'int8', 'uint8', "
                                         r"'binary', 'ubinary'\]; got 'int4'"):
        OutputOptions.create(None, "int4")


def test_which_dimensions_a_model_accepts():
    OutputOptions.create(384).check(384, ())  # all of them: always
    OutputOptions.create(100).check(384, None)  # nothing declared: any size
    OutputOptions.create(100).check(384, (256, 128))  # declared sizes are advice, not a list of the only ones
    with pytest.raises(InputError, match=r"dimensions 385 is more than the 384 components of m's embeddings; pick "
                                         r"1 to 384 \(its Matryoshka sizes: \[256, 128\]\)"):
        OutputOptions.create(385).check(384, (128, 256), "m")
    with pytest.raises(InputError, match=r"m declares that its embeddings must not be truncated \(its Matryoshka "
                                         r"sizes are \[\]\); omit dimensions \(or pass 384\)"):
        OutputOptions.create(128).check(384, (), "m")


# ---- the output columns -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", OUTPUT_DTYPES)
def test_output_columns_wrap_the_converted_arrays_without_a_copy(dtype, monkeypatch):
    import engine.output

    made = []

    def spy(*args, **kwargs):
        made.append(convert(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(engine.output, "convert", spy)
    x = unit_rows(4, 20)
    errors = [None, "broken", None, None]
    columns = protocol.output_columns(x, errors, True, 10, dtype)
    (out,) = made
    fields = protocol.output_fields(20, 10, dtype)
    assert [c.type for c in columns] == [f.type for f in fields]
    assert columns[0].values.buffers()[1].address == out.values.ctypes.data  # the conversion's own memory
    assert columns[0].is_null().to_pylist() == [False, True, False, False]
    if dtype in ("int8", "uint8"):
        assert columns[1].buffers()[1].address == out.scale.ctypes.data
        assert columns[1].to_pylist() == [out.scale[0], None, out.scale[2], out.scale[3]]
    if dtype == "uint8":
        assert columns[2].buffers()[1].address == out.offset.ctypes.data and columns[2].null_count == 1
    assert len(columns) == {"int8": 2, "uint8": 3}.get(dtype, 1)
    width = {"binary": 2, "ubinary": 2}.get(dtype, 10)
    assert columns[0].type.list_size == width
    got = np.asarray(columns[0].values.to_numpy(zero_copy_only=True)).reshape(4, width)
    np.testing.assert_array_equal(got, out.values)


def test_default_output_column_is_the_engines_array():
    x = unit_rows(3, 8)
    (column,) = protocol.output_columns(x, [None] * 3)
    assert column.values.buffers()[1].address == x.ctypes.data
    assert protocol.output_schema(8).field("embedding").type == pa.list_(pa.float32(), 8)


def test_scale_columns_are_reserved_names():
    for name in ("embedding_scale", "embedding_offset"):
        with pytest.raises(protocol.ProtocolError, match="cannot contain"):
            protocol.EmbedCommand.create("text", passthrough=[name])


# ---- the command -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc,message", [
    ({"dimensions": 0}, '"dimensions" must be a positive integer'),
    ({"dimensions": -1}, '"dimensions" must be a positive integer'),
    ({"dimensions": 12.0}, '"dimensions" must be a positive integer .* got 12.0'),
    ({"dimensions": "12"}, '"dimensions" must be a positive integer .* got \'12\''),
    ({"dimensions": True}, '"dimensions" must be a positive integer'),
    ({"output_dtype": "int4"}, r'"output_dtype" must be one of \[\'float32\', \'float16\', \'int8\', \'uint8\', '
                               r'\'binary\', \'ubinary\'\]; got \'int4\''),
    ({"output_dtype": None}, '"output_dtype" must be one of'),
    ({"truncate": "no"}, '"truncate" must be true or false; got \'no\''),
    ({"truncate": 0}, '"truncate" must be true or false; got 0'),
    ({"truncate": False, "input": "image"}, '"truncate" applies to "text", "tokens" and "pairs" input'),
])
def test_bad_option_values_are_request_errors(doc, message):
    with pytest.raises(protocol.ProtocolError, match=message):
        protocol.parse_command(json.dumps({"input": "text", **doc}))


def test_options_round_trip_and_defaults_stay_off_the_wire():
    command = protocol.EmbedCommand.create("text", dimensions=64, output_dtype="uint8", truncate=False)
    assert protocol.parse_command(command.to_json()) == command
    plain = json.loads(protocol.EmbedCommand.create("tokens").to_json())
    assert not {"dimensions", "output_dtype", "truncate"} & set(plain)  # an older server still understands it


# ---- in-process, over Flight, and the same ------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return engine.load_model(tiny_clip_dir)


@pytest.fixture(scope="module")
def minilm(minilm_model_dir):
    return engine.load_model(minilm_model_dir)


@pytest.fixture(scope="module")
def fixed_clip_dir(tmp_path_factory, tiny_clip_source):
    """The tiny CLIP with a model card that declares its embeddings must not be truncated."""
    src = tmp_path_factory.mktemp("fixed") / "src"
    shutil.copytree(tiny_clip_source, src)
    (src / "README.md").write_text("---\nlicense: mit\nmatryoshka_dims: []\n---\n# A CLIP that must not be cut\n")
    return convert_checkpoint(src, src.parent / "model", progress=False).out_dir


@pytest.fixture(scope="module")
def served(clip, minilm, fixed_clip_dir):
    fixed = engine.load_model(fixed_clip_dir, name="fixed")
    with Scheduler(clip) as s1, Scheduler(minilm) as s2, \
            EmbeddingServer({"clip": s1, "minilm": s2, "fixed": fixed}, ServerConfig(port=0)) as server:
        with EmbeddingClient(f"grpc://127.0.0.1:{server.port}", retries=0) as client:
            yield client


def flight_error(client, **kwargs) -> flight.FlightServerError:
    with pytest.raises(flight.FlightServerError) as err:
        client.embed_table(pa.table({"text": ["a"]}), **kwargs)
    assert protocol.error_code(err.value) == protocol.CODE_INVALID
    return err.value


def check_table_equals_result(table: pa.Table, result, width: int) -> None:
    column = table.column("embedding").combine_chunks()
    assert column.type.list_size == width
    values = column.values.fill_null(0).to_numpy(zero_copy_only=False)  # Parquet: a null row's values are null
    np.testing.assert_array_equal(values.reshape(-1, width), result.embeddings)
    if result.scale is not None:
        np.testing.assert_array_equal(table.column("embedding_scale").fill_null(0).to_numpy(), result.scale)
    else:
        assert "embedding_scale" not in table.column_names
    if result.offset is not None:
        np.testing.assert_array_equal(table.column("embedding_offset").fill_null(0).to_numpy(), result.offset)


@pytest.mark.parametrize("dtype", OUTPUT_DTYPES)
@pytest.mark.parametrize("dimensions", [None, 20])
def test_flight_result_equals_the_in_process_one(served, clip, dtype, dimensions):
    result = clip.embed_texts(TEXTS, dimensions=dimensions, output_dtype=dtype)
    table = served.embed_table(pa.table({"text": TEXTS}), model="clip", dimensions=dimensions, output_dtype=dtype)
    check_table_equals_result(table, result, OutputOptions.create(dimensions, dtype).width(48))
    float32 = clip.embed_texts(TEXTS, dimensions=dimensions)
    if dtype in ("int8", "uint8", "float16"):
        np.testing.assert_allclose(result.dequantize(), float32.embeddings, atol=float(result.scale.max()) / 2 + 1e-6
                                   if result.scale is not None else 1e-3)
    values = served.embed_texts(TEXTS, model="clip", dimensions=dimensions, output_dtype=dtype)  # the keyword
    np.testing.assert_array_equal(values, result.embeddings)
    assert values.dtype == result.embeddings.dtype


def test_images_and_token_ids_take_the_options_too(served, clip):
    photo = (Path(__file__).parent / "data" / "photos" / "rocket.jpg").read_bytes()
    want = clip.embed_images([photo, b"not an image"], dimensions=16, output_dtype="uint8")
    table = served.embed_table(pa.table({"image": pa.array([photo, b"not an image"], pa.binary())}), kind="image",
                               model="clip", dimensions=16, output_dtype="uint8")
    check_table_equals_result(table, want, 16)
    assert table.column("error")[1].as_py() is not None and table.column("embedding_scale")[1].as_py() is None
    ids = [[49406, 320, 1125, 49407], [49406, 49407]]
    tokens = served.embed_tokens(ids, model="clip", output_dtype="binary", dimensions=24)
    np.testing.assert_array_equal(tokens, clip.embed_tokens(ids, output_dtype="binary", dimensions=24).embeddings)
    assert tokens.shape == (2, 3) and tokens.dtype == np.int8
    pixels_out = clip.encode_pixels(np.zeros((1, 3, 224, 224), np.float32), dimensions=5, output_dtype="float16")
    assert pixels_out.shape == (1, 5) and pixels_out.dtype == np.float16


def test_concurrent_requests_with_different_options_each_get_their_own(served, clip):
    """The scheduler puts rows of these requests in the same device batches (so the float32 values may differ from
    a lone call's in the last bits); each request converts its own rows as it asked."""
    texts = [f"caption number {i} of a cat" for i in range(40)]
    asks = [dict(dimensions=8, output_dtype="int8"), dict(), dict(output_dtype="ubinary"), dict(dimensions=47)]
    tables: dict[int, pa.Table] = {}

    def run(i: int) -> None:
        tables[i] = served.embed_table(pa.table({"text": texts}), model="clip", **asks[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reference = clip.embed_texts(texts).embeddings
    for i, ask in enumerate(asks):
        want = clip.embed_texts(texts, **ask)
        column = tables[i].column("embedding").combine_chunks()
        got = column.values.to_numpy().reshape(len(texts), column.type.list_size)
        if ask.get("output_dtype") == "int8":
            assert np.abs(got.astype(int) - want.embeddings).max() <= 1  # a rounding boundary at most
            np.testing.assert_allclose(tables[i].column("embedding_scale").to_numpy(), want.scale, rtol=1e-5)
        elif ask.get("output_dtype") == "ubinary":
            bits = np.unpackbits(got, axis=1)[:, :48].astype(bool)
            clear = np.abs(reference) > 1e-5  # signs of values this far from 0 cannot flip
            assert np.array_equal(bits[clear], (reference > 0)[clear])
        else:
            assert got.shape == want.embeddings.shape
            np.testing.assert_allclose(got, want.embeddings, atol=1e-6)


def test_encode_and_embed_in_process(clip):
    encoded = clip.encode_text(TEXTS, dimensions=12, output_dtype="int8")
    result = clip.embed_texts(TEXTS, dimensions=12, output_dtype="int8")
    np.testing.assert_array_equal(encoded, result.embeddings)
    with Scheduler(clip) as sched:
        scheduled = sched.embed_texts(TEXTS, dimensions=12, output_dtype="int8")
    np.testing.assert_array_equal(scheduled.embeddings, result.embeddings)
    np.testing.assert_array_equal(scheduled.scale, result.scale)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dimensions=0), "dimensions must be a positive integer"),
    (dict(dimensions=49), r"dimensions 49 is more than the 48 components of model '.*'s embeddings; pick 1 to 48"),
    (dict(dimensions=3.0), "dimensions must be a positive integer"),
    (dict(output_dtype="float64"), r"output_dtype must be one of \['float32', "),
    (dict(truncate="yes"), "truncate must be True or False; got 'yes'"),
])
def test_bad_values_in_process(clip, kwargs, message):
    with pytest.raises(InputError, match=message):
        clip.embed_texts(["a"], **kwargs)
    if "truncate" not in kwargs:
        with pytest.raises(InputError, match=message):
            clip.encode_image([b"x"], **kwargs)
        with Scheduler(clip) as sched, pytest.raises(InputError, match=message):
            sched.embed_tokens([[49406, 49407]], **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dimensions=0), '"dimensions" must be a positive integer'),
    (dict(dimensions=49), r"dimensions 49 is more than the 48 components of model 'clip''s embeddings; pick 1 to 48"),
    (dict(output_dtype="bf16"), r'"output_dtype" must be one of \[\'float32\', \'float16\', \'int8\', \'uint8\', '
                                r'\'binary\', \'ubinary\'\]; got \'bf16\''),
    (dict(truncate="false"), '"truncate" must be true or false'),
])
def test_bad_values_over_flight(served, kwargs, message):
    """The client checks what it can before sending; a raw command gets the server's answer."""
    with pytest.raises((protocol.ProtocolError, flight.FlightServerError), match=message):
        served.embed_table(pa.table({"text": ["a"]}), model="clip", **kwargs)
    raw = {"input": "text", "model": "clip", **kwargs}
    writer, reader = served._client.do_exchange(flight.FlightDescriptor.for_command(json.dumps(raw).encode()))
    try:
        with pytest.raises(flight.FlightServerError, match=message) as err:
            writer.begin(pa.schema([("text", pa.string())]))
            writer.write_batch(pa.record_batch({"text": ["a"]}))
            writer.done_writing()
            list(reader)
        assert protocol.error_code(err.value) == protocol.CODE_INVALID
    finally:
        try:
            writer.close()
        except pa.ArrowException:
            pass


def test_a_model_that_must_not_be_truncated(served, fixed_clip_dir):
    fixed = engine.load_model(fixed_clip_dir)
    assert fixed.info.matryoshka_dims == ()
    with pytest.raises(InputError, match="declares that its embeddings must not be truncated"):
        fixed.embed_texts(["a"], dimensions=16)
    assert fixed.embed_texts(["a"], dimensions=48, output_dtype="binary").embeddings.shape == (1, 6)  # all: fine
    error = flight_error(served, model="fixed", dimensions=16)
    assert "model 'fixed' declares that its embeddings must not be truncated (its Matryoshka sizes are []); omit " \
           "dimensions (or pass 48)" in str(error)
    meta = {m["name"]: m for m in served.models()}
    assert meta["fixed"]["matryoshka_dims"] == [] and meta["clip"]["matryoshka_dims"] is None
    info = served._client.get_flight_info(flight.FlightDescriptor.for_path("fixed"))
    assert json.loads(info.app_metadata)["matryoshka_dims"] == []
    with pytest.raises(flight.FlightServerError, match="declares that its embeddings must not be truncated"):
        served._client.get_flight_info(protocol.EmbedCommand.create("text", model="fixed", dimensions=8).descriptor())


def test_get_flight_info_of_a_command_has_the_schema_of_its_options(served):
    command = protocol.EmbedCommand.create("text", model="minilm", dimensions=100, output_dtype="uint8")
    schema = served._client.get_flight_info(command.descriptor()).schema
    assert schema == protocol.output_schema(384, (), 100, "uint8")
    assert schema.names == ["embedding", "embedding_scale", "embedding_offset", "error"]
    assert schema.field("embedding").type == pa.list_(pa.uint8(), 100)


def test_binary_of_real_minilm_embeddings_is_sentence_transformers(minilm):
    floats = minilm.embed_texts(TEXTS).embeddings
    for dtype in ("binary", "ubinary"):
        np.testing.assert_array_equal(minilm.embed_texts(TEXTS, output_dtype=dtype).embeddings,
                                      quantize_embeddings(floats, precision=dtype))
    np.testing.assert_array_equal(minilm.embed_texts(TEXTS, dimensions=128, output_dtype="binary").embeddings,
                                  quantize_embeddings(floats[:, :128], precision="binary"))


# ---- truncate ------------------------------------------------------------------------------------------------

def full_token_count(model_dir: Path, text: str) -> int:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return len(tok.encode(text).ids)


def test_truncate_false_makes_an_over_long_text_a_row_error(minilm, minilm_model_dir, served):
    long_text = "the cat sat on a mat and looked at the boats " * 30  # ~330 tokens
    huge = "word " * 2000  # 10,000 characters: more than the 4,096 the tokenizer reads at first
    texts = ["short", long_text, huge]
    count = full_token_count(minilm_model_dir, long_text)
    assert count > 256
    cut = minilm.embed_texts(texts)  # the default: cut at 256 tokens
    assert cut.errors == [None, None, None]
    strict = minilm.embed_texts(texts, truncate=False)
    assert strict.errors[0] is None
    np.testing.assert_array_equal(strict.embeddings[0], minilm.embed_texts(["short"]).embeddings[0])
    assert strict.errors[1].startswith(f"the text is {count} tokens long (prompt and special tokens included), "
                                       "over the model's limit of 256 tokens; the request set truncate=false")
    window = full_token_count(minilm_model_dir, huge[:4096])
    assert strict.errors[2].startswith(f"the text's first 4096 characters alone are {window} tokens")
    assert not strict.embeddings[1:].any()
    table = served.embed_table(pa.table({"text": texts}), model="minilm", truncate=False)  # the same over Flight
    assert table.column("error").to_pylist() == strict.errors
    assert served.embed_texts(["short"], model="minilm", truncate=False).shape == (1, 384)
    fits = "word " * 254  # 254 + [CLS] + [SEP] = 256: exactly the limit
    assert minilm.embed_texts([fits], truncate=False).errors == [None]
    assert "257 tokens long" in minilm.embed_texts([fits + "word"], truncate=False).errors[0]


def test_token_id_rows_are_never_cut(served, minilm):
    ids = [[101] + [2054] * 600 + [102]]  # token-id rows may use every position (512); texts are cut at 256
    for truncate in (True, False):
        _, errors = served.embed_tokens(ids, model="minilm", truncate=truncate, errors="return")
        assert errors == ["602 tokens, more than the model's 512 positions; truncate the row"]
    assert minilm.embed_tokens(ids).errors == errors


# ---- declared Matryoshka sizes ---------------------------------------------------------------------------------

MATRYOSHKA_CARD = """---
language:
- en
tags:
- sentence-transformers
- loss:MatryoshkaLoss
- loss:MultipleNegativesRankingLoss
model-index:
- name: a model
  results:
  - task:
      type: information-retrieval
    dataset:
      name: dim 768
      type: dim_768
    metrics:
    - type: cosine_ndcg@10
      value: 0.5
  - dataset:
      type: dim_128
  - dataset:
      type: dim_256
  - dataset:
      type: msmarco
---
# A model
"""


@pytest.mark.parametrize("files,sizes", [
    ({}, None),
    ({"config_sentence_transformers.json": '{"prompts": {}, "matryoshka_dims": [256, 768, 512]}'}, (768, 512, 256)),
    ({"config_sentence_transformers.json": '{"matryoshka_dims": []}'}, ()),
    ({"README.md": "---\nmatryoshka_dims: [64, 32]\n---\ntext"}, (64, 32)),
    ({"README.md": "---\nmatryoshka_dims:\n  - 128\n  - 64\n---\n"}, (128, 64)),
    ({"README.md": MATRYOSHKA_CARD}, (768, 256, 128)),
    ({"README.md": MATRYOSHKA_CARD.replace("- loss:MatryoshkaLoss\n", "")}, None),  # dim_N without the loss
    ({"README.md": "# no front matter\nmatryoshka_dims: [3]\n"}, None),
    ({"README.md": "---\nkey: [unclosed\n---\n"}, None),  # not YAML: a card is prose, not an error
    ({"README.md": "---\nmatryoshka_dims: [64]\n---\n",
      "config_sentence_transformers.json": '{"matryoshka_dims": [32]}'}, (32,)),  # the config wins
])
def test_declared_sizes(tmp_path, files, sizes):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert declared_sizes(tmp_path) == sizes


@pytest.mark.parametrize("value", ["[0, 64]", '"64"', "[64.5]", "[true]"])
def test_a_bad_declaration_stops_the_conversion(tmp_path, value):
    (tmp_path / "config_sentence_transformers.json").write_text('{"matryoshka_dims": %s}' % value)
    with pytest.raises(ModelConfigError, match="matryoshka_dims must be a list of positive integers"):
        declared_sizes(tmp_path)


def test_declared_sizes_go_from_the_card_to_the_models_action(tmp_path, tiny_clip_source):
    src = tmp_path / "src"
    shutil.copytree(tiny_clip_source, src)
    (src / "README.md").write_text("---\nmatryoshka_dims: [32, 16, 64]\n---\n")
    manifest = convert_checkpoint(src, tmp_path / "model", progress=False).manifest
    assert manifest.matryoshka_dims == (64, 32, 16)
    assert json.loads((tmp_path / "model" / "manifest.json").read_text())["matryoshka_dims"] == [64, 32, 16]
    model = engine.load_model(tmp_path / "model")
    assert model.info.matryoshka_dims == (32, 16)  # 64 is more than the 48 components: dropped at load
    assert protocol.model_metadata("m", model.info)["matryoshka_dims"] == [32, 16]
    assert model.embed_texts(["a"], dimensions=20).embeddings.shape == (1, 20)  # a size not declared: fine


# ---- arrowengine embed ---------------------------------------------------------------------------------------

def test_embed_cli_flags(tmp_path, tiny_clip_dir, clip):
    texts = ["a cat", None, "a dog " * 40, "a boat"]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": list(range(4)), "text": texts}), path)
    flags = ["--kind", "text", "--passthrough", "id", "--dimensions", "12", "--output-dtype", "uint8", "--no-truncate",
             "--no-progress"]
    assert main(["embed", str(path), str(tmp_path / "local"), "--model", str(tiny_clip_dir), *flags]) == 0
    local = read_output(tmp_path / "local")
    assert local.column_names == ["id", "embedding", "embedding_scale", "embedding_offset", "error"]
    want = clip.embed_texts(pa.array(texts), dimensions=12, output_dtype="uint8", truncate=False)
    check_table_equals_result(local, want, 12)
    assert local.column("error").to_pylist() == want.errors and "tokens long" in want.errors[2]
    manifest = json.loads((tmp_path / "local" / "_job.json").read_text())["args"]
    assert (manifest["dimensions"], manifest["output_dtype"], manifest["truncate"]) == (12, "uint8", False)


def test_embed_cli_flags_through_a_server_and_bad_values(tmp_path, clip, caplog):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a cat", "a dog", "a boat"]}), path)
    with Scheduler(clip) as sched, EmbeddingServer({"clip": sched}, ServerConfig(port=0)) as server:
        uri = f"grpc://127.0.0.1:{server.port}"
        assert main(["embed", str(path), str(tmp_path / "out"), "--kind", "text", "--server", uri, "--dimensions",
                     "20", "--output-dtype", "binary", "--no-progress"]) == 0
        out = read_output(tmp_path / "out")
        assert out.schema.field("embedding").type == pa.list_(pa.int8(), 3)
        np.testing.assert_array_equal(
            out.column("embedding").combine_chunks().values.to_numpy().reshape(3, 3),
            clip.embed_texts(["a cat", "a dog", "a boat"], dimensions=20, output_dtype="binary").embeddings)
        # too many dimensions: refused before anything is written (exit 2)
        assert main(["embed", str(path), str(tmp_path / "o2"), "--kind", "text", "--server", uri, "--dimensions",
                     "49", "--no-progress"]) == 2
        assert "dimensions 49 is more than the 48 components" in caplog.text and not (tmp_path / "o2").exists()
        # a resumed job must keep its options
        assert main(["embed", str(path), str(tmp_path / "out"), "--kind", "text", "--server", uri, "--dimensions",
                     "20", "--output-dtype", "ubinary", "--resume", "--no-progress"]) == 2
        assert "output_dtype: job has 'binary', now 'ubinary'" in caplog.text
    for bad in (["--dimensions", "0"], ["--dimensions", "x"], ["--output-dtype", "int4"]):
        with pytest.raises(SystemExit) as exit_:
            main(["embed", str(path), str(tmp_path / "o3"), "--kind", "text", *bad])
        assert exit_.value.code == 2
    assert main(["embed", str(path), str(tmp_path / "o4"), "--kind", "image", "--no-truncate", "--no-progress"]) == 2
    assert "--no-truncate applies to --kind text and tokens" in caplog.text


# ---- the retrieval benchmark's own search ----------------------------------------------------------------------

def test_retrieval_bench_search_and_split():
    from bench import retrieval

    passages, queries = unit_rows(50, 20, seed=1), unit_rows(6, 20, seed=2)
    codes_p = convert(passages, OutputOptions.create(None, "binary"), True).values
    codes_q = convert(queries, OutputOptions.create(None, "binary"), True).values
    bits_p, bits_q = passages > 0, queries > 0
    brute = (bits_q[:, None, :] != bits_p[None, :, :]).sum(axis=2)  # (Q, P) Hamming distances
    found = retrieval.top_by_hamming(codes_q, codes_p, 5)
    np.testing.assert_array_equal(found, np.argsort(brute, axis=1, kind="stable")[:, :5])
    best = retrieval.top_by_score(queries, passages, 5)
    np.testing.assert_array_equal(best[:, 0], np.argmax(queries @ passages.T, axis=1))
    assert retrieval.recall(best, best) == 1.0 and retrieval.recall(best[:, :1], best[:, 1:2]) == 0.0
    paragraphs = [f"Paragraph {i} says something. It has a second sentence too." for i in range(30)]
    corpus, asked = retrieval.split_queries(paragraphs, 20, 5)
    assert len(corpus) == 20 and len(asked) == 5 and all(q.endswith("says something.") for q in asked)
    assert not {q.split()[1] for q in asked} & {p.split()[1] for p in corpus}  # held out of the corpus
    assert retrieval._prose(">>> print('code')") is None and retrieval._prose("too short to keep") is None
