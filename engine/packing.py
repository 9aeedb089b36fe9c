"""fp32 weights packed once for oneDNN on CPU: lower latency at small batches, for the same memory.

A GEMM with few rows (one image is 50 patches on B/32, one caption 5-77 tokens) is limited by how fast the
weights stream from memory, and a plain row-major weight is reordered into the kernel's blocked layout on
every call. Packing reorders each fp32 weight once, at load, into oneDNN's layout
(``torch.ops.mkldnn._reorder_linear_weight``, the layout torch.compile's CPU freezing pass uses), and every
Linear then runs through ``torch.ops.mkldnn._linear_pointwise``. q, k and v of an attention share one packed
GEMM.

Measured on 2 AVX2 cores, B/32 (same process, alternating): batch-1 image forward 121 -> 102 ms (p50), one
caption 40 -> 28.5 ms; at batch 32 the forward is ~7 % slower than the plain weights through MKL, which is
why packing is a choice (``load_model(..., pack_weights=True)``, ``arrowengine serve --pack-weights``) and not
the default. The mapped fp32 pages are dropped as each weight is packed, so peak memory stays the same; the
load is no longer zero-copy and takes ~0.4 s more (B/32). Same maths as F.linear, other summation order
(differences ~1e-6).
"""
from __future__ import annotations

import torch
from torch import nn

from engine import allocator
from engine.errors import PrecisionError
from engine.layers import swap_linears

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
    """A frozen fp32 Linear whose weight is held in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self._setup(linear.weight, linear.bias)

    @classmethod
    def concat(cls, linears: list[nn.Linear]) -> "PackedLinear":
        """One PackedLinear computing several Linears of the same input, outputs side by side (q, k, v)."""
        biases = [lin.bias for lin in linears]
        if len({lin.in_features for lin in linears}) != 1 or (None in biases and any(b is not None for b in biases)):
            raise ValueError("PackedLinear.concat: expected Linears of one input width, all with or all without bias")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self._setup(torch.cat([lin.weight.detach() for lin in linears]), bias)
        return self

    def _setup(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise PrecisionError(f"pack_weights packs fp32 CPU weights; got {weight.dtype} on {weight.device}")
        self.out_features, self.in_features = weight.shape
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _PACK_FOR_ROWS)
        # the bias is small: a contiguous fp32 one is used where it lies (for a single Linear, the weight file)
        self.bias = None if bias is None else bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(net: nn.Module) -> nn.Module:
    """Replace every fp32 ``nn.Linear`` of ``net`` (on CPU) by a :class:`PackedLinear`; returns ``net``."""
    if not packing_available():
        raise PrecisionError("pack_weights needs torch's oneDNN (mkldnn) CPU kernels, which this torch build "
                             "lacks; load without pack_weights")
    with allocator.long_lived_blocks_mapped():
        return swap_linears(net, PackedLinear, PackedLinear.concat)
