"""Frozen model configurations, read once from a model directory's HF files.

Only what the engine's own implementation needs is kept; every field is
checked when it is read so a bad config fails at load, not mid-request.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ModelConfigError

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")


@dataclass(frozen=True)
class TowerConfig:
    """A stack of transformer blocks."""

    width: int  # hidden size
    layers: int  # number of blocks
    heads: int  # attention heads; width % heads == 0
    mlp_width: int  # MLP hidden size
    act: str  # one of ACTIVATIONS
    eps: float  # LayerNorm epsilon

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ModelConfigError(f"hidden size {self.width} is not divisible by {self.heads} heads")
        if self.act not in ACTIVATIONS:
            raise ModelConfigError(f"activation {self.act!r} is not supported; expected one of {ACTIVATIONS}")


@dataclass(frozen=True)
class ClipTextConfig:
    tower: TowerConfig
    vocab_size: int
    max_positions: int  # 77 for OpenAI CLIP
    eos_token_id: int  # 2 means the legacy rule: pool at argmax(input_ids)


@dataclass(frozen=True)
class ClipVisionConfig:
    tower: TowerConfig
    image_size: int
    patch_size: int
    channels: int = 3

    @property
    def grid(self) -> int:
        """Patches per side; pixels past grid * patch_size are dropped, as HF's strided conv does."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ClipConfig:
    """A CLIPModel (both towers), or one tower with its projection: CLIPTextModelWithProjection (vision None) or
    CLIPVisionModelWithProjection (text None), as diffusers pipelines and IP-Adapter image encoders ship them."""

    text: ClipTextConfig | None
    vision: ClipVisionConfig | None
    projection_dim: int

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("text",) * (self.text is not None) + ("image",) * (self.vision is not None)


POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers < 6 named each pooling mode by a boolean key; 6.x writes ``"pooling_mode": "mean"``.
_LEGACY_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                        "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# The sentence-transformers modules the engine runs, by class name: before 6.x they are
# ``sentence_transformers.models.Transformer``; 6.x writes e.g. ``sentence_transformers.base.modules.transformer.Transformer``.
ST_RUNNABLE_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
# Weights of a sentence-transformers module folder (2_Dense/model.safetensors: linear.weight) are stored in
# weights.arrow as ``st_modules.2_Dense.linear.weight``.
ST_MODULE_PREFIX = "st_modules."
# Dense activations sentence-transformers writes (``activation_function``), by class name.
DENSE_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid")
# Encoders the engine runs under a sentence-transformer: BERT and RoBERTa / XLM-R (BERT's module names;
# positions counted from pad_token_id + 1), MPNet (its own module names, relative position buckets,
# positions counted from 2 as transformers' MPNetEmbeddings does, whatever pad_token_id says), DistilBERT
# (its own module and config key names, no token types) and ALBERT (narrow embeddings mapped up to the
# encoder's width, blocks shared across layers in groups).
BERT_FAMILY = ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "albert")
_POSITIONS_AFTER_PAD = ("roberta", "xlm-roberta")
MPNET_PAD_POSITION = 1  # transformers' MPNetEmbeddings.padding_idx (fixed, not read from config.json)
MPNET_BUCKETS = 32  # the relative-position buckets transformers' MPNetEncoder computes (fixed)
# Module config file names sentence-transformers tries, in its order (the BERT-family ones).
_ST_CONFIG_FILES = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_xlm-roberta_config.json")


@dataclass(frozen=True)
class DenseConfig:
    """A sentence-transformers Dense module after pooling: y = act(x @ W.T + b)."""

    path: str  # its folder, e.g. "2_Dense"; its weights are st_modules.<path>.linear.*
    n_in: int
    n_out: int
    bias: bool
    act: str  # one of DENSE_ACTIVATIONS


@dataclass(frozen=True)
class BertConfig:
    """A BERT-family encoder as sentence-transformers uses it (Transformer -> Pooling -> Normalize)."""

    tower: TowerConfig
    vocab_size: int
    max_positions: int  # rows of the position table
    type_vocab_size: int
    pad_token_id: int
    max_seq_length: int  # truncation length for texts (sentence-transformers' max_seq_length)
    pooling: str  # one of POOLING_MODES
    normalize: bool  # a Normalize module follows pooling
    model_type: str = "bert"  # one of BERT_FAMILY
    lowercase: bool = False  # sentence-transformers' do_lower_case: texts are lowercased before tokenizing
    relative_buckets: int = 0  # MPNet: rows of encoder.relative_attention_bias; 0 for the others
    dense: tuple[DenseConfig, ...] = ()  # Dense modules after pooling, in order
    prompt: str = ""  # config_sentence_transformers.json's default prompt, put before every text
    embed_width: int = 0  # ALBERT: width of the embeddings before embedding_hidden_mapping_in; 0: tower.width
    layer_groups: int = 1  # ALBERT: num_hidden_groups (layer i runs group int(i / (layers / groups)), as HF)
    inner_layers: int = 1  # ALBERT: inner_group_num, blocks per group

    @property
    def dim(self) -> int:
        """Width of the sentence embedding: the last Dense module's output, else the encoder's."""
        return self.dense[-1].n_out if self.dense else self.tower.width

    @property
    def position_offset(self) -> int:
        """Index of the first position row: RoBERTa and XLM-R number positions from pad_token_id + 1, MPNet
        from 2."""
        return _position_offset(self.model_type, self.pad_token_id)

    @property
    def position_pad_id(self) -> int:
        """The token id that position numbering skips (RoBERTa / XLM-R: pad_token_id; MPNet: 1)."""
        return MPNET_PAD_POSITION if self.model_type == "mpnet" else self.pad_token_id

    @property
    def positions(self) -> int:
        """The longest token row the position table can embed."""
        return self.max_positions - self.position_offset


def _position_offset(model_type: str, pad_token_id: int) -> int:
    if model_type == "mpnet":
        return MPNET_PAD_POSITION + 1
    return pad_token_id + 1 if model_type in _POSITIONS_AFTER_PAD else 0


def st_module_names(modules: Any) -> list[str] | None:
    """Class names of a sentence-transformers ``modules.json`` list (``Transformer``, ``Pooling``, ...), the full
    type for a module from another package; None if the list is not a modules.json."""
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        return None
    types = [str(m.get("type", "")) for m in modules]
    return [t.rsplit(".", 1)[-1] if t.startswith("sentence_transformers.") else t for t in types]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of a model directory; ModelConfigError when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelConfigError(f"{path} is missing; re-run `arrowengine convert` on the source checkpoint") from exc
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"{path} is not valid JSON: {exc}") from exc


def tokenizer_config(model_dir: Path) -> dict[str, Any]:
    """tokenizer_config.json of a model directory as a dict ({} when there is none)."""
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.exists():
        return {}
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def model_max_length(model_dir: Path, positions: int) -> int:
    """How many tokens HF's tokenizer keeps with ``truncation=True``: tokenizer_config.json's
    ``model_max_length``, capped at the model's ``positions``."""
    return _length_cap(tokenizer_config(model_dir).get("model_max_length"), positions)


def _length_cap(value: Any, positions: int) -> int:
    """A configured text length capped at ``positions``; unset, or the tokenizers' "no limit" sentinel
    (1e30): the position table is the limit."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return positions
    return min(value, positions)


def _dict(cfg: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise ModelConfigError(f"{where}: {key} should be an object, got {value!r}")
    return value


def _get(cfg: dict[str, Any], key: str, default: Any, kind: type, where: str) -> Any:
    value = cfg.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ModelConfigError(f"{where}: {key} should be {kind.__name__}, got {value!r}")
    return value


def _tower(cfg: dict[str, Any], where: str, act_key: str, defaults: dict[str, Any]) -> TowerConfig:
    return TowerConfig(
        width=_get(cfg, "hidden_size", defaults["hidden_size"], int, where),
        layers=_get(cfg, "num_hidden_layers", defaults["num_hidden_layers"], int, where),
        heads=_get(cfg, "num_attention_heads", defaults["num_attention_heads"], int, where),
        mlp_width=_get(cfg, "intermediate_size", defaults["intermediate_size"], int, where),
        act=_get(cfg, act_key, defaults[act_key], str, where),
        eps=_get(cfg, "layer_norm_eps", defaults["layer_norm_eps"], float, where),
    )


# transformers' CLIPTextConfig / CLIPVisionConfig defaults, used when config.json omits a key.
_CLIP_TEXT_DEFAULTS = dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5)
_CLIP_VISION_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             hidden_act="quick_gelu", layer_norm_eps=1e-5)


# config.json model_type of a single CLIP tower (CLIPTextConfig / CLIPVisionConfig saved on their own)
CLIP_TEXT_TOWER, CLIP_VISION_TOWER = "clip_text_model", "clip_vision_model"


def clip_config(model_dir: Path) -> ClipConfig:
    """Read the config.json of a CLIPModel, or of a CLIPTextModelWithProjection / CLIPVisionModelWithProjection
    (the tower's own config at the top level, projection_dim beside it)."""
    cfg = read_json(Path(model_dir) / "config.json")
    where = f"{model_dir}/config.json"
    tower_type = cfg.get("model_type")
    if tower_type in (CLIP_TEXT_TOWER, CLIP_VISION_TOWER):
        text = cfg if tower_type == CLIP_TEXT_TOWER else None
        vision = cfg if tower_type == CLIP_VISION_TOWER else None
    else:
        # Older CLIP configs also carry text_config_dict / vision_config_dict; transformers lets them override.
        text, vision = ({**_dict(cfg, key, where), **_dict(cfg, key + "_dict", where)}
                        for key in ("text_config", "vision_config"))
    return ClipConfig(text=None if text is None else _clip_text(text, where),
                      vision=None if vision is None else _clip_vision(vision, where),
                      projection_dim=_get(cfg, "projection_dim", 512, int, where))


def _clip_text(text: dict[str, Any], where: str) -> ClipTextConfig:
    return ClipTextConfig(
        tower=_tower(text, where + " text_config", "hidden_act", _CLIP_TEXT_DEFAULTS),
        vocab_size=_get(text, "vocab_size", 49408, int, where),
        max_positions=_get(text, "max_position_embeddings", 77, int, where),
        eos_token_id=_get(text, "eos_token_id", 49407, int, where),
    )


def _clip_vision(vision: dict[str, Any], where: str) -> ClipVisionConfig:
    vision_cfg = ClipVisionConfig(
        tower=_tower(vision, where + " vision_config", "hidden_act", _CLIP_VISION_DEFAULTS),
        image_size=_get(vision, "image_size", 224, int, where),
        patch_size=_get(vision, "patch_size", 32, int, where),
        channels=_get(vision, "num_channels", 3, int, where),
    )
    if vision_cfg.grid < 1:
        raise ModelConfigError(f"{where}: image_size {vision_cfg.image_size} is smaller than patch_size "
                               f"{vision_cfg.patch_size}")
    return vision_cfg


_BERT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      hidden_act="gelu", layer_norm_eps=1e-12)


def bert_config(model_dir: Path) -> BertConfig:
    """Read a sentence-transformers checkpoint over a BERT-family encoder: config.json, modules.json, pooling,
    max length and lowercasing, in the layouts of sentence-transformers 2.x to 6.x."""
    model_dir = Path(model_dir)
    cfg = read_json(model_dir / "config.json")
    where = f"{model_dir}/config.json"
    model_type = _get(cfg, "model_type", "bert", str, where)
    if model_type not in BERT_FAMILY:
        raise ModelConfigError(f"{where}: model_type {model_type!r} is not runnable; expected one of {BERT_FAMILY}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ModelConfigError(f"{where}: position_embedding_type {cfg['position_embedding_type']!r} is not "
                               "supported; expected 'absolute'")
    modules = read_json(model_dir / "modules.json")
    types = st_module_names(modules) or []
    unknown = [t for t in types if t not in ST_RUNNABLE_MODULES]
    order = [t for t in types if t != "Dense"]
    if (unknown or order not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"])
            or types.index("Pooling") > min((i for i, t in enumerate(types) if t == "Dense"), default=len(types))
            or ("Normalize" in types and types[-1] != "Normalize")):
        raise ModelConfigError(
            f"{model_dir}/modules.json: expected Transformer -> Pooling -> any Dense -> optional Normalize, got "
            f"{types}; other sentence-transformers modules or orders are not supported yet"
        )
    pools = [m for m, t in zip(modules, types) if t == "Pooling"]
    if len(pools) != 1:
        raise ModelConfigError(f"{model_dir}/modules.json: expected one Pooling module, got {len(pools)}; without "
                               "one sentence-transformers gives token embeddings, not one vector per text")
    pool_config = model_dir / str(pools[0].get("path", "1_Pooling")) / "config.json"
    pool = read_json(pool_config)
    pooling = _pooling_mode(pool, pool_config)
    prompt = _default_prompt(model_dir)
    if prompt and pool.get("include_prompt", True) is False:
        raise ModelConfigError(f"{pool_config}: include_prompt false (pooling leaves out the default prompt's "
                               f"tokens, {prompt!r}) is not supported; remove default_prompt_name from "
                               "config_sentence_transformers.json and put the prompt in your texts")
    st_cfg = next((read_json(model_dir / n) for n in _ST_CONFIG_FILES if (model_dir / n).exists()), {})
    max_seq = st_cfg.get("max_seq_length")
    if max_seq is None:  # sentence-transformers 6.x keeps it as the tokenizer's model_max_length
        max_seq = tokenizer_config(model_dir).get("model_max_length")
    lowercase = st_cfg.get("do_lower_case", False)
    if not isinstance(lowercase, bool):
        raise ModelConfigError(f"{model_dir}: do_lower_case should be true or false, got {lowercase!r}")
    max_positions = _get(cfg, "max_position_embeddings", 512, int, where)
    pad_token_id = _get(cfg, "pad_token_id", 1 if model_type in (*_POSITIONS_AFTER_PAD, "mpnet") else 0, int, where)
    buckets = _get(cfg, "relative_attention_num_buckets", 32, int, where) if model_type == "mpnet" else 0
    if model_type == "mpnet" and buckets < MPNET_BUCKETS:
        raise ModelConfigError(f"{where}: relative_attention_num_buckets {buckets} is under {MPNET_BUCKETS}, the "
                               "buckets transformers' MPNet computes (it always uses 32); the checkpoint cannot run")
    offset = _position_offset(model_type, pad_token_id)
    if max_positions - offset < 1:
        raise ModelConfigError(f"{where}: max_position_embeddings {max_positions} leaves no position for "
                               f"tokens after the offset {offset}")
    if model_type == "distilbert":  # DistilBertConfig's own key names; its LayerNorms' eps is fixed at 1e-12
        cfg = {**cfg, "hidden_size": cfg.get("dim", 768), "num_hidden_layers": cfg.get("n_layers", 6),
               "num_attention_heads": cfg.get("n_heads", 12), "intermediate_size": cfg.get("hidden_dim", 3072),
               "hidden_act": cfg.get("activation", "gelu"), "layer_norm_eps": 1e-12}
    return BertConfig(
        tower=_tower(cfg, where, "hidden_act", _BERT_DEFAULTS),
        vocab_size=_get(cfg, "vocab_size", 30522, int, where),
        max_positions=max_positions,
        type_vocab_size=0 if model_type in ("mpnet", "distilbert") else _get(cfg, "type_vocab_size", 2, int, where),
        pad_token_id=pad_token_id,
        max_seq_length=_length_cap(max_seq, max_positions - offset),
        pooling=pooling,
        normalize="Normalize" in types,
        model_type=model_type,
        lowercase=lowercase,
        relative_buckets=buckets,
        dense=_dense_modules(model_dir, modules, types, _get(cfg, "hidden_size", 768, int, where)),
        prompt=prompt,
        **(_albert_shape(cfg, where) if model_type == "albert" else {}),
    )


def _albert_shape(cfg: dict[str, Any], where: str) -> dict[str, int]:
    """ALBERT's embedding width and layer sharing (AlbertConfig's defaults where config.json omits them)."""
    shape = dict(embed_width=_get(cfg, "embedding_size", 128, int, where),
                 layer_groups=_get(cfg, "num_hidden_groups", 1, int, where),
                 inner_layers=_get(cfg, "inner_group_num", 1, int, where))
    if min(shape.values()) < 1 or shape["layer_groups"] > _get(cfg, "num_hidden_layers", 12, int, where):
        raise ModelConfigError(f"{where}: embedding_size, num_hidden_groups and inner_group_num must be >= 1 and "
                               f"num_hidden_groups at most num_hidden_layers; got {shape}")
    return shape


def _default_prompt(model_dir: Path) -> str:
    """The prompt sentence-transformers puts before every text it encodes: ``prompts[default_prompt_name]``
    of config_sentence_transformers.json, or "" when it names none."""
    path = model_dir / "config_sentence_transformers.json"
    if not path.exists():
        return ""
    st = read_json(path)
    name = st.get("default_prompt_name")
    if not name:
        return ""
    prompts = st.get("prompts") or {}
    if not isinstance(prompts, dict) or not isinstance(prompts.get(name), str):
        raise ModelConfigError(f"{path}: default_prompt_name {name!r} is not one of its prompts "
                               f"({sorted(prompts) if isinstance(prompts, dict) else prompts!r})")
    return prompts[name]


def _dense_modules(model_dir: Path, modules: list, types: list[str], width: int) -> tuple[DenseConfig, ...]:
    """The Dense modules' configs (``<path>/config.json``), checked to chain from the encoder's width."""
    out = []
    for m, t in zip(modules, types):
        if t != "Dense":
            continue
        path = str(m.get("path", ""))
        where = f"{model_dir}/{path}/config.json"
        d = read_json(model_dir / path / "config.json")
        act = str(d.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
        if act not in DENSE_ACTIVATIONS:
            raise ModelConfigError(f"{where}: activation_function {d.get('activation_function')!r} is not supported; "
                                   f"expected one of torch.nn's {DENSE_ACTIVATIONS}")
        dense = DenseConfig(path=path, n_in=_get(d, "in_features", None, int, where),
                            n_out=_get(d, "out_features", None, int, where), bias=bool(d.get("bias", True)), act=act)
        expected = out[-1].n_out if out else width
        if dense.n_in != expected:
            raise ModelConfigError(f"{where}: in_features {dense.n_in}, but the module before it gives {expected} "
                                   "values per text")
        out.append(dense)
    return tuple(out)


def _pooling_mode(pool: dict[str, Any], path: Path) -> str:
    """The one pooling mode of a sentence-transformers Pooling config ``pool``, read from ``path`` (either
    layout)."""
    mode = pool.get("pooling_mode")
    modes = ([mode] if isinstance(mode, str) else list(mode) if isinstance(mode, list) else
             [name for key, name in _LEGACY_POOLING_KEYS.items() if pool.get(key)])
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ModelConfigError(f"{path}: pooling {modes} is not supported; expected exactly one of {POOLING_MODES}")
    return modes[0]
