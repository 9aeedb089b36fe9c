"""Prometheus metrics of the Flight server, served over HTTP on ``--metrics-port``.

Uses ``prometheus_client`` (pure Python, no dependencies) with a registry of its own per
server, so several servers in one process (tests) do not collide. Scrape
``http://HOST:PORT/metrics``. What is exported (all prefixed ``arrowengine_``):

==============================  =========  ==========================================
name                            type       labels
==============================  =========  ==========================================
requests_total                  counter    protocol, model, input, outcome (ok|failed|cancelled|busy|shutdown|idle)
rejected_total                  counter    protocol, reason (busy|draining|auth)
rows_total                      counter    protocol, model, input
row_errors_total                counter    protocol, model, input
request_seconds                 histogram  protocol, model, input (whole exchange or HTTP request)
batch_rows                      histogram  model, queue (image|text; device batches)
batch_seconds                   histogram  model, queue (device compute per batch)
queue_rows                      gauge      model, queue (rows waiting for the device)
active_exchanges                gauge      - (Flight exchanges and HTTP requests holding a slot)
stalled_exchanges               gauge      - (cancelled as idle, their call still blocked on the client)
==============================  =========  ==========================================

Label values are bounded: ``protocol`` is ``flight`` or ``http`` (the OpenAI-compatible endpoint,
:mod:`flight_server.http_server`), ``model`` a served name (or ``-`` before the request named one),
``input`` one of the protocol's input kinds (``mixed`` for an HTTP request of images and texts). Device
batches and queues have no protocol label: rows of both protocols share them.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
from socketserver import ThreadingMixIn
from typing import Any, Callable, Mapping
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from flight_server.protocol import VIA_FLIGHT, VIA_HTTP

log = logging.getLogger(__name__)

UNKNOWN = "-"
FLIGHT, HTTP = VIA_FLIGHT, VIA_HTTP  # values of the ``protocol`` label
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """The server's metrics; :meth:`serve` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("arrowengine_requests", "do_exchange calls and HTTP requests by outcome",
                                ["protocol", "model", "input", "outcome"], registry=r)
        self.rejected = Counter("arrowengine_rejected", "calls refused before any work (busy, draining, bad token)",
                                ["protocol", "reason"], registry=r)
        self.rows = Counter("arrowengine_rows", "rows embedded (including row errors)",
                            ["protocol", "model", "input"], registry=r)
        self.row_errors = Counter("arrowengine_row_errors", "rows that failed (null embedding + error)",
                                  ["protocol", "model", "input"], registry=r)
        self.request_seconds = Histogram("arrowengine_request_seconds", "whole-exchange (or HTTP request) latency",
                                         ["protocol", "model", "input"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("arrowengine_batch_rows", "rows per device batch (scheduler)",
                                    ["model", "queue"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("arrowengine_batch_seconds", "device compute per batch",
                                       ["model", "queue"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_rows = Gauge("arrowengine_queue_rows", "rows waiting for the device",
                                ["model", "queue"], registry=r)
        self.active = Gauge("arrowengine_active_exchanges", "exchanges in progress", registry=r)
        self.stalled = Gauge("arrowengine_stalled_exchanges",
                             "exchanges cancelled as idle whose call still waits on its client", registry=r)
        self._httpd = None

    def watch_model(self, name: str, model: Any) -> None:
        """Hook a served model's scheduler, if it has one (``on_batch`` / ``queue_depth``)."""
        if hasattr(model, "on_batch"):
            model.on_batch = self.batch_observer(name)
        if hasattr(model, "queue_depth"):
            for queue in model.queue_depth():
                self.queue_rows.labels(name, queue).set_function(_depth(model, queue))

    def batch_observer(self, name: str) -> Callable[[str, int, float], None]:
        """An ``on_batch(queue, rows, seconds)`` callback for the scheduler of model ``name``."""
        def observe(queue: str, rows: int, seconds: float) -> None:
            self.batch_rows.labels(name, queue).observe(rows)
            self.batch_seconds.labels(name, queue).observe(seconds)
        return observe

    def request_done(self, model: str, kind: str, outcome: str, seconds: float, protocol: str = FLIGHT) -> None:
        """Count one finished exchange (or HTTP request)."""
        self.requests.labels(protocol, model, kind, outcome).inc()
        self.request_seconds.labels(protocol, model, kind).observe(seconds)

    def batch_done(self, model: str, kind: str, rows: int, row_errors: int, protocol: str = FLIGHT) -> None:
        """Count one output batch (an HTTP request's rows count as one)."""
        self.rows.labels(protocol, model, kind).inc(rows)
        if row_errors:
            self.row_errors.labels(protocol, model, kind).inc(row_errors)

    def count_rejected(self, reason: str, protocol: str = FLIGHT) -> None:
        """Count one call refused before any work."""
        self.rejected.labels(protocol, reason).inc()

    def serve(self, host: str, port: int, tls_files: Mapping[str, str] | None = None) -> int:
        """Serve ``/metrics`` on a daemon thread; returns the bound port (``port`` 0: any free one).

        ``tls_files``: ``{"certfile": ..., "keyfile": ...}`` for HTTPS. Each connection gets its own thread,
        and its TLS handshake runs there with a timeout (prometheus_client's own server shakes hands inside
        ``accept``: one silent connection blocked every scrape).
        """
        server_class = _MetricsServer6 if ":" in host else _MetricsServer
        self._httpd = make_server(host, port, make_wsgi_app(self.registry), server_class, _MetricsHandler)
        if tls_files:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls_files["certfile"], tls_files["keyfile"])
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True,
                                                     do_handshake_on_connect=False)
        threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True).start()
        bound = int(self._httpd.server_port)
        log.info("metrics on %s://%s:%d/metrics", "https" if tls_files else "http", host, bound)
        return bound

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:  # a failed handshake, a dropped client
        log.debug("metrics connection from %s failed", client_address, exc_info=True)


class _MetricsServer6(_MetricsServer):
    address_family = socket.AF_INET6


class _MetricsHandler(WSGIRequestHandler):
    timeout = 10  # seconds a connection may stay silent (TLS handshake included) before it is dropped

    def log_message(self, format: str, *args: Any) -> None:  # no line per scrape on stderr
        log.debug("metrics %s " + format, self.address_string(), *args)


def _depth(model: Any, queue: str) -> Callable[[], float]:
    return lambda: float(model.queue_depth().get(queue, 0))
