"""Bearer-token authentication for every Flight call, as server middleware.

Clients send the header ``authorization: Bearer <token>``. Tokens are compared in
constant time and never logged.
"""
from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any, Callable

import pyarrow.flight as flight

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"


def bearer_header(token: str) -> tuple[bytes, bytes]:
    """The (name, value) header a client sends for ``token``."""
    return AUTH_HEADER.encode(), f"Bearer {token}".encode()


class BearerTokenMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Rejects every call whose ``authorization`` header is not ``Bearer <token>``."""

    def __init__(self, token: str, on_reject: Callable[[], None] | None = None) -> None:
        super().__init__()
        if not token:
            raise ValueError("the bearer token must be a non-empty string")
        self._expected = f"Bearer {token}".encode("utf-8")
        self._on_reject = on_reject  # e.g. count the rejection in the server's stats and metrics

    def start_call(self, info: Any, headers: dict) -> None:
        """Accept the call (return None) or raise FlightUnauthenticatedError."""
        values = headers.get(AUTH_HEADER) or headers.get(AUTH_HEADER.title()) or []
        for value in values:
            raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
            if hmac.compare_digest(raw, self._expected):
                return None
        log.warning("rejected a %s call: %s bearer token", info.method,
                    "wrong" if values else "missing")
        if self._on_reject is not None:
            self._on_reject()
        raise flight.FlightUnauthenticatedError(
            "this server needs a token: send the header 'authorization: Bearer <token>' "
            "(EmbeddingClient(..., token=...))" if not values else
            "the bearer token in the 'authorization' header is not valid")


def read_token_file(path: Path, flag: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped); ValueError naming ``flag``."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read {flag} {path}: {exc}") from exc
    if not token:
        raise ValueError(f"{flag} {path} is empty; put the token in it")
    if any(c.isspace() for c in token):
        raise ValueError(f"{flag} {path} holds more than one line, or spaces inside the token; a bearer token "
                         "is one word: put it alone on the file's first line")
    return token
