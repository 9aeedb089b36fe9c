"""Bearer-token authentication for every Flight call (server middleware) and every HTTP request.

Clients send the header ``authorization: Bearer <token>`` (the scheme name in any case, as RFC 7235 allows).
The check costs the same whatever the caller sent: the SHA-256 digests of the sent and the expected token
are compared in constant time, so neither the token's bytes nor its length leak through timing. Tokens are
never logged, and rejections are logged at a bounded rate.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow.flight as flight

from engine.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
SCHEME = b"bearer"


def bearer_header(token: str) -> tuple[bytes, bytes]:
    """The (name, value) header a client sends for ``token``."""
    return AUTH_HEADER.encode(), f"Bearer {token}".encode()


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class TokenCheck:
    """Whether an ``authorization`` header carries ``Bearer <token>``; the one check both protocols use."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the bearer token must be a non-empty string")
        self._expected = _digest(token.encode("utf-8"))

    def accepts(self, values: Iterable[bytes | str]) -> bool:
        """True when one of the header ``values`` is ``Bearer <token>`` (scheme in any case)."""
        accepted = False
        for value in values:  # every value is checked: no early exit
            raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
            scheme, _, credentials = raw.strip().partition(b" ")
            match = hmac.compare_digest(_digest(credentials.strip()), self._expected)
            accepted |= match and scheme.lower() == SCHEME
        return accepted


class BearerTokenMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Rejects every call whose ``authorization`` header is not ``Bearer <token>``."""

    def __init__(self, token: str, on_reject: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._check = TokenCheck(token)
        self._on_reject = on_reject  # e.g. count the rejection in the server's stats and metrics
        self._log = RateLimitedLog(log)

    def start_call(self, info: Any, headers: dict) -> None:
        """Accept the call (return None) or raise FlightUnauthenticatedError."""
        values = headers.get(AUTH_HEADER) or headers.get(AUTH_HEADER.title()) or []
        if self._check.accepts(values):
            return None
        self._log.log(logging.WARNING, "auth", "rejected a %s call: %s bearer token", info.method,
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
