"""The Flight service: Arrow batches in, one engine call per batch, embedding batches out.

The servicer only translates: it validates the request before any
work, hands the received Arrow column to the model as it is (the engine decodes from
views of the received buffer), and wraps the engine's (N, D) float32 output as the
``embedding`` column without copying. It never imports torch.

Models are duck-typed (``engine.model`` API): ``.info`` (``dim``, ``modalities``, ...) and
``embed_images / embed_texts / embed_tokens(array, normalize=) -> EmbedResult`` with
``embeddings`` (N, D) float32 C-contiguous and ``errors`` (list of str | None); a reranker (modality
``pairs``) has ``score_pairs(queries, documents) -> ScoreResult`` (``scores`` (N,) float32, ``errors``) instead,
wrapped as the ``score`` column without copying. A model
that also has ``submit(kind, array, normalize, cancelled, prompt_name=) -> Future[EmbedResult]`` (an
``engine.scheduler.Scheduler``, which ``arrowengine serve`` puts in front of every model)
is pipelined: while the rows of input batch k are on the device, the exchange already
reads and decodes batch k+1, and a writer thread sends each result as soon as it is ready
(in input order), so a client that waits for a result before writing more never stalls.
The scheduler coalesces rows of concurrent exchanges into device batches.

An exchange that makes no progress for ``ServerLimits.idle_timeout_s`` (nothing read from the client, nothing
written to it, no rows of it in the engine) is cancelled by a watchdog: its slot and its queued work are freed
at once, and it ends with a ``FlightTimedOutError`` at its next read or write. (pyarrow's server cannot abort a
stream call blocked on the network; such a call keeps its thread until the client reads, writes or goes.)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import queue
import struct
import threading
import time
import zlib
from concurrent.futures import CancelledError, Future
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from engine.errors import ArrowEngineError, SchedulerClosed
from engine.ratelog import RateLimitedLog
from flight_server import protocol
from flight_server.auth import BearerTokenMiddlewareFactory
from flight_server.config import ServerConfig
from flight_server.errors import busy_error, to_flight_error

log = logging.getLogger(__name__)

EMBED_METHODS: Mapping[str, str] = protocol.EMBED_METHODS
PIPELINE_DEPTH = 2  # input batches submitted ahead of the one being written
SHUTDOWN_MARGIN_S = 3.0  # drain() stops streaming exchanges this long before the grace period ends


def embedding_batch(passthrough: list[pa.Array], schema: pa.Schema, embeddings: np.ndarray,
                    errors: list[str | None]) -> pa.RecordBatch:
    """One output batch: passthrough arrays (as they are), ``embedding``, ``error``.

    ``embedding`` wraps ``embeddings``' own memory (no copy); rows with an error are null.
    """
    embedding = protocol.embedding_column(embeddings, errors)
    error = pa.array(errors, type=pa.string())
    return pa.RecordBatch.from_arrays([*passthrough, embedding, error], schema=schema)


def score_batch(passthrough: list[pa.Array], schema: pa.Schema, scores: np.ndarray,
                errors: list[str | None]) -> pa.RecordBatch:
    """One output batch of ``pairs`` input: passthrough arrays, ``score`` (wrapping ``scores``' memory, rows with
    an error null), ``error``."""
    score = protocol.score_column(scores, errors)
    error = pa.array(errors, type=pa.string())
    return pa.RecordBatch.from_arrays([*passthrough, score, error], schema=schema)


class _Cancelled(Exception):
    """The client cancelled or went away: stop quietly."""


class _Stopped(Exception):
    """The exchange was told to stop (idle, shutdown, client gone) while it waited to queue a batch."""


class Stats:
    """Thread-safe counters for the ``stats`` action."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.counters = {"requests": 0, "requests_failed": 0, "requests_cancelled": 0, "idle_cancelled": 0,
                         "rejected_busy": 0, "rejected_auth": 0, "active_exchanges": 0, "stalled_exchanges": 0,
                         "batches": 0, "rows": 0, "row_errors": 0, "input_bytes": 0}

    def add(self, **deltas: int) -> None:
        with self._lock:
            for key, delta in deltas.items():
                self.counters[key] += delta

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counters, "uptime_s": round(time.monotonic() - self.started, 3)}


class EmbeddingServer(flight.FlightServerBase):
    """Serves embeddings of ``models`` over Arrow Flight (protocol: :mod:`flight_server.protocol`).

    Args:
        models: served name -> loaded model (engine API, duck-typed). Must not be empty.
        config: where to listen, limits, auth token, TLS files.
        default_model: the model used when a command names none (default: the first).

    The server listens as soon as it is constructed; ``server.port`` is the bound port.
    Use it as a context manager, or call :meth:`drain` then ``shutdown()``.
    """

    def __init__(self, models: Mapping[str, Any], config: ServerConfig | None = None,
                 default_model: str | None = None) -> None:
        config = config or ServerConfig()
        if not models:
            raise ValueError("EmbeddingServer needs at least one model to serve")
        self._models = dict(models)
        self._default = default_model or next(iter(self._models))
        if self._default not in self._models:
            raise ValueError(f"default model {self._default!r} is not served; served: {list(self._models)}")
        self.config = config
        self.stats = Stats()
        self._slots = threading.BoundedSemaphore(config.limits.max_concurrent_exchanges)
        self._slot_lock = threading.Lock()   # a slot is given back once, by the exchange or by the watchdog
        self._calls: set[_Call] = set()      # every exchange in progress (for the idle watchdog)
        self._calls_lock = threading.Lock()
        self._draining = threading.Event()   # new exchanges are refused
        self._abort = threading.Event()      # running exchanges stop at the next batch
        self._closed = threading.Event()     # the server is shut down: the watchdog ends
        self._warm = threading.Event()
        self._log = RateLimitedLog(log)
        tls = None
        if config.tls:
            tls = [flight.CertKeyPair(cert=config.tls_cert.read_bytes(), key=config.tls_key.read_bytes())]
        middleware = {}
        if config.auth_token is not None:
            middleware["auth"] = BearerTokenMiddlewareFactory(config.auth_token, on_reject=self._rejected_token)
        super().__init__(config.location, tls_certificates=tls, middleware=middleware)
        self.metrics = None
        self.metrics_port: int | None = None
        if config.metrics_port is not None:
            self._start_metrics()
        threading.Thread(target=self._watch_idle, name="flight-idle-watchdog", daemon=True).start()

    def _start_metrics(self) -> None:
        from flight_server.metrics import ServerMetrics  # prometheus_client only when asked for

        self.metrics = ServerMetrics()
        for name, model in self._models.items():
            self.metrics.watch_model(name, model)
        self.metrics.stalled.set_function(lambda: float(self.stats.snapshot()["stalled_exchanges"]))
        tls_files = None
        if self.config.tls:
            tls_files = {"certfile": str(self.config.tls_cert), "keyfile": str(self.config.tls_key)}
        try:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port, tls_files)
        except OSError:
            self._closed.set()
            super().shutdown()
            raise

    def shutdown(self) -> None:
        """Stop serving (blocks until running calls end) and stop the metrics endpoint."""
        self._closed.set()
        try:
            super().shutdown()
        finally:
            if self.metrics is not None:
                self.metrics.close()

    def __exit__(self, *exc_info: Any) -> None:
        self._closed.set()
        super().__exit__(*exc_info)
        if self.metrics is not None:
            self.metrics.close()

    # ---- lifecycle --------------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        """The served model names, default first."""
        return [self._default] + [n for n in self._models if n != self._default]

    def warm_up(self) -> None:
        """Run one real inference per model (text if it can tokenize texts, else a tiny image); then ready."""
        for name, model in self._models.items():
            t0 = time.perf_counter()
            tokenizer = getattr(model, "tokenizer", None)
            if hasattr(model, "warm_up"):
                model.warm_up()
            elif protocol.PAIRS in model.info.modalities:
                model.score_pairs(pa.array(["warm up"]), pa.array(["warm up"]))
            elif "text" in model.info.modalities and (tokenizer is None or tokenizer.available):
                model.embed_texts(pa.array(["warm up"]), normalize=True)
            else:
                model.embed_images(pa.array([_tiny_png()], type=pa.binary()), normalize=True)
            log.info("warmed up model=%s seconds=%.3f", name, time.perf_counter() - t0)
        self._warm.set()

    def drain(self, grace_s: float) -> bool:
        """Refuse new exchanges and let running ones finish; those still running ``SHUTDOWN_MARGIN_S`` before
        the end of ``grace_s`` (at the latest half-way) are stopped at their next batch with "server is shutting
        down; resend the remaining batches", so the error reaches their clients, and the server can stop,
        within the grace period.

        Returns True when every exchange finished on its own.
        """
        self._draining.set()
        start = time.monotonic()
        self._wait_idle(start + max(grace_s / 2, grace_s - SHUTDOWN_MARGIN_S))
        clean = self.stats.snapshot()["active_exchanges"] == 0
        if not clean:
            log.warning("shutting down: stopping %d running exchange(s) at their next batch",
                        self.stats.snapshot()["active_exchanges"])
        self._abort.set()
        self._wait_idle(start + grace_s)
        return clean

    def _wait_idle(self, deadline: float) -> None:
        while self.stats.snapshot()["active_exchanges"] > 0 and time.monotonic() < deadline:
            time.sleep(0.02)

    # ---- do_exchange ------------------------------------------------------------------

    def do_exchange(self, context, descriptor, reader, writer) -> None:
        """Embed every input batch and write one output batch per input batch."""
        if self._draining.is_set():
            self._count_rejected("draining")
            raise flight.FlightUnavailableError("server is shutting down; retry on another server",
                                                extra_info=protocol.error_info(protocol.CODE_BUSY))
        self.stats.add(requests=1)
        call = _Call(peer=context.peer())
        with self._calls_lock:
            self._calls.add(call)
        outcome = "failed"
        try:
            self._exchange(context, descriptor, reader, writer, call)
            outcome = "ok"
        except _Busy as busy:  # rejected at its first batch: counted in rejected_busy, not as a failure
            outcome = "busy"
            raise busy.error from None
        except Exception as exc:
            if call.expired is not None:  # cancelled by the idle watchdog
                outcome = "idle"
                call.error = call.expired
                raise flight.FlightTimedOutError(call.expired, extra_info=protocol.error_info(protocol.CODE_IDLE)) \
                    from None
            if isinstance(exc, (_Cancelled, CancelledError)) or context.is_cancelled():
                outcome = "cancelled"
                self.stats.add(requests_cancelled=1)
                return
            error = to_flight_error(exc)
            call.error = str(error)
            if self._abort.is_set():  # stopped by the server's shutdown: not a failure
                outcome = "shutdown"
                raise error from exc
            self.stats.add(requests_failed=1)
            raise error from exc
        finally:
            self._release_slot(call)
            with self._calls_lock:
                self._calls.discard(call)
            if call.expired is not None:
                self.stats.add(stalled_exchanges=-1)
            self._call_done(call, outcome)

    def _claim_slot(self, call: "_Call") -> None:
        """Take one of the ``max_concurrent_exchanges`` slots when the exchange's first batch arrives (a
        client that opened an exchange and sends nothing holds none), or fail fast with "busy"."""
        if call.slot:
            return
        if not self._slots.acquire(blocking=False):
            self.stats.add(rejected_busy=1)
            self._count_rejected("busy")
            raise _Busy(busy_error(self.config.limits.max_concurrent_exchanges))
        call.slot = True
        self.stats.add(active_exchanges=1)
        if self.metrics is not None:
            self.metrics.active.inc()

    def _release_slot(self, call: "_Call") -> None:
        """Give the exchange's slot back (once, whoever asks first: the exchange or the idle watchdog)."""
        with self._slot_lock:
            if not call.slot:
                return
            call.slot = False
        self.stats.add(active_exchanges=-1)
        self._slots.release()
        if self.metrics is not None:
            self.metrics.active.dec()

    def _watch_idle(self) -> None:
        """Cancel exchanges that made no progress for ``idle_timeout_s`` (runs until the server shuts down)."""
        timeout = self.config.limits.idle_timeout_s
        while not self._closed.wait(min(1.0, timeout / 4)):
            now = time.monotonic()
            with self._calls_lock:
                calls = list(self._calls)
            for call in calls:
                if call.expired is None and call.idle_for(now) > timeout:
                    self._expire(call, timeout)

    def _expire(self, call: "_Call", timeout: float) -> None:
        call.expired = (f"exchange cancelled: no progress for {timeout:g} s (the server had nothing to read from "
                        "the client and could not write to it); keep reading results while sending batches, and "
                        "close the stream when done (the server's limit: serve --idle-timeout)")
        call.stop.set()  # the scheduler drops this exchange's queued rows; the exchange ends at its next step
        self._release_slot(call)
        self.stats.add(idle_cancelled=1, stalled_exchanges=1)
        self._log.log(logging.WARNING, "idle", "cancelled an idle exchange peer=%s model=%s input=%s after %g s "
                      "without progress; its slot is free", call.peer, call.model, call.input, timeout)

    def _rejected_token(self) -> None:
        self.stats.add(rejected_auth=1)
        self._count_rejected("auth")

    def _count_rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()

    def _call_done(self, call: "_Call", outcome: str) -> None:
        seconds = time.perf_counter() - call.t0
        if self.metrics is not None:
            self.metrics.request_done(call.model, call.input, outcome, seconds)
        log.info("exchange end peer=%s model=%s input=%s outcome=%s batches=%d rows=%d row_errors=%d "
                 "seconds=%.3f%s", call.peer, call.model, call.input, outcome, call.batches, call.rows,
                 call.row_errors, seconds, f" error={json.dumps(call.error)}" if call.error else "")

    def _exchange(self, context, descriptor, reader, writer, call: "_Call") -> None:
        """Validate the whole request before any work, then stream."""
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise protocol.ProtocolError("do_exchange needs FlightDescriptor.for_command(<JSON command>); "
                                         f"got a {descriptor.descriptor_type} descriptor")
        command = protocol.parse_command(descriptor.command, self.config.limits.max_command_bytes)
        name, model = self._resolve(command.model)
        call.input = command.input
        call.model = name
        self._check_modality(name, model, command.input)
        self._check_prompt(name, model, command.prompt_name)
        try:
            schema = reader.schema  # waits for the client's first message
            call.reading_since = None
        except OSError as exc:
            raise protocol.ProtocolError("no input schema came: the client must call writer.begin(schema) "
                                         "before writing batches (an empty input is one empty batch)") from exc
        _check_going(context, call, self._abort)
        passthrough_fields = protocol.check_input_schema(command, schema)
        out_schema = protocol.result_schema(model.info, passthrough_fields)
        writer.begin(out_schema)
        log.info("exchange start peer=%s model=%s input=%s column=%s normalize=%s prompt_name=%s", call.peer, name,
                 command.input, protocol.quote(list(command.input_columns)), command.normalize,
                 protocol.quote(command.prompt_name))
        self._stream(context, reader, writer, model, command, out_schema, call)

    def _stream(self, context, reader, writer, model, command: protocol.EmbedCommand,
                out_schema: pa.Schema, call: "_Call") -> None:
        """Submit each input batch (at most PIPELINE_DEPTH ahead); a writer thread sends the results.

        A server shutdown stops the exchange at its next input batch, not inside one: a client that waits for
        a result before it sends more must get that result, or it would never send the batch that brings it the
        "shutting down" error."""
        def cancelled() -> bool:
            return call.stop.is_set() or context.is_cancelled()

        embed = _submitter(model, command, cancelled)
        dim = int(model.info.dim)
        results = _ResultWriter(writer, call, cancelled, lambda rows, failed: self._batch_written(call, rows, failed))
        try:
            for chunk in call.reading(reader):
                _check_going(context, call, self._abort)
                results.check()
                batch = chunk.data
                if batch is None:  # a metadata-only message
                    continue
                self._claim_slot(call)
                self.stats.add(input_bytes=batch.nbytes)
                too_big = self._check_limits(batch, call.submitted)
                if too_big:  # one row alone over the byte limit: an error for that row, not the call
                    results.put(_failed_batch(command, batch, out_schema, dim, too_big))
                elif command.input == protocol.PAIRS:
                    results.put(self._score_batch(embed, command, batch, out_schema))
                else:
                    results.put(self._embed_batch(embed, command, batch, out_schema, dim))
                call.submitted += 1
            _check_going(context, call, self._abort)  # a cancel can also end the input stream early
            results.finish()
            _check_going(context, call, self._abort)
        except (CancelledError, _Stopped) as exc:  # the scheduler dropped our rows, or we were told to stop: say why
            _check_going(context, call, self._abort)
            raise _Cancelled() from exc
        finally:
            results.stop()

    def _batch_written(self, call: "_Call", rows: int, failed: int) -> None:
        call.batches += 1
        call.rows += rows
        call.row_errors += failed
        self.stats.add(batches=1, rows=rows, row_errors=failed)
        if self.metrics is not None:
            self.metrics.batch_done(call.model, call.input, rows, failed)

    def _embed_batch(self, embed, command: protocol.EmbedCommand, batch: pa.RecordBatch,
                     out_schema: pa.Schema, dim: int) -> Callable[[], tuple[pa.RecordBatch, int]]:
        """Submit one input batch; returns ``collect()`` -> (output batch, row errors), which waits."""
        passthrough = [batch.column(p) for p in command.passthrough]
        n = batch.num_rows
        if n == 0:
            return lambda: (embedding_batch(passthrough, out_schema, np.zeros((0, dim), np.float32), []), 0)
        future = embed(protocol.engine_column(command.input, batch.column(command.column)), command.normalize)

        def collect() -> tuple[pa.RecordBatch, int]:
            try:
                result = future.result()
                embeddings, errors = result.embeddings, list(result.errors)
                if (not isinstance(embeddings, np.ndarray) or embeddings.shape != (n, dim)
                        or embeddings.dtype != np.float32 or len(errors) != n):
                    raise RuntimeError(f"the model returned embeddings {getattr(embeddings, 'shape', None)} "
                                       f"{getattr(embeddings, 'dtype', None)} and {len(errors)} errors; "
                                       f"expected ({n}, {dim}) float32 and {n} errors")
            except (CancelledError, SchedulerClosed):
                raise  # the exchange is ending (client cancel, shutdown): nothing more to write
            except Exception as exc:
                # This batch failed after it was queued (a device fault, say). The exchange thread may be
                # waiting for the client's next batch while the client waits for this result, so the call
                # cannot end here: the batch's rows come back as errors and the stream goes on.
                reason = _engine_failure(exc, n, "embedding", "embedded")
                return embedding_batch(passthrough, out_schema, np.zeros((n, dim), np.float32), [reason] * n), n
            if not embeddings.flags.c_contiguous:
                embeddings = np.ascontiguousarray(embeddings)  # the engine promises C order; be safe
            out = embedding_batch(passthrough, out_schema, embeddings, errors)
            return out, sum(e is not None for e in errors)
        return collect

    def _score_batch(self, score, command: protocol.EmbedCommand, batch: pa.RecordBatch,
                     out_schema: pa.Schema) -> Callable[[], tuple[pa.RecordBatch, int]]:
        """As :meth:`_embed_batch`, for ``pairs`` input: submit the batch's (query, document) columns to a
        reranker; ``collect()`` gives the ``score`` batch."""
        passthrough = [batch.column(p) for p in command.passthrough]
        n = batch.num_rows
        zeros = _zero_scores(out_schema, n)
        if n == 0:
            return lambda: (score_batch(passthrough, out_schema, zeros, []), 0)
        future = score(tuple(protocol.engine_column(command.input, batch.column(c)) for c in command.input_columns),
                       False)

        def collect() -> tuple[pa.RecordBatch, int]:
            try:
                result = future.result()
                scores, errors = result.scores, list(result.errors)
                if (not isinstance(scores, np.ndarray) or scores.shape != zeros.shape
                        or scores.dtype != np.float32 or len(errors) != n):
                    raise RuntimeError(f"the model returned scores {getattr(scores, 'shape', None)} "
                                       f"{getattr(scores, 'dtype', None)} and {len(errors)} errors; expected "
                                       f"{zeros.shape} float32 and {n} errors")
            except (CancelledError, SchedulerClosed):
                raise  # the exchange is ending (client cancel, shutdown): nothing more to write
            except Exception as exc:  # as in _embed_batch: the batch's rows come back as errors
                reason = _engine_failure(exc, n, "scoring", "scored")
                return score_batch(passthrough, out_schema, zeros, [reason] * n), n
            out = score_batch(passthrough, out_schema, np.ascontiguousarray(scores), errors)
            return out, sum(e is not None for e in errors)
        return collect

    def _resolve(self, name: str | None) -> tuple[str, Any]:
        name = name or self._default
        if name not in self._models:
            raise protocol.UnknownModelError(f"unknown model {protocol.quote(name)}; this server serves "
                                             f"{self.model_names}")
        return name, self._models[name]

    def _check_modality(self, name: str, model: Any, kind: str) -> None:
        modality = protocol.KIND_MODALITY[kind]
        modalities = tuple(model.info.modalities)
        able = [n for n, m in self._models.items() if modality in m.info.modalities]
        if modality not in modalities and protocol.PAIRS in modalities:
            raise protocol.ProtocolError(
                f"model {name!r} is a reranker: it scores (query, document) pairs and embeds nothing; send "
                f'"pairs" input (a query and a document column) to it, or {kind!r} input to a model that embeds '
                f"{modality}: {able}")
        if modality == protocol.PAIRS and modality not in modalities:
            raise protocol.ProtocolError(
                f"model {name!r} is an embedding model ({list(modalities)}): it scores no pairs; send \"pairs\" "
                f"input to a reranker (a cross-encoder): {able}")
        if modality not in modalities:
            raise protocol.ProtocolError(
                f"model {name!r} embeds {list(modalities)}, not {kind!r} input ({modality}); "
                f"models here that take {modality}: {able}")

    def _check_prompt(self, name: str, model: Any, prompt_name: str | None) -> None:
        prompts = dict(getattr(model.info, "prompts", ()) or ())
        if prompt_name is not None and prompt_name not in prompts:
            have = f"its prompts are {sorted(prompts)}" if prompts else "it has no prompts"
            raise protocol.ProtocolError(f"unknown prompt_name {protocol.quote(prompt_name)} for model {name!r}: "
                                         f"{have}")

    def _check_limits(self, batch: pa.RecordBatch, index: int) -> str | None:
        """Raise LimitExceededError for a batch over the limits; a single row over the byte limit is that
        row's error instead (returned), so one huge file never fails a whole job."""
        limits = self.config.limits
        if batch.num_rows > limits.max_batch_rows:
            raise protocol.LimitExceededError(
                f"input batch {index} has {batch.num_rows} rows; the limit is {limits.max_batch_rows} "
                f"rows per batch: split it, e.g. table.to_batches(max_chunksize={limits.max_batch_rows})")
        if batch.nbytes > limits.max_batch_bytes and batch.num_rows == 1:
            return (f"too large: the row holds {batch.nbytes} bytes, over the server's limit of "
                    f"{limits.max_batch_bytes} bytes per batch (serve --max-batch-bytes)")
        if batch.nbytes > limits.max_batch_bytes:
            raise protocol.LimitExceededError(
                f"input batch {index} holds {batch.nbytes} bytes; the limit is {limits.max_batch_bytes} "
                "bytes per batch: send fewer rows per batch")

    # ---- discovery --------------------------------------------------------------------

    def _flight_info(self, name: str) -> flight.FlightInfo:
        model = self._models[name]
        meta = protocol.model_metadata(name, model.info, default=name == self._default)
        endpoints = [flight.FlightEndpoint(b"", [uri]) for uri in self.advertised_locations()]
        return flight.FlightInfo(protocol.result_schema(model.info),
                                 flight.FlightDescriptor.for_path(name), endpoints, -1, -1,
                                 app_metadata=json.dumps(meta).encode("utf-8"))

    def advertised_locations(self) -> list[str]:
        """Where clients can reach this server: ``config.advertise``, else the bound address.

        A wildcard bind (0.0.0.0 / ::) advertises nothing unless ``advertise`` is set, since
        the server cannot know which of its addresses a client can reach.
        """
        if self.config.advertise:
            return list(self.config.advertise)
        if self.config.host in ("0.0.0.0", "::", ""):
            return []
        return [self.config.location.rsplit(":", 1)[0] + f":{self.port}"]

    def list_flights(self, context, criteria) -> Iterator[flight.FlightInfo]:
        """One FlightInfo per served model (default first)."""
        for name in self.model_names:
            yield self._flight_info(name)

    def get_flight_info(self, context, descriptor) -> flight.FlightInfo:
        """FlightInfo of the model a path ``[name]`` or an embed command names."""
        try:
            if descriptor.descriptor_type == flight.DescriptorType.PATH:
                if len(descriptor.path) != 1:
                    raise protocol.ProtocolError(f"expected a path of one model name; got "
                                                 f"{protocol.quote(descriptor.path)}")
                name = descriptor.path[0].decode("utf-8", "replace")
            else:
                name = protocol.parse_command(descriptor.command, self.config.limits.max_command_bytes).model
            return self._flight_info(self._resolve(name)[0])
        except Exception as exc:
            raise to_flight_error(exc) from exc

    def get_schema(self, context, descriptor) -> flight.SchemaResult:
        """The output schema of the model a path ``[name]`` or an embed command names."""
        return flight.SchemaResult(self.get_flight_info(context, descriptor).schema)

    def do_get(self, context, ticket) -> None:
        raise to_flight_error(protocol.ProtocolError(_NOT_EXCHANGE.format(method="do_get")))

    def do_put(self, context, descriptor, reader, writer) -> None:
        raise to_flight_error(protocol.ProtocolError(_NOT_EXCHANGE.format(method="do_put")))

    # ---- actions ----------------------------------------------------------------------

    def list_actions(self, context) -> list[tuple[str, str]]:
        """The actions of :data:`protocol.ACTIONS`."""
        return list(protocol.ACTIONS.items())

    def do_action(self, context, action) -> Iterator[bytes]:
        """Answer ``health``, ``ready``, ``models``, ``stats`` or ``limits`` with one JSON result."""
        kind = action.type
        if kind == protocol.ACTION_HEALTH:
            doc: Any = {"status": "ok", "uptime_s": self.stats.snapshot()["uptime_s"]}
        elif kind == protocol.ACTION_READY:
            doc = self._readiness()
        elif kind == protocol.ACTION_MODELS:
            doc = [protocol.model_metadata(n, self._models[n].info, default=n == self._default)
                   for n in self.model_names]
        elif kind == protocol.ACTION_STATS:
            doc = self.stats.snapshot()
        elif kind == protocol.ACTION_LIMITS:
            doc = dataclasses.asdict(self.config.limits)
        else:
            raise to_flight_error(protocol.ProtocolError(
                f"unknown action {protocol.quote(kind)}; expected one of {list(protocol.ACTIONS)}"))
        return iter([json.dumps(doc).encode("utf-8")])

    def _readiness(self) -> dict[str, Any]:
        """The ``ready`` answer: false while warming up, shutting down, or with every exchange slot taken."""
        stats = self.stats.snapshot()
        limit = self.config.limits.max_concurrent_exchanges
        if not self._warm.is_set():
            reason = "warming up"
        elif self._draining.is_set():
            reason = "shutting down"
        elif stats["active_exchanges"] >= limit:
            reason = f"saturated: {stats['active_exchanges']} of {limit} exchange slots in use"
        else:
            reason = None
        doc: dict[str, Any] = {"ready": reason is None, "models": self.model_names,
                               "active_exchanges": stats["active_exchanges"], "max_concurrent_exchanges": limit,
                               "stalled_exchanges": stats["stalled_exchanges"]}
        if reason is not None:
            doc["reason"] = reason
        return doc


_NOT_EXCHANGE = ("{method} is not supported: embeddings are computed by do_exchange with "
                 "FlightDescriptor.for_command(<JSON embed command>); list_flights names the models and "
                 "list_actions the actions")


def _failed_batch(command: protocol.EmbedCommand, batch: pa.RecordBatch, out_schema: pa.Schema, dim: int,
                  reason: str) -> Callable[[], tuple[pa.RecordBatch, int]]:
    """The output batch of an input batch whose every row fails with ``reason`` (zeros, the error)."""
    passthrough = [batch.column(p) for p in command.passthrough]
    n = batch.num_rows
    if command.input == protocol.PAIRS:
        out = score_batch(passthrough, out_schema, _zero_scores(out_schema, n), [reason] * n)
    else:
        out = embedding_batch(passthrough, out_schema, np.zeros((n, dim), np.float32), [reason] * n)
    return lambda: (out, n)


def _zero_scores(out_schema: pa.Schema, n: int) -> np.ndarray:
    """Zero scores for ``n`` rows of a ``score`` column of ``out_schema``: (n,), or (n, L) for L labels."""
    type_ = out_schema.field(protocol.SCORE_FIELD).type
    return np.zeros((n,) if type_ == pa.float32() else (n, type_.list_size), np.float32)


def _engine_failure(exc: BaseException, n: int, doing: str, done: str) -> str:
    """Log a batch of ``n`` rows that failed in the engine after it was queued; the reason each row gets."""
    log.error("a batch of %d rows failed in the engine; its rows are returned as errors", n, exc_info=exc)
    what = f"{type(exc).__name__}: {exc}" if isinstance(exc, ArrowEngineError) else type(exc).__name__
    return (f"internal error while {doing} this batch ({what}); these rows were not {done}: send them again, and "
            "see the server log if it persists")


def _tiny_png(size: int = 8) -> bytes:
    """A valid gray ``size`` x ``size`` PNG, for warming up image-only models."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    raw = b"".join(b"\x00" + b"\x80" * (3 * size) for _ in range(size))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


class _Busy(Exception):
    """Every exchange slot is taken; carries the Flight error the client gets."""

    def __init__(self, error: flight.FlightError) -> None:
        super().__init__(str(error))
        self.error = error


class _Call:
    """One exchange: what it did (for its log lines and metrics) and whether it makes progress (for the idle
    watchdog)."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.model = "-"          # a served name once the command resolved (bounded label values)
        self.input = "-"
        self.t0 = time.perf_counter()
        self.submitted = self.batches = self.rows = self.row_errors = 0
        self.error: str | None = None
        self.slot = False  # holds one of the server's exchange slots (from its first batch on)
        self.stop = threading.Event()  # stop now: drop queued work, write nothing more
        self.expired: str | None = None  # why the idle watchdog cancelled it
        now = time.monotonic()
        self.reading_since: float | None = now  # waiting for the client's next message (the first: the schema)
        self.writing_since: float | None = None  # inside writer.write_batch
        self.last_written = now

    def reading(self, reader) -> Iterator[Any]:
        """The reader's chunks, noting while we wait for each."""
        chunks = iter(reader)
        while True:
            self.reading_since = time.monotonic()
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            finally:
                self.reading_since = None
            yield chunk

    def idle_for(self, now: float) -> float:
        """Seconds the exchange has been waiting on its client alone: blocked writing a result, or reading with
        every result of what it sent written (0 while the engine works on its rows)."""
        writing, reading = self.writing_since, self.reading_since
        if writing is not None:
            return now - writing
        if reading is not None and self.batches >= self.submitted:
            return now - max(reading, self.last_written)
        return 0.0


def _check_going(context, call: _Call, abort: threading.Event) -> None:
    """Raise why the exchange must stop, if it must: idle, server shutdown, or the client went away."""
    if call.expired is not None:
        raise _Stopped(call.expired)
    if abort.is_set():
        raise flight.FlightUnavailableError("server is shutting down; resend the remaining batches to another server",
                                            extra_info=protocol.error_info(protocol.CODE_BUSY))
    if context.is_cancelled():
        raise _Cancelled()


def _submitter(model: Any, command: protocol.EmbedCommand,
               cancelled: Callable[[], bool]) -> Callable[[Any, bool], Future]:
    """``submit(values, normalize) -> Future[EmbedResult]`` (pairs: ``values`` is (queries, documents), a
    Future[ScoreResult]) for a scheduler or a plain model.

    Request-level faults raise from ``submit`` itself; a plain model runs synchronously.
    """
    kind, options = command.input, {"prompt_name": command.prompt_name} if command.prompt_name else {}
    if callable(getattr(model, "submit", None)):
        return lambda values, normalize: model.submit(kind, values, normalize, cancelled, **options)
    if kind == protocol.PAIRS:  # values: (queries, documents)
        def score(values, normalize: bool) -> Future:
            future: Future = Future()
            future.set_result(model.score_pairs(*values, **options))
            return future
        return score
    embed = getattr(model, EMBED_METHODS[kind])

    def run(values, normalize: bool) -> Future:
        future: Future = Future()
        future.set_result(embed(values, normalize=normalize, **options))
        return future
    return run


class _ResultWriter:
    """A thread that writes the results of submitted batches in order, as each is ready."""

    def __init__(self, writer, call: _Call, cancelled: Callable[[], bool],
                 on_written: Callable[[int, int], None]) -> None:
        self._writer = writer
        self._call = call
        self._stop = call.stop
        self._cancelled = cancelled
        self._on_written = on_written
        self._queue: queue.Queue = queue.Queue(maxsize=PIPELINE_DEPTH)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flight-result-writer", daemon=True)
        self._thread.start()

    def put(self, collect: Callable[[], tuple[pa.RecordBatch, int]]) -> None:
        """Queue a batch's ``collect``; waits while PIPELINE_DEPTH batches are pending (raises _Stopped if the
        exchange is told to stop meanwhile)."""
        while True:
            self.check()
            if self._cancelled():
                raise _Stopped()
            try:
                self._queue.put(collect, timeout=0.05)
                return
            except queue.Full:
                continue

    def check(self) -> None:
        """Re-raise a failure of the writer thread in the calling thread."""
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Wait until every queued result is written; re-raise a failure."""
        self._queue.put(None)
        self._thread.join()
        self.check()

    def stop(self) -> None:
        """Drop what is not written yet (the scheduler drops those rows) and end the thread."""
        if self._thread.is_alive():
            self._stop.set()
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            collect = self._queue.get()
            if collect is None:
                return
            if self.error is not None or self._stop.is_set():
                continue  # drain without writing
            try:
                out, failed = collect()
                self._call.writing_since = time.monotonic()
                try:
                    self._writer.write_batch(out)
                finally:
                    self._call.writing_since = None
                self._call.last_written = time.monotonic()
                self._on_written(out.num_rows, failed)
            except BaseException as exc:  # handed to the exchange thread by check()
                self.error = exc
                self._stop.set()
