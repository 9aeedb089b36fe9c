"""Read a HuggingFace checkpoint lazily: config, small files and tensors one at a time.

Safetensors shards are read by parsing their header ourselves (8-byte
little-endian header length, then JSON: ``name -> {dtype, shape,
data_offsets}``) and mapping the file, so any dtype in
:data:`engine.format.SAFETENSORS_DTYPES` passes through byte-exact without
torch or safetensors understanding it.  After each tensor is consumed its pages
are dropped from the process (``madvise(MADV_DONTNEED)``), which keeps resident
memory bounded by the largest tensor rather than the checkpoint.

``pytorch_model*.bin`` files are the fallback, read with
``torch.load(weights_only=True, mmap=True)`` (never a full unpickle).

The source folder is untrusted input: every file read or copied from it must be a regular file whose real path
lies inside the folder (:mod:`engine.files`); a link that leaves it is an error that names it. A folder in a
HuggingFace hub cache snapshot (``models--org--name/snapshots/<rev>``, files linking to ``../../blobs/<sha>``)
may link anywhere inside its repo cache folder (:func:`engine.files.folder_boundary`). Linked directories are
never descended into when looking for files to copy.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import ST_MODULE_PREFIX, module_weight_files
from engine.errors import ModelConfigError, WeightFormatError
from engine.files import (
    MAX_CONFIG_BYTES, MAX_TOKENIZER_BYTES, check_model_file, folder_boundary, parse_json, read_model_file,
)
from engine.format import SAFETENSORS_DTYPES, tensor_nbytes

log = logging.getLogger(__name__)

_MAX_HEADER = 256 * 1024 * 1024  # a safetensors header larger than this is corrupt
SMALL_FILE_SUFFIXES = (".json", ".txt", ".model")
SMALL_FILE_MAX_BYTES = MAX_TOKENIZER_BYTES  # the largest small file the engine reads (tokenizer.json)
_NOT_COPIED = ("manifest.json",)
_HUB_IGNORE = ["*.msgpack", "*.h5", "*.onnx", "*.ot", "*.tflite", "*.gguf", "onnx/*", "openvino/*",
               "*.mlmodel", "*.mlpackage/*", "flax_model*", "tf_model*", "rust_model*"]


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor of the checkpoint lives."""

    name: str  # name in the checkpoint
    dtype: str  # engine.format dtype name
    shape: tuple[int, ...]
    nbytes: int
    file: Path
    begin: int = 0  # absolute byte offset in a safetensors file (unused for .bin)
    key: str | None = None  # the tensor's name inside ``file`` when ``name`` differs (module-folder weights)


@dataclass
class Checkpoint:
    """A resolved checkpoint directory: its config and an index of its tensors."""

    source: str  # what the user passed
    root: Path
    config: dict[str, Any]
    tensors: list[TensorRef] = field(default_factory=list)
    bin_files: list[Path] = field(default_factory=list)  # pytorch_model*.bin fallback
    boundary: Path | None = None  # real path every file must lie inside (engine.files.folder_boundary of the source)

    def __post_init__(self) -> None:
        if self.boundary is None:
            self.boundary = folder_boundary(self.root)

    @classmethod
    def open(cls, source: str | os.PathLike) -> "Checkpoint":
        """Resolve ``source`` (local directory or hub id), read config.json and index the tensors.

        Raises:
            ModelConfigError: the source cannot be found/downloaded, config.json is invalid, or a file the
                conversion reads is not a regular file inside the source (a link that leaves it, a device ...).
            WeightFormatError: a safetensors header or the shard index is inconsistent.
        """
        root = resolve_source(source)
        boundary = folder_boundary(root)  # of the folder given: a wrapped model folder may not lead out of it
        inner = st_wrapped_model(root, boundary)
        if inner is not None:
            log.info("%s: a sentence-transformers folder around a CLIP model; converting %s", root, inner)
            root = inner
        config_path = root / "config.json"
        config: Any = {}
        data = read_model_file(root, "config.json", MAX_CONFIG_BYTES, "the checkpoint's config", optional=True,
                               boundary=boundary)
        if data is not None:
            config = parse_json(data, config_path)
            if not isinstance(config, dict):
                raise ModelConfigError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
        else:
            log.warning("%s has no config.json; it can only be converted in store mode", root)
        ckpt = cls(str(source), root, config, boundary=boundary)
        ckpt._index()
        return ckpt

    def check(self, path: Path, what: str) -> Path:
        """``path`` (inside :attr:`root`) once it is known to be a regular file inside the source.

        Raises:
            ModelConfigError: it is a link that leaves the source, a broken link, or not a regular file.
        """
        check_model_file(self.root, path.relative_to(self.root).as_posix(), what, boundary=self.boundary)
        return path

    def _index(self) -> None:
        self._index_model()
        self._index_module_folders()

    def _index_module_folders(self) -> None:
        """sentence-transformers modules with weights of their own (``2_Dense/model.safetensors``, or
        ``pytorch_model.bin`` as sentence-transformers 2.x saved them): their tensors join the checkpoint
        as ``st_modules.<folder>.<name>``."""
        for rel in st_module_folders(self.root, self.boundary):
            for f in module_weight_files(self.root / rel):
                self.check(f, f"the weights of module {rel}")
                refs = read_safetensors_header(f) if f.suffix == ".safetensors" else _bin_refs([f])
                self.tensors += [dataclasses.replace(r, name=f"{ST_MODULE_PREFIX}{rel}.{r.name}", key=r.name)
                                 for r in refs]

    def _index_model(self) -> None:
        shards = safetensors_files(self.root, self.boundary)
        if shards:
            seen: dict[str, Path] = {}
            for shard in shards:
                self.check(shard, "a weight shard")
                for ref in read_safetensors_header(shard):
                    if ref.name in seen:
                        raise WeightFormatError(
                            f"tensor {ref.name!r} is in both {seen[ref.name].name} and {shard.name}; "
                            "the checkpoint is inconsistent")
                    seen[ref.name] = shard
                    self.tensors.append(ref)
            _check_index(self.root, seen, self.boundary)
            return
        self.bin_files = [self.check(f, "a weight file") for f in sorted(self.root.glob("pytorch_model*.bin"))]
        if not self.bin_files:
            raise ModelConfigError(
                f"{self.root}: no *.safetensors or pytorch_model*.bin weights found; expected a "
                "HuggingFace checkpoint directory")
        self.tensors = list(_bin_refs(self.bin_files))

    def small_files(self) -> list[Path]:
        """Relative paths of the non-weight files to copy (*.json, *.txt, *.model, size-capped; none hidden).

        Only regular files inside the source are copied: the folder is walked without following links to
        directories (those are not descended into, whether they lead in or out of the source); a file that
        would be copied and is a link out of the source is an error.

        Raises:
            ModelConfigError: a *.json, *.txt or *.model file is a link that leaves the source.
        """
        out: list[Path] = []
        self._walk_small_files(Path(), out)
        return sorted(out)

    def _walk_small_files(self, rel_dir: Path, out: list[Path]) -> None:
        assert self.boundary is not None
        with os.scandir(self.root / rel_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = rel_dir / entry.name
            if entry.name.startswith("."):
                continue
            wanted = (Path(entry.name).suffix in SMALL_FILE_SUFFIXES and not entry.name.endswith(".index.json")
                      and not (entry.name in _NOT_COPIED and rel_dir == Path()))
            if entry.is_symlink():
                real = Path(os.path.realpath(entry.path))
                if not (real == self.boundary or self.boundary in real.parents):
                    if wanted:
                        raise ModelConfigError(
                            f"{entry.path} is a link to {real}, outside the checkpoint folder {self.boundary}; "
                            "expected a regular file inside it: copy the file in instead of linking to it "
                            "(nothing was converted)")
                    log.warning("%s is a link to %s, outside the checkpoint folder: not followed", entry.path, real)
                    continue
                try:
                    st = os.stat(real)
                except OSError:
                    if wanted:
                        log.warning("not copying %s: a broken link (to %s)", rel, real)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    log.info("%s is a link to the folder %s: not descended into", entry.path, real)
                    continue
            elif entry.is_dir(follow_symlinks=False):
                self._walk_small_files(rel, out)
                continue
            else:
                st = entry.stat(follow_symlinks=False)
            if not wanted:
                continue
            if not stat.S_ISREG(st.st_mode):
                log.warning("not copying %s: not a regular file", rel)
                continue
            if st.st_size > SMALL_FILE_MAX_BYTES:
                log.warning("not copying %s: larger than %d bytes", rel, SMALL_FILE_MAX_BYTES)
                continue
            out.append(rel)

    @contextmanager
    def reader(self) -> Iterator["TensorReader"]:
        """A reader that hands out tensor bytes one at a time (see :class:`TensorReader`)."""
        r = TensorReader(self)
        try:
            yield r
        finally:
            r.close()


class TensorReader:
    """Yields each tensor's bytes as a memoryview; memory bounded by the largest tensor."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self._ckpt = ckpt
        self._maps: dict[Path, mmap.mmap] = {}
        self._bin: dict[str, Any] | None = None
        self._bin_file: Path | None = None

    @contextmanager
    def read(self, ref: TensorRef) -> Iterator[memoryview]:
        """Bytes of ``ref`` (little-endian, C order), valid inside the ``with`` block."""
        if ref.file.suffix == ".safetensors":
            mm = self._maps.get(ref.file)
            if mm is None:
                with open(ref.file, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[ref.file] = mm
            view = memoryview(mm)[ref.begin:ref.begin + ref.nbytes]
            try:
                yield view
            finally:
                view.release()
                _drop_pages(mm, ref.begin, ref.nbytes)
            return
        yield from _bin_bytes(self, ref)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a consumer still holds a view; let GC unmap it
                log.debug("mmap still exported at close")
        self._maps.clear()
        self._bin = None


def _drop_pages(mm: mmap.mmap, begin: int, nbytes: int) -> None:
    """Drop a consumed range from our resident set (file-backed pages: re-read on demand)."""
    if nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start = begin - begin % page
    end = min(len(mm), begin + nbytes)
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError):  # advisory only
        pass


def _bin_bytes(reader: TensorReader, ref: TensorRef) -> Iterator[memoryview]:
    import torch

    if reader._bin_file != ref.file:
        reader._bin = _torch_load(ref.file)
        reader._bin_file = ref.file
    assert reader._bin is not None
    t = reader._bin[ref.key or ref.name].contiguous()
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
    yield view


def _torch_load(path: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:  # legacy (non-zip) files cannot be mapped
        if "mmap" not in str(exc):
            raise WeightFormatError(f"{path}: cannot be read safely ({exc})") from exc
        log.warning("%s: legacy format, loading without mmap", path.name)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- pickle errors have many types
        raise WeightFormatError(f"{path}: cannot be read with weights_only=True ({exc})") from exc


def _bin_refs(files: list[Path]) -> Iterator[TensorRef]:
    """Index .bin files (each mapped and scanned once; tensors reread per file later)."""
    from engine.format import DTYPES

    seen: set[str] = set()
    for path in files:
        state = _torch_load(path)
        for name, t in state.items():
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in DTYPES:
                raise WeightFormatError(f"{path.name}: tensor {name!r} has dtype {t.dtype}, "
                                        f"which the format does not support ({sorted(DTYPES)})")
            if name in seen:
                raise WeightFormatError(f"tensor {name!r} appears in more than one .bin shard")
            seen.add(name)
            shape = tuple(t.shape)
            yield TensorRef(name, dtype, shape, tensor_nbytes(shape, dtype), path)
        del state


def _read_modules(root: Path, boundary: Path | None = None) -> Any:
    """The parsed modules.json of ``root``; None when there is none or it is not JSON (the folder is then not a
    sentence-transformer).

    Raises:
        ModelConfigError: modules.json is not a regular file inside the source, or is too large.
    """
    data = read_model_file(root, "modules.json", MAX_CONFIG_BYTES, "the sentence-transformers module list",
                           optional=True, boundary=boundary)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def st_wrapped_model(root: Path, boundary: Path | None = None) -> Path | None:
    """The model folder of a sentence-transformers checkpoint that keeps its one module in a sub-folder, as
    sentence-transformers before 3.x saved CLIP (``modules.json`` + ``0_CLIPModel/`` holding a transformers
    CLIPModel, e.g. sentence-transformers/clip-ViT-B-32); None for any other folder. The sub-folder must be a
    folder inside the source (``boundary``, default :func:`engine.files.folder_boundary` of ``root``).

    Raises:
        ModelConfigError: modules.json, or the sub-folder, leads out of the source.
    """
    if os.path.lexists(root / "config.json"):
        return None
    modules = _read_modules(root, boundary)
    if not (isinstance(modules, list) and len(modules) == 1 and isinstance(modules[0], dict)
            and str(modules[0].get("type", "")).endswith("CLIPModel")):
        return None
    folders = st_module_folders(root, boundary)
    if not folders or not (root / folders[0] / "config.json").is_file():
        return None
    check_model_file(root, f"{folders[0]}/config.json", "the wrapped model's config", boundary=boundary)
    return root / folders[0]


def st_module_folders(root: Path, boundary: Path | None = None) -> list[str]:
    """The sub-folders that a sentence-transformers ``modules.json`` names (``1_Pooling``, ``2_Dense``, ...),
    where they exist; none for a folder without modules.json.

    Raises:
        ModelConfigError: modules.json is not a regular file inside the source (``boundary``), or too large; a
            module folder is a link that leaves the source.
    """
    modules = _read_modules(root, boundary)
    if boundary is None:
        boundary = folder_boundary(root)
    out = []
    for m in modules if isinstance(modules, list) else []:
        rel = m.get("path") if isinstance(m, dict) else None
        if not (isinstance(rel, str) and rel and Path(rel).name == rel and "." not in rel):
            continue
        real = Path(os.path.realpath(root / rel))
        if not (real == boundary or boundary in real.parents):
            raise ModelConfigError(f"{root / rel} (a sentence-transformers module folder) is a link to {real}, "
                                   f"outside the checkpoint folder {boundary}; expected a folder inside it: copy "
                                   "it in instead of linking to it (nothing was converted)")
        if real.is_dir():
            out.append(rel)
    return out


def resolve_source(source: str | os.PathLike) -> Path:
    """A local checkpoint directory for ``source``: itself if it is a directory, else a hub download.

    Raises:
        ModelConfigError: not a directory and not downloadable (hub package missing, offline, unknown id).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelConfigError(f"{source}: not a checkpoint directory (and not a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelConfigError(
            f"{source!r} is not a local directory and huggingface_hub is not installed to download "
            "it; `pip install huggingface_hub` or pass a local checkpoint directory") from exc
    try:  # safetensors first; pytorch_model*.bin only when the repo has no safetensors
        root = Path(snapshot_download(text, ignore_patterns=_HUB_IGNORE + ["*.bin", "*.pt", "*.pth"]))
        if not any(root.glob("*.safetensors")):
            root = Path(snapshot_download(text, allow_patterns=["pytorch_model*.bin", "*.bin.index.json"]))
        old_modules = [f"{rel}/pytorch_model.bin" for rel in st_module_folders(root)
                       if not (root / rel / "model.safetensors").exists()]
        if old_modules:  # e.g. a 2_Dense saved by sentence-transformers 2.x (no safetensors there)
            root = Path(snapshot_download(text, allow_patterns=old_modules))
        return root
    except Exception as exc:  # noqa: BLE001 -- the hub raises many types (offline, 404, auth)
        raise ModelConfigError(
            f"could not download {source!r} from the HuggingFace hub ({type(exc).__name__}: {exc}); "
            "check the id and network, or pass a local checkpoint directory") from exc


def safetensors_files(root: Path, boundary: Path | None = None) -> list[Path]:
    """The checkpoint's safetensors shards: from model.safetensors.index.json if present; else, in a transformers
    folder (one with config.json), model.safetensors alone, as transformers loads it (a repo may ship others
    beside it, e.g. open_clip_model.safetensors or model.fp16.safetensors); else every *.safetensors.

    The index is read as a regular file inside the source (``boundary``); the shards are checked by the caller
    (:meth:`Checkpoint.check`)."""
    indexes = _indexes(root)
    if indexes:
        weight_map = _read_index(indexes[0], boundary)
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise WeightFormatError(f"{indexes[0].name} names shard(s) that are missing: {missing}; "
                                    "download the complete checkpoint")
        return [root / f for f in files]
    files = sorted(root.glob("*.safetensors"))
    if (root / "model.safetensors").is_file() and len(files) > 1 and (root / "config.json").is_file():
        log.info("%s: converting model.safetensors; not the other weight files beside it: %s", root,
                 [f.name for f in files if f.name != "model.safetensors"])
        return [root / "model.safetensors"]
    return files


def _indexes(root: Path) -> list[Path]:
    """Safetensors index files, model.safetensors.index.json first."""
    return sorted(root.glob("*.safetensors.index.json"), key=lambda p: (p.name != "model.safetensors.index.json",
                                                                         p.name))


def _read_index(path: Path, boundary: Path | None = None) -> dict[str, str]:
    data = read_model_file(path.parent, path.name, MAX_CONFIG_BYTES, "a safetensors index", boundary=boundary)
    try:
        weight_map = json.loads(data)["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise WeightFormatError(f"{path}: expected JSON with a 'weight_map' object ({exc})") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightFormatError(f"{path}: 'weight_map' must map tensor names to shard file names")
    for shard in weight_map.values():
        if Path(shard).name != shard:
            raise WeightFormatError(f"{path}: shard name {shard!r} must be a plain file name")
    return weight_map


def _check_index(root: Path, found: dict[str, Path], boundary: Path | None = None) -> None:
    indexes = _indexes(root)
    if not indexes:
        return
    weight_map = _read_index(indexes[0], boundary)
    problems = [f"{n!r} listed in {weight_map[n]} but not found there"
                for n in weight_map if n not in found or found[n].name != weight_map[n]]
    if problems:
        raise WeightFormatError(f"{indexes[0].name} disagrees with the shards: " + "; ".join(problems[:20]))


def read_safetensors_header(path: Path) -> list[TensorRef]:
    """Parse a safetensors header; refs sorted by data offset (sequential reads).

    Raises:
        WeightFormatError: truncated file, bad JSON, unknown dtype, or offsets that
            disagree with shapes or fall outside the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightFormatError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise WeightFormatError(f"{path}: header length {n} exceeds the file ({size} bytes); truncated?")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise WeightFormatError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise WeightFormatError(f"{path}: safetensors header must be a JSON object")
    data_start, problems, refs = 8 + n, [], []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (b, e) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name!r}: malformed entry {entry!r}")
            continue
        dtype = SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            problems.append(f"{name!r}: dtype {code!r} not supported (known: {sorted(SAFETENSORS_DTYPES)})")
            continue
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            problems.append(f"{name!r}: bad shape {shape!r}")
            continue
        nbytes = tensor_nbytes(shape, dtype)
        if not (isinstance(b, int) and isinstance(e, int) and 0 <= b <= e and e - b == nbytes
                and data_start + e <= size):
            problems.append(f"{name!r}: data_offsets {[b, e]} disagree with shape {shape} x {dtype} "
                            f"({nbytes} bytes) or the file size")
            continue
        refs.append(TensorRef(name, dtype, tuple(shape), nbytes, path, data_start + b))
    if problems:
        raise WeightFormatError(f"{path}: {len(problems)} bad tensor entries: " + "; ".join(problems[:20]))
    refs.sort(key=lambda r: r.begin)
    return refs
