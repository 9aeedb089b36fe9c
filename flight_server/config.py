"""Server configuration: frozen dataclasses built once at the edge (CLI) and passed down."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.limits import RowLimits
from flight_server.protocol import MAX_COMMAND_BYTES

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


@dataclass(frozen=True)
class ServerLimits:
    """Request limits. Defaults protect a 24 GiB machine; every one is configurable (``serve --FIELD-NAME``).

    ``rows`` are the per-row limits the engine enforces (engine.limits.RowLimits: the same row errors in-process);
    the other fields are the server's own: what one exchange, one batch and one command may cost.
    """

    # The memory these defaults allow is worked out in docs/limits-and-security.md.
    rows: RowLimits = field(default_factory=RowLimits)  # token ids per row, image bytes / pixels / decoded bytes
    max_concurrent_exchanges: int = 8       # exchanges sending batches; excess ones get a fast FlightUnavailableError
    max_batch_rows: int = 8192              # rows per input batch
    max_batch_bytes: int = 64 * 1024 ** 2   # Arrow bytes per input batch (all columns); one row over it: a row error
    max_command_bytes: int = MAX_COMMAND_BYTES  # the do_exchange command JSON, checked before it is parsed
    idle_timeout_s: float = 60.0            # an exchange that neither reads nor writes this long is cancelled

    def __post_init__(self) -> None:
        if not isinstance(self.rows, RowLimits):
            raise ValueError(f"rows must be an engine.limits.RowLimits; got {type(self.rows).__name__}")
        for name in ("max_concurrent_exchanges", "max_batch_rows", "max_batch_bytes", "max_command_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(self.idle_timeout_s, (int, float)) or not 0 < self.idle_timeout_s <= 86_400:
            raise ValueError(f"idle_timeout_s must be a number of seconds in (0, 86400]; got {self.idle_timeout_s!r}")

    def as_dict(self) -> dict[str, Any]:
        """Every limit by its field name, the per-row ones included (one flat JSON object: the ``limits``
        action's answer)."""
        doc: dict[str, Any] = {f.name: getattr(self.rows, f.name) for f in fields(self.rows)}
        doc["image_formats"] = sorted(self.rows.image_formats)
        doc.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "rows"})
        return doc


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the Flight server listens."""

    host: str = "127.0.0.1"
    port: int = 8815                       # 0: the OS picks a free port (see server.port)
    limits: ServerLimits = field(default_factory=ServerLimits)
    auth_token: str | None = field(default=None, repr=False)  # never printed or logged
    tls_cert: Path | None = None           # PEM certificate chain
    tls_key: Path | None = None            # PEM private key
    insecure: bool = False                 # allow a non-loopback host without TLS
    shutdown_grace_s: float = 10.0         # in-flight exchanges get this long on shutdown
    batch_wait_ms: float = 50.0            # a partial device batch waits this long for other clients' rows (only while one is preparing)
    metrics_port: int | None = None        # serve Prometheus /metrics on host:port (0: any free port)
    http_port: int | None = None           # also serve the OpenAI-compatible HTTP API on host:port (0: any free port)
    advertise: tuple[str, ...] = ()        # URIs FlightInfo endpoints name (default: the bound address)

    def __post_init__(self) -> None:
        for what, port in (("metrics", self.metrics_port), ("HTTP", self.http_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{what} port must be in 0..65535; got {port}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch wait must be 0..1000 ms; got {self.batch_wait_ms}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key); "
                             f"got cert={self.tls_cert} key={self.tls_key}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535; got {self.port}")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("the auth token is empty; put a non-empty token in the token file")
        if not self.tls and not self.insecure and not is_loopback(self.host):
            raise ValueError(f"refusing to listen on non-loopback host {self.host!r} without TLS: "
                             "pass --tls-cert and --tls-key, or --insecure to accept plaintext")

    @property
    def tls(self) -> bool:
        """Whether the server speaks TLS."""
        return self.tls_cert is not None

    @property
    def location(self) -> str:
        """The gRPC URI to bind, e.g. ``grpc+tls://0.0.0.0:8815``."""
        scheme = "grpc+tls" if self.tls else "grpc+tcp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
