"""Test helpers for the Flight tests: a small deterministic fake model (no torch).

``FakeModel`` follows the engine Model API (``info``, ``embed_images / embed_texts /
embed_tokens(array, normalize=) -> EmbedResult``). Each row's embedding is a vector seeded
by the SHA-256 of the row's bytes, so results are checkable from the input alone. Rows
that are null or start with ``b"bad"`` ("bad" for text) are row errors (zeros).

Ordering helpers, so that no test sleeps to let something happen: ``FakeModel(gate=Event, free_calls=N)``
blocks every call after the first N until the test opens the gate (``entered`` counts calls that started);
``wait_until`` polls a condition with a generous bound and a message; ``spy_cancelled`` hands the test the
server's own "is this exchange cancelled?" check.
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
    from flight_server import servicer

    seen: list = []
    original = servicer._submitter

    def submitter(model, command, cancelled):
        seen.append(cancelled)
        return original(model, command, cancelled)

    monkeypatch.setattr(servicer, "_submitter", submitter)
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

