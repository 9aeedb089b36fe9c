"""Per-row input limits: what one row may cost the engine before it is refused.

One frozen :class:`RowLimits`, built once at the edge (``engine.load_model(..., row_limits=...)`` in
process, ``arrowengine serve``'s flags of the same names behind a server) and enforced by the model's
``prepare_*`` / ``embed_*`` stages, so a row over a limit is the same row error, with the same text,
in-process and over Flight. A row over a limit never fails its batch. The limits of a whole request
(rows and bytes per batch, concurrent exchanges, ...) belong to the server
(``flight_server.config.ServerLimits``, which holds a RowLimits).

Imports no torch (the command line builds these before the engine loads).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.image_header import PARSED_FORMATS

IMAGE_FORMATS: frozenset[str] = frozenset({"jpeg", "png", "webp", "gif", "bmp"})  # every format the engine reads


@dataclass(frozen=True)
class RowLimits:
    """Per-row limits, checked before the expensive step each guards (image limits: from the header, before
    decoding). Defaults protect a 24 GiB machine; docs/limits-and-security.md works out the memory they allow.

    Raises:
        ValueError: a limit that is not a positive integer, or an unknown image format.
    """

    max_row_tokens: int | None = None       # token ids per token-id row; None: the model's positions
    max_image_bytes: int = 32 * 1024 ** 2   # encoded bytes per image
    max_image_pixels: int = 50_000_000      # width x height, from the header; also what the resize would make
    # What the decoder allocates: width x height x channels x bytes per sample, as the header says (16-bit RGBA
    # is 8 bytes a pixel). None: 3 x max_image_pixels, an 8-bit RGB image at the pixel limit.
    max_image_decoded_bytes: int | None = None
    image_formats: frozenset[str] = IMAGE_FORMATS  # the allow-list of image formats

    def __post_init__(self) -> None:
        for name in ("max_row_tokens", "max_image_bytes", "max_image_pixels", "max_image_decoded_bytes"):
            value = getattr(self, name)
            if value is None and name in ("max_row_tokens", "max_image_decoded_bytes"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.max_image_decoded_bytes is None:
            object.__setattr__(self, "max_image_decoded_bytes", 3 * self.max_image_pixels)
        formats = frozenset(self.image_formats)
        unknown = formats - PARSED_FORMATS
        if unknown or not formats:
            raise ValueError(f"image_formats must be a non-empty set of {sorted(PARSED_FORMATS)}; "
                             f"got {sorted(formats)}")
        object.__setattr__(self, "image_formats", formats)

    def token_row_error(self, tokens: int) -> str | None:
        """The error of a token-id row of ``tokens`` ids, or None when it is within ``max_row_tokens``."""
        limit = self.max_row_tokens
        if limit is None or tokens <= limit:
            return None
        return f"{tokens} tokens, over the limit of {limit} tokens per row (max_row_tokens); truncate or split the row"
