"""JPEG decoding and CLIP preprocessing on a CUDA device: nvJPEG (through torchvision) + torch resize.

On a GPU box the CPU is what limits end-to-end throughput: measured on an H200 with 16 cores, our OpenCV
processor alone prepares ~1,700-2,200 photos per second while torchvision's batched nvJPEG decode plus an
antialiased resize on the GPU does ~4,000 (bench/results/h200.md), and B/16 in fp16 embeds ~9,000.
So when the model runs on CUDA, :class:`~engine.image_processor.ArrowImageProcessor` hands the JPEGs
it can to :class:`DeviceJpegStage` and keeps decoding the rest (PNG, WebP, progressive, CMYK, rotated
or truncated JPEGs) on its CPU threads.

What the stage does per image, matching the CPU path's geometry exactly (same resize size and crop
offsets, transformers' rules): decode to RGB uint8 on the device; resize the short side with bicubic
interpolation, antialiased when shrinking (the filter PIL uses, so this is closer to transformers than
OpenCV's INTER_AREA); clamp and round to 0-255 as an 8-bit image would; centre-crop with zero padding;
rescale and normalize (one fused multiply-add for the whole batch).

Nothing is lost: a JPEG the device decoder refuses is decoded again on the CPU path, which gives the row
its pixels or its error reason. EXIF orientation is read from the header: a rotated JPEG goes to the CPU
path (nvJPEG does not apply the tag) unless the processor was told to ignore orientation.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.image_config import ImageConfig
from engine.image_header import ImageHeader
from engine.image_processor import crop_span

log = logging.getLogger(__name__)

# JPEG frames the device path takes: baseline and extended sequential Huffman (SOF0, SOF1). Progressive and
# lossless/arithmetic frames go to the CPU decoder.
DEVICE_FRAMES = frozenset({0xC0, 0xC1})

# decode(list of 1-D uint8 CPU tensors) -> list of (3, H, W) uint8 RGB tensors on the device
Decoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def nvjpeg_decoder(device: torch.device) -> Decoder | None:
    """torchvision's batched nvJPEG decode onto ``device``; None without torchvision or a CUDA device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as exc:  # not installed, or built for another torch (RuntimeError, OSError): use the CPU
        log.info("JPEGs decode on the CPU: torchvision's nvJPEG decoder is not available (%s)", exc)
        return None

    def decode(blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
        return out if isinstance(out, list) else [out]

    return decode


class DeviceJpegStage:
    """Decode + resize + crop + normalize JPEG rows on a torch device, as one (K, 3, H, W) float32 tensor."""

    def __init__(self, config: ImageConfig, device: torch.device | str, decode: Decoder,
                 resize_hw: Callable[[int, int], tuple[int, int]]) -> None:
        """
        Args:
            config: the preprocessing settings (the same object the CPU path uses).
            device: where pixels are produced (the model's device).
            decode: see :data:`Decoder`; :func:`nvjpeg_decoder` on CUDA.
            resize_hw: (height, width) -> resized (height, width), the CPU path's own rule.
        """
        self.config = config
        self.device = torch.device(device)
        self.decode = decode
        self.resize_hw = resize_hw
        mean = np.asarray(config.image_mean if config.do_normalize else (0.0, 0.0, 0.0), dtype=np.float64)
        std = np.asarray(config.image_std if config.do_normalize else (1.0, 1.0, 1.0), dtype=np.float64)
        rescale = config.rescale_factor if config.do_rescale else 1.0
        # normalized = v * scale + shift, per channel, for a 0-255 value v (what the CPU path's tables hold)
        self._scale = torch.tensor(rescale / std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._shift = torch.tensor(-mean / std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @staticmethod
    def takes(view: np.ndarray, header: ImageHeader, apply_exif_orientation: bool) -> bool:
        """Whether a row goes to the device (else the CPU path decodes it): a baseline grey or colour JPEG
        that ends with its end-of-image marker (a truncated one is the CPU decoder's to judge, so a cut
        file is an error row on any device) and needs no rotation."""
        return (header.format == "jpeg" and header.components in (1, 3) and header.frame in DEVICE_FRAMES
                and (header.orientation == 1 or not apply_exif_orientation)
                and view.size >= 4 and view[-2] == 0xFF and view[-1] == 0xD9)

    def __call__(self, views: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[str | None]]:
        """Preprocess encoded JPEGs (1-D uint8 views).

        Returns:
            pixels (K, 3, H, W) float32 on the device, and per row None or why the device decoder refused
            it (that row of pixels is then unspecified; the caller decodes it on the CPU).
        """
        height, width = self.config.output_hw
        out = torch.empty((len(views), 3, height, width), dtype=torch.float32, device=self.device)
        images, faults = self._decode_all(views)
        for k, image in enumerate(images):
            if image is not None:
                self._resize_crop(image, out[k])
        out.mul_(self._scale).add_(self._shift)
        return out, faults

    def _decode_all(self, views: Sequence[np.ndarray]) -> tuple[list[torch.Tensor | None], list[str | None]]:
        with warnings.catch_warnings():  # Arrow buffers are read-only; the decoder only reads them
            warnings.simplefilter("ignore", UserWarning)
            blobs = [torch.from_numpy(v) for v in views]
        try:
            return list(self.decode(blobs)), [None] * len(blobs)
        except Exception:  # one bad image fails the whole batched call: retry one by one
            pass
        images: list[torch.Tensor | None] = []
        faults: list[str | None] = []
        for blob in blobs:
            try:
                images.append(self.decode([blob])[0])
                faults.append(None)
            except Exception as exc:
                images.append(None)
                faults.append(f"device JPEG decoder: {type(exc).__name__}: {exc}")
        return images, faults

    def _resize_crop(self, image: torch.Tensor, out: torch.Tensor) -> None:
        """(3, h, w) uint8 -> resized, centre-cropped 0-255 float values in ``out`` (3, H, W)."""
        x = image[None].float()  # (1, 3, h, w)
        if self.config.do_resize:
            hw = self.resize_hw(int(x.shape[2]), int(x.shape[3]))
            if hw != tuple(x.shape[2:]):
                shrink = hw[0] <= x.shape[2] and hw[1] <= x.shape[3]
                x = F.interpolate(x, size=hw, mode="bicubic", antialias=shrink, align_corners=False)
                x = x.clamp_(0, 255).round_()  # an 8-bit image, as PIL and OpenCV produce
        sy, dy, ly = crop_span(x.shape[2], out.shape[1])
        sx, dx, lx = crop_span(x.shape[3], out.shape[2])
        if ly < out.shape[1] or lx < out.shape[2]:
            out.zero_()  # zero pixels, as transformers pads
        out[:, dy:dy + ly, dx:dx + lx] = x[0, :, sy:sy + ly, sx:sx + lx]

