"""One limits model: the per-row limits (engine.limits.RowLimits) are the engine's, enforced by the model
in-process and behind a server alike; the server's flags are named like the fields they set."""
from __future__ import annotations

import argparse
import dataclasses
import logging

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

import engine
from engine.limits import RowLimits
from flight_client.cli import build_parser
from flight_server import serve
from flight_server.config import ServerConfig, ServerLimits
from flight_server.servicer import EmbeddingServer


def _jpeg(side: int) -> bytes:
    pixels = np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", pixels)[1].tobytes()


def _exchange(client, kind: str, column: str, array: pa.Array) -> list[str | None]:
    command = flight.FlightDescriptor.for_command(f'{{"input": "{kind}"}}'.encode())
    writer, reader = client.do_exchange(command)
    batch = pa.record_batch({column: array})
    writer.begin(batch.schema)
    writer.write_batch(batch)
    writer.done_writing()
    errors = reader.read_all().column("error").to_pylist()
    writer.close()
    return errors


def test_a_row_over_a_limit_is_the_same_row_error_in_process_and_over_flight(tiny_clip_dir):
    rows = RowLimits(max_row_tokens=5, max_image_pixels=100 * 100)
    model = engine.load_model(tiny_clip_dir, row_limits=rows)
    (short, long), _ = model.prepare_texts(["a cat", "a photo of a cat on a red sofa"])
    assert len(short) <= 5 < len(long)
    tokens = pa.array([short.tolist(), long.tolist()], pa.list_(pa.int32()))
    images = pa.array([_jpeg(64), _jpeg(400)], pa.binary())

    local_tokens = model.embed_tokens(tokens).errors
    local_images = model.embed_images(images).errors
    assert local_tokens[0] is None and local_tokens[1] == (
        f"{len(long)} tokens, over the limit of 5 tokens per row (max_row_tokens); truncate or split the row")
    assert local_images[0] is None
    assert local_images[1].startswith("too many pixels: 400x400 = 160000, over the limit of 10000 (max_image_pixels)")
    with pytest.raises(engine.RowErrors):
        model.encode_tokens(tokens)

    # behind a server, as `arrowengine serve --max-row-tokens 5 --max-image-pixels 10000` runs it
    limits = ServerLimits(rows=rows)
    models = serve.load_models({"clip": tiny_clip_dir}, "cpu", "fp32", limits)
    schedulers = serve.make_schedulers(models, ServerConfig(limits=limits))
    try:
        with EmbeddingServer(schedulers, ServerConfig(port=0, limits=limits)) as server, \
                flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
            assert _exchange(client, "tokens", "input_ids", tokens) == local_tokens
            assert _exchange(client, "image", "image", images) == local_images
            action = next(iter(client.do_action(flight.Action("limits", b"")))).body.to_pybytes()
    finally:
        for scheduler in schedulers.values():
            scheduler.close()
    assert b'"max_row_tokens": 5' in action and b'"max_image_pixels": 10000' in action  # one flat object


def test_row_limits_check_their_values_and_derive_the_decoded_cap():
    assert RowLimits(max_image_pixels=10).max_image_decoded_bytes == 30
    assert RowLimits(max_image_pixels=10, max_image_decoded_bytes=7).max_image_decoded_bytes == 7
    for bad in ({"max_row_tokens": 0}, {"max_image_bytes": -1}, {"max_image_pixels": 2.5},
                {"max_image_decoded_bytes": True}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a positive integer"):
            RowLimits(**bad)
    with pytest.raises(ValueError, match="image_formats must be a non-empty set of"):
        RowLimits(image_formats=frozenset())
    with pytest.raises(ValueError, match="rows must be an engine.limits.RowLimits"):
        ServerLimits(rows={"max_row_tokens": 4})


def test_the_limits_answer_names_every_field_once():
    limits = ServerLimits(rows=RowLimits(max_row_tokens=7), max_batch_rows=3)
    doc = limits.as_dict()
    names = [f.name for f in dataclasses.fields(RowLimits)] + [
        f.name for f in dataclasses.fields(ServerLimits) if f.name != "rows"]
    assert sorted(doc) == sorted(names)
    assert doc["max_row_tokens"] == 7 and doc["max_batch_rows"] == 3
    assert doc["image_formats"] == ["bmp", "gif", "jpeg", "png", "webp"]


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser


def test_every_config_field_has_a_serve_flag_of_its_own_name():
    options = set(_serve_parser()._option_string_actions)
    fields = ([f.name for f in dataclasses.fields(RowLimits) if f.name != "image_formats"]
              + [f.name for f in dataclasses.fields(ServerLimits) if f.name != "rows"]
              + [f.name for f in dataclasses.fields(ServerConfig) if f.name not in ("limits", "auth_token")])
    missing = [name for name in fields if "--" + name.replace("_", "-") not in options]
    assert missing == []


def test_serve_help_shows_the_new_names_only(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for new in serve.DEPRECATED_FLAGS.values():
        assert new in text
    for old in serve.DEPRECATED_FLAGS:
        assert f"{old} " not in text and f"{old}\n" not in text


@pytest.mark.parametrize("old,new,value", [
    ("--max-concurrent", "--max-concurrent-exchanges", "3"),
    ("--max-tokens-per-row", "--max-row-tokens", "16"),
    ("--idle-timeout", "--idle-timeout-s", "7.5"),
    ("--shutdown-grace", "--shutdown-grace-s", "4"),
])
def test_old_serve_flags_still_work_and_warn(caplog, old, new, value):
    assert serve.DEPRECATED_FLAGS[old] == new
    caplog.set_level(logging.WARNING)
    parser = _serve_parser()
    assert vars(parser.parse_args([old, value])) == vars(parser.parse_args([new, value]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{old} is deprecated and will be removed; use {new}"]
    caplog.clear()
    parser.parse_args([new, value])
    assert caplog.records == []  # the new spelling is silent


def test_old_embed_token_flag_still_works_and_warns(caplog, tmp_path):
    token = tmp_path / "token"
    token.write_text("secret\n")
    caplog.set_level(logging.WARNING)
    base = ["embed", "in.parquet", "out", "--kind", "text", "--server", "grpc://a:1"]
    old = build_parser().parse_args(base + ["--token-file", str(token)])
    new = build_parser().parse_args(base + ["--auth-token-file", str(token)])
    assert old.auth_token_file == new.auth_token_file == token
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "--token-file is deprecated and will be removed; use --auth-token-file"]
