"""A BERT-family encoder as used by sentence-transformers (e.g. all-MiniLM-L6-v2).

Reference: HF transformers ``models/bert/modeling_bert.py`` (BertModel) and
sentence-transformers' Pooling / Normalize modules. Post-LayerNorm blocks;
module names equal the checkpoint keys (``encoder.layer.0.attention.self.query``).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.config import BertConfig, TowerConfig
from engine.layers import Embedding, LayerNorm, Linear, activation, attention, project_qkv


class _SelfAttention(nn.Module):
    QKV = ("query", "key", "value")  # engine.quantize may replace these by one fused ``qkv``

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.query = Linear(cfg.width, cfg.width)
        self.key = Linear(cfg.width, cfg.width)
        self.value = Linear(cfg.width, cfg.width)
        self.qkv: nn.Module | None = None


class _DenseNorm(nn.Module):
    def __init__(self, n_in: int, cfg: TowerConfig) -> None:
        super().__init__()
        self.dense = Linear(n_in, cfg.width)
        self.LayerNorm = LayerNorm(cfg.width, cfg.eps)


class _Attention(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _DenseNorm(cfg.width, cfg)


class _Intermediate(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.width, cfg.mlp_width)


class BertLayer(nn.Module):
    """Post-LayerNorm block: x = ln(x + attn(x)); x = ln(x + mlp(x))."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.act = activation(cfg.act)
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg.mlp_width, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = project_qkv(self.attention.self, x)  # (B, T, C) each
        y = attention(q, k, v, self.heads, mask=mask)  # (B, T, C)
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(y))  # (B, T, C)
        h = self.act(self.intermediate.dense(x))  # (B, T, M)
        return self.output.LayerNorm(x + self.output.dense(h))  # (B, T, C)


class _Encoder(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.layers))


class _Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.tower.width)
        self.position_embeddings = Embedding(cfg.max_positions, cfg.tower.width)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.tower.width)
        self.LayerNorm = LayerNorm(cfg.tower.width, cfg.tower.eps)


class SentenceBert(nn.Module):
    """BertModel + sentence-transformers pooling. ``forward`` returns pooled (B, C), not normalized."""

    INT8_KEEP_LAST_BLOCK = True  # see engine/quantize.py: MiniLM min cosine 0.9938 -> 0.9952

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg.tower)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded; lengths (B,) real token counts. Returns (B, C)."""
        B, T = ids.shape
        e = self.embeddings
        x = e.word_embeddings(ids) + self._positions(ids) + e.token_type_embeddings.weight[0]  # (B, T, C)
        x = e.LayerNorm(x)
        keep = torch.arange(T, device=ids.device)[None, :] < lengths[:, None]  # (B, T) True = real token
        mask = None if bool(keep.all()) else keep[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return self._pool(x, keep)

    def _positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Position embeddings, (T, C) or (B, T, C). BERT: rows 0..T-1. RoBERTa / XLM-R (HF's
        ``create_position_ids_from_input_ids``): a token that is not ``pad_token_id`` takes row pad + 1 + (its
        index among such tokens), a pad token row pad (ids right-padded with 0 here are masked out anyway)."""
        table = self.embeddings.position_embeddings.weight
        if not self.cfg.position_offset:
            return table[: ids.shape[1]]
        pad = self.cfg.pad_token_id
        real = (ids != pad).long()
        return table[real.cumsum(dim=1) * real + pad]

    def _pool(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """sentence-transformers' Pooling over the real tokens (``keep``), (B, T, C) -> (B, C)."""
        mode = self.cfg.pooling
        if mode == "cls":
            return x[:, 0]
        k = keep[:, :, None].to(x.dtype)  # (B, T, 1)
        if mode == "max":
            return x.masked_fill(k == 0, float("-inf")).amax(dim=1)
        if mode == "lasttoken":
            return x[torch.arange(x.shape[0], device=x.device), keep.sum(dim=1) - 1]
        if mode == "weightedmean":  # weights 1..n over the real tokens
            k = k * torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        total = (x * k).sum(dim=1)  # (B, C)
        count = k.sum(dim=1).clamp(min=1e-9)  # (B, 1)
        return total / (count.sqrt() if mode == "mean_sqrt_len_tokens" else count)
