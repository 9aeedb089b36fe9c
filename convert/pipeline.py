"""HF checkpoint -> ArrowEngine model directory, and batches of such conversions.

The output is written into a temporary sibling directory and renamed into
place at the end, so a failed conversion leaves nothing half-written. Files are
read from the source only as regular files inside it (see ``convert.hf_checkpoint``),
and the small files to copy are listed (and checked) before anything is written.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from engine import registry
from convert.hf_checkpoint import SMALL_FILE_MAX_BYTES, Checkpoint, TensorReader, TensorRef, st_module_folders
from convert.matryoshka import declared_sizes
from convert.siglip_tokenizer import write_siglip_tokenizer
from convert.writer import Tensor, cast_tensor, check_little_endian, write_tensors
from engine.errors import ArrowEngineError, WeightFormatError
from engine.files import copy_model_file
from engine.format import DTYPE_CHOICES, MANIFEST_FILE, WEIGHT_FILES, Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertResult:
    """A finished conversion."""

    out_dir: Path
    manifest: Manifest
    seconds: float


def convert_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "keep",
                       fmt: str = "arrow", force: bool = False,
                       progress: bool | None = None) -> ConvertResult:
    """Convert a HF checkpoint (local directory or hub id) into ``out_dir``.

    Args:
        source: checkpoint directory, or a hub id (downloaded with huggingface_hub).
        out_dir: model directory to create; must not exist unless ``force``.
        dtype: 'keep' (bytes exact) or float32|float16|bfloat16 (floating tensors only).
        fmt: 'arrow' (mapped, zero-copy loads) or 'parquet' (zstd, smaller, copied on load).
        force: replace an existing ``out_dir``.
        progress: tqdm bar on stderr; None shows it only on a terminal.

    Returns:
        The output directory, its manifest and the seconds taken.

    Raises:
        ModelConfigError, WeightFormatError: bad source or checkpoint (nothing is written).
        ArrowEngineError: ``out_dir`` exists (without ``force``), is, lies inside or contains a
            local ``source``, or bad arguments.
    """
    t0 = time.perf_counter()
    if dtype not in DTYPE_CHOICES:
        raise ArrowEngineError(f"--dtype {dtype!r}: expected one of {list(DTYPE_CHOICES)}")
    if fmt not in WEIGHT_FILES:
        raise ArrowEngineError(f"--format {fmt!r}: expected one of {list(WEIGHT_FILES)}")
    check_little_endian()
    out_dir = Path(out_dir)
    _check_apart(source, out_dir)
    if out_dir.exists() and not force:
        raise ArrowEngineError(f"{out_dir} already exists; choose a new directory or pass --force")
    ckpt = Checkpoint.open(source)
    small = ckpt.small_files()  # before anything is written: a link out of the source fails here
    arch = registry.detect(ckpt.config, ckpt.root)
    matryoshka = declared_sizes(ckpt.root, ckpt.boundary)
    if matryoshka is not None:
        log.info("%s declares Matryoshka sizes %s", source, list(matryoshka))
    refs = {r.name: r for r in ckpt.tensors}
    plan = [(refs[src], out) for src, out in arch.plan(list(refs))]
    log.info("%s: %s (%s), %d tensors", source, registry.architecture_name(ckpt.config), arch.kind, len(plan))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        weights = tmp / WEIGHT_FILES[fmt]
        with ckpt.reader() as reader:
            stats = write_tensors(weights, fmt, _stream(reader, plan, dtype, progress))
        files = _copy_small_files(ckpt, tmp, small)
        if arch.kind == "clip" and "tokenizer.json" not in files and _build_clip_tokenizer(ckpt.root, tmp):
            files.append("tokenizer.json")
        if arch.kind == "siglip" and "tokenizer.json" not in files and write_siglip_tokenizer(tmp, ckpt.root):
            files.append("tokenizer.json")  # SigLIP v1: from spiece.model (convert.siglip_tokenizer)
        manifest = Manifest(
            kind=arch.kind, architecture=registry.architecture_name(ckpt.config),
            weights=weights.name, weights_format=fmt, dtype=dtype, tensors=stats.tensors,
            parameters=stats.parameters, bytes=stats.bytes, sha256=stats.sha256, source=str(source),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), files=tuple(sorted(files)),
            matryoshka_dims=matryoshka)
        (tmp / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        _self_check(tmp, weights, fmt, stats.tensors)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertResult(out_dir, manifest, time.perf_counter() - t0)


def _check_apart(source: str | os.PathLike, out_dir: Path) -> None:
    """Refuse an ``out_dir`` that is, lies inside or contains a local ``source`` (``--force`` would delete it).

    A hub id (not a local directory, see ``resolve_source``) has no local path and is not checked.
    """
    src = Path(source).expanduser()
    if not src.is_dir():
        return
    src, out = src.resolve(), out_dir.expanduser().resolve()
    if out == src:
        where = "is the source checkpoint"
    elif src in out.parents:
        where = "lies inside the source checkpoint"
    elif out in src.parents:
        where = "contains the source checkpoint"
    else:
        return
    raise ArrowEngineError(f"output directory {out_dir} {where} {source} (resolved: {out} vs {src}); "
                           "converting there would overwrite or delete the checkpoint: choose an OUT_DIR "
                           "outside the source directory")


def _stream(reader: TensorReader, plan: list[tuple[TensorRef, str]], dtype: str,
            progress: bool | None) -> Iterator[Tensor]:
    from tqdm import tqdm

    total = sum(ref.nbytes for ref, _ in plan)
    disable = None if progress is None else not progress
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="tensors",
              disable=disable, leave=False) as bar:
        for ref, out in plan:
            with reader.read(ref) as view:
                yield cast_tensor(Tensor(out, ref.dtype, ref.shape, view), dtype)
            bar.update(ref.nbytes)


def _copy_small_files(ckpt: Checkpoint, dest: Path, small: list[Path]) -> list[str]:
    """Copy ``small`` (relative paths from :meth:`Checkpoint.small_files`) into ``dest``, each checked again as a
    regular file inside the source and copied bounded (never through a link, never over a file)."""
    copied = []
    for rel in st_module_folders(ckpt.root, ckpt.boundary):  # module folders may hold no files (2_Normalize/)
        (dest / rel).mkdir(exist_ok=True)
    for rel in small:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        copy_model_file(ckpt.root, rel.as_posix(), dest / rel, SMALL_FILE_MAX_BYTES, "a file to copy",
                        boundary=ckpt.boundary)
        copied.append(rel.as_posix())
    return copied


def _build_clip_tokenizer(source: Path, dest: Path) -> bool:
    """Write tokenizer.json into ``dest`` from vocab.json + merges.txt with transformers (if installed).

    transformers reads the copies in ``dest`` (checked as regular files inside ``source`` when they were
    copied), never the source folder itself; ``source`` only names it in messages.
    """
    if not ((dest / "vocab.json").is_file() and (dest / "merges.txt").is_file()):
        return False
    try:
        from transformers import CLIPTokenizerFast
    except ImportError:
        log.warning("%s has vocab.json/merges.txt but no tokenizer.json, and transformers is not "
                    "installed to build it; `pip install transformers` and convert again", source)
        return False
    try:
        tok = CLIPTokenizerFast.from_pretrained(str(dest))
        tok.backend_tokenizer.save(str(dest / "tokenizer.json"))
    except Exception as exc:  # noqa: BLE001 -- optional extra; conversion still succeeds
        log.warning("could not build tokenizer.json from %s's vocab.json/merges.txt: %s", source, exc)
        return False
    return True


def _self_check(tmp: Path, weights: Path, fmt: str, tensors: int) -> None:
    """Re-open what was written: the loader's validation (cheap: no data is touched for Arrow)."""
    if fmt == "arrow":
        from engine.weights import WeightFile

        count = len(WeightFile.open(weights))
    else:
        import pyarrow.parquet as pq

        count = pq.read_metadata(weights).num_rows
    if count != tensors:
        raise WeightFormatError(f"internal: wrote {tensors} tensors but {weights.name} holds {count}")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- --manifest: many conversions ------------------------------------------------------------
@dataclass(frozen=True)
class BatchEntry:
    """One line of a conversion manifest file."""

    name: str
    source: str
    dtype: str = "keep"
    format: str = "arrow"
    error: str = ""  # why a malformed entry cannot run; convert_batch reports it as a FAILED row


def read_batch_file(path: str | os.PathLike, dtype: str = "keep", fmt: str = "arrow") -> list[BatchEntry]:
    """Parse a JSON list of {"name", "source", "dtype"?, "format"?}.

    ``dtype`` and ``fmt`` apply to entries that do not set their own. A malformed entry (no string
    name/source, unknown keys, bad dtype/format, name that is not a plain directory name, duplicate
    name) comes back with ``error`` set, so the rest of the list still runs.

    Raises:
        ArrowEngineError: the file is not readable JSON, or not a list.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArrowEngineError(f"{path}: cannot read conversion list ({exc})") from exc
    if not isinstance(data, list):
        raise ArrowEngineError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    entries: list[BatchEntry] = []
    names: set[str] = set()
    for i, item in enumerate(data):
        entry = _batch_entry(i, item, names, dtype, fmt)
        if not entry.error:
            names.add(entry.name)
        entries.append(entry)
    return entries


def _batch_entry(i: int, item: object, names: set[str], dtype: str, fmt: str) -> BatchEntry:
    """Entry ``i`` of a conversion list, or one with ``error`` set saying what is wrong with it."""
    allowed = {"name", "source", "dtype", "format"}
    name = item.get("name") if isinstance(item, dict) else None
    label = name if isinstance(name, str) and name.strip() else f"entry[{i}]"

    def bad(why: str) -> BatchEntry:
        return BatchEntry(label, "", error=f"entry {i}: {why}")

    if not isinstance(item, dict) or not isinstance(name, str) or not isinstance(item.get("source"), str):
        return bad(f"needs string 'name' and 'source', got {item!r}")
    if set(item) - allowed:
        return bad(f"unknown keys {sorted(set(item) - allowed)} (allowed: {sorted(allowed)})")
    if Path(name).name != name or name in (".", ".."):
        return bad(f"name {name!r} must be a plain directory name")
    if name in names:
        return bad(f"duplicate name {name!r}; give each entry its own name")
    item = {"dtype": dtype, "format": fmt, **item}
    if item["dtype"] not in DTYPE_CHOICES:
        return bad(f"dtype {item['dtype']!r}: expected one of {list(DTYPE_CHOICES)}")
    if item["format"] not in WEIGHT_FILES:
        return bad(f"format {item['format']!r}: expected one of {list(WEIGHT_FILES)}")
    return BatchEntry(**item)


@dataclass(frozen=True)
class BatchRow:
    """Outcome of one entry of a batch conversion."""

    name: str
    architecture: str  # HF architectures[0], or "-" if the conversion failed early
    kind: str
    tensors: int
    parameters: int
    bytes: int
    seconds: float
    status: str  # "ok" or "FAILED: <reason>"


def convert_batch(entries: list[BatchEntry], out_root: str | os.PathLike, force: bool = False,
                  progress: bool | None = None) -> list[BatchRow]:
    """Convert each entry into ``out_root/name``, carrying on past failures (malformed entries included).

    Each failure's full reason is logged at ERROR; the row's status holds its first line.
    """
    rows = []
    for e in entries:
        t0 = time.perf_counter()
        if e.error:
            log.error("%s: not converted: %s", e.name, e.error)
            rows.append(BatchRow(e.name, "-", "-", 0, 0, 0, 0.0, f"FAILED: {e.error}"))
            continue
        try:
            res = convert_checkpoint(e.source, Path(out_root) / e.name, dtype=e.dtype, fmt=e.format,
                                     force=force, progress=progress)
        except (ArrowEngineError, OSError) as exc:
            log.error("%s: conversion failed: %s", e.name, exc)
            reason = str(exc).splitlines()[0]
            rows.append(BatchRow(e.name, "-", "-", 0, 0, 0, time.perf_counter() - t0, f"FAILED: {reason}"))
            continue
        m = res.manifest
        rows.append(BatchRow(e.name, m.architecture, m.kind, m.tensors, m.parameters, m.bytes, res.seconds, "ok"))
    return rows
