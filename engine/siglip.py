"""SigLIP's dual encoders: a bidirectional text transformer pooled at its last position, and a ViT pooled by
an attention head; similarity is a sigmoid of the scaled cosine.

Reference: HF transformers ``models/siglip/modeling_siglip.py`` (SiglipModel, SiglipVisionModel,
SiglipTextModel) and ``configuration_siglip.py``. The fixed-resolution SigLIP 2 checkpoints (siglip2-*-patch16-224
...) ship as ``model_type: siglip`` with a Gemma tokenizer and run here unchanged; NaFlex SigLIP 2
(``models/siglip2``, ``model_type: siglip2``, variable resolution) is not implemented (engine.registry stores it).

How ours differs from transformers' (same maths):

* The blocks are CLIP's pre-LayerNorm blocks under the same names (engine.clip.CLIPEncoder); the patch
  embedding (a conv with stride = kernel, with a bias here) runs as a matmul over patches (engine.layers.PatchLinear).
* Text: SigLIP was trained on texts padded to 64 tokens with the pad token and no attention mask, and pools the
  LAST position, so the pooled state depends on the padding. transformers' pipeline pads with
  ``padding="max_length"``; the engine's rows come unpadded (grouped by length), so :class:`SiglipTextTransformer`
  pads every row to ``SiglipConfig.text_length`` with the tokenizer's pad id itself, and computes the last block
  at the pooled position only. The pad id is the tokenizer's (tokenizer_config.json's ``pad_token`` in
  tokenizer.json): SigLIP's T5-style SentencePiece pads with ``</s>`` (1), SigLIP 2's Gemma tokenizer with
  ``<pad>`` (0) while its config.json keeps the class default 1 (``<eos>`` there); config.json's
  ``text_config.pad_token_id`` is used only without tokenizer files.
* Image: the MAP head (``head``: a learned probe attending over the patches with torch's MultiheadAttention
  parameters ``in_proj_weight`` / ``in_proj_bias`` / ``out_proj``, then LayerNorm + MLP with a residual) gives
  the image embedding, as ``get_image_features``; the probe's query projection is computed once per batch.
* One tower alone (SiglipVisionModel, SiglipTextModel) is accepted in both layouts found in the wild: under its
  ``vision_model.`` / ``text_model.`` prefix (transformers 4 wrote that) or bare (transformers 5's
  save_pretrained writes ``embeddings.*``, ``encoder.*``, ``head.*`` ...).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.clip import CLIPMLP, CLIPEncoder
from engine.config import (MAX_LAYERS, TowerConfig, config_dict, config_eps, config_size, config_value,
                           model_max_length, read_json, tokenizer_config)
from engine.config_check import CountCheck, ShapeCheck, check_config_against_weights
from engine.errors import ModelConfigError
from engine.layers import Embedding, LayerNorm, Linear, PatchLinear, attention, linear, meta_parameter
from engine.registry import ImageSide, Parts, TextSide

log = logging.getLogger(__name__)

# config.json model_type of a SiglipModel and of one tower saved alone
SIGLIP, SIGLIP_TEXT_TOWER, SIGLIP_VISION_TOWER = "siglip", "siglip_text_model", "siglip_vision_model"

# transformers' SiglipTextConfig / SiglipVisionConfig defaults, used when config.json omits a key
_TEXT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vocab_size=32000,
                      max_position_embeddings=64, pad_token_id=1)
_VISION_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, image_size=224, patch_size=16,
                        num_channels=3)


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class SiglipTextConfig:
    tower: TowerConfig
    vocab_size: int
    max_positions: int  # rows of the position table (64)
    projection_size: int  # width of ``head``: the text embedding


@dataclass(frozen=True)
class SiglipVisionConfig:
    tower: TowerConfig
    image_size: int
    patch_size: int
    channels: int = 3

    @property
    def grid(self) -> int:
        """Patches per side; pixels past grid * patch_size are dropped, as HF's strided conv does."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class SiglipConfig:
    """A SiglipModel (both towers), or SiglipVisionModel (text None) / SiglipTextModel (vision None)."""

    text: SiglipTextConfig | None
    vision: SiglipVisionConfig | None
    text_length: int = 64  # every text is padded (and cut) to this many tokens: the tokenizer's max_length
    pad_id: int = 1  # the id texts are padded with

    @property
    def dim(self) -> int:
        """Embedding width: the vision tower's (its head keeps the width), else the text head's."""
        return self.vision.tower.width if self.vision is not None else self.text.projection_size


def siglip_config(model_dir: Path) -> SiglipConfig:
    """Read and check the config.json of a SiglipModel, SiglipVisionModel or SiglipTextModel, and the text length
    and pad id from the tokenizer files beside it.

    Raises:
        ModelConfigError: a missing or invalid field (the message names the file and the field), a vision tower
            without its pooling head, or text and image embeddings of different widths.
    """
    model_dir = Path(model_dir)
    cfg = read_json(model_dir, "config.json")
    where = f"{model_dir}/config.json"
    model_type = cfg.get("model_type", SIGLIP)
    if model_type == SIGLIP_TEXT_TOWER:
        text, vision = cfg, None
    elif model_type == SIGLIP_VISION_TOWER:
        text, vision = None, cfg
    elif model_type == SIGLIP:
        text, vision = config_dict(cfg, "text_config", where), config_dict(cfg, "vision_config", where)
    else:
        raise ModelConfigError(f"{where}: model_type {model_type!r} is not a SigLIP model; expected one of "
                               f"{[SIGLIP, SIGLIP_VISION_TOWER, SIGLIP_TEXT_TOWER]} (NaFlex SigLIP 2, 'siglip2', "
                               "converts in store mode only)")
    where_text = where + ("" if text is cfg else " text_config")
    text_cfg = None if text is None else _text(text, where_text)
    vision_cfg = None if vision is None else _vision(vision, where + ("" if vision is cfg else " vision_config"))
    if text_cfg is not None and vision_cfg is not None and text_cfg.projection_size != vision_cfg.tower.width:
        raise ModelConfigError(f"{where}: text_config.projection_size {text_cfg.projection_size} differs from "
                               f"vision_config.hidden_size {vision_cfg.tower.width}: SiglipModel compares text and "
                               "image embeddings of one width")
    if text_cfg is None:
        return SiglipConfig(text=None, vision=vision_cfg)
    config_pad = (_TEXT_DEFAULTS["pad_token_id"] if text.get("pad_token_id") is None  # null: the class default
                  else config_size(text, "pad_token_id", None, where_text, minimum=0))
    return SiglipConfig(text=text_cfg, vision=vision_cfg,
                        text_length=model_max_length(model_dir, text_cfg.max_positions),
                        pad_id=text_pad_id(model_dir, config_pad, text_cfg.vocab_size))


def _tower(cfg: dict[str, Any], where: str, defaults: dict[str, Any]) -> TowerConfig:
    width = config_size(cfg, "hidden_size", defaults["hidden_size"], where)
    heads = config_size(cfg, "num_attention_heads", defaults["num_attention_heads"], where)
    if width % heads:
        raise ModelConfigError(f"{where}: hidden_size {width} is not divisible by num_attention_heads {heads}")
    act = config_value(cfg, "hidden_act", defaults["hidden_act"], str, where)
    return TowerConfig(width=width, heads=heads, act=act,
                       layers=config_size(cfg, "num_hidden_layers", defaults["num_hidden_layers"], where,
                                          maximum=MAX_LAYERS),
                       mlp_width=config_size(cfg, "intermediate_size", defaults["intermediate_size"], where),
                       eps=config_eps(cfg, "layer_norm_eps", defaults["layer_norm_eps"], where))


def _text(text: dict[str, Any], where: str) -> SiglipTextConfig:
    tower = _tower(text, where, _TEXT_DEFAULTS)
    projection = text.get("projection_size")  # transformers: None means hidden_size
    return SiglipTextConfig(
        tower=tower,
        vocab_size=config_size(text, "vocab_size", _TEXT_DEFAULTS["vocab_size"], where),
        max_positions=config_size(text, "max_position_embeddings", _TEXT_DEFAULTS["max_position_embeddings"], where),
        projection_size=tower.width if projection is None else config_size(text, "projection_size", None, where),
    )


def _vision(vision: dict[str, Any], where: str) -> SiglipVisionConfig:
    if vision.get("vision_use_head", True) is not True:
        raise ModelConfigError(f"{where}: vision_use_head is {vision.get('vision_use_head')!r}: without its "
                               "attention-pooling head a SigLIP vision tower gives no image embedding (its "
                               "pooler_output is None); expected true")
    cfg = SiglipVisionConfig(
        tower=_tower(vision, where, _VISION_DEFAULTS),
        image_size=config_size(vision, "image_size", _VISION_DEFAULTS["image_size"], where),
        patch_size=config_size(vision, "patch_size", _VISION_DEFAULTS["patch_size"], where),
        channels=config_size(vision, "num_channels", _VISION_DEFAULTS["num_channels"], where),
    )
    if cfg.grid < 1:
        raise ModelConfigError(f"{where}: image_size {cfg.image_size} is smaller than patch_size {cfg.patch_size}")
    return cfg


def text_pad_id(model_dir: Path, config_pad: int, vocab_size: int) -> int:
    """The id texts are padded with, as transformers' tokenizer pads them: the ``pad_token`` of
    tokenizer_config.json (else special_tokens_map.json) looked up in tokenizer.json; ``config_pad`` (config.json's
    ``pad_token_id``) when there is no tokenizer.json or it names no pad token.

    Raises:
        ModelConfigError: the tokenizer's pad id is outside the text tower's vocabulary.
    """
    token = _token_text(tokenizer_config(model_dir).get("pad_token"))
    if token is None:
        token = _token_text((read_json(model_dir, "special_tokens_map.json", optional=True) or {}).get("pad_token"))
    if token is None:
        return config_pad
    pad = _tokenizer_json_id(model_dir, token)
    if pad is None:
        log.debug("%s: pad token %r not found (no tokenizer.json?): padding with config.json's pad_token_id %d",
                  model_dir, token, config_pad)
        return config_pad
    if pad >= vocab_size:
        raise ModelConfigError(f"{model_dir}: the tokenizer's pad token {token!r} is id {pad}, outside the text "
                               f"tower's vocabulary of {vocab_size} (config.json vocab_size); the tokenizer files "
                               "do not belong to this model")
    if pad != config_pad:
        log.info("%s: texts are padded with the tokenizer's pad token %r (id %d), as transformers pads them, not "
                 "config.json's pad_token_id %d", model_dir, token, pad, config_pad)
    return pad


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer files write it: a string, or an AddedToken object with its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _tokenizer_json_id(model_dir: Path, token: str) -> int | None:
    """The id of ``token`` in the folder's tokenizer.json (its added tokens, else the model's vocabulary); None
    without the file or the token.

    The added tokens come before the vocabulary in the files the tokenizers library writes, so only that list is
    decoded when it holds the token (a Gemma tokenizer.json is ~34 MB: parsed whole only when it must be).
    """
    from engine.files import MAX_TOKENIZER_BYTES, read_model_file

    data = read_model_file(model_dir, "tokenizer.json", MAX_TOKENIZER_BYTES, "the model's tokenizer", optional=True)
    if data is None:
        return None
    text = data.decode("utf-8", errors="replace")
    key = text.find('"added_tokens"')
    if key >= 0:
        start = text.find("[", key)
        try:
            added, _ = json.JSONDecoder().raw_decode(text, start)
        except ValueError:
            added = None
        found = _added_id(added, token)
        if found is not None:
            return found
    try:
        tok = json.loads(text)
    except ValueError as exc:
        raise ModelConfigError(f"{model_dir}/tokenizer.json is not JSON: {exc}") from exc
    found = _added_id(tok.get("added_tokens") if isinstance(tok, dict) else None, token)
    if found is not None:
        return found
    vocab = (tok.get("model") or {}).get("vocab") if isinstance(tok, dict) else None
    if isinstance(vocab, dict):  # BPE / WordPiece / WordLevel: token -> id
        value = vocab.get(token)
        return value if isinstance(value, int) else None
    if isinstance(vocab, list):  # Unigram: [token, score] at its id
        return next((i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry and entry[0] == token),
                    None)
    return None


def _added_id(added: Any, token: str) -> int | None:
    if not isinstance(added, list):
        return None
    for entry in added:
        if isinstance(entry, dict) and entry.get("content") == token and isinstance(entry.get("id"), int):
            return entry["id"]
    return None


# ---------------------------------------------------------------- text tower


class _TextEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipTextConfig) -> None:
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.tower.width)
        self.position_embedding = Embedding(cfg.max_positions, cfg.tower.width)


class SiglipTextTransformer(nn.Module):
    """Bidirectional text tower without an attention mask, pooled at its last position, then ``head``."""

    INT8_KEEP_LAST_BLOCK = True  # see engine/quantize.py; used when this tower is the whole net
    def __init__(self, cfg: SiglipTextConfig, length: int, pad_id: int) -> None:
        super().__init__()
        self.cfg, self.length, self.pad_id = cfg, length, pad_id
        self.embeddings = _TextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg.tower)
        self.final_layer_norm = LayerNorm(cfg.tower.width, cfg.tower.eps)
        self.head = Linear(cfg.tower.width, cfg.projection_size)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded (T <= length), lengths (B,) -> (B, projection_size).

        Every row is padded to ``length`` tokens with the pad id, as transformers' ``padding="max_length"``:
        with no attention mask the padding is part of the input and the last position is pooled.
        """
        B, T = ids.shape
        L = self.length
        real = torch.arange(T, device=ids.device)[None, :] < lengths[:, None]  # (B, T)
        full = ids.new_full((B, L), self.pad_id)  # (B, L)
        full[:, :min(T, L)] = torch.where(real, ids, self.pad_id)[:, :L]
        e = self.embeddings
        x = e.token_embedding(full) + e.position_embedding.weight[:L]  # (B, L, C)
        last = torch.full((B,), L - 1, dtype=torch.long, device=ids.device)
        x = self.encoder(x, causal=False, rows=last)  # (B, C): the last position only
        return self.head(self.final_layer_norm(x))  # (B, P)

    encode_text = forward


# ---------------------------------------------------------------- vision tower


class _PatchLinear(PatchLinear):
    """engine.layers.PatchLinear with the conv's bias (SigLIP's patch embedding has one, CLIP's none)."""

    def __init__(self, channels: int, n_out: int, patch: int) -> None:
        super().__init__(channels, n_out, patch)
        self._parameters["bias"] = meta_parameter(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight.flatten(1), self.bias)


class _VisionEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.patch, self.grid = cfg.patch_size, cfg.grid
        self.patch_embedding = _PatchLinear(cfg.channels, cfg.tower.width, cfg.patch_size)
        self.position_embedding = Embedding(cfg.grid * cfg.grid, cfg.tower.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, ch, H, W) -> patch embeddings + positions (B, g*g, C), no class token."""
        B, ch = pixels.shape[:2]
        g, p = self.grid, self.patch
        # pixels past g*p (a size not divisible by p) are dropped, as the strided conv does
        x = pixels[:, :, :g * p, :g * p].to(self.position_embedding.weight.dtype).reshape(B, ch, g, p, g, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, ch * p * p)  # (B, g*g, ch*p*p), patch-major
        return self.patch_embedding(x) + self.position_embedding.weight  # (B, g*g, C)


class _MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention's parameters under its names: q, k, v stacked in ``in_proj_*``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_proj_weight = meta_parameter(3 * width, width)
        self.in_proj_bias = meta_parameter(3 * width)
        self.out_proj = Linear(width, width)


class MultiheadAttentionPoolingHead(nn.Module):
    """The MAP head: a learned probe attends over the tokens, then x + mlp(layernorm(x)) -> (B, C)."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.probe = meta_parameter(1, 1, cfg.width)
        self.attention = _MultiheadAttention(cfg.width)
        self.layernorm = LayerNorm(cfg.width, cfg.eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) -> (B, C)."""
        B, _, C = x.shape
        w, b = self.attention.in_proj_weight, self.attention.in_proj_bias
        q = linear(self.probe[0], w[:C], b[:C]).expand(B, 1, C)  # (B, 1, C): the same query for every image
        k, v = linear(x, w[C:], b[C:]).chunk(2, dim=-1)  # (B, N, C) each
        y = self.attention.out_proj(attention(q, k, v, self.heads))  # (B, 1, C)
        y = y + self.mlp(self.layernorm(y))  # (B, 1, C)
        return y[:, 0]


class SiglipVisionTransformer(nn.Module):
    """ViT without a class token: patches + positions -> blocks -> post-LN -> MAP head."""

    INT8_KEEP_LAST_BLOCK = True  # see engine/quantize.py; used when this tower is the whole net

    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = _VisionEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg.tower)
        self.post_layernorm = LayerNorm(cfg.tower.width, cfg.tower.eps)
        self.head = MultiheadAttentionPoolingHead(cfg.tower)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, ch, S, S) normalized -> (B, C), the pooler output."""
        x = self.encoder(self.embeddings(pixels), causal=False)  # (B, g*g, C)
        return self.head(self.post_layernorm(x))  # (B, C)

    encode_image = forward


# ---------------------------------------------------------------- the model


class Siglip(nn.Module):
    """Towers under their checkpoint prefixes: SiglipModel's two, or one tower saved as transformers 4 saved
    SiglipVisionModel / SiglipTextModel (``vision_model.*`` / ``text_model.*``)."""

    INT8_KEEP_LAST_BLOCK = True  # see engine/quantize.py

    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.text is not None:
            self.text_model = SiglipTextTransformer(cfg.text, cfg.text_length, cfg.pad_id)
        if cfg.vision is not None:
            self.vision_model = SiglipVisionTransformer(cfg.vision)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.text_model(ids, lengths)  # (B, D)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixels)  # (B, D)


class SiglipModel(Siglip):
    """SiglipModel: both towers, and ``logit_scale`` / ``logit_bias`` for its sigmoid similarity."""

    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__(cfg)
        self.logit_scale = meta_parameter(1)
        self.logit_bias = meta_parameter(1)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """SigLIP's score of L2-normalized embeddings a (N, D) and b (M, D): sigmoid(exp(logit_scale) a b^T +
        logit_bias), (N, M) float32, as ``torch.sigmoid(logits_per_text)`` for texts a and images b."""
        with torch.inference_mode():
            scale = self.logit_scale.detach().float().cpu().exp()
            bias = self.logit_bias.detach().float().cpu()
            cos = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) @
                                   np.ascontiguousarray(b, dtype=np.float32).T)
            return torch.sigmoid(cos * scale + bias).numpy()


def build(cfg: SiglipConfig, prefixed: bool) -> nn.Module:
    """The network for ``cfg``: SiglipModel; one tower under its prefix (``prefixed``); or the bare tower."""
    if cfg.text is not None and cfg.vision is not None:
        return SiglipModel(cfg)
    if prefixed:
        return Siglip(cfg)
    if cfg.vision is not None:
        return SiglipVisionTransformer(cfg.vision)
    return SiglipTextTransformer(cfg.text, cfg.text_length, cfg.pad_id)


def load_parts(path: Path, shapes: Mapping[str, tuple[int, ...]], weights: str = "weights.arrow") -> Parts:
    """The SigLIP model of a converted folder: its config read and checked against the weights' ``shapes``, the
    network built (parameters on the meta device), and what the engine's front ends need. ``weights``: the
    weight file's name, for messages."""
    cfg = siglip_config(path)
    both = cfg.text is not None and cfg.vision is not None
    prefixed = both or any(name.startswith(("text_model.", "vision_model.")) for name in shapes)
    check_config_against_weights(*weight_checks(cfg, prefixed), shapes, path, weights)
    text = image = None
    if cfg.text is not None:
        # Rows need no pad cut (TextSide.pad_id): the tower pads every row to text_length with the pad id, so a
        # token row with or without its trailing pads gives the same embedding (and SigLIP's pad is its
        # end-of-text token: a row of pad ids only, "" tokenized, is a real input).
        # The tower pads every row to text_length itself (fixed_length): rows are grouped by count, not length
        # (32 texts at so400m's width: 4 length groups 1.83 s, one group 1.17 s).
        text = TextSide(max_length=cfg.text_length, max_tokens=cfg.text_length, vocab_size=cfg.text.vocab_size,
                        tokenizer_required=False, fixed_length=True)
    if cfg.vision is not None:
        image = ImageSide(size=cfg.vision.image_size, channels=cfg.vision.channels, tokens=cfg.vision.grid ** 2,
                          processor="siglip")
    return Parts(net=build(cfg, prefixed), config=cfg, dim=cfg.dim, text=text, image=image)


def weight_checks(cfg: SiglipConfig, prefixed: bool = True) -> tuple[list[CountCheck], list[ShapeCheck]]:
    """The block counts and tensor shapes ``cfg`` makes, checked against the weight file before the build;
    ``prefixed``: tensors named under ``text_model.`` / ``vision_model.`` (else one bare tower)."""
    counts, checks, conf = [], [], "config.json"
    towers = []
    if cfg.text is not None:
        t = cfg.text
        towers.append(("text", "text_model." if prefixed else "", t.tower, [
            ("embeddings.token_embedding.weight", (("vocab_size", t.vocab_size), None)),
            ("embeddings.position_embedding.weight", (("max_position_embeddings", t.max_positions), None)),
            ("head.weight", (("projection_size", t.projection_size), None)),
        ]))
    if cfg.vision is not None:
        v = cfg.vision
        w = v.tower.width
        towers.append(("vision", "vision_model." if prefixed else "", v.tower, [
            ("embeddings.patch_embedding.weight", (None, ("num_channels", v.channels), ("patch_size", v.patch_size),
                                                   ("patch_size", v.patch_size))),
            ("embeddings.position_embedding.weight",
             ((f"image_size {v.image_size} / patch_size {v.patch_size} (positions: {v.grid}²)", v.grid * v.grid),
              None)),
            ("head.probe", (("the probe's leading size", 1), ("the probe's leading size", 1), None)),
            ("head.attention.in_proj_weight", ((f"3 x hidden_size {w}", 3 * w), None)),
            ("head.mlp.fc1.weight", (("intermediate_size", v.tower.mlp_width), None)),
        ]))
    for tower, prefix, tc, own in towers:
        label = f"the {tower} tower's " if cfg.text is not None and cfg.vision is not None else ""
        width = (label + "hidden_size", tc.width)
        counts.append(CountCheck(f"{prefix}encoder.layers.", (label + "num_hidden_layers", tc.layers), conf))
        for name, dims in own:
            checks.append(ShapeCheck(prefix + name, tuple(width if d is None else (label + d[0], d[1]) for d in dims),
                                     conf))
        checks.append(ShapeCheck(f"{prefix}encoder.layers.0.mlp.fc1.weight",
                                 ((label + "intermediate_size", tc.mlp_width), width), conf))
    return counts, checks
