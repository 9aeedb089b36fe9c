"""engine/weights.py + engine/format.py: golden bytes, zero copy, validation of bad files."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from convert.writer import Tensor, write_tensors
from engine.errors import WeightFormatError
from engine.format import Manifest
from engine.weights import WeightFile, load_weights, read_manifest

REPO = Path(__file__).resolve().parents[1]

# The format, spelled out here rather than imported: these tests pin the bytes on disk.
GOLDEN_SCHEMA = pa.schema(
    [
        pa.field("name", pa.utf8(), nullable=False),
        pa.field("dtype", pa.utf8(), nullable=False),
        pa.field("shape", pa.list_(pa.int64()), nullable=False),
        pa.field("sha256", pa.utf8(), nullable=False),
        pa.field("_pad", pa.binary(), nullable=False),
        pa.field("data", pa.large_binary(), nullable=False),
    ],
    metadata={"arrowengine.format": "arrowengine", "arrowengine.format_version": "1"},
)


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "text_model.embeddings.token_embedding.weight": torch.randn(7, 5, generator=g),
        "a": torch.randn(3, generator=g).to(torch.float16),
        "layers.0.mlp.experts.3.w1.weight": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "logit_scale": torch.tensor(2.6592),  # shape ()
        "q.weight": torch.randn(8, 8, generator=g).to(torch.float8_e4m3fn),
        "ids": torch.arange(11, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "i8": torch.randint(-128, 127, (5, 3), dtype=torch.int8, generator=g),
        "empty.bias": torch.zeros(0, 4),
        "odd name/with spaces & ünïcode": torch.randn(2, 3, generator=g).double(),
    }


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    def items():
        for name, t in tensors.items():
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
            yield Tensor(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), memoryview(raw))

    write_tensors(path, "arrow", items())
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = _sample_tensors()
    return _write(tmp_path_factory.mktemp("w") / "weights.arrow", tensors), tensors


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_golden_bytes_with_plain_pyarrow(sample):
    path, tensors = sample
    blob = path.read_bytes()
    assert blob[:6] == b"ARROW1" and blob[-6:] == b"ARROW1"
    with pa.memory_map(str(path)) as src:
        base = src.read_buffer(1).address  # zero-copy slice at file offset 0
        src.seek(0)
        reader = pa.ipc.open_file(src)
        assert reader.schema.equals(GOLDEN_SCHEMA, check_metadata=True)
        assert reader.num_record_batches == len(tensors)
        seen = []
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            assert batch.num_rows == 1
            row = {k: v[0] for k, v in batch.to_pydict().items()}
            t = tensors[row["name"]]
            assert row["dtype"] == str(t.dtype).removeprefix("torch.")
            assert row["shape"] == list(t.shape)
            assert row["data"] == _raw(t)
            assert row["sha256"] == hashlib.sha256(_raw(t)).hexdigest()
            assert set(row["_pad"]) <= {0}
            data = batch.column("data")
            if len(row["data"]):
                offset = data.buffers()[2].address - base
                assert offset % 64 == 0, (row["name"], offset)
                assert blob[offset:offset + len(row["data"])] == row["data"]
            seen.append(row["name"])
    assert seen == list(tensors)  # written in the order given


def test_load_round_trip_all_dtypes(sample):
    path, tensors = sample
    loaded = load_weights(path)
    assert list(loaded) == list(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert _raw(loaded[name]) == _raw(t), name
    wf = WeightFile.open(path)
    info = wf.info("layers.0.mlp.experts.3.w1.weight")
    assert (info.dtype, info.shape, info.nbytes, info.offset % 64) == ("bfloat16", (4, 6), 48, 0)
    assert "mask" in wf and len(wf) == len(tensors)


def _mapping_of(path: Path) -> tuple[int, int]:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            return lo, hi
    raise AssertionError(f"{path} is not mapped")


def test_tensors_are_views_of_the_mapped_file(sample):
    path, tensors = sample
    wf = WeightFile.open(path)
    lo, hi = _mapping_of(path)
    for name in wf.names:
        t = wf.tensor(name)
        if t.numel():
            info = wf.info(name)
            assert t.data_ptr() == lo + info.offset, name  # no copy: points at the file's bytes
            assert lo <= t.data_ptr() and t.data_ptr() + info.nbytes <= hi


def test_tensors_are_writable_but_never_touch_the_file(sample, tmp_path):
    path = _write(tmp_path / "w.arrow", _sample_tensors())
    before = path.read_bytes()
    sd = load_weights(path)
    sd["text_model.embeddings.token_embedding.weight"].mul_(0).add_(7)  # copy-on-write pages
    assert float(sd["text_model.embeddings.token_embedding.weight"][0, 0]) == 7
    del sd
    assert path.read_bytes() == before
    assert float(load_weights(path)["text_model.embeddings.token_embedding.weight"][0, 0]) != 7


RSS_SCRIPT = textwrap.dedent("""
    import sys, re
    from pathlib import Path
    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) // 1024
    import torch, pyarrow, engine.weights
    from engine.weights import load_weights
    load_weights(sys.argv[2])  # warm imports on a tiny file
    r0 = rss()
    sd = load_weights(sys.argv[1])
    r1 = rss()
    total = sum(float(t.float().sum()) for t in sd.values())  # touch every page
    r2 = rss()
    print(r0, r1, r2, total)
""")


def test_loading_does_not_read_the_data(sample, tmp_path):
    """~200 MB file: RSS grows by a few MB on load, by ~200 MB once the data is touched."""
    chunk = np.full(25 * 2**20 // 4, 0.5, dtype=np.float32)
    items = (Tensor(f"layer.{i}.weight", "float32", (chunk.size,), memoryview(chunk)) for i in range(8))
    big = tmp_path / "big.arrow"
    write_tensors(big, "arrow", items)
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(big), str(sample[0])], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    r0, r1, r2 = (int(x) for x in out[:3])
    assert float(out[3]) == 0.5 * chunk.size * 8
    assert r1 - r0 < 8, f"load grew RSS by {r1 - r0} MB"
    assert r2 - r1 > 150, f"touching grew RSS by only {r2 - r1} MB: measurement is broken"


# -- bad files ---------------------------------------------------------------------------------
def _expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(WeightFormatError) as err:
        load_weights(path)
    msg = str(err.value)
    assert str(path) in msg and "arrowengine convert" in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


@pytest.mark.parametrize("cut", [0, 3, 8, 100, 400, 0.5, -1, -10, -200])
def test_truncated_file(sample, tmp_path, cut):
    blob = sample[0].read_bytes()
    n = int(len(blob) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(blob) + cut)
    bad = tmp_path / "weights.arrow"
    bad.write_bytes(blob[:n])
    _expect_error(bad)


def _patched(sample, tmp_path, old: bytes, new: bytes, count: int = 1) -> Path:
    blob = sample[0].read_bytes()
    assert blob.count(old) >= count, old
    bad = tmp_path / "weights.arrow"
    bad.write_bytes(blob.replace(old, new, count))
    return bad


def test_unknown_dtype_string(sample, tmp_path):
    bad = _patched(sample, tmp_path, b"bfloat16", b"bfloat17")
    _expect_error(bad, "unknown dtype 'bfloat17'", "layers.0.mlp.experts.3.w1.weight")


def test_shape_disagrees_with_data_length(sample, tmp_path):
    bad = _patched(sample, tmp_path, b"float16", b"float32")  # first hit is the dtype of "a"
    _expect_error(bad, "needs 12 bytes, data has 6")


def test_duplicate_names(tmp_path):
    t = torch.ones(4)
    raw = memoryview(t.numpy())
    path = tmp_path / "weights.arrow"
    write_tensors(path, "arrow", [Tensor("w", "float32", (4,), raw), Tensor("w", "float32", (4,), raw)])
    _expect_error(path, "duplicate tensor name")


def _handmade(path: Path, schema: pa.Schema, rows: list[dict]) -> Path:
    with pa.ipc.new_file(str(path), schema) as w:
        for row in rows:
            w.write_batch(pa.record_batch([pa.array([row[f.name]], f.type) for f in schema], schema=schema))
    return path


def test_misaligned_data_without_pad(tmp_path):
    schema = pa.schema([f for f in GOLDEN_SCHEMA if f.name != "_pad"], metadata=GOLDEN_SCHEMA.metadata)
    rows = [{"name": "x" * (i + 1), "dtype": "float32", "shape": [2], "sha256": "0" * 64,
             "data": b"\x00" * 8} for i in range(8)]
    _expect_error(_handmade(tmp_path / "weights.arrow", schema, rows), "64-byte aligned")


def test_wrong_schema(tmp_path):
    schema = pa.schema([("name", pa.utf8()), ("dtype", pa.utf8()), ("shape", pa.list_(pa.int32())),
                        ("data", pa.binary())])
    rows = [{"name": "w", "dtype": "float32", "shape": [1], "data": b"\x00" * 4}]
    _expect_error(_handmade(tmp_path / "weights.arrow", schema, rows),
                  "missing column 'sha256'", "column 'shape' has type list<item: int32>",
                  "column 'data' has type binary", "not an ArrowEngine weight file")


def test_negative_dim_and_two_rows_per_batch(tmp_path):
    schema = GOLDEN_SCHEMA
    row = {"name": "w", "dtype": "float32", "shape": [-1], "sha256": "0" * 64, "_pad": b"", "data": b""}
    _expect_error(_handmade(tmp_path / "a.arrow", schema, [row]), "non-negative")
    two = pa.record_batch([pa.array([v, v], f.type) for f, v in zip(schema, row.values())], schema=schema)
    with pa.ipc.new_file(str(tmp_path / "b.arrow"), schema) as w:
        w.write_batch(two)
    _expect_error(tmp_path / "b.arrow", "one tensor per batch")


def test_not_an_arrow_file(tmp_path):
    bad = tmp_path / "weights.arrow"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not arrow" * 10)
    _expect_error(bad, "not a readable Arrow IPC file")
    (tmp_path / "empty.arrow").write_bytes(b"")
    _expect_error(tmp_path / "empty.arrow", "empty")


FUZZ_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from engine.errors import WeightFormatError
    from engine.weights import load_weights
    src, tmp = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2])
    ok = err = 0
    for pos in range(len(src)):
        if int(sys.argv[3]) <= pos < len(src) - int(sys.argv[4]):
            continue  # only metadata: the start (schema, first batch header) and the footer
        blob = bytearray(src); blob[pos] ^= 0xFF
        tmp.write_bytes(blob)
        try:
            sd = load_weights(tmp)
            for t in sd.values():
                t.reshape(-1)[:1].clone()  # reading a bogus view would crash here
            ok += 1
        except WeightFormatError:
            err += 1
    print(ok, err)
""")


def test_flipped_metadata_bytes_never_crash(sample, tmp_path):
    """Flip every byte of the schema, first batch metadata and footer: error or a consistent load."""
    head, tail = 800, 1200
    res = subprocess.run([sys.executable, "-c", FUZZ_SCRIPT, str(sample[0]), str(tmp_path / "f.arrow"),
                          str(head), str(tail)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    ok, err = (int(x) for x in res.stdout.split())
    assert err > 0.3 * (head + tail), (ok, err)  # most flips are detected


# -- manifest -----------------------------------------------------------------------------------
def _manifest(**kw) -> Manifest:
    base = dict(kind="store", architecture="X", weights="weights.arrow", weights_format="arrow",
                dtype="keep", tensors=1, parameters=4, bytes=16, sha256="0" * 64, source="src",
                created="2026-01-01T00:00:00+00:00", files=("config.json",))
    base.update(kw)
    return Manifest(**base)


def test_manifest_round_trip_and_errors(tmp_path):
    m = _manifest()
    assert Manifest.from_json(m.to_json()) == m
    data = json.loads(m.to_json())
    assert list(data)[:2] == ["format", "format_version"] and data["format_version"] == 1
    (tmp_path / "manifest.json").write_text(m.to_json())
    assert read_manifest(tmp_path) == m
    for breakage, fragment in [({"format_version": 2}, "format_version"), ({"tensors": "1"}, "'tensors'"),
                               ({"kind": "gpt"}, "kind"), ({"weights_format": "npz"}, "weights_format")]:
        (tmp_path / "manifest.json").write_text(json.dumps({**data, **breakage}))
        with pytest.raises(WeightFormatError, match=fragment):
            read_manifest(tmp_path)
    del data["sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(WeightFormatError, match="missing key 'sha256'"):
        read_manifest(tmp_path)
    with pytest.raises(WeightFormatError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightFormatError, match="no manifest.json"):
        read_manifest(tmp_path / "empty")


def test_load_weights_checks_manifest_count(sample, tmp_path):
    (tmp_path / "weights.arrow").write_bytes(sample[0].read_bytes())
    (tmp_path / "manifest.json").write_text(_manifest(tensors=len(sample[1])).to_json())
    assert len(load_weights(tmp_path)) == len(sample[1])
    (tmp_path / "manifest.json").write_text(_manifest(tensors=3).to_json())
    with pytest.raises(WeightFormatError, match="manifest says 3"):
        load_weights(tmp_path)
    (tmp_path / "manifest.json").write_text(_manifest(weights="../etc/passwd").to_json())
    with pytest.raises(WeightFormatError, match="plain file name"):
        load_weights(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(WeightFormatError, match="no manifest.json, weights.arrow"):
        load_weights(tmp_path / "sub")


RELEASE_SCRIPT = textwrap.dedent("""
    import sys, re
    from pathlib import Path
    import torch
    from engine.weights import load_weights, release_pages
    def rss():
        return int(re.search(r"VmRSS:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) // 1024
    sd = load_weights(sys.argv[1])
    a, b = sd["a"], sd["b"]
    float(a.sum()), float(b.sum())  # touch every page
    r0 = rss()
    released = release_pages(a)
    r1 = rss()
    anon = torch.full((8 << 20,), 3.0)
    print(r0, r1, released, float(a.sum()), float(b[0]), float(b[-1]), release_pages(anon), float(anon.sum()),
          release_pages(a[::2]))
""")


def test_release_pages_drops_a_views_pages_and_nothing_else(tmp_path):
    """After quantizing, the fp32 view's pages are dropped: RSS falls, the bytes still read back from the
    file, the neighbouring tensor is intact, and tensors that are not file views are never touched."""
    a = np.full(32 * 2**20 // 4, 0.25, dtype=np.float32)
    b = np.arange(1000, dtype=np.float32)
    path = tmp_path / "w.arrow"
    write_tensors(path, "arrow", iter([Tensor("a", "float32", (a.size,), memoryview(a)),
                                       Tensor("b", "float32", (b.size,), memoryview(b))]))
    out = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT, str(path)], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    r0, r1, released = int(out[0]), int(out[1]), int(out[2])
    assert 31 * 2**20 <= released <= 32 * 2**20
    assert r0 - r1 >= 24, f"RSS fell by only {r0 - r1} MB"
    assert float(out[3]) == 0.25 * a.size  # re-read from the file
    assert (float(out[4]), float(out[5])) == (0.0, 999.0)
    assert int(out[6]) == 0 and float(out[7]) == 3.0 * (8 << 20)  # ordinary memory: left alone
    assert int(out[8]) == 0  # a strided view: left alone


def test_a_missing_or_file_model_dir_is_a_clear_error(tmp_path):
    import engine

    with pytest.raises(WeightFormatError, match="does not exist; expected a directory made by"):
        engine.load_model(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(WeightFormatError, match="is a file, not a model directory"):
        engine.load_model(tmp_path / "file.txt")
