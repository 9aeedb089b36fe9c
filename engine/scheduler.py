"""Dynamic batching: rows of many concurrent callers -> device-sized batches on one worker.

A :class:`Scheduler` wraps one :class:`engine.model.Model` and mirrors its ``embed_*`` API.
Each call runs the model's *pre* stage in the caller's own thread (``prepare_images``
decodes one device batch at a time with the image processor's pool; ``prepare_texts`` /
``prepare_tokens`` tokenize or validate) and queues the prepared rows. A single device
worker thread takes queued rows of many callers, oldest first, and runs the *core* stage:

* images: up to ``model.limits.image_batch`` images per forward pass (``encode_pixels``);
* text and token ids: up to ``limits.text_rows`` rows and ``limits.text_tokens`` real
  (unpadded) tokens, embedded with ``embed_token_rows``, which groups rows of similar
  length so nothing is padded to the model's maximum;
* (query, document) pairs of a reranker: batched by tokens as texts are, tokenized with
  ``prepare_pairs`` and scored with ``score_token_rows`` (``score_pairs``, a ``ScoreResult``).

A partial batch waits at most ``max_wait_ms`` (counted from the oldest queued row) for
more rows, and only while another caller is still preparing rows, so a lone caller never
waits. Because callers decode while the worker computes, decoding of the next batch
overlaps with compute of the current one, within one call and across calls. The queue is
bounded (``max_queued_images`` / ``max_queued_tokens``): a caller that gets ahead waits.

Rows keep their request: results are scattered back by index, so nothing is lost or
mixed between callers. A batch only holds rows with the same ``normalize`` flag, so a
lone caller gets exactly the bits of the direct ``Model`` call. If a forward pass fails,
its callers are retried one by one so one caller's poison row fails only that caller.
A caller may pass ``cancelled()``; its rows that have not started are dropped and its
future is cancelled. No Arrow Flight here: the engine never imports it.

Example::

    with Scheduler(engine.load_model("models/clip-b32")) as sched:
        result = sched.embed_images(table.column("image"))   # EmbedResult, from any thread
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from engine.errors import InputError, SchedulerClosed
from engine.model import EmbedResult, Model, ScoreResult, apply_output_options, token_counts
from engine.tokenizer import length_buckets

log = logging.getLogger(__name__)

KINDS = ("image", "text", "tokens", "pairs")
BatchObserver = Callable[[str, int, float], None]  # (queue "image" | "text" | "pairs", rows, seconds)


@dataclass(frozen=True)
class SchedulerConfig:
    """How the scheduler waits and how much it holds; device batch sizes come from ``model.limits``."""

    max_wait_ms: float = 50.0         # a partial device batch waits this long for more rows
    max_queued_images: int = 128      # decoded images waiting for the device (~600 KB each at 224 px)
    max_queued_tokens: int = 65_536   # token ids waiting for the device

    def __post_init__(self) -> None:
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0; got {self.max_wait_ms}")
        for name in ("max_queued_images", "max_queued_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)}")


class _Request:
    """One caller's call: its output, errors and how many of its rows are still queued."""

    def __init__(self, n: int, dim: int, normalize: bool, cancelled: Callable[[], bool] | None,
                 scores: bool = False) -> None:
        self.out = np.zeros((n, dim), dtype=np.float32)  # (N, D), failed rows stay zero
        self.scores = scores   # pairs: the result is a ScoreResult
        self.errors: list[str | None] = [None] * n
        self.tokens: np.ndarray | None = None  # text and token ids: ids per row (EmbedResult.tokens)
        self.normalize = normalize
        self.future: Future = Future()
        self.queued = 0        # rows queued or on the device (under the scheduler lock)
        self.sealed = False    # every row has been queued
        self.dead = False      # cancelled or failed: drop its remaining rows
        self._cancelled = cancelled

    def is_cancelled(self) -> bool:
        if self.dead:
            return True
        try:
            return bool(self._cancelled and self._cancelled())
        except Exception:  # a broken callback means the caller is gone
            log.warning("cancelled() callback raised; treating the call as cancelled", exc_info=True)
            return True


@dataclass
class _Item:
    """Prepared rows of one request waiting for the device."""

    request: _Request
    index: np.ndarray        # (K,) int64: rows of request.out
    payload: object          # images: (K, 3, H, W) float32; text: list of K int64 id rows; pairs: K (2, T) rows
    sizes: np.ndarray        # (K,) images: 1 each; text and pairs: tokens per row
    born: float              # time.monotonic() when queued

    def split(self, k: int) -> tuple["_Item", "_Item"]:
        """The first ``k`` rows and the rest."""
        p = self.payload
        a = _Item(self.request, self.index[:k], p[:k], self.sizes[:k], self.born)
        b = _Item(self.request, self.index[k:], p[k:], self.sizes[k:], self.born)
        return a, b


class Scheduler:
    """Coalesces rows of concurrent ``embed_*`` calls into device batches for one model.

    Args:
        model: a loaded :class:`engine.model.Model`.
        config: wait bound, queue bounds (see :class:`SchedulerConfig`); per-row limits are the model's.
        on_batch: called from the worker after each device batch with (queue, rows, seconds);
            for metrics. Exceptions it raises are logged and ignored.

    Thread-safe. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, model: Model, config: SchedulerConfig | None = None,
                 on_batch: BatchObserver | None = None) -> None:
        self.model = model
        self.info = model.info
        self.config = config or SchedulerConfig()
        self.on_batch = on_batch
        self._cv = threading.Condition()
        self._preparing = 0  # callers still decoding / tokenizing rows they will queue
        # an embedding model's queues: images, and texts with token ids; a reranker's: pairs
        self._names = ("pairs",) if "pairs" in model.info.modalities else ("image", "text")
        self._queues: dict[str, deque[_Item]] = {q: deque() for q in self._names}
        self._queued_rows = dict.fromkeys(self._names, 0)
        self._queued_size = dict.fromkeys(self._names, 0)  # images / tokens
        self._closed = False
        self._worker = threading.Thread(target=self._run, name=f"scheduler-{model.info.name}", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ public surface
    # The output options (dimensions, output_dtype) apply to each caller's own rows once they are all computed:
    # rows of callers that asked for different ones share device batches.
    def embed_images(self, images, normalize: bool = True,
                     cancelled: Callable[[], bool] | None = None, *, dimensions: int | None = None,
                     output_dtype: str = "float32") -> EmbedResult:
        """As :meth:`Model.embed_images`, batched with other callers. Raises CancelledError if cancelled."""
        options = self.model.output_options(dimensions, output_dtype)
        result = self.submit("image", images, normalize, cancelled).result()
        return apply_output_options(result, options, normalize)

    def embed_texts(self, texts, normalize: bool = True, cancelled: Callable[[], bool] | None = None,
                    prompt_name: str | None = None, *, truncate: bool = True, dimensions: int | None = None,
                    output_dtype: str = "float32") -> EmbedResult:
        """As :meth:`Model.embed_texts`, batched with other callers (by tokens)."""
        options = self.model.output_options(dimensions, output_dtype)
        future = self.submit("text", texts, normalize, cancelled, prompt_name, truncate=truncate)
        return apply_output_options(future.result(), options, normalize)

    def embed_tokens(self, tokens, normalize: bool = True,
                     cancelled: Callable[[], bool] | None = None, *, dimensions: int | None = None,
                     output_dtype: str = "float32") -> EmbedResult:
        """As :meth:`Model.embed_tokens` (rows over the model's ``row_limits`` are row errors)."""
        options = self.model.output_options(dimensions, output_dtype)
        result = self.submit("tokens", tokens, normalize, cancelled).result()
        return apply_output_options(result, options, normalize)

    def score_pairs(self, queries, documents, cancelled: Callable[[], bool] | None = None,
                    prompt_name: str | None = None, *, truncate: bool = True) -> ScoreResult:
        """As :meth:`Model.score_pairs`, batched with other callers (by tokens)."""
        return self.submit("pairs", (queries, documents), False, cancelled, prompt_name, truncate=truncate).result()

    def submit(self, kind: str, values, normalize: bool = True, cancelled: Callable[[], bool] | None = None,
               prompt_name: str | None = None, truncate: bool = True) -> "Future[EmbedResult | ScoreResult]":
        """Prepare ``values`` in this thread, queue them, return a future of the EmbedResult ((N, D) float32:
        output options are the caller's to apply, e.g. with ``engine.model.apply_output_options``; pairs: a
        ScoreResult).

        Returns once every row is queued (images are decoded one device batch at a time, so
        compute of the first batch overlaps decoding of the next). ``kind``: "image", "text",
        "tokens" or "pairs" (``values`` is then ``(queries, documents)``, ``normalize`` is ignored);
        ``prompt_name`` (text, pairs) picks one of the model's prompts; ``truncate`` (text, pairs) False makes a
        row over the model's token limit a row error. Request-level faults
        (ModalityError, InputError) raise here, before any row is queued. The future is cancelled if
        ``cancelled()`` turns true before the rows ran.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
        if self._closed:
            raise SchedulerClosed(f"the scheduler of model {self.info.name!r} is closed; create a new one")
        with self._cv:
            self._preparing += 1
        try:
            if kind == "image":
                request = self._submit_images(values, normalize, cancelled)
            else:
                request = self._submit_token_rows(kind, values, normalize, cancelled, prompt_name, truncate)
        finally:
            with self._cv:
                self._preparing -= 1
                self._cv.notify_all()  # a waiting partial batch need not wait for this caller any more
        with self._cv:
            request.sealed = True
            self._maybe_finish(request)
        return request.future

    def queue_depth(self) -> dict[str, int]:
        """Rows waiting for the device, per queue ("image" and "text"; a reranker's: "pairs")."""
        with self._cv:
            return dict(self._queued_rows)

    def close(self) -> None:
        """Stop the worker after the batch in progress; queued calls fail with SchedulerClosed."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join()
        with self._cv:
            for q in self._queues.values():
                for item in q:
                    self._fail(item.request, SchedulerClosed("the scheduler was closed before these rows ran"))
                q.clear()
            self._queued_rows = dict.fromkeys(self._names, 0)
            self._queued_size = dict.fromkeys(self._names, 0)

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ callers' side (pre)
    def _submit_images(self, images, normalize: bool, cancelled) -> _Request:
        n = len(images)
        request = _Request(n, self.info.dim, normalize, cancelled)
        step = self.model.limits.image_batch
        for start in range(0, n, step):
            if request.is_cancelled():
                break
            try:
                batch = self.model.prepare_images(images[start:start + step])
            except Exception:
                self._abandon(request)
                raise
            for j, error in enumerate(batch.errors):
                request.errors[start + j] = error
            k = len(batch.index)
            if k:
                self._put("image", _Item(request, start + batch.index, batch.pixels,
                                         np.ones(k, dtype=np.int64), time.monotonic()))
        return request

    def _submit_token_rows(self, kind: str, values, normalize: bool, cancelled,
                           prompt_name: str | None = None, truncate: bool = True) -> _Request:
        if kind == "pairs":
            if not (isinstance(values, tuple) and len(values) == 2):
                raise InputError(f"pairs: expected a (queries, documents) tuple, got {type(values).__name__}")
            queries, documents = values
            rows, errors = self.model.prepare_pairs(queries, documents, prompt_name, truncate=truncate)
        elif kind == "text":
            rows, errors = self.model.prepare_texts(values, prompt_name, truncate=truncate)
        else:
            rows, errors = self.model.prepare_tokens(values)  # per-row limits: the model's own
        request = _Request(len(rows), self.info.dim, normalize, cancelled, scores=kind == "pairs")
        request.errors = errors
        queue = "pairs" if kind == "pairs" else "text"
        request.tokens = None if kind == "pairs" else token_counts(rows)
        good = np.array([i for i, r in enumerate(rows) if r is not None], dtype=np.int64)
        sizes = np.array([rows[i].shape[-1] for i in good], dtype=np.int64)
        lim = self.model.limits
        # The model's own length groups, so a lone caller gets the direct call's device batches.
        for group in length_buckets(sizes.tolist(), lim.text_rows, lim.text_tokens) if len(good) else []:
            if request.is_cancelled():
                break
            index = good[group]
            self._put(queue, _Item(request, index, [rows[i] for i in index], sizes[group], time.monotonic()))
        return request

    def _put(self, queue: str, item: _Item) -> None:
        """Queue ``item``; wait while the queue is full (backpressure)."""
        cap = self.config.max_queued_images if queue == "image" else self.config.max_queued_tokens
        size = int(item.sizes.sum())
        with self._cv:
            while self._queued_size[queue] and self._queued_size[queue] + size > cap:
                if self._closed:
                    break
                if item.request.is_cancelled():
                    return
                self._cv.wait(0.05)
            if self._closed:
                self._fail(item.request, SchedulerClosed("the scheduler was closed before these rows ran"))
                raise SchedulerClosed(f"the scheduler of model {self.info.name!r} is closed")
            self._queues[queue].append(item)
            self._queued_rows[queue] += len(item.index)
            self._queued_size[queue] += size
            item.request.queued += len(item.index)
            self._cv.notify_all()

    def _abandon(self, request: _Request) -> None:
        with self._cv:
            request.dead = True

    # ------------------------------------------------------------------ the device worker (core)
    def _run(self) -> None:
        while True:
            with self._cv:
                batch = self._next_batch()
            if batch is None:
                return
            queue, items = batch
            if items:
                self._compute(queue, items)

    def _next_batch(self) -> tuple[str, list[_Item]] | None:
        """Wait for rows, then up to ``max_wait_ms`` for a full batch; take it. Holds the lock."""
        while True:
            while not self._closed and not any(self._queues.values()):
                self._cv.wait()
            if self._closed:
                return None
            queue = min((q for q in self._queues if self._queues[q]), key=lambda q: self._queues[q][0].born)
            deadline = self._queues[queue][0].born + self.config.max_wait_ms / 1e3
            # Wait only while some caller is still preparing rows: a lone caller never waits.
            while not self._closed and not self._full(queue) and self._preparing > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            if self._closed:
                return None
            items = self._take(queue)
            self._cv.notify_all()  # room in the queue for waiting callers
            if items:
                return queue, items

    def _full(self, queue: str) -> bool:
        lim = self.model.limits
        if queue == "image":
            return self._queued_size["image"] >= lim.image_batch
        return self._queued_rows[queue] >= lim.text_rows or self._queued_size[queue] >= lim.text_tokens

    def _take(self, queue: str) -> list[_Item]:
        """Pop one device batch of rows, all with the oldest live row's ``normalize``; drop cancelled rows."""
        lim = self.model.limits
        max_rows, max_size = (lim.image_batch, lim.image_batch) if queue == "image" else (lim.text_rows,
                                                                                          lim.text_tokens)
        taken: list[_Item] = []
        kept: deque[_Item] = deque()
        rows = size = 0
        normalize = None
        callers: set[int] = set()  # one item per caller, so a lone caller's batches are its own
        q = self._queues[queue]
        while q:
            item = q.popleft()
            n, s = len(item.index), int(item.sizes.sum())
            if item.request.is_cancelled():
                self._dequeue(queue, n, s)
                self._cancel(item.request, n)
                continue
            if normalize is None:
                normalize = item.request.normalize
            if (item.request.normalize != normalize or id(item.request) in callers
                    or rows >= max_rows or size >= max_size):
                kept.append(item)
                continue
            k = _fit(item.sizes, max_rows - rows, max_size - size)
            if not rows:
                k = max(1, k)  # the first item always goes, even a single row over max_size
            if k == 0:
                kept.append(item)
                continue
            if k < n:
                item, rest = item.split(k)
                kept.append(rest)
                n, s = k, int(item.sizes.sum())
            taken.append(item)
            callers.add(id(item.request))
            self._dequeue(queue, n, s)
            rows += n
            size += s
        q.extend(kept)
        return taken

    def _dequeue(self, queue: str, rows: int, size: int) -> None:
        self._queued_rows[queue] -= rows
        self._queued_size[queue] -= size

    def _compute(self, queue: str, items: list[_Item]) -> None:
        t0 = time.perf_counter()
        try:
            self._forward(queue, items)
        except Exception as exc:
            requests = list({id(i.request): i.request for i in items}.values())
            if len(requests) == 1:
                log.warning("device batch of model %s failed: %s", self.info.name, exc)
                with self._cv:
                    self._fail(requests[0], exc)
            else:  # isolate: run each caller's rows alone, fail only the callers whose rows fail
                for request in requests:
                    self._compute(queue, [i for i in items if i.request is request])
            return
        rows = sum(len(i.index) for i in items)
        seconds = time.perf_counter() - t0
        with self._cv:
            for item in items:
                item.request.queued -= len(item.index)
                self._maybe_finish(item.request)
        if self.on_batch is not None:
            try:
                self.on_batch(queue, rows, seconds)
            except Exception:
                log.warning("on_batch observer raised", exc_info=True)

    def _forward(self, queue: str, items: list[_Item]) -> None:
        """One device batch; scatter each row's embedding back to its request."""
        normalize = items[0].request.normalize
        if queue == "image":
            pixels = items[0].payload if len(items) == 1 else _concat([i.payload for i in items])
            y = self.model.encode_pixels(pixels, normalize)  # (K, D)
        elif queue == "pairs":
            y = self.model.score_token_rows([r for i in items for r in i.payload])  # (K, labels)
        else:
            y = self.model.embed_token_rows([r for i in items for r in i.payload], normalize)  # (K, D)
        start = 0
        for item in items:
            k = len(item.index)
            item.request.out[item.index] = y[start:start + k]
            start += k

    # ------------------------------------------------------------------ completion (lock held)
    def _maybe_finish(self, request: _Request) -> None:
        if request.sealed and request.queued == 0 and not request.dead and not request.future.done():
            if request.is_cancelled():
                request.dead = True
                request.future.cancel()
            else:
                if request.scores:
                    request.future.set_result(ScoreResult.from_rows(request.out, request.errors))
                else:
                    request.future.set_result(EmbedResult(request.out, request.errors, tokens=request.tokens))

    def _cancel(self, request: _Request, rows: int) -> None:
        request.queued -= rows
        if not request.dead:
            request.dead = True
            request.future.cancel()

    def _fail(self, request: _Request, exc: BaseException) -> None:
        request.dead = True
        if not request.future.done():
            request.future.set_exception(exc)


def _fit(sizes: np.ndarray, max_rows: int, max_size: int) -> int:
    """How many leading rows fit in ``max_rows`` rows and ``max_size`` total size (may be 0)."""
    if max_rows <= 0 or max_size <= 0:
        return 0
    total = np.cumsum(sizes[:max_rows])
    return int(np.searchsorted(total, max_size, side="right"))


def _concat(parts: list):
    """Join image payloads: numpy pixels from the CPU decoder, torch tensors from a device decoder."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    import torch

    device = next(p.device for p in parts if isinstance(p, torch.Tensor))
    return torch.cat([torch.as_tensor(p).to(device) for p in parts])

