"""The client's side of one do_exchange (flight_client.exchange), driven with fake ends: no gRPC.

Who half-closes the input, and what the caller sees when the input is bad, the server fails or ends early, a
write fails, or the caller stops reading.
"""
from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_client.exchange import ClientExchange, HalfClose, StreamState
from flight_fakes import FakeExchangeCall, wait_until

WRITER_THREAD = "flight-client-writer"


def batches(n: int) -> list[pa.RecordBatch]:
    return [pa.record_batch({"text": [f"row {i}.{j}" for j in range(i + 1)]}) for i in range(n)]


def answers(results: list[pa.RecordBatch]) -> list[int]:
    return [r.column("n")[0].as_py() for r in results]


# ---- HalfClose alone -------------------------------------------------------------------------------------

def test_half_close_goes_to_the_writer_when_the_last_result_came_before_the_input_ended():
    h = HalfClose()
    h.batch_sent()
    h.batch_sent()
    assert [h.result_read(), h.result_read()] == [False, False]  # the input has not ended: more may come
    assert h.input_ended() is True


def test_half_close_goes_to_the_reader_when_the_input_ended_first():
    h = HalfClose()
    h.batch_sent()
    h.batch_sent()
    assert h.result_read() is False
    assert h.input_ended() is False  # one answer still to come
    assert h.result_read() is True


def test_half_close_happens_once_and_never_with_results_missing():
    h = HalfClose()
    for _ in range(3):
        h.batch_sent()
    assert h.input_ended() is False
    assert [h.result_read(), h.result_read()] == [False, False]  # a stream that ends here is not half-closed
    assert h.result_read() is True
    assert h.result_read() is False and h.input_ended() is False


# ---- ClientExchange with fake ends ---------------------------------------------------------------------

def test_every_batch_is_answered_in_order_and_the_input_half_closed_once_at_the_end():
    call = FakeExchangeCall()
    first, *rest = batches(3)
    results = list(ClientExchange(*call.ends(), first, iter(rest)))
    assert answers(results) == [1, 2, 3]
    assert len(call.done_writing_calls) == 1
    events = call.events
    done = events.index(("done_writing",))
    assert done > events.index(("write", 2)) and done > events.index(("result", 2))
    assert call.closed and not call.cancelled


def test_the_writer_half_closes_when_the_last_answer_came_before_its_input_ended():
    call = FakeExchangeCall()
    got_last = threading.Event()
    first, *rest = batches(3)

    def source():  # the input ends only once the caller has the last result
        yield from rest
        assert got_last.wait(60), "the caller never got the last result"

    results = []
    for out in ClientExchange(*call.ends(), first, source()):
        results.append(out)
        if len(results) == 3:
            got_last.set()
    assert answers(results) == [1, 2, 3]
    assert call.done_writing_calls == [WRITER_THREAD]


def test_the_reader_half_closes_when_the_input_ended_before_the_last_answer():
    call = FakeExchangeCall(hold_from=2)
    first, *rest = batches(3)
    exchange = ClientExchange(*call.ends(), first, iter(rest))
    results = iter(exchange)
    assert answers([next(results), next(results)]) == [1, 2]
    wait_until(lambda: exchange.half_close.all_sent, "the writer to send its last batch")
    assert call.done_writing_calls == []  # the third answer is still out
    call.release()
    assert answers([next(results)]) == [3]
    assert call.done_writing_calls == [threading.current_thread().name]  # between two reads
    assert list(results) == []


def test_batches_taken_before_the_first_result_are_kept_for_a_retry():
    call = FakeExchangeCall(hold_from=0)
    first, *rest = batches(3)
    state = StreamState()
    results = iter(ClientExchange(*call.ends(), first, iter(rest), state))
    reading = threading.Thread(target=lambda: got.append(next(results)))
    got: list = []
    reading.start()
    wait_until(lambda: len(call.written) == 3, "the writer to send every batch")
    assert state.sent == rest and state.results == 0  # the first batch is the caller's own
    call.release()
    reading.join()
    assert state.sent == [] and state.results == 1
    assert answers(got + list(results)) == [1, 2, 3]


@pytest.mark.parametrize("bad,error,match", [
    ({"text": ["not a batch"]}, TypeError, r"batches\[2\]: expected a pyarrow RecordBatch, got dict"),
    (pa.record_batch({"other": [1]}), ValueError, "every batch must have the first batch's schema"),
])
def test_a_bad_input_item_cancels_the_call_and_is_raised(bad, error, match):
    call = FakeExchangeCall()
    first, second = batches(2)
    with pytest.raises(error, match=match):
        list(ClientExchange(*call.ends(), first, iter([second, bad])))
    assert call.cancelled and call.closed and call.done_writing_calls == []
    assert len(call.written) == 2


def test_a_server_error_is_raised_as_it_is_and_the_call_cancelled():
    call = FakeExchangeCall(fail_after=1)
    first, *rest = batches(3)
    got = []
    with pytest.raises(flight.FlightServerError, match="the server failed the call"):
        for out in ClientExchange(*call.ends(), first, iter(rest)):
            got.append(out)
    assert answers(got) == [1]
    assert call.cancelled and call.closed and call.done_writing_calls == []


def test_a_server_that_ends_the_stream_early_without_an_error_is_an_error():
    call = FakeExchangeCall(end_after=1)
    first, *rest = batches(3)
    with pytest.raises(flight.FlightServerError, match="after 1 result batches for 3 input batches"):
        list(ClientExchange(*call.ends(), first, iter(rest)))
    assert call.done_writing_calls == [] and call.closed


def test_a_failed_write_is_raised_after_the_results_that_came():
    call = FakeExchangeCall(write_error_at=1)
    first, *rest = batches(3)
    got = []
    with pytest.raises(flight.FlightUnavailableError, match="connection lost while writing"):
        for out in ClientExchange(*call.ends(), first, iter(rest)):
            got.append(out)
    assert answers(got) == [1]
    assert call.done_writing_calls == [] and call.closed


def test_a_caller_that_stops_reading_cancels_the_call():
    call = FakeExchangeCall(hold_from=1)
    first, *rest = batches(3)
    results = iter(ClientExchange(*call.ends(), first, iter(rest)))
    assert answers([next(results)]) == [1]
    results.close()  # the generator's finally: cancel, join the writer thread, then close
    assert call.cancelled and call.closed and call.done_writing_calls == []
    assert call.events[-1] == ("close",)
