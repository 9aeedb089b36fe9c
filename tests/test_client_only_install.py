"""The client-only install: ``pip install arrowengine`` with no extra embeds through a server, without torch.

The slow test builds a fresh virtual environment offline: no system site-packages, and of this
environment only the closure of pyproject.toml's base ``dependencies`` (pyarrow, numpy, tqdm and
whatever they require) made importable, by a .pth file pointing at a folder of links to them. The
project is installed into it with pip, not editable (``--no-deps --no-index --no-build-isolation``),
from a copy of the source: a regular install proves the wheel's packages and entry point on their own,
and the build writes its ``build/`` and ``*.egg-info`` into the copy, not into the working tree.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import engine
from flight_client.cli import main

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "convert", "flight_server", "flight_client")
ENGINE_ONLY = ("torch", "cv2", "tokenizers", "safetensors", "prometheus_client", "yaml")
SERVER_EXTRA = 'pip install "arrowengine[server]"'
TEXTS = ["a photo of a cat", None, "a cup of coffee", "東京の夜景", "the client needs no torch"]

log = logging.getLogger(__name__)


# ---- without a venv: each engine command names the extra ----------------------------------------

@pytest.fixture
def engine_missing(monkeypatch):
    """This environment as a client-only install sees it: one module of the server extra absent."""
    monkeypatch.setitem(engine.SERVER_EXTRA_MODULES, "arrowengine_test_absent_module", "torch")


@pytest.mark.parametrize("argv,what", [
    (["serve", "--port", "0"], "arrowengine serve"),
    (["convert", "some/checkpoint", "out"], "arrowengine convert"),
    (["inspect", "models/x"], "arrowengine inspect"),
])
def test_engine_commands_name_the_server_extra_and_exit_2(engine_missing, caplog, argv, what):
    caplog.set_level(logging.ERROR)
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith(f"{what} needs the engine, and this installation lacks torch")
    assert SERVER_EXTRA in errors[0] and 'pip install -e ".[server]"' in errors[0]
    assert not any(r.exc_info for r in caplog.records)


def test_in_process_embed_names_the_server_extra_and_the_server_option(engine_missing, caplog, tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a"]}), path)
    caplog.set_level(logging.ERROR)
    assert main(["embed", str(path), str(tmp_path / "out"), "--kind", "text", "--no-progress"]) == 2
    assert "arrowengine embed without --server (in-process) needs the engine" in caplog.text
    assert SERVER_EXTRA in caplog.text and "--server grpc://HOST:PORT" in caplog.text
    assert not (tmp_path / "out").exists()


def test_require_engine_is_silent_with_the_engine_installed():
    assert engine.missing_engine_modules() == []
    engine.require_engine("anything")


# Which top-level packages each may import (lazy imports included): no circle, the server never imports the client.
ALLOWED_IMPORTS = {"engine": set(), "convert": {"engine"}, "flight_server": {"engine", "convert"},
                   "flight_client": {"engine", "convert", "flight_server"}}


def test_packages_import_each_other_in_one_direction_only():
    import ast

    found = []
    for package, allowed in ALLOWED_IMPORTS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {name}" for name in names
                          if name.split(".")[0] in ALLOWED_IMPORTS and name.split(".")[0] not in allowed | {package}]
    assert found == []


# ---- the fresh venv ------------------------------------------------------------------------------

def _base_closure() -> list[importlib.metadata.Distribution]:
    """The distributions of this environment that pyproject's base dependencies need, recursively."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [(Requirement(r), frozenset([""])) for r in base]
    found: dict[str, importlib.metadata.Distribution] = {}
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = canonicalize_name(req.name)
        if name in found:
            continue
        found[name] = dist = importlib.metadata.distribution(req.name)
        todo += [(Requirement(r), frozenset(["", *req.extras])) for r in dist.requires or []]
    return list(found.values())


def _link_distributions(dists: list[importlib.metadata.Distribution], folder: Path) -> list[str]:
    """Link every top-level entry of each distribution's RECORD (packages, .libs, .dist-info) into folder."""
    folder.mkdir()
    names = set()
    for dist in dists:
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if top.endswith(".pth") or top == "__pycache__":
                continue
            (folder / top).symlink_to(Path(dist.locate_file(top)).resolve())
            names.add(top)
    return sorted(names)


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would put the main environment on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "PYTHONNOUSERSITE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", **extra}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> dict[str, Path]:
    """A fresh venv with only the base dependencies importable and arrowengine installed (not editable)."""
    tmp = tmp_path_factory.mktemp("client-only")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)  # no system site-packages
    python = venv / "bin" / "python"
    env = _clean_env(ARROWENGINE_CACHE=str(tmp / "cache"))
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp, env).stdout.strip())
    deps = _link_distributions(_base_closure(), tmp / "client-deps")
    log.info("client dependencies linked into the venv: %s", deps)
    (site / "arrowengine-client-deps.pth").write_text(f"{tmp / 'client-deps'}\n")  # a folder of links
    # Build tools for the install only (ensurepip's setuptools may be older than pyproject's setuptools>=68).
    build_deps = tmp / "build-deps"
    _link_distributions([importlib.metadata.distribution("setuptools")], build_deps)
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    install = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "--no-cache-dir", str(source)], tmp, {**env, "PYTHONPATH": str(build_deps)}, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    return {"tmp": tmp, "venv": venv, "python": python, "site": site, "env": env}  # type: ignore[dict-item]


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


@pytest.fixture(scope="module")
def server_uri(minilm_model_dir):
    """``python -m flight_server.serve`` in this (full) environment, on a free port, until the module ends."""
    cmd = [sys.executable, "-m", "flight_server.serve", f"minilm={minilm_model_dir}", "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
                            text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
    seen: list[str] = []
    port = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                assert proc.poll() is None, "".join(seen)
                continue
            seen.append(line)
            match = re.search(r"listening on grpc\+tcp://127\.0\.0\.1:(\d+) ", line)
            port = int(match.group(1)) if match else port
            if port and re.search(r"\bready$", line):
                break
        else:
            raise AssertionError(f"the server was not ready within 120 s:\n{''.join(seen)}")
        yield f"grpc://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_client_only_venv_embeds_through_a_server_without_the_engine(client_venv, server_uri, minilm_model_dir):
    tmp, python, site, env = (client_venv[k] for k in ("tmp", "python", "site", "env"))
    bin_dir = client_venv["venv"] / "bin"

    # The engine's dependencies are not there; the base ones are, and pip sees every requirement met.
    probe = ("import importlib, json\nout = {}\n"
             f"for m in {ENGINE_ONLY + ('pyarrow.flight', 'numpy', 'tqdm')!r}:\n"
             "    try:\n        importlib.import_module(m)\n        out[m] = 'imported'\n"
             "    except ImportError as exc:\n        out[m] = type(exc).__name__\n"
             "print(json.dumps(out))")
    result = _run([str(python), "-c", probe], tmp, env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {**{m: "ModuleNotFoundError" for m in ENGINE_ONLY},
                                         "pyarrow.flight": "imported", "numpy": "imported", "tqdm": "imported"}
    check = _run([str(python), "-m", "pip", "check"], tmp, env)
    assert check.returncode == 0 and "No broken requirements" in check.stdout, check.stdout + check.stderr

    local = engine.load_model(minilm_model_dir).embed_texts(pa.array(TEXTS, pa.string()))
    valid = [e is None for e in local.errors]
    assert valid == [t is not None for t in TEXTS]

    # The Python client, imported from the venv's install (cwd is not the source tree).
    client_code = (
        "import sys, numpy as np\n"
        "import flight_client\nfrom flight_client import EmbeddingClient\n"
        f"with EmbeddingClient({server_uri!r}) as client:\n"
        f"    vecs = client.embed_texts({[t for t in TEXTS if t is not None]!r})\n"
        f"np.save({str(tmp / 'client.npy')!r}, vecs)\n"
        "print(flight_client.__file__)\n"
        f"print(sorted(m for m in {ENGINE_ONLY!r} if m in sys.modules))\n")
    result = _run([str(python), "-c", client_code], tmp, env)
    assert result.returncode == 0, result.stderr
    where, loaded = result.stdout.splitlines()
    assert Path(where).is_relative_to(site) and loaded == "[]"
    assert np.array_equal(np.load(tmp / "client.npy"), local.embeddings[valid])  # bit for bit

    # `arrowengine embed --server`: the job's output has every row, the failed one with its error.
    pq.write_table(pa.table({"id": pa.array(range(len(TEXTS)), pa.int64()), "text": pa.array(TEXTS, pa.string())}),
                   tmp / "in.parquet")
    result = _run([str(bin_dir / "arrowengine"), "embed", str(tmp / "in.parquet"), str(tmp / "out"), "--kind", "text",
                   "--server", server_uri, "--passthrough", "id", "--no-progress"], tmp, env)
    assert result.returncode == 0, result.stderr
    assert f"embed done: rows={len(TEXTS)} errors=1" in result.stderr
    out = pq.read_table(sorted((tmp / "out").glob("part-*.parquet")))
    assert out.column("id").to_pylist() == list(range(len(TEXTS)))
    assert [e is None for e in out.column("error").to_pylist()] == valid
    column = out.column("embedding").combine_chunks()
    vecs = column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
    assert np.array_equal(vecs[valid], local.embeddings[valid])

    # The version comes from the install's metadata; every engine command names the server extra.
    result = _run([str(bin_dir / "arrowengine"), "--version"], tmp, env)
    version = importlib.metadata.version("arrowengine")
    assert result.returncode == 0 and result.stdout.strip() == f"arrowengine {version}", result.stderr
    for argv in (["serve"], ["convert", "src", "dst"], ["inspect", "models/x"],
                 ["embed", str(tmp / "in.parquet"), str(tmp / "out-local"), "--kind", "text"]):
        result = _run([str(bin_dir / "arrowengine"), *argv], tmp, env)
        assert result.returncode == 2, (argv, result.stderr)
        assert SERVER_EXTRA in result.stderr and "needs the engine" in result.stderr, (argv, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp / "out-local").exists()

    # Its size: the venv's site-packages (pip, setuptools, arrowengine) and the linked dependencies, resolved.
    size = _run(["du", "-sk", "-L", str(site), str(tmp / "client-deps")], tmp, env)
    if size.returncode == 0:
        kib = [int(line.split()[0]) for line in size.stdout.splitlines()]
        log.info("client-only install: %.0f MiB (site-packages %.0f MiB + linked dependencies %.0f MiB, du -sk -L)",
                 sum(kib) / 1024, kib[0] / 1024, kib[1] / 1024)
