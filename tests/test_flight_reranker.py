"""Rerankers over Flight: ``pairs`` input against a real server on port 0, each model behind its Scheduler as
``arrowengine serve`` runs it; results equal the in-process engine's, bad requests are clear errors, and
``EmbeddingClient``'s score_pairs / rerank / score_table."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

import engine
from flight_client import EmbeddingClient, ScoreRowErrors
from flight_fakes import exchange
from flight_server import protocol
from flight_server.config import ServerConfig, ServerLimits
from flight_server.servicer import EmbeddingServer

QUERIES = ["how many people live in berlin", "", "Ünïcode café", "word " * 80, None, "a query"]
DOCUMENTS = ["berlin had a population of 3,520,031 in 2019", "an empty query", "日本語 [SEP] </s>", "dog " * 90,
             "a null query", None]


def cmd(**doc) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(doc).encode())


@pytest.fixture(scope="module")
def models(checkpoints, tiny_clip_dir):
    """A one-label BERT reranker, a three-label one, and an embedding model (tiny CLIP), loaded in process."""
    one = checkpoints.converted(checkpoints.reranker_source("bert", max_length=45), "reranker-bert-max45")
    three = checkpoints.converted(checkpoints.reranker_source("bert", "odd", 3), "reranker-bert-odd-3")
    return {"rr": engine.load_model(one), "rr3": engine.load_model(three), "clip": engine.load_model(tiny_clip_dir)}


@pytest.fixture(scope="module")
def served(models):
    from engine.scheduler import Scheduler

    schedulers = {name: Scheduler(model) for name, model in models.items()}
    limits = ServerLimits(max_batch_bytes=64 * 1024)
    try:
        with EmbeddingServer(schedulers, ServerConfig(port=0, limits=limits)) as server:
            server.warm_up()  # one real inference per model: a reranker scores a pair
            with flight.connect(f"grpc://127.0.0.1:{server.port}") as client, \
                    EmbeddingClient(f"grpc://127.0.0.1:{server.port}", retries=0) as ours:
                yield server, client, ours
    finally:
        for s in schedulers.values():
            s.close()


def test_pairs_over_flight_equal_in_process_with_renamed_columns_and_passthrough(served, models):
    server, client, _ = served
    batches = [pa.record_batch({"id": pa.array(range(i, i + len(q)), pa.int64()), "q": pa.array(q, pa.string()),
                                "passage": pa.array(d, pa.large_string())})
               for i, q, d in ((0, QUERIES[:4], DOCUMENTS[:4]), (4, QUERIES[4:], DOCUMENTS[4:]), (6, [], []))]
    out = exchange(client, cmd(model="rr", input="pairs", query_column="q", document_column="passage",
                               passthrough=["id"]), batches)
    assert [b.num_rows for b in out] == [4, 2, 0]
    want = models["rr"].score_pairs(QUERIES, DOCUMENTS)
    for batch in out:
        assert batch.schema == protocol.score_schema(1, [pa.field("id", pa.int64())])
    scores = pa.concat_arrays([b.column("score") for b in out])
    errors = sum((b.column("error").to_pylist() for b in out), [])
    assert pa.concat_arrays([b.column("id") for b in out]).to_pylist() == list(range(6))
    assert errors == want.errors and errors[4].startswith("query: null") and errors[5].startswith("document: null")
    assert scores.null_count == 2 and not scores[4].is_valid
    np.testing.assert_array_equal(scores.fill_null(0).to_numpy(), want.scores)  # bit for bit
    stats = json.loads(list(client.do_action(flight.Action("stats", b"")))[0].body.to_pybytes())
    assert stats["row_errors"] >= 2


def test_client_score_pairs_rerank_and_score_table(served, models):
    _, _, ours = served
    good_q, good_d = QUERIES[:4], DOCUMENTS[:4]
    want = models["rr"].score_pairs(good_q, good_d).scores
    got = ours.score_pairs(good_q, good_d, model="rr")
    assert got.dtype == np.float32 and got.shape == (4,)
    np.testing.assert_array_equal(got, want)
    ranked = ours.rerank("how many people live in berlin", DOCUMENTS[:4], model="rr")
    np.testing.assert_array_equal(ranked, models["rr"].rerank("how many people live in berlin", DOCUMENTS[:4]).scores)
    scores, errors = ours.score_pairs(QUERIES, DOCUMENTS, model="rr", errors="return")
    assert errors[4] and errors[5] and scores[4] == scores[5] == 0
    with pytest.raises(ScoreRowErrors, match="2 of 6 rows failed: row 4: query: null") as err:
        ours.score_pairs(QUERIES, DOCUMENTS, model="rr")
    np.testing.assert_array_equal(err.value.scores, scores)
    table = pa.table({"k": ["a", "b"], "query": good_q[:2], "document": good_d[:2]})
    result = ours.score_table(table, passthrough=["k"], model="rr")
    assert result.column_names == ["k", "score", "error"] and result.column("k").to_pylist() == ["a", "b"]
    three = ours.score_pairs(good_q, good_d, model="rr3")  # three labels: (N, 3), as CrossEncoder.predict
    assert three.shape == (4, 3)
    np.testing.assert_array_equal(three, models["rr3"].score_pairs(good_q, good_d).scores)
    with pytest.raises(ValueError, match="one document per query; got 2 queries and 1 documents"):
        ours.score_pairs(["a", "b"], ["c"], model="rr")
    with pytest.raises(TypeError, match=r"queries: expected .* got a single str of 1 characters; wrap it in a list: "
                                        r"queries=\[query\]"):
        ours.score_pairs("a", ["c"], model="rr")
    with pytest.raises(TypeError, match=r"documents\[1\]: expected str or None, got int"):
        ours.rerank("q", ["a", 3], model="rr")


@pytest.mark.parametrize("descriptor,columns,message", [
    (dict(model="rr", input="pairs"), ["query", "doc"],
     "\"pairs\" input needs a query and a document column; the document column 'document' is not in the batches"),
    (dict(model="rr", input="pairs", column="query"), ["query", "document"], 'not "column"'),
    (dict(model="rr", input="text"), ["text"],
     "model 'rr' is a reranker: it scores (query, document) pairs and embeds nothing; send \"pairs\" input"),
    (dict(model="clip", input="pairs"), ["query", "document"],
     "model 'clip' is an embedding model (['text', 'image']): it scores no pairs; send \"pairs\" input to a reranker "
     "(a cross-encoder): ['rr', 'rr3']"),
])
def test_bad_pairs_requests_are_clear_errors(served, descriptor, columns, message):
    _, client, _ = served
    batch = pa.record_batch({c: pa.array(["x"], pa.string()) for c in columns})
    with pytest.raises(flight.FlightServerError) as err:
        exchange(client, cmd(**descriptor), [batch])
    assert message in str(err.value)
    assert protocol.error_code(err.value) == protocol.CODE_INVALID


@pytest.mark.parametrize("options", [dict(dimensions=1), dict(output_dtype="float16")])
def test_output_options_with_pairs_are_a_request_error(served, options):
    """Scores are not embeddings: dimensions / output_dtype with pairs fail the call before any row is scored."""
    _, client, ours = served
    batch = pa.record_batch({"query": ["q"], "document": ["d"]})
    with pytest.raises(flight.FlightServerError) as err:
        exchange(client, cmd(model="rr", input="pairs", **options), [batch])
    assert '"dimensions" and "output_dtype" apply to embeddings; "pairs" input returns a reranker\'s scores' in \
        str(err.value)
    assert protocol.error_code(err.value) == protocol.CODE_INVALID


def test_truncate_false_makes_a_pair_over_the_limit_its_row_error(served, models):
    """Over Flight (through the Scheduler) as in process: the long pairs fail, the others score as with truncation."""
    _, client, ours = served
    out = exchange(client, cmd(model="rr", input="pairs", truncate=False),
                   [pa.record_batch({"query": QUERIES[:4], "document": DOCUMENTS[:4]})])
    errors = out[0].column("error").to_pylist()
    want = models["rr"].score_pairs(QUERIES[:4], DOCUMENTS[:4], truncate=False)
    assert errors == want.errors and errors[3].startswith("the pair is ") and "limit of 45 tokens" in errors[3]
    assert errors[:3] == [None] * 3 and out[0].column("score").null_count == 1
    np.testing.assert_allclose(out[0].column("score").to_numpy(zero_copy_only=False)[:3],
                               models["rr"].score_pairs(QUERIES[:3], DOCUMENTS[:3]).scores, atol=1e-5, rtol=0)
    scores, row_errors = ours.score_pairs(QUERIES[:4], DOCUMENTS[:4], model="rr", errors="return", truncate=False)
    assert row_errors == errors and scores[3] == 0
    assert ours.score_pairs(QUERIES[:4], DOCUMENTS[:4], model="rr")[3] != 0  # truncated by default


def test_a_pair_over_the_byte_limit_is_its_row_error(served):
    _, client, _ = served
    batch = pa.record_batch({"query": ["q"], "document": ["d " * 40_000]})  # 80 KB, over the 64 KB limit
    out = exchange(client, cmd(model="rr", input="pairs"), [batch])
    assert out[0].column("score").null_count == 1
    assert "too large: the row holds" in out[0].column("error")[0].as_py()


def test_discovery_reports_a_reranker(served):
    _, client, ours = served
    info = client.get_flight_info(flight.FlightDescriptor.for_path("rr"))
    assert info.schema == protocol.score_schema(1)
    meta = json.loads(info.app_metadata)
    assert (meta["kind"], meta["modalities"], meta["dimension"], meta["score_activation"]) == \
        ("reranker", ["pairs"], 1, "Sigmoid")
    by_name = {m["name"]: m for m in ours.models()}
    assert by_name["rr3"]["score_activation"] == "Identity" and by_name["rr3"]["dimension"] == 3
    assert client.get_flight_info(flight.FlightDescriptor.for_path("rr3")).schema.field("score").type == \
        pa.list_(pa.float32(), 3)
    assert by_name["clip"]["score_activation"] is None and by_name["clip"]["kind"] == "clip"
    assert ours.ready()["ready"]
