"""Load the tensors of a converted model directory.

``weights.arrow`` (see :mod:`engine.format`) is mapped with a private,
copy-on-write ``mmap`` (``ACCESS_COPY``: tensors are writable, writes never
reach the file) and every tensor is a view of the mapped pages: no byte is
copied and nothing is read until a tensor is used.  Before any tensor is built
the whole file is validated -- schema, dtype names, shapes against data
lengths, 64-byte alignment, duplicate names, one row per batch -- and every
problem is reported at once in a :class:`~engine.errors.WeightFormatError`.
Checksums are *not* recomputed at load time; ``arrowengine inspect --verify``
does that.

``weights.parquet`` is compressed, so its tensors are copies (decompressed one
row group at a time into tensors the loader owns).

Example::

    from engine.weights import load_weights
    state = load_weights("models/clip-b32")      # dict[str, torch.Tensor]
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engine.errors import WeightFormatError
from engine.files import MAX_MANIFEST_BYTES, open_model_file, read_model_file
from engine.format import (
    ALIGNMENT, ARROW_WEIGHTS_FILE, COL_DATA, COL_DTYPE, COL_NAME, COL_SHA256, COL_SHAPE,
    DTYPES, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, META_FORMAT, META_VERSION,
    PARQUET_WEIGHTS_FILE, REQUIRED_COLUMNS, Manifest, tensor_nbytes,
)

log = logging.getLogger(__name__)

_FIX = "re-run `arrowengine convert` to rebuild it"
_MAX_LISTED = 20


@dataclass(frozen=True)
class TensorInfo:
    """What the weight file says about one tensor."""

    name: str
    dtype: str  # format dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    nbytes: int
    sha256: str  # hex digest of the tensor bytes, as written by the converter
    offset: int  # file offset of the data (weights.arrow); -1 for parquet


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightFormatError(
            f"dtype {name!r} is valid in the format but this torch ({torch.__version__}) lacks it; "
            "upgrade torch or convert with --dtype float32|float16|bfloat16")
    return dtype


def _raise_problems(path: Path, problems: list[str]) -> None:
    listed = "\n  - ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise WeightFormatError(
        f"{path}: invalid weight file ({len(problems)} problem(s)):\n  - {listed}{more}\n{_FIX}")


def _check_schema(schema: pa.Schema, problems: list[str]) -> dict[str, int]:
    """Check columns and types; return column name -> index."""
    index = {name: i for i, name in enumerate(schema.names)}
    if len(index) != len(schema.names):
        problems.append(f"schema has duplicate column names: {schema.names}")
    for name, want in REQUIRED_COLUMNS.items():
        if name not in index:
            problems.append(f"missing column {name!r} ({want})")
        elif schema.field(index[name]).type != want:  # by position: a duplicated name has no single field
            problems.append(f"column {name!r} has type {schema.field(index[name]).type}, expected {want}")
    meta = schema.metadata or {}
    if meta.get(META_FORMAT) != FORMAT_NAME.encode():
        problems.append(f"schema metadata {META_FORMAT.decode()!r} is {meta.get(META_FORMAT)!r}, "
                        f"expected {FORMAT_NAME!r} (not an ArrowEngine weight file?)")
    elif meta.get(META_VERSION) != str(FORMAT_VERSION).encode():
        problems.append(f"format version {meta.get(META_VERSION)!r}, this build reads {FORMAT_VERSION}")
    return index


def _unreadable_batches(reader: pa.ipc.RecordBatchFileReader, exc: Exception) -> list[str]:
    """Slow path after a failed read: name each batch that cannot be read."""
    bad = []
    for b in range(reader.num_record_batches):
        try:
            reader.get_batch(b).validate(full=True)
        except (pa.ArrowException, OSError, ValueError) as e:
            bad.append(f"batch {b}: unreadable (truncated or corrupt?): {e}")
    return bad or [f"unreadable (truncated or corrupt?): {exc}"]


def _check_row(where: str, name: object, dtype: object, shape: object, sha: object,
               data_len: int, seen: set[str], problems: list[str]) -> tuple[int, ...] | None:
    """Check one tensor's metadata against its data length; return the shape if all is well."""
    ok = True
    if not isinstance(name, str) or not name:
        problems.append(f"{where}: tensor name is {name!r}, expected a non-empty string")
        return None
    where = f"{where} ({name!r})"
    if name in seen:
        problems.append(f"{where}: duplicate tensor name")
        ok = False
    seen.add(name)
    if dtype not in DTYPES:
        problems.append(f"{where}: unknown dtype {dtype!r}, expected one of {sorted(DTYPES)}")
        ok = False
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        problems.append(f"{where}: shape {shape!r} must be a list of non-negative integers")
        ok = False
    if not isinstance(sha, str):
        problems.append(f"{where}: sha256 is {sha!r}, expected a hex string")
        ok = False
    if ok:
        want = tensor_nbytes(shape, dtype)  # type: ignore[arg-type]  # Python ints: no overflow
        if want != data_len:
            problems.append(f"{where}: shape {shape} x {dtype} needs {want} bytes, data has {data_len}")
            ok = False
    return tuple(shape) if ok else None  # type: ignore[arg-type]


class WeightFile:
    """A validated weight file; tensors are views of the mapped file (Arrow) or copies (Parquet).

    Use :meth:`open`; then ``.names``, ``.info(name)``, ``.tensor(name)``, ``.tensors()``.
    """

    def __init__(self, path: Path, infos: dict[str, TensorInfo], base: torch.Tensor | None,
                 owned: dict[str, torch.Tensor] | None, file_size: int, real_path: Path | None = None) -> None:
        self.path = path
        self.real_path = real_path or path  # the checked file behind ``path`` (a link inside the folder, e.g.)
        self._infos = infos
        self._base = base  # uint8 view of the whole mapped file (Arrow)
        self._typed_bases: dict[torch.dtype, torch.Tensor] = {}  # _base viewed as each dtype
        self._owned = owned  # materialized tensors (Parquet)
        self.file_size = file_size
        self.names: tuple[str, ...] = tuple(infos)

    @classmethod
    def open(cls, path: str | os.PathLike, folder: str | os.PathLike | None = None) -> "WeightFile":
        """Open and fully validate ``weights.arrow`` or ``weights.parquet``.

        Args:
            path: the weight file.
            folder: the model directory ``path`` belongs to: the file must then be a regular file whose real
                path lies inside the folder's (see :mod:`engine.files`). Without it, ``path`` must still be a
                regular file (not a device, FIFO or directory).

        Raises:
            WeightFormatError: the file is missing, not a regular file (inside the folder), truncated or
                inconsistent; the message lists every problem found and says which file.
        """
        path = Path(path)
        if sys.byteorder != "little":
            raise WeightFormatError("ArrowEngine weight files are little-endian; this host is big-endian")
        if folder is None:
            folder, name = path.parent, path.name
            boundary = Path(os.path.realpath(path)).parent  # given directly: any regular file, wherever it is
        else:
            folder, name, boundary = Path(folder), path.relative_to(folder).as_posix(), None
        fd, st = open_model_file(folder, name, None, "weight file", error=WeightFormatError,
                                 missing=f"{path}: weight file not found; {_FIX}", boundary=boundary)
        real = Path(os.path.realpath(path))
        try:
            if path.suffix == ".parquet":
                return cls._open_parquet(path, fd, real)
            return cls._open_arrow(path, fd, st.st_size, real)
        finally:
            os.close(fd)

    # -- Arrow -------------------------------------------------------------------------------
    @classmethod
    def _open_arrow(cls, path: Path, fd: int, size: int, real: Path) -> "WeightFile":
        if size == 0:
            _raise_problems(path, ["file is empty"])
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)  # a regular file (checked on fd): mapping is safe
        buf = pa.py_buffer(mm)
        try:
            reader = pa.ipc.open_file(pa.BufferReader(buf))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise WeightFormatError(
                f"{path}: not a readable Arrow IPC file (truncated or corrupt?): {exc}; {_FIX}") from exc
        problems: list[str] = []
        try:
            index = _check_schema(reader.schema, problems)
            if problems:
                _raise_problems(path, problems)
            infos = cls._scan_arrow(reader, index, buf.address, size, problems)
        except (pa.ArrowException, OSError, ValueError) as exc:  # incl. UnicodeDecodeError
            raise WeightFormatError(f"{path}: corrupt Arrow metadata ({exc}); {_FIX}") from exc
        if problems:
            _raise_problems(path, problems)
        base = torch.frombuffer(mm, dtype=torch.uint8)
        _register_map(mm, base.data_ptr(), size)
        return cls(path, infos, base, None, size, real)

    @staticmethod
    def _scan_arrow(reader: pa.ipc.RecordBatchFileReader, index: dict[str, int], base_addr: int,
                    size: int, problems: list[str]) -> dict[str, TensorInfo]:
        # Whole columns at once: ~400 tensors validate in a few ms (per-row scalars are 5x slower).
        try:
            table = reader.read_all()  # zero copy: slices of the mapped buffer
            table.validate(full=True)  # offsets in bounds, valid UTF-8: safe to read values
        except (pa.ArrowException, OSError, ValueError) as exc:
            problems.extend(_unreadable_batches(reader, exc))
            return {}
        data = table.column(COL_DATA)
        lengths = [len(c) for c in data.chunks]
        if len(lengths) != reader.num_record_batches or any(n != 1 for n in lengths):
            problems.append(f"record batches hold {lengths[:10]}... rows, expected one tensor per batch")
            return {}
        cols = [table.column(c) for c in (COL_NAME, COL_DTYPE, COL_SHAPE, COL_SHA256)]
        if any(c.null_count for c in (*cols, data)):
            problems.append("null values in name/dtype/shape/sha256/data")
            return {}
        names, dtypes, shapes, shas = (c.to_pylist() for c in cols)
        infos: dict[str, TensorInfo] = {}
        seen: set[str] = set()
        for b, chunk in enumerate(data.chunks):
            _, offsets, values = chunk.buffers()
            start, end = struct.unpack_from("<qq", offsets, 8 * chunk.offset)
            nbytes = end - start
            shape = _check_row(f"batch {b}", names[b], dtypes[b], shapes[b], shas[b], nbytes, seen,
                               problems)
            offset = (values.address - base_addr + start) if values is not None else -1
            if nbytes and not (0 <= offset and offset + nbytes <= size):
                problems.append(f"batch {b} ({names[b]!r}): data lies outside the file")
            elif nbytes and offset % ALIGNMENT:
                problems.append(f"batch {b} ({names[b]!r}): data at file offset {offset} is not "
                                f"{ALIGNMENT}-byte aligned (written without the `_pad` column?)")
            elif shape is not None:
                infos[names[b]] = TensorInfo(names[b], dtypes[b], shape, nbytes, shas[b], offset)
        return infos

    # -- Parquet -----------------------------------------------------------------------------
    @classmethod
    def _open_parquet(cls, path: Path, fd: int, real: Path) -> "WeightFile":
        problems: list[str] = []
        try:
            with os.fdopen(os.dup(fd), "rb") as f:  # the checked file, read through its descriptor
                pf = pq.ParquetFile(f)
                _check_schema(pf.schema_arrow, problems)
                if problems:
                    _raise_problems(path, problems)
                infos, owned, seen, row = {}, {}, set(), 0
                for g in range(pf.num_row_groups):
                    table = pf.read_row_group(g, columns=list(REQUIRED_COLUMNS))
                    batch = table.combine_chunks().to_batches()
                    cls._take_parquet_rows(batch, row, seen, infos, owned, problems)
                    row += table.num_rows
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise WeightFormatError(
                f"{path}: not a readable Parquet weight file (truncated or corrupt?): {exc}; {_FIX}"
            ) from exc
        if problems:
            _raise_problems(path, problems)
        return cls(path, infos, None, owned, os.fstat(fd).st_size, real)

    @staticmethod
    def _take_parquet_rows(batches: list[pa.RecordBatch], row: int, seen: set[str],
                           infos: dict[str, TensorInfo], owned: dict[str, torch.Tensor],
                           problems: list[str]) -> None:
        for batch in batches:
            batch.validate(full=True)
            cols = {c: batch.column(c) for c in REQUIRED_COLUMNS}
            names, dtypes = cols[COL_NAME].to_pylist(), cols[COL_DTYPE].to_pylist()
            shapes, shas = cols[COL_SHAPE].to_pylist(), cols[COL_SHA256].to_pylist()
            data = cols[COL_DATA]
            for r in range(batch.num_rows):
                value = data[r].as_buffer()
                nbytes = 0 if value is None else value.size
                shape = _check_row(f"row {row + r}", names[r], dtypes[r], shapes[r], shas[r],
                                   nbytes, seen, problems)
                if shape is None or problems:
                    continue  # once invalid, stop materializing; keep collecting problems
                t = torch.empty(nbytes, dtype=torch.uint8)
                if nbytes:
                    t.numpy()[:] = np.frombuffer(value, dtype=np.uint8)  # the one copy we own
                owned[names[r]] = t.view(_torch_dtype(dtypes[r])).view(shape)
                infos[names[r]] = TensorInfo(names[r], dtypes[r], shape, nbytes, shas[r], -1)
            row += batch.num_rows

    # -- access ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        """Metadata of one tensor.  Raises KeyError if absent."""
        return self._infos[name]

    def infos(self) -> list[TensorInfo]:
        """Metadata of every tensor, in file order."""
        return list(self._infos.values())

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``: a zero-copy view of the mapped file (Arrow) or an owned copy (Parquet)."""
        if self._owned is not None:
            return self._owned[name]
        info = self._infos[name]
        dtype = _torch_dtype(info.dtype)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        assert self._base is not None
        typed = self._typed_bases.get(dtype)
        if typed is None:  # the whole map seen as `dtype`; offsets are 64-byte aligned, so they divide
            item = torch.empty((), dtype=dtype).element_size()
            typed = self._base[: self._base.numel() // item * item].view(dtype)
            self._typed_bases[dtype] = typed
        strides, step = [], 1
        for dim in reversed(info.shape):
            strides.append(step)
            step *= dim
        item = typed.element_size()
        # One as_strided view per tensor (no copy): ~8x cheaper than slice + view + view.
        return typed.as_strided(tuple(info.shape), tuple(reversed(strides)), info.offset // item)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by name, in file order."""
        return {name: self.tensor(name) for name in self._infos}

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes (for checksums); a view for Arrow, the owned copy for Parquet."""
        t = self.tensor(name)
        if t.numel() == 0:
            return memoryview(b"")
        return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_manifest(model_dir: str | os.PathLike) -> Manifest:
    """Read ``manifest.json`` of a converted model directory (a regular file inside it, at most
    ``engine.files.MAX_MANIFEST_BYTES``).

    Raises:
        WeightFormatError: the manifest is missing, not a regular file inside the directory, too large, not
            JSON, lacks a key, or names files outside the directory.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        what = "is a file, not a model directory" if model_dir.exists() else "does not exist"
        raise WeightFormatError(f"{model_dir} {what}; expected a directory made by "
                                "`arrowengine convert SOURCE OUT_DIR`")
    path = model_dir / MANIFEST_FILE
    text = read_model_file(model_dir, MANIFEST_FILE, MAX_MANIFEST_BYTES, "the model's manifest",
                           error=WeightFormatError,
                           missing=f"{model_dir}: no {MANIFEST_FILE}; expected a directory made by "
                                   "`arrowengine convert SOURCE OUT_DIR` -- run that first")
    try:
        return Manifest.from_json(text)
    except ValueError as exc:
        raise WeightFormatError(f"{path}: invalid manifest: {exc}; {_FIX}") from exc


def _weights_name(model_dir: Path, manifest: Manifest | None) -> Path:
    if manifest is not None:  # Manifest.from_json checked that ``weights`` is a plain file name
        return model_dir / manifest.weights
    for name in (ARROW_WEIGHTS_FILE, PARQUET_WEIGHTS_FILE):
        if os.path.lexists(model_dir / name):
            return model_dir / name
    raise WeightFormatError(f"{model_dir}: no {MANIFEST_FILE}, {ARROW_WEIGHTS_FILE} or "
                            f"{PARQUET_WEIGHTS_FILE}; run `arrowengine convert SOURCE {model_dir}`")


def weights_path(model_dir: str | os.PathLike) -> Path:
    """The weight file of a model directory (from its manifest, else by the standard names)."""
    model_dir = Path(model_dir)
    has_manifest = os.path.lexists(model_dir / MANIFEST_FILE)  # a dangling or odd one is reported, not skipped
    return _weights_name(model_dir, read_manifest(model_dir) if has_manifest else None)


def load_weights(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a model directory (or of a weight file given directly).

    Args:
        model_dir: a directory made by ``arrowengine convert``, or a weights.arrow/.parquet path.

    Returns:
        name -> tensor, in file order.  Arrow: views of a private copy-on-write map
        of the file (writable; writes never reach the file).  Parquet: owned copies.

    Raises:
        WeightFormatError: missing, truncated or inconsistent files (all problems listed); a manifest or
            weight file that is not a regular file inside the directory.
    """
    model_dir = Path(model_dir)
    if os.path.lexists(model_dir) and not model_dir.is_dir():  # a weight file given directly (checked there)
        return WeightFile.open(model_dir).tensors()
    manifest = read_manifest(model_dir) if os.path.lexists(model_dir / MANIFEST_FILE) else None
    wf = WeightFile.open(_weights_name(model_dir, manifest), folder=model_dir)
    if manifest is not None and manifest.tensors != len(wf):
        raise WeightFormatError(f"{wf.path}: holds {len(wf)} tensors, manifest says {manifest.tensors}; {_FIX}")
    return wf.tensors()


# Maps opened by WeightFile, by start address, so that release_pages() can tell a view of a weight file
# from any other tensor. An entry goes when its mmap object is freed (then no view of it can exist).
_MAPS: dict[int, tuple[int, weakref.ref]] = {}
_MAPS_LOCK = threading.Lock()


def _register_map(mm: mmap.mmap, address: int, size: int) -> None:
    def forget(_ref: weakref.ref, address: int = address) -> None:
        with _MAPS_LOCK:
            if _MAPS.get(address, (0, None))[1] is _ref:
                del _MAPS[address]

    with _MAPS_LOCK:
        _MAPS[address] = (size, weakref.ref(mm, forget))


def release_pages(t: torch.Tensor) -> int:
    """Drop the resident pages of a weight-file view that is no longer needed (after it was quantized).

    Only pages wholly inside ``t`` are dropped (neighbouring tensors keep theirs), with
    ``madvise(MADV_DONTNEED)``: the map is private and never written, so a later read
    would fault the file's bytes in again. Anything but a contiguous view of a mapped
    weight file is left alone. Returns the number of bytes released.
    """
    storage = t.untyped_storage()
    with _MAPS_LOCK:
        entry = _MAPS.get(storage.data_ptr())
    mm = entry[1]() if entry else None
    if mm is None or storage.nbytes() != entry[0] or not t.is_contiguous() or not hasattr(mm, "madvise"):
        return 0
    page = mmap.PAGESIZE
    start = t.data_ptr() - storage.data_ptr()
    lo = -(-start // page) * page
    hi = (start + t.numel() * t.element_size()) // page * page
    if hi <= lo:
        return 0
    try:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError):  # not supported here: keep the pages
        return 0
    return hi - lo
