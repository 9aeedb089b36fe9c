"""A Qwen3 decoder under a sentence-transformer (Qwen/Qwen3-Embedding-0.6B, -4B, -8B).

Reference: HF transformers ``models/qwen3/modeling_qwen3.py`` (Qwen3Model) and ``configuration_qwen3.py``, and
sentence-transformers' Transformer -> Pooling(``lasttoken``) -> Normalize. Pre-RMSNorm blocks: x + o(attn(norm(x))),
then x + down(silu(gate(norm(x))) * up(norm(x))); queries and keys get a per-head RMSNorm over ``head_dim`` before
rotary position embedding (RoPE, ``rope_theta``); grouped-query attention (``num_key_value_heads``), causal; a final
RMSNorm. Module names equal the checkpoint keys of a saved Qwen3Model (``layers.0.self_attn.q_proj``, no
``model.`` prefix; a Qwen3ForCausalLM's ``model.`` is stripped and its ``lm_head`` dropped when converting).

How ours differs:
- Rows are right-padded (the engine groups rows by length), where sentence-transformers pads on the left. With
  causal attention a real token never sees the padding after it, so no attention mask is needed: the blocks call
  SDPA with ``is_causal=True`` and no mask, whose CPU flash kernel never materialises a T x T matrix (one
  8192-token row at Qwen3-Embedding-0.6B's widths: about +390 MB peak resident; under last-token pooling the last
  block attends from one query per row, with a (B, 1, 1, T) key mask). On CPU SDPA reads the shared key/value heads of
  grouped-query attention in place; on CUDA they are repeated per query head first (the memory-efficient kernel
  takes no GQA). RoPE depends on relative positions only, so positions from 0 give the embeddings transformers gives
  a left-padded row (positions from its pad count), up to rounding.
- Last-token pooling reads position ``length - 1``; the last block then computes keys and values for every position
  but attention, o_proj and the MLP for that row only (the other pooling modes run the whole last block).
- RoPE: the default and ``linear`` types; any other ``rope_type`` (dynamic, yarn, llama3, longrope, ...) and sliding
  window attention are refused with a ModelConfigError, not run approximately.
- Under int8 (engine.quantize) q/k/v become one fused Int8Linear (split back by width: with GQA k and v are
  narrower than q), and so do the MLP's gate/up pair: one activation scale and one GEMM each.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from engine.config import (ACTIVATIONS, MAX_LAYERS, DenseConfig, config_eps, config_size, config_value, length_cap,
                           read_json, st_head)
from engine.config_check import CountCheck, ShapeCheck, check_config_against_weights, dense_checks
from engine.errors import ModelConfigError
from engine.layers import (CUDA_ATTENTION_BACKENDS, Embedding, Linear, StDense, activation, inverse_rms,
                           meta_parameter, st_pool)
from engine.ragged import apply_rotary
from engine.registry import Parts, TextSide

log = logging.getLogger(__name__)

MODEL_TYPE = "qwen3"
ROPE_TYPES = ("default", "linear")  # the rope_type values implemented here
# transformers' Qwen3Config defaults, used where config.json omits a key (Qwen3-8B's geometry)
_DEFAULTS: dict[str, Any] = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                                 num_attention_heads=32, head_dim=128, hidden_act="silu", max_position_embeddings=32768,
                                 rms_norm_eps=1e-6, max_window_layers=28)
_DEFAULT_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta


@dataclass(frozen=True)
class Qwen3Config:
    """A Qwen3 decoder as sentence-transformers uses it (Transformer -> Pooling -> any Dense -> optional Normalize)."""

    width: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads (query heads)
    kv_heads: int  # num_key_value_heads; heads % kv_heads == 0
    head_dim: int  # per head, from the config (need not be width / heads); even (RoPE rotates pairs)
    mlp_width: int  # intermediate_size
    act: str  # hidden_act, one of engine.config.ACTIVATIONS
    eps: float  # rms_norm_eps
    vocab_size: int
    max_positions: int  # max_position_embeddings: the longest token row accepted
    rope_theta: float
    rope_factor: float  # linear RoPE scaling: positions divided by this (1.0: the default RoPE)
    attention_bias: bool  # q/k/v/o projections carry biases
    max_seq_length: int  # texts are cut to this many tokens (sentence-transformers' max_seq_length, capped)
    pooling: str  # one of engine.config.POOLING_MODES; Qwen3-Embedding: "lasttoken"
    normalize: bool  # a Normalize module follows pooling
    dense: tuple[DenseConfig, ...] = ()
    lowercase: bool = False
    prompt: str = ""  # the default prompt ("" without one)
    prompts: tuple[tuple[str, str], ...] = ()  # named prompts (name, text)
    default_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ModelConfigError(f"num_attention_heads {self.heads} is not a multiple of num_key_value_heads "
                                   f"{self.kv_heads}; grouped-query attention shares each key/value head among a "
                                   "whole number of query heads")
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim {self.head_dim} is odd; rotary embedding rotates pairs of values")
        if self.act not in ACTIVATIONS:
            raise ModelConfigError(f"hidden_act {self.act!r} is not supported; expected one of {ACTIVATIONS}")

    @property
    def dim(self) -> int:
        """Width of the sentence embedding: the last Dense module's output, else hidden_size."""
        return self.dense[-1].n_out if self.dense else self.width


def qwen3_config(model_dir: Path) -> Qwen3Config:
    """Read a sentence-transformers folder over a Qwen3 decoder: config.json (geometry, RoPE, attention kind) and
    the sentence-transformers head (pooling, Dense, Normalize, max length, prompts).

    Raises:
        ModelConfigError: a field out of range or of the wrong type, a RoPE type or sliding-window attention that is
            not implemented, or an unsupported sentence-transformers layout.
    """
    model_dir = Path(model_dir)
    cfg = read_json(model_dir, "config.json")
    where = f"{model_dir}/config.json"
    model_type = config_value(cfg, "model_type", MODEL_TYPE, str, where)
    if model_type != MODEL_TYPE:
        raise ModelConfigError(f"{where}: model_type {model_type!r}, expected {MODEL_TYPE!r}")

    def size(key: str, **kw) -> int:
        return config_size(cfg, key, _DEFAULTS.get(key), where, **kw)

    width, heads, layers = size("hidden_size"), size("num_attention_heads"), size("num_hidden_layers",
                                                                                   maximum=MAX_LAYERS)
    kv = cfg.get("num_key_value_heads")
    kv_heads = heads if kv is None else config_size(cfg, "num_key_value_heads", None, where)  # None: as HF, MHA
    _refuse_sliding_window(cfg, layers, where)
    theta, factor = _rope(cfg, where)
    max_positions = size("max_position_embeddings")
    head = st_head(model_dir, width)
    values = dict(
        width=width, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=size("head_dim"),
        mlp_width=size("intermediate_size"), act=config_value(cfg, "hidden_act", _DEFAULTS["hidden_act"], str, where),
        eps=config_eps(cfg, "rms_norm_eps", _DEFAULTS["rms_norm_eps"], where), vocab_size=size("vocab_size"),
        max_positions=max_positions, rope_theta=theta, rope_factor=factor,
        attention_bias=config_value(cfg, "attention_bias", False, bool, where),
        max_seq_length=length_cap(head.max_seq_length, max_positions), pooling=head.pooling, normalize=head.normalize,
        dense=head.dense, lowercase=head.lowercase, prompt=head.prompt, prompts=head.prompts,
        default_prompt=head.default_prompt)
    try:
        return Qwen3Config(**values)
    except ModelConfigError as exc:  # the geometry checks: say which file
        raise ModelConfigError(f"{where}: {exc}") from None


def _rope(cfg: dict[str, Any], where: str) -> tuple[float, float]:
    """(rope_theta, linear scaling factor) as transformers resolves them: ``rope_scaling`` (older configs, e.g.
    Qwen3-Embedding's ``null``), else ``rope_parameters`` (what transformers 5 writes); ``rope_theta`` inside it,
    else at the top level, else 10000."""
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    params = cfg.get(key) or {}
    if not isinstance(params, dict):
        raise ModelConfigError(f"{where}: {key} should be an object, got {params!r:.200}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ModelConfigError(f"{where}: {key} sets RoPE per layer type ({sorted(params)}); a Qwen3 decoder has one "
                               "RoPE for every layer: expected one object with rope_type and rope_theta")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ModelConfigError(f"{where}: {key}.rope_type {kind!r} is not supported; expected one of {ROPE_TYPES} "
                               "(other RoPE scalings change the positions in ways not implemented here)")
    theta = config_value(params, "rope_theta", config_value(cfg, "rope_theta", _DEFAULT_THETA, float, where), float,
                         f"{where} {key}")
    if not theta > 1:
        raise ModelConfigError(f"{where}: rope_theta is {theta}, expected a base wavelength above 1 (Qwen3: 1000000)")
    if kind == "default":
        return theta, 1.0
    factor = config_value(params, "factor", None, float, f"{where} {key}")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if not factor > 0 or partial != 1.0:
        raise ModelConfigError(f"{where}: linear RoPE with factor {factor!r} and partial_rotary_factor {partial!r}; "
                               "expected a positive factor over the whole head_dim")
    return theta, factor


def _refuse_sliding_window(cfg: dict[str, Any], layers: int, where: str) -> None:
    """Every layer must attend to every earlier token: transformers' layer_types (as Qwen3Config derives them from
    use_sliding_window / max_window_layers when config.json has none) may not hold 'sliding_attention'."""
    types = cfg.get("layer_types")
    if types is None:
        sliding = bool(cfg.get("use_sliding_window")) and cfg.get("sliding_window") is not None
        first = config_size(cfg, "max_window_layers", _DEFAULTS["max_window_layers"], where, minimum=0)
        types = ["sliding_attention" if sliding and i >= first else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or any(t not in ("full_attention", "sliding_attention") for t in types):
        raise ModelConfigError(f"{where}: layer_types should list 'full_attention' or 'sliding_attention' per layer, "
                               f"got {types!r:.200}")
    if "sliding_attention" in types:
        raise ModelConfigError(f"{where}: sliding-window attention (use_sliding_window / layer_types "
                               "'sliding_attention') is not supported; expected every layer to be 'full_attention', "
                               "as in Qwen3-Embedding")


class RMSNorm(nn.Module):
    """transformers' Qwen3RMSNorm: x / rms(x) in fp32, back to x's dtype, times the weight."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = meta_parameter(width)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = torch.mul(xf, inverse_rms(xf, self.eps)).to(x.dtype)  # as transformers: normalized, cast, then weighted
        return y.mul_(self.weight) if y.dtype == self.weight.dtype else self.weight * y


class Qwen3Attention(nn.Module):
    QKV = ("q_proj", "k_proj", "v_proj")  # engine.quantize may fuse these into one ``qkv`` (split by width below)

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        q_width, kv_width = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.widths = (q_width, kv_width, kv_width)
        self.q_proj = Linear(cfg.width, q_width, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.width, kv_width, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.width, kv_width, bias=cfg.attention_bias)
        self.o_proj = Linear(q_width, cfg.width, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.qkv: nn.Module | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); with ``rows`` (B,), the output at position ``rows[b]`` of each row only:
        (B, 1, C). ``rope``: (cos, sin), each (T, head_dim)."""
        B, T, _ = x.shape
        hd, cos, sin = self.head_dim, *rope
        if rows is None:
            q, k, v = self.qkv(x).split(self.widths, dim=-1) if self.qkv is not None else (
                self.q_proj(x), self.k_proj(x), self.v_proj(x))
            q_cos, q_sin = cos[:, None], sin[:, None]  # (T, 1, hd): broadcast over heads
        else:
            pick = torch.arange(B, device=x.device), rows
            if self.qkv is not None:
                q, k, v = self.qkv(x).split(self.widths, dim=-1)
                q = q[pick][:, None]  # (B, 1, H*hd)
            else:  # q for the pooled row only
                q, k, v = self.q_proj(x[pick][:, None]), self.k_proj(x), self.v_proj(x)
            q_cos, q_sin = cos[rows][:, None, None], sin[rows][:, None, None]  # (B, 1, 1, hd)
        Tq = q.shape[1]
        q = apply_rotary(self.q_norm(q.view(B, Tq, self.heads, hd)), q_cos, q_sin).transpose(1, 2)  # (B, H, Tq, hd)
        k = apply_rotary(self.k_norm(k.view(B, T, self.kv_heads, hd)), cos[:, None], sin[:, None]).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, hd).transpose(1, 2)  # (B, K, T, hd)
        # one row's keys are its own tokens up to the query (padding comes after every real token)
        mask = None if rows is None else (torch.arange(T, device=x.device) <= rows[:, None])[:, None, None]
        gqa = self.heads != self.kv_heads
        if gqa and x.is_cuda:  # CUDA's memory-efficient kernel (fp32, masks) takes no GQA: every head its keys
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))  # (B, H, T, hd)
            gqa = False
        with sdpa_kernel(CUDA_ATTENTION_BACKENDS) if x.is_cuda else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=rows is None, scale=hd ** -0.5,
                                               enable_gqa=gqa)  # (B, H, Tq, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, Tq, self.heads * hd))  # (B, Tq, C)


class Qwen3MLP(nn.Module):
    """down(act(gate(x)) * up(x)). ``QKV`` names gate and up so engine.quantize fuses them into one ``qkv`` Int8Linear
    (its hook for projections of one input), whose output is split in two."""

    QKV = ("gate_proj", "up_proj")

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.act = activation(cfg.act)
        self.gate_proj = Linear(cfg.width, cfg.mlp_width, bias=False)
        self.up_proj = Linear(cfg.width, cfg.mlp_width, bias=False)
        self.down_proj = Linear(cfg.mlp_width, cfg.width, bias=False)
        self.qkv: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qkv is not None:
            gate, up = self.qkv(x).chunk(2, dim=-1)  # (B, T, M) each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate).mul_(up))  # (B, T, C); act may overwrite gate, a fresh tensor


class Qwen3DecoderLayer(nn.Module):
    """Pre-RMSNorm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cfg.eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with ``rows`` (B,), this block's output at those positions only: (B, 1, C)."""
        h = self.self_attn(self.input_layernorm(x), rope, rows)
        x = x + h if rows is None else x[torch.arange(x.shape[0], device=x.device), rows][:, None] + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Embedder(nn.Module):
    """Qwen3Model + sentence-transformers pooling and Dense modules; ``encode_text`` gives (B, dim), not normalized."""

    INT8_KEEP_LAST_BLOCK = True  # where activations get 7 bits only (engine/quantize.py)

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width, cfg.eps)
        if cfg.dense:  # parameter names st_modules.<folder>.linear.*, as the converter stores them
            self.st_modules = nn.ModuleDict({d.path: StDense(d) for d in cfg.dense})

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) int64 right-padded; lengths (B,) real token counts. Returns (B, dim): pooled, then Dense."""
        T = ids.shape[1]
        x = self.embed_tokens(ids)  # (B, T, C)
        rope = self._rope(T, x.dtype, ids.device)
        if self.cfg.pooling == "lasttoken":  # the last block at each row's last token only
            for layer in self.layers[:-1]:
                x = layer(x, rope)
            y = self.norm(self.layers[-1](x, rope, lengths - 1)[:, 0])  # (B, C)
        else:
            for layer in self.layers:
                x = layer(x, rope)
            keep = torch.arange(T, device=ids.device)[None, :] < lengths[:, None]  # (B, T) True = real token
            y = st_pool(self.norm(x), keep, self.cfg.pooling)  # (B, C)
        for d in self.cfg.dense:
            y = self.st_modules[d.path](y)  # (B, D)
        return y

    def _rope(self, T: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of positions 0..T-1, each (T, head_dim), computed in fp32 as transformers'
        Qwen3RotaryEmbedding does, then cast to ``dtype``."""
        hd = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=device) / hd))
        if self.cfg.rope_factor != 1.0:
            inv_freq = inv_freq / self.cfg.rope_factor
        freqs = torch.arange(T, device=device).float()[:, None] * inv_freq  # (T, hd/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def load_parts(path: Path, shapes: Mapping[str, tuple[int, ...]], weights: str = "weights.arrow") -> Parts:
    """The Qwen3 sentence-transformer of a converted folder: its configs read and checked against the weights'
    ``shapes``, the decoder built (parameters on the meta device), and what the text front end needs. ``weights``:
    the weight file's name, for messages."""
    cfg = qwen3_config(path)
    check_config_against_weights(*weight_checks(cfg), shapes, path, weights)
    if cfg.prompt:
        log.info("%s: every text is embedded after the default prompt %r (config_sentence_transformers.json)",
                 path, cfg.prompt)
    # pad_id stays None: Qwen3's pad token (<|endoftext|>) is also the token its tokenizer appends to every text, the
    # one last-token pooling reads, so trailing pad ids of a token-id row cannot be told from it and are kept (and
    # token-id rows are read as sent: the leading pads of a left-padded HF batch would count as tokens)
    text = TextSide(max_length=cfg.max_seq_length, max_tokens=cfg.max_positions, vocab_size=cfg.vocab_size,
                    lowercase=cfg.lowercase, prompt=cfg.prompt, prompts=cfg.prompts,
                    default_prompt=cfg.default_prompt)
    return Parts(net=Qwen3Embedder(cfg), config=cfg, dim=cfg.dim, text=text)


def weight_checks(cfg: Qwen3Config) -> tuple[list[CountCheck], list[ShapeCheck]]:
    """The block count and tensor shapes ``cfg`` makes, checked against the weight file before the build."""
    conf = "config.json"
    width = ("hidden_size", cfg.width)
    q_width = (f"num_attention_heads {cfg.heads} x head_dim {cfg.head_dim}", cfg.heads * cfg.head_dim)
    kv_width = (f"num_key_value_heads {cfg.kv_heads} x head_dim {cfg.head_dim}", cfg.kv_heads * cfg.head_dim)
    block = "layers.0."
    checks = [ShapeCheck("embed_tokens.weight", (("vocab_size", cfg.vocab_size), width), conf),
              ShapeCheck(f"{block}self_attn.q_proj.weight", (q_width, width), conf),
              ShapeCheck(f"{block}self_attn.k_proj.weight", (kv_width, width), conf),
              ShapeCheck(f"{block}self_attn.q_norm.weight", (("head_dim", cfg.head_dim),), conf),
              ShapeCheck(f"{block}mlp.gate_proj.weight", (("intermediate_size", cfg.mlp_width), width), conf),
              ShapeCheck("norm.weight", (width,), conf)]
    if cfg.attention_bias:
        checks.append(ShapeCheck(f"{block}self_attn.q_proj.bias", (q_width,), conf))
    return [CountCheck("layers.", ("num_hidden_layers", cfg.layers), conf)], checks + dense_checks(cfg.dense)
