"""EmbeddingGemma: a sentence-transformer over a bidirectional Gemma 3 text model (google/embeddinggemma-300m).

Reference: HF transformers ``models/gemma3/modeling_gemma3.py`` (Gemma3TextModel with
``use_bidirectional_attention: true``, ``configuration_gemma3.py`` for the config) and sentence-transformers'
Transformer -> Pooling(mean) -> Dense(768 -> 3072) -> Dense(3072 -> 768) -> Normalize. Module names equal the
checkpoint keys as save_pretrained writes them inside the sentence-transformers folder (``embed_tokens``,
``layers.0.self_attn.q_proj``, ``norm``; a ``model.`` prefix of a Gemma3ForCausalLM file is stripped and its
``lm_head`` dropped by the registry entry).

What runs, as transformers does it:

- token embeddings times sqrt(hidden_size), the factor rounded to the compute dtype first (bf16: 27.71 -> 27.75);
- pre- and post-norm blocks: ``x + post_attention_layernorm(attn(input_layernorm(x)))``, then
  ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``; every RMSNorm computes
  ``x / rms(x) * (1 + weight)`` in float32 and casts back; the MLP is ``down(gelu_tanh(gate(x)) * up(x))``;
- attention: q / k / v projections (``num_key_value_heads`` shared by groups of query heads, GQA), ``q_norm`` /
  ``k_norm`` (RMSNorm over ``head_dim``, which need not be hidden_size / heads), rotary embeddings (theta from
  ``rope_parameters``: the global one on ``full_attention`` layers, the local one on ``sliding_attention`` layers;
  older configs: ``rope_theta`` / ``rope_local_base_freq``), scores scaled by ``query_pre_attn_scalar ** -0.5``;
- which keys a query sees: full-attention layers, every real token; sliding layers, the real tokens at most
  ``sliding_window // 2`` positions away on either side. (Gemma3TextConfig turns config.json's
  ``sliding_window`` S into S // 2 + 1 when attention is bidirectional, and the mask is
  ``|q - k| < S // 2 + 1``, OR-ed with the causal sliding mask it contains, AND-ed with the padding mask.) Padded
  keys are never seen;
- the final ``norm``, mean pooling over the real tokens, the Dense modules, L2 normalization (engine.model).

How ours differs: padding-free (engine.ragged): the embeddings, every norm, projection, rotary embedding and the
MLP run on the real tokens only, packed as (N, C), over a whole forward group whatever its lengths; attention alone
sees right-padded layouts, one SDPA call per layer for each span of rows of similar length, and sliding layers on
rows of 4 windows or more run in blocks of queries over their key band (O(T x window)). Positions are always
0..n-1 from the first real token (transformers' Gemma tokenizer pads on the left, and rotary attention depends
only on the distance between tokens, so the two agree up to rounding); masks are built once per forward pass, the
rotary cos / sin once per layer type; q / k / v may be one fused int8 GEMM (engine.quantize).
``attn_logit_softcapping`` is ignored, as transformers' Gemma 3 ignores it (its attention never passes it on).
Not supported (ModelConfigError naming config.json and the field): causal attention
(``use_bidirectional_attention`` false: the registry leaves such a folder to store mode), rope types other than
"default" (Gemma 3 4B-27B's "linear" scaling of the global theta), layer types other than ``sliding_attention`` /
``full_attention``. float16 is refused (PrecisionError): Gemma's activations overflow it.

Precision on the CPU paths, measured at EmbeddingGemma's widths (3 layers, random weights at a fixed
seed) on 64 varied texts (empty, one character, CJK, emoji, 3 to 300 words) without a prompt and with
the query and document prompts, minimum / mean cosine to fp32: bf16 0.99992 / 0.99996, int8 0.99896 / 0.99946
(AVX-512 VNNI: 8-bit activations). With the post-norm weights drawn 8x larger (residual stream up to |x| ~150, as
Gemma's grows): bf16 0.99989, int8 0.99880. The RMSNorms and the softmax run in float32 in every precision (as in
transformers), and that is all bf16 needs: keeping the residual stream in float32 as well moved bf16's minimum by
< 1e-5 (0.99992 -> 0.99992, 0.99989 -> 0.99990), so it stays in bf16 as transformers has it. Gemma's large
activations overflow float16 (65,504), not bf16 (float32's range). int8 quantizes every Linear, the two Dense
modules too (keeping them in fp32: 0.99896 -> 0.99909, not worth the time). BF16_MIN_COSINE / INT8_MIN_COSINE
are the goals the tests hold every geometry to.

Speed (fp32, embeddinggemma-300m's full geometry with random weights, bench/models.py's 128 texts of 18-273
tokens, one process on 2 AMX Xeon cores, torch's default OpenMP spin): padded groups 9.9 s, padding-free 9.0 s
(8,918 tokens instead of 9,874), of which the GEMMs are ~77 % (~260 GFLOP/s, the machine's fp32 limit ~300-340)
and attention ~7 %. The RMSNorm as one vector-norm reduction and two passes: 0.50 -> 0.34 ms per (1,000, 768) call
(torch's rms_norm composite: 9 % of the time before). The post-norms fold into the residual add (one ``addcmul``).
Forward groups cut by the token budget alone, attention in spans of similar length (engine.ragged), same texts,
fresh processes alternating: fp32 8.4-9.7 -> 8.1-8.8 s; bf16 4.6-4.8 -> 3.7-3.9 s (AMX's bf16 GEMMs gain most
from 4x the rows).
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

from engine.config import (
    ACTIVATIONS, MAX_LAYERS, DenseConfig, config_eps, config_size, config_value, length_cap, read_json, st_head,
)
from engine.config_check import CountCheck, ShapeCheck, check_config_against_weights, dense_checks
from engine.errors import ModelConfigError, PrecisionError
from engine.layers import (Embedding, Linear, StDense, activation, inverse_rms, linear_act, meta_parameter,
                           st_pool)
from engine.ragged import RaggedRows, apply_rotary, rope_inv_freq
from engine.registry import Parts, TextSide

log = logging.getLogger(__name__)

MODEL_TYPE = "gemma3_text"
SLIDING, FULL = "sliding_attention", "full_attention"
LAYER_TYPES = (SLIDING, FULL)
# Gemma3TextConfig's defaults where config.json omits a key (transformers 5.25).
_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                 max_position_embeddings=131_072, rms_norm_eps=1e-6, pad_token_id=0, query_pre_attn_scalar=256,
                 sliding_window=4096, sliding_window_pattern=6)
_DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}
_OLD_THETA_KEYS = {FULL: "rope_theta", SLIDING: "rope_local_base_freq"}  # configs before rope_parameters

# Minimum cosine to fp32 every test geometry must reach (measured values: the module docstring).
BF16_MIN_COSINE = 0.999
INT8_MIN_COSINE = 0.99


@dataclass(frozen=True)
class Gemma3Config:
    """A Gemma3TextModel with bidirectional attention under a sentence-transformer, as the engine runs it."""

    width: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads; divides heads
    head_dim: int  # even (rotary halves)
    mlp_width: int  # intermediate_size
    act: str  # hidden_activation, one of engine.config.ACTIVATIONS
    eps: float  # rms_norm_eps
    vocab_size: int
    max_positions: int  # max_position_embeddings: the longest token row accepted
    query_pre_attn_scalar: float  # scores are scaled by its -1/2 power
    layer_types: tuple[str, ...]  # one of LAYER_TYPES per layer
    sliding_window: int  # as config.json has it: a sliding layer's query sees keys up to sliding_window // 2 away
    rope_theta: float  # full-attention layers
    rope_local_theta: float  # sliding layers
    attention_bias: bool
    pad_token_id: int
    max_seq_length: int  # texts are cut to this many tokens (bos and eos included)
    pooling: str  # engine.config.POOLING_MODES
    normalize: bool
    dense: tuple[DenseConfig, ...] = ()
    lowercase: bool = False
    prompt: str = ""
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt: str | None = None

    @property
    def reach(self) -> int:
        """How far (in positions, either side) a query of a sliding layer sees."""
        return self.sliding_window // 2

    @property
    def dim(self) -> int:
        return self.dense[-1].n_out if self.dense else self.width

    def theta(self, layer_type: str) -> float:
        return self.rope_theta if layer_type == FULL else self.rope_local_theta


def gemma3_config(model_dir: Path) -> Gemma3Config:
    """Read a sentence-transformers folder over a Gemma3TextModel: config.json and the sentence-transformers
    head (engine.config.st_head), every field checked.

    Raises:
        ModelConfigError: a field of the wrong type or out of range, causal attention, an unsupported rope type
            or layer type, heads not a multiple of the key/value heads.
    """
    model_dir = Path(model_dir)
    cfg = read_json(model_dir, "config.json")
    where = f"{model_dir}/config.json"
    model_type = config_value(cfg, "model_type", None, str, where)
    if model_type != MODEL_TYPE:
        raise ModelConfigError(f"{where}: model_type {model_type!r}, expected {MODEL_TYPE!r} (a Gemma 3 text model)")
    if config_value(cfg, "use_bidirectional_attention", False, bool, where) is not True:
        raise ModelConfigError(f"{where}: use_bidirectional_attention is false: a causal Gemma 3 (a language model) "
                               "is not supported; the engine runs EmbeddingGemma's bidirectional encoder")
    def size(key: str, **kw: int) -> int:
        return config_size(cfg, key, _DEFAULTS[key], where, **kw)

    width, layers, heads = size("hidden_size"), size("num_hidden_layers", maximum=MAX_LAYERS), \
        size("num_attention_heads")
    kv_heads, head_dim = size("num_key_value_heads"), size("head_dim")
    if heads % kv_heads:
        raise ModelConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                               f"{kv_heads}; each key/value head serves a whole group of query heads")
    if head_dim % 2:
        raise ModelConfigError(f"{where}: head_dim {head_dim} is odd; rotary embeddings rotate pairs of values")
    act = config_value(cfg, "hidden_activation", _DEFAULTS["hidden_activation"], str, where)
    if act not in ACTIVATIONS:
        raise ModelConfigError(f"{where}: hidden_activation {act!r} is not supported; expected one of {ACTIVATIONS}")
    scalar = config_value(cfg, "query_pre_attn_scalar", _DEFAULTS["query_pre_attn_scalar"], float, where)
    if not scalar > 0:
        raise ModelConfigError(f"{where}: query_pre_attn_scalar is {scalar}, expected a positive number")
    types = _layer_types(cfg, layers, where)
    # sliding_window only matters with sliding layers (transformers fails on null even without them)
    window = config_size(cfg, "sliding_window", _DEFAULTS["sliding_window"], where) if SLIDING in types else 0
    thetas = _rope_thetas(cfg, where)
    positions = size("max_position_embeddings")
    head = st_head(model_dir, width)
    return Gemma3Config(
        width=width, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        mlp_width=size("intermediate_size"), act=act, eps=config_eps(cfg, "rms_norm_eps", 1e-6, where),
        vocab_size=size("vocab_size"), max_positions=positions, query_pre_attn_scalar=scalar, layer_types=types,
        sliding_window=window, rope_theta=thetas[FULL], rope_local_theta=thetas[SLIDING],
        attention_bias=config_value(cfg, "attention_bias", False, bool, where),
        pad_token_id=config_size(cfg, "pad_token_id", 0, where, minimum=0),
        max_seq_length=length_cap(head.max_seq_length, positions), pooling=head.pooling, normalize=head.normalize,
        dense=head.dense, lowercase=head.lowercase, prompt=head.prompt, prompts=head.prompts,
        default_prompt=head.default_prompt)


def _layer_types(cfg: dict[str, Any], layers: int, where: str) -> tuple[str, ...]:
    """``layer_types``, else transformers' default pattern: every ``sliding_window_pattern``-th layer full."""
    types = cfg.get("layer_types")
    if types is None:
        pattern = config_size(cfg, "sliding_window_pattern", cfg.get("_sliding_window_pattern", 6), where)
        return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(layers))
    if not isinstance(types, list) or len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise ModelConfigError(f"{where}: layer_types should list one of {LAYER_TYPES} for each of the "
                               f"{layers} layers (num_hidden_layers), got {types!r:.300}")
    return tuple(types)


def _rope_thetas(cfg: dict[str, Any], where: str) -> dict[str, float]:
    """The rotary base of each layer type, as Gemma3TextConfig resolves it: ``rope_parameters[type]["rope_theta"]``,
    else the older ``rope_theta`` (full) / ``rope_local_base_freq`` (sliding), else 1e6 / 1e4; an older
    ``rope_scaling`` applies to full-attention layers. Only the "default" rope type is supported."""
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ModelConfigError(f"{where}: rope_parameters should be an object, got {params!r:.200}")
    out = {}
    for layer_type in LAYER_TYPES:
        p = (params or {}).get(layer_type)
        if p is None and params is None and layer_type == FULL:
            p = cfg.get("rope_scaling")
        p = p or {}
        if not isinstance(p, dict):
            raise ModelConfigError(f"{where}: rope parameters of {layer_type} should be an object, got {p!r:.200}")
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type != "default":
            raise ModelConfigError(f"{where}: rope_type {rope_type!r} on {layer_type} layers is not supported; "
                                   "expected 'default' (as EmbeddingGemma has)")
        key = _OLD_THETA_KEYS[layer_type]
        theta = p.get("rope_theta", cfg.get(key, _DEFAULT_THETA[layer_type]))
        theta = config_value({key: theta}, key, None, float, where)
        if not theta > 0:
            raise ModelConfigError(f"{where}: the rope theta of {layer_type} layers is {theta}, expected > 0")
        out[layer_type] = theta
    return out


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / sqrt(mean(x^2) + eps) * (1 + weight)``, computed in float32, cast back to x's dtype."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = meta_parameter(width)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return torch.mul(xf, inverse_rms(xf, self.eps)).mul_(1.0 + self.weight.float()).type_as(x)

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x + self(y)`` for a fresh ``y`` (a layer's output, overwritten): in float32 as one scaling of y in
        place and one ``addcmul``, two passes fewer than the norm and the add apart (other dtypes: as written,
        the norm's output rounded to the dtype before the add, as transformers does)."""
        if x.dtype != torch.float32 or y.dtype != torch.float32:
            return x + self(y)
        return torch.addcmul(x, y.mul_(inverse_rms(y, self.eps)), 1.0 + self.weight)


class Gemma3Attention(nn.Module):
    """``self_attn``: q / k / v / o projections, q_norm and k_norm, rotary embeddings, grouped key/value heads."""

    QKV = ("q_proj", "k_proj", "v_proj")  # engine.quantize may replace these by one fused ``qkv``

    def __init__(self, cfg: Gemma3Config) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        q_width, kv_width = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.split = (q_width, kv_width, kv_width)
        self.q_proj = Linear(cfg.width, q_width, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.width, kv_width, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.width, kv_width, bias=cfg.attention_bias)
        self.o_proj = Linear(q_width, cfg.width, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.qkv: nn.Module | None = None

    def forward(self, x: torch.Tensor, rows: _Rows, reach: int | None) -> torch.Tensor:
        """x (N, C): the group's real tokens, packed; ``reach``: how far a query sees (None: its whole row)."""
        N = x.shape[0]
        if self.qkv is not None:
            q, k, v = self.qkv(x).split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (N, h*d), (N, kv*d) x2
        cos, sin = rows.rope[reach]  # (N, 1, d)
        q = apply_rotary(self.q_norm(q.view(N, self.heads, self.head_dim)), cos, sin)  # (N, h, d)
        k = apply_rotary(self.k_norm(k.view(N, self.kv_heads, self.head_dim)), cos, sin)  # (N, kv, d)
        y = rows.attend(q.view(N, -1), k.view(N, -1), v, self.heads, self.kv_heads, self.scale, reach)  # (N, h*d)
        return self.o_proj(y)  # (N, C)


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: Gemma3Config) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.width, cfg.mlp_width, bias=False)
        self.up_proj = Linear(cfg.width, cfg.mlp_width, bias=False)
        self.down_proj = Linear(cfg.mlp_width, cfg.width, bias=False)
        self.act_name = cfg.act
        self.act = activation(cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = linear_act(self.gate_proj, x, self.act_name, self.act)  # (B, T, M), a fresh tensor
        return self.down_proj(gate.mul_(self.up_proj(x)))  # (B, T, C)


class Gemma3Layer(nn.Module):
    """A decoder layer run bidirectionally: pre- and post-norm around attention and around the MLP."""

    def __init__(self, cfg: Gemma3Config, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.reach = cfg.reach if layer_type == SLIDING else None  # how far a query sees; None: its whole row
        self.self_attn = Gemma3Attention(cfg)
        self.mlp = Gemma3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.width, cfg.eps)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.width, cfg.eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.width, cfg.eps)

    def forward(self, x: torch.Tensor, rows: _Rows) -> torch.Tensor:
        """x (N, C): the group's real tokens, packed."""
        x = self.post_attention_layernorm.residual(x, self.self_attn(self.input_layernorm(x), rows, self.reach))
        return self.post_feedforward_layernorm.residual(x, self.mlp(self.pre_feedforward_layernorm(x)))  # (N, C)


class EmbeddingGemma(nn.Module):
    """Gemma3TextModel (bidirectional) + sentence-transformers pooling and Dense modules. ``encode_text`` returns
    (B, dim), not normalized."""

    INT8_KEEP_LAST_BLOCK = True  # only where activations get 7 bits (engine/quantize.py), as SentenceBert
    RAGGED_TEXT = True  # encode_text packs its rows; attention pads in spans of similar length (engine.ragged)

    def __init__(self, cfg: Gemma3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(Gemma3Layer(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.width, cfg.eps)
        if cfg.dense:  # parameter names st_modules.<folder>.linear.*, as the converter stores them
            self.st_modules = nn.ModuleDict({d.path: StDense(d) for d in cfg.dense})
        # transformers' inverse frequencies, computed as it does (float32, on the CPU), per layer type
        self._inv_freq = {t: rope_inv_freq(cfg.theta(t), cfg.head_dim) for t in set(cfg.layer_types)}

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor, max_padding: float = math.inf) -> torch.Tensor:
        """ids (B, T) right-padded; lengths (B,) real token counts; ``max_padding``: how much attention's spans of
        similar lengths may pad (engine.ragged). Returns (B, dim): pooled, then Dense."""
        return self(ids, lengths, max_padding)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, max_padding: float = math.inf) -> torch.Tensor:
        """As :meth:`encode_text`."""
        w = self.embed_tokens.weight
        if w.dtype == torch.float16:
            raise PrecisionError("EmbeddingGemma does not run in float16: Gemma's activations overflow it; load it "
                                 "with precision='bf16' (or 'fp32')")
        rows = _Rows(lengths, ids.shape[1], {layer.reach: self._inv_freq[layer.layer_type] for layer in self.layers},
                     w.dtype, max_padding)
        x = self.embed_tokens(rows.pack(ids)) * torch.tensor(self.cfg.width ** 0.5).to(w.dtype)  # (N, C)
        for layer in self.layers:
            x = layer(x, rows)
        y = st_pool(rows.unpack(self.norm(x)), rows.keep, self.cfg.pooling)  # (B, C)
        for d in self.cfg.dense:
            y = self.st_modules[d.path](y)  # (B, D)
        return y


class _Rows(RaggedRows):
    """One group of right-padded rows, packed (engine.ragged), with the rotary cos / sin (N, 1, head_dim) of its
    tokens per layer reach (one theta per layer type), in the compute dtype as transformers has them."""

    def __init__(self, lengths: torch.Tensor, T: int, inv_freq: dict[int | None, torch.Tensor],
                 dtype: torch.dtype, max_padding: float) -> None:
        super().__init__(lengths, T, max_padding)
        self.rope = {reach: tuple(t[:, None, :] for t in self.rotary(f, dtype)) for reach, f in inv_freq.items()}


def load_parts(path: Path, shapes: Mapping[str, tuple[int, ...]], weights: str = "weights.arrow") -> Parts:
    """The EmbeddingGemma of a converted folder: its configs read and checked against the weights' ``shapes``,
    the model built (parameters on the meta device), and what the text front end needs. ``weights``: the weight
    file's name, for messages."""
    cfg = gemma3_config(path)
    check_config_against_weights(*weight_checks(cfg), shapes, path, weights)
    if cfg.prompt:
        log.info("%s: every text is embedded after the default prompt %r (config_sentence_transformers.json)",
                 path, cfg.prompt)
    text = TextSide(max_length=cfg.max_seq_length, max_tokens=cfg.max_positions, vocab_size=cfg.vocab_size,
                    lowercase=cfg.lowercase, prompt=cfg.prompt, prompts=cfg.prompts,
                    default_prompt=cfg.default_prompt, pad_id=cfg.pad_token_id)
    return Parts(net=EmbeddingGemma(cfg), config=cfg, dim=cfg.dim, text=text)


def weight_checks(cfg: Gemma3Config) -> tuple[list[CountCheck], list[ShapeCheck]]:
    """The layer count and tensor shapes ``cfg`` makes, checked against the weight file before the build."""
    conf = "config.json"
    width = ("hidden_size", cfg.width)
    q = (f"num_attention_heads {cfg.heads} x head_dim {cfg.head_dim}", cfg.heads * cfg.head_dim)
    kv = (f"num_key_value_heads {cfg.kv_heads} x head_dim {cfg.head_dim}", cfg.kv_heads * cfg.head_dim)
    attn = "layers.0.self_attn."
    checks = [ShapeCheck("embed_tokens.weight", (("vocab_size", cfg.vocab_size), width), conf),
              ShapeCheck(f"{attn}q_proj.weight", (q, width), conf),
              ShapeCheck(f"{attn}k_proj.weight", (kv, width), conf),
              ShapeCheck(f"{attn}o_proj.weight", (width, q), conf),
              ShapeCheck(f"{attn}q_norm.weight", (("head_dim", cfg.head_dim),), conf),
              ShapeCheck("layers.0.mlp.gate_proj.weight", (("intermediate_size", cfg.mlp_width), width), conf),
              ShapeCheck("norm.weight", (width,), conf)]
    return [CountCheck("layers.", ("num_hidden_layers", cfg.layers), conf)], checks + dense_checks(cfg.dense)
