"""Ragged text batches: rows of different lengths run without padding, except inside attention.

engine.model hands a padding-free text network (one whose class sets ``RAGGED_TEXT``) one forward group of
right-padded rows (B, T) with their lengths. Every per-token layer (embeddings, norms, Linears, MLP, rotary)
runs on the real tokens only, packed as (N, C), so the forward group need not be of similar lengths: it is cut
only by engine.model's row and token budgets, and its GEMMs get as many rows as those allow. Attention alone needs
a (rows, T) layout. :class:`RaggedRows` cuts the group into *spans* of rows of similar length (at most
``max_padding`` more tokens than the real ones, engine.tokenizer.length_buckets), moves each span's tokens into
its own right-padded layout and back, and runs bidirectional attention there, with masks made once per forward:

- every key of the row (``reach=None``), or only the keys at most ``reach`` positions away (sliding-window
  layers: ModernBERT's local layers, EmbeddingGemma's sliding layers); padded keys are never seen;
- long rows in sliding layers (from ``BANDED_MIN_BLOCKS`` blocks on) go in blocks of queries, each over just the
  keys its block can reach, so a sliding layer costs O(T x window), not O(T^2); blocks past a row's end are
  skipped.

Padded slots of a span's layout hold a copy of one of its real tokens (one gather, no zero fill): as keys they are
masked out, as queries their outputs are dropped when packing. One batched SDPA call per span and layer instead of
a loop over rows. Grouped key / value heads (GQA) are passed through to SDPA.

Why spans: EmbeddingGemma fp32 on bench/models.py's 128 texts of 18-273 tokens (2 AMX Xeon cores), forward groups
of similar lengths (12 groups of ~750 tokens: the GEMMs' rows) 8.8-9.4 s; the same texts in 3 forward groups
with attention in 12 spans 8.5-8.6 s (the GEMMs run ~5 % faster with 4x the rows; bf16 on AMX ~20 %).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from engine.layers import attention
from engine.tokenizer import length_buckets

# Sliding layers switch from one dense (T, T) band mask to blocks of queries over their key band once rows are
# this many blocks long. One local layer's attention at gte-modernbert-base widths (window 128) on 2 AMD EPYC
# cores, dense / banded time: 0.64 at 256 positions, 1.06 at 384, 1.22 at 512, 1.8 at 768, 2.3 at 1,024, 5.0 at
# 2,048, 9.1 at 4,096.
BANDED_MIN_BLOCKS = 4


class RaggedRows:
    """One forward group of right-padded rows: ``lengths`` (B,) real token counts, ``T`` the padded length;
    attention in spans padded at most ``max_padding`` (a fraction of their real tokens; inf: one span)."""

    def __init__(self, lengths: torch.Tensor, T: int, max_padding: float = math.inf) -> None:
        self.B, self.T = lengths.shape[0], T
        self.lengths = lengths
        self.N = int(lengths.sum())
        whole = _Span(lengths, T, slice(0, self.N))  # every row in the group's layout
        self.keep, self.padded = whole.keep, whole.padded  # (B, T) True = real token; any padding at all
        self.flat = whole.real  # (N,) each real token's slot in B * T; None without padding
        # (N,) each real token's position in its row
        self.positions = (self.flat % T) if self.padded else torch.arange(T, device=lengths.device).repeat(self.B)
        self.spans = _spans(lengths, max_padding, whole)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """The real entries of a (B, T, ...) tensor, (N, ...)."""
        flat = t.reshape(self.B * self.T, *t.shape[2:])
        return flat if self.flat is None else flat.index_select(0, self.flat)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Packed (N, C) -> (B, T, C), zeros at padded positions."""
        if self.flat is None:
            return x.view(self.B, self.T, -1)
        out = x.new_zeros(self.B * self.T, x.shape[-1])
        return out.index_copy_(0, self.flat, x).view(self.B, self.T, -1)

    def rotary(self, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (N, head_dim) of each packed token's position for RoPE's inverse frequencies ``inv_freq``
        (:func:`rope_inv_freq`), computed in float32 and cast to ``dtype``, as transformers' rotary embedding."""
        freqs = self.positions[:, None].float() * inv_freq.to(self.positions.device)[None, :]  # (N, d / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (N, d)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int, scale: float,
               reach: int | None = None, block: int | None = None) -> torch.Tensor:
        """Bidirectional attention of packed tokens within their own rows: q (N, heads x d), k and v (N, kv_heads x
        d) (strided views are fine) -> (N, heads x d).

        ``reach``: a query sees only the keys at most this many positions away (None: every key of its row);
        ``block``: the query block of the banded path (default 2 x reach, the window)."""
        if len(self.spans) == 1:
            span = self.spans[0]
            return span.real_rows(span.attend(q, k, v, heads, kv_heads, scale, reach, block))
        out = q.new_empty(self.N, q.shape[-1])
        for span in self.spans:
            span.put(out, span.attend(q, k, v, heads, kv_heads, scale, reach, block))
        return out


def _spans(lengths: torch.Tensor, max_padding: float, whole: _Span) -> list[_Span]:
    """The attention spans of a group: ``whole`` (all rows in the group's layout) when ``max_padding`` is inf or the
    rows pad little enough, else length_buckets' groups, each padded to its longest row."""
    if math.isinf(max_padding):
        return [whole]
    dev = lengths.device
    n = lengths.tolist()
    groups = length_buckets(n, len(n), math.inf, max_padding)
    if len(groups) == 1:
        return [whole]
    starts = np.concatenate([[0], np.cumsum(n)])
    spans = []
    for g in groups:
        lo, hi = int(g[0]), int(g[-1]) + 1
        if hi - lo == len(g) and np.array_equal(g, np.arange(lo, hi)):  # consecutive rows: a slice of the tokens
            tokens: slice | torch.Tensor = slice(int(starts[lo]), int(starts[hi]))
        else:
            tokens = torch.from_numpy(np.concatenate([np.arange(starts[i], starts[i + 1]) for i in g])).to(dev)
        span_lengths = lengths[torch.from_numpy(g).to(dev)]
        spans.append(_Span(span_lengths, max(n[i] for i in g), tokens))
    return spans


class _Span:
    """Rows of one forward group that attend in one right-padded (B, T) layout: ``lengths`` (B,) theirs,
    ``tokens`` which of the group's packed tokens they are (a slice when the rows are consecutive)."""

    def __init__(self, lengths: torch.Tensor, T: int, tokens: slice | torch.Tensor) -> None:
        self.B, self.T, self.lengths, self.tokens = lengths.shape[0], T, lengths, tokens
        dev = lengths.device
        self.keep = torch.arange(T, device=dev)[None, :] < lengths[:, None]  # (B, T)
        self.padded = bool((lengths < T).any())
        # (n,) the slot in B x T of each of the span's real tokens
        self.real = self.keep.flatten().nonzero().squeeze(1) if self.padded else None
        # (B x T,) the group token each slot reads; a padded slot reads the span's first token (finite values:
        # masked out as a key, dropped as a query). A slice: the layout is the group's tokens as they are.
        if self.real is None and isinstance(tokens, slice):
            self.src: slice | torch.Tensor = tokens
        else:
            if self.real is None:
                local = torch.arange(self.B * T, device=dev)
            else:
                local = torch.zeros(self.B * T, dtype=torch.int64, device=dev)
                local[self.real] = torch.arange(self.real.shape[0], device=dev)
            self.src = local + tokens.start if isinstance(tokens, slice) else tokens[local]
        self._masks: dict = {}

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The span's tokens of a group-packed (N, C) tensor in its (B, T, C) layout."""
        if isinstance(self.src, slice):
            return x[self.src].reshape(self.B, self.T, -1)
        return x.index_select(0, self.src).view(self.B, self.T, -1)

    def real_rows(self, y: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> the real tokens' rows (n, C), in the group's packed order."""
        flat = y.reshape(self.B * self.T, -1)
        return flat if self.real is None else flat.index_select(0, self.real)

    def put(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """Write the real tokens of ``y`` (B, T, C) into their rows of the group-packed ``out`` (N, C)."""
        if isinstance(self.tokens, slice):
            out[self.tokens] = self.real_rows(y)
        else:
            out.index_copy_(0, self.tokens, self.real_rows(y))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int, scale: float,
               reach: int | None, block: int | None) -> torch.Tensor:
        """RaggedRows.attend for this span's rows of the group-packed q, k, v -> (B, T, heads x d)."""
        q, k, v = self.take(q), self.take(k), self.take(v)  # (B, T, h d), (B, T, kv d) x2
        if reach is not None and self.T - 1 <= reach:  # the window spans every row whole
            reach = None
        if reach is not None:
            block = block or 2 * reach
            if self.T >= BANDED_MIN_BLOCKS * block:
                return self._banded(q, k, v, heads, kv_heads, scale, reach, block)
        return attention(q, k, v, heads, self._mask(reach), kv_heads=kv_heads, scale=scale)  # (B, T, h d)

    def _mask(self, reach: int | None) -> torch.Tensor | None:
        """Boolean mask (True = attend): every key (B, 1, 1, T) with padded keys out, None without padding; with a
        ``reach``, (B, 1, T, T) without the keys further than ``reach``."""
        if reach not in self._masks:
            keys = self.keep[:, None, None, :] if self.padded else None  # (B, 1, 1, T)
            if reach is not None:
                pos = torch.arange(self.T, device=self.keep.device)
                band = (pos[:, None] - pos[None, :]).abs() <= reach  # (T, T)
                keys = band[None, None] if keys is None else keys & band  # (B, 1, T, T)
            self._masks[reach] = keys
        return self._masks[reach]

    def _banded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int, scale: float,
                reach: int, S: int) -> torch.Tensor:
        """Sliding attention in blocks of S queries, each over the W = S + 2 reach keys its queries can reach:
        (B, T, .) -> (B, T, heads x d). Blocks that start past their row's length are skipped."""
        B, T, C = q.shape
        W, nb = S + 2 * reach, -(-T // S)
        dev = q.device
        qb = F.pad(q, (0, 0, 0, nb * S - T)).reshape(B * nb, S, C)  # (B nb, S, C)
        # block b's keys: positions b S - reach ... b S + S + reach - 1
        kb, vb = (F.pad(t, (0, 0, reach, nb * S - T + reach)).unfold(1, W, S).transpose(2, 3)
                  .reshape(B * nb, W, t.shape[-1]) for t in (k, v))  # (B nb, W, kv d)
        key = ("banded", reach, S)
        if key not in self._masks:
            valid = torch.zeros(B, nb * S + 2 * reach, dtype=torch.bool, device=dev)
            valid[:, reach:reach + T] = self.keep
            i = torch.arange(S, device=dev)[:, None]
            j = torch.arange(W, device=dev)[None, :]
            band = (j - i >= 0) & (j - i <= 2 * reach)  # (S, W): |query - key| <= reach
            mask = band & valid.unfold(1, W, S).reshape(B * nb, 1, 1, W)  # (B nb, 1, S, W)
            live = ((torch.arange(nb, device=dev) * S)[None, :] < self.lengths[:, None]).flatten()  # (B nb,)
            rows = None if bool(live.all()) else live.nonzero().squeeze(1)
            self._masks[key] = (mask if rows is None else mask[rows], rows)
        mask, rows = self._masks[key]
        if rows is None:
            y = attention(qb, kb, vb, heads, mask, kv_heads=kv_heads, scale=scale)  # (B nb, S, C)
        else:
            y = qb.new_zeros(B * nb, S, C)
            y[rows] = attention(qb[rows], kb[rows], vb[rows], heads, mask, kv_heads=kv_heads, scale=scale)
        return y.view(B, nb * S, C)[:, :T]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (..., d), a new tensor: transformers' ``x cos + rotate_half(x) sin`` written as one
    product and two half updates (``cos`` / ``sin`` broadcast to x, their two halves equal, as
    :meth:`RaggedRows.rotary` makes them). Computed in x's dtype."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def rope_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    """RoPE's inverse frequencies (head_dim / 2,), float32 on the CPU, as transformers'
    ``compute_default_rope_parameters``."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
