"""Architectures the converter knows, registered by name.

Each :class:`Architecture` says whether a checkpoint is of its kind (from
config.json and the files present) and maps checkpoint tensor names to the
names written into the weight file.  Runnable architectures are strict: a
tensor name outside their known prefixes is an error, never silently dropped.
Anything no architecture claims is converted in *store* mode (every tensor
kept as-is, loadable but not runnable).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.hf_checkpoint import module_weight_files
from engine.config import BERT_FAMILY, ST_MODULE_PREFIX, ST_RUNNABLE_MODULES, st_module_names
from engine.errors import UnsupportedArchitectureError, WeightFormatError

log = logging.getLogger(__name__)

STORE = "store"


@dataclass(frozen=True)
class Architecture:
    """How to recognise one model family and name its tensors."""

    kind: str  # manifest "kind"
    detect: Callable[[dict[str, Any], Path], bool]  # (config, checkpoint dir) -> is it ours?
    known_prefixes: tuple[str, ...]  # output names must start with one of these (empty: any)
    strip_prefixes: tuple[str, ...] = ()  # leading checkpoint prefixes removed, first match wins
    drop_suffixes: tuple[str, ...] = (".position_ids",)  # non-persistent buffers
    drop_prefixes: tuple[str, ...] = ()  # heads the embedding model does not use (as HF's AutoModel drops them)

    def rename(self, name: str) -> str | None:
        """Output name for checkpoint tensor ``name``; None to drop it."""
        if name.endswith(self.drop_suffixes) or name.startswith(self.drop_prefixes):
            return None
        for prefix in self.strip_prefixes:
            if name.startswith(prefix):
                return name[len(prefix):]
        return name

    def plan(self, names: list[str]) -> list[tuple[str, str]]:
        """(checkpoint name, output name) for every kept tensor.

        Raises:
            WeightFormatError: unknown tensor names (all listed) or two names that collide after renaming.
        """
        plan, unknown, seen = [], [], {}
        for name in names:
            out = self.rename(name)
            if out is None:
                log.debug("dropping %s (a non-persistent buffer or an unused head)", name)
                continue
            if self.known_prefixes and not out.startswith(self.known_prefixes):
                unknown.append(name)
                continue
            if out in seen:
                raise WeightFormatError(f"tensors {seen[out]!r} and {name!r} both become {out!r}")
            seen[out] = name
            plan.append((name, out))
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:20])
            more = f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else ""
            raise WeightFormatError(
                f"{len(unknown)} tensor name(s) unknown for a {self.kind!r} model: {shown}{more}; "
                f"known prefixes: {list(self.known_prefixes)}. Use a checkpoint of the base model, "
                "or convert in store mode")
        return plan


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add an architecture; detection tries them in registration order."""
    if arch.kind in _REGISTRY or arch.kind == STORE:
        raise ValueError(f"architecture {arch.kind!r} is already registered")
    _REGISTRY[arch.kind] = arch
    return arch


def known_kinds() -> list[str]:
    """Registered kinds plus 'store'."""
    return [*_REGISTRY, STORE]


def get(kind: str) -> Architecture:
    """The architecture registered as ``kind`` ('store' gives the pass-through one).

    Raises:
        UnsupportedArchitectureError: unknown kind (the message lists the known ones).
    """
    if kind == STORE:
        return _STORE_ARCH
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unknown architecture {kind!r}; known: {known_kinds()}") from None


def detect(config: dict[str, Any], root: Path) -> Architecture:
    """The first registered architecture that claims the checkpoint, else store mode."""
    for arch in _REGISTRY.values():
        if arch.detect(config, root):
            return arch
    return _STORE_ARCH


def architecture_name(config: dict[str, Any]) -> str:
    """HF ``architectures[0]``, else ``model_type``, else 'unknown'."""
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return str(config.get("model_type") or "unknown")


# -- CLIP --------------------------------------------------------------------------------------
CLIP_ARCHITECTURES = ("CLIPModel", "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection")


def _is_clip(config: dict[str, Any], root: Path) -> bool:
    """CLIPModel, or one tower with its projection (a diffusers text encoder, an IP-Adapter image encoder).
    CLIPTextModel / CLIPVisionModel (no projection) share the tower model_types, so those go by architectures."""
    archs = config.get("architectures") or []
    if any(a in CLIP_ARCHITECTURES for a in archs):
        return True
    return not archs and config.get("model_type") == "clip"


# -- sentence-transformers over a BERT-family encoder -------------------------------------------
def _is_sentence_transformer(config: dict[str, Any], root: Path) -> bool:
    try:
        modules = json.loads((root / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    names = st_module_names(modules)
    if not names or "Transformer" not in names:
        if names is not None:
            log.warning("%s: modules.json names no sentence-transformers Transformer module (%s); converting in "
                        "store mode", root, names)
        return False
    model_type = config.get("model_type")
    if model_type not in BERT_FAMILY:
        log.warning("%s: a sentence-transformer over %r, which the engine does not run (it runs %s); converting "
                    "in store mode", root, model_type, ", ".join(BERT_FAMILY))
        return False
    extra = [n for n in names if n not in ST_RUNNABLE_MODULES]
    if extra:
        log.warning("%s: sentence-transformers modules %s are not supported; converting in store mode",
                    root, extra)
        return False
    for m, name in zip(modules, names):  # a Dense module needs its folder: config.json and weights
        folder = root / str(m.get("path", "")) if name == "Dense" else None
        if folder is not None and not ((folder / "config.json").is_file() and module_weight_files(folder)):
            log.warning("%s: the Dense module's folder %r lacks config.json or its weights; converting in store "
                        "mode", root, m.get("path"))
            return False
    return True


register(Architecture(
    kind="clip",
    detect=_is_clip,
    known_prefixes=("text_model.", "vision_model.", "text_projection.", "visual_projection.",
                    "logit_scale"),
))
register(Architecture(
    kind="sentence-transformer",
    detect=_is_sentence_transformer,
    # transformer.: DistilBERT's blocks; st_modules.: weights of module folders (2_Dense), see hf_checkpoint
    known_prefixes=("embeddings.", "encoder.", "transformer.", "pooler.", ST_MODULE_PREFIX),
    strip_prefixes=("bert.", "roberta.", "mpnet.", "distilbert.", "albert.", "model."),
    # heads of BertForMaskedLM / BertForPreTraining / RobertaForMaskedLM / MPNetForMaskedLM / DistilBertForMaskedLM /
    # AlbertForMaskedLM / AlbertForPreTraining
    drop_prefixes=("cls.", "lm_head.", "vocab_transform.", "vocab_layer_norm.", "vocab_projector.", "predictions.",
                   "sop_classifier."),
))
_STORE_ARCH = Architecture(kind=STORE, detect=lambda c, r: True, known_prefixes=(), drop_suffixes=())
