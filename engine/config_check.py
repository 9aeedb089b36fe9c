"""A model's config against its weight file, before the network is built.

Building a network makes one Python object per block and a meta tensor per parameter, so a config that
disagrees with its weights (``num_hidden_layers: 10**9``, a vocabulary of 2**31) must fail before the build,
with one error that names the file and the fields: every block count is checked against the block indices in
the weight file's tensor table, and every size that shapes a parameter against that tensor's shape. Only the
table is read (names and shapes), never the data. ``engine.precision.assign_weights`` still checks every
parameter after the build.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.config import ST_MODULE_PREFIX, BertConfig, ClipConfig
from engine.errors import ModelConfigError, WeightFormatError

# A dimension of a tensor and the config field that sets it: (field as the message names it, value).
_Dim = tuple[str, int]
_LAYER_INDEX = re.compile(r"(\d+)\.")


@dataclass(frozen=True)
class _ShapeCheck:
    tensor: str
    dims: tuple[_Dim, ...]
    config: str  # the file the fields come from, relative to the model directory


@dataclass(frozen=True)
class _CountCheck:
    prefix: str  # the tensors of block i are named ``<prefix><i>.``
    field: _Dim  # the config field that says how many blocks there are
    config: str


def check_config_against_weights(cfg: ClipConfig | BertConfig, shapes: dict[str, tuple[int, ...]], path: Path,
                                 weights: str = "weights.arrow") -> None:
    """Check the sizes of ``cfg`` against the weight file's tensor table (``shapes``: name -> shape) before the
    network is built: every block count against the block indices in the weights, and every size that shapes a
    parameter (widths, vocabulary, positions, patches, projections, Dense modules) against the tensor it shapes.

    Building a network makes one Python object per block and a meta tensor per parameter, so a config that
    disagrees with its weights (``num_hidden_layers: 10**9``, a vocabulary of 2**31) must fail here, with one
    error that names the file and the fields, not while building. ``engine.precision.assign_weights`` still
    checks every parameter after the build.

    Raises:
        ModelConfigError: a config field disagrees with the weights (every such field is listed).
        WeightFormatError: a tensor that carries a config size is not in the weight file.
    """
    counts, checks = _clip_checks(cfg) if isinstance(cfg, ClipConfig) else _bert_checks(cfg)
    problems, missing = [], []
    for c in counts:
        found = {int(m.group(1)) for name in shapes if name.startswith(c.prefix)
                 for m in [_LAYER_INDEX.match(name, len(c.prefix))] if m}
        if len(found) != c.field[1]:
            listed = sorted(found)
            problems.append(f"{c.config}: {c.field[0]} is {c.field[1]}, but {weights} holds {len(found)} blocks "
                            f"under {c.prefix}* (indices {listed[:8]}{' ...' if len(listed) > 8 else ''})")
    for c in checks:
        shape = shapes.get(c.tensor)
        if shape is None:
            missing.append(f"{c.tensor} (its shape carries {', '.join(sorted({f for f, _ in c.dims}))})")
            continue
        want = tuple(v for _, v in c.dims)
        if shape == want:
            continue
        if len(shape) != len(want):
            problems.append(f"{c.config}: {', '.join(f'{f} {v}' for f, v in c.dims)} make {c.tensor} "
                            f"{want}, but {weights} has it as {shape}")
            continue
        for (name, value), got in zip(c.dims, shape):
            if value != got:
                problems.append(f"{c.config}: {name} is {value}, but {c.tensor} in {weights} has {got} there "
                                f"(shape {shape})")
    if problems:
        problems = list(dict.fromkeys(problems))  # a field that sets two dimensions (patch_size) is said once
        listed = "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
        raise ModelConfigError(f"{path}: the config does not describe the weights ({len(problems)} problem(s)): "
                               f"{listed}; fix the config or re-run `arrowengine convert` on the source checkpoint")
    if missing:
        raise WeightFormatError(f"{path}/{weights}: tensors the config's sizes are checked against are missing: "
                                + "; ".join(missing[:10]) + "; re-run `arrowengine convert` on the source checkpoint")


def _clip_checks(cfg: ClipConfig) -> tuple[list[_CountCheck], list[_ShapeCheck]]:
    counts, checks, conf = [], [], "config.json"
    towers = []
    if cfg.text is not None:
        t = cfg.text
        towers.append(("text", "text_model", t.tower, [
            ("embeddings.token_embedding.weight", (("vocab_size", t.vocab_size), None)),
            ("embeddings.position_embedding.weight", (("max_position_embeddings", t.max_positions), None)),
        ], "text_projection"))
    if cfg.vision is not None:
        v = cfg.vision
        towers.append(("vision", "vision_model", v.tower, [
            ("embeddings.patch_embedding.weight", (None, ("num_channels", v.channels), ("patch_size", v.patch_size),
                                                   ("patch_size", v.patch_size))),
            ("embeddings.position_embedding.weight",
             ((f"image_size {v.image_size} / patch_size {v.patch_size} (positions: {v.grid}² + 1)",
               v.grid * v.grid + 1), None)),
            ("embeddings.class_embedding", (None,)),
        ], "visual_projection"))
    for tower, prefix, tc, own, projection in towers:
        label = f"the {tower} tower's "
        width = (label + "hidden_size", tc.width)
        counts.append(_CountCheck(f"{prefix}.encoder.layers.", (label + "num_hidden_layers", tc.layers), conf))
        for name, dims in own:
            checks.append(_ShapeCheck(f"{prefix}.{name}", tuple(width if d is None else (label + d[0], d[1])
                                                                 for d in dims), conf))
        checks.append(_ShapeCheck(f"{prefix}.encoder.layers.0.mlp.fc1.weight",
                                  ((label + "intermediate_size", tc.mlp_width), width), conf))
        checks.append(_ShapeCheck(f"{projection}.weight", (("projection_dim", cfg.projection_dim), width), conf))
    return counts, checks


def _bert_checks(cfg: BertConfig) -> tuple[list[_CountCheck], list[_ShapeCheck]]:
    conf, t = "config.json", cfg.tower
    distil = cfg.model_type == "distilbert"
    width = ("dim" if distil else "hidden_size", t.width)
    mlp = ("hidden_dim" if distil else "intermediate_size", t.mlp_width)
    embed = ("embedding_size", cfg.embed_width) if cfg.embed_width else width
    checks = [_ShapeCheck("embeddings.word_embeddings.weight", (("vocab_size", cfg.vocab_size), embed), conf),
              _ShapeCheck("embeddings.position_embeddings.weight",
                          (("max_position_embeddings", cfg.max_positions), embed), conf)]
    if cfg.type_vocab_size:
        checks.append(_ShapeCheck("embeddings.token_type_embeddings.weight",
                                  (("type_vocab_size", cfg.type_vocab_size), embed), conf))
    if cfg.model_type == "albert":
        groups = "encoder.albert_layer_groups."
        counts = [_CountCheck(groups, ("num_hidden_groups", cfg.layer_groups), conf),
                  _CountCheck(f"{groups}0.albert_layers.", ("inner_group_num", cfg.inner_layers), conf)]
        checks += [_ShapeCheck("encoder.embedding_hidden_mapping_in.weight", (width, embed), conf),
                   _ShapeCheck(f"{groups}0.albert_layers.0.ffn.weight", (mlp, width), conf)]
    elif distil:
        counts = [_CountCheck("transformer.layer.", ("n_layers", t.layers), conf)]
        checks.append(_ShapeCheck("transformer.layer.0.ffn.lin1.weight", (mlp, width), conf))
    else:
        counts = [_CountCheck("encoder.layer.", ("num_hidden_layers", t.layers), conf)]
        checks.append(_ShapeCheck("encoder.layer.0.intermediate.dense.weight", (mlp, width), conf))
    if cfg.relative_buckets:
        checks.append(_ShapeCheck("encoder.relative_attention_bias.weight",
                                  (("relative_attention_num_buckets", cfg.relative_buckets),
                                   ("num_attention_heads", t.heads)), conf))
    for d in cfg.dense:
        checks.append(_ShapeCheck(f"{ST_MODULE_PREFIX}{d.path}.linear.weight",
                                  (("out_features", d.n_out), ("in_features", d.n_in)), f"{d.path}/config.json"))
    return counts, checks

