"""Describe and verify a converted model directory (``arrowengine inspect``).

The directory is untrusted input: the manifest, the weight file and every file the manifest lists are
looked at only as regular files inside the directory (see :mod:`engine.files`); nothing outside it is read.
"""
from __future__ import annotations

import hashlib
import os

from convert.writer import file_sha256
from engine.errors import ArrowEngineError
from engine.files import check_model_file
from engine.format import Manifest
from engine.weights import WeightFile, read_manifest, weights_path


def describe(model_dir: str | os.PathLike) -> tuple[Manifest, WeightFile]:
    """The manifest and the (validated) weight file of ``model_dir``.

    Raises:
        WeightFormatError: the directory or its weight file is invalid (or not a regular file inside it).
    """
    return read_manifest(model_dir), WeightFile.open(weights_path(model_dir), folder=model_dir)


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
    got = file_sha256(wf.real_path)  # the file that was checked (a regular file inside the directory)
    if got != manifest.sha256:
        problems.append(f"file {wf.path.name}: sha256 {got} != manifest {manifest.sha256}")
    if len(wf) != manifest.tensors:
        problems.append(f"file holds {len(wf)} tensors, manifest says {manifest.tensors}")
    nbytes = sum(i.nbytes for i in wf.infos())
    if nbytes != manifest.bytes:
        problems.append(f"tensor bytes {nbytes} != manifest bytes {manifest.bytes}")
    missing = []
    for f in manifest.files:  # plain relative paths: Manifest.from_json refuses others
        try:
            if check_model_file(model_dir, f, "a file listed in the manifest", optional=True) is None:
                missing.append(f)
        except ArrowEngineError as exc:  # a link out of the directory, a device, a FIFO ...: not followed
            problems.append(f"file {f}: {exc}")
    if missing:
        problems.append(f"files listed in the manifest are missing: {missing}")
    return problems
