"""The Matryoshka sizes a checkpoint declares: the embedding sizes its makers trained it to be truncated to.

Read once by the converter and kept in ``manifest.json`` (``matryoshka_dims``); the server reports them
(``models`` action, ``get_flight_info``) and a request's ``dimensions`` is checked against them
(:mod:`engine.output`). Looked for, first found wins:

1. ``config_sentence_transformers.json``: ``"matryoshka_dims": [768, 512, 256, 128]``;
2. the model card (``README.md``) front matter: ``matryoshka_dims: [768, 512, 256, 128]``;
3. the model card of a model trained with sentence-transformers' ``MatryoshkaLoss`` (tag ``loss:MatryoshkaLoss``
   or ``loss:Matryoshka2dLoss``): the sizes of its ``dim_<N>`` evaluations in ``model-index``, as
   sentence-transformers writes them.

An explicit empty list (``"matryoshka_dims": []``) declares that the embeddings must not be truncated. Nothing
found: the sizes are unknown (None), and any size may be asked for.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from engine.errors import ModelConfigError
from engine.files import MiB, read_model_file, read_model_json

log = logging.getLogger(__name__)

ST_CONFIG = "config_sentence_transformers.json"
MODEL_CARD = "README.md"
MAX_CARD_BYTES = 4 * MiB  # model cards with long MTEB result tables run to a few hundred KB
KEY = "matryoshka_dims"
_MATRYOSHKA_TAGS = ("loss:MatryoshkaLoss", "loss:Matryoshka2dLoss")
_DIM_TYPE = re.compile(r"dim_(\d{1,7})")
_MAX_ENTRIES = 10_000  # model-index entries looked at (a card is untrusted input)


def declared_sizes(root: Path, boundary: Path | None = None) -> tuple[int, ...] | None:
    """The Matryoshka sizes the checkpoint in ``root`` declares, largest first; () for "must not be truncated";
    None when it declares nothing.

    Raises:
        ModelConfigError: a ``matryoshka_dims`` that is not a list of positive integers.
    """
    config = read_model_json(root, ST_CONFIG, "the sentence-transformers config", optional=True, boundary=boundary)
    if isinstance(config, dict) and KEY in config:
        return _sizes(config[KEY], root / ST_CONFIG)
    card = _front_matter(root, boundary)
    if card is None:
        return None
    if KEY in card:
        return _sizes(card[KEY], root / MODEL_CARD)
    return _evaluated_sizes(card)


def _sizes(value: Any, where: Path) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                              for v in value):
        raise ModelConfigError(f"{where}: {KEY} must be a list of positive integers (the embedding sizes the model "
                               f"was trained to be truncated to; [] for none), got {value!r:.200}")
    return tuple(sorted(set(value), reverse=True))


def _front_matter(root: Path, boundary: Path | None) -> dict[str, Any] | None:
    """The YAML front matter of the model card, or None (no card, no front matter, unreadable: not an error, a
    card is prose)."""
    try:
        data = read_model_file(root, MODEL_CARD, MAX_CARD_BYTES, "the model card", optional=True, boundary=boundary)
    except ModelConfigError as exc:
        log.warning("not reading the model card for Matryoshka sizes: %s", exc)
        return None
    if data is None:
        return None
    text = data.decode("utf-8", "replace")
    match = re.match(r"\A\ufeff?---[ \t]*\r?\n(.*?)^---[ \t]*$", text, re.DOTALL | re.MULTILINE)
    if match is None:
        return None
    try:
        import yaml
    except ImportError:
        log.warning("%s has front matter but PyYAML is not installed to read it (pip install pyyaml); Matryoshka "
                    "sizes declared there are not recorded", root / MODEL_CARD)
        return None
    try:
        doc = yaml.safe_load(match.group(1))
    except (yaml.YAMLError, RecursionError) as exc:
        log.warning("%s: the front matter is not valid YAML (%s); not read", root / MODEL_CARD,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return doc if isinstance(doc, dict) else None


def _evaluated_sizes(card: dict[str, Any]) -> tuple[int, ...] | None:
    """The N of the ``dim_<N>`` evaluations of a card whose tags say it was trained with a Matryoshka loss."""
    tags = card.get("tags")
    if not isinstance(tags, list) or not any(t in _MATRYOSHKA_TAGS for t in tags[:_MAX_ENTRIES] if isinstance(t, str)):
        return None
    sizes: set[int] = set()
    index = card.get("model-index")
    for model in index[:_MAX_ENTRIES] if isinstance(index, list) else ():
        results = model.get("results") if isinstance(model, dict) else None
        for result in results[:_MAX_ENTRIES] if isinstance(results, list) else ():
            dataset = result.get("dataset") if isinstance(result, dict) else None
            kind = dataset.get("type") if isinstance(dataset, dict) else None
            match = _DIM_TYPE.fullmatch(kind) if isinstance(kind, str) else None
            if match and int(match.group(1)) > 0:
                sizes.add(int(match.group(1)))
    return tuple(sorted(sizes, reverse=True)) or None
