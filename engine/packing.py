"""fp32 weights packed once for oneDNN on CPU: lower latency for small batches.

A GEMM with few rows (one image is 50 patches on B/32, one caption 5-77 tokens) runs far below the matmul
rate, and a plain row-major weight is reordered into the kernel's blocked layout on every call. Packing
reorders each fp32 weight once, at load, into oneDNN's layout (``torch.ops.mkldnn._reorder_linear_weight``,
the layout torch.compile's CPU freezing pass uses); a call of up to ONEDNN_MAX_ROWS rows (96) then runs
``torch.ops.mkldnn._linear_pointwise`` on it (engine.layers.linear). Bigger calls keep using the mapped weight through MKL, which is
faster there: oneDNN on the packed weight ran a B/32 batch of 32 images ~5 % slower, and it keeps a buffer
the size of the output for every row count it has seen (a server's varied text lengths grew the process by
>1.5 GB); up to 96 rows that cache stays small, as for engine.layers.linear's own oneDNN path.

Memory: the packed copy replaces the mapped pages (they are dropped after packing), so a process that only
ever sees small batches holds the weights once; one that also runs big batches faults the mapped pages back
in and holds both (B/32: up to +577 MB). Loading takes ~0.3-0.5 s more (B/32) and is no longer zero-copy.
Measured on 2 AVX2 cores, B/32, same process, alternating: one image 106-121 -> 98-109 ms (p50, JPEG to
embedding), one caption 29-35 -> 23-24 ms. Same maths as F.linear, other summation order (differences
~1e-6). Off by default: ``load_model(..., pack_weights=True)``, ``arrowengine serve --pack-weights``.
"""
from __future__ import annotations

import torch
from torch import nn

from engine import allocator
from engine.errors import PrecisionError
from engine.layers import linear, swap_linears

# The packed layout is chosen for this many rows; measured 1-1600 rows on it, within noise of a layout
# chosen for the exact count.
_PACK_FOR_ROWS = 64


def packing_available() -> bool:
    """True when this torch build has oneDNN's packed fp32 linear (x86/ARM CPU builds do)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """A frozen fp32 Linear with a oneDNN-packed copy of its weight for calls of few rows."""

    def __init__(self, linear_: nn.Linear) -> None:
        super().__init__()
        weight = linear_.weight.detach().flatten(1)  # (out, in); engine.layers.PatchLinear keeps a conv's shape
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise PrecisionError(f"pack_weights packs fp32 CPU weights; got {weight.dtype} on {weight.device}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight  # the mapped weight, for big calls (its pages are dropped until one comes)
        self.bias = None if linear_.bias is None else linear_.bias.detach()
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_FOR_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self._packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(net: nn.Module) -> nn.Module:
    """Replace every fp32 ``nn.Linear`` of ``net`` (on CPU) by a :class:`PackedLinear`; returns ``net``."""
    if not packing_available():
        raise PrecisionError("pack_weights needs torch's oneDNN (mkldnn) CPU kernels, which this torch build "
                             "lacks; load without pack_weights")
    with allocator.long_lived_blocks_mapped():
        return swap_linears(net, PackedLinear)
