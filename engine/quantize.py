"""int8 on CPU: per-channel int8 weights, per-row (per-token) int8 activations.

torch's eager dynamic quantization (fbgemm) quantizes a whole activation tensor
with one scale. Transformer activations carry a few channels far larger than the
rest (all-MiniLM-L6-v2 is a clear case), so one scale for a whole batch costs
accuracy: on 512 captions MiniLM's cosine to fp32 fell to 0.85 (mean 0.94). Here
every row gets its own grid of L + 1 levels (L = 255 or 127, below) from its own minimum
to its own maximum (both exactly on the grid: the extreme channels are the ones that
matter), and the row's scale and offset are put back on the output:

    y = (q @ int8(W).T) * s + lo * rowsum(W) + b,   q = round((x - lo) / s) in [0, L],
    lo = min x per row,  s = (max x - lo) / L per row

A row's result depends on that row alone, bit for bit, whatever rows share the batch
(the server merges concurrent clients' rows). MiniLM, 512 captions, min / mean cosine
to fp32 at L = 127: 0.9952 / 0.9974 (torch's per-tensor scale: 0.85 / 0.94; a grid
centred on the row's midpoint, which misses the extremes by half a level: 0.9931 /
0.9965; the earlier fbgemm-only form, whose grid also missed them: 0.9947 / 0.9972).
CLIP B/32: image 0.99974, text 0.99901.

The grid: a GEMM kernel multiplies u8 x s8 pairs. With VNNI (AVX-512 VNNI, AVX-VNNI, AMX) the
products go straight into int32, so q takes all 8 bits: 256 levels, LEVELS_VNNI. AVX2 without VNNI sums
each pair into int16 with saturation (up to 2 * 127 * 127 fits; a full 8-bit q does not: measured errors
of ~10 %), so there q keeps 7 bits: 128 levels, LEVELS. ``activation_levels()`` tells which, checked once
on the kernels themselves with the worst case. 8 bits halve the rounding of every activation: MiniLM, 512
captions, min / mean cosine 0.9954 / 0.9974 -> 0.9979 / 0.9990 (empty text 0.984 -> 0.994), so there every
block is quantized (last paragraph; then 0.9977 / 0.9988, and 35-45 % more texts/s than with the last
block in fp32, on 2 Zen 5 cores with AVX-512 VNNI).

Two kernels compute it, bit-identical on the same q:
- fbgemm (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``, q given as exact
  levels with scale 1) for calls of fewer than ONEDNN_MIN_ROWS rows, where it is faster
  (one ViT-B q/k/v at 8 rows: 144 vs 327 us);
- oneDNN (``onednn::qlinear_pointwise``, torch's x86 int8 path) from ONEDNN_MIN_ROWS rows
  on, 10-25 % faster there (MiniLM shapes at 800 rows: 230-264 vs 195-215 GOP/s; CLIP
  B/32 int8 at batch 32, A/B in one process: 21-25 -> 25-29 img/s; MiniLM texts/s +3-8 %).
  Its copy of the weights is made by the first call that uses it (B/32: +123 MB), so a
  process that only sees small calls never holds it.
oneDNN builds and caches a primitive per row count, and first calls at many row counts
leave holes in the malloc heap that later activations do not refill (900 row counts in a
row: +3 GB resident; evicting from its 1024-entry cache: +11 GB). So its calls take at
most ONEDNN_CHUNK rows, padded up to a multiple of ONEDNN_ROW_STEP (<= 61 shapes per
weight shape, <= 31 padded rows per call), and a single call scales its output in place.
Random text and image batches then grow the process no more than the fbgemm-only form
did (MiniLM, 200 calls of 1-300 texts: 812 vs 817 MB); the worst case, a ViT-B MLP fed
every row count from 128 to 4,200 in order, leaves ~450 MB of free heap resident (fbgemm
only: ~130 MB; glibc's malloc_trim returns both, and trimming after each new shape did not
lower it).

Attention modules that name their q/k/v projections (``QKV``) get them as one Int8Linear: one row
scale and one GEMM for all three (B/32 int8, 2 AVX2 cores: batch-1 latency 72 -> 61 ms; MiniLM
texts/s +10-20 %). Weights are quantized per output channel; the fp32 pages each one was read from
are dropped right after (engine.weights.release_pages), so peak RSS holds the int8
copies, not the fp32 weights. Sentence-transformers keep the last block of their layer stack in
fp32 where activations get 7 bits: it feeds the pooled embedding directly (MiniLM, 512 captions: min / mean
cosine 0.9938 / 0.9968 with it quantized, 0.9952 / 0.9974 without; 4-17 % slower on AVX2). CLIP quantizes every block:
keeping the last ones changed its min cosine by < 0.0001 and cost 8 % of batch-1
latency. Very short texts stay the weak spot: MiniLM's empty text ([CLS] [SEP])
reaches only ~0.98 at 7 bits (~0.99 at 8), because a few channels of those tokens
dwarf the rest even within one row.
"""
from __future__ import annotations

import functools
import logging
import threading
import warnings

import torch
from torch import nn

from engine import allocator
from engine.layers import swap_linears

log = logging.getLogger(__name__)

LEVELS = 127  # q in [0, LEVELS]: 7 bits where the kernels saturate in int16 (AVX2), see above
LEVELS_VNNI = 255  # q in [0, LEVELS_VNNI]: 8 bits where they accumulate u8 x s8 in int32
ONEDNN_MIN_ROWS = 128  # fbgemm below, oneDNN from here (measured crossover on 2 AVX2 cores: 77-128 rows)
ONEDNN_CHUNK = 2048  # rows per oneDNN call at most (its rate is flat from ~512 rows on)
ONEDNN_ROW_STEP = 32  # oneDNN calls are padded to a multiple of this many rows

_lock = threading.Lock()  # guards the lazy oneDNN weights


def _worst_case(rows: int, q_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, int8 weights) whose pair sums overflow int16 at q_max 255: every q at q_max, weights +/-127."""
    k, n = 72, 8
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[::2, ::3] = -127
    return torch.full((rows, k), q_max, dtype=torch.uint8), w


def _onednn_exact(q_max: int) -> bool:
    ops = torch.ops.onednn
    q, w = _worst_case(ONEDNN_MIN_ROWS, q_max)
    n = w.shape[0]
    y = ops.qlinear_pointwise(q, 1.0, 0, ops.qlinear_prepack(w, None), torch.ones(n),
                              torch.zeros(n, dtype=torch.long), None, 1.0, 0, torch.float32, "none", [], "")
    return bool(torch.equal(y, q.float() @ w.float().t()))


def _fbgemm_unit_weight(w: torch.Tensor) -> torch.Tensor:
    """fbgemm's packed form of int8 weights ``w`` (out, in) at scale 1: a kernel check's layer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w.float(), torch.ones(w.shape[0], dtype=torch.double),
                                        torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qw, None)


def _fbgemm_exact(op, q_max: int) -> bool:
    packed = _fbgemm_unit_weight(_worst_case(1, q_max)[1])
    for rows in (1, ONEDNN_MIN_ROWS - 1):  # kernels may differ by row count
        q, w = _worst_case(rows, q_max)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = op(q.float(), 1.0, 0, packed)
        if not torch.equal(y, q.float() @ w.float().t()):
            return False
    return True


@functools.cache
def onednn_int8_available() -> bool:
    """True when torch's oneDNN int8 linear runs here and gives exact results on 7-bit inputs.

    Checked once with the worst case for a saturating u8 x s8 kernel (every q 127, every weight +/-127)."""
    try:
        ops = torch.ops.onednn
        if not (torch.backends.mkldnn.is_available() and hasattr(ops, "qlinear_pointwise")
                and hasattr(ops, "qlinear_prepack")):
            return False
        return _onednn_exact(LEVELS)
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        log.debug("oneDNN int8 linear unavailable (%s): fbgemm for every call", e)
        return False


@functools.cache
def activation_levels() -> int:
    """LEVELS_VNNI (8-bit activations) where every int8 kernel the engine calls here is exact on u8 x s8 pairs
    at full range (VNNI), else LEVELS (7 bits). Checked once, on the kernels, with the worst case."""
    op = _fbgemm_levels_op()
    try:
        exact = op is not None and _fbgemm_exact(op, LEVELS_VNNI) and (
            not onednn_int8_available() or _onednn_exact(LEVELS_VNNI))
    except (RuntimeError, NotImplementedError) as e:
        log.debug("8-bit activation check failed (%s): 7 bits", e)
        exact = False
    levels = LEVELS_VNNI if exact else LEVELS
    log.info("int8: activations on a grid of %d levels per row (%s)", levels + 1,
             "the kernels here are exact on 8-bit pairs (VNNI)" if exact else "7 bits: the kernels here are not "
             "exact on 8-bit pairs (AVX2 without VNNI adds them in saturating int16)")
    return levels


@functools.cache
def _fbgemm_levels_op():
    """fbgemm's linear on exact levels given in fp32 (scale 1, zero point 0), or None where this build or its
    quantized engine (qnnpack on ARM) lacks it or gets it wrong; checked once on a small layer."""
    op = getattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32", None)
    if op is None:
        return None
    try:
        w = torch.full((4, 16), 127, dtype=torch.int8)
        levels = torch.arange(32, dtype=torch.float32).reshape(2, 16) * 4  # 0 .. 124
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = op(levels, 1.0, 0, _fbgemm_unit_weight(w))
        if torch.equal(y, levels @ w.float().t()):
            return op
        log.debug("fbgemm's levels linear gave wrong results here: the dynamic linear for small calls")
    except (RuntimeError, NotImplementedError) as e:
        log.debug("fbgemm's levels linear unavailable (%s): the dynamic linear for small calls", e)
    return None


def _as_uint8(q: torch.Tensor) -> torch.Tensor:
    """The uint8 codes of a quint8 tensor, without copying them."""
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())


class Int8Linear(nn.Module):
    """A frozen Linear computed with int8 GEMMs and per-row activation scales."""

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
        w = weight.detach().float().flatten(1)  # (out, in); engine.layers.PatchLinear keeps a conv's shape
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127  # (out,)
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch, still its fastest CPU int8 GEMM
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0,
                                            torch.qint8)
        self.out_features, self.in_features = w.shape
        self._packed = torch.ops.quantized.linear_prepack(qw, None)  # fbgemm's (or qnnpack's) layout
        self._wsum = qw.dequantize().sum(dim=1)  # (out,) rowsum of the int8 weights as the kernels see them
        self._use_onednn = onednn_int8_available()
        self._levels = activation_levels()  # q in [0, self._levels]
        self._onednn = None  # oneDNN's copy of the weights, made by the first call big enough to use it
        self._wscale = qw.q_per_channel_scales().float()
        self._wzero = torch.zeros(self.out_features, dtype=torch.long)
        self.bias = None if bias is None else bias.detach().float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, in)
        n = x.shape[0]
        if n == 0:
            return x.new_empty(*shape[:-1], self.out_features)
        hi = x.amax(dim=1, keepdim=True)  # (N, 1); aminmax is ~10x slower than the two reductions
        lo = x.amin(dim=1, keepdim=True)
        # s >= max|x| / 2**16: a constant row gets a finite scale (its q are all 0), a narrow one far from 0 a grid
        # no finer than fp32 can resolve
        s = torch.maximum((hi - lo).div_(self._levels), torch.maximum(hi.abs(), lo.abs()).mul_(2.0 ** -16))
        inv = s.clamp_(min=1e-30).reciprocal()
        plan = self._plan(n)
        rows = max(stop for _, stop, _ in plan)  # the oneDNN calls read zero rows past N
        levels = torch.empty(rows, self.in_features, dtype=x.dtype, device=x.device)
        # (x - lo) / s in [0, self._levels]: x - lo >= 0 exactly, 0 at the minimum. Two broadcast ops beat one
        # addcmul(-lo * inv, x, inv) (B/32 int8 model at batch 32, alternating in one process: 119 -> 124 img/s)
        torch.sub(x, lo, out=levels[:n]).mul_(inv)
        levels[n:].zero_()
        codes = _as_uint8(torch.quantize_per_tensor(levels, 1.0, 0, torch.quint8)) if plan[0][2] else None
        # one call (the usual case) scales its own output in place; several write into one output
        y = None if len(plan) == 1 else torch.empty(n, self.out_features, dtype=x.dtype, device=x.device)
        for start, stop, on_onednn in plan:
            acc = self._onednn_gemm(codes[start:stop]) if on_onednn else self._fbgemm_gemm(levels[start:stop])
            end = min(stop, n)
            acc = acc[:end - start]  # leading rows: still contiguous
            out = acc if y is None else y[start:end]
            if self.bias is None:
                torch.mul(acc, s[start:end], out=out)
            else:
                torch.addcmul(self.bias, acc, s[start:end], out=out)
            if y is None:
                y = acc
        y.addr_(lo.view(-1), self._wsum)  # + lo * rowsum(W)
        return y.reshape(*shape[:-1], self.out_features)

    def _plan(self, n: int) -> list[tuple[int, int, bool]]:
        """(start, stop, on oneDNN) row ranges of one call; a oneDNN range's stop may pass N (zero rows)."""
        if not self._use_onednn:
            return [(0, n, False)]
        plan, start = [], 0
        while n - start >= ONEDNN_MIN_ROWS:
            m = min(ONEDNN_CHUNK, n - start)
            plan.append((start, start + -(-m // ONEDNN_ROW_STEP) * ONEDNN_ROW_STEP, True))
            start += m
        if start < n:
            plan.append((start, n, False))
        return plan

    def _fbgemm_gemm(self, levels: torch.Tensor) -> torch.Tensor:
        op = _fbgemm_levels_op()
        if op is not None:
            return op(levels, 1.0, 0, self._packed)
        # builds without it (qnnpack, 7-bit grid): the dynamic linear takes its range from the input, exactly [0, 127]
        # once the levels are whole numbers and a row is not constant, so a row's result still depends on it alone
        return torch.ops.quantized.linear_dynamic(levels.round(), self._packed, True)

    def _onednn_gemm(self, codes: torch.Tensor) -> torch.Tensor:
        if self._onednn is None:  # a process that only ever sees small calls never holds this second copy
            with _lock:
                if self._onednn is None:
                    with allocator.long_lived_blocks_mapped():
                        qw, _ = torch.ops.quantized.linear_unpack(self._packed)
                        self._onednn = torch.ops.onednn.qlinear_prepack(qw.int_repr(), None)
        return torch.ops.onednn.qlinear_pointwise(codes, 1.0, 0, self._onednn, self._wscale, self._wzero, None, 1.0,
                                                  0, torch.float32, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(net: nn.Module, keep_last_block: bool | None = None) -> nn.Module:
    """Replace every Linear of ``net`` by an :class:`Int8Linear`; with ``keep_last_block``, not those in the
    last block of each ``nn.ModuleList`` of blocks (default: where activations get 7 bits, the net's
    ``INT8_KEEP_LAST_BLOCK``, else True; with 8-bit activations, False), nor in the submodules the net names in
    ``INT8_FLOAT_MODULES``. Returns ``net`` (changed in place)."""
    if torch.backends.quantized.engine == "none":
        from engine.errors import PrecisionError

        raise PrecisionError("precision 'int8' needs torch's quantized CPU kernels (fbgemm/x86 or qnnpack); "
                             "this torch build has none: use 'fp32' or 'bf16'")
    if keep_last_block is None:  # 8-bit activations are accurate enough in every block (see above)
        keep_last_block = activation_levels() == LEVELS and getattr(net, "INT8_KEEP_LAST_BLOCK", True)
    keep = set()
    for mod in net.modules() if keep_last_block else ():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            keep.update(id(m) for m in mod[-1].modules())
    for name in getattr(net, "INT8_FLOAT_MODULES", ()):  # submodules the net keeps in float (a reranker's head)
        keep.update(id(m) for m in net.get_submodule(name).modules())
    with allocator.long_lived_blocks_mapped():
        swap_linears(net, Int8Linear, Int8Linear.concat, skip=keep)
    return net
