"""Image preprocessing settings: what a HF ``preprocessor_config.json`` says.

Built once at the edge (from the model directory) and passed to
:class:`engine.image_processor.ArrowImageProcessor`. Field meanings follow
transformers' ``CLIPImageProcessor``. Keys a file leaves out take the defaults of the processor class that
transformers would build for it (:data:`PROCESSOR_KINDS`): the one its ``image_processor_type`` names, else the
model's own (SigLIP: a fixed (height, width) resize, no crop, mean and std 0.5), else CLIP's.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelConfigError

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN / _STD: SigLIP's processor defaults

# transformers' image processor classes by the name prefix a preprocessor_config.json gives them
# (``image_processor_type``, older files ``feature_extractor_type``), and the keys each class defaults
PROCESSOR_KINDS = {"Siglip": "siglip", "CLIP": "clip"}
_DEFAULTS = {
    "clip": {"size": {"shortest_edge": 224}, "crop_size": 224, "image_mean": OPENAI_CLIP_MEAN,
             "image_std": OPENAI_CLIP_STD},
    "siglip": {"size": {"height": 224, "width": 224}, "do_center_crop": False, "image_mean": HALF, "image_std": HALF},
}
# a folder without a processor config: each kind's class (for messages) and its size keys at the model's size
_AT_SIZE = {
    "clip": ("CLIPImageProcessor", lambda size: {"size": {"shortest_edge": size}, "crop_size": size}),
    "siglip": ("SiglipImageProcessor", lambda size: {"size": {"height": size, "width": size}}),
}


def processor_kind(cfg: dict, fallback: str | None = None) -> str:
    """The processor a preprocessor_config.json dict is for: ``"clip"`` or ``"siglip"``, from the class it names,
    else ``fallback`` (the model's own), else ``"clip"``."""
    named = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
    if isinstance(named, str):
        for prefix, kind in PROCESSOR_KINDS.items():
            if named.startswith(prefix):
                return kind
    return fallback if fallback in _DEFAULTS else "clip"


@dataclass(frozen=True)
class ImageConfig:
    """Preprocessing settings, as in a HF ``preprocessor_config.json`` (defaults: CLIP's)."""

    shortest_edge: int | None = 224  # resize the short side to this (HF size={"shortest_edge": n} or int)
    resize_hw: tuple[int, int] | None = None  # or resize to exactly (height, width) (HF size={"height", "width"})
    crop_hw: tuple[int, int] = (224, 224)  # centre-crop (height, width) (HF crop_size)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True  # read for completeness; output is always RGB

    def __post_init__(self) -> None:
        if self.do_resize and (self.shortest_edge is None) == (self.resize_hw is None):
            raise ModelConfigError(
                f"image config: expected exactly one of shortest_edge / resize_hw when do_resize is set, "
                f"got shortest_edge={self.shortest_edge}, resize_hw={self.resize_hw}"
            )
        sizes = [self.crop_hw, self.resize_hw or (1, 1), (self.shortest_edge or 1,) * 2]
        if any(int(v) != v or v < 1 for hw in sizes for v in hw):
            raise ModelConfigError(
                f"image config: expected positive integer sizes, got shortest_edge={self.shortest_edge}, "
                f"resize_hw={self.resize_hw}, crop_hw={self.crop_hw}"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise ModelConfigError(
                f"image config: expected 3 means and 3 non-zero stds, got mean={self.image_mean}, std={self.image_std}"
            )
        if not self.do_center_crop and not (self.do_resize and self.resize_hw is not None):
            raise ModelConfigError(
                "image config: a batch needs one output size, so expected do_center_crop=true or a fixed "
                '{"height", "width"} resize; got do_center_crop=false with a shortest-edge or no resize'
            )

    @property
    def output_hw(self) -> tuple[int, int]:
        """(height, width) of every output image."""
        if self.do_center_crop:
            return self.crop_hw
        assert self.resize_hw is not None
        return self.resize_hw

    @classmethod
    def from_hf(cls, cfg: dict, kind: str | None = None) -> "ImageConfig":
        """Build from the dict of a HF ``preprocessor_config.json``; missing keys take the defaults of the
        processor it is for (:func:`processor_kind`; ``kind``: the model's own, ``"clip"`` or ``"siglip"``).

        Raises:
            ModelConfigError: a size, mean or std has a shape this processor does not support.
        """
        if not isinstance(cfg, dict):
            raise ModelConfigError(
                f"image config: expected a dict from preprocessor_config.json, got {type(cfg).__name__}"
            )
        kind = processor_kind(cfg, kind)
        given, cfg = cfg, {**_DEFAULTS[kind], **cfg}
        try:
            shortest_edge, resize_hw = _parse_size(cfg["size"])
            crop_hw = _parse_hw(cfg.get("crop_size", 224), "crop_size")
            # CLIP's processor crops by default; SigLIP's does not (its default says so), nor one with a fixed
            # (height, width) resize and no crop settings (SigLIP's layout in a file that names no class)
            crop_default = resize_hw is None or "crop_size" in given
            return cls(
                shortest_edge=shortest_edge,
                resize_hw=resize_hw,
                crop_hw=crop_hw,
                do_resize=bool(cfg.get("do_resize", True)),
                do_center_crop=bool(cfg.get("do_center_crop", crop_default)),
                do_rescale=bool(cfg.get("do_rescale", True)),
                rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                do_normalize=bool(cfg.get("do_normalize", True)),
                image_mean=_triple(cfg["image_mean"], "image_mean"),
                image_std=_triple(cfg["image_std"], "image_std"),
                do_convert_rgb=bool(cfg.get("do_convert_rgb", True)),
            )
        except (TypeError, ValueError) as exc:
            raise ModelConfigError(f"image config: invalid value in preprocessor_config.json: {exc}") from exc

    @classmethod
    def from_dir(cls, path: str | os.PathLike, image_size: int | None = None,
                 kind: str | None = None) -> "ImageConfig":
        """Read a model directory's image processor settings: ``preprocessor_config.json``, else the
        ``image_processor`` of ``processor_config.json`` (what transformers 5 saves). ``kind``: the model's own
        processor (``"clip"``, ``"siglip"``), whose defaults fill the keys a file leaves out when it names no class.

        With neither file, that processor's defaults at ``image_size`` (the model's own), with a warning;
        without ``image_size`` that is an error.

        Raises:
            ModelConfigError: no settings, a file that is not JSON (or not a regular file inside the directory,
                or larger than ``engine.files.MAX_CONFIG_BYTES``), or unsupported values.
        """
        from engine.files import MAX_CONFIG_BYTES, parse_json, read_model_file

        root = Path(path)
        for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            # a regular file inside the directory, at most MAX_CONFIG_BYTES; None: there is none
            data = read_model_file(root, name, MAX_CONFIG_BYTES, "the model's image processor config",
                                   optional=True)
            if data is None:
                continue
            cfg = parse_json(data, root / name)
            if key is None:
                return cls.from_hf(cfg, kind)
            if isinstance(cfg, dict) and isinstance(cfg.get(key), dict):
                return cls.from_hf(cfg[key], kind)
        if image_size is None:
            raise ModelConfigError(f"{root} has no preprocessor_config.json (nor a processor_config.json with an "
                                   "image_processor): an image model directory needs one")
        kind = processor_kind({}, kind)
        name, at_size = _AT_SIZE[kind]
        config = cls.from_hf(at_size(image_size), kind)
        log.warning("%s has no preprocessor_config.json: using %s's defaults at the model's image size %d (centre "
                    "crop: %s, mean %s, std %s)", root, name, image_size, config.do_center_crop, config.image_mean,
                    config.image_std)
        return config


def _parse_size(size: object) -> tuple[int | None, tuple[int, int] | None]:
    if isinstance(size, int):
        return size, None
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        return int(size["shortest_edge"]), None
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return None, (int(size["height"]), int(size["width"]))
    raise ModelConfigError(
        f'image config: expected size as an int, {{"shortest_edge": n}} or {{"height": h, "width": w}}, got {size!r}'
    )


def _parse_hw(size: object, name: str) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and {"height", "width"} <= set(size):
        return int(size["height"]), int(size["width"])
    raise ModelConfigError(f'image config: expected {name} as an int or {{"height": h, "width": w}}, got {size!r}')


def _triple(value: object, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    raise ModelConfigError(f"image config: expected {name} as a number or a list of 3, got {value!r}")
