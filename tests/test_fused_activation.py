"""engine.layers.linear_act: an fp32 Linear and its activation as one oneDNN call on AVX-512 CPUs, the same values
as the Linear then the activation; everything else (bf16, another layer type, an activation oneDNN lacks, a CPU
without AVX-512) runs unfused."""
from __future__ import annotations

import pytest
import torch

from engine import layers
from engine.layers import FUSED_ACTIVATIONS, Linear, activation, linear_act


def _linear(n_in: int, n_out: int, dtype=torch.float32) -> Linear:
    g = torch.Generator().manual_seed(0)
    layer = Linear(n_in, n_out)
    layer.weight = torch.nn.Parameter((torch.randn(n_out, n_in, generator=g) / n_in ** 0.5).to(dtype),
                                      requires_grad=False)
    layer.bias = torch.nn.Parameter((torch.randn(n_out, generator=g) * 0.02).to(dtype), requires_grad=False)
    return layer


@pytest.mark.parametrize("act_name", sorted(FUSED_ACTIVATIONS))
@pytest.mark.parametrize("rows", [3, 300])
def test_fused_equals_linear_then_activation(act_name, rows, monkeypatch):
    layer = _linear(64, 256)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1))
    act = activation(act_name)
    with torch.inference_mode():
        want = act(torch.nn.functional.linear(x, layer.weight, layer.bias))
        calls = []
        real = layers._ONEDNN_LINEAR
        if real is None:
            pytest.skip("this torch has no oneDNN linear: linear_act always runs unfused here")
        monkeypatch.setattr(layers, "_fuse_activations_here", lambda: True)
        monkeypatch.setattr(layers, "_ONEDNN_LINEAR", lambda *a: calls.append(a[3:6]) or real(*a))
        got = linear_act(layer, x, act_name, act)
    assert calls == [(FUSED_ACTIVATIONS[act_name][0], [], FUSED_ACTIVATIONS[act_name][1])]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_what_is_not_fused_runs_as_before(monkeypatch):
    monkeypatch.setattr(layers, "_fuse_activations_here", lambda: True)
    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", lambda *a: pytest.fail("fused a layer it must not fuse"))
    x = torch.randn(200, 32)
    with torch.inference_mode():
        for layer, inputs, name in [
            (_linear(32, 64, torch.bfloat16), x.bfloat16(), "gelu"),         # bf16
            (_linear(32, 64), x, "quick_gelu"),                              # no oneDNN post-op for it
            (torch.nn.Linear(32, 64), x, "gelu"),                            # another layer type (int8, packed...)
        ]:
            act = activation(name)
            want = act(layer(inputs))
            torch.testing.assert_close(linear_act(layer, inputs, name, act), want, atol=0, rtol=0)


def test_only_avx512_cpus_fuse():
    capability = torch.backends.cpu.get_cpu_capability()
    layers._fuse_activations_here.cache_clear()
    assert layers._fuse_activations_here() == (layers._ONEDNN_LINEAR is not None and capability.startswith("AVX512"))
