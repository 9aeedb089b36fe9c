"""The OpenAI-compatible HTTP API, served beside Arrow Flight by the same server process.

``arrowengine serve --http-port PORT`` (``ServerConfig.http_port``) starts an :class:`HttpFront` inside the
:class:`~flight_server.servicer.EmbeddingServer`: a Starlette app under uvicorn, on its own thread and event
loop, on the Flight server's host, with its TLS files and bearer token. Endpoints:

- ``POST /v1/embeddings``: OpenAI's embeddings request and response (:mod:`flight_server.openai_api`);
- ``POST /rerank``: a query and texts -> scores, best first, in text-embeddings-inference's shape
  (:mod:`flight_server.rerank_api`), for a reranker;
- ``GET /v1/models``, ``GET /v1/models/{name}``: the served models, OpenAI's shape plus our metadata;
- ``GET /health``: liveness (the Flight ``health`` action); ``GET /ready``: the Flight ``ready`` action's
  answer, status 200 when ready and 503 when not.

Every endpoint needs ``Authorization: Bearer <token>`` when the server has a token (401 otherwise). An
embeddings or rerank request takes one of the server's ``--max-concurrent-exchanges`` slots, which it shares
with Flight exchanges, before its body is read (429 when none is free), so at most that many bodies are held at
once; its body may be at most ``--max-batch-bytes`` (413) and ``--max-batch-rows`` rows (413), and must arrive
without a pause of ``--idle-timeout-s`` (408). The rows go to the model's scheduler as a Flight exchange's
would (the same ``EmbedCommand``, the same ``submit``), so rows of both protocols share device batches. A client that
disconnects cancels its queued rows. While the server drains, new requests get 503; one still running when the
grace period runs out is stopped with 503. Errors are OpenAI's ``{"error": {...}}`` JSON at every status.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from engine.errors import ArrowEngineError, InputError, SchedulerClosed
from engine.output import convert
from engine.ratelog import RateLimitedLog
from flight_server import openai_api, protocol, rerank_api
from flight_server.auth import TokenCheck
from flight_server.openai_api import ApiError
from flight_server.exchange import checked_result, checked_scores

log = logging.getLogger(__name__)

JSON = "application/json"
START_TIMEOUT_S = 30.0  # the uvicorn thread must be serving within this long
STOP_TIMEOUT_S = 5.0    # open connections get this long to finish when the front closes
DISCARD_FACTOR = 4      # a declared body up to this many times the limit is read (and dropped) before the 413


class _ClientGone(Exception):
    """The client disconnected while its rows were queued."""


class _HttpCall:
    """One embeddings request, for its log line and metrics."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.model = "-"
        self.input = "-"
        self.rows = self.row_errors = 0
        self.t0 = time.perf_counter()


class HttpFront:
    """Serves the HTTP API of ``server`` (an EmbeddingServer) on ``server.config.http_port`` until :meth:`close`.

    Binds in the constructor (an OSError for a port in use) and returns once uvicorn serves; ``port`` is the
    bound port.
    """

    def __init__(self, server: Any) -> None:
        self.server = server
        config = server.config
        self.limits = config.limits
        self._token = TokenCheck(config.auth_token) if config.auth_token is not None else None
        self._log = RateLimitedLog(log)
        self._created = int(time.time())
        # Each embeddings request holds a slot while it runs here, so there are never more tasks than workers.
        self._pool = ThreadPoolExecutor(max_workers=self.limits.max_concurrent_exchanges,
                                        thread_name_prefix="http-embed")
        app = Starlette(routes=[
            Route("/v1/embeddings", self._guarded(self.embeddings), methods=["POST"]),
            Route("/rerank", self._guarded(self.rerank), methods=["POST"]),
            Route("/v1/models", self._guarded(self.models), methods=["GET"]),
            Route("/v1/models/{name:path}", self._guarded(self.model), methods=["GET"]),
            Route("/health", self._guarded(self.health), methods=["GET"]),
            Route("/ready", self._guarded(self.ready), methods=["GET"]),
        ], exception_handlers={HTTPException: _http_exception, Exception: _internal_error})
        tls = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)} if config.tls else {}
        self._uvicorn = uvicorn.Server(uvicorn.Config(
            app, log_config=None, log_level="warning", access_log=False, lifespan="off", server_header=False,
            timeout_graceful_shutdown=STOP_TIMEOUT_S, **tls))
        self._socket = _bind(config.host, config.http_port)
        self.port: int = self._socket.getsockname()[1]
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="http-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._uvicorn.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._uvicorn.started:
            self.close()
            raise OSError(f"the HTTP API did not start on port {self.port}: {self._failure!r}")
        scheme = "https" if config.tls else "http"
        host = f"[{config.host}]" if ":" in config.host else config.host
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", scheme, host, self.port)

    def _serve(self) -> None:
        try:
            self._uvicorn.run(sockets=[self._socket])
        except BaseException as exc:  # noqa: BLE001 - reported by the constructor, or logged
            self._failure = exc
            if self._uvicorn.started:
                log.error("the HTTP API stopped: %s", exc)

    def close(self) -> None:
        """Stop serving: close the listener and open connections (their requests finish first, within
        ``STOP_TIMEOUT_S``), end the uvicorn thread and the worker threads. Idempotent."""
        self._uvicorn.should_exit = True
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(STOP_TIMEOUT_S + 2)
            if self._thread.is_alive():
                self._uvicorn.force_exit = True
                self._thread.join(STOP_TIMEOUT_S)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._socket.close()

    # ---- the endpoints ------------------------------------------------------------------------------------

    def _guarded(self, endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """``endpoint`` behind the bearer token; an ApiError it raises becomes OpenAI's error response."""
        async def guarded(request: Request) -> Response:
            try:
                self._authorize(request)
                return await endpoint(request)
            except ApiError as exc:
                return _error_response(exc)
        return guarded

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        values = request.headers.getlist("authorization")
        if self._token.accepts(values):
            return
        self._log.log(logging.WARNING, "auth", "rejected an HTTP %s %s: %s bearer token", request.method,
                      request.url.path, "wrong" if values else "missing")
        self.server.token_rejected(protocol.VIA_HTTP)
        raise ApiError(401, "this server needs a token: send the header 'Authorization: Bearer <token>' (the "
                            "OpenAI client's api_key)" if not values else
                       "the bearer token in the 'Authorization' header is not valid", "invalid_api_key",
                       type=openai_api.AUTHENTICATION)

    async def health(self, request: Request) -> Response:
        return _json({"status": "ok", "uptime_s": self.server.stats.snapshot()["uptime_s"]})

    async def ready(self, request: Request) -> Response:
        doc = self.server.readiness()
        return _json(doc, 200 if doc["ready"] else 503)

    async def models(self, request: Request) -> Response:
        return Response(openai_api.models_response(self.server.models_metadata(), self._created), media_type=JSON)

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        found = [m for m in self.server.models_metadata() if m["name"] == name]
        if not found:
            raise ApiError(404, f"unknown model {protocol.quote(name)}; this server serves "
                                f"{self.server.model_names}", "model_not_found", param="model")
        return _json(openai_api.model_entry(found[0], self._created))

    async def embeddings(self, request: Request) -> Response:
        """``POST /v1/embeddings``."""
        return await self._rows_request(request, self._embed)

    async def rerank(self, request: Request) -> Response:
        """``POST /rerank``."""
        return await self._rows_request(request, self._rerank)

    async def _rows_request(self, request: Request, work: Callable[[list, threading.Event, _HttpCall], bytes]
                            ) -> Response:
        """A request that runs rows on a model: check, take a slot, read the body, run ``work(body, stop, call)``
        on a worker thread (it parses the body, runs the engine calls and returns the JSON answer, or raises
        ApiError), answer. A new endpoint of this kind is a route and its ``work``."""
        server = self.server
        call = _HttpCall(peer=f"{request.client.host}:{request.client.port}" if request.client else "-")
        if server.draining:
            server.count_rejected("draining", protocol.VIA_HTTP)
            raise ApiError(503, "server is shutting down; retry on another server", "shutting_down",
                           type=openai_api.UNAVAILABLE)
        if not server.acquire_slot(protocol.VIA_HTTP):
            self._done(call, "busy", 429)
            return _error_response(ApiError(
                429, f"server busy: {self.limits.max_concurrent_exchanges} requests already running (the limit, "
                     "shared with Flight exchanges); retry with backoff, or start the server with a higher "
                     "--max-concurrent-exchanges", "busy", type=openai_api.RATE_LIMIT), retry_after=True)
        server.stats.add(requests=1)
        outcome, status = "failed", 500
        try:
            body = [await self._read_body(request)]  # handed over: the worker drops it once parsed
            server.stats.add(input_bytes=len(body[0]))
            stop = threading.Event()
            running = asyncio.get_running_loop().run_in_executor(self._pool, work, body, stop, call)
            content = await self._unless_disconnected(running, request, stop)
            outcome, status = "ok", 200
            return Response(content, media_type=JSON)
        except ApiError as exc:
            outcome, status = ("shutdown" if exc.code == "shutting_down" else "failed"), exc.status
            if outcome == "failed":
                server.stats.add(requests_failed=1)
            return _error_response(exc)
        except (_ClientGone, ClientDisconnect):
            outcome, status = "cancelled", 499
            server.stats.add(requests_cancelled=1)
            return Response(status_code=499)
        finally:
            server.release_slot()
            self._done(call, outcome, status)

    async def _read_body(self, request: Request) -> bytearray:
        """The body, at most ``max_batch_bytes`` (413), each part within ``idle_timeout_s`` (408)."""
        limit = self.limits.max_batch_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # A client that sends its whole body before it reads (Python's urllib) would see a reset connection
            # rather than the 413, so a body a few times the limit is read and dropped first; one that asked
            # "Expect: 100-continue" (curl) gets the 413 instead of the go-ahead.
            if "expect" not in request.headers and int(declared) <= DISCARD_FACTOR * limit:
                async for _ in self._chunks(request):
                    pass
            raise _too_large(int(declared), limit)
        body = bytearray()
        async for chunk in self._chunks(request):
            body += chunk
            if len(body) > limit:
                raise _too_large(len(body), limit, at_least=True)
        return body

    async def _chunks(self, request: Request):
        """The body's parts as they come; 408 when one takes over ``idle_timeout_s``."""
        stream = request.stream().__aiter__()
        while True:
            try:
                yield await asyncio.wait_for(stream.__anext__(), self.limits.idle_timeout_s)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body stopped arriving for {self.limits.idle_timeout_s:g} s "
                                    "(serve --idle-timeout-s); send it whole", "request_timeout") from None

    async def _unless_disconnected(self, work: asyncio.Future, request: Request, stop: threading.Event) -> bytes:
        """``work``'s result; if the client disconnects first, ``stop`` is set (its queued rows are dropped)."""
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                stop.set()
            return await work
        finally:
            watch.cancel()

    def _embed(self, body: list[bytearray], stop: threading.Event, call: _HttpCall) -> bytes:
        """``POST /v1/embeddings`` on a worker thread: parse, run the engine calls, build the answer. Memory: the
        body is freed once parsed, the parsed rows once they are Arrow columns."""
        request = openai_api.parse_embeddings_request(body.pop(), self.limits.max_batch_rows)
        calls = openai_api.engine_calls(request)
        n, encoding = len(request.rows), request.encoding_format
        del request
        name, results = self._run_calls(calls, stop, call)
        dimensions = calls[0].command.dimensions
        if dimensions is not None:  # Matryoshka truncation as the Flight path does it (normalized again)
            options = protocol.output_options(dimensions)
            results = [(convert(e, options, c.command.normalize).values, errs, t)
                       for c, (e, errs, t) in zip(calls, results)]
        if len(calls) == 1:
            out = results[0][0]  # the engine's own buffer (or the truncation's), no copy
        else:
            out = np.zeros((n, results[0][0].shape[1]), np.float32)
            for c, (embeddings, _, _) in zip(calls, results):
                out[c.index] = embeddings
        errors = sorted((int(c.index[j]), e) for c, (_, row_errors, _) in zip(calls, results)
                        for j, e in enumerate(row_errors) if e is not None)
        self._rows_done(name, call, n, len(errors))
        if errors:
            raise openai_api.row_errors(errors)
        return openai_api.embeddings_response(name, out, sum(tokens for _, _, tokens in results), encoding)

    def _run_calls(self, calls: list[openai_api.EngineCall], stop: threading.Event, call: _HttpCall,
                   check_model: Callable[[str, Any], None] | None = None
                   ) -> tuple[str, list[tuple[np.ndarray, list, int]]]:
        """Check and run engine calls (all on one model), each as a Flight exchange's batch of the same rows with
        the same command runs: (the model's served name, per call (embeddings, or scores of pairs, errors, tokens
        used)). ``check_model(name, model)`` may refuse the model with an ApiError. Raises ApiError, or
        _ClientGone when ``stop`` is set."""
        server = self.server
        try:
            checked = [server.check_command(c.command, call) for c in calls]
        except (protocol.ProtocolError, InputError) as exc:  # InputError: e.g. dimensions over the model's
            raise openai_api.from_protocol_error(exc) from None
        if len(calls) > 1:
            call.input = "mixed"
        name, model = checked[0]
        if check_model is not None:
            check_model(name, model)

        def cancelled() -> bool:
            return stop.is_set() or server.aborting

        try:
            futures = [server.submit_rows(model, c.command, c.values, cancelled) for c in calls]
        except (InputError, protocol.ProtocolError) as exc:
            raise openai_api.from_protocol_error(exc) from None
        dim = int(model.info.dim)

        def check(result: Any, n: int) -> tuple[np.ndarray, list]:
            if calls[0].command.input != protocol.PAIRS:
                return checked_result(result, n, dim)
            return checked_scores(result, (n,))

        return name, [self._collect(f, len(c.index), check, stop) for c, f in zip(calls, futures)]

    def _rerank(self, body: list[bytearray], stop: threading.Event, call: _HttpCall) -> bytes:
        """``POST /rerank`` on a worker thread: parse, score the (query, text) pairs, rank them."""
        request = rerank_api.parse_rerank_request(body.pop(), self.limits.max_batch_rows, self.limits.max_batch_bytes)
        engine_call = rerank_api.engine_call(request)

        def check_model(name: str, model: Any) -> None:
            rerank_api.check_scores(request.raw_scores, model.info.score_activation, int(model.info.dim), name)

        name, [(scores, errors, _)] = self._run_calls([engine_call], stop, call, check_model)
        failed = [(i, e) for i, e in enumerate(errors) if e is not None]
        self._rows_done(name, call, len(request.texts), len(failed))
        if failed:
            raise openai_api.row_errors(failed, field="texts", done="scored")
        return rerank_api.rerank_response(request, scores)

    def _rows_done(self, name: str, call: _HttpCall, rows: int, row_errors: int) -> None:
        call.rows, call.row_errors = rows, row_errors
        self.server.stats.add(batches=1, rows=rows, row_errors=row_errors)
        if self.server.metrics is not None:
            self.server.metrics.batch_done(name, call.input, rows, row_errors, protocol.VIA_HTTP)

    def _collect(self, future, n: int, check: Callable[[Any, int], tuple[np.ndarray, list]], stop: threading.Event
                 ) -> tuple[np.ndarray, list, int]:
        """(embeddings or scores, errors, tokens used) of one engine call, its result passed through ``check``;
        raises what the request's answer is."""
        try:
            result = future.result()
            embeddings, errors = check(result, n)
        except (CancelledError, SchedulerClosed):
            if stop.is_set():
                raise _ClientGone() from None
            raise ApiError(503, "server is shutting down; send the request again to another server",
                           "shutting_down", type=openai_api.UNAVAILABLE) from None
        except Exception as exc:
            log.error("an HTTP request's %d rows failed in the engine", n, exc_info=exc)
            what = f"{type(exc).__name__}: {exc}" if isinstance(exc, ArrowEngineError) else type(exc).__name__
            raise ApiError(500, f"internal error while embedding ({what}); send the request again, and see the "
                                "server log if it persists", "internal_error", type=openai_api.SERVER_ERROR) from None
        tokens = getattr(result, "tokens", None)
        return embeddings, errors, 0 if tokens is None else int(np.sum(tokens))

    def _done(self, call: _HttpCall, outcome: str, status: int) -> None:
        seconds = time.perf_counter() - call.t0
        if self.server.metrics is not None:
            self.server.metrics.request_done(call.model, call.input, outcome, seconds, protocol.VIA_HTTP)
        log.info("http request end peer=%s model=%s input=%s outcome=%s status=%d rows=%d row_errors=%d "
                 "seconds=%.3f", call.peer, call.model, call.input, outcome, status, call.rows, call.row_errors,
                 seconds)


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); OSError when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _too_large(size: int, limit: int, at_least: bool = False) -> ApiError:
    return ApiError(413, f"the request body is {'over ' if at_least else ''}{size} bytes; the limit is {limit} bytes "
                         "(serve --max-batch-bytes): send fewer or smaller rows per request", "limit_exceeded")


def _json(doc: Any, status: int = 200) -> Response:
    return Response(json.dumps(doc).encode("utf-8"), status_code=status, media_type=JSON)


def _error_response(exc: ApiError, retry_after: bool = False) -> Response:
    headers = {"Retry-After": "1"} if retry_after else {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return Response(exc.body(), status_code=exc.status, media_type=JSON, headers=headers)


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Routing errors (unknown path, wrong method) in OpenAI's error shape."""
    if exc.status_code == 404:
        message = (f"no endpoint {protocol.quote(request.url.path)}; this server has POST /v1/embeddings, "
                   "POST /rerank, GET /v1/models, GET /health and GET /ready")
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {protocol.quote(request.url.path)}"
    else:
        message = str(exc.detail)
    headers = dict(exc.headers or {})
    return Response(ApiError(exc.status_code, message, "not_found" if exc.status_code == 404 else "invalid_request",
                             param=None).body(), status_code=exc.status_code, media_type=JSON, headers=headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error while serving HTTP %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(ApiError(500, f"internal server error ({type(exc).__name__}); see the server log",
                                    "internal_error", type=openai_api.SERVER_ERROR))
