"""The runnable architectures, in one table that the converter and the loader both read.

An :class:`Architecture` says how to recognise a HuggingFace checkpoint of its family (from config.json and the
files beside it), how its tensors are named in the weight file (checkpoint prefixes stripped, heads the
embedding model does not use dropped; a name outside the known prefixes is an error, never dropped silently),
and which engine module builds the runnable model from a converted folder: that module's
``load_parts(path, shapes, weights) -> Parts``. Adding an architecture is one module and one :func:`register` call.
A checkpoint no architecture claims converts in *store* mode: every tensor kept, loadable but not runnable.

No torch here: the converter reads this module without it; ``load_parts`` is imported on first use.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import BERT_FAMILY, ST_MODULE_PREFIX, ST_RUNNABLE_MODULES, module_weight_files, st_module_names
from engine.errors import ArrowEngineError, UnsupportedArchitectureError, WeightFormatError

log = logging.getLogger(__name__)

STORE = "store"


@dataclass(frozen=True)
class TextSide:
    """What the engine needs to know to turn texts and token ids into a text tower's input."""

    max_length: int  # a text is cut to this many tokens (special tokens included), as HF's truncation=True
    max_tokens: int  # the longest token-id row accepted (the position table)
    vocab_size: int
    lowercase: bool = False  # lowercase texts before the tokenizer (sentence-transformers' do_lower_case)
    prompt: str = ""  # put before every text without a prompt_name (a sentence-transformer's default prompt)
    prompts: tuple[tuple[str, str], ...] = ()  # named prompts (name, text) a request may pick by name
    default_prompt: str | None = None  # the name of ``prompt`` among ``prompts``
    pad_id: int | None = None  # trailing pad ids are cut off token-id rows (HF's padding=True added them)
    eos_id: int | None = None  # a token-id row must hold this id (CLIP pools at it)
    tokenizer_required: bool = True  # False: without tokenizer.json the model still embeds images and token ids
    fixed_length: bool = False  # the net pads every row to max_tokens itself (SigLIP): group rows as that long


@dataclass(frozen=True)
class ImageSide:
    """The input of an image tower: (channels, size, size) pixels, made as the folder's processor config says."""

    size: int
    channels: int = 3
    tokens: int = 0  # sequence length of the tower per image (the forward-pass split on CPU uses it); 0: unknown
    processor: str = "clip"  # whose image processor defaults fill a processor config's gaps: "clip" / "siglip"


@dataclass
class Parts:
    """A runnable model as an architecture module builds it (weights not yet assigned).

    ``net`` has ``encode_text(ids (B, T) int64 right-padded, lengths (B,)) -> (B, dim)`` when ``text`` is set and
    ``encode_image(pixels (B, C, H, W)) -> (B, dim)`` when ``image`` is set, both before L2 normalization; a
    reranker's has ``score_pairs`` instead (see ``score_activation``).
    """

    net: Any  # torch.nn.Module
    config: Any  # the architecture's frozen config
    dim: int  # values per row: the embedding's width (a reranker: scores per pair)
    text: TextSide | None = None
    image: ImageSide | None = None
    # A reranker (cross-encoder): the activation its scores go through ("Identity", "Sigmoid", ...); its net has
    # ``score_pairs(ids, types, lengths) -> (B, dim)`` instead of encode_text, and ``text`` tokenizes the pairs.
    score_activation: str | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        if self.score_activation is not None:
            return ("pairs",)
        return ("text",) * (self.text is not None) + ("image",) * (self.image is not None)


LoadParts = Callable[[Path, Mapping[str, tuple[int, ...]], str], Parts]


@dataclass(frozen=True)
class Architecture:
    """One runnable model family: how the converter recognises and names it, and what builds it."""

    kind: str  # the manifest's "kind"
    summary: str  # what runs, for messages: "CLIPModel of any geometry, ..."
    detect: Callable[[dict[str, Any], Path], bool]  # (config.json, checkpoint folder) -> is it ours?
    builder: str  # the engine module whose ``load_parts(path, shapes, weights)`` builds the model
    known_prefixes: tuple[str, ...]  # output names must start with one of these (empty: any)
    strip_prefixes: tuple[str, ...] = ()  # leading checkpoint prefixes removed, first match wins
    drop_suffixes: tuple[str, ...] = (".position_ids",)  # non-persistent buffers
    drop_prefixes: tuple[str, ...] = ()  # heads the embedding model does not use (as HF's AutoModel drops them)
    _loaded: dict[str, LoadParts] = field(default_factory=dict, repr=False, compare=False)

    def load_parts(self, path: Path, shapes: Mapping[str, tuple[int, ...]], weights: str) -> Parts:
        """Build the model of the converted folder ``path`` from its weight file ``weights`` (whose tensor shapes
        are ``shapes``)."""
        if self.kind == STORE:
            raise UnsupportedArchitectureError("store mode keeps tensors only; nothing builds a model from them")
        if "fn" not in self._loaded:
            self._loaded["fn"] = importlib.import_module(self.builder).load_parts
        return self._loaded["fn"](path, shapes, weights)

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
        raise UnsupportedArchitectureError(f"unknown architecture {kind!r}; known: {known_kinds()}") from None


def detect(config: dict[str, Any], root: Path) -> Architecture:
    """The first registered architecture that claims the checkpoint, else store mode."""
    for arch in _REGISTRY.values():
        if arch.detect(config, root):
            return arch
    model_type, why = st_encoder(config, root)
    if why or model_type is not None:  # a sentence-transformer: say why it is not runnable
        log.warning("%s: %s; converting in store mode", root,
                    why or f"a sentence-transformer over {model_type!r}, which the engine does not run")
    return _STORE_ARCH


def runnable_summary() -> str:
    """What the engine runs, one architecture after another (for messages)."""
    return "; ".join(arch.summary for arch in _REGISTRY.values())


def architecture_name(config: dict[str, Any]) -> str:
    """HF ``architectures[0]``, else ``model_type``, else 'unknown'."""
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return str(config.get("model_type") or "unknown")


def st_modules(root: Path) -> list[dict[str, Any]] | None:
    """The module list of a sentence-transformers folder's ``modules.json``; None without one (or when it is
    not a module list)."""
    from engine.files import read_model_json

    try:
        modules = read_model_json(root, "modules.json", "sentence-transformers' module list", optional=True)
    except ArrowEngineError:
        return None
    return modules if st_module_names(modules) is not None else None


def st_encoder(config: dict[str, Any], root: Path) -> tuple[str | None, str]:
    """For a sentence-transformers folder whose modules the engine runs (Transformer -> Pooling -> any Dense, each
    with its folder -> optional Normalize): (its encoder's model_type, ""); for one it does not run: (None, why);
    for any other folder: (None, "")."""
    modules = st_modules(root)
    if modules is None:
        return None, ""
    names = st_module_names(modules) or []
    if "Transformer" not in names:
        return None, f"modules.json names no sentence-transformers Transformer module ({names})"
    extra = [n for n in names if n not in ST_RUNNABLE_MODULES]
    if extra:
        return None, f"sentence-transformers modules {extra} are not supported"
    for m, name in zip(modules, names):  # a Dense module needs its folder: config.json and weights
        folder = root / str(m.get("path", "")) if name == "Dense" else None
        if folder is not None and not ((folder / "config.json").is_file() and module_weight_files(folder)):
            return None, f"the Dense module's folder {m.get('path')!r} lacks config.json or its weights"
    return str(config.get("model_type")), ""


def _claims_st(model_types: tuple[str, ...]) -> Callable[[dict[str, Any], Path], bool]:
    """A detector for sentence-transformers folders over an encoder of one of ``model_types``."""
    def detect(config: dict[str, Any], root: Path) -> bool:
        return st_encoder(config, root)[0] in model_types
    return detect


# -- CLIP ------------------------------------------------------------------------------------------------
CLIP_ARCHITECTURES = ("CLIPModel", "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection")


def _is_clip(config: dict[str, Any], root: Path) -> bool:
    """CLIPModel, or one tower with its projection (a diffusers text encoder, an IP-Adapter image encoder).
    CLIPTextModel / CLIPVisionModel (no projection) share the tower model_types, so those go by architectures."""
    archs = config.get("architectures") or []
    if any(a in CLIP_ARCHITECTURES for a in archs):
        return True
    return not archs and config.get("model_type") == "clip"


register(Architecture(
    kind="clip",
    summary="CLIPModel (any geometry), CLIPTextModelWithProjection, CLIPVisionModelWithProjection",
    detect=_is_clip,
    builder="engine.clip",
    known_prefixes=("text_model.", "vision_model.", "text_projection.", "visual_projection.", "logit_scale"),
))


# -- cross-encoder rerankers (sentence-transformers' CrossEncoder) ------------------------------------------
RERANKER_ARCHITECTURES = ("BertForSequenceClassification", "XLMRobertaForSequenceClassification",
                          "RobertaForSequenceClassification")


def _is_reranker(config: dict[str, Any], root: Path) -> bool:
    """A BERT / RoBERTa / XLM-R sequence classifier, as a plain HF folder (how CrossEncoder 4.x-5.x saved it, and
    how the hub's rerankers ship) or in sentence-transformers 6.x's CrossEncoder layout (modules.json naming one
    Transformer module, config_sentence_transformers.json saying CrossEncoder). Claimed before the
    sentence-transformers below, whose detector would take a lone Transformer module too."""
    if architecture_name(config) not in RERANKER_ARCHITECTURES:
        return False
    modules = st_modules(root)
    if modules is None:
        return not (root / "modules.json").exists()
    from engine.files import read_model_json

    try:
        st = read_model_json(root, "config_sentence_transformers.json", "sentence-transformers' config",
                             optional=True) or {}
    except ArrowEngineError:
        return False
    return (st_module_names(modules) == ["Transformer"] and isinstance(st, dict)
            and st.get("model_type") == "CrossEncoder")


register(Architecture(
    kind="reranker",
    summary="cross-encoder rerankers: BertForSequenceClassification, XLMRobertaForSequenceClassification, "
            "RobertaForSequenceClassification (sentence-transformers' CrossEncoder)",
    detect=_is_reranker,
    builder="engine.reranker",
    known_prefixes=("embeddings.", "encoder.", "pooler.", "classifier."),
    strip_prefixes=("bert.", "roberta."),
))


# -- sentence-transformers over a BERT-family encoder ------------------------------------------------------
register(Architecture(
    kind="sentence-transformer",
    summary="sentence-transformers over BERT, RoBERTa, XLM-RoBERTa, MPNet, DistilBERT or ALBERT "
            "(Transformer -> Pooling -> any Dense -> optional Normalize)",
    detect=_claims_st(BERT_FAMILY),
    builder="engine.bert",
    # transformer.: DistilBERT's blocks; st_modules.: weights of module folders (2_Dense), see hf_checkpoint
    known_prefixes=("embeddings.", "encoder.", "transformer.", "pooler.", ST_MODULE_PREFIX),
    strip_prefixes=("bert.", "roberta.", "mpnet.", "distilbert.", "albert.", "model."),
    # heads of BertForMaskedLM / BertForPreTraining / RobertaForMaskedLM / MPNetForMaskedLM / DistilBertForMaskedLM /
    # AlbertForMaskedLM / AlbertForPreTraining
    drop_prefixes=("cls.", "lm_head.", "vocab_transform.", "vocab_layer_norm.", "vocab_projector.", "predictions.",
                   "sop_classifier."),
))

# -- sentence-transformers over ModernBERT (gte-modernbert-base, modernbert-embed-base) ---------------------------
register(Architecture(
    kind="modernbert",
    summary="sentence-transformers over ModernBERT (Transformer -> Pooling -> any Dense -> optional Normalize)",
    detect=_claims_st(("modernbert",)),
    builder="engine.modernbert",
    known_prefixes=("embeddings.", "layers.", "final_norm.", ST_MODULE_PREFIX),
    strip_prefixes=("model.",),  # ModernBertForMaskedLM keeps the base model under model.
    drop_prefixes=("head.", "decoder."),  # ModernBertForMaskedLM's prediction head and decoder
))

# -- EmbeddingGemma: sentence-transformers over a bidirectional Gemma 3 text model ---------------------------------
def _is_embedding_gemma(config: dict[str, Any], root: Path) -> bool:
    """A sentence-transformer over Gemma3TextModel with bidirectional attention (a causal one: store mode)."""
    return config.get("use_bidirectional_attention") is True and _claims_st(("gemma3_text",))(config, root)


register(Architecture(
    kind="gemma3",
    summary="EmbeddingGemma: sentence-transformers over a bidirectional Gemma3TextModel "
            "(Transformer -> Pooling -> any Dense -> optional Normalize)",
    detect=_is_embedding_gemma,
    builder="engine.gemma3",
    known_prefixes=("embed_tokens.", "layers.", "norm.", ST_MODULE_PREFIX),
    strip_prefixes=("model.",),  # Gemma3ForCausalLM keeps the text model under model.
    drop_prefixes=("lm_head.",),  # its (tied) language-model head
))

# -- sentence-transformers over a Qwen3 decoder (Qwen3-Embedding-0.6B / 4B / 8B) --------------------------------
register(Architecture(
    kind="qwen3",
    summary="sentence-transformers over a Qwen3 decoder, e.g. Qwen3-Embedding (Transformer -> Pooling (lasttoken) "
            "-> any Dense -> optional Normalize)",
    detect=_claims_st(("qwen3",)),  # a plain Qwen3 LLM folder (no modules.json) stays store mode
    builder="engine.qwen3",
    known_prefixes=("embed_tokens.", "layers.", "norm.", ST_MODULE_PREFIX),
    strip_prefixes=("model.",),  # Qwen3ForCausalLM keeps the decoder under model.
    drop_prefixes=("lm_head.",),  # its language-model head
))

# -- SigLIP (and fixed-resolution SigLIP 2, which ships as model_type siglip) ------------------------------------
SIGLIP_ARCHITECTURES = ("SiglipModel", "SiglipVisionModel", "SiglipTextModel")


def _is_siglip(config: dict[str, Any], root: Path) -> bool:
    """SiglipModel, SiglipVisionModel or SiglipTextModel (by architectures, else model_type). NaFlex SigLIP 2
    (Siglip2*, model_type siglip2: variable resolution) is not claimed: it converts in store mode, said here."""
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    model_type = config.get("model_type")
    naflex = isinstance(model_type, str) and model_type.startswith("siglip2")
    if naflex or any(a.startswith("Siglip2") for a in archs):
        log.warning("%s: %s is NaFlex SigLIP 2 (variable resolution): stored, not runnable; converting in store "
                    "mode (the fixed-resolution siglip2-* checkpoints, model_type 'siglip', run)", root,
                    architecture_name(config))
        return False
    if archs:
        return any(a in SIGLIP_ARCHITECTURES for a in archs)
    return model_type in ("siglip", "siglip_vision_model", "siglip_text_model")


register(Architecture(
    kind="siglip",
    summary="SiglipModel (SigLIP, fixed-resolution SigLIP 2; any geometry), SiglipVisionModel, SiglipTextModel",
    detect=_is_siglip,
    builder="engine.siglip",
    # one tower saved by transformers 5 is bare (embeddings., encoder., post_layernorm. / final_layer_norm., head.);
    # by transformers 4 under vision_model. / text_model., as SiglipModel's towers
    known_prefixes=("text_model.", "vision_model.", "logit_scale", "logit_bias", "embeddings.", "encoder.",
                    "post_layernorm.", "final_layer_norm.", "head."),
))

_STORE_ARCH = Architecture(kind=STORE, summary="store mode", detect=lambda c, r: True, builder="",
                           known_prefixes=(), drop_suffixes=())
