"""One ``do_exchange`` from the client's side: a writer thread sends the batches, the caller reads the results.

:class:`ClientExchange` works on the two ends pyarrow's ``FlightClient.do_exchange`` returns (any objects with
the same methods: the tests drive it with fakes, without gRPC). :class:`HalfClose` decides who half-closes the
input. Imports only pyarrow (never torch or the engine).
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.flight as flight


class StreamState:
    """What a streaming exchange has done so far (decides whether a retry is safe)."""

    def __init__(self) -> None:
        self.sent: list[pa.RecordBatch] = []  # batches after the first taken from the input, until a result came
        self.results = 0     # result batches yielded


class HalfClose:
    """Who calls ``done_writing``: the one side that sees last that every batch was sent and answered.

    The writer reports each batch it sent and the end of its input; the reader reports each result. The call
    that completes "every batch sent, and as many results as batches" gets True, once: the writer when the
    last result came before its input ended, the reader otherwise (between two reads, so no read is in flight).
    A stream that ends with fewer results than batches is never half-closed by us.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0
        self.results = 0
        self.all_sent = False
        self.closed = False

    def batch_sent(self) -> None:
        """The writer sent one more batch."""
        with self._lock:
            self.sent += 1

    def input_ended(self) -> bool:
        """The writer sent its last batch; True: half-close now."""
        with self._lock:
            self.all_sent = True
            return self._take()

    def result_read(self) -> bool:
        """The reader got one more result; True: half-close now."""
        with self._lock:
            self.results += 1
            return self._take()

    def _take(self) -> bool:
        if self.all_sent and self.results == self.sent and not self.closed:
            self.closed = True
            return True
        return False


class ClientExchange:
    """One do_exchange: a thread writes ``first`` then ``rest``; iterating reads one result batch per batch.

    Args:
        writer, reader: the ends ``FlightClient.do_exchange`` returned (``begin``, ``write_batch``,
            ``done_writing``, ``close``; ``read_chunk``, ``cancel``).
        first: the first input batch (its schema is the stream's).
        rest: the other input batches, taken lazily by the writer thread.
        state: what a retry needs to know (batches taken from ``rest`` until the first result; results read).

    The input is half-closed (``done_writing``) by whichever side sees last that every batch was sent and
    answered (:class:`HalfClose`): never while the read side may be finishing the call on a server error.
    pyarrow's Flight client aborts the process when done_writing meets the reader's own close of the call
    (gRPC "API misuse ... TOO_MANY_OPERATIONS"; seen about once in a few thousand failed calls). The server
    answers every input batch as it goes, so all results arrive before the half-close.

    Errors: a fault of the input (a bad item of ``rest``, another schema) cancels the call and is raised; an
    error the reader gets (the server's reason) is raised as it is; a write that failed while the stream then
    ended is raised after the results; a stream that ends with fewer results than batches raises
    FlightServerError. Stopping the iteration early cancels the call.
    """

    def __init__(self, writer: Any, reader: Any, first: pa.RecordBatch, rest: Iterator[Any],
                 state: StreamState | None = None) -> None:
        self._writer = writer
        self._reader = reader
        self._first = first
        self._rest = rest
        self.state = state or StreamState()
        self.half_close = HalfClose()
        self._own_errors: list[BaseException] = []        # input faults: we cancel the call
        self._transport_errors: list[BaseException] = []  # the read side reports the server's reason

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        thread = threading.Thread(target=self._write_all, name="flight-client-writer", daemon=True)
        thread.start()
        finished = False
        try:
            while True:
                try:
                    chunk = self._reader.read_chunk()
                except StopIteration:
                    finished = True
                    break
                except flight.FlightCancelledError as exc:
                    if self._own_errors:
                        raise self._own_errors[0] from exc
                    raise
                self.state.results += 1
                close = self.half_close.result_read()
                self.state.sent.clear()
                if close:  # no read is in flight here
                    self._writer.done_writing()
                yield chunk.data
        finally:
            if not finished:  # an error, or the consumer stopped early: stop the server's work
                self._reader.cancel()
            thread.join()
            try:
                self._writer.close()
            except pa.ArrowException:
                pass  # the read side already reported the failure, or the cancellation was ours
        if self._own_errors or self._transport_errors:
            raise (self._own_errors or self._transport_errors)[0]
        if self.half_close.results != self.half_close.sent:
            raise flight.FlightServerError(
                f"the server ended the exchange after {self.half_close.results} result batches for "
                f"{self.half_close.sent} input batches: the results are incomplete; send the input again")

    def _fail(self, exc: BaseException) -> None:
        self._own_errors.append(exc)
        self._reader.cancel()

    def _write_all(self) -> None:
        first, state = self._first, self.state
        try:
            self._writer.begin(first.schema)
            self._writer.write_batch(first)
            self.half_close.batch_sent()
            for index in itertools.count(1):
                try:
                    batch = next(self._rest, None)
                    if batch is not None:
                        check_batch(batch, index)
                except BaseException as exc:
                    return self._fail(exc)
                if batch is None:
                    break
                if not state.results:  # kept until the first result: a retry sends it again
                    state.sent.append(batch)
                if not batch.schema.equals(first.schema):
                    return self._fail(ValueError(f"every batch must have the first batch's schema "
                                                 f"{first.schema}; got {batch.schema}"))
                self._writer.write_batch(batch)
                self.half_close.batch_sent()
            if self.half_close.input_ended():  # every answer is in: the reader waits for the end of the stream
                self._writer.done_writing()
        except BaseException as exc:
            self._transport_errors.append(exc)


def check_batch(batch: Any, index: int) -> None:
    """Raise TypeError unless ``batch`` (input item ``index``) is a RecordBatch."""
    if not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"batches[{index}]: expected a pyarrow RecordBatch, got {type(batch).__name__}; "
                        "build one with pa.record_batch({...}) or table.to_batches()")
