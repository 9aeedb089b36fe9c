"""Reading the files of a model folder, which is untrusted input.

A converted model directory, or a HuggingFace checkpoint being converted, may come from anywhere: a
``config.json`` can be a link to ``/dev/zero``, a FIFO, a directory, a link to a file elsewhere on the
machine, or just huge. Every read of such a file goes through :func:`read_model_file` (or
:func:`read_model_json`, :func:`copy_model_file`), which

* takes a plain relative name (no absolute path, no ``..``),
* requires a regular file whose real path lies inside the real path of the folder (links inside the folder
  are fine; a HuggingFace hub cache snapshot may link into its repo folder, see :func:`folder_boundary`),
* checks the size before reading and reads at most ``max_bytes + 1`` bytes, so a file that grows is still
  bounded,

and raises :class:`~engine.errors.ModelConfigError` (or the error class the caller names) saying which file,
what was expected and what to do. No torch, no pyarrow.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from engine.errors import ModelConfigError

MiB = 1024 * 1024
# Small JSON configs: config.json, tokenizer_config.json, preprocessor_config.json, processor_config.json,
# modules.json, sentence-transformers module configs, safetensors index files. Real ones are a few KB; the cap
# leaves ample room for a tokenizer_config.json with many added tokens or the shard index of a very large model.
MAX_CONFIG_BYTES = 16 * MiB
# tokenizer.json: Gemma's is ~33 MB, XLM-R's 17 MB; 128 MiB leaves room for bigger vocabularies.
MAX_TOKENIZER_BYTES = 128 * MiB
# manifest.json: ~1 KB plus one line per copied file.
MAX_MANIFEST_BYTES = 1 * MiB

_READ_CHUNK = 1 * MiB
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))


def folder_boundary(folder: str | os.PathLike) -> Path:
    """The real path that files of ``folder`` must lie inside: the folder's own real path, or, for a folder in a
    HuggingFace hub cache snapshot (``.../models--org--name/snapshots/<rev>[/sub]``, whose files are links to
    ``../../blobs/<sha>``), the repo cache folder that holds ``snapshots/`` and ``blobs/``.

    A snapshot is recognised by its layout: a folder whose parent is named ``snapshots`` and whose grandparent,
    named ``<kind>s--<org>--<name>`` as the hub cache names repos, holds ``blobs/``."""
    real = Path(os.path.realpath(folder))
    for ancestor in (real, *real.parents):
        parent, repo = ancestor.parent, ancestor.parent.parent
        if (parent != ancestor and parent.name == "snapshots" and "--" in repo.name
                and (repo / "blobs").is_dir()):
            return repo
    return real


def plain_relative(name: str | os.PathLike) -> PurePosixPath | None:
    """``name`` as a relative POSIX path with no ``..``, empty or absolute part; None if it is not one."""
    text = os.fspath(name)
    if not isinstance(text, str) or not text or "\0" in text or "\\" in text or text.startswith("/"):
        return None
    path = PurePosixPath(text)
    if not path.parts or any(part in ("", "..") for part in path.parts):
        return None
    return path


def _inside(path: Path, boundary: Path) -> bool:
    return path == boundary or boundary in path.parents


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device (such as /dev/zero or /dev/urandom)"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_model_file(folder: str | os.PathLike, relative_name: str | os.PathLike, what: str, *,
                     error: type[Exception] = ModelConfigError, missing: str | None = None,
                     optional: bool = False, boundary: Path | None = None) -> Path | None:
    """The real path of ``folder/relative_name`` once it is known to be a regular file inside the folder.

    Only ``lstat``/``stat`` and link resolution: nothing is opened or read.

    Args:
        folder: the model folder.
        relative_name: a plain relative path inside it (``config.json``, ``1_Pooling/config.json``).
        what: what the file is, for messages ("the model's config").
        error: the exception class to raise (ModelConfigError; WeightFormatError for the manifest and weights).
        missing: the message when nothing is there (default: "<path> is missing").
        optional: return None when nothing is there (a dangling link or any other odd file is still an error).
        boundary: the real path the file must lie inside (default: :func:`folder_boundary` of ``folder``).

    Raises:
        ``error``: the name is not a plain relative path, the file is missing (unless ``optional``), is a link
            that leaves the folder, a broken link, a directory, device, FIFO or socket.
    """
    folder = Path(folder)
    rel = plain_relative(relative_name)
    if rel is None:
        raise error(f"{folder}: {what} is named {os.fspath(relative_name)!r}, expected a plain relative path "
                    "inside the model folder (no '..', not absolute); fix the file that names it")
    path = folder / rel
    try:
        os.lstat(path)
    except FileNotFoundError:
        if optional:
            return None
        raise error(missing or f"{path} is missing") from None
    except (OSError, ValueError) as exc:  # NotADirectoryError: a parent is a file; ELOOP ...
        raise error(f"{path} ({what}) cannot be looked up: {exc}; expected a regular file") from exc
    if boundary is None:
        boundary = folder_boundary(folder)
    real = Path(os.path.realpath(path))
    if not _inside(real, boundary):
        raise error(f"{path} ({what}) is a link to {real}, outside the model folder {boundary}; expected a regular "
                    "file inside the folder: copy the file in instead of linking to it")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise error(f"{path} ({what}) is a broken link (to {real}); expected a regular file") from None
    except OSError as exc:
        raise error(f"{path} ({what}) cannot be read: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} ({what}) is {_kind(st.st_mode)}; expected a regular file")
    return real


def open_model_file(folder: str | os.PathLike, relative_name: str | os.PathLike, max_bytes: int | None, what: str,
                    *, error: type[Exception] = ModelConfigError, missing: str | None = None,
                    optional: bool = False, boundary: Path | None = None) -> tuple[int, os.stat_result] | None:
    """Check ``folder/relative_name`` as :func:`check_model_file` does, open it and check it again on the open
    descriptor (still a regular file, at most ``max_bytes`` bytes; None: no cap). Returns (fd, stat), the
    caller closes fd; None when ``optional`` and nothing is there."""
    real = check_model_file(folder, relative_name, what, error=error, missing=missing, optional=optional,
                            boundary=boundary)
    if real is None:
        return None
    path = Path(folder) / os.fspath(relative_name)
    try:  # no following a link swapped in since, and a FIFO swapped in cannot block the open
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as exc:
        raise error(f"{path} ({what}) cannot be opened: {exc}; expected a regular file") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path} ({what}) is {_kind(st.st_mode)}; expected a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise error(f"{path} ({what}) is {st.st_size:,} bytes, more than the {max_bytes:,} such a file may "
                        "have; this is not a file the model needs as it is: check where the folder came from")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _read_fd(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``fd``."""
    chunks, n = [], 0
    while n < limit:
        chunk = os.read(fd, min(_READ_CHUNK, limit - n))
        if not chunk:
            break
        chunks.append(chunk)
        n += len(chunk)
    return b"".join(chunks)


def read_model_file(folder: str | os.PathLike, relative_name: str | os.PathLike, max_bytes: int, what: str, *,
                    error: type[Exception] = ModelConfigError, missing: str | None = None, optional: bool = False,
                    boundary: Path | None = None) -> bytes | None:
    """The bytes of the regular file ``folder/relative_name``, at most ``max_bytes`` of them.

    See :func:`check_model_file` for the checks and arguments; the size is checked before reading, and at most
    ``max_bytes + 1`` bytes are read, so a file that grows meanwhile is still refused.

    Raises:
        ``error`` (ModelConfigError by default): as :func:`check_model_file`, or the file is larger than
            ``max_bytes`` or cannot be read.
    """
    opened = open_model_file(folder, relative_name, max_bytes, what, error=error, missing=missing,
                             optional=optional, boundary=boundary)
    if opened is None:
        return None
    fd, _ = opened
    path = Path(folder) / os.fspath(relative_name)
    try:
        data = _read_fd(fd, max_bytes + 1)
    except OSError as exc:
        raise error(f"{path} ({what}) cannot be read: {exc}") from exc
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise error(f"{path} ({what}) grew past the {max_bytes:,} bytes such a file may have while it was read")
    return data


def read_model_json(folder: str | os.PathLike, relative_name: str | os.PathLike, what: str, *,
                    max_bytes: int = MAX_CONFIG_BYTES, error: type[Exception] = ModelConfigError,
                    missing: str | None = None, optional: bool = False, boundary: Path | None = None) -> Any:
    """The parsed JSON of ``folder/relative_name``, read as :func:`read_model_file` reads it; None when
    ``optional`` and there is no such file.

    Raises:
        ``error``: as :func:`read_model_file`, or the bytes are not JSON (UTF-8 or UTF-16/32 as json detects).
    """
    data = read_model_file(folder, relative_name, max_bytes, what, error=error, missing=missing,
                           optional=optional, boundary=boundary)
    return None if data is None else parse_json(data, Path(folder) / os.fspath(relative_name), error)


def parse_json(data: bytes, path: Path, error: type[Exception] = ModelConfigError) -> Any:
    """``data``, the bytes of the file ``path``, parsed as JSON; ``error`` saying which file when it is not."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise error(f"{path} is not valid JSON: {exc}") from exc


def copy_model_file(folder: str | os.PathLike, relative_name: str | os.PathLike, dest: Path, max_bytes: int,
                    what: str, *, error: type[Exception] = ModelConfigError, boundary: Path | None = None) -> int:
    """Copy the regular file ``folder/relative_name`` (checked as :func:`read_model_file` checks it) to the new
    file ``dest`` (never an existing one, nor through a link); returns the bytes copied.

    Raises:
        ``error``: as :func:`read_model_file`. FileExistsError: ``dest`` exists.
    """
    opened = open_model_file(folder, relative_name, max_bytes, what, error=error, boundary=boundary)
    assert opened is not None
    fd, _ = opened
    path = Path(folder) / os.fspath(relative_name)
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                      | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            n = 0
            while n <= max_bytes:
                chunk = os.read(fd, min(_READ_CHUNK, max_bytes + 1 - n))
                if not chunk:
                    break
                n += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
        finally:
            os.close(out)
    finally:
        os.close(fd)
    if n > max_bytes:
        os.unlink(dest)
        raise error(f"{path} ({what}) grew past the {max_bytes:,} bytes such a file may have while it was copied")
    return n
