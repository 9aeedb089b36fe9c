"""Test helpers for the Flight tests: a small deterministic fake model (no torch).

``FakeModel`` follows the engine Model API (``info``, ``embed_images / embed_texts /
embed_tokens(array, normalize=) -> EmbedResult``). Each row's embedding is a vector seeded
by the SHA-256 of the row's bytes, so results are checkable from the input alone. Rows
that are null or start with ``b"bad"`` ("bad" for text) are row errors (zeros).

Ordering helpers, so that no test sleeps to let something happen: ``FakeModel(gate=Event, free_calls=N)``
blocks every call after the first N until the test opens the gate (``entered`` counts calls that started);
``wait_until`` polls a condition with a generous bound and a message; ``spy_cancelled`` hands the test the
server's own "is this exchange cancelled?" check. ``exchange`` is a raw do_exchange (write every batch, then read
every result).
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

GATE_TIMEOUT_S = 120.0  # a gated call gives up (fails its batch) if the test never opens the gate
WAIT_TIMEOUT_S = 60.0   # wait_until's default bound: generous, a loaded machine is slow, never wrong


def wait_until(predicate, what: str, timeout: float = WAIT_TIMEOUT_S) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def spy_cancelled(monkeypatch) -> list:
    """Record each exchange's ``cancelled()`` check (the server's own view: a client cancel that reached it,
    or the exchange told to stop), in the order the exchanges start their streams."""
    from flight_server import exchange

    seen: list = []
    original = exchange.submitter

    def submitter(model, command, cancelled):
        seen.append(cancelled)
        return original(model, command, cancelled)

    monkeypatch.setattr(exchange, "submitter", submitter)
    return seen


@dataclass(frozen=True)
class FakeInfo:
    name: str = "fake"
    architecture: str = "FakeModel"
    kind: str = "clip"
    modalities: tuple[str, ...] = ("text", "image")
    dim: int = 8
    precision: str = "fp32"
    device: str = "cpu"
    max_tokens: int = 16


@dataclass
class FakeResult:
    embeddings: np.ndarray
    errors: list


def row_bytes(value) -> bytes | None:
    """The bytes a fake embedding is seeded from (None for a null row)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return np.asarray(value, dtype=np.int64).tobytes()  # token ids


def expected_embedding(value, dim: int = 8, normalize: bool = True) -> np.ndarray:
    """What FakeModel returns for one good row."""
    seed = int.from_bytes(hashlib.sha256(row_bytes(value)).digest()[:8], "little")
    vec = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    if normalize:
        vec /= np.linalg.norm(vec)
    return vec


class FakeModel:
    """Deterministic fake engine model that records what it was handed."""

    def __init__(self, name: str = "fake", dim: int = 8, modalities=("text", "image"),
                 delay_s: float = 0.0, gate: threading.Event | None = None, free_calls: int = 0) -> None:
        self.info = FakeInfo(name=name, dim=dim, modalities=tuple(modalities))
        self.delay_s = delay_s
        self.gate = gate              # calls after the first ``free_calls`` wait until it is set
        self.free_calls = free_calls
        self.entered = 0              # calls that started (``calls``: calls that returned)
        self.calls = 0
        self.inputs: list = []                 # the objects handed to embed_* (Arrow arrays)
        self.result_addresses: list[int] = []  # embeddings.ctypes.data of each result
        self._lock = threading.Lock()

    def embed_texts(self, texts, normalize: bool = True) -> FakeResult:
        return self._embed(texts, normalize)

    def embed_images(self, images, normalize: bool = True) -> FakeResult:
        return self._embed(images, normalize)

    def embed_tokens(self, tokens, normalize: bool = True) -> FakeResult:
        return self._embed(tokens, normalize)

    def _embed(self, rows, normalize: bool) -> FakeResult:
        with self._lock:
            self.entered += 1
            index = self.entered
        if self.gate is not None and index > self.free_calls and not self.gate.wait(GATE_TIMEOUT_S):
            raise TimeoutError(f"FakeModel call {index}: the test never opened the gate")
        if self.delay_s:
            time.sleep(self.delay_s)
        values = rows.to_pylist() if isinstance(rows, pa.Array) else list(rows)
        out = np.zeros((len(values), self.info.dim), dtype=np.float32)
        errors: list = []
        for i, value in enumerate(values):
            raw = row_bytes(value)
            if raw is None:
                errors.append("null row")
            elif raw.startswith(b"bad"):
                errors.append(f"cannot embed row starting with {raw[:8]!r}")
            else:
                out[i] = expected_embedding(value, self.info.dim, normalize)
                errors.append(None)
        with self._lock:
            self.calls += 1
            self.inputs.append(rows)
            self.result_addresses.append(out.ctypes.data)
        return FakeResult(out, errors)


def make_self_signed_cert(directory, name: str = "server") -> tuple:
    """A self-signed certificate for localhost/127.0.0.1 made with the openssl CLI.

    Returns (cert_path, key_path). Each call makes a new key, i.e. a different CA.
    """
    import subprocess
    from pathlib import Path

    directory = Path(directory)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert, key



class FakeChunk:
    """What ``reader.read_chunk()`` returns: the batch, no metadata."""

    def __init__(self, data: pa.RecordBatch) -> None:
        self.data = data
        self.app_metadata = None


class FakeExchangeCall:
    """Both ends of one client do_exchange with a scripted server between them, no gRPC.

    The server answers each batch the client writes with ``{"n": [rows]}``, in order, and ends the stream once
    the client half-closed and every batch is answered. ``fail_after=k``: after k answers the server fails the
    call (``read_chunk`` raises FlightServerError, later writes fail). ``end_after=k``: after k answers the
    server ends the stream without an error. ``write_error_at=i``: writing batch i (0-based) raises
    FlightUnavailableError and the server ends the stream after answering what it got. ``hold_from=i``: batches
    from i on are answered only after ``release()``. ``cancel()`` makes every later read and write raise
    FlightCancelledError. ``events`` records what happened, in order.
    """

    def __init__(self, fail_after: int | None = None, end_after: int | None = None,
                 write_error_at: int | None = None, hold_from: int | None = None) -> None:
        import pyarrow.flight as flight

        self._flight = flight
        self.fail_after, self.end_after, self.write_error_at = fail_after, end_after, write_error_at
        self.hold_from = hold_from
        self.events: list[tuple] = []
        self.written: list[pa.RecordBatch] = []
        self.answered = 0
        self.done_writing_calls: list[str] = []  # the thread of each done_writing call
        self.cancelled = self.closed = self.broken = False
        self._cv = threading.Condition()
        self.writer = _FakeWriter(self)
        self.reader = _FakeReader(self)

    def ends(self):
        """(writer, reader), as FlightClient.do_exchange returns them."""
        return self.writer, self.reader

    def release(self) -> None:
        """Let the server answer the batches ``hold_from`` held back."""
        with self._cv:
            self.hold_from = None
            self._cv.notify_all()

    def _record(self, *event) -> None:
        with self._cv:
            self.events.append(event)
            self._cv.notify_all()

    def _read(self) -> FakeChunk:
        flight = self._flight
        with self._cv:
            deadline = time.monotonic() + WAIT_TIMEOUT_S
            while True:
                if self.cancelled:
                    raise flight.FlightCancelledError("the call was cancelled")
                if self.fail_after is not None and self.answered >= self.fail_after:
                    self.broken = True
                    raise flight.FlightServerError("the server failed the call")
                if self.end_after is not None and self.answered >= self.end_after:
                    raise StopIteration
                held = self.hold_from is not None and self.answered >= self.hold_from
                if self.answered < len(self.written) and not held:
                    batch = self.written[self.answered]
                    self.answered += 1
                    self.events.append(("result", self.answered - 1))
                    return FakeChunk(pa.record_batch({"n": [batch.num_rows]}))
                if (self.done_writing_calls or self.broken) and self.answered >= len(self.written):
                    raise StopIteration
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("the fake server waited for a batch or the half-close that never came")
                self._cv.wait(left)

    def _write(self, batch: pa.RecordBatch) -> None:
        flight = self._flight
        with self._cv:
            if self.cancelled:
                raise flight.FlightCancelledError("the call was cancelled")
            if self.broken:
                raise flight.FlightServerError("the server failed the call")
            if self.write_error_at is not None and len(self.written) == self.write_error_at:
                self.broken = True
                self._cv.notify_all()
                raise flight.FlightUnavailableError("connection lost while writing")
            self.written.append(batch)
            self.events.append(("write", len(self.written) - 1))
            self._cv.notify_all()


class _FakeWriter:
    def __init__(self, call: FakeExchangeCall) -> None:
        self._call = call

    def begin(self, schema: pa.Schema) -> None:
        self._call._record("begin")

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self._call._write(batch)

    def done_writing(self) -> None:
        self._call.done_writing_calls.append(threading.current_thread().name)
        self._call._record("done_writing")

    def close(self) -> None:
        self._call.closed = True
        self._call._record("close")


class _FakeReader:
    def __init__(self, call: FakeExchangeCall) -> None:
        self._call = call

    def read_chunk(self) -> FakeChunk:
        return self._call._read()

    def cancel(self) -> None:
        with self._call._cv:
            self._call.cancelled = True
            self._call.events.append(("cancel",))
            self._call._cv.notify_all()


def exchange(client, descriptor, batches, schema=None, options=None) -> list[pa.RecordBatch]:
    """Raw do_exchange: write every batch, then read every result batch."""
    writer, reader = client.do_exchange(descriptor, options) if options else client.do_exchange(descriptor)
    try:
        writer.begin(schema or batches[0].schema)
        for batch in batches:
            writer.write_batch(batch)
        writer.done_writing()
        return [chunk.data for chunk in reader]
    finally:
        try:
            writer.close()
        except pa.ArrowException:
            pass
