"""What a request asks of its embeddings after the forward pass: Matryoshka truncation and the output dtype.

The engine always computes (N, D) float32 embeddings; :func:`convert` turns them, per request, into what the
request asked for. numpy only (no torch): the Flight layer calls it too, for rows the scheduler computed in
one batch with other requests' rows.

* ``dimensions`` K: the first K components, L2-normalized again when the request normalizes (the Matryoshka
  way: a model trained with MatryoshkaLoss keeps most of its quality at its declared sizes; any other model
  can be truncated as well, with a larger loss).
* ``output_dtype``:

  ========== =============================================== =============================================
  float32    (N, K) float32                                  the engine's own values (no copy when K = D)
  float16    (N, K) float16                                  rounded to nearest
  int8       (N, K) int8, ``scale`` (N,) float32             per row, symmetric: ``scale = max|x| / 127``,
                                                             ``q = round(x / scale)``; ``x ≈ scale * q``
  uint8      (N, K) uint8, ``scale``, ``offset`` (N,)        per row, min-max: ``offset = min x``,
                                                             ``scale = (max x - min x) / 255``,
                                                             ``q = round((x - offset) / scale)``;
                                                             ``x ≈ offset + scale * q``
  binary     (N, ceil(K / 8)) int8                           sign bits (x > 0) packed 8 per byte, first
                                                             component in the high bit, minus 128
  ubinary    (N, ceil(K / 8)) uint8                          the same bits without the shift
  ========== =============================================== =============================================

  binary / ubinary are the layout of sentence-transformers' ``quantize_embeddings(..., "binary" | "ubinary")``
  (``np.packbits(x > 0)``, the last byte padded with zero bits). int8 / uint8 use one scale (and offset) per
  row, so no calibration set is needed; every component is within half a step (``scale / 2``) of its value.
  A row of zeros (a failed row) has scale 0 and dequantizes to zeros.

Which models may be truncated: every model, to any K from 1 to D, unless its folder declares an empty list of
Matryoshka sizes (``"matryoshka_dims": []``), which says its embeddings must not be cut; then only K = D is
accepted. Declared sizes (``ModelInfo.matryoshka_dims``) are the sizes the model was trained to work at; other
sizes are accepted too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from engine.errors import InputError

OUTPUT_DTYPES: tuple[str, ...] = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
# The output dtypes that come with a per-row scale, and (uint8) an offset: x ≈ offset + scale * q.
SCALED_DTYPES: tuple[str, ...] = ("int8", "uint8")
OFFSET_DTYPES: tuple[str, ...] = ("uint8",)
PACKED_DTYPES: tuple[str, ...] = ("binary", "ubinary")
# The numpy type of one output value of each dtype.
NUMPY_TYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
               "binary": np.int8, "ubinary": np.uint8}


@dataclass(frozen=True)
class OutputOptions:
    """The post-processing a request asks for. Build with :meth:`create` (checks the values)."""

    dimensions: int | None = None  # None: all D components
    output_dtype: str = "float32"

    @classmethod
    def create(cls, dimensions: int | None = None, output_dtype: str = "float32") -> "OutputOptions":
        """Checked options.

        Raises:
            InputError: ``dimensions`` not a positive integer (or None), ``output_dtype`` not one of
                :data:`OUTPUT_DTYPES`.
        """
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, (int, np.integer))
                                       or dimensions < 1):
            raise InputError(f"dimensions must be a positive integer (how many leading components to keep) or "
                             f"null for all; got {_show(dimensions)}")
        if not isinstance(output_dtype, str) or output_dtype not in OUTPUT_DTYPES:
            raise InputError(f"output_dtype must be one of {list(OUTPUT_DTYPES)}; got {_show(output_dtype)}")
        return cls(None if dimensions is None else int(dimensions), output_dtype)

    @property
    def is_default(self) -> bool:
        """All D components as float32: the engine's output as it is."""
        return self.dimensions is None and self.output_dtype == "float32"

    def kept(self, dim: int) -> int:
        """Components kept of a D = ``dim`` embedding."""
        return dim if self.dimensions is None else self.dimensions

    def width(self, dim: int) -> int:
        """Values per output row: K, or ceil(K / 8) bytes for binary / ubinary."""
        k = self.kept(dim)
        return -(-k // 8) if self.output_dtype in PACKED_DTYPES else k

    def check(self, dim: int, matryoshka_dims: Sequence[int] | None = None, model: str = "the model") -> None:
        """Check ``dimensions`` against a model of dimension ``dim`` and its declared Matryoshka sizes.

        Raises:
            InputError: ``dimensions`` above ``dim``, or below it for a model that declares it cannot be truncated
                (``matryoshka_dims`` empty).
        """
        k = self.dimensions
        if k is None or k == dim:
            return
        sizes = "" if not matryoshka_dims else f" (its Matryoshka sizes: {sorted(matryoshka_dims, reverse=True)})"
        if k > dim:
            raise InputError(f"dimensions {k} is more than the {dim} components of {model}'s embeddings; pick 1 "
                             f"to {dim}{sizes}")
        if matryoshka_dims is not None and len(matryoshka_dims) == 0:
            raise InputError(f"{model} declares that its embeddings must not be truncated (its Matryoshka sizes are "
                             f"[]); omit dimensions (or pass {dim})")


@dataclass(frozen=True)
class Converted:
    """Embeddings as a request asked for them: ``values`` (N, W) C-contiguous of the output dtype; for int8 /
    uint8 the per-row ``scale`` (N,) float32, for uint8 also ``offset`` (N,) float32."""

    values: np.ndarray
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        """(N, K) float32 from int8 / uint8 values (``offset + scale * q``); float values as float32.

        Raises:
            ValueError: binary / ubinary values (signs only: nothing to dequantize).
        """
        return dequantize(self.values, self.scale, self.offset)


def convert(embeddings: np.ndarray, options: OutputOptions, normalize: bool) -> Converted:
    """(N, D) float32 embeddings -> what ``options`` asks for (see the module docstring).

    With default options the input array itself comes back (no copy). Otherwise each output array is made once
    by the conversion and nothing else copies it. ``normalize``: the request L2-normalizes, so truncated rows
    are normalized again (rows of zeros stay zeros).
    """
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (rows, dimension) array; got shape {x.shape}")
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    k = options.kept(x.shape[1])
    if k > x.shape[1]:
        raise InputError(f"dimensions {k} is more than the {x.shape[1]} components of the embeddings")
    dtype = options.output_dtype
    if dtype in PACKED_DTYPES:  # signs only: neither truncation nor normalization changes them
        packed = np.packbits(x[:, :k] > 0, axis=-1)  # (N, ceil(K / 8)) uint8, first component in the high bit
        if dtype == "binary":
            packed ^= 0x80  # == packed - 128 (mod 256): sentence-transformers' int8 layout, in place
            return Converted(packed.view(np.int8))
        return Converted(packed)
    if k < x.shape[1]:
        x = x[:, :k]
        if normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # one new array
    if dtype == "float32":
        return Converted(np.ascontiguousarray(x))  # no copy unless truncated without normalizing
    if dtype == "float16":
        return Converted(x.astype(np.float16))
    if dtype == "int8":
        return _int8(x)
    return _uint8(x)


def _int8(x: np.ndarray) -> Converted:
    scale = (np.abs(x).max(axis=1) / 127).astype(np.float32)  # (N,)
    inverse = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)
    values = np.rint(x * inverse[:, None])
    np.clip(values, -127, 127, out=values)
    return Converted(values.astype(np.int8), scale)


def _uint8(x: np.ndarray) -> Converted:
    offset = x.min(axis=1).astype(np.float32)  # (N,)
    scale = ((x.max(axis=1) - offset) / 255).astype(np.float32)
    inverse = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)
    values = np.rint((x - offset[:, None]) * inverse[:, None])
    np.clip(values, 0, 255, out=values)
    return Converted(values.astype(np.uint8), scale, offset)


def dequantize(values: np.ndarray, scale: np.ndarray | None = None, offset: np.ndarray | None = None
               ) -> np.ndarray:
    """Float32 embeddings from int8 / uint8 values and their per-row ``scale`` (and ``offset``):
    ``offset + scale * q``; float16 / float32 values are only cast.

    Raises:
        ValueError: integer values without a scale (binary / ubinary codes hold signs only).
    """
    values = np.asarray(values)
    if values.dtype.kind == "f":
        return values.astype(np.float32)
    if scale is None:
        raise ValueError("integer embeddings without a per-row scale are binary codes (signs only): they cannot be "
                         "dequantized; int8 / uint8 output comes with its scale (and offset)")
    out = values.astype(np.float32) * np.asarray(scale, np.float32)[:, None]
    if offset is not None:
        out += np.asarray(offset, np.float32)[:, None]
    return out


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}..."
