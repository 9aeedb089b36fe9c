"""The ArrowEngine model-directory format, shared by the writer (``convert/``)
and the loader (``engine/weights.py``).

A converted model directory holds ``manifest.json``, the weight file
(``weights.arrow`` or ``weights.parquet``) and the model's small files
(config, tokenizer, preprocessing) copied verbatim.

``weights.arrow`` is an uncompressed Arrow IPC *file* with one record batch of
one row per tensor and the columns of :data:`WEIGHT_SCHEMA`.  The ``_pad``
column's length is chosen per batch by the writer so that every ``data`` value
starts at a file offset that is a multiple of :data:`ALIGNMENT`; the loader
checks this and builds tensors as views of the mapped file.

This module imports neither torch nor the converter: it is data.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

FORMAT_NAME = "arrowengine"
FORMAT_VERSION = 1

MANIFEST_FILE = "manifest.json"
ARROW_WEIGHTS_FILE = "weights.arrow"
PARQUET_WEIGHTS_FILE = "weights.parquet"
WEIGHT_FILES = {"arrow": ARROW_WEIGHTS_FILE, "parquet": PARQUET_WEIGHTS_FILE}

ALIGNMENT = 64  # bytes; file offset of every ``data`` value in weights.arrow

DTYPE_CHOICES = ("keep", "float32", "float16", "bfloat16")

# Schema-level metadata keys written by the converter.
META_FORMAT = b"arrowengine.format"
META_VERSION = b"arrowengine.format_version"

COL_NAME, COL_DTYPE, COL_SHAPE, COL_SHA256, COL_PAD, COL_DATA = (
    "name", "dtype", "shape", "sha256", "_pad", "data")

# Columns the loader requires, with their exact types (``_pad`` is optional).
REQUIRED_COLUMNS: dict[str, pa.DataType] = {
    COL_NAME: pa.utf8(),
    COL_DTYPE: pa.utf8(),
    COL_SHAPE: pa.list_(pa.int64()),
    COL_SHA256: pa.utf8(),
    COL_DATA: pa.large_binary(),
}

WEIGHT_SCHEMA = pa.schema(
    [
        pa.field(COL_NAME, pa.utf8(), nullable=False),
        pa.field(COL_DTYPE, pa.utf8(), nullable=False),
        pa.field(COL_SHAPE, pa.list_(pa.int64()), nullable=False),
        pa.field(COL_SHA256, pa.utf8(), nullable=False),
        pa.field(COL_PAD, pa.binary(), nullable=False),  # zeros; aligns `data`
        pa.field(COL_DATA, pa.large_binary(), nullable=False),  # raw LE C-order bytes
    ],
    metadata={META_FORMAT: FORMAT_NAME.encode(), META_VERSION: str(FORMAT_VERSION).encode()},
)

# Parquet keeps the same columns minus the padding (no mapping, so no alignment).
PARQUET_SCHEMA = pa.schema(
    [f for f in WEIGHT_SCHEMA if f.name != COL_PAD], metadata=WEIGHT_SCHEMA.metadata
)


@dataclass(frozen=True)
class DType:
    """One tensor element type of the format."""

    name: str  # our name == torch attribute name, e.g. "bfloat16"
    itemsize: int  # bytes per element
    safetensors: tuple[str, ...]  # safetensors header codes that map to it
    floating: bool  # converted by --dtype float32|float16|bfloat16


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float64", 8, ("F64",), True),
        DType("float32", 4, ("F32",), True),
        DType("float16", 2, ("F16",), True),
        DType("bfloat16", 2, ("BF16",), True),
        # fp8 weights come with scale tensors; casting them alone would be wrong.
        DType("float8_e4m3fn", 1, ("F8_E4M3",), False),
        DType("float8_e5m2", 1, ("F8_E5M2",), False),
        DType("float8_e4m3fnuz", 1, ("F8_E4M3FNUZ",), False),
        DType("float8_e5m2fnuz", 1, ("F8_E5M2FNUZ",), False),
        DType("float8_e8m0fnu", 1, ("F8_E8M0", "E8M0"), False),
        DType("int64", 8, ("I64",), False),
        DType("int32", 4, ("I32",), False),
        DType("int16", 2, ("I16",), False),
        DType("int8", 1, ("I8",), False),
        DType("uint64", 8, ("U64",), False),
        DType("uint32", 4, ("U32",), False),
        DType("uint16", 2, ("U16",), False),
        DType("uint8", 1, ("U8",), False),
        DType("bool", 1, ("BOOL",), False),
        DType("complex64", 8, ("C64",), False),
    )
}

SAFETENSORS_DTYPES: dict[str, str] = {
    code: d.name for d in DTYPES.values() for code in d.safetensors
}


def tensor_nbytes(shape: list[int] | tuple[int, ...], dtype: str) -> int:
    """Bytes of a C-order tensor; Python ints, so no overflow.  Raises KeyError for unknown dtypes."""
    n = DTYPES[dtype].itemsize
    for dim in shape:
        n *= dim
    return n


def is_plain_relative_path(name: str) -> bool:
    """Whether ``name`` is a relative POSIX path that stays inside its folder: not absolute, no empty, '.' or
    '..' part, no backslash or NUL."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def is_plain_file_name(name: str) -> bool:
    """Whether ``name`` is a file name with no folder part (and not '.', '..' or empty)."""
    return is_plain_relative_path(name) and "/" not in name


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a converted model directory."""

    kind: str  # "clip" | "sentence-transformer" | "store"
    architecture: str  # HF architectures[0] (or model_type for store mode)
    weights: str  # file name inside the model directory
    weights_format: str  # "arrow" | "parquet"
    dtype: str  # "keep" | "float32" | "float16" | "bfloat16"
    tensors: int  # number of tensors in the weight file
    parameters: int  # sum of tensor element counts
    bytes: int  # sum of tensor data bytes
    sha256: str  # hex digest of the whole weight file
    source: str  # what was converted (path or hub id)
    created: str  # ISO-8601 UTC time of conversion
    files: tuple[str, ...] = ()  # copied small files, relative paths
    # Matryoshka sizes the checkpoint declares (largest first); None: it declares none; (): it declares that its
    # embeddings must not be truncated (engine.output). Optional in the file.
    matryoshka_dims: tuple[int, ...] | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """Serialize as pretty JSON (keys in a fixed order)."""
        data = dataclasses.asdict(self)
        data["files"] = list(self.files)
        data["matryoshka_dims"] = None if self.matryoshka_dims is None else list(self.matryoshka_dims)
        order = ["format", "format_version"] + [
            f.name for f in dataclasses.fields(self) if f.name not in ("format", "format_version")]
        return json.dumps({k: data[k] for k in order}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        """Parse and validate manifest JSON.  Unknown keys are ignored (forward compatible).

        Raises:
            ValueError: not JSON, a key is missing or has the wrong type, or the
                format/version is not ours.
        """
        try:
            data: Any = json.loads(text)
        except RecursionError as exc:  # deep nesting: not a manifest
            raise ValueError(f"not a manifest: JSON nested too deeply ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        problems: list[str] = []
        if data.get("format") != FORMAT_NAME:
            problems.append(f"format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
        if data.get("format_version") != FORMAT_VERSION:
            problems.append(
                f"format_version is {data.get('format_version')!r}, this build reads {FORMAT_VERSION}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("format", "format_version"):
                continue
            if f.name not in data:
                if f.name in ("files", "matryoshka_dims"):
                    continue
                problems.append(f"missing key {f.name!r}")
                continue
            value = data[f.name]
            want = {"int": int, "str": str}.get(str(f.type), None)
            if f.name == "files":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    problems.append("'files' must be a list of strings")
                    continue
                outside = [v for v in value if not is_plain_relative_path(v)]
                if outside:
                    problems.append(f"'files' must be relative paths inside the model directory (no '..', not "
                                    f"absolute), got {outside[:5]}")
                    continue
                value = tuple(value)
            elif f.name == "matryoshka_dims":
                if value is not None and (not isinstance(value, list) or not all(
                        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
                    problems.append(f"'matryoshka_dims' must be null or a list of positive integers, got "
                                    f"{value!r:.200}")
                    continue
                value = None if value is None else tuple(value)
            elif want is not None and (not isinstance(value, want) or isinstance(value, bool)):
                problems.append(f"{f.name!r} must be {want.__name__}, got {value!r}")
                continue
            kwargs[f.name] = value
        if not problems:
            from engine.registry import known_kinds  # the architectures this build runs, plus store mode

            if kwargs["kind"] not in known_kinds():
                problems.append(f"kind is {kwargs['kind']!r}, expected one of {known_kinds()}")
            if kwargs["weights_format"] not in WEIGHT_FILES:
                problems.append(f"weights_format is {kwargs['weights_format']!r}, expected arrow|parquet")
            if not is_plain_file_name(kwargs["weights"]):
                problems.append(f"'weights' is {kwargs['weights']!r}, expected a plain file name inside the model "
                                f"directory, such as {ARROW_WEIGHTS_FILE!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return cls(**kwargs)
