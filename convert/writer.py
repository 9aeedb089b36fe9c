"""Stream tensors into ``weights.arrow`` (or ``weights.parquet``).

Arrow: one record batch (one row) per tensor, written as it is read, so no
step holds more than one tensor.  pyarrow has no IPC alignment option, so each
batch carries a ``_pad`` value placed before ``data``: the IPC message metadata
of a batch has a constant size for a given name, so serializing the same row
with empty ``_pad``/``data`` tells where ``data`` would start, and the pad
length is chosen from ``sink.tell()`` to put it on a 64-byte file offset.  The
writer checks the position after every batch, and the loader re-checks all.

Parquet: zstd-compressed, row groups flushed at ~64 MB of tensor data.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import ArrowEngineError, WeightFormatError
from engine.format import (
    ALIGNMENT, DTYPES, PARQUET_SCHEMA, WEIGHT_SCHEMA, tensor_nbytes,
)

log = logging.getLogger(__name__)

PARQUET_ROW_GROUP_BYTES = 64 * 1024 * 1024
_PARQUET_MAX_VALUE = 2**31 - 1  # Parquet BYTE_ARRAY lengths are int32
_IPC_MAGIC = 8  # "ARROW1" + 2 bytes padding, before the schema message


@dataclass(frozen=True)
class Tensor:
    """One tensor on its way to the file; ``data`` is valid only while it is being written."""

    name: str
    dtype: str  # engine.format dtype name
    shape: tuple[int, ...]
    data: memoryview  # raw little-endian C-order bytes


@dataclass(frozen=True)
class WriteStats:
    """What was written."""

    tensors: int
    parameters: int
    bytes: int  # sum of tensor data bytes
    sha256: str  # of the whole file


def cast_tensor(t: Tensor, target: str) -> Tensor:
    """Convert a floating tensor to ``target`` (float32|float16|bfloat16) with torch; others unchanged."""
    if target == "keep" or t.dtype == target or not DTYPES[t.dtype].floating:
        return t
    if not t.data.nbytes:
        return Tensor(t.name, target, t.shape, t.data)
    import torch

    with warnings.catch_warnings():  # read-only source map: we only read it
        warnings.simplefilter("ignore", UserWarning)
        src = torch.frombuffer(t.data, dtype=getattr(torch, t.dtype))
    dst = src.to(getattr(torch, target))  # (numel,) new memory
    return Tensor(t.name, target, t.shape, memoryview(dst.view(torch.uint8).numpy()))


def _sha256(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    """SHA-256 of a file, read in chunks (no mapping, so it does not grow our RSS)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _row_arrays(t: Tensor, sha: str, pad: int) -> list[pa.Array]:
    offsets = pa.py_buffer(np.array([0, t.data.nbytes], dtype="<i8"))
    data = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(t.data)])
    return [
        pa.array([t.name], pa.utf8()),
        pa.array([t.dtype], pa.utf8()),
        pa.array([list(t.shape)], pa.list_(pa.int64())),
        pa.array([sha], pa.utf8()),
        pa.array([bytes(pad)], pa.binary()),
        data,
    ]


class ArrowWeightWriter:
    """Write tensors one at a time into an aligned Arrow IPC file.  Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, WEIGHT_SCHEMA)
        self._schema_size = WEIGHT_SCHEMA.serialize().size
        self._started = False
        self.tensors = self.parameters = self.bytes = 0

    def __enter__(self) -> "ArrowWeightWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, t: Tensor) -> str:
        """Append one tensor; returns its SHA-256 hex digest."""
        nbytes = t.data.nbytes
        if tensor_nbytes(t.shape, t.dtype) != nbytes:
            raise WeightFormatError(f"{t.name!r}: shape {t.shape} x {t.dtype} disagrees with {nbytes} bytes")
        sha = _sha256(t.data)
        empty = Tensor(t.name, t.dtype, t.shape, memoryview(b""))
        head = pa.record_batch(_row_arrays(empty, sha, 0), schema=WEIGHT_SCHEMA).serialize().size
        pos = self._sink.tell() if self._started else _IPC_MAGIC + self._schema_size
        pad = -(pos + head) % ALIGNMENT  # a multiple of 8: IPC messages are 8-aligned
        self._writer.write_batch(pa.record_batch(_row_arrays(t, sha, pad), schema=WEIGHT_SCHEMA))
        self._started = True
        expected = pos + head + pad + -(-nbytes // 8) * 8
        if self._sink.tell() != expected:
            raise ArrowEngineError(
                f"internal: Arrow IPC layout changed (pyarrow {pa.__version__}): file at "
                f"{self._sink.tell()}, expected {expected}; alignment cannot be guaranteed")
        self.tensors += 1
        self.parameters += nbytes // DTYPES[t.dtype].itemsize
        self.bytes += nbytes
        return sha

    def close(self) -> None:
        if self._sink.closed:
            return
        try:
            self._writer.close()
        finally:
            self._sink.close()


class ParquetWeightWriter:
    """Write tensors into a zstd Parquet file, flushing a row group every ~64 MB."""

    def __init__(self, path: Path, row_group_bytes: int = PARQUET_ROW_GROUP_BYTES) -> None:
        self.path = path
        self._writer = pq.ParquetWriter(
            str(path), PARQUET_SCHEMA, compression="zstd", use_dictionary=False,
            write_statistics=False)
        self._rows: list[list] = [[] for _ in PARQUET_SCHEMA]
        self._pending = 0
        self._limit = row_group_bytes
        self.tensors = self.parameters = self.bytes = 0

    def __enter__(self) -> "ParquetWeightWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, t: Tensor) -> str:
        """Append one tensor (copied into the pending row group); returns its SHA-256."""
        nbytes = t.data.nbytes
        if nbytes > _PARQUET_MAX_VALUE:
            raise WeightFormatError(f"{t.name!r} has {nbytes} bytes; Parquet values are limited to 2 GiB, "
                                    "use --format arrow")
        sha = _sha256(t.data)
        for col, value in zip(self._rows, (t.name, t.dtype, list(t.shape), sha, bytes(t.data))):
            col.append(value)
        self._pending += nbytes
        self.tensors += 1
        self.parameters += nbytes // DTYPES[t.dtype].itemsize
        self.bytes += nbytes
        if self._pending >= self._limit:
            self._flush()
        return sha

    def _flush(self) -> None:
        if not self._rows[0]:
            return
        arrays = [pa.array(col, f.type) for col, f in zip(self._rows, PARQUET_SCHEMA)]
        table = pa.Table.from_arrays(arrays, schema=PARQUET_SCHEMA)
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))
        self._rows = [[] for _ in PARQUET_SCHEMA]
        self._pending = 0

    def close(self) -> None:
        if self._writer is None:
            return
        try:
            self._flush()
        finally:
            self._writer.close()
            self._writer = None


@contextmanager
def open_writer(path: Path, fmt: str) -> Iterator[ArrowWeightWriter | ParquetWeightWriter]:
    """A weight-file writer for ``fmt`` ('arrow' | 'parquet')."""
    writer = ArrowWeightWriter(path) if fmt == "arrow" else ParquetWeightWriter(path)
    with writer:
        yield writer


def write_tensors(path: Path, fmt: str, tensors: Iterable[Tensor]) -> WriteStats:
    """Write every tensor of ``tensors`` (consumed lazily) and hash the finished file."""
    with open_writer(path, fmt) as w:
        for t in tensors:
            w.write(t)
    return WriteStats(w.tensors, w.parameters, w.bytes, file_sha256(path))


def check_little_endian() -> None:
    """The format is little-endian; refuse to write raw bytes on other hosts."""
    if sys.byteorder != "little":
        raise ArrowEngineError("converting on a big-endian host is not supported")
