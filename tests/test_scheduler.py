"""engine.scheduler: rows of concurrent callers are coalesced into device batches, and every
caller gets exactly its own rows back (equal to the direct Model call), with cancellation
and error isolation."""
from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

import engine
from engine.errors import ModalityError
from engine.scheduler import Scheduler, SchedulerClosed, SchedulerConfig

PHOTOS = Path(__file__).parent / "data" / "photos"


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return engine.load_model(tiny_clip_dir, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def minilm(minilm_model_dir):
    return engine.load_model(minilm_model_dir, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """32 distinct small JPEGs cut from the test photos."""
    out = []
    for path in sorted(PHOTOS.iterdir()):
        if path.suffix not in (".png", ".jpg"):
            continue
        pic = cv2.imread(str(path), cv2.IMREAD_COLOR)
        for k in range(6):
            h, w = pic.shape[:2]
            crop = pic[k * h // 16:, k * w // 16:]
            crop = cv2.resize(crop, (160 + 16 * k, 120 + 24 * k), interpolation=cv2.INTER_AREA)
            out.append(cv2.imencode(".jpg", crop)[1].tobytes())
    return out[:32]


class Recorder:
    """on_batch observer: the rows of each device batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, queue: str, rows: int, seconds: float) -> None:
        with self.lock:
            self.batches.append((queue, rows))


def run_threads(n, target):
    results, errors = [None] * n, [None] * n

    def body(i):
        try:
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[i] = exc

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_eight_callers_of_four_images_are_coalesced_and_get_their_own_rows(clip, images):
    direct = clip.embed_images(images)
    recorder = Recorder()
    forwards = []
    original = clip.encode_pixels

    def counting(pixels, normalize=True):
        forwards.append(len(pixels))
        return original(pixels, normalize)

    barrier = threading.Barrier(8)
    with Scheduler(clip, SchedulerConfig(max_wait_ms=50), on_batch=recorder) as sched:
        sched.model.encode_pixels = counting  # instance attribute: count the device forward calls

        def call(i):
            barrier.wait()
            return sched.embed_images(pa.array(images[4 * i:4 * i + 4], pa.binary()))

        results, errors = run_threads(8, call)
        del sched.model.encode_pixels
    assert errors == [None] * 8
    for i, result in enumerate(results):
        assert result.errors == [None] * 4
        np.testing.assert_allclose(result.embeddings, direct.embeddings[4 * i:4 * i + 4], atol=1e-5, rtol=0)
    assert sum(forwards) == 32 and max(forwards) > 4, forwards  # rows of several callers per forward
    assert len(forwards) < 8
    assert [b for b in recorder.batches if b[0] == "image"] == [("image", n) for n in forwards]


def test_single_caller_is_bit_for_bit_the_direct_call(clip, minilm, images):
    rows = images[:5] + [b"not an image", None] + images[5:40]
    with Scheduler(clip) as sched:
        got = sched.embed_images(rows)
        texts = ["a cat", "a photo of a rocket in the sky", None, ""]
        got_text = sched.embed_texts(texts, normalize=False)
    want = clip.embed_images(rows)
    assert np.array_equal(got.embeddings, want.embeddings) and got.errors == want.errors
    want_text = clip.embed_texts(texts, normalize=False)
    assert np.array_equal(got_text.embeddings, want_text.embeddings) and got_text.errors == want_text.errors
    with Scheduler(minilm) as sched:
        tokens = [[101, 7592, 2088, 102], [101, 10_000_000, 102], [101, 102]]
        got_tok = sched.embed_tokens(pa.array(tokens, pa.list_(pa.int64())))
    want_tok = minilm.embed_tokens(tokens)
    assert np.array_equal(got_tok.embeddings, want_tok.embeddings) and got_tok.errors == want_tok.errors


def test_concurrent_texts_of_mixed_lengths_equal_direct_calls(minilm):
    words = "arrow flight streams record batches of embeddings to many clients at once".split()
    per_caller = [[" ".join(words[:(i * 7 + j * 3) % len(words) + 1]) for j in range(13)] for i in range(6)]
    per_caller[2][4] = None
    recorder = Recorder()
    with Scheduler(minilm, SchedulerConfig(max_wait_ms=30), on_batch=recorder) as sched:
        results, errors = run_threads(6, lambda i: sched.embed_texts(per_caller[i], normalize=i % 2 == 0))
    assert errors == [None] * 6
    for i, result in enumerate(results):
        want = minilm.embed_texts(per_caller[i], normalize=i % 2 == 0)
        assert result.errors == want.errors
        np.testing.assert_allclose(result.embeddings, want.embeddings, atol=1e-5, rtol=0)
    assert results[2].errors[4] and not results[2].embeddings[4].any()
    assert sum(rows for _, rows in recorder.batches) == 6 * 13 - 1
    assert max(rows for _, rows in recorder.batches) > 13  # rows of several callers in one batch


def test_token_limit_is_a_row_error(minilm_model_dir):
    from engine.limits import RowLimits

    limited = engine.load_model(minilm_model_dir, row_limits=RowLimits(max_row_tokens=4))
    with Scheduler(limited) as sched:  # the model's own per-row limits apply behind the scheduler
        result = sched.embed_tokens([[101, 7592, 2088, 102], [101, 7592, 2088, 2088, 102]])
    assert result.errors[0] is None
    assert "5 tokens, over the limit of 4 tokens per row" in result.errors[1]


def test_cancelled_caller_rows_are_dropped_and_others_finish(clip, images):
    gate, entered = threading.Event(), threading.Event()
    original = clip.encode_pixels
    forwards = []

    def blocked(pixels, normalize=True):
        entered.set()
        assert gate.wait(120), "the test never opened the gate"
        forwards.append(len(pixels))
        return original(pixels, normalize)

    with Scheduler(clip, SchedulerConfig(max_wait_ms=0)) as sched:
        sched.model.encode_pixels = blocked
        try:
            first = sched.submit("image", images[:2])           # occupies the device
            assert entered.wait(60), "the first caller's rows never reached the device"
            flag = threading.Event()
            doomed = sched.submit("image", images[2:30], cancelled=flag.is_set)  # queued behind it
            other = sched.submit("image", images[30:32])
            flag.set()
            gate.set()
            assert first.result(10).errors == [None, None]
            np.testing.assert_allclose(other.result(10).embeddings, clip.embed_images(images[30:32]).embeddings,
                                       atol=1e-5, rtol=0)
            with pytest.raises(CancelledError):
                doomed.result(10)
        finally:
            del sched.model.encode_pixels
    assert sum(forwards) == 4  # the cancelled caller's 28 rows never reached the device
    assert sched.queue_depth() == {"image": 0, "text": 0}


def test_a_failing_caller_does_not_affect_the_others(minilm):
    original = minilm.embed_token_rows
    poison = 7777

    def fragile(rows, normalize=True):
        if any((r == poison).any() for r in rows):
            raise RuntimeError("device fault on a poison row")
        return original(rows, normalize)

    gate = threading.Barrier(5)
    with Scheduler(minilm, SchedulerConfig(max_wait_ms=50)) as sched:
        sched.model.embed_token_rows = fragile
        try:
            def call(i):
                gate.wait()
                row = [101, poison, 102] if i == 3 else [101, 2000 + i, 102]
                return sched.embed_tokens([row, [101, 3000 + i, 102]])

            results, errors = run_threads(5, call)
        finally:
            del sched.model.embed_token_rows
    assert isinstance(errors[3], RuntimeError) and "poison" in str(errors[3])
    for i in (0, 1, 2, 4):
        assert errors[i] is None
        want = minilm.embed_tokens([[101, 2000 + i, 102], [101, 3000 + i, 102]]).embeddings
        np.testing.assert_allclose(results[i].embeddings, want, atol=1e-5, rtol=0)


def test_request_faults_raise_in_the_caller_and_close_fails_fast(minilm):
    sched = Scheduler(minilm)
    with pytest.raises(ModalityError, match="has no image encoder"):
        sched.embed_images([b"x"])
    assert sched.embed_texts([]).embeddings.shape == (0, minilm.info.dim)
    sched.close()
    with pytest.raises(SchedulerClosed, match="closed"):
        sched.embed_texts(["late"])


def test_a_lone_caller_does_not_wait_for_a_full_batch(minilm):
    """The bounded wait applies only while another caller is still preparing rows."""
    with Scheduler(minilm, SchedulerConfig(max_wait_ms=60_000)) as sched:
        t0 = time.monotonic()
        res = sched.embed_texts(["one short text", "and another"])
        waited = time.monotonic() - t0
    assert res.errors == [None, None]
    # two short texts take milliseconds; a caller that waited for other rows would wait the full 60 s
    assert waited < 30, f"a lone caller waited {waited:.1f}s for rows that could never come"


def test_device_decoded_pixels_from_many_callers_are_joined_in_order(tiny_clip_dir, images):
    """With JPEGs decoded on the model's device (torch tensors; here an OpenCV stand-in for nvJPEG on the
    CPU), the scheduler joins several callers' pixels into one forward and each gets its own rows."""
    from engine.image_processor import ArrowImageProcessor
    from test_device_jpeg import FakeNvjpeg

    model = engine.load_model(tiny_clip_dir)
    model.image_processor = ArrowImageProcessor(model.image_processor.config, threads=2, jpeg_decoder=FakeNvjpeg())
    png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(images[0], np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    rows = [images[4 * i:4 * i + 3] + ([png] if i % 2 else [b"broken"]) for i in range(8)]
    direct = [model.embed_images(r) for r in rows]
    forwards = []
    barrier = threading.Barrier(8)
    with Scheduler(model, SchedulerConfig(max_wait_ms=50),
                   on_batch=lambda q, n, s: forwards.append(n)) as sched:

        def call(i):
            barrier.wait()
            return sched.embed_images(pa.array(rows[i], pa.binary()))

        results, errors = run_threads(8, call)
    assert errors == [None] * 8
    for got, want in zip(results, direct):
        assert got.errors == want.errors
        np.testing.assert_allclose(got.embeddings, want.embeddings, atol=1e-5, rtol=0)
    assert max(forwards) > 4  # several callers' device tensors went through one forward
