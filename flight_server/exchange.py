"""The exchange pipeline: one validated ``do_exchange`` from its input stream to its result stream.

:class:`Exchange` reads the client's batches, checks each against the per-batch limits, hands the
received Arrow column to the model as it is (the engine decodes from views of the received buffer) and
writes one output batch per input batch, wrapping the engine's (N, D) float32 output as the ``embedding``
column without copying; for ``pairs`` input (a reranker) it hands over the query and document columns and
wraps the scores as the ``score`` column, also without copying. The servicer (:mod:`flight_server.servicer`)
validates the command, picks the model and keeps the RPC surface; it hands each exchange its :class:`Call` and
two hooks (a batch arrived, a result was written) for slots, counters and metrics.

Models are duck-typed (``engine.model`` API): ``.info`` (``dim``, ``modalities``, ...) and
``embed_images / embed_texts / embed_tokens(array, normalize=) -> EmbedResult`` with
``embeddings`` (N, D) float32 C-contiguous and ``errors`` (list of str | None); a reranker (modality
``pairs``) has ``score_pairs(queries, documents) -> ScoreResult`` (``scores`` (N,) or (N, L) float32,
``errors``) instead. A model
that also has ``submit(kind, array, normalize, cancelled, prompt_name=) -> Future[EmbedResult]`` (an
``engine.scheduler.Scheduler``, which ``arrowengine serve`` puts in front of every model)
is pipelined: while the rows of input batch k are on the device, the exchange already
reads and decodes batch k+1, and a writer thread sends each result as soon as it is ready
(in input order), so a client that waits for a result before writing more never stalls.

A :class:`Call` also records when the exchange waits on its client (reading, or blocked writing), which the
servicer's idle watchdog reads. Never imports torch.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import CancelledError, Future
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from engine.errors import ArrowEngineError, SchedulerClosed
from flight_server import protocol
from flight_server.config import ServerLimits

log = logging.getLogger(__name__)

PIPELINE_DEPTH = 2  # input batches submitted ahead of the one being written

Collect = Callable[[], "tuple[pa.RecordBatch, int]"]  # waits for a batch's result: (output batch, row errors)


def embedding_batch(passthrough: list[pa.Array], schema: pa.Schema, embeddings: np.ndarray,
                    errors: list[str | None], command: protocol.EmbedCommand | None = None) -> pa.RecordBatch:
    """One output batch: passthrough arrays (as they are), ``embedding`` (and the scale / offset columns of int8 /
    uint8 output), ``error``.

    The command's output options (``dimensions``, ``output_dtype``) apply here, to this request's rows once the
    engine computed them (:func:`protocol.output_columns`); ``embedding`` wraps the engine's own memory (default
    options) or the conversion's (no further copy); rows with an error are null.
    """
    if command is None:
        outputs = protocol.output_columns(embeddings, errors)
    else:
        outputs = protocol.output_columns(embeddings, errors, command.normalize, command.dimensions,
                                          command.output_dtype)
    error = pa.array(errors, type=pa.string())
    return pa.RecordBatch.from_arrays([*passthrough, *outputs, error], schema=schema)


def score_batch(passthrough: list[pa.Array], schema: pa.Schema, scores: np.ndarray,
                errors: list[str | None]) -> pa.RecordBatch:
    """One output batch of ``pairs`` input: passthrough arrays, ``score`` (wrapping ``scores``' memory, rows with
    an error null), ``error``."""
    score = protocol.score_column(scores, errors)
    error = pa.array(errors, type=pa.string())
    return pa.RecordBatch.from_arrays([*passthrough, score, error], schema=schema)


class Cancelled(Exception):
    """The client cancelled or went away: stop quietly."""


class Stopped(Exception):
    """The exchange was told to stop (idle, shutdown, client gone) while it waited to queue a batch."""


class Call:
    """One exchange: what it did (for its log lines and metrics) and whether it makes progress (for the idle
    watchdog)."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.model = "-"          # a served name once the command resolved (bounded label values)
        self.input = "-"
        self.t0 = time.perf_counter()
        self.submitted = self.batches = self.rows = self.row_errors = 0
        self.error: str | None = None
        self.slot = False  # holds one of the server's exchange slots (from its first batch on)
        self.stop = threading.Event()  # stop now: drop queued work, write nothing more
        self.expired: str | None = None  # why the idle watchdog cancelled it
        now = time.monotonic()
        self.reading_since: float | None = now  # waiting for the client's next message (the first: the schema)
        self.writing_since: float | None = None  # inside writer.write_batch
        self.last_written = now

    def reading(self, reader) -> Iterator[Any]:
        """The reader's chunks, noting while we wait for each."""
        chunks = iter(reader)
        while True:
            self.reading_since = time.monotonic()
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            finally:
                self.reading_since = None
            yield chunk

    def idle_for(self, now: float) -> float:
        """Seconds the exchange has been waiting on its client alone: blocked writing a result, or reading with
        every result of what it sent written (0 while the engine works on its rows)."""
        writing, reading = self.writing_since, self.reading_since
        if writing is not None:
            return now - writing
        if reading is not None and self.batches >= self.submitted:
            return now - max(reading, self.last_written)
        return 0.0


def check_going(context, call: Call, abort: threading.Event) -> None:
    """Raise why the exchange must stop, if it must: idle, server shutdown, or the client went away."""
    if call.expired is not None:
        raise Stopped(call.expired)
    if abort.is_set():
        raise flight.FlightUnavailableError("server is shutting down; resend the remaining batches to another server",
                                            extra_info=protocol.error_info(protocol.CODE_BUSY))
    if context.is_cancelled():
        raise Cancelled()


def check_batch_limits(limits: ServerLimits, batch: pa.RecordBatch, index: int) -> str | None:
    """Raise LimitExceededError for a batch over the per-batch limits; a single row over the byte limit is that
    row's error instead (returned), so one huge file never fails a whole job."""
    if batch.num_rows > limits.max_batch_rows:
        raise protocol.LimitExceededError(
            f"input batch {index} has {batch.num_rows} rows; the limit is {limits.max_batch_rows} "
            f"rows per batch: split it, e.g. table.to_batches(max_chunksize={limits.max_batch_rows})")
    if batch.nbytes > limits.max_batch_bytes and batch.num_rows == 1:
        return (f"too large: the row holds {batch.nbytes} bytes, over the server's limit of "
                f"{limits.max_batch_bytes} bytes per batch (serve --max-batch-bytes)")
    if batch.nbytes > limits.max_batch_bytes:
        raise protocol.LimitExceededError(
            f"input batch {index} holds {batch.nbytes} bytes; the limit is {limits.max_batch_bytes} "
            "bytes per batch: send fewer rows per batch")
    return None


def checked_result(result: Any, n: int, dim: int) -> tuple[np.ndarray, list[str | None]]:
    """An engine EmbedResult's (embeddings, errors), checked to be (n, dim) float32 and n errors, C-contiguous;
    RuntimeError otherwise. Both protocols' result writers take the engine's rows through here."""
    embeddings, errors = result.embeddings, list(result.errors)
    if (not isinstance(embeddings, np.ndarray) or embeddings.shape != (n, dim)
            or embeddings.dtype != np.float32 or len(errors) != n):
        raise RuntimeError(f"the model returned embeddings {getattr(embeddings, 'shape', None)} "
                           f"{getattr(embeddings, 'dtype', None)} and {len(errors)} errors; "
                           f"expected ({n}, {dim}) float32 and {n} errors")
    if not embeddings.flags.c_contiguous:
        embeddings = np.ascontiguousarray(embeddings)  # the engine promises C order; be safe
    return embeddings, errors


def checked_scores(result: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, list[str | None]]:
    """A reranker's ScoreResult's (scores, errors), checked to be float32 of ``shape`` ((n,) or (n, labels)) and n
    errors, C-contiguous; RuntimeError otherwise. Both protocols' result writers take the scores through here."""
    scores, errors = result.scores, list(result.errors)
    if (not isinstance(scores, np.ndarray) or scores.shape != shape or scores.dtype != np.float32
            or len(errors) != shape[0]):
        raise RuntimeError(f"the model returned scores {getattr(scores, 'shape', None)} "
                           f"{getattr(scores, 'dtype', None)} and {len(errors)} errors; expected {shape} float32 "
                           f"and {shape[0]} errors")
    return np.ascontiguousarray(scores), errors


def submitter(model: Any, command: protocol.EmbedCommand,
              cancelled: Callable[[], bool]) -> Callable[[Any, bool], Future]:
    """``submit(values, normalize) -> Future[EmbedResult]`` (pairs: ``values`` is (queries, documents), a
    Future[ScoreResult]) for a scheduler or a plain model.

    Request-level faults raise from ``submit`` itself; a plain model runs synchronously.
    """
    kind, options = command.input, {"prompt_name": command.prompt_name} if command.prompt_name else {}
    if not command.truncate and kind in ("text", protocol.PAIRS):  # token-id rows are never cut: over-long ones
        options["truncate"] = False                                   # are always errors
    if callable(getattr(model, "submit", None)):
        return lambda values, normalize: model.submit(kind, values, normalize, cancelled, **options)
    if kind == protocol.PAIRS:  # values: (queries, documents)
        def score(values, normalize: bool) -> Future:
            future: Future = Future()
            future.set_result(model.score_pairs(*values, **options))
            return future
        return score
    embed = getattr(model, protocol.EMBED_METHODS[kind])

    def run(values, normalize: bool) -> Future:
        future: Future = Future()
        future.set_result(embed(values, normalize=normalize, **options))
        return future
    return run


def failed_batch(command: protocol.EmbedCommand, batch: pa.RecordBatch, out_schema: pa.Schema, dim: int,
                 reason: str) -> Collect:
    """The output batch of an input batch whose every row fails with ``reason`` (zeros, the error)."""
    passthrough = [batch.column(p) for p in command.passthrough]
    n = batch.num_rows
    if command.input == protocol.PAIRS:
        out = score_batch(passthrough, out_schema, zero_scores(out_schema, n), [reason] * n)
    else:
        out = embedding_batch(passthrough, out_schema, np.zeros((n, dim), np.float32), [reason] * n, command)
    return lambda: (out, n)


def zero_scores(out_schema: pa.Schema, n: int) -> np.ndarray:
    """Zero scores for ``n`` rows of a ``score`` column of ``out_schema``: (n,), or (n, L) for L labels."""
    type_ = out_schema.field(protocol.SCORE_FIELD).type
    return np.zeros((n,) if type_ == pa.float32() else (n, type_.list_size), np.float32)


def engine_failure(exc: BaseException, n: int, doing: str, done: str) -> str:
    """Log a batch of ``n`` rows that failed in the engine after it was queued; the reason each row gets."""
    log.error("a batch of %d rows failed in the engine; its rows are returned as errors", n, exc_info=exc)
    what = f"{type(exc).__name__}: {exc}" if isinstance(exc, ArrowEngineError) else type(exc).__name__
    return (f"internal error while {doing} this batch ({what}); these rows were not {done}: send them again, and "
            "see the server log if it persists")


class Exchange:
    """One do_exchange whose command the servicer validated: stream the input through the model.

    Args:
        context, reader, writer: the do_exchange call's, as pyarrow.flight hands them to the servicer.
        call: the exchange's bookkeeping (shared with the servicer's idle watchdog).
        limits: the per-batch limits (``max_batch_rows``, ``max_batch_bytes``).
        abort: set when the server shuts down: the exchange stops at its next input batch.
        on_batch: ``(call, batch)`` for each input batch before it is checked or submitted (the servicer takes
            the exchange's slot there, and may raise to refuse it).
        on_written: ``(call, rows, row_errors)`` after each output batch was written.
    """

    def __init__(self, context, reader, writer, call: Call, limits: ServerLimits, abort: threading.Event,
                 on_batch: Callable[[Call, pa.RecordBatch], None],
                 on_written: Callable[[Call, int, int], None]) -> None:
        self.context = context
        self.reader = reader
        self.writer = writer
        self.call = call
        self.limits = limits
        self.abort = abort
        self.on_batch = on_batch
        self.on_written = on_written

    def run(self, model: Any, command: protocol.EmbedCommand) -> None:
        """Read the input schema, check it against the command, begin the output, then stream."""
        call = self.call
        try:
            schema = self.reader.schema  # waits for the client's first message
            call.reading_since = None
        except OSError as exc:
            raise protocol.ProtocolError("no input schema came: the client must call writer.begin(schema) "
                                         "before writing batches (an empty input is one empty batch)") from exc
        check_going(self.context, call, self.abort)
        passthrough_fields = protocol.check_input_schema(command, schema)
        if command.input == protocol.PAIRS:
            out_schema = protocol.result_schema(model.info, passthrough_fields)
        else:
            out_schema = protocol.output_schema(int(model.info.dim), passthrough_fields, command.dimensions,
                                                command.output_dtype)
        self.writer.begin(out_schema)
        log.info("exchange start peer=%s model=%s input=%s column=%s normalize=%s prompt_name=%s dimensions=%s "
                 "output_dtype=%s truncate=%s", call.peer, call.model, command.input,
                 protocol.quote(list(command.input_columns)),
                 command.normalize, protocol.quote(command.prompt_name), command.dimensions, command.output_dtype,
                 command.truncate)
        self._stream(model, command, out_schema)

    def _stream(self, model, command: protocol.EmbedCommand, out_schema: pa.Schema) -> None:
        """Submit each input batch (at most PIPELINE_DEPTH ahead); a writer thread sends the results.

        A server shutdown stops the exchange at its next input batch, not inside one: a client that waits for
        a result before it sends more must get that result, or it would never send the batch that brings it the
        "shutting down" error."""
        context, call = self.context, self.call

        def cancelled() -> bool:
            return call.stop.is_set() or context.is_cancelled()

        embed = submitter(model, command, cancelled)
        dim = int(model.info.dim)
        results = ResultWriter(self.writer, call, cancelled, lambda rows, failed: self.on_written(call, rows, failed))
        try:
            for chunk in call.reading(self.reader):
                check_going(context, call, self.abort)
                results.check()
                batch = chunk.data
                if batch is None:  # a metadata-only message
                    continue
                self.on_batch(call, batch)
                too_big = check_batch_limits(self.limits, batch, call.submitted)
                if too_big:  # one row alone over the byte limit: an error for that row, not the call
                    results.put(failed_batch(command, batch, out_schema, dim, too_big))
                elif command.input == protocol.PAIRS:
                    results.put(self._score_batch(embed, command, batch, out_schema))
                else:
                    results.put(self._embed_batch(embed, command, batch, out_schema, dim))
                call.submitted += 1
            check_going(context, call, self.abort)  # a cancel can also end the input stream early
            results.finish()
            check_going(context, call, self.abort)
        except (CancelledError, Stopped) as exc:  # the scheduler dropped our rows, or we were told to stop: say why
            check_going(context, call, self.abort)
            raise Cancelled() from exc
        finally:
            results.stop()

    def _embed_batch(self, embed, command: protocol.EmbedCommand, batch: pa.RecordBatch,
                     out_schema: pa.Schema, dim: int) -> Collect:
        """Submit one input batch; returns ``collect()`` -> (output batch, row errors), which waits."""
        passthrough = [batch.column(p) for p in command.passthrough]
        n = batch.num_rows
        if n == 0:
            return lambda: (embedding_batch(passthrough, out_schema, np.zeros((0, dim), np.float32), [], command), 0)
        future = embed(protocol.engine_column(command.input, batch.column(command.column)), command.normalize)

        def collect() -> tuple[pa.RecordBatch, int]:
            try:
                embeddings, errors = checked_result(future.result(), n, dim)
            except (CancelledError, SchedulerClosed):
                raise  # the exchange is ending (client cancel, shutdown): nothing more to write
            except Exception as exc:
                # This batch failed after it was queued (a device fault, say). The exchange thread may be
                # waiting for the client's next batch while the client waits for this result, so the call
                # cannot end here: the batch's rows come back as errors and the stream goes on.
                reason = engine_failure(exc, n, "embedding", "embedded")
                return embedding_batch(passthrough, out_schema, np.zeros((n, dim), np.float32), [reason] * n,
                                       command), n
            out = embedding_batch(passthrough, out_schema, embeddings, errors, command)
            return out, sum(e is not None for e in errors)
        return collect

    def _score_batch(self, score, command: protocol.EmbedCommand, batch: pa.RecordBatch,
                     out_schema: pa.Schema) -> Collect:
        """As :meth:`_embed_batch`, for ``pairs`` input: submit the batch's (query, document) columns to a
        reranker; ``collect()`` gives the ``score`` batch."""
        passthrough = [batch.column(p) for p in command.passthrough]
        n = batch.num_rows
        zeros = zero_scores(out_schema, n)
        if n == 0:
            return lambda: (score_batch(passthrough, out_schema, zeros, []), 0)
        future = score(tuple(protocol.engine_column(command.input, batch.column(c)) for c in command.input_columns),
                       False)

        def collect() -> tuple[pa.RecordBatch, int]:
            try:
                scores, errors = checked_scores(future.result(), zeros.shape)
            except (CancelledError, SchedulerClosed):
                raise  # the exchange is ending (client cancel, shutdown): nothing more to write
            except Exception as exc:  # as in _embed_batch: the batch's rows come back as errors
                reason = engine_failure(exc, n, "scoring", "scored")
                return score_batch(passthrough, out_schema, zeros, [reason] * n), n
            out = score_batch(passthrough, out_schema, scores, errors)
            return out, sum(e is not None for e in errors)
        return collect


class ResultWriter:
    """A thread that writes the results of submitted batches in order, as each is ready."""

    def __init__(self, writer, call: Call, cancelled: Callable[[], bool],
                 on_written: Callable[[int, int], None]) -> None:
        self._writer = writer
        self._call = call
        self._stop = call.stop
        self._cancelled = cancelled
        self._on_written = on_written
        self._queue: queue.Queue = queue.Queue(maxsize=PIPELINE_DEPTH)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flight-result-writer", daemon=True)
        self._thread.start()

    def put(self, collect: Collect) -> None:
        """Queue a batch's ``collect``; waits while PIPELINE_DEPTH batches are pending (raises Stopped if the
        exchange is told to stop meanwhile)."""
        while True:
            self.check()
            if self._cancelled():
                raise Stopped()
            try:
                self._queue.put(collect, timeout=0.05)
                return
            except queue.Full:
                continue

    def check(self) -> None:
        """Re-raise a failure of the writer thread in the calling thread."""
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Wait until every queued result is written; re-raise a failure."""
        self._queue.put(None)
        self._thread.join()
        self.check()

    def stop(self) -> None:
        """Drop what is not written yet (the scheduler drops those rows) and end the thread."""
        if self._thread.is_alive():
            self._stop.set()
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            collect = self._queue.get()
            if collect is None:
                return
            if self.error is not None or self._stop.is_set():
                continue  # drain without writing
            try:
                out, failed = collect()
                self._call.writing_since = time.monotonic()
                try:
                    self._writer.write_batch(out)
                finally:
                    self._call.writing_since = None
                self._call.last_written = time.monotonic()
                self._on_written(out.num_rows, failed)
            except BaseException as exc:  # handed to the exchange thread by check()
                self.error = exc
                self._stop.set()
