"""engine.ragged: packed rows attend exactly as each row alone, unpadded, would."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import ragged
from engine.ragged import RaggedRows


def _row_by_row(q, k, v, lengths, heads, kv_heads, scale, reach):
    """Each row on its own, no padding at all: the reference."""
    out, start = [], 0
    d = q.shape[1] // heads
    for n in lengths.tolist():
        qi = q[start:start + n].view(1, n, heads, d).transpose(1, 2)
        ki = k[start:start + n].view(1, n, kv_heads, d).transpose(1, 2)
        vi = v[start:start + n].view(1, n, kv_heads, d).transpose(1, 2)
        mask = None
        if reach is not None:
            pos = torch.arange(n)
            mask = (pos[:, None] - pos[None, :]).abs() <= reach
        y = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=kv_heads != heads)
        out.append(y.transpose(1, 2).reshape(n, heads * d))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("reach", [None, 3, 40])
@pytest.mark.parametrize("banded_from", [1, 10**9])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_attend_equals_each_row_alone(reach, banded_from, heads, kv_heads, monkeypatch):
    monkeypatch.setattr(ragged, "BANDED_MIN_BLOCKS", banded_from)
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 7, 30, 2, 19])
    N, d = int(lengths.sum()), 8
    q = torch.randn(N, heads * d, generator=g)
    k = torch.randn(N, kv_heads * d, generator=g)
    v = torch.randn(N, kv_heads * d, generator=g)
    rows = RaggedRows(lengths, int(lengths.max()))
    assert rows.padded and rows.positions.tolist()[:8] == [0, 0, 1, 2, 3, 4, 5, 6]
    got = rows.attend(q, k, v, heads, kv_heads, 0.3, reach)
    want = _row_by_row(q, k, v, lengths, heads, kv_heads, 0.3, reach)
    assert got.shape == (N, heads * d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


_SPREAD = [1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 20, 23, 26, 29, 33, 37, 40]  # spans of >= 8 rows


@pytest.mark.parametrize("reach", [None, 3])
@pytest.mark.parametrize("banded_from", [1, 10**9])
@pytest.mark.parametrize("lengths", [_SPREAD, _SPREAD[1::2] + _SPREAD[::2]])
def test_attention_spans_equal_each_row_alone(lengths, reach, banded_from, monkeypatch):
    """With a padding limit the group's attention runs in spans of similar lengths (consecutive rows: slices of the
    packed tokens; rows out of length order: index spans) and still equals each row alone."""
    monkeypatch.setattr(ragged, "BANDED_MIN_BLOCKS", banded_from)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor(lengths)
    N, heads, kv_heads, d = int(lengths.sum()), 6, 2, 8
    q, k, v = (torch.randn(N, h * d, generator=g) for h in (heads, kv_heads, kv_heads))
    rows = RaggedRows(lengths, int(lengths.max()), max_padding=0.1)
    assert len(rows.spans) >= 3
    assert sorted(int(n) for span in rows.spans for n in span.lengths) == sorted(lengths.tolist())  # each row once
    assert sum(span.B * span.T for span in rows.spans) < 0.6 * len(lengths) * int(lengths.max())  # less padding
    in_order = lengths.tolist() == sorted(lengths.tolist())
    assert all(isinstance(span.tokens, slice) == in_order for span in rows.spans)
    got = rows.attend(q, k, v, heads, kv_heads, 0.3, reach)
    want = _row_by_row(q, k, v, lengths, heads, kv_heads, 0.3, reach)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # strided views of one fused projection, as ModernBERT passes them
    qkv = torch.cat([q, k, v], dim=1)
    views = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    torch.testing.assert_close(rows.attend(*views, heads, kv_heads, 0.3, reach), want, atol=1e-5, rtol=0)


def test_padded_slots_never_leak_into_real_tokens():
    """Padded slots of a span hold a copy of a real token (no zero fill); huge values there change nothing."""
    lengths = torch.tensor([2, 5])
    rows = RaggedRows(lengths, 5)
    span = rows.spans[0]
    assert span.padded and span.src.tolist()[:5] == [0, 1, 0, 0, 0]  # row 0's 3 padded slots read token 0
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(7, 8, generator=g) for _ in range(3))
    want = _row_by_row(q, k, v, lengths, 2, 2, 0.5, None)
    torch.testing.assert_close(rows.attend(q, k, v, 2, 2, 0.5), want, atol=1e-6, rtol=0)


def test_pack_and_unpack_round_trip():
    lengths = torch.tensor([3, 1, 4])
    rows = RaggedRows(lengths, 4)
    x = torch.arange(8.0)[:, None].repeat(1, 2)  # (N, 2): token i holds i
    full = rows.unpack(x)  # (B, T, 2), zeros where padded
    assert full.shape == (3, 4, 2)
    assert full[:, :, 0].tolist() == [[0, 1, 2, 0], [3, 0, 0, 0], [4, 5, 6, 7]]
    assert torch.equal(rows.pack(full), x)
    unpadded = RaggedRows(torch.tensor([2, 2]), 2)  # no padding: views, no index
    assert unpadded.flat is None and torch.equal(unpadded.pack(unpadded.unpack(x[:4])), x[:4])
