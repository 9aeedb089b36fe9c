"""The device JPEG stage (engine.device_jpeg), run on the CPU with an OpenCV-backed decoder in nvJPEG's place.

On a CUDA box the decoder is torchvision's nvJPEG; everything around it (which rows go to the device,
resize/crop/normalize in torch, falling back to the CPU path for refused rows, merging both into one
batch in row order) is the same code, and is what these tests check.
"""
from __future__ import annotations

import struct

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

import engine
from engine.image_header import read_header
from engine.image_processor import ArrowImageProcessor, ImageConfig
from engine.scheduler import _concat
from test_image_processor import VARIANTS, crop_to, encode, exif_jpeg, hf_pixels, load_photo


class FakeNvjpeg:
    """Decodes like nvJPEG with ImageReadMode.RGB (no EXIF rotation); records what it was given."""

    def __init__(self, refuse: bytes | None = None) -> None:
        self.seen: list[bytes] = []
        self.refuse = refuse  # a byte prefix it refuses (as nvJPEG refuses what it cannot decode)

    def __call__(self, blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for blob in blobs:
            data = blob.numpy().tobytes()
            self.seen.append(data)
            if self.refuse is not None and data.startswith(self.refuse):
                raise RuntimeError("nvjpeg: unsupported stream")
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
            if image is None:
                raise RuntimeError("nvjpeg: corrupt stream")
            out.append(torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))))
        return out


def _photo_blobs(encodings=("jpeg", "grey-jpeg")) -> list[bytes]:
    rng = np.random.default_rng(7)
    photo = load_photo("chelsea.png")
    return [encode(crop_to(photo, w, h, rng), enc, rng) for w, h, enc in VARIANTS if enc in encodings]


def test_device_path_matches_transformers_as_closely_as_the_cpu_path():
    """Bicubic antialiased resize on the device (PIL's filter) vs transformers' PIL pipeline."""
    blobs = _photo_blobs()
    ref = hf_pixels(blobs)
    decoder = FakeNvjpeg()
    with ArrowImageProcessor(ImageConfig(), threads=2, jpeg_decoder=decoder) as dev_proc, \
            ArrowImageProcessor(ImageConfig(), threads=2) as cpu_proc:
        on_device, on_cpu = dev_proc(blobs), cpu_proc(blobs)
    assert isinstance(on_device.pixels, torch.Tensor) and on_device.pixels.dtype == torch.float32
    assert len(decoder.seen) == len(blobs)  # every one of these JPEGs went to the device decoder
    assert on_device.errors == [None] * len(blobs) and on_device.index.tolist() == list(range(len(blobs)))
    dev = on_device.pixels.numpy()
    assert dev.shape == on_cpu.pixels.shape == ref.shape
    per_image = np.abs(dev - ref).mean(axis=(1, 2, 3))
    assert per_image.max() < 0.03, per_image
    assert per_image.mean() <= np.abs(on_cpu.pixels - ref).mean() + 0.005


def test_rows_the_device_cannot_take_go_to_the_cpu_and_keep_their_place():
    rng = np.random.default_rng(3)
    photo = crop_to(load_photo("coffee.png"), 400, 300, rng)
    jpeg = encode(photo, "jpeg", rng)
    progressive = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    rotated = exif_jpeg(jpeg, 6)
    png = encode(photo, "png", rng)
    truncated = jpeg[: len(jpeg) // 2]
    rows = [jpeg, png, None, progressive, rotated, b"not an image", truncated, jpeg]
    decoder = FakeNvjpeg()
    with ArrowImageProcessor(ImageConfig(), threads=2, jpeg_decoder=decoder) as dev_proc, \
            ArrowImageProcessor(ImageConfig(), threads=2) as cpu_proc:
        got = dev_proc(pa.array(rows, pa.binary()))
        want = cpu_proc(pa.array(rows, pa.binary()))
    # whole baseline JPEGs reach the device; a truncated one (no end-of-image marker) is left to the CPU
    assert decoder.seen == [jpeg, jpeg]
    assert got.index.tolist() == want.index.tolist() == [0, 1, 3, 4, 7]
    assert got.errors == want.errors and "truncated or corrupt JPEG" in got.errors[6]
    px = got.pixels.numpy()
    for k in (1, 2, 3):  # PNG, progressive and rotated rows: decoded by the CPU path, identical
        assert np.array_equal(px[k], want.pixels[k])
    assert np.abs(px[0] - want.pixels[0]).mean() < 0.03 and np.array_equal(px[0], px[4])


def test_a_jpeg_the_device_decoder_refuses_is_decoded_on_the_cpu():
    """A whole JPEG that nvJPEG cannot take (one in a batch): retried alone, then decoded by the CPU path."""
    blobs = _photo_blobs()[:4]
    odd = blobs[2]
    decoder = FakeNvjpeg(refuse=odd)
    with ArrowImageProcessor(ImageConfig(), threads=2, jpeg_decoder=decoder) as dev_proc, \
            ArrowImageProcessor(ImageConfig(), threads=2) as cpu_proc:
        got, want = dev_proc(blobs), cpu_proc(blobs)
    assert got.errors == [None] * 4 and got.index.tolist() == [0, 1, 2, 3]
    assert np.array_equal(got.pixels.numpy()[2], want.pixels[2])  # the CPU path's own pixels
    others = got.pixels.numpy()[[0, 1, 3]]
    assert not np.array_equal(others, want.pixels[[0, 1, 3]])  # those stayed on the device (bicubic)
    assert np.abs(others - want.pixels[[0, 1, 3]]).mean() < 0.03


def test_a_decoder_that_refuses_everything_loses_nothing():
    blobs = _photo_blobs()[:5]
    with ArrowImageProcessor(ImageConfig(), threads=2, jpeg_decoder=FakeNvjpeg(refuse=b"\xff\xd8")) as dev_proc, \
            ArrowImageProcessor(ImageConfig(), threads=2) as cpu_proc:
        got, want = dev_proc(blobs), cpu_proc(blobs)
    assert got.errors == [None] * 5
    assert np.array_equal(got.pixels.numpy(), want.pixels)


def test_exif_orientation_routes_rotated_jpegs_unless_orientation_is_ignored():
    rng = np.random.default_rng(5)
    jpeg = encode(crop_to(load_photo("coffee.png"), 300, 200, rng), "jpeg", rng)
    rotated = exif_jpeg(jpeg, 6)
    decoder = FakeNvjpeg()
    with ArrowImageProcessor(ImageConfig(), threads=1, jpeg_decoder=decoder, apply_exif_orientation=False) as proc:
        got = proc([rotated])
    assert decoder.seen == [rotated]  # the stored grid is what is wanted: the device can do it
    with ArrowImageProcessor(ImageConfig(), threads=1, apply_exif_orientation=False) as cpu:
        assert np.abs(got.pixels.numpy() - cpu([rotated]).pixels).mean() < 0.03


@pytest.mark.parametrize("size", [(40, 30), (224, 224), (1000, 120)])
def test_small_and_odd_sizes_keep_the_cpu_geometry(size):
    """Upscaling (no antialias), exact-size and very thin images: same crop and zero padding as the CPU path."""
    rng = np.random.default_rng(11)
    blob = encode(crop_to(load_photo("astronaut.png"), *size, rng), "jpeg", rng)
    padded = ImageConfig(shortest_edge=None, resize_hw=(200, 300))  # a fixed resize under the crop: padding
    raw = ImageConfig(do_resize=False, shortest_edge=None)  # crop (and pad) the decoded image as it is
    for cfg in (ImageConfig(), padded, raw):
        with ArrowImageProcessor(cfg, threads=1, jpeg_decoder=FakeNvjpeg()) as dev_proc, \
                ArrowImageProcessor(cfg, threads=1) as cpu_proc:
            a, b = dev_proc([blob]).pixels.numpy(), cpu_proc([blob]).pixels
        assert a.shape == b.shape
        assert np.abs(a - b).mean() < 0.05


def test_model_embeds_device_pixels_and_the_scheduler_joins_them(tiny_clip_dir):
    model = engine.load_model(tiny_clip_dir)
    blobs = _photo_blobs()[:6]
    want = model.encode_image(blobs)
    model.image_processor = ArrowImageProcessor(model.image_processor.config, threads=2, jpeg_decoder=FakeNvjpeg())
    got = model.encode_image(blobs)
    cos = (got * want).sum(1)
    assert cos.min() > 0.99
    batch = model.prepare_images(blobs)
    joined = _concat([batch.pixels[:2], np.ascontiguousarray(batch.pixels[2:].numpy())])
    assert isinstance(joined, torch.Tensor) and torch.equal(joined, batch.pixels)


def test_header_reads_exif_orientation_in_both_byte_orders_and_the_frame_type():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    view = lambda b: np.frombuffer(b, np.uint8)  # noqa: E731
    assert read_header(view(jpeg), "jpeg").frame == 0xC0
    assert read_header(view(progressive), "jpeg").frame == 0xC2
    assert read_header(view(jpeg), "jpeg").orientation == 1
    for k in range(1, 9):
        assert read_header(view(exif_jpeg(jpeg, k)), "jpeg").orientation == k
    # little-endian TIFF header ("II"), and garbage where the IFD should be
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 8, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + b"II\x2a\x00" + struct.pack("<I", 8) + ifd
    little = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]
    assert read_header(view(little), "jpeg").orientation == 8
    bad = b"Exif\x00\x00" + b"II\x2a\x00" + struct.pack("<I", 4000)
    broken = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(bad) + 2) + bad + jpeg[2:]
    header = read_header(view(broken), "jpeg")
    assert header.orientation == 1 and (header.width, header.height) == (30, 20)


def test_device_stage_only_where_asked_and_possible():
    assert not ArrowImageProcessor(ImageConfig(), threads=1).device_decoding  # CPU: none by default
    assert not ArrowImageProcessor(ImageConfig(), threads=1, jpeg_decoder=False).device_decoding
    assert ArrowImageProcessor(ImageConfig(), threads=1, jpeg_decoder=FakeNvjpeg()).device_decoding
    from engine.device_jpeg import nvjpeg_decoder

    assert nvjpeg_decoder(torch.device("cpu")) is None
    if not torch.cuda.is_available():  # a CUDA device asked for on a machine without one: the CPU path
        assert nvjpeg_decoder(torch.device("cuda")) is None
        assert not ArrowImageProcessor(ImageConfig(), threads=1, device="cuda").device_decoding
