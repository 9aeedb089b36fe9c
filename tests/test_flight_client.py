"""EmbeddingClient against a real in-process server (FakeModel) on port 0."""
from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_client import EmbeddingClient, EmbeddingRowErrors, embeddings_to_numpy
from flight_fakes import FakeModel, expected_embedding, make_self_signed_cert, spy_cancelled, wait_until
from flight_server import protocol
from flight_server.config import ServerConfig, ServerLimits
from flight_server.servicer import EmbeddingServer


@pytest.fixture
def fake():
    return FakeModel("fake", dim=8)


@pytest.fixture
def server(fake):
    with EmbeddingServer({"fake": fake, "other": FakeModel("other", dim=4)}, ServerConfig(port=0)) as srv:
        yield srv


@pytest.fixture
def client(server):
    with EmbeddingClient(f"grpc://127.0.0.1:{server.port}", retries=0) as cli:
        yield cli


def expected(values, dim=8):
    return np.stack([expected_embedding(v, dim) for v in values])


def test_import_does_not_pull_torch_or_engine():
    code = ("import sys, flight_client; from flight_client import EmbeddingClient; "
            "bad = [m for m in ('torch', 'engine') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_embed_texts_images_tokens(client):
    texts = ["a", "b", "c"]
    np.testing.assert_array_equal(client.embed_texts(texts), expected(texts))
    images = [b"\x89PNG one", b"\xff\xd8 jpeg"]
    np.testing.assert_array_equal(client.embed_images(iter(images)), expected(images))
    np.testing.assert_array_equal(client.embed_images(pa.array(images, pa.large_binary())), expected(images))
    tokens = [[101, 5, 102], [101, 102]]
    np.testing.assert_array_equal(client.embed_tokens(tokens), expected(tokens))
    assert client.embed_texts(["x"], model="other").shape == (1, 4)  # named model
    assert client.embed_texts([]).shape == (0, 8)


def test_embeddings_are_a_view_of_the_received_arrow_buffer(client):
    (batch,) = client.embed_stream([pa.record_batch({"text": ["a", "bad", "c"]})], "text")
    column = batch.column("embedding")
    array = embeddings_to_numpy(column)
    assert array.shape == (3, 8) and array.dtype == np.float32
    assert array.ctypes.data == column.values.buffers()[1].address + 4 * column.values.offset
    assert array.ctypes.data % 4 == 0
    sliced = embeddings_to_numpy(column.slice(1, 2))
    assert sliced.ctypes.data == array.ctypes.data + 8 * 4 and np.shares_memory(sliced, array)
    vecs = client.embed_texts(["x", "y"])
    assert not vecs.flags.owndata and not vecs.flags.writeable  # a read-only view, no copy


def test_row_errors_raise_or_return(client):
    with pytest.raises(EmbeddingRowErrors, match=r"1 of 3 rows failed: row 1: cannot embed row") as err:
        client.embed_texts(["a", "bad text", "c"])
    assert err.value.errors[1] and err.value.embeddings.shape == (3, 8)
    vecs, errors = client.embed_texts(["a", "bad text", None], errors="return")
    assert errors == [None, "cannot embed row starting with b'bad text'", "null row"]
    np.testing.assert_array_equal(vecs[0], expected_embedding("a"))
    assert not vecs[1:].any()
    with pytest.raises(ValueError, match="errors must be 'raise' or 'return'"):
        client.embed_texts(["a"], errors="ignore")


def test_embed_table_with_passthrough_and_several_batches(server):
    with EmbeddingClient(f"grpc://127.0.0.1:{server.port}", batch_rows=3) as client:
        table = pa.table({"id": list(range(10)), "text": [f"t{i}" for i in range(10)], "extra": [0.5] * 10})
        out = client.embed_table(table, kind="text", passthrough=["id"])
        assert out.column_names == ["id", "embedding", "error"]
        assert out.column("id").to_pylist() == list(range(10))
        assert out.column("embedding").num_chunks == 4  # 3 + 3 + 3 + 1 rows
        np.testing.assert_array_equal(embeddings_to_numpy(out.column("embedding")), expected(table["text"].to_pylist()))
        vecs = client.embed_texts([f"t{i}" for i in range(10)])  # several batches: concatenated
        np.testing.assert_array_equal(vecs, expected([f"t{i}" for i in range(10)]))
        with pytest.raises(KeyError, match=r"column\(s\) \['caption'\] not in the table"):
            client.embed_table(table, column="caption")


def test_embed_table_splits_by_bytes(server, fake):
    with EmbeddingClient(f"grpc://127.0.0.1:{server.port}", batch_bytes=3000) as client:
        images = [bytes([i]) * 1000 for i in range(10)]
        np.testing.assert_array_equal(client.embed_images(images), expected(images))
    assert len(fake.inputs) >= 4 and all(a.nbytes <= 3100 for a in fake.inputs)


def test_a_server_with_lower_batch_limits_is_fitted_not_failed(fake):
    limits = ServerLimits(max_batch_rows=4, max_batch_bytes=2500)
    with EmbeddingServer({"fake": fake}, ServerConfig(port=0, limits=limits)) as srv, \
            EmbeddingClient(f"grpc://127.0.0.1:{srv.port}", retries=0) as client:
        assert client.limits()["max_batch_rows"] == 4 and client.limits()["max_batch_bytes"] == 2500
        images = [bytes([i]) * (100 if i % 3 else 1200) for i in range(11)]  # uneven rows
        np.testing.assert_array_equal(client.embed_images(images), expected(images))
        assert (client.batch_rows, client.batch_bytes) == (4, 2500)
        assert fake.inputs and all(len(a) <= 4 and a.nbytes <= 2500 for a in fake.inputs)
        # one row over the byte limit cannot be split: it is that row's error, the others are embedded
        vecs, errors = client.embed_images([b"a" * 10, b"x" * 3000, b"b" * 10], errors="return")
        assert errors[0] is None and errors[2] is None
        assert "too large" in errors[1] and "2500 bytes per batch" in errors[1]
        np.testing.assert_array_equal(vecs[[0, 2]], expected([b"a" * 10, b"b" * 10]))
        assert not vecs[1].any()


def test_embed_stream_pipelines_many_batches_in_order(client, fake):
    def batches():
        for i in range(300):
            yield pa.record_batch({"text": [f"{i}-{j}" for j in range(20)], "n": [i] * 20})

    seen = 0
    for i, out in enumerate(client.embed_stream(batches(), "text", passthrough=["n"])):
        assert out.column("n").to_pylist() == [i] * 20
        np.testing.assert_array_equal(embeddings_to_numpy(out.column("embedding"))[3], expected_embedding(f"{i}-3"))
        seen += 1
    assert seen == 300 and fake.calls == 300


def test_embed_stream_stops_server_work_when_the_consumer_stops(monkeypatch):
    gate = threading.Event()
    slow = FakeModel("slow", gate=gate, free_calls=1)  # batch 1 runs; batch 2 waits in the engine for the gate
    checks = spy_cancelled(monkeypatch)
    with EmbeddingServer({"slow": slow}, ServerConfig(port=0)) as srv, \
            EmbeddingClient(f"grpc://127.0.0.1:{srv.port}") as client:
        stream = client.embed_stream((pa.record_batch({"text": ["a"]}) for _ in range(50)), "text")
        next(stream)
        wait_until(lambda: slow.entered == 2, "the server to start batch 2")
        closer = threading.Thread(target=stream.close, daemon=True)  # cancels the exchange
        try:
            closer.start()
            (cancelled,) = checks
            wait_until(cancelled, "the server to see the client's cancel")
        finally:
            gate.set()  # batch 2, in progress when the cancel came, may finish
        closer.join(timeout=60)
        assert not closer.is_alive(), "stream.close() did not return"
        wait_until(lambda: srv.stats.snapshot()["active_exchanges"] == 0, "the cancelled exchange to end")
        assert slow.entered == 2  # no batch started once the server saw the cancel (up to 48 were to come)
        assert srv.stats.snapshot()["requests_cancelled"] == 1


def test_embed_stream_input_faults(client):
    def broken():
        yield pa.record_batch({"text": ["a"]})
        raise RuntimeError("the input file is truncated")

    with pytest.raises(RuntimeError, match="the input file is truncated"):
        list(client.embed_stream(broken(), "text"))
    mixed = [pa.record_batch({"text": ["a"]}), pa.record_batch({"x": [1]})]
    with pytest.raises(ValueError, match="every batch must have the first batch's schema"):
        list(client.embed_stream(mixed, "text"))
    assert list(client.embed_stream([], "text")) == []


def test_server_errors_reach_the_client(client):
    with pytest.raises(flight.FlightServerError, match=r"unknown model 'nope'; this server serves \['fake', 'other'\]"):
        client.embed_texts(["a"], model="nope")
    with pytest.raises(flight.FlightServerError, match="column 'text' has type int64"):
        client.embed_table(pa.table({"text": [1, 2]}), kind="text")


@pytest.mark.parametrize("call,message", [
    (lambda c: c.embed_texts("hello world"),
     (r"texts: expected a sequence of strings \(a list, or an Arrow string array\), got a single str of "
      r"11 characters; wrap it in a list: embed_texts\(\[text\]\)")),
    (lambda c: c.embed_images(b"\x89PNG"), (r"images: expected .* got a single bytes of 4 bytes; "
                                            r"wrap it in a list: embed_images\(\[image\]\)")),
    (lambda c: c.embed_images(bytearray(b"abc")), r"got a single bytearray of 3 bytes"),
    (lambda c: c.embed_images(memoryview(b"abcd")), r"got a single memoryview of 4 bytes"),
    (lambda c: c.embed_tokens(b"\x65\x66"), (r"tokens: expected .* got a single bytes of 2 bytes; "
                                             r"wrap it in a list: embed_tokens\(\[ids\]\)")),
    (lambda c: c.embed_tokens("ab"), r"tokens: expected .* got a single str of 2 characters"),
    (lambda c: c.embed_texts(5), r"texts: expected a sequence of strings .* got int"),
], ids=["str", "bytes", "bytearray", "memoryview", "tokens-bytes", "tokens-str", "not-iterable"])
def test_a_bare_str_or_bytes_is_rejected_not_split_into_rows(client, fake, call, message):
    with pytest.raises(TypeError, match=message):
        call(client)
    assert fake.calls == 0 and client.stats()["requests"] == 0  # rejected before any call


@pytest.mark.parametrize("call,error,message", [
    (lambda c: c.embed_texts(["a", 1]), TypeError, r"^texts\[1\]: expected str or None, got int 1$"),
    (lambda c: c.embed_texts(["a", None, b"\xff"]), TypeError, r"^texts\[2\]: expected str or None, got bytes"),
    (lambda c: c.embed_images([b"x", bytearray(b"y"), 3]), TypeError, r"^images\[2\]: expected bytes or None, got int 3$"),
    (lambda c: c.embed_tokens([[101, 102], [101, "x"]]), TypeError, r"^tokens\[1\]\[1\]: expected int, got str 'x'$"),
    (lambda c: c.embed_tokens([101, 102]), TypeError,
     r"^tokens\[0\]: expected a sequence of int or None, got int 101; .* embed_tokens\(\[ids\]\)"),
    (lambda c: c.embed_tokens([[101, 2 ** 40]]), ValueError, r"^tokens\[0\]\[1\]: 1099511627776 is outside int32"),
    (lambda c: c.embed_images([b"x", "cat.jpg"]), TypeError, r"^images\[1\]: expected the bytes .*\.read_bytes\(\)$"),
    # pyarrow alone would take valid UTF-8 bytes as a text and a whole float as an id
    (lambda c: c.embed_texts(["a", b"utf-8 bytes"]), TypeError, r"^texts\[1\]: expected str or None, got bytes"),
    (lambda c: c.embed_tokens([[101, 102], [101, 2.0]]), TypeError, r"^tokens\[1\]\[1\]: expected int, got float 2.0$"),
    (lambda c: c.embed_tokens([[101], np.array([101.0, 102.0])]), TypeError, r"^tokens\[1\]\[0\]: expected int, got float"),
], ids=["text-int", "text-bad-utf8", "image-int", "token-str", "tokens-flat", "token-overflow", "image-path",
        "text-bytes", "token-float", "token-float-array"])
def test_a_row_of_the_wrong_type_is_named(client, fake, call, error, message):
    with pytest.raises(error, match=message) as err:
        call(client)
    assert not isinstance(err.value, pa.ArrowException)  # ours, not pyarrow's bare conversion error
    assert fake.calls == 0


def test_embed_stream_rejects_a_single_batch_or_table(server, fake):
    batch = pa.record_batch({"text": ["a"]})
    with EmbeddingClient(f"grpc://127.0.0.1:{server.port}", retries=0, timeout_s=10) as client:
        with pytest.raises(TypeError, match=r"got a single RecordBatch; wrap it in a list: embed_stream\(\[batch\]"):
            list(client.embed_stream(batch, "text"))
        with pytest.raises(TypeError, match=r"got a single Table; .*embed_table"):
            list(client.embed_stream(pa.Table.from_batches([batch]), "text"))
        with pytest.raises(TypeError, match=r"batches\[0\]: expected a pyarrow RecordBatch, got dict"):
            list(client.embed_stream([{"text": ["a"]}], "text"))
        with pytest.raises(TypeError, match=r"batches\[1\]: expected a pyarrow RecordBatch, got list"):
            list(client.embed_stream([batch, ["b"]], "text"))
    assert fake.calls <= 1


def test_passthrough_must_be_a_list_not_a_str(client):
    table = pa.table({"text": ["a"], "id": [1]})
    with pytest.raises(ValueError, match=r"\"passthrough\" must be a list of column names; got 'id'"):
        client.embed_table(table, kind="text", passthrough="id")


def test_duplicate_input_columns_are_a_clear_request_error(client):
    batch = pa.RecordBatch.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"])
    with pytest.raises(flight.FlightServerError, match=r"the input schema has duplicate column names \['text'\]") as err:
        list(client.embed_stream([batch], "text"))
    assert not isinstance(err.value, flight.FlightInternalError)
    assert protocol.error_code(err.value) == protocol.CODE_INVALID


def test_actions(client):
    assert client.health()["status"] == "ok"
    ready = client.ready()
    assert ready["ready"] is False and ready["models"] == ["fake", "other"] and ready["reason"] == "warming up"
    models = client.models()
    assert [m["name"] for m in models] == ["fake", "other"] and models[0]["dimension"] == 8
    client.embed_texts(["a", "b"])
    stats = client.stats()
    assert stats["rows"] == 2 and stats["requests"] == 1


def test_retries_with_backoff_then_gives_up():
    with EmbeddingClient("grpc://127.0.0.1:1", retries=2, backoff_s=0.05) as client:
        t0 = time.perf_counter()
        with pytest.raises(flight.FlightUnavailableError):
            client.health()
        assert time.perf_counter() - t0 >= 0.075  # 0.05 + 0.1 of backoff, each jittered to 50-100 %
        with pytest.raises(flight.FlightUnavailableError):
            client.embed_texts(["a"])


@contextlib.contextmanager
def one_slot_held(retries: int):
    """A server with one exchange slot, held by another client's open stream until the server has refused
    someone as busy; yields (server, client). Events, not timing, order the two clients."""
    limits = ServerLimits(max_concurrent_exchanges=1)
    with EmbeddingServer({"fake": FakeModel("fake")}, ServerConfig(port=0, limits=limits)) as srv:
        location = f"grpc://127.0.0.1:{srv.port}"
        release = threading.Event()

        def batches():
            yield pa.record_batch({"text": ["a"]})
            release.wait(timeout=60)  # the stream stays open, holding the slot, until then

        def release_after_a_refusal():
            try:
                wait_until(lambda: srv.stats.snapshot()["rejected_busy"] > 0, "the server to refuse a client")
            finally:
                release.set()  # on a timeout too: the second client then fails its own assertions

        with EmbeddingClient(location) as first, \
                EmbeddingClient(location, retries=retries, backoff_s=0.1) as second:
            holder = threading.Thread(target=lambda: list(first.embed_stream(batches(), "text")), daemon=True)
            holder.start()
            wait_until(lambda: srv.stats.snapshot()["active_exchanges"] == 1, "the first client to hold the slot")
            releaser = threading.Thread(target=release_after_a_refusal, daemon=True)
            releaser.start()
            try:
                yield srv, second
            finally:
                release.set()
                holder.join()
                releaser.join()


def test_retry_succeeds_when_a_busy_server_frees_up():
    with one_slot_held(retries=5) as (srv, client):
        vecs = client.embed_texts(["b"])  # busy at first, then retried
    assert vecs.shape == (1, 8)
    assert srv.stats.snapshot()["rejected_busy"] >= 1


def test_a_stream_rejected_as_busy_is_sent_again_whole():
    """The server says busy at a stream's first batch, after the writer may have taken more from the input
    iterator: the retry sends every batch again, in order."""
    with one_slot_held(retries=8) as (srv, client):
        batches = (pa.record_batch({"text": [f"b{i}", f"c{i}"]}) for i in range(5))
        out = list(client.embed_stream(batches, "text"))
    assert srv.stats.snapshot()["rejected_busy"] >= 1
    texts = [t for i in range(5) for t in (f"b{i}", f"c{i}")]
    np.testing.assert_array_equal(np.concatenate([embeddings_to_numpy(b.column("embedding")) for b in out]),
                                  expected(texts))


def test_token_and_tls(fake, tmp_path, caplog):
    cert, key = make_self_signed_cert(tmp_path)
    config = ServerConfig(port=0, auth_token="tok-123", tls_cert=cert, tls_key=key)
    with EmbeddingServer({"fake": fake}, config) as srv:
        location = f"grpc+tls://localhost:{srv.port}"
        with EmbeddingClient(location, token="tok-123", tls_root_certs=cert) as client:
            np.testing.assert_array_equal(client.embed_texts(["a"]), expected(["a"]))
        with EmbeddingClient(location, token="nope", tls_root_certs=cert.read_bytes(), retries=0) as client:
            with pytest.raises(flight.FlightUnauthenticatedError):
                client.embed_texts(["a"])
        with EmbeddingClient(location, tls_root_certs=str(cert), retries=0) as client:
            with pytest.raises(flight.FlightUnauthenticatedError):
                client.health()
        assert srv.stats.snapshot()["rejected_auth"] == 2  # counted (and in metrics: rejected_total{reason="auth"})
        # the wrong CA: said at once (no retries: they cannot help), with what to check
        other_ca, _ = make_self_signed_cert(tmp_path, "other")
        caplog.set_level(logging.WARNING, logger="flight_client.client")
        with EmbeddingClient(location, token="tok-123", tls_root_certs=other_ca, retries=5, backoff_s=1.0) as client:
            t0 = time.perf_counter()
            with pytest.raises(flight.FlightUnavailableError, match="TLS handshake with the server failed: check "
                                                                    "tls_root_certs"):
                client.health()
            # no retry: none was logged, and 5 of them would have slept >= 15.5 s (1+2+4+8+16 s, jittered to 50 %)
            assert [r.getMessage() for r in caplog.records if "retry" in r.getMessage()] == []
            assert time.perf_counter() - t0 < 10
        with EmbeddingClient(f"grpc://localhost:{srv.port}", retries=0) as client:  # plaintext to a TLS server
            with pytest.raises(flight.FlightUnavailableError, match="if the server uses TLS, connect with grpc"):
                client.health()


def test_many_calls_failed_by_the_server_never_abort_the_process():
    """A server error used to meet the writer thread's done_writing now and then, and pyarrow aborted the whole
    process (gRPC "TOO_MANY_OPERATIONS"; about once in a few thousand failed calls). In a subprocess, so that an
    abort fails this test instead of killing the test run."""
    code = """
import sys
sys.path.insert(0, {tests!r})
import pyarrow as pa, pyarrow.flight as flight
from flight_fakes import FakeModel
from flight_server.config import ServerConfig
from flight_server.servicer import EmbeddingServer
from flight_client import EmbeddingClient
with EmbeddingServer({{"fake": FakeModel("fake")}}, ServerConfig(port=0)) as srv:
    client = EmbeddingClient(f"grpc://127.0.0.1:{{srv.port}}", retries=0)
    failed = 0
    for _ in range(2500):
        try:
            client.embed_table(pa.table({{"text": [1, 2]}}), kind="text")  # refused at its first batch
        except flight.FlightServerError:
            failed += 1
    print("failed calls:", failed)
""".format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "failed calls: 2500" in done.stdout
