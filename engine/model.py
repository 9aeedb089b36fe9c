"""A loaded model: the public ``encode_*`` / ``embed_*`` surface of the engine.

Every encoder runs in three stages (infinity's habit): *pre* on CPU threads
(tokenize / decode images), *core* on the device (the network an architecture module of
``engine.registry`` builds), *post* (L2-normalize, float32 (N, D) numpy). A reranker (cross-encoder) scores
(query, document) pairs instead: ``score_pairs`` / ``rerank``, float32 scores.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine import precision as prec
from engine.errors import InputError, ModalityError, ModelConfigError, NotRunnableError, RowErrors
from engine.limits import RowLimits
from engine.output import OutputOptions, convert, dequantize
from engine.registry import ImageSide, TextSide

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is; the server publishes this as JSON metadata."""

    name: str
    architecture: str
    kind: str  # the architecture's registry kind: "clip", "sentence-transformer", ...
    modalities: tuple[str, ...]  # ("text", "image"), ("text",) or ("image",)
    dim: int
    precision: str
    device: str
    max_tokens: int  # longest token row accepted (model positions); 0 without a text encoder
    prompts: tuple[tuple[str, str], ...] = ()  # named prompts (name, text) a text request may pick
    default_prompt: str | None = None  # the prompt put before texts of a request that names none
    # Matryoshka sizes the model declares (engine.output): None when it declares none; () when it declares that
    # its embeddings must not be truncated.
    matryoshka_dims: tuple[int, ...] | None = None
    # A reranker (modalities ("pairs",), dim = scores per pair): the activation of its scores ("Identity",
    # "Sigmoid", ...). None for an embedding model.
    score_activation: str | None = None


IMAGE_ROWS_CPU = 2048  # BatchLimits.image_rows on CPU (SigLIP base-patch16-224: 10 images of 196 tokens)


@dataclass(frozen=True)
class BatchLimits:
    """How the engine cuts work into device batches."""

    image_batch: int = 32  # images per forward pass (load_model's default on CUDA: 128, as benchmarked)
    text_rows: int = 256  # texts per forward pass
    text_tokens: int = 8192  # padded tokens per forward pass (rows x longest row)
    # Text shapes. None: on CPU, lengths as they are and a new group once padding passes 10 % (padding is
    # compute there); on CUDA, lengths rounded up to a multiple of 8 and no padding cut (a GPU pays per
    # launch and per new shape, not per padded token: few, large, repeating shapes are fastest). A padding-free
    # net (RAGGED_TEXT: ModernBERT, EmbeddingGemma) applies text_max_padding to its attention spans only.
    text_pad_to: int | None = None
    text_max_padding: float | None = None
    # Tower rows (images x tokens per image) per forward call. None: IMAGE_ROWS_CPU on CPU, where the activations
    # of a bigger call leave the caches and its element-wise work (norms, GELU, int8 scaling) waits on memory;
    # no split on CUDA. A split changes no result: images do not see each other in the tower.
    image_rows: int | None = None
    # Image batches decoded ahead of the device. None: 1 on CPU (decoding and the model share the cores),
    # 2 on CUDA (the decode threads start on the next batch while the slowest images of this one finish).
    prefetch: int | None = None


@dataclass
class EmbedResult:
    """Embeddings for N rows. Failed rows hold zeros and have an error string.

    ``embeddings`` is (N, D) float32 unless the call asked for ``dimensions`` / ``output_dtype``
    (:mod:`engine.output`): then (N, K) of that dtype ((N, ceil(K / 8)) for binary / ubinary), and int8 / uint8
    come with the per-row ``scale`` (and, uint8, ``offset``) that :meth:`dequantize` applies.
    """

    embeddings: np.ndarray  # (N, D) float32, C-contiguous (or as the call's output options ask)
    errors: list[str | None] = field(default_factory=list)
    scale: np.ndarray | None = None   # (N,) float32: int8 / uint8 output
    offset: np.ndarray | None = None  # (N,) float32: uint8 output

    # Text and token-id input: (N,) int64, the token ids each row ran with (special tokens and prompt included;
    # 0 for a failed row). None for images.
    tokens: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        """Float32 embeddings: ``offset + scale * q`` for int8 / uint8, a cast for float16 / float32."""
        return dequantize(self.embeddings, self.scale, self.offset)

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)

    def raise_for_errors(self) -> np.ndarray:
        if any(e is not None for e in self.errors):
            raise RowErrors(self.errors, self)
        return self.embeddings


@dataclass
class ScoreResult:
    """Scores of N (query, document) pairs from a reranker. Failed rows hold 0 and have an error string."""

    scores: np.ndarray  # (N,) float32 for a model of one label (rerankers), (N, labels) for more; C-contiguous
    errors: list[str | None] = field(default_factory=list)

    @classmethod
    def from_rows(cls, out: np.ndarray, errors: list[str | None]) -> "ScoreResult":
        """From (N, labels) scores: one label gives (N,)."""
        return cls(out.reshape(len(out)) if out.shape[1] == 1 else out, errors)

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)

    def raise_for_errors(self) -> np.ndarray:
        if any(e is not None for e in self.errors):
            raise RowErrors(self.errors, self)
        return self.scores


class Model:
    """A model of a registered architecture (engine.registry) with weights mapped from its Arrow file.

    Use :func:`load_model`; the constructor is internal.
    """

    def __init__(self, info: ModelInfo, net: torch.nn.Module, config: Any, text: TextSide | None,
                 image: ImageSide | None, tokenizer, image_processor, limits: BatchLimits,
                 row_limits: RowLimits | None = None) -> None:
        self.info = info
        self.net = net
        self.config = config  # the architecture's frozen config
        self.text = text
        self.image = image
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.limits = limits
        self.row_limits = row_limits or RowLimits()  # per-row limits: a row over one is that row's error
        self._device = torch.device(info.device)
        self._compute_dtype = prec.compute_dtype(info.precision)
        cuda = self._device.type == "cuda"
        ahead = limits.prefetch if limits.prefetch is not None else (2 if cuda else 1)
        if ahead < 1:
            raise InputError(f"BatchLimits.prefetch: expected >= 1 batch decoded ahead, got {ahead}")
        self._ahead = ahead
        self._pad_to = limits.text_pad_to if limits.text_pad_to is not None else (8 if cuda else 1)
        self._max_padding = (limits.text_max_padding if limits.text_max_padding is not None
                             else (math.inf if cuda else 0.1))
        self._ragged = bool(getattr(net, "RAGGED_TEXT", False))  # pads inside attention only (engine.ragged)
        if self._pad_to < 1:
            raise InputError(f"BatchLimits.text_pad_to: expected a multiple >= 1, got {self._pad_to}")
        rows = limits.image_rows if limits.image_rows is not None else (0 if cuda else IMAGE_ROWS_CPU)
        if rows < 0:
            raise InputError(f"BatchLimits.image_rows: expected >= 1 tower rows per forward call (0: no split), "
                             f"got {rows}")
        tokens = image.tokens if image is not None else 0
        self._image_split = max(1, rows // tokens) if rows and tokens else 0  # images per forward call; 0: all
        self._prefetch = ThreadPoolExecutor(ahead, thread_name_prefix="arrowengine-prefetch")

    def __repr__(self) -> str:
        i = self.info
        return f"Model({i.name!r}, {i.architecture}, dim={i.dim}, {i.precision} on {i.device})"

    # ------------------------------------------------------------------ public surface
    # Every encode_* / embed_* takes the output options of engine.output: ``dimensions`` (keep the first K
    # components, normalized again when ``normalize``) and ``output_dtype`` (float32, float16, int8, uint8,
    # binary, ubinary). encode_* return the values alone; embed_* also the per-row scale (and offset) of int8 /
    # uint8. Text calls take ``truncate``: False makes a text over the model's token limit a row error.
    def encode_text(self, texts: Sequence[str], normalize: bool = True, prompt_name: str | None = None, *,
                    truncate: bool = True, dimensions: int | None = None, output_dtype: str = "float32"
                    ) -> np.ndarray:
        """Embed texts -> (N, D) float32 (after the model's prompt ``prompt_name``, default: its default prompt).
        Raises RowErrors if any row fails."""
        return self.embed_texts(texts, normalize, prompt_name, truncate=truncate, dimensions=dimensions,
                                output_dtype=output_dtype).raise_for_errors()

    def encode_tokens(self, tokens, normalize: bool = True, *, dimensions: int | None = None,
                      output_dtype: str = "float32") -> np.ndarray:
        """Embed token-id rows (list of int lists or an Arrow list array) -> (N, D) float32."""
        return self.embed_tokens(tokens, normalize, dimensions=dimensions,
                                 output_dtype=output_dtype).raise_for_errors()

    def encode_image(self, images, normalize: bool = True, *, dimensions: int | None = None,
                     output_dtype: str = "float32") -> np.ndarray:
        """Embed encoded images (list of bytes or Arrow binary array) -> (N, D) float32."""
        return self.embed_images(images, normalize, dimensions=dimensions,
                                 output_dtype=output_dtype).raise_for_errors()

    def output_options(self, dimensions: int | None = None, output_dtype: str = "float32") -> OutputOptions:
        """The checked output options of a call (engine.output): ``dimensions`` from 1 to D (only D for a model
        that declares it cannot be truncated), ``output_dtype`` one of ``engine.output.OUTPUT_DTYPES``.

        Raises:
            InputError: a bad value; the message says which values are accepted.
        """
        options = OutputOptions.create(dimensions, output_dtype)
        options.check(self.info.dim, self.info.matryoshka_dims, f"model {self.info.name!r}")
        return options

    def encode_pixels(self, pixels, normalize: bool = True, *, dimensions: int | None = None,
                      output_dtype: str = "float32") -> np.ndarray:
        """Embed preprocessed pixels (N, 3, H, W) float32 (numpy or torch) -> (N, D) float32."""
        self._need("image")
        options = self.output_options(dimensions, output_dtype)
        x = torch.as_tensor(np.ascontiguousarray(pixels) if isinstance(pixels, np.ndarray) else pixels)
        c, side = self.image.channels, self.image.size
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, side, side):
            raise InputError(f"pixels: expected shape (N, {c}, {side}, {side}), got {tuple(x.shape)}")
        out = np.zeros((x.shape[0], self.info.dim), dtype=np.float32)
        for s in range(0, x.shape[0], self.limits.image_batch):
            out[s:s + self.limits.image_batch] = self._image_core(x[s:s + self.limits.image_batch], normalize)
        return out if options.is_default else convert(out, options, normalize).values

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Similarity matrix (len(a), len(b)) of two embedding sets: the network's own score of the L2-normalized
        sets when it has one (``net.similarity(a, b)``, e.g. SigLIP's sigmoid of a scaled cosine), else cosine."""
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        score = getattr(self.net, "similarity", None)
        return a @ b.T if score is None else score(a, b)

    def embed_texts(self, texts, normalize: bool = True, prompt_name: str | None = None, *, truncate: bool = True,
                    dimensions: int | None = None, output_dtype: str = "float32") -> EmbedResult:
        """Embed texts; a null or non-string row is an error for that row only. ``prompt_name``: one of the
        model's prompts (``info.prompts``) to put before every text; None: the default prompt, if any.
        ``truncate``: cut texts at the model's token limit (False: a longer text is a row error)."""
        options = self.output_options(dimensions, output_dtype)
        rows, errors = self.prepare_texts(texts, prompt_name, truncate=truncate)
        return apply_output_options(self._embed_token_rows(rows, errors, normalize), options, normalize)

    def embed_tokens(self, tokens, normalize: bool = True, *, dimensions: int | None = None,
                     output_dtype: str = "float32") -> EmbedResult:
        """Embed token-id rows; ids outside the vocabulary or rows too long (the model's positions,
        ``row_limits.max_row_tokens``) are row errors (token-id rows are never cut: that would drop their closing
        special token)."""
        options = self.output_options(dimensions, output_dtype)
        rows, errors = self.prepare_tokens(tokens)
        return apply_output_options(self._embed_token_rows(rows, errors, normalize), options, normalize)

    # The pre / core split, public so that a scheduler (engine.scheduler) can run the
    # CPU stage in its callers' threads and batch the device stage across callers.
    # embed_texts(t) == embed_token_rows on the good rows of prepare_texts(t).
    def prepare_texts(self, texts, prompt_name: str | None = None, truncate: bool = True
                      ) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Pre stage of :meth:`embed_texts`: tokenize after the prompt, truncating to the model's length (with
        ``truncate=False`` a longer text is a row error naming its token count and the limit).

        Returns (int64 id row or None, error or None) per row. Raises ModalityError, InputError (an unknown
        prompt_name, a ``truncate`` that is not a bool).
        """
        self._need("text")
        if not isinstance(truncate, bool):
            raise InputError(f"truncate must be True or False; got {truncate!r:.80}")
        return self.tokenizer.encode(texts, self.prompt(prompt_name), truncate=truncate)

    def prompt(self, prompt_name: str | None) -> str:
        """The text of the model's prompt ``prompt_name`` (None: the default prompt, "" without one).

        Raises:
            InputError: the model has no prompt of that name (the message lists its prompts).
        """
        if prompt_name is None:
            return self.text.prompt if self.text is not None else ""
        prompts = dict(self.info.prompts)
        if prompt_name not in prompts:
            have = f"its prompts are {sorted(prompts)}" if prompts else "it has no prompts"
            raise InputError(f"unknown prompt_name {prompt_name!r:.100} for model {self.info.name!r}: {have}")
        return prompts[prompt_name]

    def prepare_tokens(self, tokens) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Pre stage of :meth:`embed_tokens`: validate id rows (vocabulary, length against the model's positions
        and ``row_limits.max_row_tokens``, CLIP's end-of-text).

        Returns (int64 id row or None, error or None) per row. Raises ModalityError, InputError.
        """
        from engine.tokenizer import token_rows

        self._need("text")
        text = self.text
        # models that pool over every id they get have a pad_id: trailing pad ids (HF's padding=True) are cut off
        rows, errors = token_rows(tokens, text.vocab_size, text.max_tokens, pad_id=text.pad_id)
        for i, r in enumerate(rows):
            error = None if r is None else self.row_limits.token_row_error(len(r))
            if error is not None:
                rows[i], errors[i] = None, error
        if text.eos_id is not None:
            for i, r in enumerate(rows):
                if r is not None and not (r == text.eos_id).any():
                    rows[i], errors[i] = None, (f"no end-of-text token (id {text.eos_id}): the model pools at "
                                                "that token")
        return rows, errors

    def prepare_images(self, images):
        """Pre stage of :meth:`embed_images`: decode one device batch with ``image_processor``.

        Returns an ImageBatch (pixels of the rows that decoded, their index, an error per row).
        Raises ModalityError, InputError. Core stage: :meth:`encode_pixels`.
        """
        self._need("image")
        return self.image_processor(images)

    def embed_token_rows(self, rows: Sequence[np.ndarray], normalize: bool = True) -> np.ndarray:
        """Core + post stage for rows from :meth:`prepare_texts` / :meth:`prepare_tokens` (no None).

        Rows are grouped by length (``limits.text_rows`` / ``limits.text_tokens``), never padded
        to the model's maximum. Returns (N, D) float32.
        """
        self._need("text")
        return self._embed_token_rows(list(rows), [None] * len(rows), normalize).embeddings

    # ------------------------------------------------------------------ rerankers (cross-encoders)
    def score_pairs(self, queries, documents, prompt_name: str | None = None, *, truncate: bool = True
                    ) -> ScoreResult:
        """Score (query, document) pairs with a reranker: ``queries[i]`` against ``documents[i]`` (sequences of
        strings or Arrow string arrays of one length). A null or non-string query or document is an error for
        that row only. ``prompt_name``: one of the model's prompts (``info.prompts``) put before every query;
        None: its default prompt, if any. Scores as sentence-transformers' ``CrossEncoder.predict`` gives them:
        the logit, or its sigmoid where the model's config says (``info.score_activation``). ``truncate``: cut a
        pair over the model's token limit as HF's ``truncation="longest_first"`` does (False: such a pair is a row
        error).

        Raises:
            ModalityError: the model is not a reranker. InputError: not as many documents as queries, bad
                arguments.
        """
        rows, errors = self.prepare_pairs(queries, documents, prompt_name, truncate=truncate)
        return ScoreResult.from_rows(self._score_rows(rows), errors)

    def rerank(self, query: str, documents, prompt_name: str | None = None, *, truncate: bool = True
               ) -> ScoreResult:
        """Score one query against every document (:meth:`score_pairs` of the pairs (query, document)); the
        scores are in the documents' order (``np.argsort(-result.scores)`` ranks them)."""
        if not isinstance(query, str):
            raise InputError(f"query: expected one string, got {type(query).__name__}; for many queries, call "
                             "score_pairs(queries, documents)")
        if isinstance(documents, (str, bytes)):
            raise InputError("documents: expected a sequence of strings, got a single string; wrap it in a list")
        return self.score_pairs([query] * len(documents), documents, prompt_name, truncate=truncate)

    def prepare_pairs(self, queries, documents, prompt_name: str | None = None, truncate: bool = True
                      ) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Pre stage of :meth:`score_pairs`: tokenize each pair as the HF tokenizer tokenizes text pairs.

        Returns per row a (2, T) int64 array (token ids over token type ids) or None, and an error or None.
        Raises ModalityError, InputError. Core stage: :meth:`score_token_rows`.
        """
        self._need("pairs")
        if not isinstance(truncate, bool):
            raise InputError(f"truncate must be True or False; got {truncate!r:.80}")
        return self.tokenizer.encode_pairs(queries, documents, self.prompt(prompt_name), truncate=truncate)

    def score_token_rows(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """Core stage for rows from :meth:`prepare_pairs` (no None): (N, labels) float32 scores, rows grouped
        by length as :meth:`embed_token_rows` groups them."""
        self._need("pairs")
        return self._score_rows(list(rows))

    @torch.inference_mode()
    def _score_rows(self, rows: list[np.ndarray | None]) -> np.ndarray:
        out = np.zeros((len(rows), self.info.dim), dtype=np.float32)
        good = [i for i, r in enumerate(rows) if r is not None]
        for group, T in self.text_groups([rows[i].shape[1] for i in good]):
            idx = [good[g] for g in group]
            pairs = np.zeros((2, len(idx), T), dtype=np.int64)  # ids, type ids; right-padded with 0
            for r, i in enumerate(idx):
                pairs[:, r, :rows[i].shape[1]] = rows[i]
            ids, types = torch.from_numpy(pairs).to(self._device)
            lens = torch.tensor([rows[i].shape[1] for i in idx], device=self._device)
            out[idx] = self.net.score_pairs(ids, types, lens).float().cpu().numpy()
        return out

    def embed_images(self, images, normalize: bool = True, *, dimensions: int | None = None,
                     output_dtype: str = "float32") -> EmbedResult:
        """Embed encoded images; an undecodable image is an error for that row only."""
        self._need("image")
        options = self.output_options(dimensions, output_dtype)
        n = len(images)
        out = np.zeros((n, self.info.dim), dtype=np.float32)
        errors: list[str | None] = [None] * n
        step = self.limits.image_batch
        starts = deque(range(0, n, step))
        pending: deque = deque()

        def submit_ahead() -> None:  # keep ``self._ahead`` chunks decoding on helper threads
            while starts and len(pending) < self._ahead:
                s = starts.popleft()
                pending.append((s, self._prefetch.submit(self.prepare_images, images[s:s + step])))

        submit_ahead()
        while pending:
            s, future = pending.popleft()
            batch = future.result()
            submit_ahead()  # before the device stage, so decoding overlaps it
            for j, e in enumerate(batch.errors):
                errors[s + j] = e
            if len(batch.index):
                out[s + batch.index] = self._image_core(torch.as_tensor(batch.pixels), normalize)
        return apply_output_options(EmbedResult(out, errors), options, normalize)

    @property
    def text_max_padding(self) -> float:
        """How much a text group (a padding-free net: an attention span) may pad, as a fraction of its real tokens:
        BatchLimits.text_max_padding, else the device's default."""
        return self._max_padding

    def text_groups(self, lengths: Sequence[int]) -> list[tuple[np.ndarray, int]]:
        """How rows of these token lengths go to the device: (row indices, padded length) per forward pass."""
        from engine.tokenizer import length_buckets

        pad, cap = self._pad_to, self.info.max_tokens
        if self.text.fixed_length:  # every row costs max_tokens: one group
            lengths = [cap] * len(lengths)
        padded = [min(cap, -(-n // pad) * pad) for n in lengths] if pad > 1 else list(lengths)
        # a padding-free net pads only inside attention, in spans of its own (engine.ragged): its forward groups
        # are cut by the row and token budgets alone, so its GEMMs get as many rows as those allow
        max_padding = math.inf if self._ragged else self._max_padding
        groups = length_buckets(padded, self.limits.text_rows, self.limits.text_tokens, max_padding)
        return [(g, max(padded[i] for i in g)) for g in groups]

    # ------------------------------------------------------------------ stages
    def _need(self, modality: str) -> None:
        i = self.info
        if modality not in i.modalities and "pairs" in i.modalities:
            raise ModalityError(f"model {i.name!r} ({i.architecture}) is a reranker: it scores (query, document) "
                                "pairs and embeds nothing; call score_pairs(queries, documents) or rerank(query, "
                                "documents)")
        if modality == "pairs" and modality not in i.modalities:
            raise ModalityError(f"model {i.name!r} ({i.architecture}) is an embedding model "
                                f"({', '.join(i.modalities)}); scoring pairs needs a reranker: a cross-encoder such as "
                                "cross-encoder/ms-marco-MiniLM-L6-v2, converted with `arrowengine convert`")
        if modality not in self.info.modalities:
            raise ModalityError(f"model {self.info.name!r} ({self.info.architecture}) has no {modality} encoder; "
                                f"it accepts {', '.join(self.info.modalities)}")

    @torch.inference_mode()
    def _image_core(self, pixels: torch.Tensor, normalize: bool) -> np.ndarray:
        x = pixels.to(self._device, self._compute_dtype)
        step = self._image_split or x.shape[0]
        if step >= x.shape[0]:
            return self._post(self.net.encode_image(x), normalize)  # (B, D)
        return np.concatenate([self._post(self.net.encode_image(x[s:s + step]), normalize)
                               for s in range(0, x.shape[0], step)])

    def _post(self, y: torch.Tensor, normalize: bool) -> np.ndarray:
        y = y.float()
        if normalize:
            y = F.normalize(y, dim=-1)
        return y.cpu().numpy()

    @torch.inference_mode()
    def _embed_token_rows(self, rows: list[np.ndarray | None], errors: list[str | None],
                          normalize: bool) -> EmbedResult:
        out = np.zeros((len(rows), self.info.dim), dtype=np.float32)
        good = [i for i, r in enumerate(rows) if r is not None]
        for group, T in self.text_groups([len(rows[i]) for i in good]):
            idx = [good[g] for g in group]
            ids = np.zeros((len(idx), T), dtype=np.int64)
            for r, i in enumerate(idx):
                ids[r, :len(rows[i])] = rows[i]
            ids_t = torch.from_numpy(ids).to(self._device)
            lens = torch.tensor([len(rows[i]) for i in idx], device=self._device)
            y = (self.net.encode_text(ids_t, lens, max_padding=self._max_padding) if self._ragged
                 else self.net.encode_text(ids_t, lens))
            out[idx] = self._post(y, normalize)
        return EmbedResult(out, errors, tokens=token_counts(rows))


def token_counts(rows: Sequence[np.ndarray | None]) -> np.ndarray:
    """(N,) int64: the length of each prepared id row, 0 where the row failed (``EmbedResult.tokens``)."""
    return np.array([0 if r is None else len(r) for r in rows], dtype=np.int64)


def apply_output_options(result: EmbedResult, options: OutputOptions, normalize: bool) -> EmbedResult:
    """``result`` (N, D) float32 as ``options`` asks (engine.output.convert); itself with default options."""
    if options.is_default:
        return result
    out = convert(result.embeddings, options, normalize)
    return EmbedResult(out.values, result.errors, out.scale, out.offset, result.tokens)


def load_model(path: str | Path, device: str = "cpu", precision: str = "fp32", name: str | None = None,
               limits: BatchLimits | None = None, row_limits: RowLimits | None = None, threads: int | None = None,
               pack_weights: bool = False) -> Model:
    """Load a converted model directory (see ``arrowengine convert``).

    Args:
        path: the model directory (manifest.json + weights.arrow + HF config/tokenizer files).
        device: "cpu" or "cuda[:n]".
        precision: "fp32", "bf16", "fp16" (CUDA only) or "int8" (CPU only).
        name: the model's name in ModelInfo (default: the directory name).
        limits: batch sizes (default ``BatchLimits()``; on CUDA ``BatchLimits(image_batch=128)``).
        row_limits: the per-row limits (``engine.limits.RowLimits``: token ids per token-id row, image size,
            pixels, decoded size and formats); a row over one is that row's error. Default ``RowLimits()``.
        threads: image decode threads (default: every core).
        pack_weights: fp32 on CPU only: keep a copy of every weight packed for oneDNN, used by calls of a few
            rows (engine.packing). Batch-1 latency drops ~10 % (image) to ~30 % (text); a process that also runs
            big batches holds the weights twice; the load takes longer (B/32: +0.3-0.5 s). For latency-bound
            serving.
    Returns:
        a :class:`Model`.
    Raises:
        NotRunnableError for store-mode directories; WeightFormatError for a bad weight
        file; ModelConfigError for missing/invalid config files; PrecisionError.
    """
    from engine import allocator, registry
    from engine.weights import load_weights, read_manifest

    t0 = time.perf_counter()
    allocator.tune()
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.kind == registry.STORE:
        raise NotRunnableError(
            f"{path} holds a {manifest.architecture!r} checkpoint converted in store mode: stored, not runnable. "
            f"Runnable architectures: {registry.runnable_summary()}.")
    arch = registry.get(manifest.kind)
    dev = prec.check_device(device)
    prec.check_precision(precision, dev)
    prec.check_packing(pack_weights, precision, dev)
    state = load_weights(path)
    parts = arch.load_parts(path, {k: tuple(t.shape) for k, t in state.items()}, manifest.weights)
    tokenizer = _text_front(path, parts.text)
    row_limits = row_limits or RowLimits()
    image_processor = _image_front(path, parts.image, dev, row_limits, threads)
    prec.assign_weights(parts.net, state, path)
    net = prec.apply(parts.net, precision, dev, pack_weights=pack_weights)
    info = ModelInfo(name=name or path.name, architecture=manifest.architecture, kind=manifest.kind,
                     modalities=parts.modalities, dim=parts.dim, precision=precision, device=str(dev),
                     max_tokens=parts.text.max_tokens if parts.text is not None else 0,
                     prompts=parts.text.prompts if parts.text is not None else (),
                     default_prompt=parts.text.default_prompt if parts.text is not None else None,
                     matryoshka_dims=_declared_sizes(manifest.matryoshka_dims, parts.dim, path),
                     score_activation=parts.score_activation)
    log.info("loaded %s%s in %.1f ms", info, " (weights packed for oneDNN)" if pack_weights else "",
             (time.perf_counter() - t0) * 1e3)
    if limits is None:  # a GPU wants bigger image batches; bench/results/h200.md was measured at 128
        limits = BatchLimits(image_batch=128) if dev.type == "cuda" else BatchLimits()
    return Model(info, net, parts.config, parts.text, parts.image, tokenizer, image_processor, limits, row_limits)


def _declared_sizes(sizes: tuple[int, ...] | None, dim: int, path: Path) -> tuple[int, ...] | None:
    """The Matryoshka sizes of the manifest that the model can give (1 to ``dim``); others are dropped with a
    warning (a model card's typo must not make the model unusable)."""
    if sizes is None:
        return None
    kept = tuple(k for k in sizes if 1 <= k <= dim)
    if len(kept) != len(sizes):
        log.warning("%s: manifest.json declares Matryoshka sizes %s, but the embeddings have %d components; "
                    "ignoring %s", path, list(sizes), dim, [k for k in sizes if k not in kept])
    return kept if kept or not sizes else None  # none left: undeclared, not "must not be truncated"


def _text_front(path: Path, text: TextSide | None):
    """The tokenizer of a text model: ``tokenizer.json`` checked now, parsed on the first text call."""
    if text is None:
        return None
    from engine.tokenizer import TextTokenizer

    return TextTokenizer.from_dir(path, text.max_length, lazy=True, lowercase=text.lowercase, prefix=text.prompt,
                                  required=text.tokenizer_required)


def _image_front(path: Path, image: ImageSide | None, device: torch.device, limits: RowLimits,
                 threads: int | None):
    """The image processor of an image model, as its folder's processor config says, checked to make the
    tower's input size."""
    if image is None:
        return None
    from engine.image_processor import ArrowImageProcessor, ImageConfig

    config = ImageConfig.from_dir(path, image_size=image.size, kind=image.processor)
    if config.output_hw != (image.size, image.size):
        raise ModelConfigError(f"{path}: the image processor config (preprocessor_config.json) makes "
                               f"{config.output_hw} images but the vision tower expects ({image.size}, "
                               f"{image.size}); fix crop_size/size in that file")
    return ArrowImageProcessor(config, limits=limits, threads=threads, device=device)
