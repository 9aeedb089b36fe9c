"""A loaded model: the public ``encode_*`` / ``embed_*`` surface of the engine.

Every encoder runs in three stages (infinity's habit): *pre* on CPU threads
(tokenize / decode images), *core* on the device (the towers in ``engine.clip``
and ``engine.bert``), *post* (project, L2-normalize, float32 (N, D) numpy).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine import precision as prec
from engine.config import BertConfig, ClipConfig, bert_config, clip_config, model_max_length
from engine.errors import InputError, ModalityError, ModelConfigError, NotRunnableError, RowErrors

log = logging.getLogger(__name__)

RUNNABLE_KINDS = ("clip", "sentence-transformer")


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is; the server publishes this as JSON metadata."""

    name: str
    architecture: str
    kind: str  # "clip" | "sentence-transformer"
    modalities: tuple[str, ...]  # ("text", "image"), ("text",) or ("image",)
    dim: int
    precision: str
    device: str
    max_tokens: int  # longest token row accepted (model positions); 0 without a text encoder


@dataclass(frozen=True)
class BatchLimits:
    """How the engine cuts work into device batches."""

    image_batch: int = 32  # images per forward pass (load_model's default on CUDA: 128, as benchmarked)
    text_rows: int = 256  # texts per forward pass
    text_tokens: int = 8192  # padded tokens per forward pass (rows x longest row)
    # Text shapes. None: on CPU, lengths as they are and a new group once padding passes 10 % (padding is
    # compute there); on CUDA, lengths rounded up to a multiple of 8 and no padding cut (a GPU pays per
    # launch and per new shape, not per padded token: few, large, repeating shapes are fastest).
    text_pad_to: int | None = None
    text_max_padding: float | None = None
    # Image batches decoded ahead of the device. None: 1 on CPU (decoding and the model share the cores),
    # 2 on CUDA (the decode threads start on the next batch while the slowest images of this one finish).
    prefetch: int | None = None


@dataclass
class EmbedResult:
    """Embeddings for N rows. Failed rows hold zeros and have an error string."""

    embeddings: np.ndarray  # (N, D) float32, C-contiguous
    errors: list[str | None] = field(default_factory=list)

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)

    def raise_for_errors(self) -> np.ndarray:
        if any(e is not None for e in self.errors):
            raise RowErrors(self.errors, self)
        return self.embeddings


class Model:
    """A CLIP or sentence-transformer model with weights mapped from its Arrow file.

    Use :func:`load_model`; the constructor is internal.
    """

    def __init__(self, info: ModelInfo, net: torch.nn.Module, config: ClipConfig | BertConfig,
                 tokenizer, image_processor, limits: BatchLimits) -> None:
        self.info = info
        self.net = net
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.limits = limits
        self._device = torch.device(info.device)
        self._compute_dtype = prec.compute_dtype(info.precision)
        cuda = self._device.type == "cuda"
        ahead = limits.prefetch if limits.prefetch is not None else (2 if cuda else 1)
        if ahead < 1:
            raise InputError(f"BatchLimits.prefetch: expected >= 1 batch decoded ahead, got {ahead}")
        self._ahead = ahead
        self._pad_to = limits.text_pad_to if limits.text_pad_to is not None else (8 if cuda else 1)
        self._max_padding = (limits.text_max_padding if limits.text_max_padding is not None
                             else (float("inf") if cuda else 0.1))
        if self._pad_to < 1:
            raise InputError(f"BatchLimits.text_pad_to: expected a multiple >= 1, got {self._pad_to}")
        self._prefetch = ThreadPoolExecutor(ahead, thread_name_prefix="arrowengine-prefetch")

    def __repr__(self) -> str:
        i = self.info
        return f"Model({i.name!r}, {i.architecture}, dim={i.dim}, {i.precision} on {i.device})"

    # ------------------------------------------------------------------ public surface
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> np.ndarray:
        """Embed texts -> (N, D) float32. Raises RowErrors if any row fails."""
        return self.embed_texts(texts, normalize).raise_for_errors()

    def encode_tokens(self, tokens, normalize: bool = True) -> np.ndarray:
        """Embed token-id rows (list of int lists or an Arrow list array) -> (N, D) float32."""
        return self.embed_tokens(tokens, normalize).raise_for_errors()

    def encode_image(self, images, normalize: bool = True) -> np.ndarray:
        """Embed encoded images (list of bytes or Arrow binary array) -> (N, D) float32."""
        return self.embed_images(images, normalize).raise_for_errors()

    def encode_pixels(self, pixels, normalize: bool = True) -> np.ndarray:
        """Embed preprocessed pixels (N, 3, H, W) float32 (numpy or torch) -> (N, D) float32."""
        self._need("image")
        x = torch.as_tensor(np.ascontiguousarray(pixels) if isinstance(pixels, np.ndarray) else pixels)
        v = self.config.vision
        if x.ndim != 4 or tuple(x.shape[1:]) != (v.channels, v.image_size, v.image_size):
            raise InputError(f"pixels: expected shape (N, {v.channels}, {v.image_size}, {v.image_size}), "
                             f"got {tuple(x.shape)}")
        out = np.zeros((x.shape[0], self.info.dim), dtype=np.float32)
        for s in range(0, x.shape[0], self.limits.image_batch):
            out[s:s + self.limits.image_batch] = self._image_core(x[s:s + self.limits.image_batch], normalize)
        return out

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity matrix (len(a), len(b)) of two embedding sets."""
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return a @ b.T

    def embed_texts(self, texts, normalize: bool = True) -> EmbedResult:
        """Embed texts; a null or non-string row is an error for that row only."""
        rows, errors = self.prepare_texts(texts)
        return self._embed_token_rows(rows, errors, normalize)

    def embed_tokens(self, tokens, normalize: bool = True) -> EmbedResult:
        """Embed token-id rows; ids outside the vocabulary or rows too long are row errors."""
        rows, errors = self.prepare_tokens(tokens)
        return self._embed_token_rows(rows, errors, normalize)

    # The pre / core split, public so that a scheduler (engine.scheduler) can run the
    # CPU stage in its callers' threads and batch the device stage across callers.
    # embed_texts(t) == embed_token_rows on the good rows of prepare_texts(t).
    def prepare_texts(self, texts) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Pre stage of :meth:`embed_texts`: tokenize (truncating to the model's length).

        Returns (int64 id row or None, error or None) per row. Raises ModalityError.
        """
        self._need("text")
        return self.tokenizer.encode(texts)

    def prepare_tokens(self, tokens) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Pre stage of :meth:`embed_tokens`: validate id rows (vocabulary, length, CLIP's end-of-text).

        Returns (int64 id row or None, error or None) per row. Raises ModalityError, InputError.
        """
        from engine.tokenizer import token_rows

        self._need("text")
        # sentence-transformers pool over every id they get: trailing pad ids (HF's padding=True) are cut off
        pad = self.config.pad_token_id if self.info.kind != "clip" else None
        rows, errors = token_rows(tokens, self._vocab_size(), self.info.max_tokens, pad_id=pad)
        if self.info.kind == "clip" and self.config.text.eos_token_id != 2:
            eos = self.config.text.eos_token_id
            for i, r in enumerate(rows):
                if r is not None and not (r == eos).any():
                    rows[i], errors[i] = None, f"no end-of-text token (id {eos}): CLIP pools at that token"
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

    def embed_images(self, images, normalize: bool = True) -> EmbedResult:
        """Embed encoded images; an undecodable image is an error for that row only."""
        self._need("image")
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
        return EmbedResult(out, errors)

    def text_groups(self, lengths: Sequence[int]) -> list[tuple[np.ndarray, int]]:
        """How rows of these token lengths go to the device: (row indices, padded length) per forward pass."""
        from engine.tokenizer import length_buckets

        pad, cap = self._pad_to, self.info.max_tokens
        padded = [min(cap, -(-n // pad) * pad) for n in lengths] if pad > 1 else list(lengths)
        groups = length_buckets(padded, self.limits.text_rows, self.limits.text_tokens, self._max_padding)
        return [(g, max(padded[i] for i in g)) for g in groups]

    # ------------------------------------------------------------------ stages
    def _need(self, modality: str) -> None:
        if modality not in self.info.modalities:
            raise ModalityError(f"model {self.info.name!r} ({self.info.architecture}) has no {modality} encoder; "
                                f"it accepts {', '.join(self.info.modalities)}")

    def _vocab_size(self) -> int:
        return self.config.text.vocab_size if self.info.kind == "clip" else self.config.vocab_size

    @torch.inference_mode()
    def _image_core(self, pixels: torch.Tensor, normalize: bool) -> np.ndarray:
        x = pixels.to(self._device, self._compute_dtype)
        y = self.net.encode_image(x)  # (B, D)
        return self._post(y, normalize)

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
            out[idx] = self._post(self._text_core(ids_t, lens), normalize)
        return EmbedResult(out, errors)

    def _text_core(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.info.kind == "clip":
            eos = self.config.text.eos_token_id
            if eos == 2:  # legacy configs: HF pools at the highest id, which is end-of-text
                pos = ids.argmax(dim=-1)
            else:
                T = ids.shape[1]
                real = torch.arange(T, device=ids.device)[None, :] < lengths[:, None]
                pos = ((ids == eos) & real).int().argmax(dim=-1)  # first end-of-text token
            return self.net.encode_text(ids, pos)
        return self.net(ids, lengths)


def load_model(path: str | Path, device: str = "cpu", precision: str = "fp32", name: str | None = None,
               limits: BatchLimits | None = None, image_limits=None, threads: int | None = None,
               pack_weights: bool = False) -> Model:
    """Load a converted model directory (see ``arrowengine convert``).

    Args:
        path: the model directory (manifest.json + weights.arrow + HF config/tokenizer files).
        device: "cpu" or "cuda[:n]".
        precision: "fp32", "bf16", "fp16" (CUDA only) or "int8" (CPU only).
        name: the model's name in ModelInfo (default: the directory name).
        limits: batch sizes (default ``BatchLimits()``; on CUDA ``BatchLimits(image_batch=128)``).
        image_limits: an ``ImageLimits`` for the image processor (size and format checks).
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
    from engine import allocator
    from engine.config_check import check_config_against_weights
    from engine.weights import load_weights, read_manifest

    t0 = time.perf_counter()
    allocator.tune()
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.kind not in RUNNABLE_KINDS:
        raise NotRunnableError(
            f"{path} holds a {manifest.architecture!r} checkpoint converted in store mode: stored, not runnable. "
            "Runnable architectures: CLIPModel (any geometry), CLIPTextModelWithProjection, "
            "CLIPVisionModelWithProjection and BERT-family sentence-transformers (Transformer -> Pooling -> Normalize)."
        )
    dev = prec.check_device(device)
    prec.check_precision(precision, dev)
    prec.check_packing(pack_weights, precision, dev)
    state = load_weights(path)
    shapes = {k: tuple(t.shape) for k, t in state.items()}  # the config is checked against these first
    if manifest.kind == "clip":
        from engine.clip import CLIP
        from engine.image_processor import ArrowImageProcessor, ImageConfig
        from engine.tokenizer import TextTokenizer

        cfg = clip_config(path)
        check_config_against_weights(cfg, shapes, path, manifest.weights)
        net = CLIP(cfg)
        dim, modalities = cfg.projection_dim, cfg.modalities
        max_tokens = cfg.text.max_positions if cfg.text is not None else 0
        tokenizer = image_processor = None
        if cfg.text is not None:
            tokenizer = TextTokenizer.from_dir(path, model_max_length(path, cfg.text.max_positions), lazy=True,
                                               required=False)
        if cfg.vision is not None:
            side = cfg.vision.image_size
            image_cfg = ImageConfig.from_dir(path, image_size=side)
            if image_cfg.output_hw != (side, side):
                raise ModelConfigError(f"{path}: the image processor config (preprocessor_config.json) makes "
                                       f"{image_cfg.output_hw} images but the vision tower expects ({side}, {side}); "
                                       "fix crop_size/size in that file")
            img_kwargs = {} if image_limits is None else {"limits": image_limits}
            image_processor = ArrowImageProcessor(image_cfg, threads=threads, device=dev, **img_kwargs)
    else:
        from engine.bert import SentenceBert
        from engine.tokenizer import TextTokenizer

        cfg = bert_config(path)
        check_config_against_weights(cfg, shapes, path, manifest.weights)
        net = SentenceBert(cfg)
        dim, modalities, max_tokens = cfg.dim, ("text",), cfg.positions
        tokenizer = TextTokenizer.from_dir(path, cfg.max_seq_length, lazy=True, lowercase=cfg.lowercase,
                                           prefix=cfg.prompt)
        if cfg.prompt:
            log.info("%s: every text is embedded after the default prompt %r (config_sentence_transformers.json)",
                     path, cfg.prompt)
        image_processor = None
    prec.assign_weights(net, state, path)
    net = prec.apply(net, precision, dev, pack_weights=pack_weights)
    info = ModelInfo(name=name or path.name, architecture=manifest.architecture, kind=manifest.kind,
                     modalities=modalities, dim=dim, precision=precision, device=str(dev), max_tokens=max_tokens)
    log.info("loaded %s%s in %.1f ms", info, " (weights packed for oneDNN)" if pack_weights else "",
             (time.perf_counter() - t0) * 1e3)
    if limits is None:  # a GPU wants bigger image batches; bench/results/h200.md was measured at 128
        limits = BatchLimits(image_batch=128) if dev.type == "cuda" else BatchLimits()
    return Model(info, net, cfg, tokenizer, image_processor, limits)
