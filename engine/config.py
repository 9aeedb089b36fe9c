"""Frozen model configurations, read once from a model directory's HF files.

Only what the engine's own implementation needs is kept; every field is
checked when it is read so a bad config fails at load, not mid-request.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from engine.errors import ModelConfigError
from engine.files import MAX_CONFIG_BYTES, parse_json, read_model_file

log = logging.getLogger(__name__)

# Every size read from a config (widths, layers, heads, vocabulary, positions, patch and image sizes) must be a
# positive int up to this: nothing real comes near it. The sizes that shape parameters are then checked against
# the weight file's tensors before anything is built (engine.config_check).
MAX_SIZE = 2**31 - 1
# Layers of one tower: the deepest encoders here have 48; a block is a Python object built before any weight
# is checked (and ALBERT repeats its blocks per layer on every call), so a config may not ask for millions.
MAX_LAYERS = 4096

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
        if self.heads < 1 or self.width % self.heads:
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
    prompts: tuple[tuple[str, str], ...] = ()  # its named prompts (name, text), for a request's prompt_name
    default_prompt: str | None = None  # the name of the default prompt
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


def module_weight_files(folder: Path) -> list[Path]:
    """A sentence-transformers module folder's weight files: model.safetensors, else pytorch_model*.bin (how
    sentence-transformers 2.x saved them); none for a module without weights (Pooling, Normalize)."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("pytorch_model*.bin"))


def read_json(model_dir: Path, name: str | PurePosixPath, optional: bool = False, kind: type = dict) -> Any:
    """The JSON file ``name`` of a model directory, read with :func:`engine.files.read_model_file` (a regular
    file inside the directory, at most ``MAX_CONFIG_BYTES``), checked to be a ``kind`` (a JSON object by
    default; ``object`` for anything).

    Returns None when ``optional`` and there is no such file.

    Raises:
        ModelConfigError: missing (unless ``optional``), not a regular file inside the directory, too large,
            not JSON, or not a ``kind``.
    """
    path = Path(model_dir) / name
    data = read_model_file(model_dir, name, MAX_CONFIG_BYTES, "a model config file",
                           optional=optional,
                           missing=f"{path} is missing; re-run `arrowengine convert` on the source checkpoint")
    if data is None:
        return None
    cfg = parse_json(data, path)
    if not isinstance(cfg, kind):
        raise ModelConfigError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, got "
                               f"{type(cfg).__name__}")
    return cfg


def tokenizer_config(model_dir: Path) -> dict[str, Any]:
    """tokenizer_config.json of a model directory as a dict ({} when there is none)."""
    return read_json(model_dir, "tokenizer_config.json", optional=True) or {}


def model_max_length(model_dir: Path, positions: int) -> int:
    """How many tokens HF's tokenizer keeps with ``truncation=True``: tokenizer_config.json's
    ``model_max_length``, capped at the model's ``positions``."""
    return length_cap(tokenizer_config(model_dir).get("model_max_length"), positions)


def length_cap(value: Any, positions: int) -> int:
    """A configured text length capped at ``positions``; unset, or the tokenizers' "no limit" sentinel
    (1e30): the position table is the limit."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return positions
    return min(value, positions)


def config_dict(cfg: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise ModelConfigError(f"{where}: {key} should be an object, got {value!r}")
    return value


def config_value(cfg: dict[str, Any], key: str, default: Any, kind: type, where: str) -> Any:
    value = cfg.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ModelConfigError(f"{where}: {key} should be {kind.__name__}, got {value!r}")
    return value


def config_size(cfg: dict[str, Any], key: str, default: Any, where: str, minimum: int = 1,
                maximum: int = MAX_SIZE) -> int:
    """An integer size field: an int in [minimum, maximum] (positive and below MAX_SIZE by default)."""
    value = config_value(cfg, key, default, int, where)
    if not minimum <= value <= maximum:
        raise ModelConfigError(f"{where}: {key} is {value}, expected an integer from {minimum} to {maximum}; the "
                               "file is corrupt or not this model's config")
    return value


def config_eps(cfg: dict[str, Any], key: str, default: float, where: str) -> float:
    value = config_value(cfg, key, default, float, where)
    if not (math.isfinite(value) and value > 0):
        raise ModelConfigError(f"{where}: {key} is {value}, expected a small positive number such as 1e-5")
    return value


# config.json keys of a tower's fields: (width, layers, heads, mlp width, activation, LayerNorm eps)
_TOWER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
               "layer_norm_eps")
_DISTILBERT_KEYS = ("dim", "n_layers", "n_heads", "hidden_dim", "activation", None)  # LayerNorm eps fixed: 1e-12


def _tower(cfg: dict[str, Any], where: str, defaults: dict[str, Any], keys: tuple = _TOWER_KEYS) -> TowerConfig:
    width_key, layers_key, heads_key, mlp_key, act_key, eps_key = keys
    width = config_size(cfg, width_key, defaults[width_key], where)
    heads = config_size(cfg, heads_key, defaults[heads_key], where)
    if width % heads:
        raise ModelConfigError(f"{where}: {width_key} {width} is not divisible by {heads_key} {heads}")
    return TowerConfig(
        width=width,
        layers=config_size(cfg, layers_key, defaults[layers_key], where, maximum=MAX_LAYERS),
        heads=heads,
        mlp_width=config_size(cfg, mlp_key, defaults[mlp_key], where),
        act=config_value(cfg, act_key, defaults[act_key], str, where),
        eps=config_eps(cfg, eps_key, defaults[eps_key], where) if eps_key else defaults["eps"],
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
    cfg = read_json(model_dir, "config.json")
    where = f"{model_dir}/config.json"
    tower_type = cfg.get("model_type")
    if tower_type in (CLIP_TEXT_TOWER, CLIP_VISION_TOWER):
        text = cfg if tower_type == CLIP_TEXT_TOWER else None
        vision = cfg if tower_type == CLIP_VISION_TOWER else None
    else:
        # Older CLIP configs also carry text_config_dict / vision_config_dict; transformers lets them override.
        text, vision = ({**config_dict(cfg, key, where), **config_dict(cfg, key + "_dict", where)}
                        for key in ("text_config", "vision_config"))
    return ClipConfig(text=None if text is None else _clip_text(text, where),
                      vision=None if vision is None else _clip_vision(vision, where),
                      projection_dim=config_size(cfg, "projection_dim", 512, where))


def _clip_text(text: dict[str, Any], where: str) -> ClipTextConfig:
    where_text = where + " text_config"
    return ClipTextConfig(
        tower=_tower(text, where_text, _CLIP_TEXT_DEFAULTS),
        vocab_size=config_size(text, "vocab_size", 49408, where_text),
        max_positions=config_size(text, "max_position_embeddings", 77, where_text),
        eos_token_id=config_size(text, "eos_token_id", 49407, where_text, minimum=0),
    )


def _clip_vision(vision: dict[str, Any], where: str) -> ClipVisionConfig:
    where_vision = where + " vision_config"
    vision_cfg = ClipVisionConfig(
        tower=_tower(vision, where_vision, _CLIP_VISION_DEFAULTS),
        image_size=config_size(vision, "image_size", 224, where_vision),
        patch_size=config_size(vision, "patch_size", 32, where_vision),
        channels=config_size(vision, "num_channels", 3, where_vision),
    )
    if vision_cfg.grid < 1:
        raise ModelConfigError(f"{where_vision}: image_size {vision_cfg.image_size} is smaller than patch_size "
                               f"{vision_cfg.patch_size}")
    return vision_cfg


_BERT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      hidden_act="gelu", layer_norm_eps=1e-12)
# DistilBertConfig's own key names and defaults; its LayerNorms' eps is fixed at 1e-12
_DISTILBERT_DEFAULTS = dict(dim=768, n_layers=6, n_heads=12, hidden_dim=3072, activation="gelu", eps=1e-12)


def bert_config(model_dir: Path) -> BertConfig:
    """Read a sentence-transformers checkpoint over a BERT-family encoder: config.json, modules.json, pooling,
    max length and lowercasing, in the layouts of sentence-transformers 2.x to 6.x."""
    model_dir = Path(model_dir)
    encoder = bert_encoder_config(read_json(model_dir, "config.json"), f"{model_dir}/config.json")
    head = st_head(model_dir, encoder.tower.width)
    return dataclasses.replace(
        encoder,
        max_seq_length=length_cap(head.max_seq_length, encoder.positions),
        pooling=head.pooling,
        normalize=head.normalize,
        lowercase=head.lowercase,
        dense=head.dense,
        prompt=head.prompt,
        prompts=head.prompts,
        default_prompt=head.default_prompt,
    )


def bert_encoder_config(cfg: dict[str, Any], where: str, model_types: tuple[str, ...] = BERT_FAMILY) -> BertConfig:
    """The BERT-family encoder of a config.json ``cfg`` (read from ``where``), its model_type one of
    ``model_types``; texts cut at its positions, CLS pooling, nothing after it (a caller sets what its folder
    says)."""
    model_type = config_value(cfg, "model_type", "bert", str, where)
    if model_type not in model_types:
        raise ModelConfigError(f"{where}: model_type {model_type!r} is not runnable; expected one of {model_types}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ModelConfigError(f"{where}: position_embedding_type {cfg['position_embedding_type']!r} is not "
                               "supported; expected 'absolute'")
    tower = (_tower(cfg, where, _DISTILBERT_DEFAULTS, _DISTILBERT_KEYS) if model_type == "distilbert"
             else _tower(cfg, where, _BERT_DEFAULTS))
    max_positions = config_size(cfg, "max_position_embeddings", 512, where)
    pad_token_id = config_size(cfg, "pad_token_id", 1 if model_type in (*_POSITIONS_AFTER_PAD, "mpnet") else 0, where,
                         minimum=0)
    buckets = config_size(cfg, "relative_attention_num_buckets", 32, where) if model_type == "mpnet" else 0
    if model_type == "mpnet" and buckets < MPNET_BUCKETS:
        raise ModelConfigError(f"{where}: relative_attention_num_buckets {buckets} is under {MPNET_BUCKETS}, the "
                               "buckets transformers' MPNet computes (it always uses 32); the checkpoint cannot run")
    offset = _position_offset(model_type, pad_token_id)
    if max_positions - offset < 1:
        raise ModelConfigError(f"{where}: max_position_embeddings {max_positions} leaves no position for "
                               f"tokens after the offset {offset}")
    return BertConfig(
        tower=tower,
        vocab_size=config_size(cfg, "vocab_size", 30522, where),
        max_positions=max_positions,
        type_vocab_size=(0 if model_type in ("mpnet", "distilbert")
                         else config_size(cfg, "type_vocab_size", 2, where, minimum=0)),
        pad_token_id=pad_token_id,
        max_seq_length=max_positions - offset,
        pooling="cls",
        normalize=False,
        model_type=model_type,
        relative_buckets=buckets,
        **(_albert_shape(cfg, where, tower.layers) if model_type == "albert" else {}),
    )


@dataclass(frozen=True)
class StHead:
    """What a sentence-transformer does around its Transformer module (modules.json and the module configs):
    the same for every encoder it wraps."""

    pooling: str  # one of POOLING_MODES
    normalize: bool  # a Normalize module comes last
    dense: tuple[DenseConfig, ...]  # Dense modules after pooling, in order
    max_seq_length: Any  # as configured (sentence_bert_config.json, else tokenizer_config.json); cap it yourself
    lowercase: bool  # do_lower_case
    prompt: str  # the default prompt's text ("" without one)
    prompts: tuple[tuple[str, str], ...]  # named prompts (name, text)
    default_prompt: str | None  # the default prompt's name

    @property
    def dim(self) -> int | None:
        """The embedding width the Dense modules give; None without them (the encoder's width)."""
        return self.dense[-1].n_out if self.dense else None


def st_head(model_dir: Path, width: int) -> StHead:
    """Read a sentence-transformers folder's modules (Transformer -> Pooling -> any Dense -> optional Normalize),
    pooling mode, Dense configs (chained from the encoder's ``width``), max length, lowercasing and prompts, in
    the layouts of sentence-transformers 2.x to 6.x.

    Raises:
        ModelConfigError: another module list or order, an unsupported pooling or Dense module, bad prompts.
    """
    modules = read_json(model_dir, "modules.json", kind=object)
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
    pool_name = PurePosixPath(str(pools[0].get("path", "1_Pooling"))) / "config.json"
    pool_config = model_dir / pool_name
    pool = read_json(model_dir, pool_name)
    prompts, default_prompt = st_prompts(model_dir)
    prompt = dict(prompts).get(default_prompt, "")
    if prompts and pool.get("include_prompt", True) is False:
        if prompt:
            raise ModelConfigError(f"{pool_config}: include_prompt false (pooling leaves out the default prompt's "
                                   f"tokens, {prompt!r}) is not supported; remove default_prompt_name from "
                                   "config_sentence_transformers.json and put the prompt in your texts")
        log.warning("%s: include_prompt false (pooling leaves out the prompt's tokens) is not supported: the "
                    "model's prompts %s are not offered", pool_config, [name for name, _ in prompts])
        prompts = ()
    st_cfg = next((c for c in (read_json(model_dir, n, optional=True) for n in _ST_CONFIG_FILES) if c is not None),
                  {})
    max_seq = st_cfg.get("max_seq_length")
    if max_seq is None:  # sentence-transformers 6.x keeps it as the tokenizer's model_max_length
        max_seq = tokenizer_config(model_dir).get("model_max_length")
    lowercase = st_cfg.get("do_lower_case", False)
    if not isinstance(lowercase, bool):
        raise ModelConfigError(f"{model_dir}: do_lower_case should be true or false, got {lowercase!r}")
    return StHead(pooling=_pooling_mode(pool, pool_config), normalize="Normalize" in types,
                  dense=_dense_modules(model_dir, modules, types, width), max_seq_length=max_seq,
                  lowercase=lowercase, prompt=prompt, prompts=prompts,
                  default_prompt=default_prompt if prompt else None)


def _albert_shape(cfg: dict[str, Any], where: str, layers: int) -> dict[str, int]:
    """ALBERT's embedding width and layer sharing (AlbertConfig's defaults where config.json omits them)."""
    shape = dict(embed_width=config_size(cfg, "embedding_size", 128, where),
                 layer_groups=config_size(cfg, "num_hidden_groups", 1, where, maximum=MAX_LAYERS),
                 inner_layers=config_size(cfg, "inner_group_num", 1, where, maximum=MAX_LAYERS))
    if shape["layer_groups"] > layers:
        raise ModelConfigError(f"{where}: num_hidden_groups {shape['layer_groups']} is more than num_hidden_layers "
                               f"{layers}; expected at most one group per layer")
    return shape


def st_prompts(model_dir: Path) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """The named prompts of config_sentence_transformers.json, as (name, text) pairs, and the name of the
    default one (sentence-transformers puts it before every text its ``encode`` gets without a prompt_name); no
    prompts and None when the file has none.

    Raises:
        ModelConfigError: prompts that are not a name -> text object, or a default_prompt_name not among them.
    """
    path = model_dir / "config_sentence_transformers.json"
    st = read_json(model_dir, "config_sentence_transformers.json", optional=True)
    if st is None:
        return (), None
    prompts = st.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ModelConfigError(f"{path}: prompts should map names to prompt texts, got {prompts!r:.200}")
    name = st.get("default_prompt_name") or None
    if name is not None and (not isinstance(name, str) or name not in prompts):
        raise ModelConfigError(f"{path}: default_prompt_name {name!r} is not one of its prompts ({sorted(prompts)})")
    return tuple(prompts.items()), name


def _dense_modules(model_dir: Path, modules: list, types: list[str], width: int) -> tuple[DenseConfig, ...]:
    """The Dense modules' configs (``<path>/config.json``), checked to chain from the encoder's width."""
    out = []
    for m, t in zip(modules, types):
        if t != "Dense":
            continue
        path = m.get("path", "")
        if not isinstance(path, str) or not path or "." in path or "/" in path or "\\" in path:
            raise ModelConfigError(f"{model_dir}/modules.json: a Dense module's path is {path!r}, expected the "
                                   "name of its folder in the model directory (such as '2_Dense')")
        name = PurePosixPath(path) / "config.json"
        where = f"{model_dir}/{name}"
        d = read_json(model_dir, name)
        act = str(d.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
        if act not in DENSE_ACTIVATIONS:
            raise ModelConfigError(f"{where}: activation_function {d.get('activation_function')!r} is not supported; "
                                   f"expected one of torch.nn's {DENSE_ACTIVATIONS}")
        dense = DenseConfig(path=path, n_in=config_size(d, "in_features", None, where),
                            n_out=config_size(d, "out_features", None, where), bias=bool(d.get("bias", True)), act=act)
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
