"""Engine and protocol errors -> Flight errors, in one place.

Flight errors carry a clean message (what was expected, what came, what to do) and a
machine-readable ``extra_info`` JSON ``{"code": ...}`` (see ``protocol.CODE_*``). We raise
``FlightError`` subclasses rather than ``pa.ArrowInvalid``: pyarrow appends the server's
Python traceback to the message of non-Flight exceptions, which clients should not see.
"""
from __future__ import annotations

import logging

import pyarrow.flight as flight

from engine.errors import ArrowEngineError, InputError
from flight_server import protocol

log = logging.getLogger(__name__)


def to_flight_error(exc: BaseException) -> flight.FlightError:
    """Map any exception raised while serving a call to the Flight error the client gets.

    - Flight errors pass through unchanged (the server builds them from quoted input only).
    - Every other message is cut to ``protocol.MAX_ERROR_CHARS``.
    - ``protocol.ProtocolError`` (bad command, unknown model, missing/wrong column, limit)
      and the engine's ``InputError`` (incl. ``ModalityError``) -> ``FlightServerError``
      with the original message and code ``invalid_argument`` / ``not_found`` /
      ``limit_exceeded``.
    - Any other ``ArrowEngineError`` -> ``FlightInternalError`` naming the error type.
    - Anything else -> ``FlightInternalError``; the traceback goes to the server log only.
    """
    if isinstance(exc, flight.FlightError):
        return exc
    message = protocol.cut_message(str(exc))  # gRPC carries it in trailers of a few KB; logs stay readable too
    if isinstance(exc, protocol.ProtocolError):
        return flight.FlightServerError(message, extra_info=protocol.error_info(exc.code))
    if isinstance(exc, InputError):
        return flight.FlightServerError(message, extra_info=protocol.error_info(protocol.CODE_INVALID))
    if isinstance(exc, ArrowEngineError):
        log.error("engine error while serving a call: %s: %s", type(exc).__name__, message)
        return flight.FlightInternalError(f"{type(exc).__name__}: {message}",
                                          extra_info=protocol.error_info(protocol.CODE_INTERNAL))
    log.error("unexpected error while serving a call", exc_info=exc)
    return flight.FlightInternalError(
        f"internal server error ({type(exc).__name__}); see the server log",
        extra_info=protocol.error_info(protocol.CODE_INTERNAL))


def busy_error(limit: int) -> flight.FlightUnavailableError:
    """The fast rejection for an exchange over the concurrency limit."""
    return flight.FlightUnavailableError(
        f"server busy: {limit} exchanges already running (the limit); retry with backoff, "
        "or start the server with a higher --max-concurrent-exchanges",
        extra_info=protocol.error_info(protocol.CODE_BUSY))
