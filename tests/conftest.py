"""Shared fixtures: HF checkpoints built offline and their converted model directories.

Everything is built once per test session under pytest's temporary folder.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

import engine

sys.path.insert(0, str(Path(__file__).parent))

# The OpenMP settings every entry point runs with, before torch loads (the xdist workers and every subprocess a
# test starts inherit them). Same hour, same machine, 995 tests: 256 s with libgomp's default spin, 224 s with
# these (the workers' idle threads spun on the cores the other worker needed).
engine.set_thread_defaults()

from checkpoints import make_clip_checkpoint, make_reranker_checkpoint, minilm_dir, xlmr_tokenizer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: no test may reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("transformers").setLevel(logging.ERROR)


def _shared_root(tmp_path_factory, name: str) -> Path:
    """A folder every pytest-xdist worker of this run sees (the workers' common parent folder), or this process's
    own where it runs alone."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp(name)
    root = tmp_path_factory.getbasetemp().parent / name
    root.mkdir(exist_ok=True)
    return root


def _built_once(root: Path, key: str, build) -> Path:
    """``build(root / key)``'s folder, built by one process of the run: the others wait on its lock and reuse it."""
    from filelock import FileLock

    done = root / f"{key}.done"
    with FileLock(str(root / f"{key}.lock")):
        if not done.exists():
            shutil.rmtree(root / key, ignore_errors=True)  # a build that failed half-way
            done.write_text(str(build(root / key)))
    return Path(done.read_text())


class _Cache:
    """Checkpoints built once per test run and shared by its pytest-xdist workers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[str, Path] = {}

    def _once(self, key: str, build) -> Path:
        if key not in self.made:
            self.made[key] = _built_once(self.root, key, build)
        return self.made[key]

    def clip_source(self, geometry: str) -> Path:
        return self._once(f"hf-clip-{geometry}", lambda path: make_clip_checkpoint(path, geometry))

    def reranker_source(self, arch: str = "bert", geometry: str = "tiny", labels: int = 1,
                        activation: str | None = None, max_length: int | None = None) -> Path:
        """A cross-encoder (tests/checkpoints.py ``make_reranker_checkpoint``); XLM-R ones share one tokenizer."""
        key = "-".join(["hf-reranker", arch, geometry, str(labels), str(activation), str(max_length)])
        tokenizer = self.xlmr_tokenizer() if arch == "xlm-roberta" else None
        return self._once(key, lambda path: make_reranker_checkpoint(path, arch, geometry, labels, activation,
                                                                     max_length, tokenizer_dir=tokenizer))

    def xlmr_tokenizer(self) -> Path:
        """The folder of an XLM-R tokenizer trained on CPython's documentation text (tests/checkpoints.py)."""
        def build(path: Path) -> Path:
            xlmr_tokenizer(path)
            return path
        return self._once("xlmr-tokenizer", build)

    def converted(self, source: Path, name: str, dtype: str = "keep", fmt: str = "arrow") -> Path:
        from convert.pipeline import convert_checkpoint

        def build(path: Path) -> Path:
            convert_checkpoint(source, path, dtype=dtype, fmt=fmt, progress=False)
            return path
        return self._once(f"model-{name}-{dtype}-{fmt}", build)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> _Cache:
    """``checkpoints.clip_source("tiny")``, ``checkpoints.reranker_source("bert")``, ``checkpoints.converted(src,
    "tiny")``; built once per run, whichever worker asks first."""
    return _Cache(_shared_root(tmp_path_factory, "checkpoints"))


@pytest.fixture(scope="session")
def tiny_clip_source(checkpoints) -> Path:
    return checkpoints.clip_source("tiny")


@pytest.fixture(scope="session")
def tiny_clip_dir(checkpoints, tiny_clip_source) -> Path:
    return checkpoints.converted(tiny_clip_source, "tiny")


@pytest.fixture(scope="session")
def minilm_source() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def minilm_model_dir(checkpoints, minilm_source) -> Path:
    return checkpoints.converted(minilm_source, "minilm")


CPP_DIR = Path(__file__).resolve().parent.parent / "flight_client" / "cpp"


@pytest.fixture(scope="session")
def cpp_client_binary(tmp_path_factory) -> Path:
    """The C++ example client, built by ``python flight_client/cpp/build.py --out DIR`` (the command the docs
    give, with the binary written to a temporary folder); skipped, saying so, where no C++ compiler exists."""
    import importlib.util
    import subprocess

    spec = importlib.util.spec_from_file_location("arrowengine_cpp_build", CPP_DIR / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    if build.find_compiler() is None:
        pytest.skip("no C++ compiler ($CXX, g++, c++ or clang++) on PATH")

    def build_into(folder: Path) -> Path:
        folder.mkdir()
        out = folder / "arrowengine_client"
        done = subprocess.run([sys.executable, str(CPP_DIR / "build.py"), "--out", str(out)],
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, f"build failed:\n{done.stdout}\n{done.stderr}"
        return out
    return _built_once(_shared_root(tmp_path_factory, "cpp"), "client", build_into)
