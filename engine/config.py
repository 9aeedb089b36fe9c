"""Frozen model configurations, read once from a model directory's HF files.

Only what the engine's own implementation needs is kept; every field is
checked when it is read so a bad config fails at load, not mid-request.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ModelConfigError

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True)
class TowerConfig:
    """A stack of transformer blocks."""

    width: int  # hidden size
    layers: int  # number of blocks
    heads: int  # attention heads; width % heads == 0
    mlp_width: int  # MLP hidden size
    act: str  # one of ACTIVATIONS
    eps: float  # LayerNorm epsilon

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ModelConfigError(f"hidden size {self.width} is not divisible by {self.heads} heads")
        if self.act not in ACTIVATIONS:
            raise ModelConfigError(f"activation {self.act!r} is not supported; expected one of {ACTIVATIONS}")


@dataclass(frozen=True)
class ClipTextConfig:
    tower: TowerConfig
    vocab_size: int
    max_positions: int  # 77 for OpenAI CLIP
    eos_token_id: int  # 2 means the legacy rule: pool at argmax(input_ids)


@dataclass(frozen=True)
class ClipVisionConfig:
    tower: TowerConfig
    image_size: int
    patch_size: int
    channels: int = 3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ClipConfig:
    text: ClipTextConfig
    vision: ClipVisionConfig
    projection_dim: int


@dataclass(frozen=True)
class BertConfig:
    """A BERT-family encoder as sentence-transformers uses it (Transformer -> Pooling -> Normalize)."""

    tower: TowerConfig
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    pad_token_id: int
    max_seq_length: int  # truncation length for texts (sentence_bert_config.json)
    pooling: str  # "mean" | "cls" | "max"
    normalize: bool  # a Normalize module follows pooling


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelConfigError(f"{path} is missing; re-run `arrowengine convert` on the source checkpoint") from exc
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"{path} is not valid JSON: {exc}") from exc


def _get(cfg: dict[str, Any], key: str, default: Any, kind: type, where: str) -> Any:
    value = cfg.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ModelConfigError(f"{where}: {key} should be {kind.__name__}, got {value!r}")
    return value


def _tower(cfg: dict[str, Any], where: str, act_key: str, defaults: dict[str, Any]) -> TowerConfig:
    return TowerConfig(
        width=_get(cfg, "hidden_size", defaults["hidden_size"], int, where),
        layers=_get(cfg, "num_hidden_layers", defaults["num_hidden_layers"], int, where),
        heads=_get(cfg, "num_attention_heads", defaults["num_attention_heads"], int, where),
        mlp_width=_get(cfg, "intermediate_size", defaults["intermediate_size"], int, where),
        act=_get(cfg, act_key, defaults[act_key], str, where),
        eps=_get(cfg, "layer_norm_eps", defaults["layer_norm_eps"], float, where),
    )


# transformers' CLIPTextConfig / CLIPVisionConfig defaults, used when config.json omits a key.
_CLIP_TEXT_DEFAULTS = dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5)
_CLIP_VISION_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             hidden_act="quick_gelu", layer_norm_eps=1e-5)


def clip_config(model_dir: Path) -> ClipConfig:
    """Read a CLIPModel config.json."""
    cfg = _read_json(Path(model_dir) / "config.json")
    text = cfg.get("text_config") or {}
    vision = cfg.get("vision_config") or {}
    where = f"{model_dir}/config.json"
    text_cfg = ClipTextConfig(
        tower=_tower(text, where + " text_config", "hidden_act", _CLIP_TEXT_DEFAULTS),
        vocab_size=_get(text, "vocab_size", 49408, int, where),
        max_positions=_get(text, "max_position_embeddings", 77, int, where),
        eos_token_id=_get(text, "eos_token_id", 49407, int, where),
    )
    vision_cfg = ClipVisionConfig(
        tower=_tower(vision, where + " vision_config", "hidden_act", _CLIP_VISION_DEFAULTS),
        image_size=_get(vision, "image_size", 224, int, where),
        patch_size=_get(vision, "patch_size", 32, int, where),
        channels=_get(vision, "num_channels", 3, int, where),
    )
    if vision_cfg.image_size % vision_cfg.patch_size:
        raise ModelConfigError(f"{where}: image_size {vision_cfg.image_size} is not a multiple of patch_size "
                               f"{vision_cfg.patch_size}")
    return ClipConfig(text=text_cfg, vision=vision_cfg, projection_dim=_get(cfg, "projection_dim", 512, int, where))


_BERT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      hidden_act="gelu", layer_norm_eps=1e-12)


def bert_config(model_dir: Path) -> BertConfig:
    """Read a sentence-transformers BERT checkpoint: config.json, modules.json, pooling and max length."""
    model_dir = Path(model_dir)
    cfg = _read_json(model_dir / "config.json")
    where = f"{model_dir}/config.json"
    modules = _read_json(model_dir / "modules.json")
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unknown = [t for t in types if t not in ("Transformer", "Pooling", "Normalize")]
    if unknown or not types or types[0] != "Transformer":
        raise ModelConfigError(
            f"{model_dir}/modules.json: expected Transformer -> Pooling -> optional Normalize, got {types}; "
            "other sentence-transformers modules (Dense, ...) are not supported yet"
        )
    pooling, max_seq = "cls", None
    for m in modules:
        if str(m.get("type", "")).endswith("Pooling"):
            pool = _read_json(model_dir / m.get("path", "1_Pooling") / "config.json")
            modes = [k for k in ("pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_max_tokens",
                                 "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                                 "pooling_mode_lasttoken") if pool.get(k)]
            names = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                     "pooling_mode_max_tokens": "max"}
            if len(modes) != 1 or modes[0] not in names:
                raise ModelConfigError(f"{model_dir}: pooling {modes} is not supported; expected exactly one of "
                                       "mean, cls or max")
            pooling = names[modes[0]]
    st_cfg_path = model_dir / "sentence_bert_config.json"
    if st_cfg_path.exists():
        max_seq = _read_json(st_cfg_path).get("max_seq_length")
    max_positions = _get(cfg, "max_position_embeddings", 512, int, where)
    if not isinstance(max_seq, int) or max_seq <= 0:
        max_seq = max_positions
    return BertConfig(
        tower=_tower(cfg, where, "hidden_act", _BERT_DEFAULTS),
        vocab_size=_get(cfg, "vocab_size", 30522, int, where),
        max_positions=max_positions,
        type_vocab_size=_get(cfg, "type_vocab_size", 2, int, where),
        pad_token_id=_get(cfg, "pad_token_id", 0, int, where),
        max_seq_length=min(max_seq, max_positions),
        pooling=pooling,
        normalize="Normalize" in types,
    )
