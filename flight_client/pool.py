"""Embedders (in-process engine or a Flight server) and the pool that shares batches among them.

:class:`EndpointPool` runs one worker thread per embedder, each with one batch in flight,
takes batches from a shared queue (so faster endpoints take more) and hands results back
in input order. When an endpoint fails (connection refused, server gone, internal error)
its batch goes back to the front of the queue for the others; after ``max_failures``
failures in a row the endpoint is retired. When every endpoint is retired the pool raises
:class:`AllEndpointsFailed`. A request-level fault (bad column, unknown model) would fail
on every server alike, so it stops the job at once.

Imports only pyarrow (and the protocol); the engine is handed in already loaded.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import pyarrow as pa
import pyarrow.flight as flight

from flight_client.client import EmbeddingClient
from flight_server import protocol

log = logging.getLogger(__name__)

FATAL_CODES = (protocol.CODE_INVALID, protocol.CODE_NOT_FOUND, protocol.CODE_LIMIT)
BUSY_MAX_WAIT_S = 10.0  # longest pause before trying a busy server again


class AllEndpointsFailed(RuntimeError):
    """Every endpoint of the pool failed; the message lists each one's last error."""


class Embedder(Protocol):
    """Something that embeds one column: ``embed(array) -> (output columns, errors)``."""

    name: str

    def describe(self) -> dict[str, Any]:
        """Model metadata (keys of ``protocol.METADATA_KEYS``)."""

    def embed(self, column: pa.Array) -> tuple[list[pa.Array], list[str | None]]:
        """The columns of ``protocol.output_fields`` (``embedding``, null where a row failed, then the scale /
        offset of int8 / uint8 output) and one error per row."""


class LocalEmbedder:
    """The engine in this process (``engine.load_model(...)`` result). ``dimensions`` / ``output_dtype`` apply
    to each batch's float32 result (``protocol.output_columns``); ``truncate`` (text) goes to the tokenizer."""

    def __init__(self, model: Any, kind: str, normalize: bool = True, name: str = "in-process",
                 prompt_name: str | None = None, dimensions: int | None = None, output_dtype: str = "float32",
                 truncate: bool = True) -> None:
        self.model = model
        self.kind = kind
        self.normalize = normalize
        self.name = name
        self.dimensions = dimensions
        self.output_dtype = output_dtype
        self._embed = getattr(model, protocol.EMBED_METHODS[kind])
        self._options: dict[str, Any] = {"prompt_name": prompt_name} if prompt_name is not None else {}
        if not truncate and kind == "text":  # token-id rows are never cut
            self._options["truncate"] = False

    def describe(self) -> dict[str, Any]:
        return protocol.model_metadata(self.model.info.name, self.model.info, default=True)

    def embed(self, column: pa.Array) -> tuple[list[pa.Array], list[str | None]]:
        result = self._embed(column, normalize=self.normalize, **self._options)
        errors = list(result.errors)
        return protocol.output_columns(result.embeddings, errors, self.normalize, self.dimensions,
                                       self.output_dtype), errors


class FlightEmbedder:
    """One ArrowEngine Flight server; each batch is one ``do_exchange``."""

    def __init__(self, location: str, kind: str, model: str | None = None, normalize: bool = True,
                 token: str | None = None, tls_root_certs: bytes | str | Path | None = None,
                 timeout_s: float | None = None, prompt_name: str | None = None, dimensions: int | None = None,
                 output_dtype: str = "float32", truncate: bool = True) -> None:
        self.name = location
        self.kind = kind
        self.model = model
        self.normalize = normalize
        self.prompt_name = prompt_name
        self.options: dict[str, Any] = {"dimensions": dimensions, "output_dtype": output_dtype, "truncate": truncate}
        self.column = protocol.DEFAULT_COLUMNS[kind]
        # No client-side retries: the pool retries, on another endpoint when it can. The client's own batch
        # limits split a job batch of big rows into several record batches of the one exchange, within the
        # server's --max-batch-rows / --max-batch-bytes defaults (80 photos of 4.5 MB are one 290 MB batch).
        self.client = EmbeddingClient(location, token=token, tls_root_certs=tls_root_certs, retries=0,
                                      timeout_s=timeout_s)

    def describe(self) -> dict[str, Any]:
        models = self.client.models()
        for meta in models:
            if meta["name"] == self.model or (self.model is None and meta.get("default")):
                return meta
        raise LookupError(f"server {self.name} does not serve model {self.model!r}; it serves "
                          f"{[m['name'] for m in models]}; pick one with --model")

    def embed(self, column: pa.Array) -> tuple[list[pa.Array], list[str | None]]:
        table = pa.table({self.column: column})
        result = self.client.embed_table(table, column=self.column, kind=self.kind, model=self.model,
                                         normalize=self.normalize, prompt_name=self.prompt_name, **self.options)
        outputs = [name for name in result.column_names if name in protocol.RESERVED_FIELDS
                   and name != protocol.ERROR_FIELD]  # embedding, then the scale / offset of int8 / uint8
        return ([result.column(name).combine_chunks() for name in outputs],
                result.column(protocol.ERROR_FIELD).to_pylist())

    def close(self) -> None:
        self.client.close()


def is_fatal(exc: BaseException) -> bool:
    """Whether a failure would happen on any endpoint (stop the job) rather than on this one."""
    if isinstance(exc, flight.FlightError):
        return protocol.error_code(exc) in FATAL_CODES
    return not isinstance(exc, (OSError, pa.ArrowException))


class EndpointPool:
    """Share batches among embedders; results come back in input order.

    Args:
        embedders: one worker thread each, one batch in flight each.
        max_failures: failures in a row after which an endpoint is retired.
        backoff_s: first pause of a failed endpoint before it takes work again (doubles).
        fatal: decides which exceptions stop the job (default :func:`is_fatal`).
    """

    def __init__(self, embedders: Sequence[Any], max_failures: int = 3, backoff_s: float = 0.25,
                 fatal: Any = is_fatal) -> None:
        if not embedders:
            raise ValueError("the pool needs at least one embedder")
        self.embedders = list(embedders)
        self.max_failures = max_failures
        self.backoff_s = backoff_s
        self._is_fatal = fatal
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._results: dict[int, tuple[pa.Array, list[str | None]]] = {}
        self._fatal: BaseException | None = None
        self._dead: dict[str, BaseException] = {}
        self._closed = False
        self.batches_done = collections.Counter()  # endpoint name -> batches embedded
        self.requeued = 0

    def map(self, items: Iterable[tuple[Any, pa.Array]]) -> Iterator[tuple[Any, pa.Array, list[str | None]]]:
        """Embed ``(payload, column)`` items; yields ``(payload, embeddings, errors)`` in input order."""
        workers = [threading.Thread(target=self._work, args=(e,), name=f"embed-{i}", daemon=True)
                   for i, e in enumerate(self.embedders)]
        for worker in workers:
            worker.start()
        source = iter(items)
        payloads: dict[int, Any] = {}
        window = 2 * len(self.embedders)
        sent = done = 0
        exhausted = False
        try:
            while True:
                if not exhausted and sent - done < window:
                    item = next(source, None)  # reading the input happens outside the lock
                    if item is None:
                        exhausted = True
                        continue
                    payloads[sent] = item[0]
                    with self._cond:
                        self._queue.append((sent, item[1]))
                        self._cond.notify_all()
                    sent += 1
                    continue
                if exhausted and done == sent:
                    return
                with self._cond:
                    while done not in self._results and self._fatal is None and self._alive():
                        self._cond.wait(0.5)
                    result = self._results.pop(done, None)
                    if result is None:
                        raise self._failure()
                yield payloads.pop(done), result[0], result[1]
                done += 1
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            for worker in workers:
                worker.join(timeout=1.0)

    def _alive(self) -> bool:
        return len(self._dead) < len(self.embedders)

    def _failure(self) -> BaseException:
        if self._fatal is not None:
            return self._fatal
        reasons = "; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in self._dead.items())
        return AllEndpointsFailed(f"all {len(self.embedders)} endpoint(s) failed ({reasons}); the finished "
                                  "shards are kept: bring a server back and rerun with --resume")

    def _requeue(self, seq: int, column: pa.Array, dead: tuple[str, BaseException] | None = None) -> None:
        """Put a batch that failed back first in line for the endpoints; ``dead``: (name, why) to retire one."""
        with self._cond:
            self._queue.appendleft((seq, column))
            self.requeued += 1
            if dead is not None:
                self._dead[dead[0]] = dead[1]
            self._cond.notify_all()

    def _work(self, embedder: Any) -> None:
        failures = busy = 0
        while True:
            with self._cond:
                while not self._queue and not self._closed and self._fatal is None:
                    self._cond.wait()
                if self._closed or self._fatal is not None:
                    return
                seq, column = self._queue.popleft()
            try:
                result = embedder.embed(column)
            except Exception as exc:
                if self._is_fatal(exc):
                    with self._cond:
                        self._fatal = exc
                        self._cond.notify_all()
                    return
                if isinstance(exc, flight.FlightError) and protocol.error_code(exc) == protocol.CODE_BUSY:
                    # Alive but at its --max-concurrent-exchanges: wait it out (BUSY_MAX_WAIT_S a try), never retire.
                    busy += 1
                    self._requeue(seq, column)
                    delay = min(self.backoff_s * 2 ** (busy - 1), BUSY_MAX_WAIT_S)
                    log.warning("endpoint %s is busy; its batch goes back to the queue; trying it again in %.2fs",
                                embedder.name, delay)
                    time.sleep(delay)
                    continue
                failures += 1
                self._requeue(seq, column, dead=(embedder.name, exc) if failures >= self.max_failures else None)
                if failures >= self.max_failures:
                    log.error("endpoint %s retired after %d failures in a row: %s", embedder.name,
                              failures, exc)
                    return
                delay = self.backoff_s * 2 ** (failures - 1)
                log.warning("endpoint %s failed (%s: %s); its batch goes back to the queue; "
                            "retrying it in %.2fs", embedder.name, type(exc).__name__, exc, delay)
                time.sleep(delay)
                continue
            failures = busy = 0
            with self._cond:
                self._results[seq] = result
                self.batches_done[embedder.name] += 1
                self._cond.notify_all()
