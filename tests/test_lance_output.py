"""Bulk jobs into a Lance dataset (flight_client.lance_output): the vector column, resume exactly once in
order (a kill between a commit and the manifest, files of a commit that never happened, a real SIGKILL of the
CLI), the IVF-PQ index, and the error that names the extra where pylance is missing.

Real tiny CLIP embeddings (D = 48), in this process but for the SIGKILL test.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flight_client import lance_output
from flight_client.cli import main
from flight_client.job_io import JobManifest, read_output
from flight_client.jobs import JobConfig, JobUsageError, run_job
from flight_client.pool import LocalEmbedder

ROOT = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler of the job runs after it."""


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    import engine

    return engine.load_model(tiny_clip_dir)


def texts_parquet(path: Path, n: int) -> Path:
    texts = [f"text {i} about {['cats', 'dogs', 'boats'][i % 3]}" + " and more" * (i % 4) for i in range(n)]
    texts[5] = None  # a row error
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()), "text": texts,
                             "score": pa.array([i / 2 for i in range(n)], pa.float32())}), path,
                   row_group_size=50)
    return path


def job(path: Path, out: Path, **kw) -> JobConfig:
    return JobConfig(input=path, output=out, **{**dict(kind="text", batch_rows=8, shard_rows=32, progress=False),
                                                **kw})


def vectors(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def assert_same_rows(a: pa.Table, b: pa.Table) -> None:
    assert a.schema.equals(b.schema), (a.schema, b.schema)
    for name in a.column_names:
        if name != "embedding":
            assert a.column(name).to_pylist() == b.column(name).to_pylist(), name
    valid = np.asarray(a.column("embedding").is_valid().to_pylist())
    assert valid.tolist() == b.column("embedding").is_valid().to_pylist()
    assert np.array_equal(vectors(a)[valid], vectors(b)[valid])  # bit for bit


def data_files(out: Path) -> set[str]:
    return {p.name for p in (out / "data").iterdir()}


def referenced_files(out: Path) -> set[str]:
    return {f.path for fragment in lance.dataset(str(out)).get_fragments() for f in fragment.data_files()}


# ---- the dataset -------------------------------------------------------------------------------------------

def test_lance_output_is_the_parquet_output_as_a_vector_dataset(tmp_path, clip):
    path = texts_parquet(tmp_path / "t.parquet", 100)
    parquet = run_job(job(path, tmp_path / "out"), [LocalEmbedder(clip, "text")])
    summary = run_job(job(path, tmp_path / "out.lance"), [LocalEmbedder(clip, "text")])
    assert (summary.rows, summary.errors, summary.shards) == (100, 1, 4) == (parquet.rows, parquet.errors, 4)

    dataset = lance.dataset(str(tmp_path / "out.lance"))
    table = dataset.to_table()
    assert table.column_names == ["id", "score", "embedding", "error"]  # every column but the embedded one
    assert dataset.schema.field("embedding").type == pa.list_(pa.float32(), 48)  # Lance's vector type
    assert table.column("id").to_pylist() == list(range(100))
    assert table.column("error")[5].as_py() and table.column("embedding").null_count == 1
    assert_same_rows(table, pq.read_table(tmp_path / "out"))
    assert_same_rows(read_output(tmp_path / "out.lance"), table)

    manifest = json.loads((tmp_path / "out.lance" / "_job.json").read_text())
    assert manifest["output_format"] == "lance" and manifest["args"]["format"] == "lance" and manifest["complete"]
    assert [(s["version"], s["first_row"], s["rows"], s["errors"]) for s in manifest["shards"]] == \
        [(1, 0, 32, 1), (2, 32, 32, 0), (3, 64, 32, 0), (4, 96, 4, 0)]  # one commit per shard
    assert dataset.version == 4 and len(dataset.get_fragments()) == 4
    assert dataset.read_transaction(2).transaction_properties == {
        lance_output.FIRST_ROW: "32", lance_output.ROWS: "32", lance_output.ERRORS: "0"}

    query = vectors(table)[42]
    hits = dataset.to_table(columns=["id", "_distance"], nearest={"column": "embedding", "q": query, "k": 3,
                                                                  "metric": "cosine"})
    assert hits.column("id")[0].as_py() == 42 and abs(hits.column("_distance")[0].as_py()) < 1e-5


def test_format_lance_on_any_name_and_an_empty_input(tmp_path, clip):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    run_job(job(empty, tmp_path / "vectors", format="lance"), [LocalEmbedder(clip, "text")])
    dataset = lance.dataset(str(tmp_path / "vectors"))
    assert dataset.count_rows() == 0 and dataset.schema.names == ["embedding", "error"]
    assert JobManifest.load(tmp_path / "vectors").complete
    with pytest.raises(ValueError, match="--index builds a Lance vector index: it needs a Lance output"):
        job(empty, tmp_path / "parquet-out", index=True)
    with pytest.raises(ValueError, match=r"format must be one of \['parquet', 'lance'\]; got 'csv'"):
        job(empty, tmp_path / "x", format="csv")


# ---- resume: exactly once, in order -------------------------------------------------------------------------

def test_kill_between_a_commit_and_the_manifest_then_resume(tmp_path, clip, monkeypatch, caplog):
    """The awkward point: shard 3 is committed to the dataset, the manifest still says two shards. The resumed
    run records the commit from its transaction, deletes the files of a later commit that never happened, and
    writes every input row once, in order, as an uninterrupted run does."""
    path = texts_parquet(tmp_path / "t.parquet", 150)
    run_job(job(path, tmp_path / "ref.lance"), [LocalEmbedder(clip, "text")])
    out = tmp_path / "out.lance"
    save = JobManifest.save

    def save_or_die(self, folder):
        if len(self.shards) == 3:
            raise Killed()
        save(self, folder)

    monkeypatch.setattr(JobManifest, "save", save_or_die)
    with pytest.raises(Killed):
        run_job(job(path, out), [LocalEmbedder(clip, "text")])
    monkeypatch.setattr(JobManifest, "save", save)
    assert len(JobManifest.load(out).shards) == 2 and lance.dataset(str(out)).count_rows() == 96
    # a kill inside the next commit: its data file is written, the commit never happened
    lance.fragment.write_fragments(read_output(tmp_path / "ref.lance").slice(96, 32), str(out))
    orphans = data_files(out) - referenced_files(out)
    assert len(orphans) == 1

    with caplog.at_level(logging.INFO, "arrowengine.embed"):
        summary = run_job(job(path, out, resume=True), [LocalEmbedder(clip, "text")])
    assert summary.resumed_from == 96 and summary.rows_this_run == 54 and summary.rows == 150
    assert "recorded version 3 (rows 64..95), committed after the last manifest update" in caplog.text
    assert "1 data file(s) of an unfinished commit" in caplog.text
    assert data_files(out) == referenced_files(out)
    got = read_output(out)
    assert got.column("id").to_pylist() == list(range(150))  # every row once, in input order
    assert_same_rows(got, read_output(tmp_path / "ref.lance"))
    manifest = JobManifest.load(out)
    assert [s["first_row"] for s in manifest.shards] == [0, 32, 64, 96, 128] and manifest.errors == 1


def test_kill_before_the_first_commit_and_a_changed_dataset(tmp_path, clip, monkeypatch):
    path = texts_parquet(tmp_path / "t.parquet", 40)
    out = tmp_path / "out.lance"

    def die(*args, **kwargs):
        raise Killed()

    monkeypatch.setattr(lance, "write_dataset", die)
    with pytest.raises(Killed):
        run_job(job(path, out), [LocalEmbedder(clip, "text")])
    monkeypatch.undo()
    assert JobManifest.load(out).shards == [] and not (out / "_versions").exists()
    (out / "data").mkdir()
    (out / "data" / "half-written.lance").write_bytes(b"LANC")  # files of the first commit, never committed
    summary = run_job(job(path, out, resume=True), [LocalEmbedder(clip, "text")])
    assert summary.resumed_from == 0 and summary.rows == 40
    assert data_files(out) == referenced_files(out)
    assert read_output(out).column("id").to_pylist() == list(range(40))

    # rows added outside the job: the counts no longer agree, and resuming says so instead of guessing
    manifest = JobManifest.load(out)
    manifest.complete = False
    manifest.save(out)
    lance.write_dataset(read_output(out).slice(0, 2), str(out), mode="append")
    with pytest.raises(JobUsageError, match="has 42 rows, but the job wrote 40: it was changed outside the job"):
        run_job(job(path, out, resume=True), [LocalEmbedder(clip, "text")])
    # a Parquet job's settings are not a Lance job's
    with pytest.raises(JobUsageError, match="settings differ .*format: job has 'lance', now 'parquet'"):
        run_job(job(path, out, resume=True, format="parquet"), [LocalEmbedder(clip, "text")])


@pytest.mark.slow  # two interpreter starts
def test_resume_after_sigkill_of_the_cli_gives_every_row_once_in_order(tmp_path, tiny_clip_dir, clip):
    n = 400
    path = texts_parquet(tmp_path / "t.parquet", n)
    out = tmp_path / "out.lance"
    args = [str(path), str(out), "--kind", "text", "--model", str(tiny_clip_dir), "--batch-rows", "8",
            "--shard-rows", "16", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "flight_client.cli", "embed", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "_versions").is_dir() or len(list((out / "_versions").glob("*.manifest"))) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no second commit within 120 s"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = lance.dataset(str(out)).count_rows()
    assert 32 <= committed < n and committed % 16 == 0  # really interrupted, at a commit
    assert JobManifest.load(out).rows_done <= committed

    resumed = subprocess.run([sys.executable, "-m", "flight_client.cli", "embed", *args, "--resume"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at row {committed}" in resumed.stderr
    assert f"embed done: rows={n} errors=1" in resumed.stderr
    run_job(job(path, tmp_path / "ref.lance", batch_rows=8, shard_rows=16), [LocalEmbedder(clip, "text")])
    got = read_output(out)
    assert got.column("id").to_pylist() == list(range(n))
    assert_same_rows(got, read_output(tmp_path / "ref.lance"))


# ---- the index -----------------------------------------------------------------------------------------------

def test_index_plan_sizes():
    assert lance_output.index_plan(255, 384) is None  # 8-bit PQ needs 256 vectors to train
    plan = lance_output.index_plan(256, 48)
    assert (plan.partitions, plan.sub_vectors, plan.metric, plan.index_type) == (1, 3, "cosine", "IVF_PQ")
    assert [lance_output.index_plan(rows, 384).partitions for rows in (16_383, 16_384, 100_000, 10 ** 6)] == \
        [1, 2, 12, 122]  # a list per 8192 rows
    assert lance_output.index_plan(1000, 384).sub_vectors == 24   # 16 dims each
    assert lance_output.index_plan(1000, 1000).sub_vectors == 125  # 8 dims each: 16 does not divide 1000
    assert lance_output.index_plan(1000, 100).sub_vectors == 10    # neither 16 nor 8 divides 100: 10 of 10
    assert lance_output.index_plan(1000, 12).sub_vectors == 1


def test_index_is_built_at_the_end_and_used_by_a_search(tmp_path, clip):
    path = texts_parquet(tmp_path / "t.parquet", 600)
    summary = run_job(job(path, tmp_path / "out.lance", batch_rows=32, shard_rows=128, index=True),
                      [LocalEmbedder(clip, "text")])
    assert summary.rows == 600
    dataset = lance.dataset(str(tmp_path / "out.lance"))
    (index,) = dataset.describe_indices()
    assert index.field_names == ["embedding"] and index.num_rows_indexed == 600
    manifest = JobManifest.load(tmp_path / "out.lance")
    assert manifest.complete and manifest.index["built"] and manifest.index["rows"] == 599
    assert (manifest.index["partitions"], manifest.index["sub_vectors"]) == (1, 3)
    stats = dataset.stats.index_stats("embedding_idx")["indices"][0]  # what Lance built is what the plan says
    assert (stats["num_partitions"], stats["sub_index"]["num_sub_vectors"], stats["metric_type"]) == (1, 3, "cosine")
    table = dataset.to_table()
    assert dataset.version == 6  # five shard commits, then the index
    query = {"column": "embedding", "q": vectors(table)[123], "k": 5, "metric": "cosine", "refine_factor": 10}
    assert "ANNSubIndex" in dataset.scanner(nearest=query).explain_plan()
    hits = dataset.to_table(columns=["id", "_distance"], nearest=query)
    assert hits.column("id")[0].as_py() == 123


def test_a_small_dataset_gets_no_index_and_says_so_and_an_index_can_come_later(tmp_path, clip, caplog):
    path = texts_parquet(tmp_path / "small.parquet", 100)
    with caplog.at_level(logging.WARNING, "arrowengine.embed"):
        run_job(job(path, tmp_path / "small.lance", index=True), [LocalEmbedder(clip, "text")])
    assert "99 embedded rows, fewer than the 256 IVF-PQ needs to train its codebooks: no index built" in caplog.text
    assert lance.dataset(str(tmp_path / "small.lance")).describe_indices() == []
    assert JobManifest.load(tmp_path / "small.lance").index["built"] is False

    path = texts_parquet(tmp_path / "t.parquet", 300)
    run_job(job(path, tmp_path / "out.lance"), [LocalEmbedder(clip, "text")])
    assert lance.dataset(str(tmp_path / "out.lance")).describe_indices() == []

    class NoEmbedding:
        name = "unused"

        def describe(self):
            raise AssertionError("a finished job embeds nothing more")

    summary = run_job(job(path, tmp_path / "out.lance", resume=True, index=True), [NoEmbedding()])
    assert summary.rows_this_run == 0
    assert [i.field_names for i in lance.dataset(str(tmp_path / "out.lance")).describe_indices()] == [["embedding"]]
    assert JobManifest.load(tmp_path / "out.lance").index["built"]


# ---- without pylance ------------------------------------------------------------------------------------------

def test_missing_pylance_names_the_extra_and_writes_nothing(tmp_path, clip, monkeypatch, caplog):
    path = texts_parquet(tmp_path / "t.parquet", 20)
    monkeypatch.setitem(sys.modules, "lance", None)  # `import lance` raises ImportError, as where it is absent
    with pytest.raises(JobUsageError, match=r'needs pylance, which this installation lacks .*install the lance '
                                            r'extra: pip install "arrowengine\[lance\]"'):
        run_job(job(path, tmp_path / "out.lance"), [LocalEmbedder(clip, "text")])
    assert not (tmp_path / "out.lance").exists()
    caplog.set_level(logging.ERROR)
    assert main(["embed", str(path), str(tmp_path / "vectors"), "--kind", "text", "--format", "lance",
                 "--no-progress"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and 'pip install "arrowengine[lance]"' in errors[0] and "\n" not in errors[0]
    assert not (tmp_path / "vectors").exists()
    run_job(job(path, tmp_path / "parquet-out"), [LocalEmbedder(clip, "text")])  # Parquet needs no pylance
    assert pq.read_table(tmp_path / "parquet-out").num_rows == 20
