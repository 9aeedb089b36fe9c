"""The Flight service: the RPC surface of an ArrowEngine server.

``EmbeddingServer`` answers ``do_exchange`` (it validates the command, picks the model, and hands the stream to
:class:`flight_server.exchange.Exchange`, the pipeline that reads, checks, embeds and writes batches),
``do_action`` (health, ready, models, stats, limits), ``get_flight_info`` / ``list_flights`` / ``get_schema``
(discovery), bearer-token auth, exchange slots, counters, metrics and shutdown. It never imports torch.

With ``ServerConfig.http_port`` the server also runs the OpenAI-compatible HTTP API
(:mod:`flight_server.http_server`) in the same process: it shares the models (their schedulers), the exchange slots,
the token, the drain and the metrics, and hands rows to the engine through :meth:`EmbeddingServer.submit_rows`.

An exchange that makes no progress for ``ServerLimits.idle_timeout_s`` (nothing read from the client, nothing
written to it, no rows of it in the engine) is cancelled by a watchdog: its slot and its queued work are freed
at once, and it ends with a ``FlightTimedOutError`` at its next read or write. (pyarrow's server cannot abort a
stream call blocked on the network; such a call keeps its thread until the client reads, writes or goes.)
"""
from __future__ import annotations

import json
import logging
import struct
import threading
import time
import zlib
from concurrent.futures import CancelledError
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Mapping

import pyarrow as pa
import pyarrow.flight as flight

from engine.ratelog import RateLimitedLog
from flight_server import protocol
from flight_server.auth import BearerTokenMiddlewareFactory
from flight_server.config import ServerConfig
from flight_server.errors import busy_error, to_flight_error
from flight_server.exchange import Call, Cancelled, Exchange, submitter

log = logging.getLogger(__name__)

SHUTDOWN_MARGIN_S = 3.0  # drain() stops streaming exchanges this long before the grace period ends


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
        self._calls: set[Call] = set()      # every exchange in progress (for the idle watchdog)
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
            middleware["auth"] = BearerTokenMiddlewareFactory(config.auth_token, on_reject=self.token_rejected)
        super().__init__(config.location, tls_certificates=tls, middleware=middleware)
        self.metrics = None
        self.metrics_port: int | None = None
        self.http = None  # the OpenAI-compatible HTTP front (flight_server.http_server), with config.http_port
        self.http_port: int | None = None
        if config.metrics_port is not None:
            self._start_metrics()
        if config.http_port is not None:
            self._start_http()
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

    def _start_http(self) -> None:
        from flight_server.http_server import HttpFront  # starlette and uvicorn only when asked for

        try:
            self.http = HttpFront(self)
        except BaseException:
            self._closed.set()
            super().shutdown()
            if self.metrics is not None:
                self.metrics.close()
            raise
        self.http_port = self.http.port

    def shutdown(self) -> None:
        """Stop serving (blocks until running calls end), the HTTP front and the metrics endpoint."""
        self._closed.set()
        try:
            self._close_http()
            super().shutdown()
        finally:
            if self.metrics is not None:
                self.metrics.close()

    def __exit__(self, *exc_info: Any) -> None:
        self._closed.set()
        self._close_http()
        super().__exit__(*exc_info)
        if self.metrics is not None:
            self.metrics.close()

    def _close_http(self) -> None:
        if self.http is not None:
            self.http.close()

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
            self.count_rejected("draining")
            raise flight.FlightUnavailableError("server is shutting down; retry on another server",
                                                extra_info=protocol.error_info(protocol.CODE_BUSY))
        self.stats.add(requests=1)
        call = Call(peer=context.peer())
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
            if isinstance(exc, (Cancelled, CancelledError)) or context.is_cancelled():
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

    def _claim_slot(self, call: Call) -> None:
        """Take one of the ``max_concurrent_exchanges`` slots when the exchange's first batch arrives (a
        client that opened an exchange and sends nothing holds none), or fail fast with "busy"."""
        if call.slot:
            return
        if not self.acquire_slot(protocol.VIA_FLIGHT):
            raise _Busy(busy_error(self.config.limits.max_concurrent_exchanges))
        call.slot = True

    def _release_slot(self, call: Call) -> None:
        """Give the exchange's slot back (once, whoever asks first: the exchange or the idle watchdog)."""
        with self._slot_lock:
            if not call.slot:
                return
            call.slot = False
        self.release_slot()

    def acquire_slot(self, via: str) -> bool:
        """Take one of the ``max_concurrent_exchanges`` slots, which Flight exchanges and HTTP requests share;
        False (counted as a "busy" rejection) when all are taken. Give it back with :meth:`release_slot`."""
        if not self._slots.acquire(blocking=False):
            self.stats.add(rejected_busy=1)
            self.count_rejected("busy", via)
            return False
        self.stats.add(active_exchanges=1)
        if self.metrics is not None:
            self.metrics.active.inc()
        return True

    def release_slot(self) -> None:
        """Give back a slot taken with :meth:`acquire_slot`."""
        self.stats.add(active_exchanges=-1)
        self._slots.release()
        if self.metrics is not None:
            self.metrics.active.dec()

    @property
    def draining(self) -> bool:
        """The server is shutting down: new calls are refused."""
        return self._draining.is_set()

    @property
    def aborting(self) -> bool:
        """The shutdown's grace period is nearly over: running calls are stopped."""
        return self._abort.is_set()

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

    def _expire(self, call: Call, timeout: float) -> None:
        call.expired = (f"exchange cancelled: no progress for {timeout:g} s (the server had nothing to read from "
                        "the client and could not write to it); keep reading results while sending batches, and "
                        "close the stream when done (the server's limit: serve --idle-timeout-s)")
        call.stop.set()  # the scheduler drops this exchange's queued rows; the exchange ends at its next step
        self._release_slot(call)
        self.stats.add(idle_cancelled=1, stalled_exchanges=1)
        self._log.log(logging.WARNING, "idle", "cancelled an idle exchange peer=%s model=%s input=%s after %g s "
                      "without progress; its slot is free", call.peer, call.model, call.input, timeout)

    def token_rejected(self, via: str = protocol.VIA_FLIGHT) -> None:
        """Count a call refused for its bearer token (``via``: ``flight`` or ``http``)."""
        self.stats.add(rejected_auth=1)
        self.count_rejected("auth", via)

    def count_rejected(self, reason: str, via: str = protocol.VIA_FLIGHT) -> None:
        """Count a call refused before any work (``reason``: busy, draining, auth; ``via``: ``flight`` or
        ``http``) in the metrics."""
        if self.metrics is not None:
            self.metrics.count_rejected(reason, via)

    def _call_done(self, call: Call, outcome: str) -> None:
        seconds = time.perf_counter() - call.t0
        if self.metrics is not None:
            self.metrics.request_done(call.model, call.input, outcome, seconds)
        log.info("exchange end peer=%s model=%s input=%s outcome=%s batches=%d rows=%d row_errors=%d "
                 "seconds=%.3f%s", call.peer, call.model, call.input, outcome, call.batches, call.rows,
                 call.row_errors, seconds, f" error={json.dumps(call.error)}" if call.error else "")

    def _exchange(self, context, descriptor, reader, writer, call: Call) -> None:
        """Validate the whole request before any work, then run the exchange pipeline."""
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise protocol.ProtocolError("do_exchange needs FlightDescriptor.for_command(<JSON command>); "
                                         f"got a {descriptor.descriptor_type} descriptor")
        command = protocol.parse_command(descriptor.command, self.config.limits.max_command_bytes)
        name, model = self.check_command(command, call)
        Exchange(context, reader, writer, call, self.config.limits, self._abort,
                 on_batch=self._batch_arrived, on_written=self._batch_written).run(model, command)

    def _batch_arrived(self, call: Call, batch: pa.RecordBatch) -> None:
        self._claim_slot(call)
        self.stats.add(input_bytes=batch.nbytes)

    def _batch_written(self, call: Call, rows: int, failed: int) -> None:
        call.batches += 1
        call.rows += rows
        call.row_errors += failed
        self.stats.add(batches=1, rows=rows, row_errors=failed)
        if self.metrics is not None:
            self.metrics.batch_done(call.model, call.input, rows, failed)

    def check_command(self, command: protocol.EmbedCommand, call: Any = None) -> tuple[str, Any]:
        """The served (name, model) of ``command``, after checking the model takes its input kind prompt and output options;
        raises ProtocolError (UnknownModelError). Sets ``call.model`` and ``call.input`` once the model is
        known. Both protocols check a request here before any work."""
        name, model = self._resolve(command.model)
        if call is not None:
            call.model, call.input = name, command.input
        self._check_modality(name, model, command.input)
        self._check_prompt(name, model, command.prompt_name)
        self._check_output(name, model, command)
        return name, model

    def submit_rows(self, model: Any, command: protocol.EmbedCommand, values: pa.Array | tuple[pa.Array, ...],
                    cancelled: Callable[[], bool]) -> Future:
        """Hand rows to ``model`` (its scheduler) as ``command`` says: one column, a Future of its EmbedResult
        (see :func:`flight_server.exchange.checked_result`); ``pairs`` input, (queries, documents), a Future of
        its ScoreResult. Request-level faults raise here. The HTTP front's engine calls."""
        if isinstance(values, tuple):
            rows: Any = tuple(protocol.engine_column(command.input, v) for v in values)
        else:
            rows = protocol.engine_column(command.input, values)
        return submitter(model, command, cancelled)(rows, command.normalize)

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

    def _check_output(self, name: str, model: Any, command: protocol.EmbedCommand) -> None:
        """Refuse ``dimensions`` the model cannot give (engine.output.OutputOptions.check), before any work."""
        options = protocol.output_options(command.dimensions, command.output_dtype)
        options.check(int(model.info.dim), getattr(model.info, "matryoshka_dims", None), f"model {name!r}")

    # ---- discovery --------------------------------------------------------------------

    def _flight_info(self, name: str, command: protocol.EmbedCommand | None = None) -> flight.FlightInfo:
        """A model's FlightInfo; its schema is the output of ``command`` (its options) when one is given."""
        model = self._models[name]
        meta = protocol.model_metadata(name, model.info, default=name == self._default)
        endpoints = [flight.FlightEndpoint(b"", [uri]) for uri in self.advertised_locations()]
        schema = protocol.result_schema(model.info)  # a reranker's: score, error
        if command is not None and protocol.PAIRS not in model.info.modalities:
            self._check_output(name, model, command)
            schema = protocol.output_schema(int(model.info.dim), (), command.dimensions, command.output_dtype)
        return flight.FlightInfo(schema,
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
        """FlightInfo of the model a path ``[name]`` or an embed command names (for a command: the schema of its
        output, with its ``dimensions`` and ``output_dtype``)."""
        try:
            if descriptor.descriptor_type == flight.DescriptorType.PATH:
                if len(descriptor.path) != 1:
                    raise protocol.ProtocolError(f"expected a path of one model name; got "
                                                 f"{protocol.quote(descriptor.path)}")
                return self._flight_info(self._resolve(descriptor.path[0].decode("utf-8", "replace"))[0])
            command = protocol.parse_command(descriptor.command, self.config.limits.max_command_bytes)
            return self._flight_info(self._resolve(command.model)[0], command)
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
            doc = self.models_metadata()
        elif kind == protocol.ACTION_STATS:
            doc = self.stats.snapshot()
        elif kind == protocol.ACTION_LIMITS:
            doc = self.config.limits.as_dict()
        else:
            raise to_flight_error(protocol.ProtocolError(
                f"unknown action {protocol.quote(kind)}; expected one of {list(protocol.ACTIONS)}"))
        return iter([json.dumps(doc).encode("utf-8")])

    def models_metadata(self) -> list[dict[str, Any]]:
        """The ``models`` action's answer: each served model's metadata, default first."""
        return [protocol.model_metadata(n, self._models[n].info, default=n == self._default)
                for n in self.model_names]

    def readiness(self) -> dict[str, Any]:
        """The ``ready`` action's answer (also the HTTP front's ``GET /ready``)."""
        return self._readiness()

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
