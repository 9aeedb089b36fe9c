"""Resumable bulk embedding jobs: INPUT (Parquet or image folder) -> OUTPUT (Parquet shards or a Lance dataset).

One job reads its input batch by batch (:mod:`flight_client.job_io`), shares the batches
among the engine in this process or several Flight servers (:mod:`flight_client.pool`),
and writes ``part-NNNNN.parquet`` shards in input order, each renamed into place
atomically and then recorded in ``_job.json`` (also replaced atomically); or, for an
OUTPUT ending in ``.lance``, one Lance commit per shard (:mod:`flight_client.lance_output`). Example::

    from flight_client.jobs import JobConfig, run_job
    summary = run_job(JobConfig(input=Path("texts.parquet"), output=Path("out"), kind="text",
                                servers=("grpc://127.0.0.1:8815",), passthrough=("id",)))

Resume: a rerun with ``resume=True`` checks the input fingerprint and the settings against
the manifest, removes temp files and unrecorded shards (Lance: records a commit the manifest
missed, deletes files of a commit that never happened), and starts at the first row after
the last recorded shard. Shards are whole multiples of ``batch_rows``, so the resumed run
hands the engine exactly the batches an uninterrupted run would: same embeddings.

Importing this module does not import torch; the in-process engine is loaded on demand (it needs
the ``server`` extra; embedding through servers needs only the base install).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.flight as flight

from convert import store
from engine import EngineNotInstalledError, require_engine, set_thread_defaults
from engine.errors import InputError
from flight_client import lance_output
from flight_client.job_io import (MANIFEST_NAME, IMAGE_COLUMN, ImageFolderSource, JobInputError,
                                  JobManifest, ParquetSource, ShardWriter, clean_output, open_source)
from flight_client.pool import FATAL_CODES, AllEndpointsFailed, EndpointPool, FlightEmbedder, LocalEmbedder
from flight_server import protocol

log = logging.getLogger("arrowengine.embed")

# Settings recorded in the manifest that a resumed run must repeat (they decide the output).
RESUME_KEYS = ("kind", "column", "model", "passthrough", "batch_rows", "shard_rows", "normalize", "precision",
               "prompt_name", "format", "dimensions", "output_dtype", "truncate")
# What a manifest written before a setting existed means by its absence.
RESUME_DEFAULTS = {"format": "parquet", "dimensions": None, "output_dtype": "float32", "truncate": True}
OUTPUT_FORMATS = ("parquet", "lance")


class JobError(RuntimeError):
    """The job cannot start or cannot go on; the message says why and what to do."""


class JobUsageError(JobError):
    """The job's input, output folder, model or settings do not allow it to start.

    Running the same command again cannot succeed (the CLI exits 2); a plain :class:`JobError`
    is a stop that a rerun with ``--resume`` can get past (exit 1).
    """


@dataclass(frozen=True)
class JobConfig:
    """One bulk job, built once at the edge (CLI) and passed down."""

    input: Path                               # Parquet file/folder, or folder of images
    output: Path                              # folder of part-NNNNN.parquet + _job.json, or a Lance dataset
    kind: str                                 # "image" | "text" | "tokens"
    column: str | None = None                 # input column (default: protocol.DEFAULT_COLUMNS)
    model: str | None = None                  # server model name, or in-process model dir / cache name
    servers: tuple[str, ...] = ()             # Flight locations; empty: in-process engine
    batch_rows: int = 64                      # rows per engine call / exchange
    shard_rows: int = 8192                    # rows per output shard (rounded up to batch_rows)
    resume: bool = False                      # continue the job already in `output`
    passthrough: tuple[str, ...] | None = None  # input columns copied to the output (None: all but the embedded)
    format: str | None = None                 # "parquet" | "lance" (None: lance where output ends in .lance)
    index: bool = False                       # lance: build the IVF-PQ vector index at the end
    normalize: bool = True                    # L2-normalize embeddings
    prompt_name: str | None = None            # text: the model's prompt before every text (None: its default)
    dimensions: int | None = None             # keep the first K components (None: all D)
    output_dtype: str = "float32"             # float32 | float16 | int8 | uint8 | binary | ubinary
    truncate: bool = True                     # text: cut at the model's token limit (False: a row error)
    token: str | None = field(default=None, repr=False)  # bearer token for the servers
    tls_root_certs: Path | None = None        # CA of the servers (grpc+tls://)
    device: str = "cpu"                       # in-process only
    precision: str = "fp32"                   # in-process only
    cache_dir: Path | None = None             # in-process model cache (default ~/.cache/arrowengine/models)
    progress: bool = True                     # tqdm bar on stderr
    max_failures: int = 3                     # failures in a row before an endpoint is retired
    call_timeout_s: float | None = 600.0      # one batch's exchange; past it the batch goes to another server

    def __post_init__(self) -> None:
        if self.kind not in protocol.EMBED_KINDS:
            raise ValueError(f"kind must be one of {list(protocol.EMBED_KINDS)}; got {self.kind!r}")
        if self.prompt_name is not None and self.kind != "text":
            raise ValueError(f"--prompt-name applies to --kind text (a prompt goes before each text); got --kind "
                             f"{self.kind}")
        protocol.output_options(self.dimensions, self.output_dtype)  # ProtocolError (a ValueError) if bad
        if not self.truncate and self.kind == "image":
            raise ValueError("--no-truncate applies to --kind text and tokens (token limits); got --kind image")
        if self.call_timeout_s is not None and self.call_timeout_s <= 0:
            raise ValueError(f"call_timeout_s must be > 0 seconds (or None: no limit); got {self.call_timeout_s}")
        if self.batch_rows < 1 or self.shard_rows < 1:
            raise ValueError(f"batch_rows and shard_rows must be >= 1; got {self.batch_rows}, {self.shard_rows}")
        reserved = sorted(set(self.passthrough or ()) & set(protocol.RESERVED_FIELDS))
        if reserved:
            raise ValueError(f"passthrough cannot contain {reserved}: the output adds those columns")
        if self.format is not None and self.format not in OUTPUT_FORMATS:
            raise ValueError(f"format must be one of {list(OUTPUT_FORMATS)}; got {self.format!r}")
        if self.index and self.output_format != "lance":
            raise ValueError(f"--index builds a Lance vector index: it needs a Lance output (an OUTPUT ending in "
                             f".lance, or --format lance); got OUTPUT {self.output}")

    @property
    def output_format(self) -> str:
        """``format``, or where it is None: lance for an OUTPUT ending in ``.lance``, else parquet."""
        if self.format is not None:
            return self.format
        return "lance" if Path(self.output).suffix.lower() == ".lance" else "parquet"

    @property
    def input_column(self) -> str:
        return self.column or protocol.DEFAULT_COLUMNS[self.kind]

    @property
    def shard_size(self) -> int:
        """shard_rows rounded up to a whole number of batches (keeps resumed batches identical)."""
        return -(-self.shard_rows // self.batch_rows) * self.batch_rows

    def resume_args(self) -> dict[str, Any]:
        return {"kind": self.kind, "column": self.input_column, "model": self.model,
                "passthrough": None if self.passthrough is None else list(self.passthrough),
                "batch_rows": self.batch_rows, "shard_rows": self.shard_size, "normalize": self.normalize,
                "precision": None if self.servers else self.precision, "prompt_name": self.prompt_name,
                "format": self.output_format,
                "dimensions": self.dimensions, "output_dtype": self.output_dtype, "truncate": self.truncate}


@dataclass(frozen=True)
class JobSummary:
    """What a run did: totals over the whole output, and this run's share."""

    output: Path
    rows: int               # rows in the output
    errors: int             # rows with an error
    shards: int
    seconds: float          # this run
    rows_this_run: int
    resumed_from: int       # first row this run embedded
    batches: dict[str, int]  # endpoint -> batches embedded in this run

    @property
    def rows_per_s(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0


def run_job(config: JobConfig, embedders: Sequence[Any] | None = None) -> JobSummary:
    """Run (or resume) a bulk job; returns its summary.

    Args:
        config: the job.
        embedders: override the endpoints (tests); default: one FlightEmbedder per server,
            or the in-process engine when ``config.servers`` is empty.

    Raises:
        JobUsageError: the output folder, the input, the model or the settings do not allow
            the run (nothing was written).
        JobError: every endpoint failed or the job stopped part way (the finished shards are
            kept for ``--resume``).
    """
    t0 = time.perf_counter()
    output = Path(config.output)
    lance = config.output_format == "lance"
    try:
        if lance:
            lance_output.require_lance()
        previous = _check_output(config, output)
        source = open_source(Path(config.input), config.kind, config.input_column, config.passthrough,
                             output=output)
    except (JobInputError, lance_output.LanceNotInstalledError) as exc:
        raise JobUsageError(str(exc)) from exc
    if isinstance(source, ParquetSource):  # the columns the default picked are part of the job's settings
        config = dataclasses.replace(config, passthrough=source.output_columns)
    fingerprint = {"path": str(Path(config.input).resolve()), **source.fingerprint()}
    manifest = _resume_manifest(config, previous, fingerprint, output) if previous else \
        JobManifest(input=fingerprint, args=config.resume_args(), output_format=config.output_format)
    start = manifest.rows_done
    if manifest.complete:
        if config.index and not (manifest.index or {}).get("built"):
            manifest.index = lance_output.build_index(output, manifest)  # a finished job, now with an index
            manifest.save(output)
        log.info("the job in %s is already complete (%d rows, %d errors); nothing to do", output,
                 manifest.rows_done, manifest.errors)
        return JobSummary(output, manifest.rows_done, manifest.errors, len(manifest.shards), 0.0, 0, start, {})
    embedders = list(embedders) if embedders is not None else make_embedders(config)
    embedders, dim = _check_endpoints(config, embedders, manifest)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    manifest.dimension = dim
    manifest.save(output)
    if start:
        log.info("resuming %s at row %d of %d (%d shards done)", output, start, source.num_rows,
                 len(manifest.shards))
    pool = EndpointPool(embedders, max_failures=config.max_failures)
    try:
        _embed_all(config, source, manifest, pool, output, dim, t0)
    except AllEndpointsFailed as exc:
        raise JobError(f"{exc} (output so far: {manifest.rows_done} of {source.num_rows} rows)") from exc
    except Exception as exc:  # a request-level fault (the same on every endpoint), or this machine's (disk, memory)
        if not previous and manifest.rows_done == 0:  # nothing to resume: leave OUTPUT as it was
            if lance:
                lance_output.discard(output)
            (output / MANIFEST_NAME).unlink(missing_ok=True)
            if created and not any(output.iterdir()):
                output.rmdir()
            error = JobUsageError if _is_request_fault(exc) else JobError
            raise error(f"the job stopped before any row was written: {type(exc).__name__}: {exc}; "
                        f"nothing was kept in {output}: fix the cause and run the command again") from exc
        raise JobError(f"the job stopped after {manifest.rows_done} of {source.num_rows} rows: "
                       f"{type(exc).__name__}: {exc}; fix the cause and rerun with --resume (the same "
                       f"settings), or delete {output} to start over with new ones") from exc
    finally:
        for embedder in embedders:
            getattr(embedder, "close", lambda: None)()
    seconds = time.perf_counter() - t0
    summary = JobSummary(output, manifest.rows_done, manifest.errors, len(manifest.shards), seconds,
                         manifest.rows_done - start, start, dict(pool.batches_done))
    log.info("embed done: rows=%d errors=%d seconds=%.2f rows_per_s=%.1f shards=%d output=%s "
             "(this run: rows=%d from row %d; batches per endpoint %s)", summary.rows, summary.errors,
             seconds, summary.rows_per_s, summary.shards, output, summary.rows_this_run, start,
             summary.batches)
    return summary


def _embed_all(config: JobConfig, source: Any, manifest: JobManifest, pool: EndpointPool,
               output: Path, dim: int, t0: float) -> None:
    """Stream every remaining batch through the pool into the shard writer."""
    images = isinstance(source, ImageFolderSource)
    column = IMAGE_COLUMN if images else config.input_column
    kept = list(source.output_columns)
    schema = protocol.output_schema(dim, [source.schema.field(c) for c in kept], config.dimensions,
                                    config.output_dtype)
    lance = manifest.output_format == "lance"
    writer = (lance_output.LanceWriter if lance else ShardWriter)(output, manifest, config.shard_size)
    base_seconds = manifest.seconds
    errors = manifest.errors
    bar = _progress(config, source.num_rows, manifest.rows_done, errors)
    items = ((batch, batch.data.column(column)) for batch in source.batches(manifest.rows_done,
                                                                             config.batch_rows))
    try:
        for batch, outputs, row_errors in pool.map(items):
            for row, reason in batch.read_errors.items():
                row_errors[row] = reason  # the engine saw a null; say why it was null
            failed = sum(e is not None for e in row_errors)
            out = pa.RecordBatch.from_arrays(
                [*(batch.data.column(c) for c in kept), *outputs, pa.array(row_errors, pa.string())],
                schema=schema)
            manifest.seconds = base_seconds + time.perf_counter() - t0
            writer.add(out, failed)
            errors += failed
            if bar is not None:
                bar.set_postfix(errors=errors, refresh=False)  # shown by the update's refresh
                bar.update(batch.num_rows)
        writer.flush(schema if not manifest.shards else None)
        if config.index:
            if bar is not None:
                bar.close()
                bar = None
            manifest.index = lance_output.build_index(output, manifest)
        manifest.complete = True
        manifest.seconds = base_seconds + time.perf_counter() - t0
        manifest.save(output)
    finally:
        if bar is not None:
            bar.close()


def _is_request_fault(exc: BaseException) -> bool:
    """Whether the job's own request is wrong (column type, model, limits): the same command fails again. A
    full disk, memory or a crash is not: the same command may then succeed."""
    if isinstance(exc, flight.FlightError):
        return protocol.error_code(exc) in FATAL_CODES
    return isinstance(exc, (protocol.ProtocolError, InputError))


def _progress(config: JobConfig, total: int, initial: int, errors: int) -> Any:
    if not config.progress:
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="row", file=sys.stderr, dynamic_ncols=True,
               desc="embed", smoothing=0.1)
    bar.set_postfix(errors=errors)
    return bar


def _check_output(config: JobConfig, output: Path) -> JobManifest | None:
    """The manifest to resume from, or None for a fresh job; refuses a non-empty folder otherwise."""
    if output.exists() and not output.is_dir():
        raise JobUsageError(f"OUTPUT {output} is a file; expected a folder (it is created if missing)")
    entries = list(output.iterdir()) if output.is_dir() else []
    if not entries:
        return None
    if not config.resume:
        raise JobUsageError(f"OUTPUT {output} is not empty; pass --resume to continue the job there, "
                       "or pick another (empty or new) folder")
    if not (output / "_job.json").is_file():
        raise JobUsageError(f"--resume: {output} is not empty but holds no _job.json manifest, so it is "
                       "not an embed job folder; pick another folder")
    return JobManifest.load(output)


def _resume_manifest(config: JobConfig, manifest: JobManifest, fingerprint: dict[str, Any],
                     output: Path) -> JobManifest:
    # settings first: the fingerprint covers the columns read, so changed --passthrough would read as a changed input
    wanted = config.resume_args()
    recorded = {k: manifest.args.get(k, RESUME_DEFAULTS.get(k)) for k in RESUME_KEYS}
    changed = {k: (recorded[k], wanted[k]) for k in RESUME_KEYS if recorded[k] != wanted[k]}
    if changed:
        detail = ", ".join(f"{k}: job has {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise JobUsageError(f"--resume: settings differ from the job's ({detail}); rerun with the job's settings")
    if manifest.input.get("sha256") != fingerprint["sha256"]:
        raise JobUsageError(f"--resume: the input changed since the job started (recorded {manifest.input['files']} "
                       f"file(s), {manifest.input['rows']} rows, fingerprint {manifest.input['sha256'][:12]}; "
                       f"now {fingerprint['files']} file(s), {fingerprint['rows']} rows, fingerprint "
                       f"{fingerprint['sha256'][:12]}); restore the input, or start again in a new folder")
    try:
        removed = lance_output.recover(output, manifest) if manifest.output_format == "lance" else \
            clean_output(output, manifest)
    except JobInputError as exc:
        raise JobUsageError(str(exc)) from exc
    if removed:
        log.info("tidied after an interrupted run: %s", "; ".join(removed))
    return manifest


def _check_endpoints(config: JobConfig, embedders: list[Any], manifest: JobManifest) -> tuple[list[Any], int]:
    """Ask each endpoint for its model; drop unreachable ones; check modality and dimension agree."""
    modality = protocol.KIND_MODALITY[config.kind]
    usable, dims, problems = [], {}, []
    for embedder in embedders:
        try:
            meta = embedder.describe()
        except (flight.FlightUnauthenticatedError, flight.FlightUnauthorizedError) as exc:
            raise JobUsageError(f"{embedder.name} refused this job's credentials ({exc}); check --auth-token-file "
                                "(and --tls-root-certs)") from exc
        except (OSError, pa.ArrowException) as exc:
            problems.append(f"{embedder.name}: {type(exc).__name__}: {exc}")
            log.warning("endpoint %s is unreachable, going on without it: %s", embedder.name, exc)
            continue
        except LookupError as exc:
            raise JobUsageError(str(exc)) from exc
        if modality not in meta["modalities"]:
            raise JobUsageError(f"model {meta['name']!r} on {embedder.name} embeds {meta['modalities']}, not "
                           f"{config.kind!r} input; pick a model with {modality} (--model)")
        dims[embedder.name] = int(meta["dimension"])
        try:
            protocol.output_options(config.dimensions, config.output_dtype).check(
                dims[embedder.name], meta.get("matryoshka_dims"), f"model {meta['name']!r}")
        except InputError as exc:
            raise JobUsageError(f"--dimensions: {exc}") from exc
        usable.append(embedder)
    if not usable:
        raise JobError(f"no endpoint could be reached ({'; '.join(problems)}); start a server or fix --server")
    if len(set(dims.values())) > 1:
        raise JobUsageError(f"the endpoints serve models of different dimensions {dims}; they must serve the "
                            "same model")
    dim = next(iter(dims.values()))
    if manifest.dimension is not None and manifest.dimension != dim:
        raise JobUsageError(f"--resume: the job's embeddings have dimension {manifest.dimension}; the model now "
                       f"gives {dim}; use the job's model")
    return usable, dim


def make_embedders(config: JobConfig) -> list[Any]:
    """One FlightEmbedder per ``--server``; without servers, the engine loaded in this process."""
    if config.servers:
        return [FlightEmbedder(location, config.kind, model=config.model, normalize=config.normalize,
                               token=config.token, tls_root_certs=config.tls_root_certs,
                               timeout_s=config.call_timeout_s, prompt_name=config.prompt_name,
                               dimensions=config.dimensions, output_dtype=config.output_dtype,
                               truncate=config.truncate)
                for location in dict.fromkeys(config.servers)]
    try:
        require_engine("arrowengine embed without --server (in-process)",
                       alternative="embed through a running server: --server grpc://HOST:PORT")
    except EngineNotInstalledError as exc:
        raise JobUsageError(str(exc)) from exc
    set_thread_defaults()  # before torch loads
    import engine  # torch is imported here only

    try:
        model_dir = store.resolve_model_dir(config.model, config.cache_dir)
    except store.ModelNotFoundError as exc:
        raise JobUsageError(f"--model: {exc}") from exc
    log.info("loading %s in-process (device=%s precision=%s)", model_dir, config.device, config.precision)
    try:
        model = engine.load_model(model_dir, device=config.device, precision=config.precision)
    except Exception as exc:
        raise JobUsageError(f"cannot load the model {model_dir}: {type(exc).__name__}: {exc}") from exc
    return [LocalEmbedder(model, config.kind, normalize=config.normalize, prompt_name=config.prompt_name,
                          dimensions=config.dimensions, output_dtype=config.output_dtype, truncate=config.truncate)]
