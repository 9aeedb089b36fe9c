"""Building blocks shared by every tower: activations, multi-head attention, MLP.

Reference: the attention and MLP of HF transformers' ``modeling_clip.py`` and
``modeling_bert.py``; the maths is the same, the module names follow each
checkpoint's keys so loading weights is a plain assignment.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def activation(name: str):
    """The activation function for a HF ``hidden_act`` name."""
    return {
        "quick_gelu": quick_gelu,
        "gelu": F.gelu,  # exact (erf), as HF's "gelu"
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }[name]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention on (B, T, C) projections.

    ``mask`` is a boolean (B, 1, 1, T) key mask (True = attend) or None.
    """
    B, T, C = q.shape
    hd = C // heads
    q = q.view(B, T, heads, hd).transpose(1, 2)  # (B, h, T, hd)
    k = k.view(B, T, heads, hd).transpose(1, 2)  # (B, h, T, hd)
    v = v.view(B, T, heads, hd).transpose(1, 2)  # (B, h, T, hd)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                       scale=1.0 / math.sqrt(hd))  # (B, h, T, hd)
    return y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)


class Linear(nn.Linear):
    """nn.Linear built without initialising weights: they are assigned from the weight file."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = n_in, n_out
        self.weight = nn.Parameter(torch.empty(n_out, n_in, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(n_out, device="meta"), requires_grad=False) if bias else None


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm without initialisation (weights come from the file)."""

    def __init__(self, width: int, eps: float) -> None:
        nn.Module.__init__(self)
        self.normalized_shape = (width,)
        self.eps = eps
        self.elementwise_affine = True
        self.weight = nn.Parameter(torch.empty(width, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(width, device="meta"), requires_grad=False)


class Embedding(nn.Embedding):
    """nn.Embedding without initialisation (weights come from the file)."""

    def __init__(self, num: int, width: int) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = num, width
        self.padding_idx = None
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False
        self.weight = nn.Parameter(torch.empty(num, width, device="meta"), requires_grad=False)


def meta_parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
