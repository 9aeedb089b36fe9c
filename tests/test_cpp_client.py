"""The C++ example client (flight_client/cpp): built with the pyarrow wheel's Arrow C++,
run against a real in-process server, and compared with the Python EmbeddingClient.

Skipped only where no C++ compiler exists (CI has g++). The binary is built once per session
(conftest.py's ``cpp_client_binary``).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from flight_client import EmbeddingClient, embeddings_to_numpy
from flight_fakes import make_self_signed_cert
from flight_server.config import ServerConfig, ServerLimits
from flight_server.servicer import EmbeddingServer

PHOTOS = Path(__file__).parent / "data" / "photos"
pytestmark = pytest.mark.slow  # builds the C++ client (~10 s of g++)
BATCH = 2  # rows per batch, for both clients: the same batches give bit-identical embeddings


@pytest.fixture(scope="module")
def binary(cpp_client_binary) -> Path:
    return cpp_client_binary  # built once per session (conftest.py), shared with test_docs.py


@pytest.fixture(scope="module")
def models(tiny_clip_dir, minilm_model_dir):
    import engine

    return {"clip": engine.load_model(tiny_clip_dir, device="cpu", precision="fp32"),
            "minilm": engine.load_model(minilm_model_dir, device="cpu", precision="fp32")}


@pytest.fixture(scope="module")
def server(models):
    with EmbeddingServer(models, ServerConfig(port=0)) as srv:
        yield srv


def run(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)


def read_ipc(path: Path) -> pa.Table:
    with pa.OSFile(str(path), "rb") as source:
        return pa.ipc.open_file(source).read_all()


def python_client(server, **kwargs) -> EmbeddingClient:
    return EmbeddingClient(f"grpc://127.0.0.1:{server.port}", retries=0, batch_rows=BATCH, **kwargs)


def test_images_folder_equals_python_client_and_reports_the_broken_file(binary, server, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for photo in sorted(PHOTOS.glob("*.png"))[:3] + sorted(PHOTOS.glob("*.jpg"))[:1]:
        shutil.copy(photo, folder / photo.name)
    (folder / "broken.png").write_bytes(b"this is not a PNG")
    (folder / ".hidden").write_bytes(b"skipped")
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    out = tmp_path / "images.arrow"

    done = run(binary, "--server", f"grpc+tcp://127.0.0.1:{server.port}", "--model", "clip",
               "--input", "image", "--source", str(folder), "--output", str(out), "--batch-rows", str(BATCH))

    assert done.returncode == 3, done.stderr  # finished, some rows failed
    table = read_ipc(out)
    with python_client(server) as client:
        expected, errors = client.embed_images([(folder / n).read_bytes() for n in names], model="clip",
                                               errors="return")
    assert table.column_names == ["name", "embedding", "error"]
    dim = table.schema.field("embedding").type.list_size
    assert dim == expected.shape[1] and table.schema.field("embedding").type.value_type == pa.float32()
    assert table.column("name").to_pylist() == names
    assert table.column("error").to_pylist() == errors
    broken = names.index("broken.png")
    assert errors[broken] and all(e is None for i, e in enumerate(errors) if i != broken)
    assert table.column("embedding").null_count == 1 and not table.column("embedding")[broken].is_valid
    got = embeddings_to_numpy(table.column("embedding"))
    ok = [i for i in range(len(names)) if i != broken]
    assert np.array_equal(got[ok], expected[ok])  # bit for bit
    assert not np.allclose(got[ok[0]], got[ok[1]])  # really different images
    assert f"row error: name broken.png: {errors[broken]}" in done.stderr
    assert done.stdout.startswith(f"arrowengine_client: {len(names)} rows (1 failed) in 3 batches, dim {dim},")
    assert not (tmp_path / "images.arrow.part").exists()


def test_text_lines_equal_python_client(binary, server, tmp_path):
    lines = ["a photo of a cat", "", "Arrow Flight streams record batches", "ünïcödé ✓ 日本語",
             'quotes " and \\ backslash', "tab\tinside"]
    source = tmp_path / "texts.txt"
    source.write_bytes(("\n".join(lines[:3]) + "\r\n" + "\n".join(lines[3:]) + "\n").encode("utf-8"))
    out = tmp_path / "texts.arrow"

    done = run(binary, "--server", f"grpc+tcp://127.0.0.1:{server.port}", "--model", "minilm",
               "--input", "text", "--source", str(source), "--output", str(out), "--batch-rows", str(BATCH))

    assert done.returncode == 0, done.stderr
    table = read_ipc(out)
    assert table.column_names == ["line", "embedding", "error"]
    assert table.column("line").to_pylist() == list(range(1, len(lines) + 1))
    assert table.column("error").null_count == len(lines)
    with python_client(server) as client:
        expected = client.embed_texts(lines, model="minilm")
    got = embeddings_to_numpy(table.column("embedding"))
    assert got.shape == (len(lines), 384)
    assert np.array_equal(got, expected)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)  # normalized by default
    assert "6 rows (0 failed) in 3 batches, dim 384" in done.stdout


def test_many_small_batches_stream_in_order(binary, server, tmp_path):
    """A hundred batches, sent by the sender thread while results are read."""
    lines = [f"caption number {i} of a long list" for i in range(500)]
    source = tmp_path / "many.txt"
    source.write_text("\n".join(lines), encoding="utf-8")  # no final newline: still 500 rows
    out = tmp_path / "many.arrow"
    done = run(binary, "--server", f"grpc+tcp://127.0.0.1:{server.port}", "--model", "clip",
               "--input", "text", "--column", "caption", "--source", str(source), "--output", str(out),
               "--batch-rows", "5", "--no-normalize")
    assert done.returncode == 0, done.stderr
    table = read_ipc(out)
    assert table.num_rows == 500 and table.column("line").to_pylist() == list(range(1, 501))
    with EmbeddingClient(f"grpc://127.0.0.1:{server.port}", retries=0, batch_rows=5) as client:
        expected = client.embed_texts(lines, model="clip", normalize=False)
    got = embeddings_to_numpy(table.column("embedding"))
    assert np.array_equal(got, expected)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)  # --no-normalize reached the server
    assert "500 rows (0 failed) in 100 batches" in done.stdout


def test_batches_fit_a_server_with_lower_limits(binary, models, tmp_path):
    """The client reads the server's `limits` action: its default 256 rows / 64 MiB would be refused here."""
    folder = tmp_path / "images"
    folder.mkdir()
    photos = sorted(PHOTOS.glob("*.png")) + sorted(PHOTOS.glob("*.jpg"))
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    largest = max(p.stat().st_size for p in photos)
    limits = ServerLimits(max_batch_rows=3, max_batch_bytes=largest + 4096)
    out = tmp_path / "out.arrow"
    with EmbeddingServer(models, ServerConfig(port=0, limits=limits)) as srv:
        done = run(binary, "--server", f"grpc+tcp://127.0.0.1:{srv.port}", "--model", "clip", "--input", "image",
                   "--source", str(folder), "--output", str(out))
        assert done.returncode == 0, done.stderr
        names = sorted(p.name for p in folder.iterdir())
        with EmbeddingClient(f"grpc://127.0.0.1:{srv.port}", retries=0, batch_rows=1) as client:
            expected = client.embed_images([(folder / n).read_bytes() for n in names], model="clip")
    table = read_ipc(out)
    assert table.column("name").to_pylist() == names and table.column("error").null_count == len(names)
    np.testing.assert_allclose(embeddings_to_numpy(table.column("embedding")), expected, atol=1e-5)


def test_tls_and_bearer_token(binary, models, tmp_path):
    cert, key = make_self_signed_cert(tmp_path, "server")
    (tmp_path / "token").write_text("s3cret-t0ken\n")
    (tmp_path / "wrong").write_text("not-the-token")
    source = tmp_path / "texts.txt"
    source.write_text("hello\nworld\n", encoding="utf-8")
    config = ServerConfig(port=0, auth_token="s3cret-t0ken", tls_cert=cert, tls_key=key)
    with EmbeddingServer({"minilm": models["minilm"]}, config) as srv:
        common = ["--server", f"grpc+tls://localhost:{srv.port}", "--input", "text", "--source", str(source),
                  "--tls-root-certs", str(cert)]
        good = run(binary, *common, "--token-file", str(tmp_path / "token"), "--output", str(tmp_path / "ok.arrow"))
        wrong = run(binary, *common, "--token-file", str(tmp_path / "wrong"), "--output", str(tmp_path / "no.arrow"))
        missing = run(binary, *common, "--output", str(tmp_path / "none.arrow"))
        with EmbeddingClient(f"grpc+tls://localhost:{srv.port}", token="s3cret-t0ken", tls_root_certs=cert,
                             retries=0) as client:
            expected = client.embed_texts(["hello", "world"])
    assert good.returncode == 0, good.stderr
    assert np.array_equal(embeddings_to_numpy(read_ipc(tmp_path / "ok.arrow").column("embedding")), expected)
    for bad in (wrong, missing):
        assert bad.returncode == 1 and "Unauthenticated" in bad.stderr, bad.stderr
    assert "authorization: Bearer <token>" in missing.stderr
    assert not any(tmp_path.glob("no.arrow*")) and not any(tmp_path.glob("none.arrow*"))


def test_failures_exit_1_or_2_with_a_clear_message_and_no_output(binary, server, tmp_path):
    source = tmp_path / "t.txt"
    source.write_text("x\n", encoding="utf-8")
    uri = f"grpc+tcp://127.0.0.1:{server.port}"
    unknown = run(binary, "--server", uri, "--model", "nope", "--input", "text", "--source", str(source),
                  "--output", str(tmp_path / "a.arrow"))
    assert unknown.returncode == 1 and "unknown model 'nope'" in unknown.stderr, unknown.stderr
    wrong_modality = run(binary, "--server", uri, "--model", "minilm", "--input", "image", "--source", str(PHOTOS),
                         "--output", str(tmp_path / "b.arrow"))
    assert wrong_modality.returncode == 1 and "not 'image' input" in wrong_modality.stderr, wrong_modality.stderr
    not_a_folder = run(binary, "--server", uri, "--input", "image", "--source", str(source),
                       "--output", str(tmp_path / "c.arrow"))
    assert not_a_folder.returncode == 1 and "is not a folder" in not_a_folder.stderr
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    not_utf8 = run(binary, "--server", uri, "--input", "text", "--source", str(tmp_path / "latin1.txt"),
                   "--output", str(tmp_path / "d.arrow"))
    assert not_utf8.returncode == 1 and "line 2 of" in not_utf8.stderr and "not valid UTF-8" in not_utf8.stderr
    usage = run(binary, "--input", "video", "--source", str(source), "--output", str(tmp_path / "e.arrow"))
    assert usage.returncode == 2 and "--input must be 'image' or 'text'; got 'video'" in usage.stderr
    http = run(binary, "--server", f"http://127.0.0.1:{server.port}", "--input", "text", "--source", str(source),
               "--output", str(tmp_path / "f.arrow"))
    assert http.returncode == 2 and "--server must be a Flight URI" in http.stderr, http.stderr
    assert list(tmp_path.glob("*.arrow*")) == []


def test_empty_inputs_write_an_empty_file_with_the_output_schema(binary, server, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_bytes(b"")
    uri = f"grpc+tcp://127.0.0.1:{server.port}"
    for kind, source, key in (("image", "empty", "name"), ("text", "empty.txt", "line")):
        out = tmp_path / f"{kind}.arrow"
        done = run(binary, "--server", uri, "--model", "clip", "--input", kind, "--source", str(tmp_path / source),
                   "--output", str(out))
        assert done.returncode == 0, done.stderr
        table = read_ipc(out)
        assert table.num_rows == 0 and table.column_names == [key, "embedding", "error"]
        assert "0 rows (0 failed) in 1 batches" in done.stdout
