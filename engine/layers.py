"""Building blocks shared by every tower: activations, multi-head attention, MLP.

Reference: the attention and MLP of HF transformers' ``modeling_clip.py`` and
``modeling_bert.py``; the maths is the same, the module names follow each
checkpoint's keys so loading weights is a plain assignment.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    """CLIP's ``x * sigmoid(1.702 x)``, overwriting ``x``, computed as ``silu(1.702 x) / 1.702``: one fused
    pass instead of two and no temporaries (ViT-B MLP at batch 32: 8.4 -> 5.1 ms a block on 2 cores)."""
    return F.silu(x.mul_(1.702), inplace=True).div_(1.702)


def activation(name: str):
    """The activation for a HF ``hidden_act`` name. It may overwrite its input: give it a fresh tensor (the
    output of the layer before), as every MLP here does."""
    return {
        "quick_gelu": quick_gelu_,
        "gelu": F.gelu,  # exact (erf), as HF's "gelu"
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),  # HF's own tanh formula: the same function
        "relu": lambda x: F.relu(x, inplace=True),
        "silu": lambda x: F.silu(x, inplace=True),
        "swish": lambda x: F.silu(x, inplace=True),
    }[name]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              mask: torch.Tensor | None = None, causal: bool = False, kv_heads: int | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention: queries (B, Tq, heads x d) over keys and values (B, T, kv_heads x d)
    (``kv_heads``: grouped key / value heads, default ``heads``), scores scaled by ``scale`` (default d^-1/2).

    ``mask`` is a boolean key mask (True = attend), (B, 1, 1, T) or (B, 1, Tq, T), an additive float mask
    broadcastable to (B, heads, Tq, T) in q's dtype (MPNet's position bias), or None.
    """
    B, Tq, C = q.shape
    T = k.shape[1]
    hd = C // heads
    kv_heads = kv_heads or heads
    q = q.view(B, Tq, heads, hd).transpose(1, 2)  # (B, h, Tq, hd)
    k = k.view(B, T, kv_heads, hd).transpose(1, 2)  # (B, kv, T, hd)
    v = v.view(B, T, kv_heads, hd).transpose(1, 2)  # (B, kv, T, hd)
    with sdpa_kernel(CUDA_ATTENTION_BACKENDS) if q.is_cuda else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           scale=1.0 / math.sqrt(hd) if scale is None else scale,
                                           enable_gqa=kv_heads != heads)  # (B, h, Tq, hd)
    return y.transpose(1, 2).reshape(B, Tq, C)  # (B, Tq, C)


def project_qkv(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of ``x`` (B, T, C) for an attention module that names its projections in ``QKV``: through
    its fused ``qkv`` layer when engine.quantize made one, else the three Linears."""
    if module.qkv is not None:
        return module.qkv(x).chunk(3, dim=-1)
    return tuple(getattr(module, name)(x) for name in module.QKV)


# On Hopper, torch may pick cuDNN's attention for half precision; cuDNN builds an execution graph for every
# new (batch, length) shape. Text batches come in many shapes, so on an H200 (bench/gpu_text.py, fp16, 1,024
# captions, fresh process) the first pass ran at 1,841 texts/s with cuDNN allowed and 7,652 without; once
# every shape is built cuDNN is ~20 % faster (16,593 vs 13,545). Predictable beats fastest-when-warm here.
CUDA_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# At a few rows (batch-1 latency: 1-96 tokens or patches) oneDNN's fp32 GEMM beats the MKL one behind
# F.linear on CPU by 1.05-1.8x (measured on 2 AVX2 cores, ViT-B and MiniLM shapes); from ~128 rows on, MKL
# wins. Same maths, different summation order (differences ~1e-6).
ONEDNN_MAX_ROWS = 96


def _onednn_linear_op():
    try:
        op = torch.ops.mkldnn._linear_pointwise  # private, stable since torch 2.0; F.linear if it goes away
        return op if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear_op()


def meta_parameter(*shape: int) -> nn.Parameter:
    """A frozen parameter of ``shape`` with no storage: a placeholder that the weight file's tensor replaces."""
    return nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)


def _declare(module: nn.Module, params: dict[str, nn.Parameter | None], **attrs) -> None:
    """Set a freshly built module's parameters and plain attributes without ``nn.Module.__setattr__``.

    That setattr checks every name against the module's dicts and runs parameter registration hooks: ~30 us per
    Linear, two thirds of building B/32's skeleton (~200 Linears and LayerNorms; load 24-36 ms in all). Only for
    names the module does not have yet, in its own ``__init__``.
    """
    module._parameters.update(params)
    module.__dict__.update(attrs)


class Linear(nn.Linear):
    """nn.Linear built without initialising weights: they are assigned from the weight file."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True) -> None:
        nn.Module.__init__(self)
        _declare(self, {"weight": meta_parameter(n_out, n_in), "bias": meta_parameter(n_out) if bias else None},
                 in_features=n_in, out_features=n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class PatchLinear(Linear):
    """A conv whose stride is its kernel (ViT's patch embedding) as the Linear it is over flattened patches.

    The weight keeps the checkpoint's shape (out, channels, p, p); ``forward`` takes rows of channels * p * p
    values, channel-major. Being a Linear, int8 and weight packing replace it like the others (they flatten
    its weight): B/32 int8 at batch 32, its fp32 GEMM was ~11 % of the model's time on 2 Zen 5 cores.
    """

    def __init__(self, channels: int, n_out: int, patch: int) -> None:
        nn.Module.__init__(self)
        _declare(self, {"weight": meta_parameter(n_out, channels, patch, patch), "bias": None},
                 in_features=channels * patch * patch, out_features=n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight.flatten(1))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through oneDNN for fp32 inputs of a few rows on CPU (see ONEDNN_MAX_ROWS), on ``packed``
    (``weight`` reordered for oneDNN, engine.packing) when given."""
    if (_ONEDNN_LINEAR is not None and x.numel() <= ONEDNN_MAX_ROWS * weight.shape[1]
            and x.dtype == torch.float32 == weight.dtype and x.device.type == "cpu" and not x.requires_grad):
        return _ONEDNN_LINEAR(x, weight if packed is None else packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


# oneDNN's GEMM with the activation fused as a post-op: an MLP's first layer then writes its (rows, 4C) output
# once, where F.linear and the activation write it twice. At SigLIP B/16's MLP shape (1,960 rows, 768 -> 3,072 ->
# 768, fp32, tanh GELU) on 2 AVX-512 Xeon cores: 66.1 -> 61.7 ms per MLP. MKL's unfused GEMM stays on CPUs without
# AVX-512, where oneDNN's fp32 GEMM lost to it from ~128 rows on. Same maths (differences ~5e-6 on the activation).
FUSED_ACTIVATIONS: dict[str, tuple[str, str]] = {  # HF hidden_act -> (oneDNN post-op, its algorithm)
    "gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
    "gelu_fast": ("gelu", "tanh"),
}


@functools.cache
def _fuse_activations_here() -> bool:
    return _ONEDNN_LINEAR is not None and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def linear_act(layer: nn.Module, x: torch.Tensor, act_name: str, act) -> torch.Tensor:
    """``act(layer(x))``; for an fp32 :class:`Linear` on an AVX-512 CPU and an activation in
    :data:`FUSED_ACTIVATIONS`, one oneDNN call with the activation fused. Other layers (int8, packed, bf16, GPU)
    run as ``act(layer(x))``."""
    fused = FUSED_ACTIVATIONS.get(act_name)
    if (fused is not None and type(layer) is Linear and x.device.type == "cpu" and x.dtype == torch.float32
            and layer.weight.dtype == torch.float32 and not x.requires_grad and _fuse_activations_here()):
        return _ONEDNN_LINEAR(x, layer.weight, layer.bias, fused[0], [], fused[1])
    return act(layer(x))


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` over the last dimension, (..., 1), for an RMSNorm of ``x`` (float32).

    mean(x^2) comes from torch's vector norm (one fused reduction): the norm is then two passes over x where
    ``F.rms_norm``'s CPU composite makes five (pow, mean, add, rsqrt, mul); 1.8-2.3x faster at (3,000, 1,024) and
    (3,000, 16, 128) fp32 on 2 AMX Xeon cores. Same values to float32 rounding (differences ~1e-6).
    """
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm without initialisation (weights come from the file)."""

    def __init__(self, width: int, eps: float) -> None:
        nn.Module.__init__(self)
        _declare(self, {"weight": meta_parameter(width), "bias": meta_parameter(width)},
                 normalized_shape=(width,), eps=eps, elementwise_affine=True)


class Embedding(nn.Embedding):
    """nn.Embedding without initialisation (weights come from the file)."""

    def __init__(self, num: int, width: int) -> None:
        nn.Module.__init__(self)
        _declare(self, {"weight": meta_parameter(num, width)}, num_embeddings=num, embedding_dim=width,
                 padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False)


def swap_linears(net: nn.Module, make, make_fused=None, skip: set[int] = frozenset()) -> nn.Module:
    """Replace every ``nn.Linear`` of ``net`` by ``make(linear)``, in place.

    With ``make_fused``, an attention module that names its q/k/v projections (``QKV``) gets them as one
    ``qkv = make_fused([q, k, v])`` (see :func:`project_qkv`). Modules whose ``id`` is in ``skip`` keep
    theirs (a Linear in it stays as it is). The weight-file pages of every replaced weight are dropped
    (engine.weights.release_pages): the new
    module holds its own copy (they fault back in from the file if it reads the old weight again).
    """
    from engine.weights import release_pages

    for parent in list(net.modules()):
        if id(parent) in skip:
            continue
        names = getattr(parent, "QKV", None) if make_fused is not None else None
        if names and all(isinstance(getattr(parent, n, None), nn.Linear) for n in names):
            projections = [getattr(parent, n) for n in names]
            parent.qkv = make_fused(projections)
            for n, lin in zip(names, projections):
                delattr(parent, n)
                release_pages(lin.weight)
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child) not in skip:
                setattr(parent, name, make(child))
                release_pages(child.weight)
    return net


# -- sentence-transformers' Pooling and Dense modules (any encoder under a sentence-transformer) -----------

def st_pool(x: torch.Tensor, keep: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' Pooling of token states ``x`` (B, T, C) over the real tokens ``keep`` (B, T) bool,
    in ``mode`` (engine.config.POOLING_MODES) -> (B, C)."""
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


_DENSE_ACTS = {"Identity": lambda x: x, "Tanh": torch.tanh, "ReLU": torch.relu, "GELU": F.gelu,
               "Sigmoid": torch.sigmoid}


class StDense(nn.Module):
    """A sentence-transformers Dense module (its folder's ``linear.weight`` / ``linear.bias``): act(x W^T + b)."""

    def __init__(self, cfg) -> None:  # engine.config.DenseConfig
        super().__init__()
        self.linear = Linear(cfg.n_in, cfg.n_out, bias=cfg.bias)
        self.act = _DENSE_ACTS[cfg.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))
