"""Bulk-job output as a Lance dataset: one commit per shard, resumable exactly once in order, a vector index.

``OUTPUT.lance`` is a Lance dataset (``lance.dataset("OUTPUT.lance")`` opens it) whose folder also holds the
job's ``_job.json``. Its columns are those of the Parquet output: the passthrough columns, ``embedding``
(``fixed_size_list<float32>[D]``, Lance's vector type; null on a row that failed) and ``error``.

Exactly once, in order: each shard of the job (``shard_rows`` rows, whole batches) is one Lance commit, atomic
in Lance: a new dataset version whose fragment holds the shard's rows, with the rows it holds in the commit's
transaction properties (:data:`FIRST_ROW`, :data:`ROWS`, :data:`ERRORS`). The manifest then records the
version. A run killed between a commit and the manifest leaves a commit the manifest lacks; :func:`recover`
finds it in the dataset's transactions and records it, so a resumed run starts right after the last committed
row. Data files of a commit that never happened are deleted. Rows added or deleted outside the job make the
dataset unresumable (the row counts no longer agree), and say so.

``--index`` (:func:`build_index`): an IVF-PQ index on ``embedding`` (cosine), built once every row is in;
:func:`index_plan` picks its size for the row count and dimension (Lance's own rules of thumb).

pylance (import name ``lance``) is imported only when a Lance output is asked for: the ``lance`` extra.
"""
from __future__ import annotations

import datetime as _dt
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from flight_client.job_io import TEMP_PREFIX, TEMP_SUFFIX, JobInputError, JobManifest, ShardWriter
from flight_server.protocol import EMBEDDING_FIELD

log = logging.getLogger("arrowengine.embed")

LANCE_EXTRA_INSTALL = 'pip install "arrowengine[lance]"'
LANCE_SUFFIX = ".lance"
# Transaction properties of each shard's commit: where its rows lie in the input.
FIRST_ROW = "arrowengine.first_row"
ROWS = "arrowengine.rows"
ERRORS = "arrowengine.errors"
# What Lance keeps in a dataset folder (besides our _job.json).
LANCE_FOLDERS = ("data", "_versions", "_transactions", "_indices", "_deletions")
INDEX_TYPE = "IVF_PQ"
INDEX_METRIC = "cosine"
PQ_CODES = 256   # 8-bit PQ: each sub-vector's codebook has 256 centroids, trained on at least that many vectors
PARTITION_ROWS = 8192  # rows per IVF list: Lance's default target for IVF_PQ
KEEP_VERSIONS = _dt.timedelta(days=365 * 1000)  # cleanup removes no version, only files no version refers to


class LanceNotInstalledError(ImportError):
    """pylance is not installed; the message names the extra that installs it."""


def require_lance(what: str = "a Lance output (OUTPUT ending in .lance, or --format lance)") -> Any:
    """The ``lance`` module, or :class:`LanceNotInstalledError` naming the ``lance`` extra."""
    try:
        import lance
    except ImportError as exc:
        raise LanceNotInstalledError(
            f"{what} needs pylance, which this installation lacks ({type(exc).__name__}: {exc}); install the "
            f"lance extra: {LANCE_EXTRA_INSTALL} (in a clone of the repository: pip install -e \".[lance]\"), "
            "or write Parquet shards: an OUTPUT folder not ending in .lance") from exc
    return lance


def _open(folder: Path) -> Any | None:
    """The dataset in ``folder``, or None where nothing was ever committed."""
    lance = require_lance()
    if not (Path(folder) / "_versions").is_dir():
        return None
    return lance.dataset(str(folder))


class LanceWriter(ShardWriter):
    """Collects output batches in input order; each full shard becomes one append commit, then the manifest.

    The same interface as :class:`flight_client.job_io.ShardWriter`.
    """

    def __init__(self, folder: Path, manifest: JobManifest, shard_rows: int) -> None:
        self.lance = require_lance()
        super().__init__(folder, manifest, shard_rows)  # collects batches; a full shard is committed at once

    def flush(self, schema: pa.Schema | None = None) -> None:
        """Commit the rows collected so far as the next shard and record its version in the manifest.

        With nothing collected, commits an empty dataset of ``schema`` if one is given (an empty input).
        """
        if not self._pending and schema is None:
            return
        table = pa.Table.from_batches(self._pending, schema=None if self._pending else schema)
        first = self.manifest.rows_done
        properties = {FIRST_ROW: str(first), ROWS: str(self._rows), ERRORS: str(self._errors)}
        dataset = self.lance.write_dataset(table, str(self.folder), mode="append" if self.manifest.shards
                                           else "create", transaction_properties=properties)
        self.manifest.shards.append({"version": dataset.version, "first_row": first, "rows": self._rows,
                                     "errors": self._errors})
        self.manifest.save(self.folder)
        self._pending, self._rows, self._errors = [], 0, 0


def recover(folder: Path, manifest: JobManifest) -> list[str]:
    """Make ``manifest`` agree with the dataset before a resumed run; returns what was done, for the log.

    Commits made after the manifest's last recorded version (a run killed between a commit and the manifest)
    are recorded from their transaction properties; data files of a commit that never happened are deleted.

    Raises:
        JobInputError: the dataset lacks recorded commits, or holds rows the job did not write.
    """
    folder = Path(folder)
    done: list[str] = []
    for entry in folder.iterdir():
        if entry.is_file() and entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX):
            entry.unlink()
            done.append(entry.name)
    dataset = _open(folder)
    if dataset is None:
        if manifest.shards:
            raise JobInputError(f"the manifest in {folder} lists {len(manifest.shards)} committed shard(s) but the "
                                "folder holds no Lance dataset; the output cannot be resumed: start again in a new "
                                "OUTPUT")
        for name in LANCE_FOLDERS:  # files of a first commit that never happened
            if (folder / name).is_dir():
                shutil.rmtree(folder / name)
                done.append(f"{name}/")
        return done
    last = manifest.shards[-1]["version"] if manifest.shards else 0
    for version in sorted(v["version"] for v in dataset.versions()):
        if version <= last:
            continue
        properties = dataset.read_transaction(version).transaction_properties or {}
        if FIRST_ROW not in properties:
            continue  # not a shard (an index, say): no rows of the job
        first, rows, errors = int(properties[FIRST_ROW]), int(properties[ROWS]), int(properties[ERRORS])
        if first != manifest.rows_done:
            raise JobInputError(f"{folder}: version {version} holds input rows {first}..{first + rows - 1}, but "
                                f"the job has {manifest.rows_done} rows before it; the output cannot be resumed: "
                                "start again in a new OUTPUT")
        manifest.shards.append({"version": version, "first_row": first, "rows": rows, "errors": errors})
        done.append(f"recorded version {version} (rows {first}..{first + rows - 1}), committed after the last "
                    "manifest update")
    rows = dataset.count_rows()
    if rows != manifest.rows_done:
        raise JobInputError(f"the Lance dataset {folder} has {rows} rows, but the job wrote {manifest.rows_done}: "
                            "it was changed outside the job (rows added or deleted); the output cannot be resumed: "
                            "start again in a new OUTPUT")
    stats = dataset.cleanup_old_versions(older_than=KEEP_VERSIONS, delete_unverified=True)
    if stats.data_files_removed:
        done.append(f"{stats.data_files_removed} data file(s) of an unfinished commit")
    return done


def discard(folder: Path) -> None:
    """Remove what Lance wrote in ``folder`` (a job that stopped before its first row was recorded)."""
    for name in LANCE_FOLDERS:
        if (Path(folder) / name).is_dir():
            shutil.rmtree(Path(folder) / name)


def read_table(folder: Path) -> pa.Table:
    """The whole dataset as one table, in input order (commit order; Lance scans fragments in order)."""
    dataset = _open(folder)
    if dataset is None:
        raise JobInputError(f"{folder} holds no committed rows yet")
    return dataset.to_table(scan_in_order=True)


@dataclass(frozen=True)
class IndexPlan:
    """The IVF-PQ index :func:`build_index` makes for a dataset's size."""

    rows: int               # rows with an embedding (rows that failed have none and are not indexed)
    partitions: int         # IVF lists: one per PARTITION_ROWS rows (Lance's own default size), at least one
    sub_vectors: int        # PQ codes per vector: one per 16 (or 8) dimensions
    metric: str = INDEX_METRIC
    index_type: str = INDEX_TYPE


def index_plan(rows: int, dim: int) -> IndexPlan | None:
    """The index for ``rows`` embeddings of dimension ``dim``; None below :data:`PQ_CODES` rows.

    Partitions: rows // 8192, at least one: the list size Lance itself targets for IVF_PQ. The IVF k-means
    trains on 256 sample rows per list against every list, so its cost grows with the square of the list count:
    ~sqrt(rows) lists (an older rule of thumb) cost far more to build on a CPU, and with lists this size a
    search that probes a few of them still reads only PQ codes (a few bytes per row). Sub-vectors: D/16 where 16 divides D (D/8 where 8 does; else the most
    sub-vectors of at least 8 dimensions that divide D), the sizes Lance's PQ kernels favour.
    Fewer than 256 rows cannot train 8-bit PQ codebooks: no index; a nearest search then scans every row,
    which is exact and takes milliseconds at that size.
    """
    if rows < PQ_CODES:
        return None
    partitions = max(1, rows // PARTITION_ROWS)
    for width in (16, 8):
        if dim % width == 0:
            return IndexPlan(rows, partitions, dim // width)
    divisors = [m for m in range(1, dim + 1) if dim % m == 0 and dim // m >= 8]
    return IndexPlan(rows, partitions, max(divisors, default=1))


def has_index(folder: Path) -> bool:
    """Whether the dataset has a vector index on ``embedding``."""
    dataset = _open(folder)
    return dataset is not None and any(EMBEDDING_FIELD in index.field_names for index in dataset.describe_indices())


def build_index(folder: Path, manifest: JobManifest) -> dict[str, Any]:
    """Build the IVF-PQ index on ``embedding`` once every row is in; returns what was done, for the manifest.

    An index already there (a run killed after building it) is kept. Below 256 embedded rows none is built
    (:func:`index_plan`), and the result says so.
    """
    embedded = manifest.rows_done - manifest.errors
    plan = index_plan(embedded, manifest.dimension or 0)
    if plan is None:
        reason = (f"{embedded} embedded rows, fewer than the {PQ_CODES} IVF-PQ needs to train its codebooks: no "
                  "index built; a nearest search scans every row (exact, and fast at this size)")
        log.warning("--index: %s", reason)
        return {"built": False, "reason": reason}
    if has_index(folder):
        log.info("--index: the dataset already has its index on %r", EMBEDDING_FIELD)
        return {"built": True, **asdict(plan)}
    log.info("--index: building %s (%s) on %d rows: %d partitions, %d sub-vectors", plan.index_type, plan.metric,
             plan.rows, plan.partitions, plan.sub_vectors)
    t0 = time.perf_counter()
    _open(folder).create_index(EMBEDDING_FIELD, plan.index_type, metric=plan.metric,
                               target_partition_size=PARTITION_ROWS, num_sub_vectors=plan.sub_vectors)
    seconds = time.perf_counter() - t0
    log.info("--index: built in %.1f s", seconds)
    return {"built": True, **asdict(plan), "seconds": round(seconds, 3)}
