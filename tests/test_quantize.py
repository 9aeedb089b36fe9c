"""int8 linear layers (engine/quantize.py) and the allocator settings (engine/allocator.py)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from engine import quantize
from engine.quantize import Int8Linear, quantize_int8


def _outlier_activations(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitude with a few huge channels, as transformer activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * torch.logspace(-2, 1, rows)[:, None]
    x[:, :3] *= 40
    return x


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the per-tensor comparison uses torch.ao
def test_int8_linear_is_close_to_fp32_row_by_row_and_keeps_shape():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(96, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=g) * torch.logspace(-2, 0, 40)[:, None])  # per-channel ranges
    q = Int8Linear(lin)
    x = _outlier_activations(64, 96).reshape(4, 16, 96)
    with torch.inference_mode():
        ref, got = lin(x), q(x)
    assert got.shape == (4, 16, 40) and got.dtype == torch.float32
    cos = nn.functional.cosine_similarity(got.reshape(-1, 40), ref.reshape(-1, 40), dim=1)
    assert cos.min() > 0.995  # every row, including the small-magnitude ones
    # one scale for the whole tensor (torch's quantize_dynamic) loses the small rows
    from torch.ao.quantization import quantize_dynamic
    per_tensor = quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
    with torch.inference_mode():
        cos_pt = nn.functional.cosine_similarity(per_tensor(x).reshape(-1, 40), ref.reshape(-1, 40), dim=1)
    assert cos_pt.min() < cos.min()


@pytest.mark.parametrize("bias", [True, False])
def test_int8_rows_do_not_depend_on_the_rows_beside_them(bias, monkeypatch):
    # The server merges concurrent clients' rows into one batch: a row's result must be the same alone or
    # among others, bit for bit, whatever their magnitudes and signs, on either kernel: fbgemm below
    # ONEDNN_MIN_ROWS rows, oneDNN (padded, in chunks, with an fbgemm tail) from there on.
    monkeypatch.setattr(quantize, "ONEDNN_CHUNK", 256)  # 600 rows: 256 + 256 on oneDNN, an 88-row tail on fbgemm
    q = Int8Linear(nn.Linear(96, 40, bias=bias))
    x = _outlier_activations(600, 96, seed=3)
    x[5] = x[5].abs()  # a row with no negative value
    x[9] = -x[9].abs()
    x[530] = 3.7  # a constant row
    with torch.inference_mode():
        together = q(x)
        assert together.shape == (600, 40)
        for i in (0, 5, 9, 69, 530, 599):
            assert torch.equal(q(x[i:i + 1]), together[i:i + 1]), i
        for n in (2, 16, 33, 130, 300):  # kernels block rows differently by count; 130 and 300 are padded
            assert torch.equal(q(x[:n]), together[:n]), n


def test_onednn_is_used_on_x86_for_big_calls_and_only_then_holds_its_weight_copy():
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert quantize.onednn_int8_available()  # torch's x86 builds ship it; the speed of big batches rests on it
    q = Int8Linear(nn.Linear(64, 32))
    x = torch.randn(300, 64)
    with torch.inference_mode():
        small = q(x[:quantize.ONEDNN_MIN_ROWS - 1])
        assert q._onednn is None  # a latency-only process never makes the second copy
        big = q(x)
    assert (q._onednn is not None) == quantize.onednn_int8_available()
    assert q._plan(300) == ([(0, 320, True)] if q._use_onednn else [(0, 300, False)])
    assert torch.equal(small, big[:quantize.ONEDNN_MIN_ROWS - 1])


@pytest.mark.parametrize("grid", ["7-bit", "this machine's"])
def test_levels_stay_within_the_grid_so_the_kernels_cannot_saturate(grid, monkeypatch):
    """q = round((x - min) / s) must stay in [0, L] for any row (constant, narrow far from 0, huge, tiny): at
    L = 127 a u8 x s8 pair sum cannot saturate int16 (AVX2 without VNNI: errors of ~10 %); L = 255 only where
    activation_levels() found the kernels exact at full range."""
    if grid == "7-bit":
        monkeypatch.setattr(quantize, "activation_levels", lambda: quantize.LEVELS)
    top = quantize.activation_levels()
    q = Int8Linear(nn.Linear(64, 16))
    g = torch.Generator().manual_seed(0)
    rows = [torch.full((64,), 3.7), torch.full((64,), -2.2), 1e4 + 0.01 * torch.randn(64, generator=g),
            -1e-30 * torch.rand(64, generator=g), 1e30 * torch.randn(64, generator=g), torch.randn(64, generator=g)]
    seen = []
    real = quantize.Int8Linear._fbgemm_gemm
    monkeypatch.setattr(quantize.Int8Linear, "_fbgemm_gemm", lambda self, lv: seen.append(lv.clone()) or real(self, lv))
    with torch.inference_mode():
        q(torch.stack(rows))
    levels = seen[0].round()
    assert levels.min() >= 0 and levels.max() <= top
    assert (levels.amax(dim=1)[[4, 5]] == top).all()  # a spread-out row uses the whole grid


@pytest.mark.parametrize("rows", [1, 40, quantize.ONEDNN_MIN_ROWS, 300])  # fbgemm below 128 rows, oneDNN above
def test_the_worst_case_for_saturation_is_exact_on_this_machines_grid(rows):
    """Every q at the grid's top and every weight at +/-127: the pair sums that overflow int16 at 8 bits. At
    the levels activation_levels() chose (255 with VNNI, else 127), both kernels must give the exact product,
    so a machine where they saturate never gets the 8-bit grid."""
    k, n = 96, 24
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.5)
        lin.weight[::2, ::3] = -0.5  # quantized to exactly +/-127 per channel
    q = Int8Linear(lin)
    x = torch.ones(rows, k)
    x[:, 0] = 0.0  # the row minimum: every other channel sits at q = L
    with torch.inference_mode():
        got, want = q(x), lin(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (q._levels, (got - want).abs().max())
    assert q._levels == quantize.activation_levels() in (quantize.LEVELS, quantize.LEVELS_VNNI)


def test_the_8_bit_grid_is_used_exactly_where_every_kernel_is_exact_at_full_range():
    """Probed here with other shapes than activation_levels() uses: q = 255 everywhere, weights +/-127 in
    same-sign pairs (what saturates int16). VNNI machines must get the 8-bit grid (7 bits cost MiniLM's min
    cosine 0.9979 -> 0.9954 and the fp32 last block), others must not."""
    import warnings

    k, n = 200, 16
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[1::2] = -127
    want = lambda q: q.double() @ w.double().t()  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w.float(), torch.ones(n, dtype=torch.double), torch.zeros(n, dtype=torch.long),
                                        0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        op = quantize._fbgemm_levels_op()
        exact = op is not None and all(
            torch.equal(op(torch.full((rows, k), 255.0), 1.0, 0, packed).double(), want(torch.full((rows, k), 255)))
            for rows in (1, 100))
    if exact and quantize.onednn_int8_available():
        ops = torch.ops.onednn
        q = torch.full((256, k), 255, dtype=torch.uint8)
        y = ops.qlinear_pointwise(q, 1.0, 0, ops.qlinear_prepack(w, None), torch.ones(n),
                                  torch.zeros(n, dtype=torch.long), None, 1.0, 0, torch.float32, "none", [], "")
        exact = torch.equal(y.double(), want(q))
    assert quantize.activation_levels() == (quantize.LEVELS_VNNI if exact else quantize.LEVELS)
    # where the CPU has VNNI (and oneDNN was not told to use less of it), that is the 8-bit grid
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if ("avx512_vnni" in flags and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
            and "ONEDNN_MAX_CPU_ISA" not in os.environ and "DNNL_MAX_CPU_ISA" not in os.environ):
        assert quantize.activation_levels() == quantize.LEVELS_VNNI
    if platform.machine().lower() in ("x86_64", "amd64") and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags):
        assert quantize.activation_levels() == quantize.LEVELS  # AVX2 only: pair sums saturate int16


def test_constant_and_narrow_offset_rows_stay_accurate():
    lin = nn.Linear(64, 16)
    q = Int8Linear(lin)
    g = torch.Generator().manual_seed(0)
    good = torch.randn(1, 64, generator=g)
    odd = torch.stack([torch.full((64,), 3.7), torch.full((64,), -2.2), 1e4 + 0.01 * torch.randn(64, generator=g)])
    with torch.inference_mode():
        together = q(torch.cat([good, odd]))
        assert torch.equal(together[:1], q(good))
        cos = nn.functional.cosine_similarity(together, lin(torch.cat([good, odd])), dim=1)
    assert cos.min() > 0.999, cos


def test_builds_without_fbgemms_levels_op_fall_back_to_the_dynamic_linear(monkeypatch):
    """qnnpack builds (ARM) lack fbgemm's op for given levels: the dynamic linear takes the range [0, 127] from
    the levels themselves (such builds get the 7-bit grid), so the results stay those of the same grid."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert quantize._fbgemm_levels_op() is not None  # fbgemm's builds have it, and it passes the check
    monkeypatch.setattr(quantize, "activation_levels", lambda: quantize.LEVELS)
    lin = nn.Linear(96, 40)
    q = Int8Linear(lin)
    x = _outlier_activations(50, 96, seed=5)
    with torch.inference_mode():
        want = q(x)
        monkeypatch.setattr(quantize, "_fbgemm_levels_op", lambda: None)
        got = q(x)
        assert all(torch.equal(q(x[i:i + 1]), got[i:i + 1]) for i in (0, 7, 49))  # still row by row
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_int8_linear_without_bias_and_zero_rows():
    lin = nn.Linear(16, 8, bias=False)
    q = Int8Linear(lin)
    x = torch.zeros(3, 16)
    x[1] = torch.randn(16)
    with torch.inference_mode():
        y = q(x)
    assert torch.equal(y[0], torch.zeros(8)) and torch.isfinite(y).all()
    with torch.inference_mode():
        assert q(torch.zeros(2, 0, 16)).shape == (2, 0, 8)  # no rows at all
    assert torch.allclose(y[1], lin(x[1]).detach(), atol=0.05 * lin(x[1]).abs().max().item())


def test_quantize_int8_keeps_the_last_block_in_fp32_only_on_the_7_bit_grid_unless_the_net_says_not(monkeypatch):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

    def quantized(levels: int, keep_attr: bool | None = None) -> list[type]:
        monkeypatch.setattr(quantize, "activation_levels", lambda: levels)
        net = nn.Module()
        net.blocks = nn.ModuleList(Block() for _ in range(3))
        net.head = nn.Linear(8, 4)
        if keep_attr is not None:
            net.INT8_KEEP_LAST_BLOCK = keep_attr  # the architecture's own choice (CLIP: every block)
        quantize_int8(net)
        assert isinstance(net.head, Int8Linear)
        return [type(b.fc) for b in net.blocks]

    assert quantized(quantize.LEVELS) == [Int8Linear, Int8Linear, nn.Linear]
    assert quantized(quantize.LEVELS, keep_attr=False) == [Int8Linear] * 3
    assert quantized(quantize.LEVELS_VNNI) == [Int8Linear] * 3  # 8-bit activations: accurate in every block
    assert quantized(quantize.LEVELS_VNNI, keep_attr=True) == [Int8Linear] * 3


def test_q_k_v_of_an_attention_module_share_one_int8_gemm():
    """Modules that name their q/k/v projections (``QKV``) get one fused Int8Linear: the same outputs as
    three separate ones (the activation scale is per row of the shared input), the fp32 three removed."""
    g = torch.Generator().manual_seed(3)

    class Attn(nn.Module):
        QKV = ("q", "k", "v")

        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(3))
            self.qkv = None

    net = nn.Module()
    net.blocks = nn.ModuleList(Attn() for _ in range(2))
    for p in net.parameters():
        p.data = torch.randn(p.shape, generator=g)
    first = net.blocks[0]
    separate = [Int8Linear(getattr(first, n)) for n in first.QKV]
    x = _outlier_activations(24, 32)
    with torch.inference_mode():
        want = torch.cat([lin(x) for lin in separate], dim=-1)
        quantize_int8(net, keep_last_block=True)
        got = net.blocks[0].qkv(x)
    assert isinstance(net.blocks[0].qkv, Int8Linear) and not hasattr(net.blocks[0], "q")
    assert net.blocks[1].qkv is None and isinstance(net.blocks[1].q, nn.Linear)
    assert got.shape == (24, 96) and torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="input width"):
        Int8Linear.concat([nn.Linear(8, 4), nn.Linear(16, 4)])
    with pytest.raises(ValueError, match="bias"):
        Int8Linear.concat([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)])


_FAULTS = (
    "import ctypes, resource\n"
    "from engine import allocator\n"
    "tuned = allocator.tune()\n"
    "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p\n"
    "libc.free.argtypes = [ctypes.c_void_p]\n"
    "def cycle():\n"
    "    ps = [libc.malloc(16 << 20) for _ in range(3)]\n"
    "    for p in ps: ctypes.memset(p, 1, 16 << 20)\n"
    "    for p in reversed(ps): libc.free(p)\n"
    "cycle()\n"
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "for _ in range(4): cycle()\n"
    "print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_allocator_settings_stop_freed_buffers_from_faulting_in_again():
    """Allocate, touch and free three 16 MiB buffers 4 times, as a forward pass does with its activations:
    with the settings the pages are reused (no new page faults); with glibc's defaults the freed heap top
    is trimmed (or the buffers unmapped) and every cycle faults thousands of pages in again."""
    def run(flag: str) -> tuple[str, int]:
        env = dict(os.environ, ARROWENGINE_MALLOC_TUNING=flag)
        out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, env=env, check=True)
        tuned, faults = out.stdout.split()
        return tuned, int(faults)

    tuned, faults_on = run("1")
    assert tuned == "True" and faults_on < 1000
    tuned, faults_off = run("0")
    assert tuned == "False" and faults_off > 4 * 4000


_PLACEMENT = (
    "import ctypes\n"
    "from engine import allocator\n"
    "allocator.tune()\n"
    "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p\n"
    "def in_heap(p):\n"
    "    for line in open('/proc/self/maps'):\n"
    "        lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
    "        if lo <= p < hi:\n"
    "            return line.rstrip().endswith('[heap]')\n"
    "    return False\n"
    "before = in_heap(libc.malloc(4 << 20))\n"
    "with allocator.long_lived_blocks_mapped():\n"
    "    inside = in_heap(libc.malloc(4 << 20))\n"
    "after = in_heap(libc.malloc(4 << 20))\n"
    "print(before, inside, after)\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_long_lived_weights_are_mapped_outside_the_malloc_heap():
    """Packed/quantized weights built at load get their own mappings (no heap holes to fragment later
    activations); before and after, a 4 MiB buffer comes from the heap as the tuned thresholds say."""
    out = subprocess.run([sys.executable, "-c", _PLACEMENT], capture_output=True, text=True, check=True,
                         env=dict(os.environ, ARROWENGINE_MALLOC_TUNING="1"))
    assert out.stdout.split() == ["True", "False", "True"]
