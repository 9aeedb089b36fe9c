"""``arrowengine embed``: arguments, exit codes, and resume after a real SIGKILL of the CLI."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from convert import store
from flight_client import embed_cli
from flight_client.cli import build_parser, main
from flight_client.job_io import JobManifest, read_output
from flight_client.jobs import JobConfig, JobError, run_job

ROOT = Path(__file__).resolve().parents[1]


def write_texts(path: Path, n: int) -> Path:
    texts = [f"row {i}: " + "word " * (i % 13) for i in range(n)]
    texts[7] = None
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()), "text": texts}), path, row_group_size=500)
    return path


def test_embed_is_registered_with_its_options(tmp_path):
    token = tmp_path / "token"
    token.write_text("secret\n")
    args = build_parser().parse_args(
        ["embed", "in.parquet", "out", "--kind", "text", "--server", "grpc://a:1", "--server", "grpc://b:2",
         "--passthrough", "id", "url", "--batch-rows", "16", "--resume", "--auth-token-file", str(token)])
    assert args.func is embed_cli.run
    config = embed_cli.config_from_args(args)
    assert config.servers == ("grpc://a:1", "grpc://b:2") and config.passthrough == ("id", "url")
    assert (config.batch_rows, config.resume, config.token, config.input_column) == (16, True, "secret", "text")
    assert "secret" not in repr(config)
    assert (config.format, config.output_format, config.index) == (None, "parquet", False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["embed", "in", "out", "--kind", "audio"])

    def config(*argv):
        return embed_cli.config_from_args(build_parser().parse_args(["embed", "in.parquet", *argv, "--kind", "text"]))

    assert config("out").passthrough is None  # the default: every column but the embedded one
    assert config("out", "--no-passthrough").passthrough == ()
    assert config("out.lance", "--index").output_format == "lance"
    assert config("vectors", "--format", "lance", "--index").output_format == "lance"
    assert config("out.lance", "--format", "parquet").output_format == "parquet"
    with pytest.raises(ValueError, match="--no-passthrough and --passthrough id contradict each other"):
        config("out", "--no-passthrough", "--passthrough", "id")
    with pytest.raises(ValueError, match="--index builds a Lance vector index: it needs a Lance output"):
        config("out", "--index")


def test_version_is_the_installed_one_or_pyprojects(capsys, monkeypatch):
    import importlib.metadata
    import tomllib

    from flight_client import cli

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"arrowengine {importlib.metadata.version('arrowengine')}"

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)  # a source tree without install metadata
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cli.package_version() == pyproject["project"]["version"]
    assert cli._pyproject_version('[tool.x]\nversion = "9"\n[project]\nname = "a"\nversion = "1.2.3"  # c\n') == "1.2.3"


def test_cli_exit_codes_and_messages(tmp_path, tiny_clip_dir, caplog):
    path = write_texts(tmp_path / "t.parquet", 30)
    argv = ["embed", str(path), str(tmp_path / "out"), "--kind", "text", "--model", str(tiny_clip_dir),
            "--batch-rows", "8", "--passthrough", "id", "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert "embed done: rows=30 errors=1" in caplog.text
    assert read_output(tmp_path / "out").column("id").to_pylist() == list(range(30))
    # 2: the arguments cannot work, the same command would fail again
    caplog.clear()
    assert main(argv) == 2
    assert "is not empty; pass --resume" in caplog.text
    assert main(argv[:2] + [str(tmp_path / "out2")] + argv[3:] + ["--auth-token-file", str(tmp_path / "nope")]) == 2
    assert main(["embed", str(tmp_path / "missing"), str(tmp_path / "o"), "--kind", "text",
                 "--model", str(tiny_clip_dir)]) == 2
    assert "does not exist" in caplog.text
    assert main(["embed", str(path), str(tmp_path / "o3"), "--kind", "image", "--model", str(tiny_clip_dir)]) == 2
    assert "column(s) ['image'] not found" in caplog.text
    assert main(["embed", str(path), str(tmp_path / "o4"), "--kind", "text", "--model", str(tmp_path)]) == 2
    assert not (tmp_path / "o4").exists()
    # 1: a stop that a later run (--resume) can get past: here no server answers
    caplog.clear()
    assert main(["embed", str(path), str(tmp_path / "o5"), "--kind", "text", "--server", "grpc://127.0.0.1:1",
                 "--no-progress"]) == 1
    assert "no endpoint could be reached" in caplog.text


def test_in_process_model_is_a_directory_or_a_name_in_the_cache(tmp_path, tiny_clip_dir):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(tiny_clip_dir, cache / "tiny")
    assert store.resolve_model_dir(str(tiny_clip_dir), cache) == tiny_clip_dir
    assert store.resolve_model_dir("tiny", cache) == cache / "tiny"
    with pytest.raises(store.ModelNotFoundError, match=r"model 'clip-b32' is neither .* \(it holds \['tiny'\]\)"):
        store.resolve_model_dir("clip-b32", cache)
    # the job says the same as a usage error (exit 2), before anything is written
    with pytest.raises(JobError, match=r"--model: model 'clip-b32' is neither .* \(it holds \['tiny'\]\)"):
        run_job(JobConfig(input=write_texts(tmp_path / "t.parquet", 10), output=tmp_path / "out", kind="text",
                          model="clip-b32", cache_dir=cache, progress=False))
    assert not (tmp_path / "out").exists()


def _run_cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "flight_client.cli", "embed", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow  # two interpreter starts
def test_resume_after_sigkill_gives_every_row_once_with_the_same_embeddings(tmp_path, tiny_clip_dir):
    import engine

    n = 1000
    path = write_texts(tmp_path / "t.parquet", n)
    out = tmp_path / "out"
    args = [str(path), str(out), "--kind", "text", "--model", str(tiny_clip_dir), "--batch-rows", "16",
            "--shard-rows", "64", "--passthrough", "id"]
    proc = _run_cli(args + ["--no-progress"])
    deadline = time.monotonic() + 120
    while not (out / "part-00000.parquet").exists() or not JobManifest.load(out).shards:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard within 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = JobManifest.load(out)
    assert not killed_at.complete and 64 <= killed_at.rows_done < n  # really interrupted
    assert killed_at.rows_done % 64 == 0

    resumed = _run_cli(args + ["--resume"])
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert f"resuming {out} at row {killed_at.rows_done}" in stderr
    assert f"embed done: rows={n} errors=1" in stderr and "rows_per_s=" in stderr
    assert "row/s" in stderr and "errors=1" in stderr  # the tqdm bar and its postfix
    manifest = json.loads((out / "_job.json").read_text())
    assert manifest["complete"] and manifest["rows_done"] == n
    assert [s["first_row"] for s in manifest["shards"]] == list(range(0, n, 64))

    from flight_client.pool import LocalEmbedder

    model = engine.load_model(tiny_clip_dir)
    run_job(JobConfig(input=path, output=tmp_path / "ref", kind="text", batch_rows=16, shard_rows=64,
                      passthrough=("id",), progress=False), [LocalEmbedder(model, "text")])
    got, want = read_output(out), read_output(tmp_path / "ref")
    assert got.column("id").to_pylist() == list(range(n))  # every row once, in input order
    assert got.column("error").to_pylist() == want.column("error").to_pylist()
    valid = np.asarray(want.column("embedding").is_valid().to_pylist())
    assert valid.sum() == n - 1
    dim = want.column("embedding").type.list_size

    def vecs(table):
        return table.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(n, dim)

    assert np.array_equal(vecs(got)[valid], vecs(want)[valid])  # bit for bit
