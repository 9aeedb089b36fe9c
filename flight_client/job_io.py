"""Bulk-job input and output: input sources, the shard writer and the job manifest.

Imports only pyarrow, numpy and the wire protocol's names (never torch). Inputs are read lazily, batch by batch,
so memory stays bounded whatever the dataset size:

- :class:`ParquetSource`: a Parquet file or a folder of Parquet files (recursive, sorted),
  read one row group at a time and re-cut into batches of exactly ``batch_rows`` rows
  (the last may be shorter), so a resumed job sends the engine the same batches.
- :class:`ImageFolderSource`: every non-hidden file under a folder (recursive, sorted);
  a batch holds ``path`` (relative, POSIX) and ``image`` (the file bytes; null if the file
  cannot be read, with the reason in :attr:`Batch.read_errors`).

Output (:class:`ShardWriter`): ``part-00000.parquet``, ... written to a hidden temp name
and renamed atomically, then ``_job.json`` (:class:`JobManifest`) replaced atomically.
Both temp names start with ``.`` so ``pyarrow.parquet.read_table(OUTPUT)`` ignores them.
A Lance dataset output is written by :mod:`flight_client.lance_output` with the same manifest.

Passthrough (:func:`open_source`): by default a Parquet input's columns other than the embedded
one go to the output, so that it joins back to the input on the input's own keys; an image
folder's output has ``path``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from flight_server.protocol import RESERVED_FIELDS

log = logging.getLogger("arrowengine.embed")

MANIFEST_NAME = "_job.json"
MANIFEST_FORMAT = "arrowengine-embed-job"
MANIFEST_VERSION = 1
PATH_COLUMN = "path"
IMAGE_COLUMN = "image"
TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"


class JobInputError(ValueError):
    """The job input is missing, unreadable or not what the command asked for."""


@dataclass
class Batch:
    """One batch of input rows: ``first_row`` is the index of its first row in the whole input."""

    first_row: int
    data: pa.RecordBatch
    read_errors: dict[int, str] = field(default_factory=dict)  # row in batch -> why unreadable

    @property
    def num_rows(self) -> int:
        return self.data.num_rows


# ---- sources ---------------------------------------------------------------------------

class ParquetSource:
    """A Parquet file or folder read row group by row group.

    Args:
        path: a ``.parquet`` file, or a folder searched recursively for ``*.parquet``
            (hidden and ``_``-prefixed names skipped, sorted by relative path).
        columns: the columns to read (the embedded column first, then passthrough).
        passthrough: the columns copied to the output (:attr:`output_columns`).

    ``row_groups_read`` and ``peak_buffered_rows`` record how much was held at once.
    """

    kind = "parquet"

    def __init__(self, path: Path, columns: Sequence[str], passthrough: Sequence[str] = ()) -> None:
        self.root = Path(path)
        self.columns = list(dict.fromkeys(columns))
        self.output_columns = tuple(passthrough)
        self.files = _parquet_files(self.root)
        self._metas = [pq.ParquetFile(f).metadata for f in self.files]
        self.schema = self._check_schema()
        self.num_rows = sum(m.num_rows for m in self._metas)
        self.row_groups_read = 0
        self.peak_buffered_rows = 0

    def _check_schema(self) -> pa.Schema:
        """The selected columns' schema, widened over every file (nullability, string/large_string, int widths)."""
        file_schemas: list[pa.Schema] = []
        for path in self.files:
            file_schema = pq.read_schema(path)
            missing = [c for c in self.columns if c not in file_schema.names]
            if missing:
                raise JobInputError(f"{path}: column(s) {missing} not found; it has {file_schema.names}; "
                                    "pick them with --column / --passthrough")
            file_schemas.append(pa.schema([file_schema.field(c) for c in self.columns]))
        schema = file_schemas[0]
        for path, file_schema in zip(self.files[1:], file_schemas[1:]):
            clash = [f"{a.name}: {a.type} vs {b.type}" for a, b in zip(schema, file_schema)
                     if not _widens(a.type, b.type)]
            if clash:
                raise JobInputError(f"{path}: columns ({_types(file_schema)}) do not fit the other files' "
                                    f"({_types(schema)}): {'; '.join(clash)}; the Parquet files of an input may "
                                    "differ only in nullability, string vs large_string, binary vs "
                                    "large_binary and integer or float width")
            schema = pa.unify_schemas([schema, file_schema], promote_options="permissive")
        return schema

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the input: files (relative path, size, mtime, rows) and selected schema."""
        entries = [[_rel(f, self.root), *_stat(f), m.num_rows] for f, m in zip(self.files, self._metas)]
        return _fingerprint("parquet", entries, self.num_rows, str(self.schema))

    def batches(self, start_row: int, batch_rows: int) -> Iterator[Batch]:
        """Batches of ``batch_rows`` rows from input row ``start_row`` (row groups before it are skipped)."""
        pending: list[pa.RecordBatch] = []
        held = 0
        first = start_row
        for table_piece in self._pieces(start_row, batch_rows):
            pending.append(table_piece)
            held += table_piece.num_rows
            self.peak_buffered_rows = max(self.peak_buffered_rows, held)
            while held >= batch_rows:
                batch, pending, held = _take(pending, batch_rows, self.schema)
                yield Batch(first, batch)
                first += batch_rows
        if held:
            yield Batch(first, _take(pending, held, self.schema)[0])

    def _pieces(self, start_row: int, piece_rows: int) -> Iterator[pa.RecordBatch]:
        offset = 0
        for path, meta in zip(self.files, self._metas):
            if offset + meta.num_rows <= start_row:
                offset += meta.num_rows
                continue
            reader = pq.ParquetFile(path)
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                if offset + rows <= start_row:
                    offset += rows
                    continue
                skip = max(0, start_row - offset)
                offset += rows
                self.row_groups_read += 1
                for piece in reader.iter_batches(batch_size=piece_rows, row_groups=[group], columns=self.columns):
                    if skip >= piece.num_rows:
                        skip -= piece.num_rows
                        continue
                    piece = piece.slice(skip) if skip else piece
                    skip = 0
                    yield piece if piece.schema.equals(self.schema) else _cast(piece, self.schema)


_FAMILIES = (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
             lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
             pa.types.is_signed_integer, pa.types.is_unsigned_integer, pa.types.is_floating)


def _widens(a: pa.DataType, b: pa.DataType) -> bool:
    """Whether columns of types ``a`` and ``b`` can be read as one type without losing a value."""
    if a.equals(b) or pa.types.is_null(a) or pa.types.is_null(b):
        return True
    if any(family(a) and family(b) for family in _FAMILIES):
        return True
    lists = (pa.types.is_list, pa.types.is_large_list)
    if any(t(a) for t in lists) and any(t(b) for t in lists):
        return _widens(a.value_type, b.value_type)
    return False


def _types(schema: pa.Schema) -> str:
    return ", ".join(f"{field.name}: {field.type}" for field in schema)


def _cast(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with the (widened) types of ``schema``; column order is the same."""
    return pa.RecordBatch.from_arrays([column.cast(field.type) for column, field in zip(batch.columns, schema)],
                                      schema=schema)


MAX_IMAGE_FILE_BYTES = 512 * 1024 ** 2  # far above any server's per-image limit (default 32 MiB)


class ImageFolderSource:
    """Every non-hidden file under ``path`` (recursive, sorted by relative POSIX path).

    A file over ``max_file_bytes`` (a video among the photos) becomes an error row without being read: read whole
    it could exhaust memory, and Arrow's binary column holds at most 2 GiB."""

    kind = "images"

    def __init__(self, path: Path, max_file_bytes: int = MAX_IMAGE_FILE_BYTES) -> None:
        self.root = Path(path)
        self.max_file_bytes = max_file_bytes
        files = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files.extend(Path(dirpath) / n for n in filenames if not n.startswith("."))
        self.files = sorted(files, key=lambda f: _rel(f, self.root))
        self.num_rows = len(self.files)
        self.schema = pa.schema([pa.field(PATH_COLUMN, pa.string()), pa.field(IMAGE_COLUMN, pa.binary())])
        self.output_columns = (PATH_COLUMN,)  # the join key back to the input: the file's relative path

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the input: every file's relative path, size and mtime."""
        entries = [[_rel(f, self.root), *_stat(f)] for f in self.files]
        return _fingerprint("images", entries, self.num_rows, str(self.schema))

    def batches(self, start_row: int, batch_rows: int) -> Iterator[Batch]:
        """Batches of ``batch_rows`` files from file ``start_row``; files are read per batch."""
        for first in range(start_row, self.num_rows, batch_rows):
            chunk = self.files[first:first + batch_rows]
            blobs: list[bytes | None] = []
            read_errors: dict[int, str] = {}
            for i, path in enumerate(chunk):
                try:
                    size = path.stat().st_size
                    if size > self.max_file_bytes:
                        blobs.append(None)
                        read_errors[i] = (f"{_rel(path, self.root)} is {size / 2 ** 20:.0f} MiB, over the "
                                          f"{self.max_file_bytes / 2 ** 20:.0f} MiB a bulk job reads per image "
                                          "file: not read")
                        continue
                    blobs.append(path.read_bytes())
                except OSError as exc:
                    blobs.append(None)
                    read_errors[i] = f"cannot read {_rel(path, self.root)}: {exc.strerror or exc}"
            data = pa.record_batch([pa.array([_rel(f, self.root) for f in chunk], pa.string()),
                                    pa.array(blobs, pa.binary())], schema=self.schema)
            yield Batch(first, data, read_errors)


def open_source(path: Path, kind: str, column: str, passthrough: Sequence[str] | None,
                output: Path | None = None) -> ParquetSource | ImageFolderSource:
    """Pick the source for INPUT: Parquet file/folder, or (``kind="image"``) a folder of images.

    ``passthrough``: the input columns to copy to the output; None: every column of a Parquet
    input but the embedded one (and but ``embedding`` / ``error``, which the output adds); an
    image folder's output always has ``path``. The source's ``output_columns`` is the result.

    A folder that holds ``*.parquet`` files is a Parquet input (a README or LICENSE beside them, as
    in a hub dataset, changes nothing), except for ``--kind image`` when it also holds image files
    (by suffix): then it is an image folder, and its Parquet files become rows that fail as "not an
    image". A folder without any is an image folder (only for ``--kind image``).
    ``output`` must not lie inside the input folder.
    """
    path = Path(path)
    if not path.exists():
        raise JobInputError(f"input {path} does not exist; expected a Parquet file or a folder")
    if output is not None and path.is_dir() and Path(output).resolve().is_relative_to(path.resolve()):
        raise JobInputError(f"OUTPUT {output} is inside INPUT {path}: the shards would become input; "
                            "pick an OUTPUT outside the input folder")
    if path.is_file():
        return _parquet_source(path, column, passthrough)
    parquet = _parquet_files(path, required=False)
    if parquet and not (kind == "image" and _holds_image_files(path)):
        return _parquet_source(path, column, passthrough)
    if parquet:
        log.info("%s holds image files and %d *.parquet file(s) (e.g. %s): read as an image folder; pass a "
                 "folder of Parquet files alone to embed their column", path, len(parquet), _rel(parquet[0], path))
    if kind != "image":
        raise JobInputError(f"input folder {path} holds no *.parquet file; a folder of image files "
                            f"needs --kind image (got --kind {kind})")
    extra = [p for p in passthrough or () if p != PATH_COLUMN]
    if extra:
        raise JobInputError(f"an image folder has only the '{PATH_COLUMN}' column to pass through; "
                            f"got --passthrough {extra}")
    return ImageFolderSource(path)


def _parquet_source(path: Path, column: str, passthrough: Sequence[str] | None) -> ParquetSource:
    if passthrough is None:
        passthrough = default_passthrough(_parquet_files(path)[0], column)
    return ParquetSource(path, [column, *passthrough], passthrough)


def default_passthrough(first_file: Path, column: str) -> tuple[str, ...]:
    """Every column of the (first) Parquet file but ``column`` and the output's own ``embedding`` / ``error``."""
    names = pq.read_schema(first_file).names
    if column not in names:
        raise JobInputError(f"{first_file}: column(s) {[column]} not found; it has {names}; "
                            "pick them with --column / --passthrough")
    clash = [n for n in names if n in RESERVED_FIELDS]
    if clash:
        log.warning("input columns %s are not copied to the output, which adds its own columns of those names; "
                    "rename them in the input to keep them", clash)
    kept = tuple(n for n in names if n != column and n not in RESERVED_FIELDS)
    if not kept:
        log.warning("the input has no column besides %r to copy to the output: its rows join back to the input "
                    "only by position (row i of the output is row i of the input, files in sorted path order); "
                    "add a key column to the input, or copy %r itself with --passthrough %s", column, column,
                    column)
    return kept


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jp2",
                  ".avif", ".heic", ".ppm", ".pgm")


def _holds_image_files(root: Path) -> bool:
    """Whether a folder holds a visible file named like an image (hidden and ``_`` names skipped)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
        if any(not f.startswith((".", "_")) and f.lower().endswith(IMAGE_SUFFIXES) for f in filenames):
            return True
    return False


def _parquet_files(root: Path, required: bool = True) -> list[Path]:
    if root.is_file():
        return [root]
    files = [p for p in root.rglob("*.parquet")
             if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)]
    if not files and required:
        raise JobInputError(f"no *.parquet file under {root}")
    return sorted(files, key=lambda f: _rel(f, root))


def _take(pending: list[pa.RecordBatch], rows: int, schema: pa.Schema
          ) -> tuple[pa.RecordBatch, list[pa.RecordBatch], int]:
    """Cut the first ``rows`` rows off ``pending``; returns (batch, rest, rows left)."""
    taken: list[pa.RecordBatch] = []
    need = rows
    while need:
        head = pending[0]
        if head.num_rows <= need:
            taken.append(pending.pop(0))
            need -= head.num_rows
        else:
            taken.append(head.slice(0, need))
            pending[0] = head.slice(need)
            need = 0
    batch = taken[0] if len(taken) == 1 else pa.Table.from_batches(taken, schema).combine_chunks().to_batches()[0]
    return batch, pending, sum(p.num_rows for p in pending)


def _rel(path: Path, root: Path) -> str:
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def _stat(path: Path) -> list[int]:
    try:
        st = path.stat()
    except OSError:  # e.g. a dangling link: it becomes a row error, and is part of the identity as such
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


def _fingerprint(kind: str, entries: list, rows: int, schema: str) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps([kind, schema, entries]).encode("utf-8")).hexdigest()
    return {"type": kind, "files": len(entries), "rows": rows, "sha256": digest}


# ---- manifest ------------------------------------------------------------------------

@dataclass
class JobManifest:
    """The ``_job.json`` beside the shards: what the job is and which shards are done.

    ``shards`` entries: ``{"file", "first_row", "rows", "errors"}`` in input order; for a Lance
    output ``{"version", "first_row", "rows", "errors"}`` (the dataset version of its commit).
    """

    input: dict[str, Any]           # {"path", "type", "files", "rows", "sha256"}
    args: dict[str, Any]            # the settings that decide the output rows and embeddings
    shards: list[dict[str, Any]] = field(default_factory=list)
    dimension: int | None = None
    output_format: str = "parquet"  # "parquet" (part-NNNNN.parquet shards) | "lance" (shards are commits)
    index: dict[str, Any] | None = None  # lance --index: what was built (or why not)
    complete: bool = False
    seconds: float = 0.0            # work time summed over runs
    created: str = ""
    updated: str = ""

    @property
    def rows_done(self) -> int:
        return sum(s["rows"] for s in self.shards)

    @property
    def errors(self) -> int:
        return sum(s["errors"] for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "input": self.input,
                "args": self.args, "dimension": self.dimension, "output_format": self.output_format,
                "index": self.index, "shards": self.shards,
                "rows_done": self.rows_done, "errors": self.errors, "complete": self.complete,
                "seconds": round(self.seconds, 3), "created": self.created, "updated": self.updated}

    @classmethod
    def load(cls, folder: Path) -> "JobManifest":
        """Read ``folder/_job.json``; raises JobInputError if it is not a job manifest."""
        path = Path(folder) / MANIFEST_NAME
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise JobInputError(f"cannot read the job manifest {path}: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise JobInputError(f"{path} is not an arrowengine embed job manifest (format "
                                f"{doc.get('format') if isinstance(doc, dict) else None!r})")
        if doc.get("version") != MANIFEST_VERSION:
            raise JobInputError(f"{path} has manifest version {doc.get('version')}; this build reads "
                                f"version {MANIFEST_VERSION}")
        return cls(input=doc["input"], args=doc["args"], shards=list(doc["shards"]),
                   dimension=doc.get("dimension"), output_format=doc.get("output_format", "parquet"),
                   index=doc.get("index"), complete=bool(doc.get("complete")),
                   seconds=float(doc.get("seconds", 0.0)), created=doc.get("created", ""),
                   updated=doc.get("updated", ""))

    def save(self, folder: Path) -> None:
        """Write atomically: temp file, fsync, ``os.replace``."""
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.created = self.created or now
        self.updated = now
        data = json.dumps(self.to_json(), indent=1).encode("utf-8")
        _atomic_write(Path(folder) / MANIFEST_NAME, lambda tmp: tmp.write_bytes(data))


# ---- shards --------------------------------------------------------------------------

def shard_name(index: int) -> str:
    """``part-00000.parquet`` for index 0."""
    return f"part-{index:05d}.parquet"


class ShardWriter:
    """Collects output batches and writes each full shard atomically, then the manifest."""

    def __init__(self, folder: Path, manifest: JobManifest, shard_rows: int) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.shard_rows = shard_rows
        self._pending: list[pa.RecordBatch] = []
        self._rows = 0
        self._errors = 0

    def add(self, batch: pa.RecordBatch, errors: int) -> None:
        """Add the next output batch (input order); a full shard is written at once."""
        self._pending.append(batch)
        self._rows += batch.num_rows
        self._errors += errors
        if self._rows >= self.shard_rows:
            self.flush()

    def flush(self, schema: pa.Schema | None = None) -> None:
        """Write the rows collected so far as the next shard and record it in the manifest.

        With nothing collected, writes an empty shard of ``schema`` if one is given.
        """
        if not self._pending and schema is None:
            return
        name = shard_name(len(self.manifest.shards))
        table = pa.Table.from_batches(self._pending, schema=None if self._pending else schema)
        _atomic_write(self.folder / name, lambda tmp: pq.write_table(table, tmp))
        self.manifest.shards.append({"file": name, "first_row": self.manifest.rows_done,
                                     "rows": self._rows, "errors": self._errors})
        self.manifest.save(self.folder)
        self._pending, self._rows, self._errors = [], 0, 0


def clean_output(folder: Path, manifest: JobManifest) -> list[str]:
    """Remove temp files and shards the manifest does not list (a run killed mid-write).

    Returns the removed names.
    """
    keep = {s["file"] for s in manifest.shards}
    removed = []
    for entry in Path(folder).iterdir():
        stray_temp = entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX)
        stray_shard = entry.name.startswith("part-") and entry.name.endswith(".parquet") and entry.name not in keep
        if entry.is_file() and (stray_temp or stray_shard):
            entry.unlink()
            removed.append(entry.name)
    missing = [name for name in keep if not (Path(folder) / name).is_file()]
    if missing:
        raise JobInputError(f"the manifest in {folder} lists shard(s) {sorted(missing)} that are gone; "
                            "the output cannot be resumed: start again in an empty folder")
    return sorted(removed)


def read_output(folder: Path) -> pa.Table:
    """The job output as one table, shards in manifest (= input) order (a Lance output: the dataset)."""
    manifest = JobManifest.load(folder)
    if manifest.output_format == "lance":
        from flight_client import lance_output

        return lance_output.read_table(folder)
    tables = [pq.read_table(Path(folder) / s["file"]) for s in manifest.shards]
    if not tables:
        raise JobInputError(f"{folder} holds no shard yet")
    return pa.concat_tables(tables)


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}{TEMP_SUFFIX}")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
