"""The wire protocol module: command parsing, accepted input types, output schema."""
from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_server import protocol
from flight_server.protocol import EmbedCommand, ProtocolError, parse_command


@pytest.mark.parametrize("kind,column", [("image", "image"), ("text", "text"), ("tokens", "input_ids")])
def test_defaults_per_kind(kind, column):
    cmd = parse_command(json.dumps({"input": kind, "model": "m"}).encode())
    assert cmd == EmbedCommand(input=kind, column=column, model="m", normalize=True, passthrough=())


def test_full_command_and_round_trip():
    raw = {"model": "clip", "input": "image", "column": "jpeg", "normalize": False, "passthrough": ["id", "url"]}
    cmd = parse_command(json.dumps(raw))
    assert cmd.model == "clip" and cmd.column == "jpeg" and cmd.normalize is False
    assert cmd.passthrough == ("id", "url")
    assert parse_command(cmd.to_json()) == cmd
    assert json.loads(cmd.to_json()) == raw
    desc = cmd.descriptor()
    assert desc.descriptor_type == flight.DescriptorType.CMD and parse_command(desc.command) == cmd


def test_model_is_optional_and_omitted_from_json():
    cmd = EmbedCommand.create("text")
    assert cmd.model is None and "model" not in json.loads(cmd.to_json())
    assert parse_command(b'{"input": "text", "model": null}').model is None


def test_command_is_frozen():
    cmd = EmbedCommand.create("text")
    with pytest.raises(AttributeError):
        cmd.model = "x"  # type: ignore[misc]


@pytest.mark.parametrize("raw,expected", [
    (b"", "empty"),
    (b"\xff\xfe", "UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object; got list"),
    (b'{"input": "text", "modle": "x"}', "unknown command key(s) ['modle']"),
    (b'{"model": "x"}', "\"input\" must be one of ['image', 'text', 'tokens', 'pairs']; got None"),
    (b'{"input": "audio"}', "got 'audio'"),
    (b'{"input": "text", "model": 3}', '"model" must be a non-empty string or null; got 3'),
    (b'{"input": "text", "model": ""}', '"model" must be a non-empty string'),
    (b'{"input": "text", "column": ["a"]}', "\"column\" must be a non-empty string; got ['a']"),
    (b'{"input": "text", "normalize": "yes"}', "\"normalize\" must be true or false; got 'yes'"),
    (b'{"input": "text", "normalize": 1}', "\"normalize\" must be true or false; got 1"),
    (b'{"input": "text", "passthrough": "id"}', "\"passthrough\" must be a list of column names; got 'id'"),
    (b'{"input": "text", "passthrough": [1]}', "must be a list of column names"),
    (b'{"input": "text", "passthrough": ["a", "a"]}', "duplicates ['a']"),
    (b'{"input": "text", "passthrough": ["embedding"]}', "cannot contain ['embedding']"),
])
def test_bad_commands_say_what_was_expected_and_what_came(raw, expected):
    with pytest.raises(ProtocolError) as err:
        parse_command(raw)
    assert expected in str(err.value)
    assert err.value.code == protocol.CODE_INVALID


ACCEPTED = {
    "image": [pa.binary(), pa.large_binary(), pa.binary_view()],
    "text": [pa.string(), pa.large_string(), pa.string_view()],
    "tokens": [pa.list_(pa.int32()), pa.list_(pa.int64()), pa.large_list(pa.int32()), pa.large_list(pa.int64()),
               pa.list_(pa.int32(), 4)],
    "pairs": [pa.string(), pa.large_string(), pa.string_view()],  # each of its two columns
}
OTHERS = [pa.int64(), pa.float32(), pa.list_(pa.float32()), pa.list_(pa.int16()), pa.list_(pa.int16(), 4),
          pa.binary(4), pa.list_view(pa.int32()), pa.list_(pa.string())]


@pytest.mark.parametrize("kind", protocol.INPUT_KINDS)
def test_accepted_input_types(kind):
    for type_ in ACCEPTED[kind]:
        assert protocol.is_accepted_type(kind, type_), type_
    rejected = OTHERS + [t for ts in ACCEPTED.values() for t in ts if t not in ACCEPTED[kind]]
    for type_ in rejected:
        assert not protocol.is_accepted_type(kind, type_), type_


def test_check_input_schema_returns_passthrough_fields_in_order():
    schema = pa.schema([("text", pa.string()), ("id", pa.int64()), ("meta", pa.string())])
    fields = protocol.check_input_schema(EmbedCommand.create("text", passthrough=["meta", "id"]), schema)
    assert [f.name for f in fields] == ["meta", "id"]
    assert fields[1].type == pa.int64()


def test_check_input_schema_missing_column_names_the_columns_that_came():
    schema = pa.schema([("caption", pa.string()), ("id", pa.int64())])
    with pytest.raises(ProtocolError, match=r"input column 'text' .* the columns that came are \['caption', 'id'\]"):
        protocol.check_input_schema(EmbedCommand.create("text"), schema)


def test_check_input_schema_wrong_type():
    schema = pa.schema([("image", pa.string())])
    with pytest.raises(ProtocolError, match=r"column 'image' has type string; 'image' input needs binary, large_binary or binary_view"):
        protocol.check_input_schema(EmbedCommand.create("image"), schema)


def test_check_input_schema_missing_passthrough():
    schema = pa.schema([("text", pa.string())])
    with pytest.raises(ProtocolError, match=r"passthrough column\(s\) \['id'\] are not in the batches"):
        protocol.check_input_schema(EmbedCommand.create("text", passthrough=["id"]), schema)


@pytest.mark.parametrize("names,command", [
    (["text", "text"], EmbedCommand.create("text")),                                     # the input column
    (["text", "id", "id"], EmbedCommand.create("text", passthrough=["id"])),             # a passthrough column
    (["text", "id", "x", "x"], EmbedCommand.create("text", passthrough=["id"])),         # an unused column
    (["image", "image"], EmbedCommand.create("image")),
], ids=["input", "passthrough", "unused", "image"])
def test_check_input_schema_duplicate_names_are_a_protocol_error(names, command):
    schema = pa.schema([pa.field(n, pa.binary() if n == "image" else pa.string()) for n in names])
    duplicated = sorted({n for n in names if names.count(n) > 1})
    with pytest.raises(ProtocolError, match=re.escape(f"the input schema has duplicate column names {duplicated};")):
        protocol.check_input_schema(command, schema)


def test_create_rejects_a_str_passthrough():
    with pytest.raises(ProtocolError, match=r"\"passthrough\" must be a list of column names; got 'id'"):
        EmbedCommand.create("text", passthrough="id")


def test_output_schema():
    passthrough = [pa.field("id", pa.int64()), pa.field("url", pa.large_string())]
    schema = protocol.output_schema(512, passthrough)
    assert schema.names == ["id", "url", "embedding", "error"]
    emb = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(emb) and emb.list_size == 512 and emb.value_type == pa.float32()
    assert schema.field("error").type == pa.string()
    assert protocol.output_schema(4).names == ["embedding", "error"]


def test_model_metadata_keys():
    class Info:
        architecture, kind, modalities, dim = "CLIPModel", "clip", ("text", "image"), 512
        precision, device, max_tokens = "fp32", "cpu", 77

    meta = protocol.model_metadata("clip", Info(), default=True)
    assert tuple(meta) == protocol.METADATA_KEYS
    assert meta["dimension"] == 512 and meta["modalities"] == ["text", "image"] and meta["default"] is True
    json.dumps(meta)


def test_error_codes_round_trip():
    err = flight.FlightServerError("x", extra_info=protocol.error_info(protocol.CODE_LIMIT))
    assert protocol.error_code(err) == protocol.CODE_LIMIT
    assert protocol.error_code(flight.FlightServerError("x")) is None
    assert protocol.UnknownModelError("x").code == protocol.CODE_NOT_FOUND
    assert protocol.LimitExceededError("x").code == protocol.CODE_LIMIT


def test_actions_are_declared():
    assert set(protocol.ACTIONS) == {"health", "ready", "models", "stats", "limits"}


# ---- pairs (rerankers) ------------------------------------------------------------------------------------

def test_pairs_command_defaults_renames_and_round_trip():
    cmd = parse_command(b'{"input": "pairs"}')
    assert (cmd.column, cmd.document_column, cmd.input_columns) == ("query", "document", ("query", "document"))
    assert cmd.output_fields == ("score", "error")
    cmd = EmbedCommand.create("pairs", model="rr", query_column="q", document_column="passage", passthrough=["id"],
                              prompt_name="web")
    assert cmd.input_columns == ("q", "passage")
    assert parse_command(cmd.to_json()) == cmd
    assert json.loads(cmd.to_json()) == {"input": "pairs", "query_column": "q", "document_column": "passage",
                                         "passthrough": ["id"], "model": "rr", "prompt_name": "web"}
    cut = EmbedCommand.create("pairs", truncate=False)  # truncate applies to pairs: a pair over the limit fails
    assert not cut.truncate and json.loads(cut.to_json())["truncate"] is False and parse_command(cut.to_json()) == cut
    text = EmbedCommand.create("text", passthrough=["score"])  # only a pairs output has a score column
    assert text.input_columns == ("text",) and text.document_column is None and text.passthrough == ("score",)


@pytest.mark.parametrize("raw,expected", [
    (b'{"input": "pairs", "column": "q"}', '"pairs" input reads two columns: name them with "query_column" and '
                                           '"document_column" (default \'query\' and \'document\'), not "column"'),
    (b'{"input": "text", "query_column": "q"}', "'query_column' apply to \"pairs\" input"),
    (b'{"input": "image", "document_column": "d", "query_column": "q"}',
     "'query_column' and 'document_column' apply to \"pairs\" input"),
    (b'{"input": "pairs", "document_column": ""}', '"document_column" must be a non-empty string'),
    (b'{"input": "pairs", "query_column": 7}', '"query_column" must be a non-empty string; got 7'),
    (b'{"input": "pairs", "passthrough": ["score"]}', "cannot contain ['score']"),
    (b'{"input": "tokens", "prompt_name": "q"}', '"prompt_name" applies to "text" and "pairs" input'),
    (b'{"input": "pairs", "dimensions": 1}', '"dimensions" and "output_dtype" apply to embeddings; "pairs" input '
                                             "returns a reranker's scores"),
    (b'{"input": "pairs", "output_dtype": "int8"}', "leave them out; got {'dimensions': None, 'output_dtype': 'int8'}"),
    (b'{"input": "pairs", "passthrough": ["embedding"], "output_dtype": "float32"}', None),  # defaults are fine
])
def test_bad_pairs_commands(raw, expected):
    if expected is None:
        assert parse_command(raw).input == "pairs"
        return
    with pytest.raises(ProtocolError) as err:
        parse_command(raw)
    assert expected in str(err.value)


def test_check_input_schema_of_pairs_names_the_missing_column_and_the_bad_type():
    cmd = EmbedCommand.create("pairs", passthrough=["id"])
    schema = pa.schema([("query", pa.string()), ("document", pa.large_string()), ("id", pa.int64())])
    assert [f.name for f in protocol.check_input_schema(cmd, schema)] == ["id"]
    with pytest.raises(ProtocolError, match=r"\"pairs\" input needs a query and a document column; the document "
                                            r"column 'document' is not in the batches; the columns that came are "
                                            r"\['query', 'doc'\]; name yours with \"query_column\""):
        protocol.check_input_schema(cmd, pa.schema([("query", pa.string()), ("doc", pa.string())]))
    with pytest.raises(ProtocolError, match="the query column 'q' and the document column 'document' are not"):
        protocol.check_input_schema(EmbedCommand.create("pairs", query_column="q"), pa.schema([("x", pa.string())]))
    with pytest.raises(ProtocolError, match="column 'document' has type binary; 'pairs' input needs string"):
        protocol.check_input_schema(EmbedCommand.create("pairs"),
                                    pa.schema([("query", pa.string()), ("document", pa.binary())]))


def test_score_column_wraps_the_scores_without_a_copy():
    scores = np.array([0.5, -1.25, 3.0, 7.5], np.float32)
    column = protocol.score_column(scores, [None, "bad row", None, None])
    assert column.type == pa.float32() and column.buffers()[1].address == scores.ctypes.data  # the array's memory
    assert column.to_pylist() == [0.5, None, 3.0, 7.5] and column.null_count == 1
    assert protocol.score_column(scores, [None] * 4).buffers()[0] is None  # no validity bitmap when nothing failed
    labels = np.arange(6, dtype=np.float32).reshape(3, 2)
    column = protocol.score_column(labels, [None, None, "x"])
    assert column.type == pa.list_(pa.float32(), 2) and column.values.buffers()[1].address == labels.ctypes.data
    assert column.to_pylist() == [[0.0, 1.0], [2.0, 3.0], None]
    assert protocol.score_schema(1, [pa.field("id", pa.int64())]).names == ["id", "score", "error"]
