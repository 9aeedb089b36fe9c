"""int8 on CPU: per-channel int8 weights, per-row (per-token) int8 activations.

torch's eager dynamic quantization (fbgemm) quantizes a whole activation tensor
with one scale. Transformer activations carry a few channels far larger than the
rest (all-MiniLM-L6-v2 is a clear case), so one scale for a whole batch costs
accuracy: on 512 captions MiniLM's cosine to fp32 fell to 0.85 (mean 0.94). Here
every row is first mapped onto the same range [-127, 127] (its own min to max, so a
row of one sign uses every level), fbgemm's one scale then fits every row, and the
row's scale and centre are put back on the output:

    y = (int8((x - c) / s) @ int8(W).T) * s + c * rowsum(W) + b,
    c = (max x + min x) / 2 per row,  s = (max x - min x) / 254 per row

fbgemm takes its range from the min and max of the whole input, so two fence rows
(+127.5 and -127.5 everywhere) go in with every call: the grid is the same whatever
rows share the batch. (Before, a row's grid depended on the others': MiniLM's empty
text alone vs among other texts, cosine 0.978; now only fp32 rounding upstream,
where padding changes the order of sums, moves a value across a rounding edge:
0.997 at worst on captions.) MiniLM, 512 captions, min / mean cosine to fp32: one
symmetric scale per row (max |x|) 0.9905 / 0.9953 with the fence rows, 0.9933 /
0.9962 without them; this affine form 0.9947 / 0.9972 (empty text 0.966 -> 0.979),
for ~3 % of throughput.

Attention modules that name their q/k/v projections (``QKV``) get them as one Int8Linear: one row
scale and one GEMM for all three (B/32 int8, 2 AVX2 cores: batch-1 latency 72 -> 61 ms; MiniLM
texts/s +10-20 %). Weights are quantized per output channel; the fp32 pages each one was read from
are dropped right after (engine.weights.release_pages), so peak RSS holds the int8
copy, not both. Sentence-transformers keep the last block of their layer stack in
fp32: it feeds the pooled embedding directly (MiniLM, 512 captions: min cosine
0.9934 with it quantized, 0.9947 without; ~4 % slower). CLIP quantizes every block:
keeping the last ones changed its min cosine by < 0.0001 and cost 8 % of batch-1
latency. Very short texts stay the weak spot: MiniLM's empty text ([CLS] [SEP])
reaches only ~0.98, because a few channels of those tokens dwarf the rest even
within one row.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from engine import allocator
from engine.layers import swap_linears


class Int8Linear(nn.Module):
    """A frozen Linear computed with fbgemm's int8 GEMM and per-row activation scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self._setup(linear.weight, linear.bias)

    @classmethod
    def concat(cls, linears: list[nn.Linear]) -> "Int8Linear":
        """One Int8Linear computing several Linears of the same input, outputs side by side (q, k, v):
        one activation scale and one GEMM instead of three (36 % less time for ViT-B's q/k/v here)."""
        biases = [lin.bias for lin in linears]
        if len({lin.in_features for lin in linears}) != 1 or (None in biases and any(b is not None for b in biases)):
            raise ValueError("Int8Linear.concat: expected Linears of one input width, all with or all without bias")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        bias = None if biases[0] is None else torch.cat([b.detach().float() for b in biases])
        self._setup(torch.cat([lin.weight.detach().float() for lin in linears]), bias)
        return self

    def _setup(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127  # (out,)
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch, still its fastest CPU int8 GEMM
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0,
                                            torch.qint8)
        self.out_features, self.in_features = w.shape
        self._packed = torch.ops.quantized.linear_prepack(qw, None)
        self._wsum = qw.dequantize().sum(dim=1)  # (out,) rowsum of the int8 weights as fbgemm sees them
        # every scaled row lies in [-127, 127] (rounding can add ~1e-5); the fences fix fbgemm's range
        self._fence = torch.tensor([[127.5], [-127.5]]).expand(2, self.in_features).contiguous()
        self.bias = None if bias is None else bias.detach().float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, in)
        n = x.shape[0]
        hi = x.amax(dim=1, keepdim=True)  # (N, 1); aminmax is ~10x slower than the two reductions
        lo = x.amin(dim=1, keepdim=True)
        centre = (hi + lo).mul_(0.5)
        # s >= |centre| / 2**16: x * inv - centre * inv then loses < 2**-8 to rounding, so a constant row (or a
        # narrow one far from 0) stays inside the fences instead of blowing up fbgemm's range for the batch
        s = torch.maximum((hi - lo).div_(254), centre.abs().mul_(2.0 ** -16)).clamp_(min=1e-12)
        inv = s.reciprocal()
        scaled = torch.empty(n + 2, self.in_features, dtype=x.dtype, device=x.device)
        torch.addcmul(-centre * inv, x, inv, out=scaled[:n])  # (x - c) / s, in [-127, 127]
        scaled[n:] = self._fence
        # reduce_range=True: 7-bit activations, so fbgemm's AVX2 u8*s8 pair sums cannot saturate int16
        y = torch.ops.quantized.linear_dynamic(scaled, self._packed, True)[:n]  # (N, out), leading rows
        y = y.mul_(s) if self.bias is None else torch.addcmul(self.bias, y, s, out=y)
        y.addr_(centre.view(-1), self._wsum)  # + c * rowsum(W)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(net: nn.Module, keep_last_block: bool | None = None) -> nn.Module:
    """Replace every Linear of ``net`` by an :class:`Int8Linear`; with ``keep_last_block``, not those in the
    last block of each ``nn.ModuleList`` of blocks (default: the net's ``INT8_KEEP_LAST_BLOCK``, else True).
    Returns ``net`` (changed in place)."""
    if torch.backends.quantized.engine == "none":
        from engine.errors import PrecisionError

        raise PrecisionError("precision 'int8' needs torch's quantized CPU kernels (fbgemm/x86 or qnnpack); "
                             "this torch build has none: use 'fp32' or 'bf16'")
    if keep_last_block is None:
        keep_last_block = getattr(net, "INT8_KEEP_LAST_BLOCK", True)
    keep = set()
    for mod in net.modules() if keep_last_block else ():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            keep.update(id(m) for m in mod[-1].modules())
    with allocator.long_lived_blocks_mapped():
        swap_linears(net, Int8Linear, Int8Linear.concat, skip=keep)
    return net
