"""ModernBERT under sentence-transformers (Alibaba-NLP/gte-modernbert-base, nomic-ai/modernbert-embed-base).

Reference: HF transformers 5.25 ``models/modernbert/modeling_modernbert.py`` (ModernBertModel) and
``configuration_modernbert.py`` (ModernBertConfig), run as sentence-transformers wraps it (Transformer -> Pooling ->
any Dense -> optional Normalize, engine.config.st_head). Module names equal the checkpoint keys
(``embeddings.tok_embeddings``, ``layers.0.attn.Wqkv``, ``layers.0.mlp.Wi``, ``final_norm`` ...), so weights
assign directly. The maths, as transformers' SDPA / eager path on CPU computes it:

- embeddings: ``norm(tok_embeddings[ids])``; no position table (positions enter through RoPE);
- pre-LayerNorm blocks ``x += Wo(attn(attn_norm(x)))``, ``x += mlp.Wo(act(a) * g)`` with ``a, g`` the two halves of
  ``mlp.Wi(mlp_norm(x))`` (GeGLU); ``attn_norm`` is the identity in layer 0 (that layer has no such weights);
  LayerNorms and Linears have biases only where ``norm_bias`` / ``attention_bias`` / ``mlp_bias`` say;
- then ``final_norm``;
- RoPE (rotate-half) on q and k, with ``rope_theta`` of the layer's kind: ``full_attention`` layers (global,
  default theta 160,000) and ``sliding_attention`` layers (local, default 10,000). Which layers are which:
  ``layer_types``, else every ``global_attn_every_n_layers``-th (default 3) layer from layer 0 is global;
- local layers: a query at position i sees the keys j with ``|i - j| <= local_attention // 2`` (transformers'
  ``sliding_window_bidirectional_overlay`` over ``config.sliding_window = local_attention // 2``): 129 keys for the
  usual 128; global layers see every key. Padded keys are never seen.

How ours differs (the same numbers; only where the work is done):

- Padding-free (engine.ragged): rows come right-padded with their lengths (engine.model). Embeddings, every
  LayerNorm, Wqkv, Wo and the MLP run on the real tokens only, packed as (N_tokens, C); RoPE too. Only attention
  sees a padded layout: rows of similar length together (spans), one batched SDPA call per span and layer with a
  boolean key mask (padded keys never attend). On CPU in fp32 the token states match transformers' SDPA and eager
  paths to ~2e-6.
- Long rows in local layers: from ``engine.ragged.BANDED_MIN_BLOCKS`` windows on, the queries go in blocks of
  ``local_attention`` that each attend to only the keys their windows can reach (a band of 2 x local_attention
  keys), not to all T: local attention then costs O(T x window), not O(T^2). Blocks past a row's length are skipped.
- ModernBertForMaskedLM's prediction head and decoder (``head.``, ``decoder.``) are dropped at conversion;
  ``rope_type`` other than ``default`` (scaled RoPE) is refused with a clear error.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import (ACTIVATIONS, MAX_LAYERS, DenseConfig, config_eps, config_size, config_value, length_cap,
                           read_json, st_head)
from engine.config_check import CountCheck, ShapeCheck, check_config_against_weights, dense_checks
from engine.errors import ModelConfigError
from engine.layers import Embedding, LayerNorm, Linear, StDense, activation, st_pool
from engine.ragged import RaggedRows, apply_rotary, rope_inv_freq
from engine.registry import Parts, TextSide

log = logging.getLogger(__name__)

GLOBAL, LOCAL = "full_attention", "sliding_attention"  # transformers' layer_types values
_DEFAULT_THETA = {GLOBAL: 160_000.0, LOCAL: 10_000.0}  # ModernBertConfig.default_theta


@dataclass(frozen=True)
class ModernBertConfig:
    """A ModernBertModel as sentence-transformers runs it (config.json, modules.json and the module configs)."""

    width: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads; width % heads == 0 and head_dim even (RoPE rotates halves)
    mlp_width: int  # intermediate_size: mlp.Wi makes 2 x this (input and gate halves)
    act: str  # hidden_activation, one of engine.config.ACTIVATIONS
    eps: float  # norm_eps
    norm_bias: bool  # LayerNorms carry a bias
    attention_bias: bool  # Wqkv and attn.Wo carry a bias
    mlp_bias: bool  # mlp.Wi and mlp.Wo carry a bias
    vocab_size: int
    max_positions: int  # max_position_embeddings: the longest row accepted (RoPE has no table to run out of)
    pad_token_id: int | None
    local_attention: int  # a local layer's query sees keys within local_attention // 2 positions each way
    layer_types: tuple[str, ...]  # GLOBAL or LOCAL per layer
    global_theta: float  # RoPE theta of the global layers
    local_theta: float  # RoPE theta of the local layers
    max_seq_length: int  # texts are cut to this many tokens (sentence-transformers' max_seq_length)
    pooling: str  # one of engine.config.POOLING_MODES
    normalize: bool  # a Normalize module follows
    dense: tuple[DenseConfig, ...] = ()  # Dense modules after pooling, in order
    lowercase: bool = False
    prompt: str = ""  # the default prompt's text
    prompts: tuple[tuple[str, str], ...] = ()  # named prompts (name, text)
    default_prompt: str | None = None

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def half_window(self) -> int:
        """How far a local layer's query sees each way (transformers' ``config.sliding_window``)."""
        return self.local_attention // 2

    @property
    def dim(self) -> int:
        """Width of the sentence embedding: the last Dense module's output, else the encoder's."""
        return self.dense[-1].n_out if self.dense else self.width


def modernbert_config(model_dir: Path) -> ModernBertConfig:
    """Read a sentence-transformers folder over a ModernBertModel: config.json (either layout transformers reads:
    ``layer_types`` + ``rope_parameters`` as 5.x writes them, or ``global_attn_every_n_layers`` +
    ``global_rope_theta`` / ``local_rope_theta`` as the hub's checkpoints have them), then the sentence-transformers
    modules (pooling, Dense, Normalize, max length, prompts).

    Raises:
        ModelConfigError: a field out of range or of the wrong type, a layer kind or RoPE type not supported, a
            width the heads do not divide, an odd head size.
    """
    model_dir = Path(model_dir)
    cfg = read_json(model_dir, "config.json")
    where = f"{model_dir}/config.json"
    model_type = config_value(cfg, "model_type", "modernbert", str, where)
    if model_type != "modernbert":
        raise ModelConfigError(f"{where}: model_type {model_type!r}, expected 'modernbert'")
    width = config_size(cfg, "hidden_size", 768, where)
    heads = config_size(cfg, "num_attention_heads", 12, where)
    if width % heads:
        raise ModelConfigError(f"{where}: hidden_size {width} is not divisible by num_attention_heads {heads}")
    if (width // heads) % 2:
        raise ModelConfigError(f"{where}: hidden_size {width} / num_attention_heads {heads} gives heads of "
                               f"{width // heads} values; RoPE rotates half of each head, so the head size must be "
                               "even")
    layers = config_size(cfg, "num_hidden_layers", 22, where, maximum=MAX_LAYERS)
    act = config_value(cfg, "hidden_activation", "gelu", str, where)
    if act not in ACTIVATIONS:
        raise ModelConfigError(f"{where}: hidden_activation {act!r} is not supported; expected one of {ACTIVATIONS}")
    vocab = config_size(cfg, "vocab_size", 50368, where)
    pad = cfg.get("pad_token_id", 50283)
    pad = None if pad is None else config_size(cfg, "pad_token_id", 50283, where, minimum=0)
    local = config_size(cfg, "local_attention", 128, where)
    if cfg.get("sliding_window") is not None:  # transformers' setter: local_attention = 2 x sliding_window
        local = 2 * config_size(cfg, "sliding_window", None, where)
    global_theta, local_theta = _rope_thetas(cfg, where)
    max_positions = config_size(cfg, "max_position_embeddings", 8192, where)
    head = st_head(model_dir, width)
    return ModernBertConfig(
        width=width, layers=layers, heads=heads,
        mlp_width=config_size(cfg, "intermediate_size", 1152, where),
        act=act, eps=config_eps(cfg, "norm_eps", 1e-5, where),
        norm_bias=config_value(cfg, "norm_bias", False, bool, where),
        attention_bias=config_value(cfg, "attention_bias", False, bool, where),
        mlp_bias=config_value(cfg, "mlp_bias", False, bool, where),
        vocab_size=vocab, max_positions=max_positions,
        pad_token_id=pad if pad is not None and pad < vocab else None,
        local_attention=local, layer_types=_layer_types(cfg, layers, where),
        global_theta=global_theta, local_theta=local_theta,
        max_seq_length=length_cap(head.max_seq_length, max_positions),
        pooling=head.pooling, normalize=head.normalize, dense=head.dense, lowercase=head.lowercase,
        prompt=head.prompt, prompts=head.prompts, default_prompt=head.default_prompt,
    )


def _layer_types(cfg: dict[str, Any], layers: int, where: str) -> tuple[str, ...]:
    """``layer_types`` as written, else transformers' rule: layer i is global when i % every == 0."""
    types = cfg.get("layer_types")
    if types is None:
        every = config_size(cfg, "global_attn_every_n_layers", 3, where)
        return tuple(LOCAL if i % every else GLOBAL for i in range(layers))
    if not isinstance(types, list) or len(types) != layers or any(t not in (GLOBAL, LOCAL) for t in types):
        raise ModelConfigError(f"{where}: layer_types should list {layers} (num_hidden_layers) entries, each "
                               f"{GLOBAL!r} or {LOCAL!r}; got {types!r:.200}; fix the file or remove layer_types "
                               "(then every global_attn_every_n_layers-th layer is global)")
    return tuple(types)


def _rope_thetas(cfg: dict[str, Any], where: str) -> tuple[float, float]:
    """(global theta, local theta) as transformers' ``ModernBertConfig.convert_rope_params_to_dict`` reads them:
    ``rope_parameters[kind]["rope_theta"]``, else ``global_rope_theta`` / ``local_rope_theta``, else the defaults;
    only the plain (``default``) RoPE runs here."""
    params = cfg.get("rope_parameters")
    if params is not None and (not isinstance(params, dict) or set(params) - {GLOBAL, LOCAL}):
        raise ModelConfigError(f"{where}: rope_parameters should map {GLOBAL!r} / {LOCAL!r} to their RoPE "
                               f"settings (as transformers 5 writes them), got {params!r:.200}")
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ModelConfigError(f"{where}: rope_scaling should be an object, got {scaling!r:.200}")
    legacy = {GLOBAL: "global_rope_theta", LOCAL: "local_rope_theta"}
    thetas = []
    for kind in (GLOBAL, LOCAL):
        p = (params or {}).get(kind) or {}
        if not isinstance(p, dict):
            raise ModelConfigError(f"{where}: rope_parameters[{kind!r}] should be an object, got {p!r:.200}")
        p = {**p, **(scaling or {})}  # transformers applies a legacy rope_scaling to both kinds
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type != "default":
            raise ModelConfigError(f"{where}: RoPE type {rope_type!r} ({kind} layers) is not supported; only the "
                                   "plain RoPE ('default') of the published ModernBERT checkpoints runs here; use a "
                                   "checkpoint without rope_scaling")
        theta = p.get("rope_theta")
        if theta is None:
            theta = config_value(cfg, legacy[kind], _DEFAULT_THETA[kind], float, where)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1:
            raise ModelConfigError(f"{where}: rope_theta of the {kind} layers is {theta!r}, expected a number "
                                   "above 1 such as 160000 or 10000")
        thetas.append(float(theta))
    return thetas[0], thetas[1]


# -- the network ------------------------------------------------------------------------------------------------

def _layer_norm(width: int, eps: float, bias: bool) -> LayerNorm:
    """A LayerNorm whose weights come from the file; without a bias where ``norm_bias`` is false."""
    norm = LayerNorm(width, eps)
    if not bias:
        norm._parameters["bias"] = None
    return norm


class _Embeddings(nn.Module):
    def __init__(self, cfg: ModernBertConfig) -> None:
        super().__init__()
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.width)
        self.norm = _layer_norm(cfg.width, cfg.eps, cfg.norm_bias)


class _Attention(nn.Module):
    def __init__(self, cfg: ModernBertConfig) -> None:
        super().__init__()
        self.Wqkv = Linear(cfg.width, 3 * cfg.width, bias=cfg.attention_bias)  # q, k, v: each (heads, head_dim)
        self.Wo = Linear(cfg.width, cfg.width, bias=cfg.attention_bias)


class _MLP(nn.Module):
    def __init__(self, cfg: ModernBertConfig) -> None:
        super().__init__()
        self.Wi = Linear(cfg.width, 2 * cfg.mlp_width, bias=cfg.mlp_bias)  # input half, then gate half
        self.Wo = Linear(cfg.mlp_width, cfg.width, bias=cfg.mlp_bias)


class ModernBertLayer(nn.Module):
    """Pre-LayerNorm block over packed tokens: x += Wo(attn(attn_norm(x))); x += mlp(mlp_norm(x))."""

    def __init__(self, cfg: ModernBertConfig, index: int) -> None:
        super().__init__()
        self.kind = cfg.layer_types[index]
        self.attn_norm = nn.Identity() if index == 0 else _layer_norm(cfg.width, cfg.eps, cfg.norm_bias)
        self.attn = _Attention(cfg)
        self.mlp_norm = _layer_norm(cfg.width, cfg.eps, cfg.norm_bias)
        self.mlp = _MLP(cfg)
        self.act = activation(cfg.act)

    def forward(self, x: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """x (N, C): the group's real tokens, packed."""
        y = batch.attend_qkv(self.attn.Wqkv(self.attn_norm(x)), self.kind)  # (N, C)
        x = x + self.attn.Wo(y)
        h = self.mlp.Wi(self.mlp_norm(x))  # (N, 2M)
        a, gate = h.chunk(2, dim=-1)  # (N, M) each, views of the fresh h: the activation may overwrite a
        return x + self.mlp.Wo(self.act(a).mul_(gate))  # (N, C)


class _Batch(RaggedRows):
    """One group of right-padded rows, packed (engine.ragged), with its RoPE angles per layer kind, made once per
    forward and shared by the layers."""

    def __init__(self, cfg: ModernBertConfig, lengths: torch.Tensor, T: int, dtype: torch.dtype,
                 inv_freq: dict[str, torch.Tensor], max_padding: float) -> None:
        super().__init__(lengths, T, max_padding)
        self.cfg = cfg
        # cos, sin (N, 1, 1, head_dim) per layer kind
        self.rope = {kind: tuple(t[:, None, None, :] for t in self.rotary(f, dtype)) for kind, f in inv_freq.items()}

    def attend_qkv(self, qkv: torch.Tensor, kind: str) -> torch.Tensor:
        """Self-attention of the packed tokens: qkv (N, 3C) -> (N, C), each row attending to the keys of its own
        row that the layer's kind lets it see."""
        cfg = self.cfg
        N, h, d = qkv.shape[0], cfg.heads, cfg.head_dim
        heads = qkv.view(N, 3, h, d)
        # q and k rotated in fp32 and cast back, as transformers' apply_rotary_pos_emb
        qk = apply_rotary(heads[:, :2].float(), *self.rope[kind]).to(qkv.dtype)  # (N, 2, h, d)
        q, k, v = qk[:, 0].reshape(N, h * d), qk[:, 1].reshape(N, h * d), heads[:, 2].reshape(N, h * d)  # views
        reach = cfg.half_window if kind == LOCAL else None
        return self.attend(q, k, v, h, h, d ** -0.5, reach=reach, block=cfg.local_attention)  # (N, C)


class SentenceModernBert(nn.Module):
    """ModernBertModel + sentence-transformers pooling and Dense modules. ``encode_text`` returns (B, dim), not
    normalized."""

    RAGGED_TEXT = True  # encode_text packs its rows; attention pads in spans of similar length (engine.ragged)

    def __init__(self, cfg: ModernBertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.layers = nn.ModuleList(ModernBertLayer(cfg, i) for i in range(cfg.layers))
        self.final_norm = _layer_norm(cfg.width, cfg.eps, cfg.norm_bias)
        if cfg.dense:  # parameter names st_modules.<folder>.linear.*, as the converter stores them
            self.st_modules = nn.ModuleDict({d.path: StDense(d) for d in cfg.dense})
        # per layer kind in use; plain tensors, not buffers (engine.precision moves parameters only)
        thetas = {GLOBAL: cfg.global_theta, LOCAL: cfg.local_theta}
        self._inv_freq = {kind: rope_inv_freq(thetas[kind], cfg.head_dim) for kind in sorted(set(cfg.layer_types))}

    def token_states(self, ids: torch.Tensor, lengths: torch.Tensor,
                     max_padding: float = math.inf) -> tuple[torch.Tensor, _Batch]:
        """The last hidden state of every real token, packed (N, C) in row-major order of (row, position), and
        the group's layout. ids (B, T) right-padded; lengths (B,) real token counts; ``max_padding``: attention's
        spans (engine.ragged.RaggedRows)."""
        e = self.embeddings
        batch = _Batch(self.cfg, lengths, ids.shape[1], e.tok_embeddings.weight.dtype, self._inv_freq, max_padding)
        x = e.norm(e.tok_embeddings(batch.pack(ids)))  # (N, C)
        for layer in self.layers:
            x = layer(x, batch)
        return self.final_norm(x), batch

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor, max_padding: float = math.inf) -> torch.Tensor:
        """ids (B, T) right-padded; lengths (B,) real token counts; ``max_padding``: how much attention's spans of
        similar lengths may pad (engine.ragged). Returns (B, dim): pooled, then Dense."""
        return self(ids, lengths, max_padding)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, max_padding: float = math.inf) -> torch.Tensor:
        """As :meth:`encode_text`."""
        x, batch = self.token_states(ids, lengths, max_padding)
        y = st_pool(batch.unpack(x), batch.keep, self.cfg.pooling)  # (B, C)
        for d in self.cfg.dense:
            y = self.st_modules[d.path](y)  # (B, D)
        return y


def load_parts(path: Path, shapes: Mapping[str, tuple[int, ...]], weights: str = "weights.arrow") -> Parts:
    """The sentence-transformer over ModernBERT of a converted folder: its configs read and checked against the
    weights' ``shapes``, the network built (parameters on the meta device), and what the text front end needs.
    ``weights``: the weight file's name, for messages."""
    cfg = modernbert_config(path)
    check_config_against_weights(*weight_checks(cfg), shapes, path, weights)
    if cfg.prompt:
        log.info("%s: every text is embedded after the default prompt %r (config_sentence_transformers.json)",
                 path, cfg.prompt)
    text = TextSide(max_length=cfg.max_seq_length, max_tokens=cfg.max_positions, vocab_size=cfg.vocab_size,
                    lowercase=cfg.lowercase, prompt=cfg.prompt, prompts=cfg.prompts,
                    default_prompt=cfg.default_prompt, pad_id=cfg.pad_token_id)
    return Parts(net=SentenceModernBert(cfg), config=cfg, dim=cfg.dim, text=text)


def weight_checks(cfg: ModernBertConfig) -> tuple[list[CountCheck], list[ShapeCheck]]:
    """The layer count and tensor shapes ``cfg`` makes, checked against the weight file before the build."""
    conf = "config.json"
    width, mlp = ("hidden_size", cfg.width), ("intermediate_size", cfg.mlp_width)
    checks = [ShapeCheck("embeddings.tok_embeddings.weight", (("vocab_size", cfg.vocab_size), width), conf),
              ShapeCheck("layers.0.attn.Wqkv.weight", (("3 x hidden_size", 3 * cfg.width), width), conf),
              ShapeCheck("layers.0.mlp.Wi.weight", (("2 x intermediate_size", 2 * cfg.mlp_width), width), conf),
              ShapeCheck("layers.0.mlp.Wo.weight", (width, mlp), conf),
              ShapeCheck("final_norm.weight", (width,), conf)]
    # a bias the config asks for must be there (one the config does not ask for is refused when weights assign)
    if cfg.norm_bias:
        checks.append(ShapeCheck("final_norm.bias", (("hidden_size (norm_bias true)", cfg.width),), conf))
    if cfg.attention_bias:
        checks.append(ShapeCheck("layers.0.attn.Wqkv.bias", (("3 x hidden_size (attention_bias true)",
                                                               3 * cfg.width),), conf))
    if cfg.mlp_bias:
        checks.append(ShapeCheck("layers.0.mlp.Wi.bias", (("2 x intermediate_size (mlp_bias true)",
                                                            2 * cfg.mlp_width),), conf))
    checks += dense_checks(cfg.dense)
    return [CountCheck("layers.", ("num_hidden_layers", cfg.layers), conf)], checks
