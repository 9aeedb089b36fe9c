"""ArrowImageProcessor: parity with transformers' CLIPImageProcessor, zero-copy views, row faults.

Real photographs from tests/data/photos (scikit-image's data folder, see LICENSES.md)
are cropped and re-encoded at runtime at many sizes and in every allowed format.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from engine.errors import InputError, ModelConfigError
from engine.image_header import read_header, sniff_format
from engine.image_processor import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ArrowImageProcessor,
    ImageConfig,
    RowLimits,
    row_views,
)

try:  # transformers 5 names the PIL backend explicitly; 4.x has only CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as HFProcessor
except ImportError:  # pragma: no cover
    from transformers import CLIPImageProcessor as HFProcessor

PHOTOS = Path(__file__).parent / "data" / "photos"
MAX_MEAN_ABS_DIFF = 0.03  # per image, normalized tensors
MIN_COSINE = 0.995  # per image, image embeddings of a small random CLIP vision tower

# (width, height, encoding): portrait and landscape, 100 px to 2048 px, every allowed format.
VARIANTS = [
    (100, 80, "jpeg"), (80, 100, "png"), (150, 150, "webp"), (224, 224, "jpeg"), (225, 300, "grey-jpeg"),
    (300, 225, "rgba-png"), (256, 170, "webp-lossless"), (170, 256, "jpeg"), (480, 640, "png"),
    (640, 480, "grey-png"), (800, 533, "jpeg"), (533, 800, "rgba-webp"), (1024, 768, "webp"),
    (768, 1024, "jpeg"), (1200, 900, "png"), (900, 1200, "grey-jpeg"), (1000, 1000, "jpeg"),
    (1600, 1200, "jpeg"), (1200, 1600, "webp"), (2048, 1536, "jpeg"), (1536, 2048, "grey-jpeg"),
    (2048, 1900, "jpeg"), (1900, 2048, "rgba-png"), (2048, 1024, "png"), (1024, 2048, "jpeg"),
]


def load_photo(name: str) -> np.ndarray:
    """BGR uint8 (greyscale photos expanded to 3 channels)."""
    image = cv2.imread(str(PHOTOS / name), cv2.IMREAD_COLOR)
    assert image is not None, name
    return image


def encode(image: np.ndarray, encoding: str, rng: np.random.Generator) -> bytes:
    """Encode a BGR uint8 image as JPEG (q70-95), PNG, WebP, greyscale or with a partial alpha channel."""
    if encoding.startswith("grey-"):
        image, encoding = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), encoding[5:]
    elif encoding.startswith("rgba-"):
        alpha = np.full(image.shape[:2], 255, np.uint8)
        alpha[: image.shape[0] // 3] = 96  # a translucent band
        alpha[:, : image.shape[1] // 5] = 0  # and a transparent one
        image, encoding = np.dstack([image, alpha]), encoding[5:]
    params = {
        "jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))]),
        "png": (".png", []),
        "webp": (".webp", [cv2.IMWRITE_WEBP_QUALITY, int(rng.integers(70, 96))]),
        "webp-lossless": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
    }[encoding]
    ok, data = cv2.imencode(params[0], image, params[1])
    assert ok
    return data.tobytes()


def crop_to(image: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``image`` with the aspect ratio of width x height, resized to that size."""
    h, w = image.shape[:2]
    scale = min(w / width, h / height) * rng.uniform(0.6, 1.0)
    cw, ch = max(8, int(width * scale)), max(8, int(height * scale))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = image[y : y + ch, x : x + cw]
    interpolation = cv2.INTER_AREA if width < cw else cv2.INTER_CUBIC
    return cv2.resize(crop, (width, height), interpolation=interpolation)


def hf_pixels(blobs: list[bytes], **hf_kwargs) -> np.ndarray:
    """transformers' reference: PIL decode + CLIPImageProcessor."""
    processor = HFProcessor(**hf_kwargs)
    images = [Image.open(io.BytesIO(blob)) for blob in blobs]
    return np.stack([processor(image, return_tensors="np")["pixel_values"][0] for image in images])


def exif_jpeg(jpeg: bytes, orientation: int) -> bytes:
    """Insert an APP1 EXIF segment holding only the Orientation tag (0x0112) right after SOI."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height, followed by a tiny IDAT and IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def variants() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(1234)
    names = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg", "camera.png")
    photos = [load_photo(n) for n in names]
    out = [(path.name, path.read_bytes()) for path in sorted(PHOTOS.glob("*.[pj][np]g"))]
    for k, (width, height, encoding) in enumerate(VARIANTS):
        image = crop_to(photos[k % len(photos)], width, height, rng)
        out.append((f"{width}x{height} {encoding}", encode(image, encoding, rng)))
    return out


@pytest.fixture(scope="module")
def vision_model():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        image_size=224, patch_size=32, hidden_size=128, intermediate_size=256,
        num_hidden_layers=3, num_attention_heads=4, projection_dim=64,
        initializer_factor=3.0,  # larger random weights: more sensitive to pixel differences
    )
    return CLIPVisionModelWithProjection(config).eval()


def embed(model, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(np.ascontiguousarray(pixels))).image_embeds
    return torch.nn.functional.normalize(out, dim=-1).numpy()


# ---------------------------------------------------------------- parity with transformers


def test_parity_with_clip_image_processor(variants, vision_model):
    blobs = [blob for _, blob in variants]
    with ArrowImageProcessor(ImageConfig(), threads=2) as proc:
        batch = proc(pa.array(blobs, pa.binary()))
    assert batch.errors == [None] * len(blobs)
    ref = hf_pixels(blobs)
    assert batch.pixels.shape == ref.shape == (len(blobs), 3, 224, 224)
    mad = np.abs(batch.pixels - ref).mean(axis=(1, 2, 3))
    cosine = (embed(vision_model, batch.pixels) * embed(vision_model, ref)).sum(axis=1)
    report = "\n".join(f"{name}: mad={d:.4f} cos={c:.5f}" for (name, _), d, c in zip(variants, mad, cosine))
    print(f"\nworst mean abs diff {mad.max():.4f}, worst cosine {cosine.min():.5f}\n{report}")
    assert (mad <= MAX_MEAN_ABS_DIFF).all(), report
    assert (cosine >= MIN_COSINE).all(), report
    assert mad.mean() <= 0.015, report  # INTER_AREA is ~0.013 on average against PIL bicubic
    # The cosine check can fail: a centre crop 8 px off (a plausible bug) falls below the bar.
    shifted = (embed(vision_model, np.roll(ref, 8, axis=3)) * embed(vision_model, ref)).sum(axis=1)
    assert (shifted < MIN_COSINE).mean() > 0.8, shifted


@pytest.mark.parametrize(
    "hf_config",
    [
        # crop != shortest edge, other mean/std
        {"size": {"shortest_edge": 160}, "crop_size": {"height": 144, "width": 128},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        # crop larger than the resized image: zero padding, as transformers does
        {"size": 200, "crop_size": 224, "image_mean": [0.4, 0.45, 0.5], "image_std": [0.2, 0.25, 0.3]},
        # a fixed (height, width) resize without a crop; no rescale, only normalize
        {"size": {"height": 192, "width": 256}, "do_center_crop": False, "do_rescale": False,
         "image_mean": [120.0, 110.0, 100.0], "image_std": [60.0, 60.0, 60.0]},
    ],
)
def test_parity_non_default_config(variants, hf_config):
    blobs = [blob for name, blob in variants if name.endswith((".png", ".jpg")) or int(name.split("x")[0]) >= 400]
    config = ImageConfig.from_hf(hf_config)
    with ArrowImageProcessor(config, threads=1) as proc:
        batch = proc(blobs)
    ref = hf_pixels(blobs, **hf_config)
    assert batch.pixels.shape == ref.shape == (len(blobs), 3, *config.output_hw)
    mad = np.abs(batch.pixels - ref).mean(axis=(1, 2, 3))
    assert (mad <= MAX_MEAN_ABS_DIFF).all(), mad
    if hf_config.get("crop_size") == 224:  # the short side was padded from 200 to 224 with zero pixels
        pad = ((0.0 - np.array(hf_config["image_mean"])) / np.array(hf_config["image_std"]))[:, None, None]
        for ours, theirs in zip(batch.pixels, ref):
            border = [(slice(None), slice(0, 12), slice(None)), (slice(None), slice(None), slice(212, 224))]
            padded = [b for b in border if np.allclose(theirs[b], pad, atol=1e-6)]
            assert padded
            assert all(np.allclose(ours[b], pad, atol=1e-6) for b in padded)


# ---------------------------------------------------------------- config


def test_config_from_hf_shapes_and_defaults(tmp_path):
    assert ImageConfig.from_hf({}) == ImageConfig()
    assert ImageConfig().image_mean == OPENAI_CLIP_MEAN and ImageConfig().image_std == OPENAI_CLIP_STD
    cfg = ImageConfig.from_hf({"size": 256, "crop_size": 240, "image_mean": 0.5, "image_std": [1, 2, 3]})
    assert (cfg.shortest_edge, cfg.resize_hw, cfg.crop_hw) == (256, None, (240, 240))
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == (1.0, 2.0, 3.0)
    cfg = ImageConfig.from_hf({"size": {"height": 100, "width": 120}, "crop_size": {"height": 90, "width": 80}})
    assert (cfg.shortest_edge, cfg.resize_hw, cfg.crop_hw, cfg.output_hw) == (None, (100, 120), (90, 80), (90, 80))
    (tmp_path / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 336}, "crop_size": 336}')
    assert ImageConfig.from_dir(tmp_path).output_hw == (336, 336)


@pytest.mark.parametrize(
    "bad",
    [
        {"size": {"shortest_edge": 224, "longest_edge": 1333}},
        {"size": [224, 224]},
        {"crop_size": {"height": 0, "width": 224}},
        {"image_std": [0.5, 0.0, 0.5]},
        {"image_mean": [0.5, 0.5]},
        {"do_center_crop": False},  # shortest-edge resize without a crop: sizes would differ per image
    ],
)
def test_config_rejects_unsupported(bad):
    with pytest.raises(ModelConfigError, match="expected"):
        ImageConfig.from_hf(bad)


def test_config_from_dir_missing_or_broken(tmp_path):
    with pytest.raises(ModelConfigError, match="preprocessor_config.json"):
        ImageConfig.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="JSON"):
        ImageConfig.from_dir(tmp_path)
    with pytest.raises(ValueError, match="image_formats"):
        RowLimits(image_formats=frozenset({"jpeg", "tiff"}))


# ---------------------------------------------------------------- zero copy and input containers


@pytest.mark.parametrize("arrow_type", [pa.binary(), pa.large_binary()])
def test_row_views_point_into_the_arrow_values_buffer(variants, arrow_type):
    blobs = [blob for _, blob in variants[:8]]
    blobs[4] = None
    full = pa.array(blobs, arrow_type)
    for arr, expected in [(full, blobs), (full.slice(3, 4), blobs[3:7])]:
        values = arr.buffers()[2]
        views = row_views(arr)
        assert len(views) == len(expected)
        for view, blob in zip(views, expected):
            if blob is None:
                assert view is None
                continue
            assert values.address <= view.ctypes.data and view.ctypes.data + view.size <= values.address + values.size
            assert view.tobytes() == blob
    chunked = pa.chunked_array([full.slice(0, 3), full.slice(3)])
    views = row_views(chunked)
    assert [None if v is None else v.tobytes() for v in views] == blobs


def test_every_input_container_gives_the_same_pixels(variants):
    blobs = [blob for _, blob in variants[6:12]]
    with ArrowImageProcessor(ImageConfig(), threads=1) as proc:
        want = proc(blobs)
        for images in (
            [bytearray(b) for b in blobs],
            [memoryview(b) for b in blobs],
            pa.array(blobs, pa.binary()),
            pa.array(blobs, pa.large_binary()),
            pa.chunked_array([pa.array(blobs[:2], pa.binary()), pa.array(blobs[2:], pa.binary())]),
            pa.array(blobs, pa.binary_view()),  # what Polars hands over: copied once, then read like the others
        ):
            got = proc(images)
            assert np.array_equal(got.pixels, want.pixels) and np.array_equal(got.index, want.index)


def test_output_contract_and_threads_agree(variants):
    blobs = [blob for _, blob in variants[:10]]
    with ArrowImageProcessor(ImageConfig(), threads=1) as one, ArrowImageProcessor(ImageConfig(), threads=2) as two:
        a, b = one(blobs), two(blobs)
        empty = one([])
    assert a.pixels.dtype == np.float32 and a.pixels.flags.c_contiguous and a.pixels.shape == (10, 3, 224, 224)
    assert a.index.dtype == np.int64 and a.index.tolist() == list(range(10)) and a.errors == [None] * 10
    assert np.array_equal(a.pixels, b.pixels)
    assert empty.pixels.shape == (0, 3, 224, 224) and empty.index.shape == (0,) and empty.errors == []


@pytest.mark.parametrize(
    "images, got",
    [
        ("photo.jpg", "str"),
        (b"\xff\xd8\xff", "bytes"),
        (np.zeros(10, np.uint8), "ndarray"),
        (pa.array(["a", "b"]), "string"),
        (["photo.jpg"], "str"),
        ([b"ok", 7], "int"),
    ],
)
def test_wrong_containers_raise_input_error(images, got):
    with ArrowImageProcessor(ImageConfig(), threads=1) as proc, pytest.raises(InputError, match=f"expected.*{got}"):
        proc(images)


# ---------------------------------------------------------------- row faults


def test_bad_rows_get_reasons_and_good_rows_still_come_out(variants, monkeypatch):
    rng = np.random.default_rng(7)
    cat = load_photo("chelsea.png")
    good = [encode(crop_to(cat, w, h, rng), "jpeg", rng) for w, h in ((300, 200), (200, 300), (256, 256))]
    jpeg, png = good[0], encode(crop_to(load_photo("coffee.png"), 320, 240, rng), "png", rng)
    huge_png = png_with_header(100_000, 100_000)
    huge_jpeg = bytearray(jpeg)
    sof = huge_jpeg.find(b"\xff\xc0")
    huge_jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    noise = rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)
    big = encode(noise, "png", rng)  # ~1 MB, over the max_bytes below
    rows = [
        good[0],
        b"",
        None,
        rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        jpeg[: int(len(jpeg) * 0.4)],
        png[: int(len(png) * 0.4)],
        cv2.imencode(".tiff", noise[:50, :50])[1].tobytes(),
        cv2.imencode(".gif", noise[:50, :50])[1].tobytes()[:10],  # a GIF cut inside its screen descriptor
        good[1],
        huge_png,
        bytes(huge_jpeg),
        big,
        b"\xff\xd8\xff\xe0\x00",  # JPEG cut inside its first segment
        good[2],
        encode(noise[:1, :1].repeat(20_000, axis=1), "png", rng),  # 20000x1: few pixels, 224x4480000 resized
    ]
    reasons = {
        1: "empty", 2: "null", 3: "not an image", 4: "truncated or corrupt JPEG: decoder returned nothing",
        5: "truncated or corrupt PNG: decoder returned nothing", 6: "TIFF image: format not in the allow-list",
        7: "truncated GIF: 10 bytes", 9: "too many pixels: 100000x100000",
        10: "too many pixels: 60000x60000", 11: "too large", 12: "truncated JPEG",
        14: "extreme aspect ratio: 20000x1 resizes to 4480000x224",
    }
    decoded_at = []
    real_imdecode = cv2.imdecode

    def spy(buf, flags):
        decoded_at.append(buf.ctypes.data)
        return real_imdecode(buf, flags)

    monkeypatch.setattr(cv2, "imdecode", spy)
    limits = RowLimits(max_image_bytes=400_000)
    assert len(big) > limits.max_image_bytes > max(len(r) for r in rows if r is not big and r is not None)
    arr = pa.array(rows, pa.binary())
    with ArrowImageProcessor(ImageConfig(), limits=limits, threads=2) as proc:
        batch = proc(arr)
        clean = proc(good)
    for row, reason in reasons.items():
        assert batch.errors[row] is not None and batch.errors[row].startswith(reason), (row, batch.errors[row])
    assert [i for i, e in enumerate(batch.errors) if e is None] == [0, 8, 13]
    assert batch.index.tolist() == [0, 8, 13]
    assert np.array_equal(batch.pixels, clean.pixels)
    # Over-limit rows were refused from their headers: the decoder never saw them.
    views = row_views(arr)
    assert views[4].ctypes.data in decoded_at  # (the spy does see rows that reach the decoder)
    assert not {views[k].ctypes.data for k in (9, 10, 11, 14)} & set(decoded_at)


def test_corrupted_images_never_raise(variants):
    rng = np.random.default_rng(11)
    sources = [blob for name, blob in variants if name.startswith(("100x80", "80x100", "150x150", "256x170"))]
    rows = []
    for k in range(80):
        blob = bytearray(sources[k % len(sources)])
        if k % 2:
            blob = blob[: int(rng.integers(1, len(blob)))]
        for _ in range(int(rng.integers(1, 4))):  # flip bytes, mostly in the headers
            pos = int(rng.integers(0, min(len(blob), 64 if k % 3 else len(blob))))
            blob[pos] = int(rng.integers(0, 256))
        rows.append(bytes(blob))
    with ArrowImageProcessor(ImageConfig(), threads=2) as proc:
        batch = proc(rows)
    assert len(batch.errors) == len(rows) and len(batch.index) == batch.errors.count(None)
    assert np.isfinite(batch.pixels).all()
    assert all(isinstance(e, str) and e for e in batch.errors if e is not None)


def test_header_sizes_match_the_decoder(variants):
    seen = set()
    for name, blob in variants:
        view = np.frombuffer(blob, np.uint8)
        fmt = sniff_format(view)
        header = read_header(view, fmt)
        decoded = cv2.imdecode(view, cv2.IMREAD_UNCHANGED)
        assert (header.height, header.width) == decoded.shape[:2], name
        seen.add(fmt if fmt != "webp" else bytes(view[12:16]).decode())
    assert seen == {"jpeg", "png", "VP8 ", "VP8L", "VP8X"}


def _pil_bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _bmp_by_hand(rgb: np.ndarray, core_header: bool = False, top_down: bool = False) -> bytes:
    """A 24-bit BMP written field by field: with the 12-byte OS/2 core header, or rows stored top-down (a
    negative height), two layouts PIL does not write."""
    h, w = rgb.shape[:2]
    stride = (3 * w + 3) // 4 * 4
    rows = rgb[:, :, ::-1] if top_down else rgb[::-1, :, ::-1]  # BGR, bottom-up unless top_down
    pixels = b"".join(r.tobytes().ljust(stride, b"\0") for r in rows)
    dib = (struct.pack("<IHHHH", 12, w, h, 1, 24) if core_header
           else struct.pack("<IiiHHIIiiII", 40, w, -h if top_down else h, 1, 24, 0, len(pixels), 2835, 2835, 0, 0))
    offset = 14 + len(dib)
    return struct.pack("<2sIHHI", b"BM", offset + len(pixels), 0, 0, offset) + dib + pixels


def test_gif_and_bmp_give_the_pixels_pil_decodes():
    """Each GIF/BMP layout gives exactly the pixels of a PNG holding what PIL decodes from it (first frame of an
    animation, transparency composited on white like a PNG's alpha, a 32-bit BMP's 4th byte not read as alpha,
    1-bit and palette images, top-down rows), and its header the size PIL reads."""
    rng = np.random.default_rng(5)
    rgb = cv2.cvtColor(crop_to(load_photo("coffee.png"), 150, 110, rng), cv2.COLOR_BGR2RGB)
    photo = Image.fromarray(rgb)
    other = Image.fromarray(255 - rgb).convert("P")
    blobs = {
        "gif": _pil_bytes(photo.convert("P"), "GIF"),
        "grey gif": _pil_bytes(photo.convert("L"), "GIF"),
        "transparent-index gif": _pil_bytes(photo.convert("P"), "GIF", transparency=0),
        "animated gif": _pil_bytes(photo.convert("P"), "GIF", save_all=True, append_images=[other]),
        "bmp": _pil_bytes(photo, "BMP"),
        "32-bit bmp": _pil_bytes(photo.convert("RGBA"), "BMP"),
        "grey bmp": _pil_bytes(photo.convert("L"), "BMP"),
        "1-bit bmp": _pil_bytes(photo.convert("1"), "BMP"),
        "palette bmp": _pil_bytes(photo.convert("P"), "BMP"),
        "top-down bmp": _bmp_by_hand(rgb, top_down=True),
    }
    references = [_pil_bytes(Image.open(io.BytesIO(b)).convert("RGBA"), "PNG") for b in blobs.values()]
    with ArrowImageProcessor(ImageConfig(), threads=2) as proc:
        got, want = proc(list(blobs.values())), proc(references)
    assert got.errors == [None] * len(blobs) and want.errors == [None] * len(blobs), got.errors
    for k, name in enumerate(blobs):
        view = np.frombuffer(blobs[name], np.uint8)
        header = read_header(view, sniff_format(view))
        assert (header.format, header.width, header.height) == (name.split()[-1].lower(), *photo.size), name
        assert np.array_equal(got.pixels[k], want.pixels[k]), name
    assert not np.array_equal(got.pixels[0], got.pixels[2])  # the transparent index did become white


@pytest.mark.parametrize("blob, reason", [
    (b"GIF89a\x00\x00\x10\x00" + bytes(20), "corrupt GIF: the logical screen is 0x16"),
    (b"GIF87a\x10\x00", "truncated GIF"),
    (b"BM" + bytes(12) + struct.pack("<Iii", 20, 8, 8) + bytes(8), "corrupt BMP: DIB header of 20 bytes"),
    (_bmp_by_hand(np.zeros((6, 8, 3), np.uint8), core_header=True), "OS/2 BMP (12-byte core header): not supported"),
    (b"BM" + bytes(12) + struct.pack("<Iii", 40, -8, 8) + bytes(8), "corrupt BMP: declares size -8x8"),
    (b"BM" + bytes(12) + struct.pack("<I", 40), "truncated BMP"),
    (b"BM" + bytes(12) + struct.pack("<Iii", 40, 100_000, -100_000) + bytes(30), "too many pixels: 100000x100000"),
    (b"GIF89a\x10\x00\x10\x00" + bytes(40), "truncated or corrupt GIF: decoder returned nothing"),
])
def test_broken_gif_and_bmp_rows_get_their_reason(blob, reason):
    with ArrowImageProcessor(ImageConfig(), threads=1) as proc:
        batch = proc([blob, _pil_bytes(Image.new("RGB", (40, 30), (9, 99, 199)), "BMP")])
    assert batch.errors[0] is not None and batch.errors[0].startswith(reason), batch.errors[0]
    assert batch.errors[1] is None and batch.index.tolist() == [1]


def test_gif_and_bmp_can_be_left_out_of_the_allow_list():
    gif = _pil_bytes(Image.new("P", (40, 30)), "GIF")
    with ArrowImageProcessor(ImageConfig(), limits=RowLimits(image_formats=frozenset({"jpeg", "png"})), threads=1) as p:
        assert p([gif]).errors[0] == ("GIF image: format not in the allow-list (jpeg, png); re-encode it as one of "
                                      "those")


# ---------------------------------------------------------------- colour, depth, orientation


def test_16_bit_and_alpha_pngs_decode_to_rgb():
    rng = np.random.default_rng(3)
    image = crop_to(load_photo("astronaut.png"), 300, 260, rng)
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    opaque = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    clear = np.dstack([image, np.zeros(image.shape[:2], np.uint8)])
    blobs = [cv2.imencode(".png", x)[1].tobytes() for x in (image, image.astype(np.uint16) * 257, grey,
                                                              grey.astype(np.uint16) * 257, opaque, clear)]
    with ArrowImageProcessor(ImageConfig(), threads=1) as proc:
        px = proc(blobs).pixels
    assert np.array_equal(px[1], px[0])  # 16-bit colour -> the same 8-bit values
    assert np.array_equal(px[3], px[2])  # 16-bit grey -> the same 8-bit values (PIL would clip)
    raw = px[2] * np.array(OPENAI_CLIP_STD)[:, None, None] + np.array(OPENAI_CLIP_MEAN)[:, None, None]
    assert np.allclose(raw[0], raw[1], atol=1e-5) and np.allclose(raw[1], raw[2], atol=1e-5)  # grey -> R = G = B
    assert np.array_equal(px[4], px[0])  # opaque alpha is dropped
    white = (1.0 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    assert np.allclose(px[5], white[:, None, None].astype(np.float32), atol=1e-6)  # transparent -> white


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


@pytest.mark.parametrize("size", [(640, 427), (2100, 1300)])  # the second one takes the reduced JPEG decode
def test_exif_orientation(size):
    rng = np.random.default_rng(5)
    image = crop_to(load_photo("rocket.jpg"), *size, rng)
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
    tagged = exif_jpeg(jpeg, 6)  # 6: stored turned left, display turned 90 degrees clockwise
    stored = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    upright = _png(cv2.rotate(stored, cv2.ROTATE_90_CLOCKWISE))
    with ArrowImageProcessor(ImageConfig(), threads=1) as on, ArrowImageProcessor(
        ImageConfig(), threads=1, apply_exif_orientation=False
    ) as off:
        applied, ignored = on([tagged, upright, _png(stored)]), off([tagged])
    mad = lambda a, b: float(np.abs(a - b).mean())  # noqa: E731
    assert mad(applied.pixels[0], applied.pixels[1]) < 0.02  # shows what a person sees
    assert mad(applied.pixels[0], applied.pixels[2]) > 0.1  # and that is not the stored grid
    assert mad(ignored.pixels[0], applied.pixels[2]) < 0.02  # the flag restores transformers' behaviour
    assert mad(ignored.pixels[0], hf_pixels([tagged])[0]) <= MAX_MEAN_ABS_DIFF


@pytest.mark.parametrize(
    "width, height, scale",
    [(800, 600, 1), (1000, 894, 1), (1000, 896, 2), (2000, 1000, 2), (1800, 1792, 4), (1792, 4000, 4), (4000, 3600, 8)],
)
def test_reduced_jpeg_decode_only_at_twice_the_target(width, height, scale, monkeypatch):
    jpeg = cv2.imencode(".jpg", np.full((height, width, 3), 128, np.uint8))[1].tobytes()
    flags_seen = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: flags_seen.append(flags) or real_imdecode(buf, flags))
    with ArrowImageProcessor(ImageConfig(), threads=1) as proc:
        batch = proc([jpeg])
    expected = {
        1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8,
    }
    assert flags_seen == [expected[scale]]
    assert batch.errors == [None]
    grey_128 = ((128 / 255 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)).astype(np.float32)
    assert np.allclose(batch.pixels[0], grey_128[:, None, None], atol=0.02)


def test_truncated_files_do_not_make_opencv_print_warnings(capfd):
    """The row error says it; OpenCV's own stderr warning per broken file would bury a bulk job's progress bar."""
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_WARNING)  # as a fresh process has it
    png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))[1].tobytes()
    with ArrowImageProcessor(ImageConfig(), threads=1) as proc:
        batch = proc([png[: len(png) // 2]])
    assert batch.errors[0].startswith("truncated or corrupt PNG")
    assert "WARN" not in capfd.readouterr().err
