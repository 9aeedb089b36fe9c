"""The decoded-size cap (max_image_decoded_bytes): channels and sample size read from each format's
header, the refusal before any decode, and the block-wise conversion to 8-bit grey/BGR after it."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from engine import image_processor
from engine.image_header import HeaderError, read_header, sniff_format
from engine.image_processor import ArrowImageProcessor, ImageConfig, RowLimits

PHOTOS = Path(__file__).parent / "data" / "photos"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_by_hand(width: int, height: int, depth: int, colour: int, extra: bytes = b"", pixels: bool = True) -> bytes:
    """A PNG of zero samples with the given IHDR; ``extra`` chunks go between IHDR and IDAT. Without ``pixels``
    the IDAT holds only a few bytes (a header that declares far more than the file holds)."""
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    row = b"\x00" + bytes((width * samples * depth + 7) // 8)
    idat = zlib.compress(row * height if pixels else b"\x00" * 64)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _pil(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _cv(image: np.ndarray, ext: str, params: tuple[int, ...] = ()) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


def _photo(width: int = 48, height: int = 40) -> np.ndarray:
    """A real photo crop, BGR uint8 (width x height)."""
    image = cv2.imread(str(PHOTOS / "coffee.png"), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(image[100 : 100 + height, 150 : 150 + width])


def _samples() -> list[tuple[str, bytes, int, int, bool]]:
    """(name, encoded image, header channels, header bytes per sample, exact): ``exact`` when OpenCV decodes to
    exactly that; otherwise the header's count is an upper bound (the header alone cannot tell)."""
    bgr = _photo()
    rgb = bgr[:, :, ::-1]
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    bgra = np.dstack([bgr, np.arange(bgr.shape[0] * bgr.shape[1], dtype=np.uint8).reshape(bgr.shape[:2])])
    rgba = bgra[:, :, [2, 1, 0, 3]]
    photo, photo_a = Image.fromarray(np.ascontiguousarray(rgb)), Image.fromarray(np.ascontiguousarray(rgba))
    plte = _chunk(b"PLTE", bytes(range(48)))
    lossless_rgba = _pil(photo_a, "WEBP", lossless=True, exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00")
    assert lossless_rgba[12:16] == b"VP8X" and lossless_rgba[20] & 0x10
    no_flag = bytearray(lossless_rgba)
    no_flag[20] &= ~0x10  # the VP8X flag says no alpha: OpenCV reads only the flag, not the VP8L alpha bit
    return [
        # PNG: every colour type and bit depth
        *[(f"png grey {d}-bit", png_by_hand(24, 16, d, 0), 1, 2 if d == 16 else 1, True) for d in (1, 2, 4, 8, 16)],
        ("png grey 8-bit (cv2)", _cv(grey, ".png"), 1, 1, True),
        ("png grey 16-bit (cv2)", _cv(grey.astype(np.uint16) * 257, ".png"), 1, 2, True),
        ("png grey + tRNS", png_by_hand(24, 16, 8, 0, _chunk(b"tRNS", b"\x00\x05")), 1, 1, True),
        ("png RGB 8-bit (cv2)", _cv(bgr, ".png"), 3, 1, True),
        ("png RGB 16-bit (cv2)", _cv(bgr.astype(np.uint16) * 257, ".png"), 3, 2, True),
        ("png RGB + tRNS", _pil(photo, "PNG", transparency=(1, 2, 3)), 4, 1, True),
        ("png RGB 16-bit + tRNS", png_by_hand(24, 16, 16, 2, _chunk(b"tRNS", bytes(6))), 4, 2, True),
        *[(f"png palette {d}-bit", png_by_hand(24, 16, d, 3, plte), 3, 1, True) for d in (1, 2, 4, 8)],
        ("png palette (PIL)", _pil(photo.quantize(16), "PNG"), 3, 1, True),
        ("png palette + tRNS", _pil(photo.quantize(16), "PNG", transparency=0), 4, 1, True),
        ("png grey+alpha 8-bit", _pil(photo.convert("LA"), "PNG"), 4, 1, True),
        ("png grey+alpha 16-bit", png_by_hand(24, 16, 16, 4), 4, 2, True),
        ("png RGBA 8-bit (cv2)", _cv(bgra, ".png"), 4, 1, True),
        ("png RGBA 16-bit (cv2)", _cv(bgra.astype(np.uint16) * 257, ".png"), 4, 2, True),
        # BMP by bit count
        ("bmp 24-bit", _pil(photo, "BMP"), 3, 1, True),
        ("bmp 32-bit (PIL, BI_RGB)", _pil(photo_a, "BMP"), 4, 1, False),  # OpenCV gives 3 here
        ("bmp 32-bit (cv2, alpha mask)", _cv(bgra, ".bmp"), 4, 1, True),
        ("bmp 8-bit palette", _pil(photo.quantize(16), "BMP"), 3, 1, True),
        ("bmp 8-bit grey", _pil(photo.convert("L"), "BMP"), 3, 1, False),  # a grey palette decodes to 1
        ("bmp 1-bit", _pil(photo.convert("1"), "BMP"), 3, 1, False),
        # WebP
        ("webp lossy", _pil(photo, "WEBP"), 3, 1, True),
        ("webp lossy + alpha (VP8X)", _pil(photo_a, "WEBP"), 4, 1, True),
        ("webp lossy + EXIF (VP8X, no alpha)", _pil(photo, "WEBP", exif=b"Exif\x00\x00II*\x00"), 3, 1, True),
        ("webp lossless", _pil(photo, "WEBP", lossless=True), 3, 1, True),
        ("webp lossless + alpha (VP8L)", _pil(photo_a, "WEBP", lossless=True), 4, 1, True),
        ("webp lossless + alpha (VP8X)", lossless_rgba, 4, 1, True),
        ("webp VP8X without alpha flag, VP8L alpha bit", bytes(no_flag), 3, 1, True),
        ("webp animated", _pil(photo, "WEBP", save_all=True, append_images=[photo.rotate(180)]), 4, 1, False),
        # GIF: OpenCV's canvas is BGRA
        ("gif", _pil(photo.quantize(16), "GIF"), 4, 1, False),
        ("gif transparent", _pil(photo.quantize(16), "GIF", transparency=0), 4, 1, True),
        # JPEG: IMREAD_GRAYSCALE for grey, IMREAD_COLOR (BGR) for the rest
        ("jpeg grey", _cv(grey, ".jpg"), 1, 1, True),
        ("jpeg colour", _cv(bgr, ".jpg"), 3, 1, True),
        ("jpeg progressive", _cv(bgr, ".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)), 3, 1, True),
        ("jpeg CMYK", _pil(photo.convert("CMYK"), "JPEG"), 3, 1, True),
    ]


SAMPLES = _samples()


@pytest.mark.parametrize("name, blob, channels, nbytes, exact", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_header_gives_the_decoders_channels_and_sample_size(name, blob, channels, nbytes, exact):
    view = np.frombuffer(blob, np.uint8)
    header = read_header(view, sniff_format(view))
    assert (header.channels, header.bytes_per_sample) == (channels, nbytes)
    flags = cv2.IMREAD_UNCHANGED
    if header.format == "jpeg":
        flags = cv2.IMREAD_GRAYSCALE if header.components == 1 else cv2.IMREAD_COLOR
    decoded = cv2.imdecode(view, flags)
    assert decoded is not None, name
    got = 1 if decoded.ndim == 2 else decoded.shape[2]
    assert (header.height, header.width) == decoded.shape[:2]
    assert header.decoded_bytes >= decoded.nbytes
    if exact:
        assert (got, decoded.itemsize) == (channels, nbytes), name
        assert header.decoded_bytes == decoded.nbytes
    else:
        assert got < channels and decoded.itemsize == nbytes, name


def test_jpeg_precision_over_8_bits_counts_2_bytes():
    jpeg = bytearray(_cv(_photo(), ".jpg"))
    sof = jpeg.find(b"\xff\xc0")
    assert jpeg[sof + 4] == 8
    jpeg[sof + 4] = 12
    header = read_header(np.frombuffer(bytes(jpeg), np.uint8), "jpeg")
    assert (header.channels, header.bytes_per_sample) == (3, 2)


def test_png_transparency_walk_is_bounded_and_assumes_alpha_when_it_cannot_tell():
    many = _chunk(b"tEXt", b"k\x00v") * 100  # past the walk's limit: tRNS may still come
    assert read_header(np.frombuffer(png_by_hand(8, 8, 8, 2, many), np.uint8), "png").channels == 4
    few = _chunk(b"tEXt", b"k\x00v") * 60
    assert read_header(np.frombuffer(png_by_hand(8, 8, 8, 2, few), np.uint8), "png").channels == 3
    truncated = png_by_hand(8, 8, 8, 3)[:40]  # ends before IDAT: a tRNS may have followed
    assert read_header(np.frombuffer(truncated, np.uint8), "png").channels == 4


@pytest.mark.parametrize("depth, colour, reason", [
    (4, 2, "bit depth 4 for colour type 2 (RGB), expected one of [8, 16]"),
    (16, 3, "bit depth 16 for colour type 3 (palette), expected one of [1, 2, 4, 8]"),
    (8, 5, "colour type 5, expected one of [0, 2, 3, 4, 6]"),
])
def test_png_header_with_an_impossible_depth_is_refused(depth, colour, reason):
    blob = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, depth, colour, 0, 0, 0))
    with pytest.raises(HeaderError, match=reason.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        read_header(np.frombuffer(blob, np.uint8), "png")


@pytest.fixture
def imdecode_spy(monkeypatch) -> list[int]:
    """Counts cv2.imdecode calls (the processor calls it through the cv2 module); returns nothing decoded."""
    calls: list[int] = []
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: calls.append(flags))
    return calls


def test_16_bit_rgba_over_the_decoded_cap_is_refused_before_decoding(imdecode_spy):
    blob = png_by_hand(5000, 5000, 16, 6, pixels=False)  # 25 MP: under max_pixels; 200 MB decoded
    assert len(blob) < 200
    limits = RowLimits()
    assert 5000 * 5000 <= limits.max_image_pixels
    with ArrowImageProcessor(ImageConfig(), limits=limits, threads=1) as proc:
        batch = proc([blob])
    assert batch.errors[0] == (
        "too large to decode: this PNG decodes to 5000 x 5000 x 4 x 2 bytes = 200000000 bytes, over the limit of "
        "150000000 (max_image_decoded_bytes); re-encode it with fewer pixels, 8-bit samples or no alpha channel"
    )
    assert imdecode_spy == []
    assert batch.pixels.shape[0] == 0


@pytest.mark.parametrize("width, height", [(5000, 5000), (10_000, 5000)])  # the second: exactly 50 MP, 150 MB
def test_8_bit_rgb_at_the_pixel_limit_passes_the_decoded_cap(imdecode_spy, width, height):
    blob = png_by_hand(width, height, 8, 2, pixels=False)
    with ArrowImageProcessor(ImageConfig(), threads=1) as proc:
        batch = proc([blob])
    assert imdecode_spy == [cv2.IMREAD_UNCHANGED]  # it reached the decoder (the spy decodes nothing)
    assert batch.errors[0] == "truncated or corrupt PNG: decoder returned nothing"


def test_the_cap_is_an_engine_setting():
    jpeg = _cv(_photo(), ".jpg")  # 48 x 40 x 3 = 5,760 bytes decoded
    with ArrowImageProcessor(ImageConfig(), limits=RowLimits(max_image_decoded_bytes=5760), threads=1) as at, \
            ArrowImageProcessor(ImageConfig(), limits=RowLimits(max_image_decoded_bytes=5759), threads=1) as under:
        assert at([jpeg]).errors == [None]
        assert "48 x 40 x 3 x 1 bytes = 5760 bytes, over the limit of 5759" in under([jpeg]).errors[0]
    with pytest.raises(ValueError, match="max_image_decoded_bytes"):
        RowLimits(max_image_decoded_bytes=0)


def _whole_image_reference(image: np.ndarray) -> np.ndarray:
    """The conversion as it was before it ran block-wise (whole-image temporaries)."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 2 or image.shape[2] == 3:
        return image
    planes = cv2.split(image)
    alpha = planes[-1] if len(planes) == 2 else cv2.merge([planes[-1]] * 3)
    colour = planes[0] if len(planes) == 2 else cv2.merge(planes[:3])
    return cv2.add(cv2.multiply(colour, alpha, scale=1 / 255), cv2.bitwise_not(alpha))


@pytest.mark.parametrize("shape, dtype", [
    ((301, 257, 4), np.uint16), ((301, 257, 4), np.uint8), ((301, 257, 3), np.uint16), ((301, 257), np.uint16),
    ((301, 257, 2), np.uint8), ((301, 257, 2), np.uint16), ((301, 257, 1), np.uint16), ((1, 5, 4), np.uint8),
])
def test_block_wise_conversion_gives_the_whole_image_pixels(monkeypatch, shape, dtype):
    monkeypatch.setattr(image_processor, "_CONVERT_BLOCK_BYTES", 7000)  # many blocks, a ragged last one
    rng = np.random.default_rng(7)
    image = rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)
    if image.ndim == 3 and shape[2] in (2, 4):  # opaque rows, clear rows, then random alpha
        image[:100, :, -1], image[100:150, :, -1] = np.iinfo(dtype).max, 0
    got = image_processor._to_grey_or_bgr(image)
    want = _whole_image_reference(image)
    assert got.dtype == np.uint8 and got.shape == want.shape and np.array_equal(got, want)
