"""Devices, precisions and putting weights into a model.

Weights arrive as tensors that view the mapped weight file. In fp32 from an
fp32 file (and bf16 from a bf16 file) they are used as they are: no copy.
Other combinations cast once at load.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from engine import PRECISIONS
from engine.errors import ArrowEngineError, PrecisionError, WeightFormatError

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}

# Checkpoint tensors the engine does not use and may ignore.
IGNORED_SUFFIXES = (".position_ids",)
IGNORED_PREFIXES = ("pooler.",)


def compute_dtype(precision: str) -> torch.dtype:
    return _DTYPES[precision]


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ArrowEngineError(f"device {device!r} is not a torch device; expected 'cpu' or 'cuda[:n]'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArrowEngineError(f"device {device!r} requested but this torch build sees no CUDA GPU; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ArrowEngineError(f"device {device!r} is not supported; expected 'cpu' or 'cuda[:n]'")
    return dev


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r} is unknown; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise PrecisionError("precision 'fp16' needs a CUDA device; on CPU use 'bf16' (or 'fp32', 'int8')")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("this CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 matmuls are emulated and much "
                    "slower than fp32; use precision='int8' or 'fp32' for speed (bf16 still halves weight memory)")
    if precision == "int8" and device.type != "cpu":
        raise PrecisionError("precision 'int8' (dynamic quantization) runs on CPU only; on CUDA use 'fp16' or 'bf16'")


def check_packing(pack_weights: bool, precision: str, device: torch.device) -> None:
    """``pack_weights`` (engine.packing) applies to fp32 on CPU only."""
    if pack_weights and (device.type != "cpu" or precision != "fp32"):
        raise PrecisionError(f"pack_weights packs fp32 weights for CPU kernels; got precision {precision!r} on "
                             f"{device.type}. int8 weights are always packed; on CUDA there is nothing to pack: "
                             "load without pack_weights")


def cpu_has_native_bf16() -> bool:
    """True when oneDNN can run bf16 matmuls natively on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def assign_weights(net: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Point every parameter of ``net`` at its tensor in ``state`` (no copy).

    Collects every missing, unexpected and mis-shaped tensor and raises once.
    """
    params = dict(net.named_parameters())
    missing = sorted(k for k in params if k not in state)
    unexpected = sorted(k for k in state if k not in params and not k.endswith(IGNORED_SUFFIXES)
                        and not k.startswith(IGNORED_PREFIXES))
    shapes = sorted(f"{k}: expected {tuple(p.shape)}, file has {tuple(state[k].shape)}"
                    for k, p in params.items() if k in state and tuple(state[k].shape) != tuple(p.shape))
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                parts.append(f"{title} ({len(items)}): " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
        raise WeightFormatError(f"{where}: weights do not match the architecture. " + "; ".join(parts))
    for mod_name, mod in net.named_modules():  # one walk; get_submodule per name costs ~10 ms on B/32
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in mod._parameters.items():
            if p is not None:
                mod._parameters[attr] = nn.Parameter(state[prefix + attr], requires_grad=False)


def apply(net: nn.Module, precision: str, device: torch.device, pack_weights: bool = False) -> nn.Module:
    """Cast/quantize/move ``net`` for ``precision`` on ``device`` (and pack its fp32 weights for oneDNN with
    ``pack_weights``, see engine.packing); returns it in eval mode."""
    from engine.weights import release_pages

    dtype = _DTYPES[precision]
    for mod in net.modules():
        mod.__dict__["training"] = False  # eval mode; net.eval() would walk the modules again (~2.5 ms on B/32)
        for attr, p in list(mod._parameters.items()):
            if p is not None and p.is_floating_point() and (p.dtype != dtype or p.device != device):
                mod._parameters[attr] = nn.Parameter(p.to(device=device, dtype=dtype), requires_grad=False)
                release_pages(p)  # the file's copy was read once; a cast or moved copy replaces it
    if precision == "int8":
        from engine.quantize import quantize_int8

        net = quantize_int8(net)
    if pack_weights:
        from engine.packing import pack_linears

        net = pack_linears(net)
    return net

