"""A BERT-family encoder as used by sentence-transformers (e.g. all-MiniLM-L6-v2, all-mpnet-base-v2).

Reference: HF transformers ``models/bert/modeling_bert.py`` (BertModel), ``models/mpnet/modeling_mpnet.py``
(MPNetModel) and sentence-transformers' Pooling / Dense / Normalize modules. Post-LayerNorm blocks; module names
equal the checkpoint keys (BERT ``encoder.layer.0.attention.self.query``, MPNet
``encoder.layer.0.attention.attn.q``). MPNet adds a learned bias per head and relative-position bucket to
every attention score, shared by all layers. DistilBERT (``models/distilbert/modeling_distilbert.py``) is
BERT's block under other names (``transformer.layer.0.attention.q_lin``), with no token types. ALBERT
(``models/albert/modeling_albert.py``) embeds at a narrower width, maps it up
(``encoder.embedding_hidden_mapping_in``), and reuses its blocks: layer i runs group
``int(i / (num_hidden_layers / num_hidden_groups))`` of ``encoder.albert_layer_groups``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from engine.config import MPNET_BUCKETS, BertConfig, TowerConfig, bert_config
from engine.config_check import CountCheck, ShapeCheck, check_config_against_weights, dense_checks
from engine.registry import Parts, TextSide
from engine.layers import Embedding, LayerNorm, Linear, StDense, activation, attention, linear_act, project_qkv, st_pool

log = logging.getLogger(__name__)


class _Projections(nn.Module):
    """Square Linears under the checkpoint's ``names``; the first three are q, k, v (``QKV``, which
    engine.quantize may replace by one fused ``qkv``), a fourth, if any, the attention output."""

    def __init__(self, cfg: TowerConfig, names: tuple[str, ...]) -> None:
        super().__init__()
        self.QKV = names[:3]
        for name in names:
            setattr(self, name, Linear(cfg.width, cfg.width))
        self.qkv: nn.Module | None = None


class _DenseNorm(nn.Module):
    def __init__(self, n_in: int, cfg: TowerConfig) -> None:
        super().__init__()
        self.dense = Linear(n_in, cfg.width)
        self.LayerNorm = LayerNorm(cfg.width, cfg.eps)


class _Attention(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.self = _Projections(cfg, ("query", "key", "value"))
        self.output = _DenseNorm(cfg.width, cfg)


class _Intermediate(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.width, cfg.mlp_width)


class _PostNormBlock(nn.Module):
    """Post-LayerNorm block: x = ln1(x + out(attn(x))); x = ln2(x + fc2(act(fc1(x)))). Subclasses hold the
    modules under their checkpoint's names and say which is which in :meth:`parts` (looked up on every call:
    engine.quantize and engine.packing replace Linears in place)."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.act_name = cfg.act
        self.act = activation(cfg.act)

    def parts(self) -> tuple[nn.Module, ...]:
        """(q/k/v holder, attention out, ln1, fc1, fc2, ln2)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        qkv, out, ln1, fc1, fc2, ln2 = self.parts()
        q, k, v = project_qkv(qkv, x)  # (B, T, C) each
        y = attention(q, k, v, self.heads, mask=mask)  # (B, T, C)
        x = ln1(x + out(y))  # (B, T, C)
        h = linear_act(fc1, x, self.act_name, self.act)  # (B, T, M)
        return ln2(x + fc2(h))  # (B, T, C)


class BertLayer(_PostNormBlock):
    """BERT / RoBERTa / XLM-R: ``attention.self.query``, ``attention.output.dense``, ``intermediate.dense`` ..."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__(cfg)
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg.mlp_width, cfg)

    def parts(self) -> tuple[nn.Module, ...]:
        a = self.attention
        return a.self, a.output.dense, a.output.LayerNorm, self.intermediate.dense, self.output.dense, \
            self.output.LayerNorm


class _MPNetAttention(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.attn = _Projections(cfg, ("q", "k", "v", "o"))
        self.LayerNorm = LayerNorm(cfg.width, cfg.eps)


class MPNetLayer(_PostNormBlock):
    """MPNet: ``attention.attn.q`` ... ``attention.attn.o``, ``attention.LayerNorm``; its ``mask`` is additive
    and carries the relative-position bias."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__(cfg)
        self.attention = _MPNetAttention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg.mlp_width, cfg)

    def parts(self) -> tuple[nn.Module, ...]:
        a = self.attention
        return a.attn, a.attn.o, a.LayerNorm, self.intermediate.dense, self.output.dense, self.output.LayerNorm


class _DistilFFN(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.lin1 = Linear(cfg.width, cfg.mlp_width)
        self.lin2 = Linear(cfg.mlp_width, cfg.width)


class DistilBertLayer(_PostNormBlock):
    """DistilBERT: ``attention.q_lin`` ... ``out_lin``, ``sa_layer_norm``, ``ffn.lin1/lin2``, ``output_layer_norm``."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__(cfg)
        self.attention = _Projections(cfg, ("q_lin", "k_lin", "v_lin", "out_lin"))
        self.sa_layer_norm = LayerNorm(cfg.width, cfg.eps)
        self.ffn = _DistilFFN(cfg)
        self.output_layer_norm = LayerNorm(cfg.width, cfg.eps)

    def parts(self) -> tuple[nn.Module, ...]:
        return self.attention, self.attention.out_lin, self.sa_layer_norm, self.ffn.lin1, self.ffn.lin2, \
            self.output_layer_norm


class _AlbertAttention(_Projections):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__(cfg, ("query", "key", "value", "dense"))
        self.LayerNorm = LayerNorm(cfg.width, cfg.eps)


class AlbertLayer(_PostNormBlock):
    """ALBERT: ``attention.query`` ... ``attention.dense``, ``attention.LayerNorm``, ``ffn``, ``ffn_output``,
    ``full_layer_layer_norm``."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__(cfg)
        self.attention = _AlbertAttention(cfg)
        self.ffn = Linear(cfg.width, cfg.mlp_width)
        self.ffn_output = Linear(cfg.mlp_width, cfg.width)
        self.full_layer_layer_norm = LayerNorm(cfg.width, cfg.eps)

    def parts(self) -> tuple[nn.Module, ...]:
        a = self.attention
        return a, a.dense, a.LayerNorm, self.ffn, self.ffn_output, self.full_layer_layer_norm


class _AlbertGroup(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.albert_layers = nn.ModuleList(AlbertLayer(cfg.tower) for _ in range(cfg.inner_layers))


_BLOCKS = {"mpnet": MPNetLayer, "distilbert": DistilBertLayer}

class _Encoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        if cfg.model_type == "albert":
            self.embedding_hidden_mapping_in = Linear(cfg.embed_width, cfg.tower.width)
            self.albert_layer_groups = nn.ModuleList(_AlbertGroup(cfg) for _ in range(cfg.layer_groups))
        else:
            block = _BLOCKS.get(cfg.model_type, BertLayer)
            self.layer = nn.ModuleList(block(cfg.tower) for _ in range(cfg.tower.layers))
        if cfg.relative_buckets:
            self.relative_attention_bias = Embedding(cfg.relative_buckets, cfg.tower.heads)


class _Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        width = cfg.embed_width or cfg.tower.width  # ALBERT embeds narrower
        self.word_embeddings = Embedding(cfg.vocab_size, width)
        self.position_embeddings = Embedding(cfg.max_positions, width)
        if cfg.type_vocab_size:  # MPNet and DistilBERT have none
            self.token_type_embeddings = Embedding(cfg.type_vocab_size, width)
        self.LayerNorm = LayerNorm(width, cfg.tower.eps)


class SentenceBert(nn.Module):
    """BertModel + sentence-transformers pooling and Dense modules. ``forward`` returns (B, dim), not normalized."""

    INT8_KEEP_LAST_BLOCK = True  # 7-bit grid only (engine/quantize.py): MiniLM min cosine 0.9938 -> 0.9952

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        # the checkpoint's name for the blocks: DistilBERT's ``transformer.layer.N``, the others' ``encoder.layer.N``
        self.add_module("transformer" if cfg.model_type == "distilbert" else "encoder", _Encoder(cfg))
        if cfg.dense:  # parameter names st_modules.<folder>.linear.*, as the converter stores them
            self.st_modules = nn.ModuleDict({d.path: StDense(d) for d in cfg.dense})

    @property
    def blocks(self) -> list[nn.Module]:
        """The blocks in the order they run, whatever the checkpoint calls their container (ALBERT's repeat)."""
        cfg = self.cfg
        if cfg.model_type == "albert":
            groups, per_group = self.encoder.albert_layer_groups, cfg.tower.layers / cfg.layer_groups
            return [block for i in range(cfg.tower.layers) for block in groups[int(i / per_group)].albert_layers]
        return list((self.transformer if cfg.model_type == "distilbert" else self.encoder).layer)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded; lengths (B,) real token counts. Returns (B, dim): pooled, then Dense."""
        return self(ids, lengths)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """As :meth:`encode_text`."""
        x, keep = self.hidden(ids, lengths)
        y = st_pool(x, keep, self.cfg.pooling)  # (B, C)
        for d in self.cfg.dense:
            y = self.st_modules[d.path](y)  # (B, D)
        return y

    def hidden(self, ids: torch.Tensor, lengths: torch.Tensor, types: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's token states (B, T, C) of right-padded ``ids`` (B, T) with ``lengths`` (B,) real
        tokens, and which tokens are real (B, T) bool. ``types``: token type ids (B, T); None: all type 0."""
        B, T = ids.shape
        e = self.embeddings
        x = e.word_embeddings(ids) + self._positions(ids)  # (B, T, C)
        if self.cfg.type_vocab_size:
            x = x + (e.token_type_embeddings.weight[0] if types is None else e.token_type_embeddings(types))
        x = e.LayerNorm(x)
        if self.cfg.model_type == "albert":
            x = self.encoder.embedding_hidden_mapping_in(x)  # (B, T, E) -> (B, T, C)
        keep = torch.arange(T, device=ids.device)[None, :] < lengths[:, None]  # (B, T) True = real token
        mask = None if bool(keep.all()) else keep[:, None, None, :]  # (B, 1, 1, T)
        if self.cfg.relative_buckets:  # MPNet: bias (1, h, T, T), padded keys pushed to the dtype's minimum
            bias = self._relative_bias(T, x.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, torch.finfo(x.dtype).min)  # (B, h, T, T)
        for layer in self.blocks:
            x = layer(x, mask)
        return x, keep

    def _relative_bias(self, T: int, dtype: torch.dtype) -> torch.Tensor:
        """MPNet's attention bias (1, heads, T, T): one learned value per head and bucket of key - query
        offset (transformers' ``MPNetEncoder.compute_position_bias``: 32 buckets, exact up to 8 positions
        each way, log-spaced to 128)."""
        table = self.encoder.relative_attention_bias.weight  # (buckets, heads)
        pos = torch.arange(T, device=table.device)
        bucket = _relative_bucket(pos[None, :] - pos[:, None])  # (T, T)
        return table[bucket].permute(2, 0, 1).unsqueeze(0).to(dtype)  # (1, h, T, T)

    def _positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Position embeddings, (T, C) or (B, T, C). BERT: rows 0..T-1. RoBERTa / XLM-R (HF's
        ``create_position_ids_from_input_ids``): a token that is not ``pad_token_id`` takes row pad + 1 + (its
        index among such tokens), a pad token row pad (ids right-padded with 0 here are masked out anyway)."""
        table = self.embeddings.position_embeddings.weight
        if not self.cfg.position_offset:
            return table[: ids.shape[1]]
        pad = self.cfg.position_pad_id
        real = (ids != pad).long()
        return table[real.cumsum(dim=1) * real + pad]


def _relative_bucket(offset: torch.Tensor, max_distance: int = 128) -> torch.Tensor:
    """Bucket of each key - query ``offset`` (int64): half the buckets for keys before the query, half
    after; within a half, distances under 8 get one bucket each, larger ones log-spaced buckets up to
    ``max_distance``, the rest the last (transformers' ``MPNetEncoder.relative_position_bucket``)."""
    half = MPNET_BUCKETS // 2
    n = -offset
    out = (n < 0).long() * half
    n = n.abs()
    exact = half // 2
    # clamp only keeps log() finite where n < exact: those entries take n itself below
    far = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    return out + torch.where(n < exact, n, far.clamp(max=half - 1))


def load_parts(path: Path, shapes: Mapping[str, tuple[int, ...]], weights: str = "weights.arrow") -> Parts:
    """The sentence-transformer of a converted folder: its configs read and checked against the weights'
    ``shapes``, the encoder built (parameters on the meta device), and what the text front end needs.
    ``weights``: the weight file's name, for messages."""
    cfg = bert_config(path)
    check_config_against_weights(*weight_checks(cfg), shapes, path, weights)
    if cfg.prompt:
        log.info("%s: every text is embedded after the default prompt %r (config_sentence_transformers.json)",
                 path, cfg.prompt)
    text = TextSide(max_length=cfg.max_seq_length, max_tokens=cfg.positions, vocab_size=cfg.vocab_size,
                    lowercase=cfg.lowercase, prompt=cfg.prompt, prompts=cfg.prompts,
                    default_prompt=cfg.default_prompt, pad_id=cfg.pad_token_id)
    return Parts(net=SentenceBert(cfg), config=cfg, dim=cfg.dim, text=text)


def weight_checks(cfg: BertConfig) -> tuple[list[CountCheck], list[ShapeCheck]]:
    """The block counts and tensor shapes ``cfg`` makes, checked against the weight file before the build."""
    conf, t = "config.json", cfg.tower
    distil = cfg.model_type == "distilbert"
    width = ("dim" if distil else "hidden_size", t.width)
    mlp = ("hidden_dim" if distil else "intermediate_size", t.mlp_width)
    embed = ("embedding_size", cfg.embed_width) if cfg.embed_width else width
    checks = [ShapeCheck("embeddings.word_embeddings.weight", (("vocab_size", cfg.vocab_size), embed), conf),
              ShapeCheck("embeddings.position_embeddings.weight",
                          (("max_position_embeddings", cfg.max_positions), embed), conf)]
    if cfg.type_vocab_size:
        checks.append(ShapeCheck("embeddings.token_type_embeddings.weight",
                                  (("type_vocab_size", cfg.type_vocab_size), embed), conf))
    if cfg.model_type == "albert":
        groups = "encoder.albert_layer_groups."
        counts = [CountCheck(groups, ("num_hidden_groups", cfg.layer_groups), conf),
                  CountCheck(f"{groups}0.albert_layers.", ("inner_group_num", cfg.inner_layers), conf)]
        checks += [ShapeCheck("encoder.embedding_hidden_mapping_in.weight", (width, embed), conf),
                   ShapeCheck(f"{groups}0.albert_layers.0.ffn.weight", (mlp, width), conf)]
    elif distil:
        counts = [CountCheck("transformer.layer.", ("n_layers", t.layers), conf)]
        checks.append(ShapeCheck("transformer.layer.0.ffn.lin1.weight", (mlp, width), conf))
    else:
        counts = [CountCheck("encoder.layer.", ("num_hidden_layers", t.layers), conf)]
        checks.append(ShapeCheck("encoder.layer.0.intermediate.dense.weight", (mlp, width), conf))
    if cfg.relative_buckets:
        checks.append(ShapeCheck("encoder.relative_attention_bias.weight",
                                  (("relative_attention_num_buckets", cfg.relative_buckets),
                                   ("num_attention_heads", t.heads)), conf))
    checks += dense_checks(cfg.dense)
    return counts, checks
