"""Shared fixtures: HF checkpoints built offline and their converted model directories.

Everything is built once per test session under pytest's temporary folder.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import make_clip_checkpoint, make_reranker_checkpoint, minilm_dir, xlmr_tokenizer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: no test may reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("transformers").setLevel(logging.ERROR)


class _Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[str, Path] = {}

    def clip_source(self, geometry: str) -> Path:
        key = f"hf-clip-{geometry}"
        if key not in self.made:
            self.made[key] = make_clip_checkpoint(self.root / key, geometry)
        return self.made[key]

    def reranker_source(self, arch: str = "bert", geometry: str = "tiny", labels: int = 1,
                        activation: str | None = None, max_length: int | None = None) -> Path:
        """A cross-encoder (tests/checkpoints.py ``make_reranker_checkpoint``); XLM-R ones share one tokenizer."""
        key = "-".join(["hf-reranker", arch, geometry, str(labels), str(activation), str(max_length)])
        if key not in self.made:
            tokenizer = self.xlmr_tokenizer() if arch == "xlm-roberta" else None
            self.made[key] = make_reranker_checkpoint(self.root / key, arch, geometry, labels, activation, max_length,
                                                      tokenizer_dir=tokenizer)
        return self.made[key]

    def xlmr_tokenizer(self) -> Path:
        """The folder of an XLM-R tokenizer trained on CPython's documentation text (tests/checkpoints.py)."""
        if "xlmr-tokenizer" not in self.made:
            xlmr_tokenizer(self.root / "xlmr-tokenizer")
            self.made["xlmr-tokenizer"] = self.root / "xlmr-tokenizer"
        return self.made["xlmr-tokenizer"]

    def converted(self, source: Path, name: str, dtype: str = "keep", fmt: str = "arrow") -> Path:
        from convert.pipeline import convert_checkpoint

        key = f"model-{name}-{dtype}-{fmt}"
        if key not in self.made:
            convert_checkpoint(source, self.root / key, dtype=dtype, fmt=fmt, progress=False)
            self.made[key] = self.root / key
        return self.made[key]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> _Cache:
    """``checkpoints.clip_source("tiny")``, ``checkpoints.reranker_source("bert")``, ``checkpoints.converted(src,
    "tiny")``."""
    return _Cache(tmp_path_factory.mktemp("checkpoints"))


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
    out = tmp_path_factory.mktemp("cpp") / "arrowengine_client"
    done = subprocess.run([sys.executable, str(CPP_DIR / "build.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"build failed:\n{done.stdout}\n{done.stderr}"
    return out
