"""fp32 weights packed for oneDNN (engine/packing.py, ``load_model(..., pack_weights=True)``)."""
from __future__ import annotations

import gc

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.errors import PrecisionError
from engine.packing import PackedLinear, packing_available


def test_the_pinned_torch_build_has_the_kernels_and_a_build_without_them_gets_a_clear_error(monkeypatch):
    from engine import packing

    assert packing_available()  # x86 and ARM CPU builds of torch ship oneDNN; the tests below use it
    monkeypatch.setattr(packing, "packing_available", lambda: False)
    with pytest.raises(PrecisionError, match="needs torch's oneDNN"):
        packing.pack_linears(nn.Sequential(nn.Linear(4, 4)))

TEXTS = ["a photo of a cat", "", "two dogs running on a beach at sunset, seen from far away " * 3, "x"]


def _linear(n_in: int, n_out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    for p in lin.parameters():
        p.data = torch.randn(p.shape, generator=g)
    return lin


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear_for_any_input_layout(bias):
    lin = _linear(96, 40, bias)
    packed = PackedLinear(lin)
    inputs = [torch.randn(4, 16, 96), torch.randn(1, 96), torch.randn(96, 30).T,  # non-contiguous
              torch.randn(2, 96, 5).transpose(1, 2), torch.randn(0, 96), torch.randn(200, 96)]
    with torch.inference_mode():
        for x in inputs:
            got, want = packed(x), lin(x)
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_small_calls_use_the_packed_weight_and_big_ones_the_mapped_one(monkeypatch):
    """Up to ONEDNN_MAX_ROWS rows the packed copy is used; above, the plain weight (oneDNN would keep an
    output-sized buffer for every row count it sees)."""
    from engine import layers

    lin = _linear(32, 16)
    packed = PackedLinear(lin)
    with torch.inference_mode():
        want = {rows: (x, lin(x)) for rows in (1, layers.ONEDNN_MAX_ROWS, layers.ONEDNN_MAX_ROWS + 1, 700)
                for x in [torch.randn(rows, 32)]}
    onednn, mkl = layers._ONEDNN_LINEAR, layers.F.linear
    on_packed, on_plain = [], []

    def onednn_spy(x, w, *args):
        if w is packed._packed:
            on_packed.append(x.shape[0])
        return onednn(x, w, *args)

    def mkl_spy(x, w, b=None):
        if w is packed.weight:
            on_plain.append(x.shape[0])
        return mkl(x, w, b)

    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", onednn_spy)
    monkeypatch.setattr(layers.F, "linear", mkl_spy)
    with torch.inference_mode():
        for rows, (x, ref) in want.items():
            torch.testing.assert_close(packed(x), ref, atol=1e-4, rtol=1e-5)
    assert on_packed == [1, layers.ONEDNN_MAX_ROWS]
    assert on_plain == [layers.ONEDNN_MAX_ROWS + 1, 700]
    with pytest.raises(PrecisionError, match="fp32"):
        PackedLinear(nn.Linear(8, 4).to(torch.bfloat16))


def _images(n: int) -> list[bytes]:
    rng = np.random.default_rng(5)
    return [cv2.imencode(".jpg", rng.integers(0, 255, size=(120 + 30 * i, 90 + 17 * i, 3), dtype=np.uint8))[1]
            .tobytes() for i in range(n)]


def test_packed_clip_gives_the_same_embeddings_with_every_linear_packed(tiny_clip_dir):
    plain = engine.load_model(tiny_clip_dir)
    packed = engine.load_model(tiny_clip_dir, pack_weights=True)
    assert not [n for n, m in packed.net.named_modules() if isinstance(m, nn.Linear)]
    assert sum(isinstance(m, PackedLinear) for m in packed.net.modules()) == \
        sum(isinstance(m, nn.Linear) for m in plain.net.modules())
    blobs = _images(5)
    for batch in (blobs[:1], blobs):  # a few rows (packed weights) and more (mapped weights)
        np.testing.assert_allclose(packed.encode_image(batch), plain.encode_image(batch), atol=1e-5)
    np.testing.assert_allclose(packed.encode_text(TEXTS), plain.encode_text(TEXTS), atol=1e-5)
    assert packed.info.precision == "fp32"


def _mapped_rss_kb(path) -> int:
    """Resident kB of every mapping of ``path`` in this process (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                inside = line.rstrip().endswith(str(path))
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_packed_sentence_bert_matches_and_drops_the_mapped_fp32_pages(minilm_model_dir):
    weights = (minilm_model_dir / "weights.arrow").resolve()
    short = ["a cat", "two dogs on a beach", ""]  # one text per call: a few rows each
    big = [f"caption number {i} about a dog running on a beach at sunset" for i in range(64)]
    gc.collect()
    base_kb = _mapped_rss_kb(weights)  # models of earlier tests still alive that map the same file
    plain = engine.load_model(minilm_model_dir)
    want_short, want_big = np.concatenate([plain.encode_text([t]) for t in short]), plain.encode_text(big)
    plain_kb = _mapped_rss_kb(weights) - base_kb
    del plain
    gc.collect()  # unmap the plain model's file view
    packed = engine.load_model(minilm_model_dir, pack_weights=True)
    got = np.concatenate([packed.encode_text([t]) for t in short])
    np.testing.assert_allclose(got, want_short, atol=1e-5)
    # The plain model touched every weight page (~87 MB file); after packing, small calls leave the mapped
    # pages alone: what remains are the unpacked tensors (embedding rows looked up, norms, biases).
    packed_kb = _mapped_rss_kb(weights) - base_kb
    assert plain_kb > 40_000, (plain_kb, base_kb)
    assert packed_kb < 0.4 * plain_kb, (packed_kb, plain_kb, base_kb)
    # a big batch runs on the mapped weights again: their pages come back from the file
    np.testing.assert_allclose(packed.encode_text(big), want_big, atol=1e-5)
    assert _mapped_rss_kb(weights) - base_kb > packed_kb + 10_000


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_pack_weights_outside_fp32_on_cpu_is_a_clear_error(tiny_clip_dir, precision):
    with pytest.raises(PrecisionError, match="pack_weights packs fp32"):
        engine.load_model(tiny_clip_dir, precision=precision, pack_weights=True)
