"""CLIP's dual encoders: a causal text transformer and a ViT, each with a projection.

Reference: HF transformers ``models/clip/modeling_clip.py`` (CLIPModel). Module
attribute names equal the checkpoint keys (``text_model.encoder.layers.0.self_attn.q_proj``
...), so the state dict from the weight file assigns directly.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from engine.config import ClipConfig, ClipTextConfig, ClipVisionConfig, TowerConfig, clip_config, model_max_length
from engine.config_check import CountCheck, ShapeCheck, check_config_against_weights
from engine.registry import ImageSide, Parts, TextSide
from engine.layers import (Embedding, LayerNorm, Linear, PatchLinear, activation, attention, linear_act, meta_parameter,
                           project_qkv)


class CLIPAttention(nn.Module):
    QKV = ("q_proj", "k_proj", "v_proj")  # engine.quantize may replace these by one fused ``qkv``

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = Linear(cfg.width, cfg.width)
        self.k_proj = Linear(cfg.width, cfg.width)
        self.v_proj = Linear(cfg.width, cfg.width)
        self.out_proj = Linear(cfg.width, cfg.width)
        self.qkv: nn.Module | None = None

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        q, k, v = project_qkv(self, x)  # (B, T, C) each
        return self.out_proj(attention(q, k, v, self.heads, causal=causal))  # (B, T, C)

    def forward_row(self, x: torch.Tensor, rows: torch.Tensor, causal: bool) -> torch.Tensor:
        """The output at one position per sequence, ``rows`` (B,), attending to every key it may see."""
        B, T, _ = x.shape
        pick = torch.arange(B, device=x.device), rows
        if self.qkv is None:  # separate projections: q for that row only
            q, k, v = self.q_proj(x[pick][:, None]), self.k_proj(x), self.v_proj(x)  # (B, 1, C), (B, T, C) x2
        else:
            q, k, v = project_qkv(self, x)
            q = q[pick][:, None]  # (B, 1, C)
        mask = (torch.arange(T, device=x.device)[None, :] <= rows[:, None])[:, None, None] if causal else None
        return self.out_proj(attention(q, k, v, self.heads, mask=mask))  # (B, 1, C)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.act_name = cfg.act
        self.act = activation(cfg.act)
        self.fc1 = Linear(cfg.width, cfg.mlp_width)
        self.fc2 = Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(linear_act(self.fc1, x, self.act_name, self.act))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.width, cfg.eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = LayerNorm(cfg.width, cfg.eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)  # (B, T, C)
        return x + self.mlp(self.layer_norm2(x))  # (B, T, C)

    def forward_row(self, x: torch.Tensor, rows: torch.Tensor, causal: bool) -> torch.Tensor:
        """This block's output at position ``rows[b]`` of each sequence only: (B, 1, C)."""
        y = x[torch.arange(x.shape[0], device=x.device), rows][:, None]  # (B, 1, C)
        y = y + self.self_attn.forward_row(self.layer_norm1(x), rows, causal)
        return y + self.mlp(self.layer_norm2(y))  # (B, 1, C)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor, causal: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with ``rows`` (B,), only the positions the tower pools: (B, C).

        Only the pooled position of the last block's output is used, so that block computes keys and values
        for every position but attention, out_proj and MLP for one row (B/32: ~7 % of the tower's FLOPs).
        """
        if rows is None:
            for layer in self.layers:
                x = layer(x, causal)
            return x
        for layer in self.layers[:-1]:
            x = layer(x, causal)
        return self.layers[-1].forward_row(x, rows, causal)[:, 0]  # (B, C)


class _TextEmbeddings(nn.Module):
    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.tower.width)
        self.position_embedding = Embedding(cfg.max_positions, cfg.tower.width)


class CLIPTextTransformer(nn.Module):
    """Causal text tower; pools the hidden state at the end-of-text token."""

    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = _TextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg.tower)
        self.final_layer_norm = LayerNorm(cfg.tower.width, cfg.tower.eps)

    def forward(self, ids: torch.Tensor, eos_pos: torch.Tensor) -> torch.Tensor:
        """ids (B, T) int64 right-padded; eos_pos (B,) the position to pool. Returns (B, C)."""
        T = ids.shape[1]
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding.weight[:T]  # (B, T, C)
        # Causal attention: padding after the end-of-text token cannot reach the pooled position.
        x = self.encoder(x, causal=True, rows=eos_pos)  # (B, C) at the end-of-text positions
        return self.final_layer_norm(x)


class _VisionEmbeddings(nn.Module):
    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.patch, self.grid = cfg.patch_size, cfg.grid
        self.class_embedding = meta_parameter(cfg.tower.width)
        self.patch_embedding = PatchLinear(cfg.channels, cfg.tower.width, cfg.patch_size)
        self.position_embedding = Embedding(cfg.grid * cfg.grid + 1, cfg.tower.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        B, ch = pixels.shape[:2]
        g, p = self.grid, self.patch
        # A conv with stride == kernel is a matmul over non-overlapping patches; as one it is 2-5x faster than
        # the CPU conv kernel at batch 1. Pixels past g*p (a size not divisible by p) are dropped, as conv does.
        x = pixels[:, :, :g * p, :g * p].to(self.class_embedding.dtype).reshape(B, ch, g, p, g, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, ch * p * p)  # (B, g*g, ch*p*p), patch-major
        x = self.patch_embedding(x)  # (B, g*g, C)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)  # (B, 1, C)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, 1+g*g, C)


class CLIPVisionTransformer(nn.Module):
    """ViT: patches + class token -> pre-LN -> blocks -> post-LN on the class token."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = _VisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.tower.width, cfg.tower.eps)  # (sic) the checkpoint's spelling
        self.encoder = CLIPEncoder(cfg.tower)
        self.post_layernorm = LayerNorm(cfg.tower.width, cfg.tower.eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) normalized. Returns (B, C) pooled class tokens."""
        x = self.pre_layrnorm(self.embeddings(pixels))  # (B, 1+g*g, C)
        cls = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x = self.encoder(x, causal=False, rows=cls)  # (B, C): the class token's output
        return self.post_layernorm(x)  # (B, C)


class CLIP(nn.Module):
    """CLIPModel without the training-only parts; ``logit_scale`` is kept for similarity. With one tower in
    ``cfg`` (the other None), CLIPTextModelWithProjection or CLIPVisionModelWithProjection: same module names,
    no logit_scale."""

    INT8_KEEP_LAST_BLOCK = False  # see engine/quantize.py: no accuracy gain for CLIP, 8 % slower

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.text is not None:
            self.text_model = CLIPTextTransformer(cfg.text)
            self.text_projection = Linear(cfg.text.tower.width, cfg.projection_dim, bias=False)
        if cfg.vision is not None:
            self.vision_model = CLIPVisionTransformer(cfg.vision)
            self.visual_projection = Linear(cfg.vision.tower.width, cfg.projection_dim, bias=False)
        if cfg.text is not None and cfg.vision is not None:
            self.logit_scale = meta_parameter()

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) -> (B, D), pooled at each row's end-of-text token."""
        eos = self.cfg.text.eos_token_id
        if eos == 2:  # legacy configs: HF pools at the highest id, which is end-of-text
            pos = ids.argmax(dim=-1)
        else:
            real = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
            pos = ((ids == eos) & real).int().argmax(dim=-1)  # the first end-of-text token
        return self.text_projection(self.text_model(ids, pos))  # (B, D)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixels))  # (B, D)


def load_parts(path: Path, shapes: Mapping[str, tuple[int, ...]], weights: str = "weights.arrow") -> Parts:
    """The CLIP model of a converted folder: its config read and checked against the weights' ``shapes``, the
    towers built (parameters on the meta device), and what the engine's front ends need. ``weights``: the
    weight file's name, for messages."""
    cfg = clip_config(path)
    check_config_against_weights(*weight_checks(cfg), shapes, path, weights)
    text = image = None
    if cfg.text is not None:
        t = cfg.text
        text = TextSide(max_length=model_max_length(path, t.max_positions), max_tokens=t.max_positions,
                        vocab_size=t.vocab_size, eos_id=None if t.eos_token_id == 2 else t.eos_token_id,
                        tokenizer_required=False)
    if cfg.vision is not None:
        image = ImageSide(size=cfg.vision.image_size, channels=cfg.vision.channels, tokens=cfg.vision.grid ** 2 + 1)
    return Parts(net=CLIP(cfg), config=cfg, dim=cfg.projection_dim, text=text, image=image)


def weight_checks(cfg: ClipConfig) -> tuple[list[CountCheck], list[ShapeCheck]]:
    """The block counts and tensor shapes ``cfg`` makes, checked against the weight file before the build."""
    counts, checks, conf = [], [], "config.json"
    towers = []
    if cfg.text is not None:
        t = cfg.text
        towers.append(("text", "text_model", t.tower, [
            ("embeddings.token_embedding.weight", (("vocab_size", t.vocab_size), None)),
            ("embeddings.position_embedding.weight", (("max_position_embeddings", t.max_positions), None)),
        ], "text_projection"))
    if cfg.vision is not None:
        v = cfg.vision
        towers.append(("vision", "vision_model", v.tower, [
            ("embeddings.patch_embedding.weight", (None, ("num_channels", v.channels), ("patch_size", v.patch_size),
                                                   ("patch_size", v.patch_size))),
            ("embeddings.position_embedding.weight",
             ((f"image_size {v.image_size} / patch_size {v.patch_size} (positions: {v.grid}² + 1)",
               v.grid * v.grid + 1), None)),
            ("embeddings.class_embedding", (None,)),
        ], "visual_projection"))
    for tower, prefix, tc, own, projection in towers:
        label = f"the {tower} tower's "
        width = (label + "hidden_size", tc.width)
        counts.append(CountCheck(f"{prefix}.encoder.layers.", (label + "num_hidden_layers", tc.layers), conf))
        for name, dims in own:
            checks.append(ShapeCheck(f"{prefix}.{name}", tuple(width if d is None else (label + d[0], d[1])
                                                                 for d in dims), conf))
        checks.append(ShapeCheck(f"{prefix}.encoder.layers.0.mlp.fc1.weight",
                                  ((label + "intermediate_size", tc.mlp_width), width), conf))
        checks.append(ShapeCheck(f"{projection}.weight", (("projection_dim", cfg.projection_dim), width), conf))
    return counts, checks
