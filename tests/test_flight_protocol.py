"""The wire protocol module: command parsing, accepted input types, output schema."""
from __future__ import annotations

import json
import re

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
    (b'{"model": "x"}', "\"input\" must be one of ['image', 'text', 'tokens']; got None"),
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
}
OTHERS = [pa.int64(), pa.float32(), pa.list_(pa.float32()), pa.list_(pa.int16()), pa.list_(pa.int16(), 4),
          pa.binary(4), pa.list_view(pa.int32()), pa.list_(pa.string())]


@pytest.mark.parametrize("kind", protocol.INPUT_KINDS)
def test_accepted_input_types(kind):
    for type_ in ACCEPTED[kind]:
        assert protocol.is_accepted_type(kind, type_), type_
    rejected = OTHERS + [t for k, ts in ACCEPTED.items() if k != kind for t in ts]
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
