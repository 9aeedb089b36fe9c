"""``arrowengine serve``: arguments, default models, and a real server started as a subprocess."""
from __future__ import annotations

import argparse
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from convert import store
from flight_client import EmbeddingClient
from flight_server import serve

ROOT = Path(__file__).resolve().parents[1]


def parse(argv):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv)


def test_add_parsers_registers_serve_with_func():
    parser = argparse.ArgumentParser(prog="arrowengine")
    serve.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "m=/x", "--port", "0", "--max-concurrent-exchanges", "2"])
    assert args.func is serve.run and args.model == ["m=/x"] and args.port == 0 and args.models == []
    config = serve.config_from_args(args)
    assert config.limits.max_concurrent_exchanges == 2 and config.host == "127.0.0.1"
    # directories may also come without --model, as users type them first
    args = parser.parse_args(["serve", "/m/clip", "b=/m/other", "--port", "0", "--model", "m=/x"])
    assert serve.parse_model_specs(args.models + args.model) == {
        "clip": Path("/m/clip"), "b": Path("/m/other"), "m": Path("/x")}


def test_parse_model_specs():
    assert serve.parse_model_specs(["a=/m/one", "/m/two"]) == {"a": Path("/m/one"), "two": Path("/m/two")}
    with pytest.raises(ValueError, match="the name 'a' is given twice"):
        serve.parse_model_specs(["a=/x", "a=/y"])
    with pytest.raises(ValueError, match="expected NAME=DIR or DIR"):
        serve.parse_model_specs(["=/x"])


def test_config_from_args_reads_token_file_and_checks_files(tmp_path):
    token = tmp_path / "token"
    token.write_text("  abc123\n")
    assert serve.config_from_args(parse(["--auth-token-file", str(token)])).auth_token == "abc123"
    token.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        serve.config_from_args(parse(["--auth-token-file", str(token)]))
    with pytest.raises(ValueError, match="--tls-cert .*: no such file"):
        serve.config_from_args(parse(["--tls-cert", str(tmp_path / "c"), "--tls-key", str(token)]))
    # a key that is not the certificate's, or a file that is no certificate: said here, not as a failed bind
    from flight_fakes import make_self_signed_cert

    cert, key = make_self_signed_cert(tmp_path, "a")
    _, other_key = make_self_signed_cert(tmp_path, "b")
    assert serve.config_from_args(parse(["--tls-cert", str(cert), "--tls-key", str(key)])).tls_cert == cert
    for bad in (["--tls-cert", str(cert), "--tls-key", str(other_key)],
                ["--tls-cert", str(token), "--tls-key", str(key)]):
        with pytest.raises(ValueError, match="not a PEM certificate and its private key"):
            serve.config_from_args(parse(bad))


def test_non_loopback_without_tls_needs_insecure(caplog):
    caplog.set_level(logging.ERROR)
    assert serve.main(["--host", "0.0.0.0", "--model", "m=/nowhere"]) == 2
    assert "without TLS: pass --tls-cert and --tls-key, or --insecure" in caplog.text


def test_no_loadable_model_is_a_log_line_and_exit_1(caplog, tmp_path):
    caplog.set_level(logging.ERROR)
    assert serve.main(["--model", f"gone={tmp_path / 'missing'}", "--port", "0"]) == 1
    assert "cannot load model gone from" in caplog.text and "nothing to serve" in caplog.text


def test_default_models_convert_minilm_into_the_cache_then_scan_it(tmp_path):
    cache = tmp_path / "cache"
    found = store.default_model_dirs(cache)
    assert found == {"all-MiniLM-L6-v2": cache / "all-MiniLM-L6-v2"}
    assert (cache / "all-MiniLM-L6-v2" / "manifest.json").is_file()
    (cache / "clip-b32").mkdir()
    (cache / "clip-b32" / "manifest.json").write_text("{}")
    (cache / "not-a-model").mkdir()
    assert list(store.default_model_dirs(cache)) == ["all-MiniLM-L6-v2", "clip-b32"]


def test_default_model_that_cannot_be_had_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    def offline(target):
        raise OSError("hub unreachable")

    monkeypatch.setattr(store, "convert_default_model", offline)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text("{}")
    caplog.set_level(logging.ERROR)
    assert store.default_model_dirs(tmp_path) == {"other": tmp_path / "other"}
    assert "cannot prepare the default model all-MiniLM-L6-v2" in caplog.text and "hub unreachable" in caplog.text


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)


def _wait_for(lines: queue.Queue, pattern: str, log: list[str], timeout: float = 60) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        log.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r} within {timeout}s; log:\n{''.join(log)}")


def test_serve_subprocess_end_to_end(tmp_path, minilm_model_dir):
    import engine

    model_dir = minilm_model_dir
    token_file = tmp_path / "token"
    token_file.write_text("let-me-in")
    cmd = [sys.executable, "-m", "flight_server.serve", f"minilm={model_dir}", "--port", "0",
           "--model", f"broken={tmp_path / 'nope'}", "--auth-token-file", str(token_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True).start()
    log: list[str] = []
    try:
        port = int(_wait_for(lines, r"listening on grpc\+tcp://127\.0\.0\.1:(\d+) ", log).group(1))
        _wait_for(lines, r"\bready$", log)
        texts = ["serve me", "a second sentence"]
        with EmbeddingClient(f"grpc://127.0.0.1:{port}", token="let-me-in") as client:
            ready = client.ready()
            assert ready["ready"] is True and ready["models"] == ["minilm"] and "reason" not in ready
            vecs = client.embed_texts(texts)
        local = engine.load_model(model_dir).embed_texts(texts).embeddings
        assert np.array_equal(vecs, local)  # bit for bit through a separate server process
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        _wait_for(lines, r"stopped", log, timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(log)
    assert "cannot load model broken from" in text
    assert "let-me-in" not in text


def test_limit_and_scheduler_flags_reach_the_config():
    config = serve.config_from_args(parse([
        "--max-image-bytes", "1000", "--max-image-pixels", "5000", "--max-row-tokens", "16",
        "--batch-wait-ms", "2.5", "--metrics-port", "0", "--max-batch-rows", "64", "--idle-timeout-s", "7.5",
        "--max-command-bytes", "4096", "--max-concurrent-exchanges", "3", "--shutdown-grace-s", "4"]))
    limits = config.limits
    assert limits.idle_timeout_s == 7.5 and limits.max_command_bytes == 4096
    assert limits.max_concurrent_exchanges == 3 and config.shutdown_grace_s == 4
    assert limits.rows.max_image_decoded_bytes == 3 * 5000  # follows --max-image-pixels unless given
    given = serve.config_from_args(parse(["--max-image-decoded-bytes", "12345"])).limits
    assert given.rows.max_image_decoded_bytes == 12345
    assert (limits.rows.max_image_bytes, limits.rows.max_image_pixels, limits.rows.max_row_tokens) == (1000, 5000, 16)
    assert limits.max_batch_rows == 64 and config.batch_wait_ms == 2.5 and config.metrics_port == 0
    defaults = serve.config_from_args(parse([]))
    assert defaults.metrics_port is None and defaults.limits.rows.max_row_tokens is None
    assert defaults.limits.rows.max_image_pixels == 50_000_000
    assert defaults.limits.rows.max_image_bytes == 32 * 1024 ** 2
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
        serve.config_from_args(parse(["--max-image-pixels", "0"]))
    with pytest.raises(ValueError, match="idle_timeout_s must be a number of seconds"):
        serve.config_from_args(parse(["--idle-timeout-s", "0"]))


def test_load_models_applies_the_row_limits_and_make_schedulers_wraps_each(tiny_clip_dir):
    from engine.limits import RowLimits
    from engine.scheduler import Scheduler
    from flight_server.config import ServerConfig, ServerLimits

    rows = RowLimits(max_image_bytes=1234, max_image_pixels=5678, max_row_tokens=9)
    models = serve.load_models({"clip": tiny_clip_dir}, "cpu", "fp32", ServerLimits(rows=rows))
    assert models["clip"].row_limits is rows and models["clip"].image_processor.limits is rows  # one object
    assert rows.max_image_decoded_bytes == 3 * 5678  # an 8-bit RGB image at the limit
    models = serve.load_models({"clip": tiny_clip_dir}, "cpu", "fp32",
                               ServerLimits(rows=RowLimits(max_image_decoded_bytes=999)))
    assert models["clip"].image_processor.limits.max_image_decoded_bytes == 999
    scheds = serve.make_schedulers(models, ServerConfig(batch_wait_ms=1.0))
    try:
        assert isinstance(scheds["clip"], Scheduler) and scheds["clip"].model is models["clip"]
        assert scheds["clip"].config.max_wait_ms == 1.0
    finally:
        for s in scheds.values():
            s.close()


def test_token_file_is_read_stripped_and_empty_or_missing_is_a_clear_error(tmp_path):
    from flight_server.auth import read_token_file

    good = tmp_path / "token"
    good.write_text("  s3cret\n")
    assert read_token_file(good, "--auth-token-file") == "s3cret"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="--auth-token-file .* is empty"):
        read_token_file(empty, "--auth-token-file")
    with pytest.raises(ValueError, match="cannot read --token-file"):
        read_token_file(tmp_path / "missing", "--token-file")
    two = tmp_path / "two"
    two.write_text("s3cret\nother\n")  # the server would demand both lines, which no client can send
    with pytest.raises(ValueError, match="more than one line"):
        read_token_file(two, "--auth-token-file")


def test_pack_weights_flag_reaches_the_engine_and_a_bad_combination_is_logged(tiny_clip_dir, caplog):
    from engine.packing import PackedLinear, packing_available

    assert parse([]).pack_weights is False
    args = parse(["--pack-weights", "--precision", "fp32"])
    if packing_available():
        models = serve.load_models({"clip": tiny_clip_dir}, "cpu", args.precision, pack_weights=args.pack_weights)
        assert any(isinstance(m, PackedLinear) for m in models["clip"].net.modules())
    with caplog.at_level(logging.ERROR):
        assert serve.load_models({"clip": tiny_clip_dir}, "cpu", "int8", pack_weights=True) == {}
    assert "pack_weights packs fp32" in caplog.text
