"""The Flight servicer, driven with raw pyarrow.flight calls against a real server on port 0.

Most tests use ``FakeModel`` (tests/flight_fakes.py); the last ones use the real engine
with all-MiniLM-L6-v2 converted by the project's converter.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from engine.limits import RowLimits
from flight_fakes import FakeModel, exchange, expected_embedding, make_self_signed_cert, spy_cancelled, wait_until
from flight_server import exchange as pipeline
from flight_server import protocol
from flight_server.config import ServerConfig, ServerLimits
from flight_server.exchange import embedding_batch
from flight_server.servicer import EmbeddingServer


def cmd(**doc) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(doc).encode())


def action(client, name, options=None):
    results = list(client.do_action(flight.Action(name, b""), options) if options else client.do_action(name))
    return json.loads(results[0].body.to_pybytes())


@pytest.fixture
def fake():
    return FakeModel("fake", dim=8, modalities=("text", "image"))


@pytest.fixture
def served(fake):
    text_only = FakeModel("minilm-fake", dim=4, modalities=("text",))
    with EmbeddingServer({"fake": fake, "text-only": text_only}, ServerConfig(port=0)) as server:
        with flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
            yield server, client


def check_rows(batch, values, dim=8, normalize=True):
    embeddings = batch.column("embedding")
    errors = batch.column("error").to_pylist()
    for i, value in enumerate(values):
        if value is None or (value.encode() if isinstance(value, str) else bytes(value)).startswith(b"bad"):
            assert embeddings[i].is_valid is False and errors[i], (i, value)
        else:
            assert errors[i] is None
            np.testing.assert_array_equal(np.asarray(embeddings[i].as_py(), np.float32),
                                          expected_embedding(value, dim, normalize))


# ---- the happy path ----------------------------------------------------------------------

def test_text_batches_one_output_per_input_same_rows_and_passthrough(served, fake):
    server, client = served
    texts = [["a", "b", "c"], [], ["d", "bad row", None, "e"], ["f"]]
    batches = [pa.record_batch({"id": pa.array(range(len(t)), pa.int64()), "text": pa.array(t, pa.string()),
                                "skip": pa.array([1.0] * len(t), pa.float64())}) for t in texts]
    out = exchange(client, cmd(model="fake", input="text", passthrough=["id"]), batches)
    assert [b.num_rows for b in out] == [len(t) for t in texts]
    for batch, values, src in zip(out, texts, batches):
        assert batch.schema == protocol.output_schema(8, [pa.field("id", pa.int64())])
        assert batch.column("id").equals(src.column("id"))
        check_rows(batch, values)
    assert out[2].column("error").to_pylist()[1:3] == ["cannot embed row starting with b'bad row'", "null row"]
    assert fake.calls == 3  # the empty batch needs no engine call
    assert all(isinstance(a, pa.Array) for a in fake.inputs)  # the Arrow column itself, not a list


@pytest.mark.parametrize("kind,column,array", [
    ("image", "image", pa.array([b"\x89PNG-1", b"bad image", b"jpeg"], pa.binary())),
    ("image", "image", pa.array([b"\x89PNG-1", None, b"jpeg"], pa.large_binary())),
    ("text", "caption", pa.array(["x", "y", None], pa.large_string())),
    ("tokens", "input_ids", pa.array([[101, 7, 102], [101, 102], None], pa.list_(pa.int32()))),
    ("tokens", "input_ids", pa.array([[101, 7, 102], [1], [5, 5]], pa.large_list(pa.int64()))),
])
def test_every_accepted_input_type(served, fake, kind, column, array):
    server, client = served
    batch = pa.record_batch({column: array})
    doc = {"input": kind} if column == protocol.DEFAULT_COLUMNS[kind] else {"input": kind, "column": column}
    (out,) = exchange(client, cmd(**doc), [batch])  # no "model": the default (first) model
    check_rows(out, array.to_pylist())
    assert fake.inputs[0].type == array.type


def test_normalize_false_is_passed_to_the_model(served):
    server, client = served
    (out,) = exchange(client, cmd(input="text", normalize=False), [pa.record_batch({"text": ["abc"]})])
    check_rows(out, ["abc"], normalize=False)
    assert abs(np.linalg.norm(out.column("embedding")[0].as_py()) - 1) > 1e-3


def test_input_column_is_a_view_of_the_received_batch(served, fake, monkeypatch):
    seen = []
    original = pipeline.Exchange._embed_batch

    def spy(self, embed, command, batch, out_schema, dim):
        seen.append(batch)
        return original(self, embed, command, batch, out_schema, dim)

    monkeypatch.setattr(pipeline.Exchange, "_embed_batch", spy)
    server, client = served
    exchange(client, cmd(input="image"), [pa.record_batch({"image": pa.array([b"abc", b"defg"], pa.binary())})])
    received = seen[0].column("image")
    handed = fake.inputs[0]
    assert handed.buffers()[2].address == received.buffers()[2].address  # same bytes, not a copy


def test_embedding_column_wraps_the_engine_output_without_copy(served, fake, monkeypatch):
    built = []

    def spy(*args, **kwargs):
        out = embedding_batch(*args, **kwargs)
        built.append(out)
        return out

    monkeypatch.setattr(pipeline, "embedding_batch", spy)
    server, client = served
    exchange(client, cmd(input="text"), [pa.record_batch({"text": ["a", "bad", "c"]}),
                                         pa.record_batch({"text": ["d"]})])
    assert len(built) == 2
    for out, address in zip(built, fake.result_addresses):
        values = out.column("embedding").values
        assert values.buffers()[1].address == address
    assert built[0].column("embedding").null_count == 1


def test_embedding_batch_unit():
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    schema = protocol.output_schema(4, [pa.field("k", pa.string())])
    out = embedding_batch([pa.array(["x", "y", "z"])], schema, emb, [None, "broken", None])
    col = out.column("embedding")
    assert col.values.buffers()[1].address == emb.ctypes.data
    assert col.to_pylist() == [[0, 1, 2, 3], None, [8, 9, 10, 11]]
    assert out.column("error").to_pylist() == [None, "broken", None]


# ---- request-level faults -----------------------------------------------------------------

TEXT = pa.record_batch({"text": ["a"], "id": [1]})


@pytest.mark.parametrize("descriptor,batch,code,expected", [
    (flight.FlightDescriptor.for_command(b"{oops"), TEXT, "invalid_argument", "not valid JSON"),
    (cmd(input="text", colour="red"), TEXT, "invalid_argument", "unknown command key(s) ['colour']"),
    (cmd(input="video"), TEXT, "invalid_argument", "\"input\" must be one of ['image', 'text', 'tokens', 'pairs']; got 'video'"),
    (cmd(input="text", model="nope"), TEXT, "not_found", "unknown model 'nope'; this server serves ['fake', 'text-only']"),
    (cmd(input="text", column="caption"), TEXT, "invalid_argument",
     "input column 'caption' (for 'text' input) is not in the batches; the columns that came are ['text', 'id']"),
    (cmd(input="image", column="text"), TEXT, "invalid_argument",
     "column 'text' has type string; 'image' input needs binary, large_binary or binary_view"),
    (cmd(input="tokens", column="id"), TEXT, "invalid_argument", "'tokens' input needs list, large_list or "
     "fixed_size_list of int32 or int64"),
    (cmd(input="text", passthrough=["missing"]), TEXT, "invalid_argument", "passthrough column(s) ['missing']"),
    (cmd(input="image", model="text-only"), pa.record_batch({"image": pa.array([b"x"])}), "invalid_argument",
     "model 'text-only' embeds ['text'], not 'image' input (image); models here that take image: ['fake']"),
    (flight.FlightDescriptor.for_path("fake"), TEXT, "invalid_argument", "needs FlightDescriptor.for_command"),
])
def test_request_faults_fail_the_call_with_a_clear_flight_error(served, fake, descriptor, batch, code, expected):
    server, client = served
    with pytest.raises(flight.FlightServerError) as err:
        exchange(client, descriptor, [batch])
    assert expected in str(err.value)
    assert "Traceback" not in str(err.value)
    assert protocol.error_code(err.value) == code
    assert fake.calls == 0  # validated before any work
    assert action(client, "stats")["requests_failed"] == 1


def test_batch_limits_say_the_limit_and_how_to_split(fake):
    limits = ServerLimits(max_batch_rows=4, max_batch_bytes=1000)
    with EmbeddingServer({"fake": fake}, ServerConfig(port=0, limits=limits)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        with pytest.raises(flight.FlightServerError) as err:
            exchange(client, cmd(input="text"), [pa.record_batch({"text": list("abcde")})])
        assert "input batch 0 has 5 rows; the limit is 4 rows per batch" in str(err.value)
        assert "max_chunksize=4" in str(err.value) and protocol.error_code(err.value) == "limit_exceeded"
        with pytest.raises(flight.FlightServerError, match="holds .* bytes; the limit is 1000 bytes per batch"):
            exchange(client, cmd(input="image"), [pa.record_batch({"image": [b"x" * 600, b"y" * 600]})])
        assert fake.calls == 0
        # one row alone over the byte limit cannot be split: an error for that row; the call goes on
        big, small = exchange(client, cmd(input="image", passthrough=["id"]),
                              [pa.record_batch({"image": [b"x" * 2000], "id": [7]}),
                               pa.record_batch({"image": [b"ok"], "id": [8]})])
        assert big.column("id").to_pylist() == [7] and "too large" in big.column("error")[0].as_py()
        assert small.column("error").to_pylist() == [None] and fake.calls == 1
        (out,) = exchange(client, cmd(input="text"), [pa.record_batch({"text": list("abcd")})])
        assert out.num_rows == 4


def test_internal_errors_do_not_leak_details(served, fake, monkeypatch):
    server, client = served
    monkeypatch.setattr(fake, "embed_texts", lambda rows, normalize: (_ for _ in ()).throw(RuntimeError("secret")))
    with pytest.raises(flight.FlightInternalError) as err:
        exchange(client, cmd(input="text"), [TEXT])
    assert "internal server error (RuntimeError); see the server log" in str(err.value)
    assert "secret" not in str(err.value)


def test_engine_input_error_maps_to_invalid_argument(served, fake, monkeypatch):
    from engine.errors import ModalityError

    def raise_modality(rows, normalize):
        raise ModalityError("this model has no image tower")

    monkeypatch.setattr(fake, "embed_images", raise_modality)
    server, client = served
    with pytest.raises(flight.FlightServerError, match="this model has no image tower") as err:
        exchange(client, cmd(input="image"), [pa.record_batch({"image": [b"x"]})])
    assert protocol.error_code(err.value) == "invalid_argument"


# ---- concurrency, cancellation, shutdown ---------------------------------------------------

def test_concurrency_limit_rejects_fast_with_unavailable():
    gate = threading.Event()
    slow = FakeModel("slow", gate=gate)  # the first exchange holds its slot, inside the engine, until the gate opens
    limits = ServerLimits(max_concurrent_exchanges=1)
    with EmbeddingServer({"slow": slow}, ServerConfig(port=0, limits=limits)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        result, second = {}, {}
        first = threading.Thread(target=lambda: result.setdefault(
            "out", exchange(client, cmd(input="text"), [pa.record_batch({"text": ["a"]})] * 3)), daemon=True)

        def run_second():
            try:
                exchange(client, cmd(input="text"), [pa.record_batch({"text": ["b"]})])
                second["error"] = None
            except flight.FlightError as exc:
                second["error"] = exc

        first.start()
        try:
            wait_until(lambda: slow.entered == 1, "the first exchange to hold the slot")
            rejected = threading.Thread(target=run_second, daemon=True)
            rejected.start()
            rejected.join(timeout=60)
            # answered while the first exchange is still blocked in the engine: rejected at once, not queued
            assert not rejected.is_alive(), "the second exchange waits behind the first instead of being rejected"
            assert first.is_alive() and slow.calls == 0
        finally:
            gate.set()
        assert isinstance(second["error"], flight.FlightUnavailableError), second["error"]
        assert "server busy: 1 exchanges already running" in str(second["error"])
        first.join(timeout=60)
        assert len(result["out"]) == 3
        stats = action(client, "stats")
        assert stats["rejected_busy"] == 1 and stats["active_exchanges"] == 0 and stats["requests_failed"] == 0


def test_exchanges_that_send_nothing_hold_no_slot():
    """Clients that open an exchange (with or without its schema) and send no batch do not lock others out."""
    limits = ServerLimits(max_concurrent_exchanges=2)
    with EmbeddingServer({"fake": FakeModel("fake")}, ServerConfig(port=0, limits=limits)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        idle = [client.do_exchange(cmd(input="text")) for _ in range(3)]
        try:
            for writer, _ in idle[:2]:
                writer.begin(pa.schema([("text", pa.string())]))
            for _, reader in idle[:2]:
                assert reader.schema.names == ["embedding", "error"]  # the server read our schema and answered
            wait_until(lambda: server.stats.snapshot()["requests"] == 3, "the server to start the 3 idle exchanges")
            for i in range(3):
                (out,) = exchange(client, cmd(input="text"), [pa.record_batch({"text": [f"t{i}"]})])
                assert out.column("error").to_pylist() == [None]
            assert action(client, "stats")["active_exchanges"] == 0
        finally:  # also when the test fails: an open exchange would keep the server from shutting down
            for writer, _ in idle:
                with contextlib.suppress(pa.ArrowException):  # the one without a schema gets "no input schema"
                    writer.close()


def test_client_cancel_stops_server_work_within_one_batch(monkeypatch):
    gate = threading.Event()
    slow = FakeModel("slow", gate=gate, free_calls=1)  # batch 1 runs; batch 2 waits in the engine for the gate
    checks = spy_cancelled(monkeypatch)
    with EmbeddingServer({"slow": slow}, ServerConfig(port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        writer, reader = client.do_exchange(cmd(input="text"))
        batch = pa.record_batch({"text": ["a", "b"]})
        writer.begin(batch.schema)
        for _ in range(30):
            writer.write_batch(batch)
        first = reader.read_chunk().data
        assert first.num_rows == 2
        wait_until(lambda: slow.entered == 2, "the server to start batch 2")
        try:
            reader.cancel()
            (cancelled,) = checks
            wait_until(cancelled, "the server to see the client's cancel")
        finally:
            gate.set()  # batch 2, in progress when the cancel came, may finish
        try:
            writer.close()
        except pa.ArrowException:
            pass
        wait_until(lambda: server.stats.snapshot()["active_exchanges"] == 0, "the cancelled exchange to end")
        assert slow.entered == 2  # no batch started once the server saw the cancel (28 were still queued)
        stats = server.stats.snapshot()
        assert stats["requests_cancelled"] == 1
        assert stats["requests_failed"] == 0  # a cancel is not a server failure


def test_drain_refuses_new_exchanges(fake):
    with EmbeddingServer({"fake": fake}, ServerConfig(port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        assert server.drain(grace_s=1.0) is True
        with pytest.raises(flight.FlightUnavailableError, match="shutting down"):
            exchange(client, cmd(input="text"), [TEXT])
        assert action(client, "ready")["ready"] is False


def test_no_schema_is_a_request_fault(served):
    server, client = served
    writer, reader = client.do_exchange(cmd(input="text"))
    writer.done_writing()
    with pytest.raises(flight.FlightServerError, match=r"no input schema came: .*writer.begin\(schema\)"):
        reader.read_all()
    with pytest.raises(pa.ArrowException):
        writer.close()


def test_drain_lets_exchanges_finish_within_grace_then_stops_them():
    slow = FakeModel("slow", delay_s=0.05)
    with EmbeddingServer({"slow": slow}, ServerConfig(port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        batches = [pa.record_batch({"text": ["a"]})] * 4
        results = {}

        def run(key, count):
            try:
                results[key] = exchange(client, cmd(input="text"), batches[:1] * count)
            except flight.FlightError as exc:
                results[key] = exc

        short = threading.Thread(target=run, args=("short", 4), daemon=True)
        short.start()
        wait_until(lambda: slow.calls > 0, "the short exchange's first batch")
        assert server.drain(grace_s=10.0) is True  # waited for the 4 batches (0.2 s of work; 5 s before the stop)
        short.join(timeout=60)
        assert len(results["short"]) == 4
    slow = FakeModel("slow", delay_s=0.05)
    with EmbeddingServer({"slow": slow}, ServerConfig(port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        long = threading.Thread(target=run, args=("long", 200), daemon=True)
        long.start()
        wait_until(lambda: slow.calls > 0, "the long exchange's first batch")
        assert server.drain(grace_s=0.2) is False  # 200 batches of 0.05 s cannot end in 0.2 s
        stopped_at = slow.entered  # the drain has told the exchange to stop (at half its grace)
        long.join(timeout=60)
        assert not long.is_alive(), "the exchange went on after the drain told it to stop"
        assert isinstance(results["long"], flight.FlightUnavailableError), results["long"]
        assert "shutting down" in str(results["long"])
        assert slow.entered <= stopped_at + 1  # stopped at its next batch: at most one started after the stop
        assert server.stats.snapshot()["requests_failed"] == 0  # stopped by the shutdown, not a failure


# ---- discovery and actions ----------------------------------------------------------------

def test_list_flights_and_get_flight_info(served):
    server, client = served
    infos = list(client.list_flights())
    assert [i.descriptor.path for i in infos] == [[b"fake"], [b"text-only"]]
    assert infos[0].schema == protocol.output_schema(8) and infos[1].schema == protocol.output_schema(4)
    meta = json.loads(infos[1].app_metadata)
    assert meta == {"name": "text-only", "architecture": "FakeModel", "kind": "clip", "modalities": ["text"],
                    "dimension": 4, "precision": "fp32", "device": "cpu", "max_tokens": 16, "prompts": {},
                    "default_prompt": None, "matryoshka_dims": None, "score_activation": None, "default": False}
    by_path = client.get_flight_info(flight.FlightDescriptor.for_path("text-only"))
    assert json.loads(by_path.app_metadata)["name"] == "text-only"
    by_cmd = client.get_flight_info(cmd(input="text"))
    assert json.loads(by_cmd.app_metadata)["default"] is True
    with pytest.raises(flight.FlightServerError, match="unknown model 'zzz'"):
        client.get_flight_info(flight.FlightDescriptor.for_path("zzz"))
    assert client.get_schema(flight.FlightDescriptor.for_path("text-only")).schema == protocol.output_schema(4)
    # the Flight methods the protocol does not use say what to use instead (no server traceback)
    with pytest.raises(flight.FlightServerError, match="do_get is not supported: .* do_exchange") as err:
        client.do_get(flight.Ticket(b"x")).read_all()
    assert "Traceback" not in str(err.value)
    writer, _ = client.do_put(flight.FlightDescriptor.for_path("fake"), pa.schema([("text", pa.string())]))
    with pytest.raises(flight.FlightServerError, match="do_put is not supported"):
        writer.close()


def test_actions(served, fake):
    server, client = served
    assert action(client, "health")["status"] == "ok"
    assert action(client, "ready") == {"ready": False, "models": ["fake", "text-only"], "reason": "warming up",
                                       "active_exchanges": 0, "max_concurrent_exchanges": 8, "stalled_exchanges": 0}
    server.warm_up()
    assert fake.calls == 1  # a real inference per model
    assert action(client, "ready")["ready"] is True
    models = action(client, "models")
    assert [m["name"] for m in models] == ["fake", "text-only"] and models[0]["default"] is True
    exchange(client, cmd(input="text"), [pa.record_batch({"text": ["a", "bad", "c"]})] * 2)
    stats = action(client, "stats")
    assert (stats["requests"], stats["rows"], stats["row_errors"], stats["batches"]) == (1, 6, 2, 2)
    assert {a.type for a in client.list_actions()} == set(protocol.ACTIONS)
    with pytest.raises(flight.FlightServerError, match="unknown action 'reboot'"):
        action(client, "reboot")


def test_warm_up_image_only_model_uses_a_real_png():
    image_only = FakeModel("vision", modalities=("image",))
    with EmbeddingServer({"vision": image_only}, ServerConfig(port=0)) as server:
        server.warm_up()
    assert image_only.calls == 1 and bytes(image_only.inputs[0][0].as_py()).startswith(b"\x89PNG")


# ---- config, auth, TLS ------------------------------------------------------------------------

def test_server_config_rules():
    with pytest.raises(ValueError, match="non-loopback host '0.0.0.0' without TLS"):
        ServerConfig(host="0.0.0.0")
    assert ServerConfig(host="0.0.0.0", insecure=True).location == "grpc+tcp://0.0.0.0:8815"
    assert ServerConfig(host="::1", port=1).location == "grpc+tcp://[::1]:1"
    with pytest.raises(ValueError, match="needs both a certificate and a key"):
        ServerConfig(tls_cert="c.pem")
    with pytest.raises(ValueError, match="max_batch_rows must be a positive integer"):
        ServerLimits(max_batch_rows=0)
    assert "secret" not in repr(ServerConfig(auth_token="secret"))


def test_bearer_token_auth(fake, caplog):
    caplog.set_level(logging.DEBUG)
    token = "s3cret-t0ken"
    with EmbeddingServer({"fake": fake}, ServerConfig(port=0, auth_token=token)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        with pytest.raises(flight.FlightUnauthenticatedError, match="send the header 'authorization: Bearer <token>'"):
            action(client, "health")
        with pytest.raises(flight.FlightUnauthenticatedError, match="not valid"):
            exchange(client, cmd(input="text"), [TEXT],
                     options=flight.FlightCallOptions(headers=[(b"authorization", b"Bearer wrong")]))
        with pytest.raises(flight.FlightUnauthenticatedError):
            action(client, "health", flight.FlightCallOptions(headers=[(b"authorization", token.encode())]))
        good = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
        assert action(client, "health", good)["status"] == "ok"
        (out,) = exchange(client, cmd(input="text"), [TEXT], options=good)
        assert out.num_rows == 1
        assert fake.calls == 1
    assert caplog.records and all(token not in r.getMessage() for r in caplog.records)


def test_tls_right_ca_works_wrong_ca_and_plaintext_fail(fake, tmp_path):
    cert, key = make_self_signed_cert(tmp_path, "server")
    other_ca, _ = make_self_signed_cert(tmp_path, "other")
    config = ServerConfig(port=0, tls_cert=cert, tls_key=key)
    with EmbeddingServer({"fake": fake}, config) as server:
        with flight.FlightClient(f"grpc+tls://localhost:{server.port}", tls_root_certs=cert.read_bytes()) as client:
            assert action(client, "health")["status"] == "ok"
            (out,) = exchange(client, cmd(input="text"), [TEXT])
            check_rows(out, ["a"])
        with flight.FlightClient(f"grpc+tls://localhost:{server.port}", tls_root_certs=other_ca.read_bytes()) as bad:
            with pytest.raises(flight.FlightUnavailableError):
                action(bad, "health", flight.FlightCallOptions(timeout=5))
        with flight.FlightClient(f"grpc://localhost:{server.port}") as plain:
            with pytest.raises(flight.FlightUnavailableError):
                action(plain, "health", flight.FlightCallOptions(timeout=5))


# ---- the real engine ----------------------------------------------------------------------------

PHOTOS = Path(__file__).parent / "data" / "photos"


@pytest.fixture(scope="module")
def minilm(minilm_model_dir):
    import engine

    return engine.load_model(minilm_model_dir, device="cpu", precision="fp32")


def test_real_clip_images_through_the_server_equal_in_process(tiny_clip_dir):
    import engine

    clip = engine.load_model(tiny_clip_dir, device="cpu", precision="fp32")
    photos = [p.read_bytes() for p in sorted(PHOTOS.glob("*.png"))[:2]] + [b"not an image", None]
    images = pa.array(photos, pa.binary())
    with EmbeddingServer({"clip": clip}, ServerConfig(port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        out = exchange(client, cmd(input="image"), [pa.record_batch({"image": images})] * 2)
        (txt,) = exchange(client, cmd(input="text"), [pa.record_batch({"text": ["a cat", "a rocket"]})])
    local = clip.embed_images(images)
    for batch in out:
        got = batch.column("embedding").values.to_numpy().reshape(len(photos), -1)
        assert np.array_equal(got, local.embeddings)
        assert batch.column("error").to_pylist() == local.errors
        assert batch.column("embedding").null_count == 2 and local.errors[2] and local.errors[3]
    dim = clip.info.dim
    assert np.array_equal(txt.column("embedding").values.to_numpy().reshape(2, dim),
                          clip.embed_texts(["a cat", "a rocket"]).embeddings)


def test_real_engine_through_the_server_equals_in_process_bit_for_bit(minilm):
    texts = ["a photo of a cat", "", "Arrow Flight streams record batches", None, "ünïcödé ✓"]
    tokens = [[101, 7592, 2088, 102], [101, 10_000_000, 102], [101, 102]]
    with EmbeddingServer({"minilm": minilm}, ServerConfig(port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        (out,) = exchange(client, cmd(input="text", passthrough=["i"]),
                          [pa.record_batch({"i": range(len(texts)), "text": pa.array(texts, pa.string())})])
        (tok,) = exchange(client, cmd(input="tokens"),
                          [pa.record_batch({"input_ids": pa.array(tokens, pa.list_(pa.int64()))})])
        with pytest.raises(flight.FlightServerError, match="embeds \\['text'\\], not 'image' input"):
            exchange(client, cmd(input="image"), [pa.record_batch({"image": [b"x"]})])
    local = minilm.embed_texts(texts)
    got = out.column("embedding").values.to_numpy().reshape(len(texts), -1)
    assert got.shape == (5, 384)
    assert np.array_equal(got, local.embeddings)  # bit for bit
    assert out.column("error").to_pylist() == local.errors and local.errors[3] is not None
    assert out.column("embedding").null_count == 1
    local_tok = minilm.embed_tokens(pa.array(tokens, pa.list_(pa.int64())))
    assert np.array_equal(tok.column("embedding").values.to_numpy().reshape(3, -1), local_tok.embeddings)
    assert tok.column("error").to_pylist() == local_tok.errors and local_tok.errors[1] is not None


# ---- behind the engine scheduler (as `arrowengine serve` runs it) ---------------------------

def _jpeg(side: int, seed: int = 0) -> bytes:
    import cv2

    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", pixels)[1].tobytes()


def test_image_limits_are_row_errors_that_name_the_limit(tiny_clip_dir):
    from engine.scheduler import Scheduler
    from flight_server.serve import load_models

    small, big = _jpeg(64), _jpeg(400, 1)
    limits = ServerLimits(rows=RowLimits(max_image_pixels=100 * 100, max_image_bytes=len(big) + 10))
    clip = load_models({"clip": tiny_clip_dir}, "cpu", "fp32", limits)["clip"]
    tiny_bytes = load_models({"clip": tiny_clip_dir}, "cpu", "fp32",
                             ServerLimits(rows=RowLimits(max_image_bytes=len(small) - 1)))["clip"]
    with Scheduler(clip) as s1, Scheduler(tiny_bytes) as s2, \
            EmbeddingServer({"pixels": s1, "bytes": s2}, ServerConfig(port=0, limits=limits)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        images = pa.array([small, big], pa.binary())
        (out,) = exchange(client, cmd(input="image", model="pixels"), [pa.record_batch({"image": images})])
        (out2,) = exchange(client, cmd(input="image", model="bytes"), [pa.record_batch({"image": images})])
    errors = out.column("error").to_pylist()
    assert errors[0] is None and out.column("embedding")[0].is_valid
    assert "too many pixels: 400x400 = 160000, over the limit of 10000" in errors[1]
    assert out.column("embedding").null_count == 1
    assert all(f"over the limit of {len(small) - 1}" in e for e in out2.column("error").to_pylist())


def test_token_limit_is_a_row_error_and_texts_still_truncate(minilm, minilm_model_dir):
    import engine
    from engine.scheduler import Scheduler

    long_text = " ".join(["word"] * 1000)
    limited = engine.load_model(minilm_model_dir, row_limits=RowLimits(max_row_tokens=4))
    with Scheduler(limited) as sched, \
            EmbeddingServer({"minilm": sched}, ServerConfig(port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        tokens = pa.array([[101, 7592, 102], [101, 7592, 2088, 2088, 102]], pa.list_(pa.int64()))
        (tok,) = exchange(client, cmd(input="tokens"), [pa.record_batch({"input_ids": tokens})])
        (txt,) = exchange(client, cmd(input="text"), [pa.record_batch({"text": [long_text]})])
    errors = tok.column("error").to_pylist()
    assert errors[0] is None and "5 tokens, over the limit of 4 tokens per row" in errors[1]
    assert txt.column("error").to_pylist() == [None]  # texts are truncated by the tokenizer, not refused
    np.testing.assert_array_equal(txt.column("embedding").values.to_numpy(),
                                  minilm.embed_texts([long_text]).embeddings[0])


def test_concurrent_exchanges_share_device_batches_and_get_their_own_rows(tiny_clip_dir):
    import engine
    from engine.scheduler import Scheduler, SchedulerConfig

    clip = engine.load_model(tiny_clip_dir)
    images = [_jpeg(96 + 8 * i, i) for i in range(24)]
    sizes = []
    with Scheduler(clip, SchedulerConfig(max_wait_ms=30),
                   on_batch=lambda queue, rows, s: sizes.append(rows)) as sched, \
            EmbeddingServer({"clip": sched}, ServerConfig(port=0)) as server:
        results = [None] * 6
        barrier = threading.Barrier(6)

        def run(i):
            with flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
                batches = [pa.record_batch({"image": pa.array(images[4 * i + 2 * k:4 * i + 2 * k + 2], pa.binary()),
                                            "i": [10 * i + 2 * k, 10 * i + 2 * k + 1]}) for k in range(2)]
                barrier.wait()
                results[i] = exchange(client, cmd(input="image", passthrough=["i"]), batches)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    want = clip.embed_images(images).embeddings
    for i, out in enumerate(results):
        assert [b.column("i").to_pylist() for b in out] == [[10 * i, 10 * i + 1], [10 * i + 2, 10 * i + 3]]
        got = np.concatenate([b.column("embedding").values.to_numpy().reshape(2, -1) for b in out])
        np.testing.assert_allclose(got, want[4 * i:4 * i + 4], atol=1e-5, rtol=0)
    assert sum(sizes) == 24 and max(sizes) > 2  # rows of several exchanges in one device batch


def test_dictionary_encoded_texts_are_embedded_like_plain_ones(minilm):
    """A pandas categorical column arrives as dictionary<int32, string>: same embeddings as the plain strings."""
    plain = pa.array(["a cat", None, "a dog", "a cat", ""], pa.string())
    encoded = plain.dictionary_encode()
    assert pa.types.is_dictionary(encoded.type)
    want = minilm.embed_texts(plain)
    got = minilm.embed_texts(encoded)
    assert got.errors == want.errors and np.array_equal(got.embeddings, want.embeddings)
    with EmbeddingServer({"m": minilm}, ServerConfig(port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        (out,) = exchange(client, cmd(input="text"), [pa.record_batch({"text": encoded})])
    assert out.column("error").to_pylist() == want.errors
    valid = [e is None for e in want.errors]
    emb = np.asarray(out.column("embedding").to_pylist(), dtype=object)
    assert np.allclose(np.stack(emb[valid]), want.embeddings[valid])


def test_view_and_fixed_size_columns_are_embedded_like_the_plain_ones(served, fake):
    """Polars and recent pandas write string_view / binary_view; token ids may come as fixed_size_list."""
    server, client = served
    cases = [("text", pa.array(["a", None, "bc"], pa.string()), pa.string_view()),
             ("image", pa.array([b"\x89PNG x", b"\xff\xd8 y"], pa.binary()), pa.binary_view()),
             ("tokens", pa.array([[1, 2], [3, 4]], pa.list_(pa.int64())), pa.list_(pa.int64(), 2))]
    for kind, plain, other in cases:
        column = protocol.DEFAULT_COLUMNS[kind]
        (want,) = exchange(client, cmd(input=kind), [pa.record_batch({column: plain})])
        (got,) = exchange(client, cmd(input=kind), [pa.record_batch({column: plain.cast(other)})])
        assert got.equals(want), kind


def test_view_columns_reach_a_real_model_and_embed_like_the_plain_ones(tiny_clip_dir):
    """The engine, not the Flight layer, copies string_view / binary_view columns into the types it reads."""
    import engine
    from engine.scheduler import Scheduler

    with Scheduler(engine.load_model(tiny_clip_dir)) as sched, \
            EmbeddingServer({"tiny": sched}, ServerConfig(port=0)) as server:
        client = flight.connect(f"grpc://127.0.0.1:{server.port}")
        cases = [("text", pa.array(["a cat", None, "a cup of coffee"], pa.string()), pa.string_view()),
                 ("image", pa.array([_jpeg(64), None, _jpeg(80, 1)], pa.binary()), pa.binary_view())]
        for kind, plain, view in cases:
            column = protocol.DEFAULT_COLUMNS[kind]
            (want,) = exchange(client, cmd(input=kind), [pa.record_batch({column: plain})])
            (got,) = exchange(client, cmd(input=kind), [pa.record_batch({column: plain.cast(view)})])
            assert got.equals(want) and want.column("error").null_count == 2, kind


def test_a_device_fault_after_queueing_is_a_row_error_and_a_waiting_client_goes_on(tiny_clip_dir):
    """A batch that fails on the device after submit returned: a client that waits for each result before
    sending more (lockstep) gets that batch's rows back as errors and the next batch embedded, not a hang."""
    import engine
    from engine.scheduler import Scheduler

    clip = engine.load_model(tiny_clip_dir)
    real = clip.encode_pixels
    calls = []

    def flaky(pixels, normalize=True):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return real(pixels, normalize)

    clip.encode_pixels = flaky
    images = [_jpeg(96 + 8 * i, i) for i in range(6)]
    want = real(clip.prepare_images(images).pixels)
    with Scheduler(clip) as sched, EmbeddingServer({"clip": sched}, ServerConfig(port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        writer, reader = client.do_exchange(cmd(input="image"))
        writer.begin(pa.schema([("image", pa.binary())]))
        got = []
        for k in range(3):
            writer.write_batch(pa.record_batch({"image": pa.array(images[2 * k:2 * k + 2], pa.binary())}))
            box = {}
            t = threading.Thread(target=lambda: box.setdefault("chunk", reader.read_chunk()), daemon=True)
            t.start()
            t.join(20)
            assert "chunk" in box, f"no result for batch {k}: the server hung"
            got.append(box["chunk"].data)
        writer.done_writing()
        assert list(reader) == []
        writer.close()
        stats = server.stats.snapshot()
    errors = [b.column("error").to_pylist() for b in got]
    assert errors[0] == [None, None] and errors[2] == [None, None]
    assert all("internal error while embedding this batch (RuntimeError)" in e and "send them again" in e
               for e in errors[1])
    assert "illegal memory" not in errors[1][0]  # a non-engine exception's text stays in the server log
    assert got[1].column("embedding").null_count == 2
    for k in (0, 2):
        np.testing.assert_allclose(got[k].column("embedding").values.to_numpy().reshape(2, -1),
                                   want[2 * k:2 * k + 2], atol=1e-5, rtol=0)
    assert stats["row_errors"] == 2 and stats["requests_failed"] == 0
