"""ArrowEngine's inference engine: weights mapped from Arrow files, CLIP and
sentence-transformer encoders, the ArrowImageProcessor and a batch scheduler.

The engine never imports ``pyarrow.flight``; it can be used on its own::

    import engine
    model = engine.load_model("models/clip-b32")
    vecs = model.encode_text(["a photo of a cat"])   # (1, D) float32, L2-normalized

Importing this package imports no torch (only :mod:`engine.errors`): the client, the command line and
the model store read :data:`PRECISIONS` and call :func:`require_engine` on an install without the engine.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

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
    "EngineNotInstalledError",
    "PRECISIONS",
    "SERVER_EXTRA_MODULES",
    "load_model",
    "missing_engine_modules",
    "require_engine",
    "set_thread_defaults",
]

log = logging.getLogger(__name__)

# Process-wide settings the engine runs best with; set by set_thread_defaults unless the user set one of them.
# OpenMP threads that finish a parallel op spin GOMP_SPINCOUNT times (libgomp, torch's OpenMP on Linux), then
# sleep. Never spinning (PASSIVE alone) starves nothing, but every op of a text model then wakes sleeping threads:
# EmbeddingGemma fp32 on 2 AMX Xeon cores ran 128 texts in 11.7-13.5 s passive, 9.1-9.6 s spinning 50,000 or
# the default 300,000. Spinning 300,000 took the cores from the image decode threads (tiny CLIP in-process
# 350 img/s vs 461 passive); 50,000 kept them (450 img/s; B/32 within noise of passive).
THREAD_DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "50000"}

# Precisions the engine runs (engine.precision checks them per device); the CLIs offer these.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8")

# What the engine needs beyond the base (client) install: the `server` extra of pyproject.toml,
# as import name -> distribution name.
SERVER_EXTRA_MODULES: dict[str, str] = {
    "torch": "torch",
    "cv2": "opencv-python-headless",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "prometheus_client": "prometheus_client",
    "yaml": "pyyaml",
}
SERVER_EXTRA_INSTALL = 'pip install "arrowengine[server]"'
SERVER_EXTRA_INSTALL_FROM_CLONE = 'pip install -e ".[server]"'


class EngineNotInstalledError(ImportError):
    """The engine's dependencies (the ``server`` extra) are not installed; the message says what to install."""


def missing_engine_modules() -> list[str]:
    """Distribution names of the ``server`` extra that cannot be imported here (found without importing)."""
    return [dist for module, dist in SERVER_EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]


def require_engine(what: str, alternative: str | None = None) -> None:
    """Raise :class:`EngineNotInstalledError` naming the ``server`` extra when the engine cannot run here.

    Args:
        what: what needs the engine, for the message (e.g. ``"arrowengine serve"``).
        alternative: an optional way to do without the engine, added to the message.
    """
    missing = missing_engine_modules()
    if not missing:
        return
    message = (f"{what} needs the engine, and this installation lacks {', '.join(missing)} (a client-only "
               f"install); install the server extra: {SERVER_EXTRA_INSTALL} (in a clone of the repository: "
               f"{SERVER_EXTRA_INSTALL_FROM_CLONE})")
    raise EngineNotInstalledError(message + (f"; or {alternative}" if alternative else ""))


def set_thread_defaults() -> None:
    """Apply :data:`THREAD_DEFAULTS` to this process's environment, unless the user set one of them (then
    none: a user's ``OMP_WAIT_POLICY=ACTIVE`` must not be cut short by our spin count).

    Every entry point that runs the engine calls this before torch loads (``arrowengine serve``, ``embed``
    without ``--server``, ``convert``, ``inspect``, Ray's engine actors, the benchmarks): OpenMP reads them
    once, when torch loads. Idle OpenMP threads spin briefly, then sleep, so they neither starve the image decode
    threads that run beside the model (``bench/serving.py``, one client streaming on 2 cores: ~30 img/s
    spinning, ~260 img/s passive) nor sleep between the many small ops of a text model (see
    :data:`THREAD_DEFAULTS`). Child processes inherit them.
    """
    if any(name in os.environ for name in THREAD_DEFAULTS):
        return
    late = "torch" in sys.modules
    for name, value in THREAD_DEFAULTS.items():
        os.environ[name] = value
        if late:  # this process's OpenMP already started; only child processes see it
            log.debug("%s=%s set after torch was imported: it applies to child processes only", name, value)


def load_model(path, device: str = "cpu", precision: str = "fp32", **kwargs):
    """Load a converted model directory; see :func:`engine.model.load_model`."""
    from engine.model import load_model as _load

    return _load(path, device=device, precision=precision, **kwargs)
