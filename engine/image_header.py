"""Image format sniffing and header size parsing, before any pixel is decoded.

The image processor must refuse an oversized image (a "decompression bomb"
declares 50,000 x 50,000 pixels in a few hundred bytes) before it hands the
bytes to a decoder, and it wants the size of a JPEG up front to choose a
reduced-scale decode. Both only need the first few hundred bytes, which this
module reads straight from a numpy view of the encoded image (no copy).

Header layouts (from the format specifications):

* JPEG (ITU T.81, annex B): markers ``FF xx``; the frame header ``SOFn``
  holds precision (1 byte), height (2), width (2) and component count (1).
  Application segments (EXIF, ICC profiles) come before it and are skipped by
  their length field.
* PNG (RFC 2083): an 8-byte signature, then the ``IHDR`` chunk whose data
  starts with width and height as big-endian uint32, then bit depth and colour
  type (1 byte each). A ``tRNS`` chunk (before ``IDAT``) adds an alpha channel.
* WebP (RIFF container): ``VP8 `` (lossy; 14-bit sizes after the start code
  ``9D 01 2A``), ``VP8L`` (lossless; signature ``2F`` then two 14-bit
  sizes minus one and an alpha-is-used bit) or ``VP8X`` (extended; a flags
  byte with alpha and animation bits, then 24-bit canvas sizes minus one).
* GIF (GIF89a specification): ``GIF87a``/``GIF89a``, then the logical screen
  width and height as little-endian uint16 (the canvas every frame is drawn on).
* BMP (Windows bitmap): a 14-byte file header, then the DIB header, whose first
  uint32 is its own size: 40 and up (int32 width and height; a negative height
  stores rows top-down; uint16 planes and bit count). The 12-byte OS/2 core
  header is refused: OpenCV misreads it.

Besides the size, the header gives what ``cv2.imdecode`` will allocate for the
pixels, with the flags the image processor uses (``IMREAD_COLOR`` /
``IMREAD_GRAYSCALE`` for JPEG, ``IMREAD_UNCHANGED`` for the others): channels
and bytes per sample (:attr:`ImageHeader.decoded_bytes`). Checked against
OpenCV 5.1; where the header alone cannot tell, the larger count is taken:

=======  ==========================================================================
JPEG     1 channel when grey (1 component), else 3 (RGB, YCbCr, CMYK and YCCK all
         decode to BGR); 1 byte per sample, 2 when the precision is over 8 bits
PNG      grey 1; RGB and palette 3, or 4 with a ``tRNS`` chunk; grey+alpha and
         RGBA 4 (OpenCV expands grey+alpha to BGRA); 2 bytes at bit depth 16
WebP     3, or 4 with alpha (the VP8L alpha bit, or the VP8X alpha flag: OpenCV
         reads only those) or an animation (a BGRA canvas); 1 byte
GIF      4: OpenCV draws every frame on a BGRA canvas of the logical screen size
BMP      by bit count: 3 up to 24 bits (grey palettes give 1), 4 at 32 bits;
         any other bit count (0 for an embedded JPEG/PNG, 64) 4 channels of 2 bytes
=======  ==========================================================================
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

# Formats whose headers this module parses; the processor can only allow these.
PARSED_FORMATS = frozenset({"jpeg", "png", "webp", "gif", "bmp"})

# JPEG start-of-frame markers (SOF0-3, 5-7, 9-11, 13-15); C4, C8 and CC are not frames.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# PNG colour types (IHDR byte 25): name, bit depths the specification allows.
_PNG_COLOUR_TYPES = {
    0: ("grey", (1, 2, 4, 8, 16)), 2: ("RGB", (8, 16)), 3: ("palette", (1, 2, 4, 8)),
    4: ("grey+alpha", (8, 16)), 6: ("RGBA", (8, 16)),
}
# Chunks walked after IHDR looking for a PNG's tRNS; past this many, assume there is one.
_MAX_CHUNKS_WALKED = 64
# BMP bit count -> channels cv2.imdecode(IMREAD_UNCHANGED) gives (at most: a grey palette gives 1).
_BMP_CHANNELS = {1: 3, 2: 3, 4: 3, 8: 3, 16: 3, 24: 3, 32: 4}
_ISO_BMFF_BRANDS = {
    b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF",
}


class HeaderError(ValueError):
    """The bytes are not a well-formed image header; the message is the row's error reason."""


@dataclass(frozen=True)
class ImageHeader:
    """What the header says about an encoded image."""

    format: str  # "jpeg" | "png" | "webp" | "gif" | "bmp"
    width: int  # stored width, before any EXIF orientation
    height: int  # stored height, before any EXIF orientation
    components: int  # JPEG colour components (1 grey, 3 YCbCr/RGB, 4 CMYK); 0 when not known
    orientation: int = 1  # JPEG EXIF orientation tag (1-8; 1 = upright, also when absent or unreadable)
    frame: int = 0  # JPEG start-of-frame marker (0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...)
    channels: int = 4  # channels of the decoded image (see the module docstring); 4 when not known
    bytes_per_sample: int = 2  # bytes per decoded sample: 1 (8 bits) or 2 (16 bits); 2 when not known

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the decoded pixels: width x height x channels x bytes per sample (full scale)."""
        return self.width * self.height * self.channels * self.bytes_per_sample


def sniff_format(data: np.ndarray) -> str | None:
    """Name the image format from its magic bytes.

    Args:
        data: the encoded image as a 1-D uint8 array (a view is fine).

    Returns:
        "jpeg", "png", "webp", "gif" or "bmp" for the formats this module parses; an
        upper-case name ("TIFF", "HEIC", ...) for other recognised formats; None when
        the bytes match no known signature.
    """
    head = bytes(data[:16])
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp" and head[8:12] in _ISO_BMFF_BRANDS:
        return _ISO_BMFF_BRANDS[head[8:12]]
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return "JPEG 2000"
    if head[:2] == b"\xff\x0a" or head[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "JPEG XL"
    if head[:4] == b"8BPS":
        return "PSD"
    if head[:4] == b"qoif":
        return "QOI"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ICO"
    return None


def read_header(data: np.ndarray, fmt: str) -> ImageHeader:
    """Parse size, decoded channels and sample size from the header of a JPEG, PNG, WebP, GIF or BMP image.

    Args:
        data: the encoded image as a 1-D uint8 array (a view is fine; nothing is copied).
        fmt: the format from :func:`sniff_format`; one of :data:`PARSED_FORMATS`.

    Returns:
        The :class:`ImageHeader`.

    Raises:
        HeaderError: the header is truncated, corrupt, declares a zero size, or (PNG) a bit depth its
            colour type does not allow.
    """
    parsers = {"jpeg": _jpeg_header, "png": _png_header, "webp": _webp_header, "gif": _gif_header,
               "bmp": _bmp_header}
    if fmt not in parsers:
        raise HeaderError(f"no header parser for format {fmt!r}; expected one of {sorted(PARSED_FORMATS)}")
    try:
        return parsers[fmt](memoryview(data))
    except struct.error as exc:
        raise HeaderError(f"truncated {fmt.upper()} header: {exc}") from exc


def _jpeg_header(mv: memoryview) -> ImageHeader:
    n = len(mv)
    i = 2  # after SOI
    orientation = 1
    while True:
        if i >= n:
            raise HeaderError("truncated JPEG: the data ends before the frame header (SOF)")
        if mv[i] != 0xFF:
            raise HeaderError(f"corrupt JPEG: expected a marker at byte {i}, found 0x{mv[i]:02x}")
        while i < n and mv[i] == 0xFF:  # markers may be padded with fill bytes
            i += 1
        if i >= n:
            raise HeaderError("truncated JPEG: the data ends inside a marker")
        marker = mv[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length field
            continue
        if marker in (0xD8, 0xD9, 0xDA):
            raise HeaderError(f"corrupt JPEG: marker 0x{marker:02x} before the frame header (SOF)")
        if i + 2 > n:
            raise HeaderError("truncated JPEG: the data ends inside a segment length")
        (length,) = struct.unpack_from(">H", mv, i)
        if length < 2:
            raise HeaderError(f"corrupt JPEG: segment 0x{marker:02x} has length {length}")
        if marker in _JPEG_SOF:
            if i + 8 > n:
                raise HeaderError("truncated JPEG: the data ends inside the frame header")
            precision, height, width, components = struct.unpack_from(">BHHB", mv, i + 2)
            if width == 0 or height == 0:
                raise HeaderError(
                    f"JPEG declares size {width}x{height}; a zero size (height given by a DNL marker) is not supported"
                )
            channels = 1 if components == 1 else 3  # IMREAD_GRAYSCALE for grey, else IMREAD_COLOR (BGR)
            return ImageHeader("jpeg", width, height, components, orientation, marker,
                               channels=channels, bytes_per_sample=1 if precision <= 8 else 2)
        if marker == 0xE1 and orientation == 1:  # APP1: EXIF, when it comes first
            orientation = _exif_orientation(mv[i + 2 : min(n, i + length)])
        i += length


def _exif_orientation(seg: memoryview) -> int:
    """The orientation tag (0x0112) of IFD0 in an APP1 ``Exif`` payload; 1 when absent or malformed."""
    if bytes(seg[:6]) != b"Exif\x00\x00" or len(seg) < 14:
        return 1
    tiff = seg[6:]
    order = {b"II": "<", b"MM": ">"}.get(bytes(tiff[:2]))
    if order is None:
        return 1
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, kind, num = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * k)
            if tag == 0x0112:
                if kind != 3 or num != 1:  # SHORT, one value
                    return 1
                (value,) = struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * k + 8)
                return value if 1 <= value <= 8 else 1
    except struct.error:
        return 1
    return 1


def _png_header(mv: memoryview) -> ImageHeader:
    if len(mv) < 26:
        raise HeaderError(f"truncated PNG: {len(mv)} bytes, the IHDR chunk needs at least 26")
    if bytes(mv[12:16]) != b"IHDR":
        raise HeaderError(f"corrupt PNG: the first chunk is {bytes(mv[12:16])!r}, expected b'IHDR'")
    width, height, depth, colour = struct.unpack_from(">IIBB", mv, 16)
    if width == 0 or height == 0:
        raise HeaderError(f"corrupt PNG: IHDR declares size {width}x{height}")
    if colour not in _PNG_COLOUR_TYPES:
        raise HeaderError(f"corrupt PNG: IHDR declares colour type {colour}, expected one of "
                          f"{sorted(_PNG_COLOUR_TYPES)}")
    name, depths = _PNG_COLOUR_TYPES[colour]
    if depth not in depths:
        raise HeaderError(f"corrupt PNG: IHDR declares bit depth {depth} for colour type {colour} ({name}), "
                          f"expected one of {list(depths)}")
    if colour == 0:
        channels = 1  # OpenCV ignores a grey image's tRNS
    elif colour in (2, 3):
        channels = 4 if _png_has_trns(mv) else 3
    else:
        channels = 4  # grey+alpha decodes to BGRA too
    return ImageHeader("png", width, height, 0, channels=channels, bytes_per_sample=2 if depth == 16 else 1)


def _png_has_trns(mv: memoryview) -> bool:
    """Whether a tRNS chunk comes before the first IDAT; True (the larger decode) when the walk cannot tell."""
    (pos,) = struct.unpack_from(">I", mv, 8)  # IHDR's length
    pos += 8 + 12  # signature, IHDR's length, type and CRC
    for _ in range(_MAX_CHUNKS_WALKED):
        if pos + 8 > len(mv):
            return True
        length, kind = struct.unpack_from(">I4s", mv, pos)
        if kind in (b"IDAT", b"IEND"):
            return False
        if kind == b"tRNS":
            return True
        pos += 12 + length
    return True


def _webp_header(mv: memoryview) -> ImageHeader:
    if len(mv) < 30:
        raise HeaderError(f"truncated WebP: {len(mv)} bytes, the first chunk header needs at least 30")
    chunk = bytes(mv[12:16])
    if chunk == b"VP8 ":
        if bytes(mv[23:26]) != b"\x9d\x01\x2a":
            raise HeaderError("corrupt WebP: VP8 chunk without the key-frame start code 9d 01 2a")
        width, height = struct.unpack_from("<HH", mv, 26)
        width, height = width & 0x3FFF, height & 0x3FFF
        alpha = False
    elif chunk == b"VP8L":
        if mv[20] != 0x2F:
            raise HeaderError(f"corrupt WebP: VP8L signature is 0x{mv[20]:02x}, expected 0x2f")
        (bits,) = struct.unpack_from("<I", mv, 21)
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        alpha = bool(bits >> 28 & 1)
    elif chunk == b"VP8X":
        width = 1 + (mv[24] | mv[25] << 8 | mv[26] << 16)
        height = 1 + (mv[27] | mv[28] << 8 | mv[29] << 16)
        # OpenCV reads only the first 32 bytes for the channel count (WebPGetFeatures): the VP8X flags, 0x10
        # alpha; an animation (0x02) is drawn on a BGRA canvas whatever the flag says
        alpha = bool(mv[20] & 0x12)
    else:
        raise HeaderError(f"corrupt WebP: first chunk is {chunk!r}, expected b'VP8 ', b'VP8L' or b'VP8X'")
    if width == 0 or height == 0:
        raise HeaderError(f"corrupt WebP: declares size {width}x{height}")
    return ImageHeader("webp", width, height, 0, channels=4 if alpha else 3, bytes_per_sample=1)


def _gif_header(mv: memoryview) -> ImageHeader:
    if len(mv) < 13:
        raise HeaderError(f"truncated GIF: {len(mv)} bytes, the logical screen descriptor needs 13")
    width, height = struct.unpack_from("<HH", mv, 6)
    if width == 0 or height == 0:
        raise HeaderError(f"corrupt GIF: the logical screen is {width}x{height}")
    return ImageHeader("gif", width, height, 0, channels=4, bytes_per_sample=1)  # OpenCV's canvas is BGRA


def _bmp_header(mv: memoryview) -> ImageHeader:
    if len(mv) < 30:
        raise HeaderError(f"truncated BMP: {len(mv)} bytes, the file and DIB headers need at least 30")
    (dib,) = struct.unpack_from("<I", mv, 14)
    if dib == 12:  # OS/2 BITMAPCOREHEADER: OpenCV 5.0 misreads it (a 24-bit one came out as 1 channel)
        raise HeaderError("OS/2 BMP (12-byte core header): not supported; re-encode it as PNG")
    if dib < 40:
        raise HeaderError(f"corrupt BMP: DIB header of {dib} bytes, expected at least 40")
    width, height = struct.unpack_from("<ii", mv, 18)  # BITMAPINFOHEADER and its successors (V4, V5)
    height = abs(height)  # negative: rows stored top-down
    if width <= 0 or height == 0:
        raise HeaderError(f"corrupt BMP: declares size {width}x{height}")
    (bit_count,) = struct.unpack_from("<H", mv, 28)
    if bit_count in _BMP_CHANNELS:
        return ImageHeader("bmp", width, height, 0, channels=_BMP_CHANNELS[bit_count], bytes_per_sample=1)
    return ImageHeader("bmp", width, height, 0, channels=4, bytes_per_sample=2)  # unusual: assume the most
