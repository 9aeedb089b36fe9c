"""One error hierarchy for the engine and the converter.

The Flight layer maps these to Flight errors in one place
(``flight_server/errors.py``); nothing else should need to know them all.
"""
from __future__ import annotations


class ArrowEngineError(Exception):
    """Base class of every error ArrowEngine raises on purpose."""


class WeightFormatError(ArrowEngineError):
    """A weight file or model directory is malformed, truncated or inconsistent."""


class ModelConfigError(ArrowEngineError):
    """A model's config.json / preprocessing / tokenizer files are missing or invalid."""


class UnsupportedArchitectureError(ArrowEngineError):
    """The checkpoint's architecture has no runnable implementation here."""


class NotRunnableError(UnsupportedArchitectureError):
    """The model directory was converted in store mode: stored, not runnable."""


class PrecisionError(ArrowEngineError):
    """The requested precision is unknown or unsupported on the requested device."""


class InputError(ArrowEngineError):
    """A request-level input fault: wrong type, missing column, bad argument."""


class ModalityError(InputError):
    """The model has no encoder for the requested input kind (e.g. images on MiniLM)."""


class RowErrors(ArrowEngineError):
    """Some rows of a batch failed; ``errors[i]`` is the reason for row i or None.

    ``result`` holds the full :class:`engine.model.EmbedResult` so callers that
    want the rows that did succeed can still have them.
    """

    def __init__(self, errors: list[str | None], result: object | None = None) -> None:
        self.errors = errors
        self.result = result
        failed = [(i, e) for i, e in enumerate(errors) if e is not None]
        head = "; ".join(f"row {i}: {e}" for i, e in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        super().__init__(f"{len(failed)} of {len(errors)} rows failed: {head}{more}")


class SchedulerClosed(ArrowEngineError):
    """The scheduler was closed before the call's rows were embedded."""
