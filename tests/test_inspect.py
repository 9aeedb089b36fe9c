"""`arrowengine inspect [--verify]` (convert/verify.py, convert/cli.py)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from convert.cli import main
from convert.pipeline import convert_checkpoint
from engine.weights import WeightFile


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int8: "I8"}
    header, blobs, pos = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["ToyForCausalLM"], "model_type": "toy"}))
    g = torch.Generator().manual_seed(0)
    _write_safetensors(src / "model.safetensors", {
        "model.embed.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.w": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "model.layers.0.q": torch.randint(-5, 5, (3,), generator=g, dtype=torch.int8),
    })
    convert_checkpoint(src, tmp_path / "out")
    return tmp_path / "out"


def test_inspect_prints_summary_and_tensors(model_dir, capsys):
    assert main(["inspect", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "ToyForCausalLM (store)" in out and "3 tensors, 59 parameters, 195 bytes" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("model.")}
    assert rows == {"model.embed.weight": ["float32", "10x4", "160"],
                    "model.layers.0.w": ["bfloat16", "4x4", "32"],
                    "model.layers.0.q": ["int8", "3", "3"]}


def test_verify_ok_then_catches_a_flipped_data_byte(model_dir, capsys):
    assert main(["inspect", str(model_dir), "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    weights = model_dir / "weights.arrow"
    offset = WeightFile.open(weights).info("model.layers.0.w").offset
    blob = bytearray(weights.read_bytes())
    blob[offset + 5] ^= 0x01
    weights.write_bytes(bytes(blob))
    assert main(["inspect", str(model_dir), "--verify"]) == 1
    out = capsys.readouterr().out
    mismatches = [line for line in out.splitlines() if line.startswith("MISMATCH")]
    assert len(mismatches) == 2, out  # the tensor and the whole file
    assert "'model.layers.0.w'" in mismatches[0] and "weights.arrow" in mismatches[1]


def test_verify_parquet_and_missing_file(tmp_path, model_dir, capsys):
    convert_checkpoint(model_dir.parent / "src", tmp_path / "pq", fmt="parquet")
    assert main(["inspect", str(tmp_path / "pq"), "--verify"]) == 0
    (model_dir / "config.json").unlink()
    assert main(["inspect", str(model_dir), "--verify"]) == 1
    assert "missing: ['config.json']" in capsys.readouterr().out


def test_inspect_bad_directory(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    assert "no manifest.json" in capsys.readouterr().err
