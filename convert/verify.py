"""Describe and verify a converted model directory (``arrowengine inspect``)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from convert.writer import file_sha256
from engine.format import Manifest
from engine.weights import WeightFile, read_manifest, weights_path


def describe(model_dir: str | os.PathLike) -> tuple[Manifest, WeightFile]:
    """The manifest and the (validated) weight file of ``model_dir``.

    Raises:
        WeightFormatError: the directory or its weight file is invalid.
    """
    return read_manifest(model_dir), WeightFile.open(weights_path(model_dir))


def verify(model_dir: str | os.PathLike) -> list[str]:
    """Recompute every tensor's SHA-256 and the file's; return the mismatches (empty: all good).

    Raises:
        WeightFormatError: the directory or its weight file is invalid.
    """
    manifest, wf = describe(model_dir)
    problems = []
    for info in wf.infos():
        got = hashlib.sha256(wf.raw(info.name)).hexdigest()
        if got != info.sha256:
            problems.append(f"tensor {info.name!r}: sha256 {got} != recorded {info.sha256}")
    got = file_sha256(wf.path)
    if got != manifest.sha256:
        problems.append(f"file {wf.path.name}: sha256 {got} != manifest {manifest.sha256}")
    if len(wf) != manifest.tensors:
        problems.append(f"file holds {len(wf)} tensors, manifest says {manifest.tensors}")
    nbytes = sum(i.nbytes for i in wf.infos())
    if nbytes != manifest.bytes:
        problems.append(f"tensor bytes {nbytes} != manifest bytes {manifest.bytes}")
    missing = [f for f in manifest.files if not (Path(model_dir) / f).is_file()]
    if missing:
        problems.append(f"files listed in the manifest are missing: {missing}")
    return problems
