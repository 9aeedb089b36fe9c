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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.config import ST_MODULE_PREFIX, DenseConfig
from engine.errors import ModelConfigError, WeightFormatError

# A dimension of a tensor and the config field that sets it: (field as the message names it, value).
Dim = tuple[str, int]
_LAYER_INDEX = re.compile(r"(\d+)\.")


@dataclass(frozen=True)
class ShapeCheck:
    """A tensor's shape as the config's fields make it: one (field, value) per dimension."""

    tensor: str
    dims: tuple[Dim, ...]
    config: str  # the file the fields come from, relative to the model directory


@dataclass(frozen=True)
class CountCheck:
    """How many blocks a config says a tower has, against the block indices present in the weights."""

    prefix: str  # the tensors of block i are named ``<prefix><i>.``
    field: Dim  # the config field that says how many blocks there are
    config: str


def check_config_against_weights(counts: Sequence[CountCheck], checks: Sequence[ShapeCheck],
                                 shapes: Mapping[str, tuple[int, ...]], path: Path,
                                 weights: str = "weights.arrow") -> None:
    """Check a config's block counts (``counts``) and the sizes that shape parameters (``checks``, made by each
    architecture module from its config) against the weight file's tensor table (``shapes``: name -> shape).

    Raises:
        ModelConfigError: a config field disagrees with the weights (every such field is listed).
        WeightFormatError: a tensor that carries a config size is not in the weight file.
    """
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


def dense_checks(dense: Sequence[DenseConfig]) -> list[ShapeCheck]:
    """The weight shapes a sentence-transformer's Dense modules (``<folder>/config.json``) make."""
    return [ShapeCheck(f"{ST_MODULE_PREFIX}{d.path}.linear.weight",
                       (("out_features", d.n_out), ("in_features", d.n_in)), f"{d.path}/config.json")
            for d in dense]
