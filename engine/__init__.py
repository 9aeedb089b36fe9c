"""ArrowEngine's inference engine: weights mapped from Arrow files, CLIP and
sentence-transformer encoders, the ArrowImageProcessor and a batch scheduler.

The engine never imports ``pyarrow.flight``; it can be used on its own::

    import engine
    model = engine.load_model("models/clip-b32")
    vecs = model.encode_text(["a photo of a cat"])   # (1, D) float32, L2-normalized
"""
from __future__ import annotations

from engine.errors import (
    ArrowEngineError,
    InputError,
    ModalityError,
    ModelConfigError,
    NotRunnableError,
    PrecisionError,
    RowErrors,
    UnsupportedArchitectureError,
    WeightFormatError,
)

__all__ = [
    "ArrowEngineError",
    "InputError",
    "ModalityError",
    "ModelConfigError",
    "NotRunnableError",
    "PrecisionError",
    "RowErrors",
    "UnsupportedArchitectureError",
    "WeightFormatError",
    "load_model",
]


def load_model(path, device: str = "cpu", precision: str = "fp32", **kwargs):
    """Load a converted model directory; see :func:`engine.model.load_model`."""
    from engine.model import load_model as _load

    return _load(path, device=device, precision=precision, **kwargs)
