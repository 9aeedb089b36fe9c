"""What a hostile or careless client costs the server: bounded, and told clearly.

Stalled exchanges are cancelled and give their slot back; commands and echoed input are bounded; repeated
warnings are rate-limited; the bearer check is case-insensitive and costs the same for any token; on SIGTERM
a streaming client hears "resend" and the process exits within the grace period. Each test fails on a server
without the matching limit. Model-folder and image-decode limits are tested beside their code
(test_model_folder_safety.py, test_image_processor.py); the text window in test_tokenizer.py.
"""
from __future__ import annotations

import json
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

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_fakes import FakeModel, wait_until
from flight_server import auth, protocol
from flight_server.config import ServerConfig, ServerLimits
from flight_server.servicer import EmbeddingServer

ROOT = Path(__file__).resolve().parents[1]


def cmd(**doc) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(doc).encode())


def action(client, name: str) -> dict:
    return json.loads(list(client.do_action(name))[0].body.to_pybytes())


def wait_for(predicate, timeout: float = 60.0) -> None:
    """Poll ``predicate`` until it holds (generous bound: a loaded machine may be slow, never wrong)."""
    code = predicate.__code__
    wait_until(predicate, f"the condition at {Path(code.co_filename).name}:{code.co_firstlineno}", timeout)


def one_exchange(client, descriptor, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
    writer, reader = client.do_exchange(descriptor)
    writer.begin(batch.schema)
    writer.write_batch(batch)
    writer.done_writing()
    try:
        return [chunk.data for chunk in reader]
    finally:
        writer.close()


# ---- stalled clients ------------------------------------------------------------------------

def test_an_exchange_that_stops_reading_and_writing_loses_its_slot_and_hears_why():
    limits = ServerLimits(max_concurrent_exchanges=1, idle_timeout_s=0.5)
    with EmbeddingServer({"fake": FakeModel("fake")}, ServerConfig(port=0, limits=limits)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        server.warm_up()
        batch = pa.record_batch({"text": ["a", "b"]})
        writer, reader = client.do_exchange(cmd(input="text"))
        writer.begin(batch.schema)
        writer.write_batch(batch)  # then nothing: no read, no more batches, no close
        wait_for(lambda: server.stats.snapshot()["active_exchanges"] == 1)
        assert action(client, "ready")["reason"] == "saturated: 1 of 1 exchange slots in use"
        wait_for(lambda: server.stats.snapshot()["idle_cancelled"] == 1)
        stats = server.stats.snapshot()
        assert stats["active_exchanges"] == 0 and stats["stalled_exchanges"] == 1
        assert action(client, "ready")["ready"] is True
        (out,) = one_exchange(client, cmd(input="text"), pa.record_batch({"text": ["c"]}))  # the slot is free
        assert out.column("error").to_pylist() == [None]
        writer.done_writing()  # the stalled client wakes up: it gets what was written, then the reason
        with pytest.raises(flight.FlightTimedOutError, match=r"no progress for 0.5 s") as err:
            for _ in reader:
                pass
        assert protocol.error_code(err.value) == protocol.CODE_IDLE
        wait_for(lambda: server.stats.snapshot()["stalled_exchanges"] == 0)
        assert server.stats.snapshot()["requests_failed"] == 0


def test_an_exchange_blocked_writing_to_a_client_that_never_reads_is_cancelled():
    """Big results to a client that sends and never reads: the server's write blocks on flow control."""
    limits = ServerLimits(max_concurrent_exchanges=1, idle_timeout_s=0.5)
    with EmbeddingServer({"fake": FakeModel("fake", dim=4096)}, ServerConfig(port=0, limits=limits)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        batch = pa.record_batch({"text": [f"row {i}" for i in range(512)]})  # 8 MiB of embeddings per result
        writer, reader = client.do_exchange(cmd(input="text"))
        writer.begin(batch.schema)

        def send():
            try:
                for _ in range(64):
                    writer.write_batch(batch)
            except pa.ArrowException:
                pass  # the call ended under it

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        wait_for(lambda: server.stats.snapshot()["idle_cancelled"] == 1)
        assert server.stats.snapshot()["active_exchanges"] == 0
        (out,) = one_exchange(client, cmd(input="text"), pa.record_batch({"text": ["free"]}))
        assert out.num_rows == 1
        with pytest.raises(flight.FlightTimedOutError, match="no progress"):
            for _ in reader:  # reading at last unblocks the server's writer; then the call ends with the reason
                pass
        sender.join(timeout=30)
        wait_for(lambda: server.stats.snapshot()["stalled_exchanges"] == 0)


def test_a_slow_engine_is_not_an_idle_client():
    """Waiting for the engine is progress: only a wait on the client counts toward the idle limit."""
    limits = ServerLimits(idle_timeout_s=0.3)
    slow = FakeModel("slow", delay_s=0.8)
    with EmbeddingServer({"slow": slow}, ServerConfig(port=0, limits=limits)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        writer, reader = client.do_exchange(cmd(input="text"))
        batch = pa.record_batch({"text": ["a"]})
        writer.begin(batch.schema)
        for _ in range(2):  # lockstep: each batch waits for its result, 0.8 s in the engine
            writer.write_batch(batch)
            assert reader.read_chunk().data.num_rows == 1
        writer.done_writing()
        assert list(reader) == []
        writer.close()
        assert server.stats.snapshot()["idle_cancelled"] == 0


def test_idle_cancellations_are_in_the_metrics():
    import urllib.request

    limits = ServerLimits(idle_timeout_s=0.3)
    with EmbeddingServer({"fake": FakeModel("fake")}, ServerConfig(port=0, limits=limits, metrics_port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        writer, reader = client.do_exchange(cmd(input="text"))
        writer.begin(pa.schema([("text", pa.string())]))
        writer.write_batch(pa.record_batch({"text": ["a"]}))
        wait_for(lambda: server.stats.snapshot()["idle_cancelled"] == 1)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
                return resp.read().decode()

        # the gauge reads the server's own count of stalled exchanges at scrape time (1 while the cancelled call
        # still waits on its client, 0 once it has ended; how soon it ends depends on pyarrow's reader)
        before = server.stats.snapshot()["stalled_exchanges"]
        text = scrape()
        if server.stats.snapshot()["stalled_exchanges"] == before:
            assert f"arrowengine_stalled_exchanges {float(before)}" in text
        writer.done_writing()
        with pytest.raises(flight.FlightTimedOutError):
            reader.read_all()
        wait_for(lambda: 'outcome="idle",protocol="flight"} 1.0' in scrape())
        assert "arrowengine_stalled_exchanges 0.0" in scrape()


# ---- commands and echoed input --------------------------------------------------------------

def test_a_command_over_the_limit_is_refused_before_it_is_parsed(monkeypatch):
    raw = json.dumps({"input": "text", "passthrough": ["c"] * 200_000}).encode()
    parsed = []
    with monkeypatch.context() as patch:
        patch.setattr(protocol.json, "loads", lambda text: parsed.append(text))
        with pytest.raises(protocol.LimitExceededError, match=f"the command is {len(raw)} bytes; the limit is 65536"):
            protocol.parse_command(raw)
    assert parsed == []
    with EmbeddingServer({"fake": FakeModel("fake")}, ServerConfig(port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        big = {"input": "text", "passthrough": [f"c{i}" for i in range(100_000)]}
        with pytest.raises(flight.FlightServerError, match="the limit is 65536 bytes") as err:
            one_exchange(client, cmd(**big), pa.record_batch({"text": ["a"]}))
        assert protocol.error_code(err.value) == protocol.CODE_LIMIT


def test_deeply_nested_json_is_a_protocol_error():
    with pytest.raises(protocol.ProtocolError, match="nests JSON too deeply"):
        protocol.parse_command(b"[" * 60_000)


def test_errors_and_logs_quote_only_a_prefix_of_what_the_client_sent(caplog):
    caplog.set_level(logging.INFO)
    huge = "x" * 10_000_000
    with EmbeddingServer({"fake": FakeModel("fake")}, ServerConfig(port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        # a 10 MB column name: the client gets the message (not RESOURCE_EXHAUSTED from oversized trailers)
        with pytest.raises(flight.FlightServerError, match=r"the columns that came are \['x{80}'\.\.\. "
                                                           r"\(10000000 characters\)\]") as err:
            one_exchange(client, cmd(input="text"), pa.record_batch({huge: ["a"]}))
        assert len(str(err.value)) < 2 * protocol.MAX_ERROR_CHARS  # pyarrow repeats it once in its detail
        long_column = "y" * 60_000  # inside the command limit, echoed in the log line and the error
        with pytest.raises(flight.FlightServerError, match=r"input column 'y{80}'\.\.\. \(60000 characters\)"):
            one_exchange(client, cmd(input="text", column=long_column), pa.record_batch({"text": ["a"]}))
        with pytest.raises(flight.FlightServerError, match=r"unknown model 'z{80}'\.\.\. \(50000 characters\)"):
            one_exchange(client, cmd(input="text", model="z" * 50_000), pa.record_batch({"text": ["a"]}))
        with pytest.raises(flight.FlightServerError, match=r"unknown action 'w{80}'\.\.\. \(100000 characters\)"):
            action(client, "w" * 100_000)
    assert caplog.records and max(len(r.getMessage()) for r in caplog.records) < 4 * protocol.MAX_ERROR_CHARS


def test_quote_bounds_strings_lists_and_anything_else():
    assert protocol.quote("abc") == "'abc'"
    assert protocol.quote("a" * 100) == f"{'a' * 80!r}... (100 characters)"
    assert protocol.quote(b"\x00" * 90, 4) == r"b'\x00\x00\x00\x00'... (90 bytes)"
    listed = protocol.quote([str(i) for i in range(50)])
    assert listed.startswith("['0', '1'") and listed.endswith("'19', ... (30 more)]")
    assert len(protocol.quote({"k": "v" * 500})) < 2 * protocol.QUOTE_CHARS
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert protocol.quote(deep).startswith("[[[[")  # nesting is cut, never a RecursionError
    assert len(protocol.cut_message("m" * 10_000)) < protocol.MAX_ERROR_CHARS + 50


def test_repeated_warnings_are_rate_limited(monkeypatch, caplog):
    from engine import ratelog

    clock = [100.0]
    monkeypatch.setattr(ratelog.time, "monotonic", lambda: clock[0])
    log = ratelog.RateLimitedLog(logging.getLogger("test.ratelog"), period_s=10)
    with caplog.at_level(logging.WARNING, logger="test.ratelog"):
        written = [log.log(logging.WARNING, "auth", "rejected %s", i) for i in range(5)]
        clock[0] += 10.5
        written.append(log.log(logging.WARNING, "auth", "rejected %s", 5))
        written.append(log.log(logging.WARNING, "other", "another kind"))
    assert written == [True, False, False, False, False, True, True]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["rejected 0", "rejected 5 (4 more like it in the last 10 s were not logged)", "another kind"]


# ---- authentication ---------------------------------------------------------------------------

def test_bearer_scheme_is_case_insensitive_and_failures_are_logged_at_a_bounded_rate(caplog):
    token = "s3cret-t0ken"
    with EmbeddingServer({"fake": FakeModel("fake")}, ServerConfig(port=0, auth_token=token)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            options = flight.FlightCallOptions(headers=[(b"authorization", f"{scheme} {token}".encode())])
            assert json.loads(list(client.do_action("health", options))[0].body.to_pybytes())["status"] == "ok"
        wrong = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer nope")])
        with caplog.at_level(logging.WARNING, logger="flight_server.auth"):
            for _ in range(30):
                with pytest.raises(flight.FlightUnauthenticatedError):
                    list(client.do_action("health", wrong))
        for bad in (f"Basic {token}", token, f"Bearer{token}"):
            options = flight.FlightCallOptions(headers=[(b"authorization", bad.encode())])
            with pytest.raises(flight.FlightUnauthenticatedError):
                list(client.do_action("health", options))
        assert server.stats.snapshot()["rejected_auth"] == 33
    rejected = [r for r in caplog.records if "rejected a" in r.getMessage()]
    assert 1 <= len(rejected) <= 2  # 30 failures within seconds: one line (two if a period boundary passed)


def test_the_token_check_compares_fixed_length_digests_whatever_was_sent(monkeypatch):
    compared = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    factory = auth.BearerTokenMiddlewareFactory("the-right-token")

    class Info:
        method = flight.FlightMethod.DO_ACTION

    assert factory.start_call(Info(), {"authorization": [b"Bearer the-right-token"]}) is None
    for sent in (b"Bearer t", b"Bearer the-right-tokem", b"Bearer " + b"x" * 10_000, b"bearer the-right-token!"):
        with pytest.raises(flight.FlightUnauthenticatedError):
            factory.start_call(Info(), {"authorization": [sent]})
    assert compared == [(32, 32)] * 5  # the same work for a right token and any wrong one


# ---- shutdown ---------------------------------------------------------------------------------

def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)


def _wait_for_line(lines: queue.Queue, pattern: str, timeout: float = 120) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            match = re.search(pattern, lines.get(timeout=0.5))
        except queue.Empty:
            continue
        if match:
            return match
    raise AssertionError(f"the server printed no line matching {pattern!r} within {timeout} s")


@pytest.mark.slow  # a server process
def test_sigterm_tells_a_streaming_client_to_resend_and_exits_within_the_grace_period(minilm_model_dir):
    grace = 6.0
    cmdline = [sys.executable, "-m", "flight_server.serve", f"minilm={minilm_model_dir}", "--port", "0",
               "--shutdown-grace-s", str(grace)]
    proc = subprocess.Popen(cmdline, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True).start()
    try:
        port = int(_wait_for_line(lines, r"listening on grpc\+tcp://127\.0\.0\.1:(\d+) ").group(1))
        _wait_for_line(lines, r"\bready$")
        result: dict = {}
        streaming = threading.Event()

        def stream():
            with flight.connect(f"grpc://127.0.0.1:{port}") as client:
                writer, reader = client.do_exchange(cmd(input="text"))
                batch = pa.record_batch({"text": [f"sentence number {i} about nothing" for i in range(16)]})
                writer.begin(batch.schema)
                try:
                    while True:  # batch after batch, lockstep, until the server says stop
                        writer.write_batch(batch)
                        reader.read_chunk()
                        streaming.set()
                except flight.FlightError as exc:
                    result["error"] = exc
                    result["at"] = time.monotonic()
                finally:
                    try:
                        writer.close()
                    except pa.ArrowException:
                        pass

        client_thread = threading.Thread(target=stream, daemon=True)
        client_thread.start()
        assert streaming.wait(60)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=grace + 30) == 0
        exited = time.monotonic() - sent
        client_thread.join(timeout=30)
        assert isinstance(result.get("error"), flight.FlightUnavailableError)
        assert "server is shutting down; resend the remaining batches" in str(result["error"])
        assert result["at"] - sent < grace
        # The shutdown itself ends within the grace period ("stopped"; a call still open at its end would log
        # "exiting without waiting" and force the exit). The interpreter's own teardown after it is not bounded
        # here beyond a loaded machine's worst case.
        _wait_for_line(lines, r"\bstopped$", timeout=5)
        tail = []
        while not lines.empty():
            tail.append(lines.get())
        assert not any("exiting without waiting" in line for line in tail), tail
        assert exited < 5 * grace, f"the process took {exited:.1f} s to exit; the grace period is {grace} s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_drain_stops_streaming_exchanges_before_the_grace_period_ends():
    fake = FakeModel("fake", delay_s=0.01)
    with EmbeddingServer({"fake": fake}, ServerConfig(port=0)) as server, \
            flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        out: dict = {}
        started = threading.Event()

        def stream():
            writer, reader = client.do_exchange(cmd(input="text"))
            batch = pa.record_batch({"text": ["a"]})
            writer.begin(batch.schema)
            try:
                while True:
                    writer.write_batch(batch)
                    reader.read_chunk()
                    started.set()
            except flight.FlightError as exc:
                out["error"], out["at"] = exc, time.monotonic()
            finally:
                try:
                    writer.close()
                except pa.ArrowException:
                    pass

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        assert started.wait(30)
        t0 = time.monotonic()
        assert server.drain(grace_s=4.0) is False
        thread.join(timeout=30)
        assert isinstance(out["error"], flight.FlightUnavailableError)
        assert 1.0 <= out["at"] - t0 < 4.0  # ran on until 3 s before the end (SHUTDOWN_MARGIN_S), then told
