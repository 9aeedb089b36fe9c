"""``POST /rerank`` (text-embeddings-inference's shape) beside Flight: scores equal the in-process engine's (and so
the Flight path's) bit for bit, ranked best first; every bad request gets the status and JSON error a client
expects; the request parser raises nothing but ApiError."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("starlette")  # the server extra installs the HTTP stack; say so plainly where it is missing

import engine  # noqa: E402
from flight_server import rerank_api  # noqa: E402
from flight_server.config import ServerConfig, ServerLimits  # noqa: E402
from test_http_api import TOKEN, assert_error, post, serve_models  # noqa: E402

IDENTITY = "torch.nn.modules.linear.Identity"
QUERY = "how many people live in berlin"
TEXTS = ["berlin had a population of 3,520,031 in 2019", "Ünïcode café 日本語", "dog " * 30, "berlin",
         "a passage about population counts in cities"]


@pytest.fixture(scope="module")
def models(checkpoints, tiny_clip_dir):
    """A reranker with the default (Sigmoid) scores and 45 tokens at most, one whose scores are its logits, a
    three-label one and an embedding model."""
    return {
        "rr": engine.load_model(checkpoints.converted(checkpoints.reranker_source("bert", max_length=45),
                                                      "reranker-bert-max45")),
        "rr-logit": engine.load_model(checkpoints.converted(
            checkpoints.reranker_source("bert", "odd", activation=IDENTITY), "reranker-bert-odd-identity")),
        "rr3": engine.load_model(checkpoints.converted(checkpoints.reranker_source("bert", "odd", 3),
                                                       "reranker-bert-odd-3")),
        "clip": engine.load_model(tiny_clip_dir),
    }


@pytest.fixture(scope="module")
def server(models):
    limits = ServerLimits(max_batch_rows=8, max_batch_bytes=4096)
    with serve_models(models, ServerConfig(port=0, http_port=0, auth_token=TOKEN, limits=limits)) as server:
        yield server


def test_rerank_ranks_the_engines_scores_best_first(server, models):
    assert models["rr"].info.score_activation == "Sigmoid"
    want = models["rr"].score_pairs([QUERY] * len(TEXTS), TEXTS).scores
    assert ((want > 0) & (want < 1)).all()
    status, doc, _ = post(server.http_port, "/rerank", {"query": QUERY, "texts": TEXTS, "model": "rr"})
    assert status == 200, doc
    assert [r["index"] for r in doc] == np.argsort(-want, kind="stable").tolist()
    got = np.array([r["score"] for r in sorted(doc, key=lambda r: r["index"])], np.float32)
    np.testing.assert_array_equal(got, want)  # the float32 scores, exactly
    assert all(set(r) == {"index", "score"} for r in doc)

    status, top, _ = post(server.http_port, "/rerank", {"query": QUERY, "texts": TEXTS, "model": "rr",
                                                        "return_text": True, "top_n": 2})
    assert status == 200 and top == [dict(r, text=TEXTS[r["index"]]) for r in doc[:2]]

    assert models["rr-logit"].info.score_activation == "Identity"
    logits = models["rr-logit"].score_pairs([QUERY] * len(TEXTS), TEXTS).scores
    for raw in (False, True):  # the scores are the logits: raw or not, the same
        status, doc, _ = post(server.http_port, "/rerank", {"query": QUERY, "texts": TEXTS, "model": "rr-logit",
                                                            "raw_scores": raw})
        assert status == 200
        np.testing.assert_array_equal(
            np.array([r["score"] for r in sorted(doc, key=lambda r: r["index"])], np.float32), logits)
    assert server.stats.snapshot()["rows"] >= 4 * len(TEXTS)


@pytest.mark.parametrize("body,status,code,words", [
    (b"{not json", 422, "invalid_json", ['{"query": "a question", "texts"']),
    ([1, 2], 422, "invalid_input", ["must be a JSON object; got an array"]),
    ({"texts": ["a"]}, 422, "invalid_input", ['"query" must be a non-empty string; got None']),
    ({"query": "q", "texts": []}, 422, "invalid_input", ['"texts" must be a non-empty list of strings']),
    ({"query": "q", "texts": "one text"}, 422, "invalid_input", ['"texts" must be a non-empty list']),
    ({"query": "q", "texts": ["a", 3]}, 422, "invalid_input", ["texts[1] is 3; every text must be a non-empty"]),
    ({"query": "q", "texts": ["a"], "documents": ["b"]}, 422, "unknown_parameter", ["unknown field(s) ['documents']"]),
    ({"query": "q", "texts": ["a"], "raw_scores": "yes"}, 422, "invalid_input", ['"raw_scores" must be true or']),
    ({"query": "q", "texts": ["a"], "top_n": 0}, 422, "invalid_input", ['"top_n" must be a positive integer']),
    ({"query": "q", "texts": ["a"], "truncation_direction": "left"}, 422, "invalid_input", ['must be "right"']),
    ({"query": "q", "texts": ["a"], "model": "nope"}, 404, "model_not_found", ["unknown model 'nope'"]),
    ({"query": "q", "texts": ["a"], "model": "clip"}, 422, "invalid_input", ["it scores no pairs"]),
    ({"query": "q", "texts": ["a"], "model": "rr3"}, 422, "invalid_input", ["gives 3 scores per pair"]),
    ({"query": "q", "texts": ["a"], "model": "rr", "raw_scores": True}, 422, "invalid_input",
     ["Sigmoid of its logit", '"raw_scores": false']),
    ({"query": "q", "texts": ["a"] * 9, "model": "rr"}, 413, "limit_exceeded", ['"texts" has 9 rows; the limit is 8']),
    ({"query": "q" * 600, "texts": ["a"] * 8, "model": "rr"}, 413, "limit_exceeded",
     ["beside each of the 8 texts", "the limit is 4096"]),
    ({"query": "q", "texts": ["a", "word " * 60, "b", "word " * 50], "model": "rr", "truncate": False}, 422,
     "invalid_input", ["2 row(s) could not be scored", "texts[1]: ", "texts[3]: "]),
])
def test_every_bad_rerank_request_gets_a_clear_error(server, body, status, code, words):
    got_status, doc, _ = post(server.http_port, "/rerank", body)
    error = assert_error(got_status, doc, status, code, *words)
    if code == "invalid_input" and "texts[1]: " in words:
        assert [r["index"] for r in error["rows"]] == [1, 3]


def test_rerank_needs_the_token_and_is_listed_where_a_path_is_unknown(server):
    assert_error(*post(server.http_port, "/rerank", {"query": "q", "texts": ["a"]}, token=None)[:2], 401,
                 "invalid_api_key")
    assert_error(*post(server.http_port, "/nowhere", {"query": "q"})[:2], 404, "not_found", "POST /rerank")


def test_the_rerank_parser_raises_only_api_errors():
    """Any body: a request whose engine call has one pair per text, or an ApiError (413/422), never another
    exception. Derandomized and bounded, as tests/test_fuzz.py."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaf = st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=12)
    value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)
    keys = st.sampled_from(rerank_api.REQUEST_KEYS) | st.text(max_size=6)
    body = (st.dictionaries(keys, value, max_size=6).map(lambda d: json.dumps(d).encode())
            | st.binary(max_size=200)
            | st.lists(st.text(max_size=8), max_size=6).map(lambda t: json.dumps({"query": "q", "texts": t}).encode()))

    @settings(max_examples=300, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body)
    def check(raw: bytes) -> None:
        try:
            request = rerank_api.parse_rerank_request(raw, max_rows=4, max_bytes=200)
            call = rerank_api.engine_call(request)
        except rerank_api.ApiError as exc:
            assert exc.status in (413, 422) and json.loads(exc.body())["error"]["message"]
            return
        queries, documents = call.values
        assert len(queries) == len(documents) == len(request.texts) == len(call.index)
        assert set(queries.to_pylist()) == {request.query} and documents.to_pylist() == list(request.texts)

    check()
