"""flight_client.ray on a local 2-CPU Ray: engine actors (MiniLM texts) and Flight-client
actors (tiny CLIP images through an in-process server). Each pipeline runs in a thread
with a deadline, so a scheduling deadlock fails the test instead of hanging it.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry, no network
import ray  # noqa: E402
import ray.data  # noqa: E402

from flight_client.ray import embed_dataset  # noqa: E402
from flight_server import protocol  # noqa: E402
from flight_server.config import ServerConfig  # noqa: E402
from flight_server.servicer import EmbeddingServer  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
              pytest.mark.slow]  # a Ray cluster per module: ~20 s

PHOTOS = Path(__file__).parent / "data" / "photos"
DEADLINE_S = 240


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    yield
    ray.shutdown()


def collect(ds: ray.data.Dataset) -> pa.Table:
    """Run the pipeline in a thread; fail if it does not finish within DEADLINE_S."""
    out: list = []

    def run() -> None:
        try:
            out.append(pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None))))
        except BaseException as exc:  # handed to the test thread
            out.append(exc)

    thread = threading.Thread(target=run, name="ray-pipeline", daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():
        pytest.fail(f"the Ray pipeline did not finish within {DEADLINE_S}s (actors starving the read tasks?)")
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def check_output(table: pa.Table, ids: list[int], dim: int, local, tol: float) -> None:
    assert table.num_rows == len(ids)
    assert table.column("id").to_pylist() == ids  # row order kept
    assert table.schema.field("embedding").type == protocol.embedding_type(dim)
    assert table.schema.field("error").type == pa.string()
    errors = table.column("error").to_pylist()
    assert errors == local.errors
    embedding = table.column("embedding")
    assert embedding.null_count == sum(e is not None for e in local.errors)
    got = embedding.combine_chunks().values.to_numpy(zero_copy_only=False).reshape(len(ids), dim)
    ok = np.array([e is None for e in errors])
    np.testing.assert_allclose(got[ok], local.embeddings[ok], rtol=0, atol=tol)


def test_engine_actors_embed_parquet_texts_in_order_like_one_process(local_ray, minilm_model_dir, tmp_path):
    import engine

    words = ["cat", "dog", "rocket", "coffee", "Arrow Flight", "ünïcödé ✓", "", "a longer sentence here"]
    texts: list[str | None] = [f"{words[i % len(words)]} {i}" for i in range(40)]
    texts[13] = None  # the bad row
    source = pa.table({"id": pa.array(range(40), pa.int64()), "text": pa.array(texts, pa.string()),
                       "extra": pa.array([i / 2 for i in range(40)], pa.float64())})
    pq.write_table(source, tmp_path / "texts.parquet", row_group_size=10)
    # The read task and the repartition tasks each ask for a whole CPU; 2 actors x 0.5 CPU leave them one.
    ds = ray.data.read_parquet(str(tmp_path)).repartition(4)  # 4 blocks: both actors get work
    out = embed_dataset(ds, "text", "text", model_dir=minilm_model_dir, batch_size=8, concurrency=2,
                        num_cpus=0.5, threads=1)
    table = collect(out)

    local = engine.load_model(minilm_model_dir).embed_texts(texts)
    assert local.errors[13] is not None and sum(e is not None for e in local.errors) == 1
    check_output(table, list(range(40)), 384, local, tol=1e-6)
    assert table.column("text").to_pylist() == texts  # other columns pass through
    assert table.column("extra").to_pylist() == [i / 2 for i in range(40)]
    assert table.column_names == ["id", "text", "extra", "embedding", "error"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_flight_actors_embed_images_through_servers_and_skip_a_dead_one(local_ray, tiny_clip_dir):
    import engine

    clip = engine.load_model(tiny_clip_dir)
    photos = [p.read_bytes() for p in sorted(PHOTOS.glob("*.png")) + sorted(PHOTOS.glob("*.jpg"))]
    images: list[bytes | None] = [photos[i % len(photos)] for i in range(24)]
    images[5] = b"not an image"
    images[17] = None
    ds = ray.data.from_items([{"id": i, "image": b} for i, b in enumerate(images)], override_num_blocks=3)
    with EmbeddingServer({"clip": clip}, ServerConfig(port=0)) as server:
        dead = f"grpc://127.0.0.1:{_closed_port()}"
        out = embed_dataset(ds, "image", "image", servers=[dead, f"grpc://127.0.0.1:{server.port}"],
                            batch_size=4, concurrency=2, num_cpus=0.25)
        table = collect(out)

    local = clip.embed_images(pa.array(images, pa.binary()))
    assert local.errors[5] and local.errors[17] and sum(e is not None for e in local.errors) == 2
    check_output(table, list(range(24)), clip.info.dim, local, tol=1e-6)


def test_bad_arguments_fail_before_anything_runs():
    ds = object()  # never touched: the arguments are checked first
    with pytest.raises(ValueError, match="exactly one of servers"):
        embed_dataset(ds, "text", "text")
    with pytest.raises(ValueError, match="exactly one of servers"):
        embed_dataset(ds, "text", "text", servers=["grpc://x:1"], model_dir="m")
    with pytest.raises(ValueError, match="non-empty list"):
        embed_dataset(ds, "text", "text", servers="grpc://x:1")
    with pytest.raises(ValueError, match="kind must be one of"):
        embed_dataset(ds, "text", "audio", servers=["grpc://x:1"])
    with pytest.raises(ValueError, match="three different names"):
        embed_dataset(ds, "embedding", "text", servers=["grpc://x:1"])


def test_model_dir_without_the_engine_names_the_server_extra(monkeypatch):
    import engine

    monkeypatch.setitem(engine.SERVER_EXTRA_MODULES, "arrowengine_test_absent_module", "torch")
    with pytest.raises(engine.EngineNotInstalledError, match=r'model_dir=\.\.\.\) needs the engine.*lacks torch.*'
                                                             r'pip install "arrowengine\[server\]"'):
        embed_dataset(object(), "text", "text", model_dir="m")


def test_flight_client_package_does_not_import_ray_or_torch():
    code = "import sys, flight_client; print('ray' in sys.modules, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
