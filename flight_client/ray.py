"""Embed a column of a ``ray.data.Dataset`` with ``map_batches`` over a pool of Ray actors.

Needs ``pip install "arrowengine[ray]"``; ``import flight_client`` never imports this module.
Two ways to run the model:

* ``servers=[...]``: each actor is a thin Flight client (fractional CPU) that sends its
  batches to ArrowEngine servers, round robin, moving a batch to the next server when one
  is unreachable.
* ``model_dir=...``: each actor loads the engine itself (``engine.load_model``) and embeds in
  process; give it whole CPUs (or ``num_gpus`` with ``device="cuda"``). Needs the engine too:
  ``pip install "arrowengine[ray,server]"``.

Example::

    import ray
    from flight_client.ray import embed_dataset

    ray.init(address="auto")
    ds = ray.data.read_parquet("s3://bucket/captions/")
    out = embed_dataset(ds, "caption", "text", servers=["grpc://10.0.0.5:8815"])
    out.write_parquet("s3://bucket/caption-embeddings/")

The output keeps every input column and row order, and adds ``embedding``
(``fixed_size_list<float32>[D]``, null where the row failed) and ``error`` (the reason, null
where the row is fine). A request-level fault (unknown model, missing column, a modality the
model lacks) or every server being down fails the job.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import ray
import ray.data

from engine import require_engine
from flight_client.pool import FlightEmbedder, LocalEmbedder, is_fatal
from flight_server import protocol

log = logging.getLogger(__name__)

__all__ = ["EmbedSpec", "embed_dataset"]

SERVER_NUM_CPUS = 0.25  # a Flight-client actor mostly waits on the network
ENGINE_NUM_CPUS = 1.0


@dataclass(frozen=True)
class EmbedSpec:
    """What every actor of the pool needs (pickled once into each actor)."""

    column: str
    kind: str  # "text" | "image" | "tokens"
    servers: tuple[str, ...] = ()
    model: str | None = None  # a served model's name (servers) or the ModelInfo name (engine)
    model_dir: str | None = None
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None  # engine actors: torch / image-decoding threads
    normalize: bool = True
    output_column: str = protocol.EMBEDDING_FIELD
    error_column: str = protocol.ERROR_FIELD
    token: str | None = field(default=None, repr=False)  # never in logs or Ray's task descriptions
    tls_root_certs: bytes | None = None
    timeout_s: float | None = None
    rounds: int = 3  # passes over the server list before a batch fails the job
    backoff_s: float = 0.5


def embed_dataset(ds: "ray.data.Dataset", column: str, kind: str = "text", *,
                  servers: Sequence[str] | None = None, model: str | None = None,
                  model_dir: str | Path | None = None, device: str = "cpu", precision: str = "fp32",
                  threads: int | None = None, batch_size: int = 64, concurrency: int = 2,
                  num_cpus: float | None = None, num_gpus: float | None = None,
                  normalize: bool = True, output_column: str = protocol.EMBEDDING_FIELD,
                  error_column: str = protocol.ERROR_FIELD, token: str | None = None,
                  tls_root_certs: bytes | str | Path | None = None, timeout_s: float | None = None,
                  preserve_order: bool = True) -> "ray.data.Dataset":
    """Embed ``column`` of ``ds`` -> a dataset with every input column plus embedding and error.

    Args:
        ds: the input dataset; ``column`` holds texts (string), encoded images (binary) or
            token ids (list of ints), per ``kind``.
        kind: "text", "image" or "tokens".
        servers: Flight locations (``grpc://host:port``) of ArrowEngine servers; or
        model_dir: a converted model directory (``arrowengine convert``) that every actor loads.
            It must be readable at that path on every node. Exactly one of the two.
        model: which served model (servers; default: the server's default) or the name the
            engine reports (model_dir).
        device, precision, threads: engine actors only (see ``engine.load_model``).
        batch_size: rows per ``map_batches`` call (one Flight exchange or engine call).
        concurrency: actors in the pool (fixed size).
        num_cpus: CPUs each actor reserves (default 0.25 for server actors, 1 for engine
            actors). Leave the read and write tasks some CPU: on a 2-core node, 2 engine
            actors need ``num_cpus=0.5`` or the pipeline cannot start its reads.
        num_gpus: GPUs each engine actor reserves (default 1 when ``device`` is CUDA, else 0).
        token, tls_root_certs, timeout_s: passed to each actor's Flight client.
        preserve_order: keep the input row order. Sets ``preserve_order`` on the dataset's
            ``DataContext`` (``ds.context``, shared with ``ds``); to keep the order of files
            read by ``read_parquet``, also set it on ``ray.data.DataContext.get_current()``
            before reading.
    Returns:
        a lazy ``ray.data.Dataset``; nothing runs until it is consumed or written.
    Raises:
        ValueError: arguments that cannot work together.
        engine.EngineNotInstalledError: ``model_dir=...`` on an install without the engine (the message
            names the ``server`` extra).
    """
    if kind not in protocol.EMBED_METHODS:
        raise ValueError(f"kind must be one of {sorted(protocol.EMBED_METHODS)}; got {kind!r}")
    if (servers is None) == (model_dir is None):
        raise ValueError("pass exactly one of servers=[grpc://host:port, ...] (call Flight servers) "
                         "or model_dir=... (run the engine inside the actors)")
    if servers is not None:
        if isinstance(servers, str) or not servers:
            raise ValueError(f"servers must be a non-empty list of locations; got {servers!r}")
        if num_gpus:
            raise ValueError("num_gpus is for engine actors (model_dir=...); Flight-client actors need none")
    else:
        require_engine("flight_client.ray.embed_dataset(..., model_dir=...)",
                       alternative="call running servers with embed_dataset(..., servers=[\"grpc://HOST:PORT\"])")
    if column in (output_column, error_column) or output_column == error_column:
        raise ValueError(f"column {column!r}, output_column {output_column!r} and error_column "
                         f"{error_column!r} must be three different names")
    if batch_size < 1 or concurrency < 1:
        raise ValueError(f"batch_size and concurrency must be >= 1; got {batch_size} and {concurrency}")
    if isinstance(tls_root_certs, (str, Path)):
        text = str(tls_root_certs)
        tls_root_certs = text.encode() if text.lstrip().startswith("-----BEGIN") else Path(text).read_bytes()
    spec = EmbedSpec(column=column, kind=kind, servers=tuple(servers or ()), model=model,
                     model_dir=None if model_dir is None else str(Path(model_dir).resolve()),
                     device=device, precision=precision, threads=threads, normalize=normalize,
                     output_column=output_column, error_column=error_column, token=token,
                     tls_root_certs=tls_root_certs, timeout_s=timeout_s)
    if servers is not None:
        udf: type = FlightEmbedActor
        resources = {"num_cpus": SERVER_NUM_CPUS if num_cpus is None else num_cpus}
    else:
        udf = EngineEmbedActor
        gpus = num_gpus if num_gpus is not None else (1 if device.startswith("cuda") else 0)
        resources = {"num_cpus": ENGINE_NUM_CPUS if num_cpus is None else num_cpus}
        if gpus:
            resources["num_gpus"] = gpus
    if preserve_order:
        ds.context.execution_options.preserve_order = True
    return ds.map_batches(udf, fn_constructor_args=(spec,), batch_format="pyarrow",
                          batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
                          **resources)


class _EmbedActor:
    """Shared batch handling: pick the column, embed it, append embedding and error."""

    spec: EmbedSpec
    dim: int

    def __call__(self, batch: pa.Table) -> pa.Table:
        spec = self.spec
        for name in (spec.output_column, spec.error_column):
            if name in batch.column_names:
                raise ValueError(f"the dataset already has a column {name!r}; pick another name "
                                 "with output_column= / error_column=")
        if spec.column not in batch.column_names:
            raise KeyError(f"column {spec.column!r} not in the dataset; it has {batch.column_names}")
        if batch.num_rows == 0:
            embeddings = pa.array([], type=protocol.embedding_type(self.dim))
            errors: list[str | None] = []
        else:
            (embeddings,), errors = self.embed(batch.column(spec.column).combine_chunks())  # float32: one column
        batch = batch.append_column(pa.field(spec.output_column, embeddings.type, nullable=True), embeddings)
        return batch.append_column(pa.field(spec.error_column, pa.string(), nullable=True),
                                   pa.array(errors, pa.string()))

    def embed(self, column: pa.Array) -> tuple[list[pa.Array], list[str | None]]:
        raise NotImplementedError


class EngineEmbedActor(_EmbedActor):
    """An actor that loads the engine once and embeds its batches in process."""

    def __init__(self, spec: EmbedSpec) -> None:
        import engine  # torch is imported here, in the actor, never by the driver

        engine.set_thread_defaults()  # before torch loads in this actor's process
        if spec.threads:
            import torch

            torch.set_num_threads(spec.threads)
        self.spec = spec
        model = engine.load_model(spec.model_dir, device=spec.device, precision=spec.precision,
                                  name=spec.model, threads=spec.threads)
        self.dim = model.info.dim
        self._embedder = LocalEmbedder(model, spec.kind, normalize=spec.normalize)

    def embed(self, column: pa.Array) -> tuple[list[pa.Array], list[str | None]]:
        return self._embedder.embed(column)


class FlightEmbedActor(_EmbedActor):
    """An actor that sends its batches to ArrowEngine Flight servers, round robin.

    A server that fails for its own reasons (unreachable, internal error) passes the batch to
    the next one; after ``spec.rounds`` passes over the list the batch fails the job. A
    request-level fault (invalid command, unknown model) fails it at once.
    """

    def __init__(self, spec: EmbedSpec) -> None:
        self.spec = spec
        self._embedders = [FlightEmbedder(s, spec.kind, model=spec.model, normalize=spec.normalize,
                                          token=spec.token, tls_root_certs=spec.tls_root_certs,
                                          timeout_s=spec.timeout_s) for s in spec.servers]
        self._next = random.randrange(len(self._embedders))  # actors start on different servers
        self.dim = self._call(lambda e: int(e.describe()["dimension"]))

    def embed(self, column: pa.Array) -> tuple[list[pa.Array], list[str | None]]:
        return self._call(lambda e: e.embed(column))

    def _call(self, fn: Any) -> Any:
        failures: list[str] = []
        for attempt in range(self.spec.rounds):
            if attempt:
                time.sleep(self.spec.backoff_s * 2 ** (attempt - 1))
            for _ in range(len(self._embedders)):
                embedder = self._embedders[self._next]
                self._next = (self._next + 1) % len(self._embedders)
                try:
                    return fn(embedder)
                except Exception as exc:
                    if is_fatal(exc):
                        raise
                    failures.append(f"{embedder.name}: {type(exc).__name__}: {exc}")
                    log.warning("server %s failed (%s: %s); trying the next one", embedder.name,
                                type(exc).__name__, exc)
        raise ConnectionError(f"no server answered after {self.spec.rounds} passes over {list(self.spec.servers)}; "
                              f"last errors: {'; '.join(failures[-len(self._embedders):])}; check that the "
                              "servers are up and reachable from every Ray node")

    def __del__(self) -> None:
        for embedder in getattr(self, "_embedders", ()):
            try:
                embedder.close()
            except Exception:  # closing a client of a dead server
                pass
