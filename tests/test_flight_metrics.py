"""Prometheus metrics on ``--metrics-port``: scraped over HTTP on localhost after real exchanges."""
from __future__ import annotations

import json
import urllib.request

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flight_fakes import FakeModel
from flight_server.config import ServerConfig
from flight_server.servicer import EmbeddingServer


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode("utf-8")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def exchange(client, command: dict, batches: list[pa.RecordBatch]) -> list[pa.RecordBatch]:
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_command(json.dumps(command).encode()))
    writer.begin(batches[0].schema)
    for batch in batches:
        writer.write_batch(batch)
    writer.done_writing()
    out = [chunk.data for chunk in reader]
    writer.close()
    return out


def test_counters_move_after_requests_and_endpoint_stops_with_the_server():
    fake = FakeModel("fake")
    with EmbeddingServer({"fake": fake}, ServerConfig(port=0, metrics_port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        port = server.metrics_port
        before = scrape(port)
        assert before[("arrowengine_active_exchanges", ())] == 0
        assert ("arrowengine_requests_total", (("input", "text"), ("model", "fake"), ("outcome", "ok"),
                                               ("protocol", "flight"))) not in before
        exchange(client, {"input": "text"}, [pa.record_batch({"text": ["a", "bad", "c"]}),
                                             pa.record_batch({"text": ["d"]})])
        with pytest.raises(flight.FlightServerError):
            exchange(client, {"input": "text", "model": "nope"}, [pa.record_batch({"text": ["a"]})])
        after = scrape(port)
    labels = (("input", "text"), ("model", "fake"))
    flight_ = (("protocol", "flight"),)
    assert after[("arrowengine_requests_total", labels + (("outcome", "ok"),) + flight_)] == 1
    assert after[("arrowengine_requests_total",
                  (("input", "-"), ("model", "-"), ("outcome", "failed")) + flight_)] == 1
    assert after[("arrowengine_rows_total", labels + flight_)] == 4
    assert after[("arrowengine_row_errors_total", labels + flight_)] == 1
    assert after[("arrowengine_request_seconds_count", labels + flight_)] == 1
    with pytest.raises(OSError):
        scrape(port)  # the endpoint went away with the server


def test_scheduler_batches_and_queue_depth_are_exported(minilm_model_dir):
    import engine
    from engine.scheduler import Scheduler

    model = engine.load_model(minilm_model_dir)
    with Scheduler(model) as sched, \
            EmbeddingServer({"minilm": sched}, ServerConfig(port=0, metrics_port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        exchange(client, {"input": "text"}, [pa.record_batch({"text": ["one", "two", "three"]})])
        got = scrape(server.metrics_port)
    assert got[("arrowengine_batch_rows_count", (("model", "minilm"), ("queue", "text")))] == 1
    assert got[("arrowengine_batch_rows_sum", (("model", "minilm"), ("queue", "text")))] == 3
    assert got[("arrowengine_batch_seconds_count", (("model", "minilm"), ("queue", "text")))] == 1
    assert got[("arrowengine_queue_rows", (("model", "minilm"), ("queue", "text")))] == 0


def test_https_metrics_answer_while_a_connection_stays_silent(tmp_path):
    """With TLS, a client that connects and never shakes hands must not block other scrapes."""
    import http.client
    import socket
    import ssl

    from flight_fakes import make_self_signed_cert

    cert, key = make_self_signed_cert(tmp_path)
    config = ServerConfig(port=0, metrics_port=0, tls_cert=cert, tls_key=key)
    with EmbeddingServer({"fake": FakeModel("fake")}, config) as server:
        silent = socket.create_connection(("127.0.0.1", server.metrics_port))
        try:
            context = ssl.create_default_context(cafile=str(cert))
            with urllib.request.urlopen(f"https://localhost:{server.metrics_port}/metrics", timeout=60,
                                        context=context) as resp:
                assert resp.status == 200 and b"arrowengine_active_exchanges" in resp.read()
            # answered while the server still waits on the silent connection's handshake (it drops a silent
            # connection only after 10 s): a server that shook hands in its accept loop would have answered us
            # only after dropping it
            silent.setblocking(False)
            with pytest.raises(BlockingIOError):
                silent.recv(1)  # b"" (closed by the server) or data would mean it is no longer waited on
            silent.setblocking(True)
            with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):  # no plain HTTP
                urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5)
        finally:
            silent.close()
