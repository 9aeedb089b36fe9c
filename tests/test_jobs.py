"""Bulk jobs (flight_client.jobs / job_io / pool): readers, shards, manifest, resume, failover.

Real models (tiny CLIP, MiniLM) and real Flight servers on port 0, in this process.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from flight_client import job_io
from flight_client.job_io import JobManifest, ParquetSource, read_output
from flight_client.jobs import JobConfig, JobError, JobUsageError, run_job
from flight_client.pool import AllEndpointsFailed, EndpointPool, LocalEmbedder
from flight_server.config import ServerConfig
from flight_server.servicer import EmbeddingServer

PHOTOS = Path(__file__).parent / "data" / "photos"


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    import engine

    return engine.load_model(tiny_clip_dir)


@pytest.fixture(scope="module")
def minilm(minilm_model_dir):
    import engine

    return engine.load_model(minilm_model_dir)


def texts_parquet(path: Path, n: int, row_group_size: int | None = None) -> Path:
    texts = [f"text number {i} about {['cats', 'dogs', 'boats'][i % 3]}" + " and more" * (i % 5)
             for i in range(n)]
    texts[5] = None  # a row error
    table = pa.table({"id": pa.array(range(n), pa.int64()), "text": pa.array(texts, pa.string()),
                      "other": pa.array([i * 2.0 for i in range(n)])})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def embeddings(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), dim)


def assert_same_output(a: pa.Table, b: pa.Table) -> None:
    assert a.schema.equals(b.schema)
    for name in a.column_names:
        if name != "embedding":
            assert a.column(name).to_pylist() == b.column(name).to_pylist(), name
    valid = np.asarray(a.column("embedding").is_valid().to_pylist())
    assert valid.tolist() == b.column("embedding").is_valid().to_pylist()
    assert np.array_equal(embeddings(a)[valid], embeddings(b)[valid])  # bit for bit


def serve(model, name="tiny"):
    return EmbeddingServer({name: model}, ServerConfig(port=0))


# ---- readers -----------------------------------------------------------------------------

def test_parquet_reader_reads_row_group_by_row_group(tmp_path):
    path = texts_parquet(tmp_path / "many.parquet", 5000, row_group_size=100)  # 50 row groups
    assert pq.ParquetFile(path).metadata.num_row_groups == 50
    source = ParquetSource(path, ["text", "id"])
    batches = source.batches(0, 64)
    first = next(batches)
    assert first.first_row == 0 and first.num_rows == 64
    assert source.row_groups_read == 1  # lazily: only the first row group was touched
    sizes = [first.num_rows] + [b.num_rows for b in batches]
    assert sizes == [64] * 78 + [8]
    assert source.row_groups_read == 50
    assert source.peak_buffered_rows < 64 + 100  # never more than a batch plus one row group piece


def test_parquet_reader_resumes_at_a_row_skipping_row_groups(tmp_path):
    path = texts_parquet(tmp_path / "many.parquet", 1000, row_group_size=100)
    source = ParquetSource(path, ["id"])
    batches = list(source.batches(640, 64))
    assert source.row_groups_read == 4  # groups 6..9 only
    assert [b.first_row for b in batches] == [640, 704, 768, 832, 896, 960]
    ids = pa.concat_arrays([b.data.column(0) for b in batches]).to_pylist()
    assert ids == list(range(640, 1000))


def test_parquet_folder_is_read_in_sorted_order_and_schemas_must_agree(tmp_path):
    folder = tmp_path / "ds"
    (folder / "b").mkdir(parents=True)
    pq.write_table(pa.table({"id": [3, 4], "text": ["c", "d"]}), folder / "b" / "x.parquet")
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), folder / "a.parquet")
    pq.write_table(pa.table({"id": [9]}), folder / "_ignored.parquet")
    source = job_io.open_source(folder, "text", "text", ["id"])
    assert [b.data.column(1).to_pylist() for b in source.batches(0, 3)] == [[1, 2, 3], [4]]
    # files written by different tools: a non-null field, large_string, a narrower int; read as one schema
    narrow = pa.schema([pa.field("id", pa.int32(), nullable=False), pa.field("text", pa.large_string(), False)])
    pq.write_table(pa.table({"id": [5, 6], "text": ["e", "f"]}, schema=narrow), folder / "b" / "y.parquet")
    source = job_io.open_source(folder, "text", "text", ["id"])
    assert source.schema == pa.schema([("text", pa.large_string()), ("id", pa.int64())])
    got = list(source.batches(0, 3))
    assert [b.data.column(1).to_pylist() for b in got] == [[1, 2, 3], [4, 5, 6]]
    assert all(b.data.schema == source.schema for b in got)
    pq.write_table(pa.table({"id": [7.5], "text": ["e"]}), folder / "f.parquet")  # int64 ids read as floats: no
    with pytest.raises(job_io.JobInputError, match="f.parquet: .* id: int64 vs double"):
        job_io.open_source(folder, "text", "text", ["id"])
    (folder / "f.parquet").unlink()
    pq.write_table(pa.table({"id": ["x"], "text": ["e"]}), folder / "c.parquet")
    with pytest.raises(job_io.JobInputError, match=r"c.parquet: columns \(text: string, id: string\) do not fit the other files. \(text: large_string, id: int64\)"):
        job_io.open_source(folder, "text", "text", ["id"])


# ---- embedding jobs ----------------------------------------------------------------------

def test_texts_in_process_and_through_a_server_are_bit_identical(tmp_path, minilm, minilm_model_dir):
    path = texts_parquet(tmp_path / "texts.parquet", 100, row_group_size=30)
    local = run_job(JobConfig(input=path, output=tmp_path / "local", kind="text", model=str(minilm_model_dir),
                              batch_rows=16, shard_rows=30, passthrough=("id",), progress=False))
    assert (local.rows, local.errors, local.shards) == (100, 1, 4)  # shards of 32 rows: 30 rounded up
    with serve(minilm, "minilm") as server:
        remote = run_job(JobConfig(input=path, output=tmp_path / "remote", kind="text", model="minilm",
                                   servers=(f"grpc://127.0.0.1:{server.port}",), batch_rows=16,
                                   shard_rows=30, passthrough=("id",), progress=False))
    assert (remote.rows, remote.errors) == (100, 1)
    a, b = read_output(tmp_path / "local"), read_output(tmp_path / "remote")
    assert a.column_names == ["id", "embedding", "error"]
    assert a.column("id").to_pylist() == list(range(100))
    assert a.column("error").to_pylist()[5] and a.column("embedding").null_count == 1
    assert_same_output(a, b)
    direct = minilm.embed_texts(pq.read_table(path).column("text").combine_chunks()[:16]).embeddings
    np.testing.assert_allclose(embeddings(a)[:16][np.arange(16) != 5], direct[np.arange(16) != 5], atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == [
        "_job.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "part-00003.parquet"]
    manifest = json.loads((tmp_path / "local" / "_job.json").read_text())
    assert manifest["complete"] and manifest["rows_done"] == 100 and manifest["errors"] == 1
    assert [(s["first_row"], s["rows"]) for s in manifest["shards"]] == [(0, 32), (32, 32), (64, 32), (96, 4)]
    assert manifest["args"]["shard_rows"] == 32 and manifest["dimension"] == 384
    assert pq.read_table(tmp_path / "local").num_rows == 100  # temp files and _job.json are ignored


def test_a_huge_file_among_the_images_is_an_error_row_and_is_never_read(tmp_path):
    """A 3 GiB file (a video among the photos) would exhaust memory read whole and cannot fit one Arrow binary
    value (2 GiB): it is a row error, and the photos beside it are read."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(PHOTOS / "rocket.jpg", folder / "a.jpg")
    with open(folder / "b-video.mp4", "wb") as f:  # sparse: no disk space, no time to write
        f.truncate(3 * 1024 ** 3)
    source = job_io.open_source(folder, "image", "image", [])
    (batch,) = source.batches(0, 8)
    assert batch.data.column("image").to_pylist()[0] == (PHOTOS / "rocket.jpg").read_bytes()
    assert batch.data.column("image").to_pylist()[1] is None
    assert set(batch.read_errors) == {1} and "b-video.mp4 is 3072 MiB, over the 512 MiB" in batch.read_errors[1]


def test_image_folder_gives_paths_and_row_errors(tmp_path, clip, tiny_clip_dir):
    folder = tmp_path / "images"
    shutil.copytree(PHOTOS, folder)
    (folder / "sub").mkdir()
    shutil.copy(PHOTOS / "rocket.jpg", folder / "sub" / "rocket-copy.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"skipped")
    (folder / "gone.png").symlink_to(folder / "no-such-file.png")  # cannot be read
    (folder / "meta").mkdir()  # a stray Parquet file does not turn a photo folder into Parquet input
    pq.write_table(pa.table({"text": ["x"]}), folder / "meta" / "index.parquet")
    assert isinstance(job_io.open_source(folder / "meta", "image", "text", []), ParquetSource)  # Parquet alone
    (folder / "meta" / "README.md").write_text("a hub dataset's card")  # not an image: still Parquet
    assert isinstance(job_io.open_source(folder / "meta", "image", "text", []), ParquetSource)
    summary = run_job(JobConfig(input=folder, output=tmp_path / "out", kind="image", model=str(tiny_clip_dir),
                                batch_rows=4, shard_rows=4, progress=False))
    table = read_output(tmp_path / "out")
    paths = table.column("path").to_pylist()
    assert paths == sorted(paths) and "sub/rocket-copy.jpg" in paths and ".hidden.png" not in paths
    assert len(paths) == 13
    errors = dict(zip(paths, table.column("error").to_pylist()))
    bad = {"broken.jpg", "notes.txt", "LICENSES.md", "gone.png", "meta/index.parquet", "meta/README.md"}
    assert {p for p, e in errors.items() if e} == bad
    assert errors["gone.png"].startswith("cannot read gone.png")
    assert summary.errors == 6 and summary.rows == 13
    valid = table.column("embedding").is_valid().to_pylist()
    assert [p for p, ok in zip(paths, valid) if not ok] == sorted(bad)
    vecs = embeddings(table)
    rocket = clip.embed_images([(PHOTOS / "rocket.jpg").read_bytes()]).embeddings[0]
    np.testing.assert_allclose(vecs[paths.index("rocket.jpg")], rocket, atol=1e-5)
    np.testing.assert_allclose(vecs[paths.index("sub/rocket-copy.jpg")], rocket, atol=1e-5)


def test_token_ids_and_an_empty_input(tmp_path, clip):
    tokens = [[49406, 320, 1125, 49407], [49406, 49407], [49406, 10 ** 9, 49407]]  # last: bad id
    path = tmp_path / "tokens.parquet"
    pq.write_table(pa.table({"input_ids": pa.array(tokens, pa.list_(pa.int32())), "n": [1, 2, 3]}), path)
    summary = run_job(JobConfig(input=path, output=tmp_path / "out", kind="tokens", passthrough=("n",),
                                batch_rows=2, progress=False), [LocalEmbedder(clip, "tokens")])
    table = read_output(tmp_path / "out")
    assert summary.errors == 1 and table.column("n").to_pylist() == [1, 2, 3]
    assert table.column("error").to_pylist()[:2] == [None, None] and table.column("error")[2].as_py()
    np.testing.assert_allclose(embeddings(table)[0], clip.embed_tokens([tokens[0]]).embeddings[0], atol=1e-5)

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    summary = run_job(JobConfig(input=empty, output=tmp_path / "empty-out", kind="text", progress=False),
                      [LocalEmbedder(clip, "text")])
    table = read_output(tmp_path / "empty-out")
    assert summary.rows == 0 and table.num_rows == 0
    assert table.schema.names == ["embedding", "error"] and table.schema.field("embedding").type.list_size == 48


def test_output_inside_the_input_folder_is_refused(tmp_path, clip):
    shutil.copytree(PHOTOS, tmp_path / "images")
    with pytest.raises(JobError, match="is inside INPUT"):
        run_job(JobConfig(input=tmp_path / "images", output=tmp_path / "images" / "out", kind="image",
                          progress=False), [LocalEmbedder(clip, "image")])


# ---- output folder and resume ------------------------------------------------------------

def job(path, out, **kw):
    defaults = dict(kind="text", batch_rows=8, shard_rows=16, passthrough=("id",), progress=False)
    return JobConfig(input=path, output=out, **{**defaults, **kw})


def local(clip):
    return [LocalEmbedder(clip, "text")]


def test_non_empty_output_needs_resume_and_a_changed_input_is_refused(tmp_path, clip):
    path = texts_parquet(tmp_path / "t.parquet", 40)
    run_job(job(path, tmp_path / "out"), local(clip))
    with pytest.raises(JobError, match="not empty; pass --resume"):
        run_job(job(path, tmp_path / "out"), local(clip))
    summary = run_job(job(path, tmp_path / "out", resume=True), local(clip))  # complete: nothing to do
    assert summary.rows_this_run == 0 and summary.rows == 40
    with pytest.raises(JobError, match="settings differ .*batch_rows: job has 8, now 4"):
        run_job(job(path, tmp_path / "out", resume=True, batch_rows=4), local(clip))
    texts_parquet(path, 41)
    with pytest.raises(JobError, match="input changed since the job started"):
        run_job(job(path, tmp_path / "out", resume=True), local(clip))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(JobError, match="holds no _job.json"):
        run_job(job(path, tmp_path / "junk", resume=True), local(clip))


def test_resume_after_a_kill_mid_write_drops_leftovers_and_matches(tmp_path, clip):
    path = texts_parquet(tmp_path / "t.parquet", 100, row_group_size=30)
    run_job(job(path, tmp_path / "full"), local(clip))
    full = read_output(tmp_path / "full")
    # A run killed while writing shard 3: shards 0-1 recorded, shard 2 renamed but not yet
    # recorded, shard 3 half-written under its temp name, the manifest temp half-written too.
    out = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", out)
    manifest = JobManifest.load(out)
    manifest.shards, manifest.complete = manifest.shards[:2], False
    manifest.save(out)
    for name in [s["file"] for s in json.loads((tmp_path / "full" / "_job.json").read_text())["shards"][3:]]:
        (out / name).unlink()
    (out / ".part-00003.parquet.tmp").write_bytes(b"PAR1 half a shard")
    (out / "._job.json.tmp").write_bytes(b'{"format": "arrowengine-em')
    summary = run_job(job(path, out, resume=True), local(clip))
    assert summary.resumed_from == 32 and summary.rows_this_run == 68
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert_same_output(read_output(out), full)
    assert read_output(out).column("id").to_pylist() == list(range(100))


# ---- several servers -----------------------------------------------------------------------

class DiesOnCall:
    """Wraps a model: on call number ``on_call`` it shuts its server down and fails the batch."""

    def __init__(self, model, on_call: int) -> None:
        self.model, self.info, self.on_call, self.calls = model, model.info, on_call, 0
        self.server = None
        self.stopped = threading.Event()

    def embed_texts(self, texts, normalize=True):
        self.calls += 1
        if self.calls == self.on_call:
            def stop():
                self.server.shutdown()
                self.stopped.set()
            threading.Thread(target=stop, daemon=True).start()
            raise RuntimeError("simulated crash in the middle of a batch")
        return self.model.embed_texts(texts, normalize=normalize)


def test_two_servers_share_the_work_and_survive_one_dying(tmp_path, clip):
    path = texts_parquet(tmp_path / "t.parquet", 200, row_group_size=50)
    run_job(job(path, tmp_path / "ref"), local(clip))
    dying = DiesOnCall(clip, on_call=3)
    with serve(clip) as healthy:
        dying.server = serve(dying)
        try:
            servers = (f"grpc://127.0.0.1:{dying.server.port}", f"grpc://127.0.0.1:{healthy.port}")
            summary = run_job(job(path, tmp_path / "out", servers=servers, model="tiny"))
        finally:
            assert dying.stopped.wait(10)
    assert summary.batches[servers[0]] == 2 and summary.batches[servers[1]] == 25 - 2
    out = read_output(tmp_path / "out")
    assert out.column("id").to_pylist() == list(range(200))  # every row once, in order
    assert_same_output(out, read_output(tmp_path / "ref"))


class StallsOnCall:
    """Wraps a model: from call number ``on_call`` on, hangs until ``release`` is set (a stopped server)."""

    def __init__(self, model, on_call: int) -> None:
        self.model, self.info, self.on_call, self.calls = model, model.info, on_call, 0
        self.release = threading.Event()

    def embed_texts(self, texts, normalize=True):
        self.calls += 1
        if self.calls >= self.on_call:
            self.release.wait(60)
        return self.model.embed_texts(texts, normalize=normalize)


def test_a_stalled_server_times_out_and_its_batch_goes_to_another(tmp_path, clip):
    path = texts_parquet(tmp_path / "t.parquet", 80)
    stalled = StallsOnCall(clip, on_call=2)
    with serve(stalled) as stuck, serve(clip) as healthy:
        servers = (f"grpc://127.0.0.1:{stuck.port}", f"grpc://127.0.0.1:{healthy.port}")
        try:
            t0 = time.monotonic()
            summary = run_job(job(path, tmp_path / "out", servers=servers, model="tiny", call_timeout_s=1.5,
                                  max_failures=1))
            took = time.monotonic() - t0
        finally:
            stalled.release.set()
    assert summary.rows == 80 and took < 30
    run_job(job(path, tmp_path / "ref"), local(clip))
    out = read_output(tmp_path / "out")
    assert out.column("id").to_pylist() == list(range(80))
    assert_same_output(out, read_output(tmp_path / "ref"))


def test_job_batches_are_split_within_the_servers_default_limits():
    """A job batch of big images is one exchange of several record batches, each within the server's limits
    (a 290 MB batch of 80 photos was refused and the job could never finish)."""
    from flight_client.pool import FlightEmbedder
    from flight_server.config import ServerLimits

    embedder = FlightEmbedder("grpc://127.0.0.1:1", "image")
    try:
        assert embedder.client.batch_bytes <= ServerLimits().max_batch_bytes
        assert embedder.client.batch_rows <= ServerLimits().max_batch_rows
    finally:
        embedder.close()


def test_all_servers_dying_stops_the_job_and_resume_finishes_it(tmp_path, clip):
    path = texts_parquet(tmp_path / "t.parquet", 120)
    dying = DiesOnCall(clip, on_call=4)
    dying.server = serve(dying)
    location = f"grpc://127.0.0.1:{dying.server.port}"
    with pytest.raises(JobError, match="all 1 endpoint.*failed.*--resume"):
        run_job(job(path, tmp_path / "out", servers=(location,), max_failures=2))
    assert dying.stopped.wait(10)
    manifest = JobManifest.load(tmp_path / "out")
    assert not manifest.complete and manifest.rows_done == 16  # batches 1-3 done, shard 0 (16 rows) written
    with serve(clip) as server:
        summary = run_job(job(path, tmp_path / "out", servers=(f"grpc://127.0.0.1:{server.port}",), resume=True))
    assert summary.resumed_from == 16 and summary.rows == 120
    run_job(job(path, tmp_path / "ref"), local(clip))
    assert_same_output(read_output(tmp_path / "out"), read_output(tmp_path / "ref"))


def test_request_level_fault_stops_at_once(tmp_path, clip):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": [1, 2]}), path)
    with serve(clip) as server:
        with pytest.raises(JobUsageError, match="column 'text' has type int64.*nothing was kept.*run the command again"):
            run_job(job(path, tmp_path / "out", servers=(f"grpc://127.0.0.1:{server.port}",)))
        assert not (tmp_path / "out").exists()  # no half-started job blocks the fixed rerun
        pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), path)
        summary = run_job(job(path, tmp_path / "out", servers=(f"grpc://127.0.0.1:{server.port}",)))
    assert summary.rows == 2 and summary.errors == 0


def test_a_fault_of_this_machine_before_any_row_is_not_a_usage_error(tmp_path, clip):
    """Memory or disk trouble before the first shard: nothing is kept, and the exit is 1 (the same command
    may succeed later), not 2 (the arguments cannot work)."""
    class OutOfMemory(LocalEmbedder):
        def embed(self, column):
            raise MemoryError("no room for the batch")

    path = texts_parquet(tmp_path / "t.parquet", 8)
    with pytest.raises(JobError, match="MemoryError: no room.*nothing was kept") as err:
        run_job(job(path, tmp_path / "out"), [OutOfMemory(clip, "text")])
    assert not isinstance(err.value, JobUsageError) and not (tmp_path / "out").exists()


def test_a_refused_token_is_a_usage_error_not_an_unreachable_server(tmp_path, clip):
    path = texts_parquet(tmp_path / "t.parquet", 8)
    with EmbeddingServer({"tiny": clip}, ServerConfig(port=0, auth_token="right")) as server:
        with pytest.raises(JobUsageError, match="refused this job's credentials.*--auth-token-file"):
            run_job(job(path, tmp_path / "out", servers=(f"grpc://127.0.0.1:{server.port}",), token="wrong"))
        summary = run_job(job(path, tmp_path / "ok", servers=(f"grpc://127.0.0.1:{server.port}",), token="right"))
    assert summary.rows == 8 and not (tmp_path / "out").exists()


def test_unreachable_server_at_start_is_skipped_and_none_reachable_is_an_error(tmp_path, clip):
    path = texts_parquet(tmp_path / "t.parquet", 20)
    dead = "grpc://127.0.0.1:1"
    with pytest.raises(JobError, match="no endpoint could be reached"):
        run_job(job(path, tmp_path / "a", servers=(dead,)))
    with serve(clip) as server:
        summary = run_job(job(path, tmp_path / "b", servers=(dead, f"grpc://127.0.0.1:{server.port}")))
    assert summary.rows == 20


def test_local_embedder_wraps_the_engine_output_without_a_copy():
    out = np.arange(12, dtype=np.float32).reshape(3, 4)

    class Model:
        def embed_texts(self, column, normalize=True):
            return type("Result", (), {"embeddings": out, "errors": [None, "broken", None]})()

    (column,), errors = LocalEmbedder(Model(), "text").embed(pa.array(["a", "b", "c"]))
    assert column.values.buffers()[1].address == out.ctypes.data  # protocol.embedding_column: the same memory
    assert column.to_pylist() == [[0, 1, 2, 3], None, [8, 9, 10, 11]] and errors == [None, "broken", None]
    strided = np.arange(24, dtype=np.float64).reshape(3, 8)[:, ::2]  # not float32, not contiguous: one copy
    from flight_server.protocol import embedding_column

    assert embedding_column(strided, [None] * 3).to_pylist() == strided.astype(np.float32).tolist()


def test_pool_keeps_input_order_with_uneven_endpoints():
    import time

    class Slow:
        def __init__(self, name, delay):
            self.name, self.delay = name, delay

        def embed(self, column):
            time.sleep(self.delay)
            values = np.asarray(column.to_pylist(), np.float32)[:, None]  # (N, 1)
            return pa.array(values.tolist(), pa.list_(pa.float32(), 1)), [None] * len(column)

    pool = EndpointPool([Slow("slow", 0.03), Slow("fast", 0.0)])
    items = ((i, pa.array([float(i)])) for i in range(30))
    out = [(payload, emb.to_pylist()[0][0]) for payload, emb, _ in pool.map(items)]
    assert out == [(i, float(i)) for i in range(30)]
    assert pool.batches_done["fast"] > pool.batches_done["slow"] >= 1

    class Broken:
        name = "broken"

        def embed(self, column):
            raise OSError("connection refused")

    with pytest.raises(AllEndpointsFailed, match="broken: OSError: connection refused"):
        list(EndpointPool([Broken()], max_failures=2, backoff_s=0.01).map([(0, pa.array([1.0]))]))


def test_a_busy_server_is_waited_out_not_retired():
    """--max-concurrent rejects fast with code "busy": the pool backs off and tries again, however often,
    while a failure of any other kind retires the endpoint after max_failures."""
    from flight_server.errors import busy_error

    class BusyThenFine:
        name = "busy"

        def __init__(self, busy_calls):
            self.calls, self.busy_calls = 0, busy_calls

        def embed(self, column):
            self.calls += 1
            if self.calls <= self.busy_calls:
                raise busy_error(1)
            return pa.array([[v] for v in column.to_pylist()], pa.list_(pa.float32(), 1)), [None] * len(column)

    endpoint = BusyThenFine(busy_calls=5)
    pool = EndpointPool([endpoint], max_failures=1, backoff_s=0.001)
    out = [emb.to_pylist()[0][0] for _, emb, _ in pool.map((i, pa.array([float(i)])) for i in range(3))]
    assert out == [0.0, 1.0, 2.0] and endpoint.calls == 5 + 3


# ---- passthrough: the output joins back to the input -------------------------------------------------------

def test_passthrough_default_copies_every_other_column_and_joins_back(tmp_path, clip, caplog):
    """Without --passthrough a Parquet input's other columns are copied (not the embedded one, not an input
    column named like the output's own); the output then joins back to the input on its key."""
    n = 30
    texts = [f"text {i}" for i in range(n)]
    texts[3] = None
    keys = [f"doc-{(i * 7) % n:03d}" for i in range(n)]  # a key unrelated to row order
    table = pa.table({"doc": keys, "text": texts, "lang": ["en", "fr"] * (n // 2),
                      "thumb": pa.array([bytes([i]) * 3 for i in range(n)], pa.binary()),
                      "error": ["old"] * n})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=7)
    with caplog.at_level(logging.WARNING, "arrowengine.embed"):
        run_job(JobConfig(input=tmp_path / "t.parquet", output=tmp_path / "out", kind="text", batch_rows=8,
                          progress=False), [LocalEmbedder(clip, "text")])
    assert "input columns ['error'] are not copied to the output" in caplog.text
    out = read_output(tmp_path / "out")
    assert out.column_names == ["doc", "lang", "thumb", "embedding", "error"]
    assert JobManifest.load(tmp_path / "out").args["passthrough"] == ["doc", "lang", "thumb"]
    # a join on the key, in an order unrelated to the input's: each embedding is its own text's
    shuffled = out.take(np.random.default_rng(0).permutation(n))
    rows = pc.index_in(shuffled.column("doc"), value_set=table.column("doc"))  # each output row's input row
    input_texts = table.column("text").take(rows).to_pylist()
    valid = np.array([t is not None for t in input_texts])
    assert valid.tolist() == shuffled.column("embedding").is_valid().to_pylist()
    want = clip.embed_texts([t for t in input_texts if t is not None]).embeddings
    np.testing.assert_allclose(embeddings(shuffled)[valid], want, atol=1e-5)

    # explicit: only those named (the embedded column too when named); none with passthrough=()
    run_job(JobConfig(input=tmp_path / "t.parquet", output=tmp_path / "named", kind="text", progress=False,
                      passthrough=("text", "doc")), [LocalEmbedder(clip, "text")])
    named = read_output(tmp_path / "named")
    assert named.column_names == ["text", "doc", "embedding", "error"]
    assert named.column("text").to_pylist() == texts
    run_job(JobConfig(input=tmp_path / "t.parquet", output=tmp_path / "none", kind="text", progress=False,
                      passthrough=()), [LocalEmbedder(clip, "text")])
    assert read_output(tmp_path / "none").column_names == ["embedding", "error"]
    # the default's columns are the job's settings: resuming with others is refused
    with pytest.raises(JobUsageError, match=r"passthrough: job has \['doc', 'lang', 'thumb'\], now \['doc'\]"):
        run_job(JobConfig(input=tmp_path / "t.parquet", output=tmp_path / "out", kind="text", batch_rows=8,
                          progress=False, resume=True, passthrough=("doc",)), [LocalEmbedder(clip, "text")])


def test_an_input_without_a_key_column_warns_that_only_row_order_joins(tmp_path, clip, caplog):
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), tmp_path / "t.parquet")
    with caplog.at_level(logging.WARNING, "arrowengine.embed"):
        run_job(JobConfig(input=tmp_path / "t.parquet", output=tmp_path / "out", kind="text", progress=False),
                [LocalEmbedder(clip, "text")])
    assert "join back to the input only by position (row i of the output is row i of the input" in caplog.text
    assert "--passthrough text" in caplog.text
    assert read_output(tmp_path / "out").column_names == ["embedding", "error"]
