"""The OpenAI-compatible HTTP API beside Flight: the official ``openai`` client against real models (embeddings
equal the Flight path's), plain HTTP for every error, limits and auth shared with Flight, HTTP and Flight rows
in one device batch, drain and shutdown."""
from __future__ import annotations

import base64
import contextlib
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.flight as flight
import pytest

openai = pytest.importorskip("openai")  # the test extra installs it; say so plainly where it is missing

from flight_client import EmbeddingClient  # noqa: E402
from flight_fakes import FakeModel, expected_embedding, make_self_signed_cert, wait_until  # noqa: E402
from flight_server.config import ServerConfig, ServerLimits  # noqa: E402
from flight_server.servicer import EmbeddingServer  # noqa: E402

PHOTOS = Path(__file__).parent / "data" / "photos"
TOKEN = "http-test-token"
TEXTS = ["a photo of a cat", "a cup of coffee on a wooden table", "the astronaut", "x"]


def post(port: int, path: str, body: bytes | dict, token: str | None = TOKEN, method: str = "POST",
         headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one plain HTTP request (errors included)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data if method == "POST" else None,
                                     method=method, headers={"Content-Type": "application/json", **(headers or {})})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def get(port: int, path: str, token: str | None = TOKEN) -> tuple[int, dict, dict]:
    return post(port, path, b"", token, method="GET")


def assert_error(status: int, doc: dict, want_status: int, code: str, *words: str) -> dict:
    """An OpenAI error body with ``want_status``, ``code`` and each of ``words`` in its message."""
    assert status == want_status, (status, doc)
    error = doc["error"]
    assert set(error) >= {"message", "type", "code"} and error["code"] == code, doc
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error


def server_threads(before: set) -> list[str]:
    """Threads of an EmbeddingServer or its HTTP front started since ``before`` (a threading.enumerate()) and still
    running."""
    return [t.name for t in set(threading.enumerate()) - before if t.name.startswith(("http-", "flight-"))]


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


class Gated:
    """A real engine model whose device calls after the first ``free`` wait for ``gate``: rows of several callers
    queue in the scheduler meanwhile."""

    def __init__(self, model, gate: threading.Event, free: int = 0) -> None:
        self._model, self._gate, self._free = model, gate, free
        self.entered = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def embed_token_rows(self, rows, normalize=True):
        self.entered += 1
        if self.entered > self._free:
            assert self._gate.wait(120), "the test never opened the gate"
        return self._model.embed_token_rows(rows, normalize)


# ---- real models: the openai client, parity with Flight --------------------------------------------------------

@pytest.fixture(scope="module")
def models(minilm_model_dir, tiny_clip_dir):
    import engine

    return {"minilm": engine.load_model(minilm_model_dir), "clip": engine.load_model(tiny_clip_dir)}


@contextlib.contextmanager
def serve_models(models: dict, config: ServerConfig, warm_up: bool = False):
    """An EmbeddingServer over one Scheduler per model; drained, shut down and its schedulers closed after."""
    from engine.scheduler import Scheduler

    schedulers = {name: Scheduler(model) for name, model in models.items()}
    server = EmbeddingServer(schedulers, config)
    try:
        if warm_up:
            server.warm_up()
        yield server
    finally:
        server.drain(5)
        server.shutdown()
        for s in schedulers.values():
            s.close()


@pytest.fixture(scope="module")
def real_server(models):
    config = ServerConfig(port=0, http_port=0, auth_token=TOKEN, metrics_port=0)
    with serve_models(models, config, warm_up=True) as server:
        yield server


def openai_client(server, token: str = TOKEN):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=token, max_retries=0)


def test_openai_client_gets_the_flight_paths_embeddings(real_server, minilm_model_dir):
    from tokenizers import Tokenizer

    client = openai_client(real_server)
    with EmbeddingClient(f"grpc://127.0.0.1:{real_server.port}", token=TOKEN) as flight_client:
        want = flight_client.embed_texts(TEXTS, model="minilm")
        tokenizer = Tokenizer.from_file(str(minilm_model_dir / "tokenizer.json"))
        tokenizer.no_padding()
        ids = [tokenizer.encode(t).ids for t in TEXTS]
        want_tokens = flight_client.embed_tokens(ids, model="minilm")
        want_one = flight_client.embed_texts(TEXTS[1:2], model="minilm")  # a row alone: a batch of its own
        want_one_ids = flight_client.embed_tokens(ids[:1], model="minilm")
    # the client's default: base64 on the wire, decoded by the client
    got = client.embeddings.create(model="minilm", input=TEXTS)
    assert got.model == "minilm" and [d.index for d in got.data] == list(range(len(TEXTS)))
    assert np.array_equal(np.array([d.embedding for d in got.data], np.float32), want)
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(map(len, ids))
    as_floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    assert np.array_equal(np.array([d.embedding for d in as_floats.data], np.float32), want)  # exact in decimal
    one = client.embeddings.create(model="minilm", input=TEXTS[1], encoding_format="float")
    assert len(one.data) == 1 and np.array_equal(np.float32(one.data[0].embedding), want_one[0])
    by_ids = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    assert np.array_equal(np.array([d.embedding for d in by_ids.data], np.float32), want_tokens)
    assert np.allclose(want_tokens, want, atol=1e-6)  # the tokenizer's ids embed as the texts do
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))
    single_row = client.embeddings.create(model="minilm", input=ids[0], encoding_format="float")
    assert np.array_equal(np.float32(single_row.data[0].embedding), want_one_ids[0])
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["minilm", "clip"]
    assert client.models.retrieve("clip").id == "clip"
    not_normalized = client.embeddings.create(model="minilm", input=TEXTS[:1], extra_body={"normalize": False})
    assert abs(np.linalg.norm(not_normalized.data[0].embedding) - 1) > 1e-3


def test_images_as_data_urls_and_plain_base64_equal_flight(real_server):
    photo = (PHOTOS / "coffee.png").read_bytes()
    jpeg = (PHOTOS / "rocket.jpg").read_bytes()
    with EmbeddingClient(f"grpc://127.0.0.1:{real_server.port}", token=TOKEN) as flight_client:
        want_images = flight_client.embed_images([photo, jpeg], model="clip")
        want_text = flight_client.embed_texts(["a rocket"], model="clip")
    client = openai_client(real_server)
    mixed = client.embeddings.create(model="clip", input=[data_url(photo), "a rocket", data_url(jpeg, "image/jpeg")])
    got = np.array([d.embedding for d in mixed.data], np.float32)
    assert np.array_equal(got[[0, 2]], want_images) and np.array_equal(got[1], want_text[0])
    assert mixed.usage.prompt_tokens > 0  # the text's ids; images count none
    plain = client.embeddings.create(model="clip", input=[base64.b64encode(photo).decode(),
                                                          base64.b64encode(jpeg).decode()],
                                     extra_body={"input_type": "image"})  # the same rows in the same batch
    assert np.array_equal(np.array([d.embedding for d in plain.data], np.float32), want_images)
    # input_type "text": a data URL is read as the text it is
    as_text = client.embeddings.create(model="clip", input=[data_url(b"xyz")], extra_body={"input_type": "text"})
    assert len(as_text.data) == 1 and not np.array_equal(np.float32(as_text.data[0].embedding), want_images[0])
    # an image for a text-only model, a broken image: 422 naming the row
    status, doc, _ = post(real_server.http_port, "/v1/embeddings", {"model": "minilm", "input": [data_url(photo)]})
    assert_error(status, doc, 422, "invalid_input", "embeds ['text']", "image")
    status, doc, _ = post(real_server.http_port, "/v1/embeddings",
                          {"model": "clip", "input": ["fine", data_url(b"not a png at all")]})
    error = assert_error(status, doc, 422, "invalid_input", "input[1]")
    assert [r["index"] for r in error["rows"]] == [1]


def test_openai_client_errors_are_its_own_exceptions(real_server):
    with pytest.raises(openai.AuthenticationError):
        openai_client(real_server, token="wrong").embeddings.create(model="minilm", input="x")
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'"):
        openai_client(real_server).embeddings.create(model="nope", input="x")
    with pytest.raises(openai.UnprocessableEntityError, match="unknown field"):
        openai_client(real_server).embeddings.create(model="minilm", input="x", extra_body={"colour": "red"})


# ---- errors over plain HTTP, on a fake model -------------------------------------------------------------------

@pytest.fixture
def fake_server():
    limits = ServerLimits(max_batch_bytes=4096, max_batch_rows=4)
    with EmbeddingServer({"fake": FakeModel("fake", modalities=("text",))},
                         ServerConfig(port=0, http_port=0, auth_token=TOKEN, limits=limits, metrics_port=0)) as server:
        yield server


def test_every_bad_request_gets_the_status_and_error_body_a_client_expects(fake_server):
    port = fake_server.http_port
    status, doc, headers = post(port, "/v1/embeddings", {"input": "x"}, token=None)
    assert_error(status, doc, 401, "invalid_api_key", "needs a token")
    assert headers["www-authenticate"] == "Bearer"
    assert_error(*post(port, "/v1/embeddings", {"input": "x"}, token="nope")[:2], 401, "invalid_api_key", "not valid")
    assert_error(*get(port, "/v1/models", token=None)[:2], 401, "invalid_api_key")
    assert_error(*post(port, "/v1/embeddings", b"{not json")[:2], 422, "invalid_json", "not JSON")
    assert_error(*post(port, "/v1/embeddings", b"\xff\xfe\x00")[:2], 422, "invalid_json")
    assert_error(*post(port, "/v1/embeddings", b"[" * 100_000 + b"]" * 100_000)[:2], 413, "limit_exceeded")
    assert_error(*post(port, "/v1/embeddings", b"[" * 2000 + b"]" * 2000)[:2], 422, "invalid_json", "too deeply")
    assert_error(*post(port, "/v1/embeddings", {"input": "x" * 5000})[:2], 413, "limit_exceeded", "4096 bytes")
    assert_error(*post(port, "/v1/embeddings", {"input": ["a"] * 5})[:2], 413, "limit_exceeded", "5 rows", "4 rows")
    error = assert_error(*post(port, "/v1/embeddings", {"model": "gpt-4", "input": "x"})[:2], 404, "model_not_found",
                         "'gpt-4'", "['fake']")
    assert error["param"] == "model"
    cases = [
        ([1, 2], "got an array", None),
        ({"input": []}, "empty list", "input"),
        ({"input": ""}, "input[0] is an empty string", "input"),
        ({"input": ["a", ""]}, "input[1] is an empty string", "input"),
        ({"input": 5}, "got a number", "input"),
        ({"input": None}, "got null", "input"),
        ({"model": "fake"}, 'no "input"', "input"),
        ({"input": ["a", 1]}, "input[1] is 1", "input"),
        ({"input": [1, "a"]}, "input[1] is 'a'", "input"),
        ({"input": [1, True]}, "input[1] is True", "input"),
        ({"input": [[1, 2], [3, "x"]]}, "input[1][1] is 'x'", "input"),
        ({"input": [[1], []]}, "input[1] is []", "input"),
        ({"input": [{"text": "a"}]}, "input[0] is {'text': 'a'}", "input"),
        ({"input": "x", "model": 7}, '"model" must be', "model"),
        ({"input": "x", "encoding_format": "hex"}, "['float', 'base64']", "encoding_format"),
        ({"input": "x", "normalize": "yes"}, '"normalize" must be true or false', "normalize"),
        ({"input": "x", "input_type": "audio"}, "['auto', 'text', 'image']", "input_type"),
        ({"input": "x", "dimensions": 0}, '"dimensions" must be a positive integer', "dimensions"),
        ({"input": "x", "max_tokens": 4}, "unknown field(s) ['max_tokens']", "max_tokens"),
        ({"input": "x", "user": 5}, '"user" must be a string', "user"),
        ({"input": ["aGVsbG8=!"], "input_type": "image"}, "input[0] is not valid base64", "input"),
        ({"input": [[2 ** 70]]}, "outside the 64-bit integer range", "input"),
        ({"input": ["fine", "\ud800"]}, "input[1] holds a lone surrogate", "input"),
        ({"input": [[1]], "prompt_name": "query"}, '"prompt_name" applies to', "prompt_name"),
    ]
    for body, words, param in cases:
        status, doc, _ = post(port, "/v1/embeddings", body)
        error = assert_error(status, doc, 422, doc.get("error", {}).get("code", "?"), words)
        assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
    # one row the model cannot embed fails the request, naming the row
    error = assert_error(*post(port, "/v1/embeddings", {"input": ["fine", "bad row", "also fine", "bad too"]})[:2],
                         422, "invalid_input", "2 row(s)", "input[1]: cannot embed", "input[3]")
    assert [r["index"] for r in error["rows"]] == [1, 3]
    # no such endpoint, wrong method: the same error shape
    assert_error(*get(port, "/v1/nothing")[:2], 404, "not_found", "POST /v1/embeddings")
    assert_error(*get(port, "/v1/embeddings")[:2], 405, "invalid_request", "GET is not allowed")
    assert_error(*get(port, "/v1/models/gpt-4")[:2], 404, "model_not_found")
    # and the good request after all that
    status, doc, _ = post(port, "/v1/embeddings", {"input": ["ok", "fine"], "model": "fake"})
    assert status == 200 and np.allclose(doc["data"][1]["embedding"], expected_embedding("fine"))
    stats = fake_server.stats.snapshot()
    assert stats["rejected_auth"] == 3 and stats["active_exchanges"] == 0


def test_base64_is_little_endian_float32_and_health_ready_models(fake_server):
    port = fake_server.http_port
    status, doc, _ = post(port, "/v1/embeddings", {"input": ["one", "two"], "encoding_format": "base64"})
    assert status == 200 and doc["object"] == "list" and doc["model"] == "fake"
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in doc["data"]])
    assert np.array_equal(got, np.stack([expected_embedding("one"), expected_embedding("two")]))
    assert doc["usage"] == {"prompt_tokens": 0, "total_tokens": 0}  # the fake has no tokenizer to count with
    status, doc, _ = get(port, "/health")
    assert status == 200 and doc["status"] == "ok" and doc["uptime_s"] >= 0
    status, doc, _ = get(port, "/ready")
    assert status == 503 and doc["ready"] is False and doc["reason"] == "warming up"  # as the Flight action says
    fake_server.warm_up()
    status, doc, _ = get(port, "/ready")
    with flight.connect(f"grpc://127.0.0.1:{fake_server.port}") as client:
        options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())])
        action = json.loads(next(iter(client.do_action(flight.Action("ready", b""), options))).body.to_pybytes())
    assert status == 200 and doc == action and doc["ready"] is True
    status, doc, _ = get(port, "/v1/models")
    assert status == 200 and doc["data"][0]["id"] == "fake" and doc["data"][0]["metadata"]["dimension"] == 8


def test_metrics_count_each_protocol(fake_server):
    from test_flight_metrics import scrape

    post(fake_server.http_port, "/v1/embeddings", {"input": ["a", "b", "bad"]})
    post(fake_server.http_port, "/v1/embeddings", {"input": ["a", "b"]})
    post(fake_server.http_port, "/v1/embeddings", {"input": "a"}, token="wrong")
    with EmbeddingClient(f"grpc://127.0.0.1:{fake_server.port}", token=TOKEN) as client:
        client.embed_texts(["c"])
    got = scrape(fake_server.metrics_port)
    http = (("input", "text"), ("model", "fake"))
    assert got[("arrowengine_requests_total", http + (("outcome", "ok"), ("protocol", "http")))] == 1
    assert got[("arrowengine_requests_total", http + (("outcome", "failed"), ("protocol", "http")))] == 1
    assert got[("arrowengine_requests_total", http + (("outcome", "ok"), ("protocol", "flight")))] == 1
    assert got[("arrowengine_rows_total", http + (("protocol", "http"),))] == 5
    assert got[("arrowengine_row_errors_total", http + (("protocol", "http"),))] == 1
    assert got[("arrowengine_rows_total", http + (("protocol", "flight"),))] == 1
    assert got[("arrowengine_rejected_total", (("protocol", "http"), ("reason", "auth")))] == 1


# ---- shared limits, shared batches, drain and shutdown ---------------------------------------------------------

def test_slots_are_shared_busy_is_429_and_draining_is_503():
    before = set(threading.enumerate())
    gate = threading.Event()
    fake = FakeModel("fake", gate=gate, free_calls=1)  # the warm-up's call is free
    server = EmbeddingServer({"fake": fake}, ServerConfig(port=0, http_port=0,
                                                          limits=ServerLimits(max_concurrent_exchanges=1)))
    server.warm_up()
    results: list = []
    first = threading.Thread(target=lambda: results.append(post(server.http_port, "/v1/embeddings",
                                                                {"input": ["slow"]}, token=None)))
    first.start()
    wait_until(lambda: fake.entered == 2, "the first request to reach the model")
    status, doc, headers = post(server.http_port, "/v1/embeddings", {"input": ["x"]}, token=None)
    assert_error(status, doc, 429, "busy", "1 requests already running")
    assert headers["retry-after"] == "1"
    with EmbeddingClient(f"grpc://127.0.0.1:{server.port}", retries=0) as client:
        with pytest.raises(flight.FlightUnavailableError, match="server busy"):
            client.embed_texts(["y"])  # the HTTP request holds the one slot Flight would need
    assert get(server.http_port, "/ready", token=None)[1]["reason"] == "saturated: 1 of 1 exchange slots in use"
    drained = threading.Thread(target=server.drain, args=(30,))
    drained.start()
    wait_until(lambda: server.draining, "the drain to start")
    assert_error(*post(server.http_port, "/v1/embeddings", {"input": ["z"]}, token=None)[:2], 503, "shutting_down")
    gate.set()  # the running request finishes within the grace period
    first.join(60)
    drained.join(60)
    assert results[0][0] == 200 and len(results[0][1]["data"]) == 1
    server.shutdown()
    wait_until(lambda: not server_threads(before), "the server's threads to end")
    with pytest.raises(OSError):
        get(server.http_port, "/health", token=None)


def test_http_and_flight_rows_share_one_device_batch(minilm_model_dir):
    import engine
    from engine.scheduler import Scheduler

    gate = threading.Event()
    batches: list[int] = []
    model = Gated(engine.load_model(minilm_model_dir), gate)
    sched = Scheduler(model, on_batch=lambda queue, rows, seconds: batches.append(rows))
    server = EmbeddingServer({"minilm": sched}, ServerConfig(port=0, http_port=0))
    try:
        blocker = threading.Thread(target=sched.embed_texts, args=(["holds the device"],))
        blocker.start()
        wait_until(lambda: model.entered == 1, "the blocker to reach the device")
        got: dict = {}

        texts = ["a photo of a cat", "a photo of a dog", "a photo of a cow", "a photo of a pig"]  # one length

        def via_flight() -> None:
            with EmbeddingClient(f"grpc://127.0.0.1:{server.port}") as client:
                got["flight"] = client.embed_texts(texts[:2])

        def via_http() -> None:
            got["http"] = post(server.http_port, "/v1/embeddings", {"input": texts[2:]}, token=None)

        threads = [threading.Thread(target=via_flight), threading.Thread(target=via_http)]
        for t in threads:
            t.start()
        wait_until(lambda: sched.queue_depth()["text"] == 4, "2 Flight rows and 2 HTTP rows to queue")
        gate.set()
        for t in threads + [blocker]:
            t.join(60)
        assert batches == [1, 4], batches  # the blocker's row, then one device batch of both protocols' rows
        direct = model.embed_texts(texts)
        status, doc, _ = got["http"]
        assert status == 200
        http_vecs = np.array([d["embedding"] for d in doc["data"]], np.float32)
        np.testing.assert_allclose(np.concatenate([got["flight"], http_vecs]), direct.embeddings, atol=1e-5)
    finally:
        gate.set()
        server.shutdown()
        sched.close()


def test_a_request_still_queued_when_the_grace_period_ends_gets_503(minilm_model_dir):
    import engine
    from engine.scheduler import Scheduler

    gate = threading.Event()
    model = Gated(engine.load_model(minilm_model_dir), gate)
    sched = Scheduler(model)
    server = EmbeddingServer({"minilm": sched}, ServerConfig(port=0, http_port=0))
    try:
        blocker = threading.Thread(target=sched.embed_texts, args=(["holds the device"],))
        blocker.start()
        wait_until(lambda: model.entered == 1, "the blocker to reach the device")
        result: list = []
        request = threading.Thread(target=lambda: result.append(
            post(server.http_port, "/v1/embeddings", {"input": ["queued"]}, token=None)))
        request.start()
        wait_until(lambda: sched.queue_depth()["text"] == 1, "the HTTP row to queue")
        drained = threading.Thread(target=server.drain, args=(0.2,))
        drained.start()
        wait_until(lambda: server.aborting, "the grace period to run out")
        gate.set()
        request.join(60)
        drained.join(60)
        assert_error(*result[0][:2], 503, "shutting_down", "send the request again")
    finally:
        gate.set()
        server.shutdown()
        sched.close()


def test_a_client_that_disconnects_drops_its_queued_rows(minilm_model_dir):
    import socket

    import engine
    from engine.scheduler import Scheduler

    gate = threading.Event()
    model = Gated(engine.load_model(minilm_model_dir), gate)
    sched = Scheduler(model)
    seen: list = []  # each caller's cancelled(): the server's own view of its request
    submit = sched.submit

    def spy(kind, values, normalize=True, cancelled=None, prompt_name=None, **options):
        seen.append(cancelled)
        return submit(kind, values, normalize, cancelled, prompt_name, **options)

    sched.submit = spy
    server = EmbeddingServer({"minilm": sched}, ServerConfig(port=0, http_port=0))
    try:
        blocker = threading.Thread(target=sched.embed_texts, args=(["holds the device"],))
        blocker.start()
        wait_until(lambda: model.entered == 1, "the blocker to reach the device")
        body = json.dumps({"input": ["dropped"]}).encode()
        with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: sched.queue_depth()["text"] == 1, "the HTTP row to queue")
        wait_until(lambda: seen[1](), "the server to see the disconnect")
        gate.set()
        blocker.join(60)
        wait_until(lambda: server.stats.snapshot()["requests_cancelled"] == 1, "the request to end as cancelled")
        assert model.entered == 1  # the dropped row never ran
        assert server.stats.snapshot()["active_exchanges"] == 0
    finally:
        gate.set()
        server.shutdown()
        sched.close()


def test_tls_and_token_as_flight(tmp_path):
    import ssl

    cert, key = make_self_signed_cert(tmp_path)
    config = ServerConfig(port=0, http_port=0, tls_cert=cert, tls_key=key, auth_token=TOKEN)
    with EmbeddingServer({"fake": FakeModel()}, config) as server:
        context = ssl.create_default_context(cafile=str(cert))
        request = urllib.request.Request(f"https://localhost:{server.http_port}/v1/embeddings",
                                         data=json.dumps({"input": "tls"}).encode(),
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, context=context, timeout=30) as resp:
            doc = json.loads(resp.read())
        assert np.allclose(doc["data"][0]["embedding"], expected_embedding("tls"))
        with pytest.raises(OSError):  # plaintext HTTP on the TLS port fails
            urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/health", timeout=10).read()


def test_a_taken_port_fails_the_server_and_leaves_nothing_running():
    import socket

    before = set(threading.enumerate())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(OSError):
            EmbeddingServer({"fake": FakeModel()}, ServerConfig(port=0, http_port=taken.getsockname()[1]))
    assert not server_threads(before)


# ---- the request parser, fuzzed ----------------------------------------------------------------------------------

def test_the_request_parser_raises_only_api_errors():
    """Any body: an EmbeddingsRequest whose engine calls cover every row once, or an ApiError (422/413), never
    another exception. Derandomized and bounded, as tests/test_fuzz.py."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from flight_server import openai_api

    leaf = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=12)
            | st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "data:image/x;base64,!!", "aGk=", ""]))
    value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)
    keys = st.sampled_from(openai_api.REQUEST_KEYS) | st.text(max_size=6)
    body = (st.dictionaries(keys, value, max_size=5).map(lambda d: json.dumps(d).encode())
            | st.binary(max_size=200)
            | st.lists(st.lists(st.integers(-5, 2 ** 64), max_size=5), max_size=5).map(
                lambda rows: json.dumps({"input": rows}).encode()))

    @settings(max_examples=400, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body)
    def check(raw: bytes) -> None:
        try:
            request = openai_api.parse_embeddings_request(raw, max_rows=8)
            calls = openai_api.engine_calls(request)
        except openai_api.ApiError as exc:
            assert exc.status in (413, 422) and json.loads(exc.body())["error"]["message"]
            return
        covered = np.sort(np.concatenate([c.index for c in calls]))
        assert np.array_equal(covered, np.arange(len(request.rows)))
        assert all(len(c.values) == len(c.index) for c in calls)

    check()


def test_serve_says_which_extra_the_http_api_needs(monkeypatch, caplog):
    import importlib.util
    import logging

    from flight_server import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    caplog.set_level(logging.ERROR)
    assert serve.main(["--http-port", "0", "--model", "m=/nowhere"]) == 2
    assert 'arrowengine serve --http-port needs uvicorn: pip install "arrowengine[http]"' in caplog.text
    assert serve.config_from_args(_parse(["--http-port", "8080"])).http_port == 8080
    assert serve.config_from_args(_parse([])).http_port is None
    with pytest.raises(ValueError, match="HTTP port must be in 0..65535"):
        serve.config_from_args(_parse(["--http-port", "70000"]))


def _parse(argv):
    import argparse

    from flight_server import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv)


def test_float_json_is_exact_with_and_without_orjson(monkeypatch):
    from flight_server import openai_api

    vecs = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32) / 7
    vecs[0, 0], vecs[1, 1] = np.float32(1e-38), np.float32(-0.0)
    bodies = [openai_api.embeddings_response("m", vecs, 5, "float")]
    assert openai_api.orjson is not None  # the http extra (and so the test extra) installs it
    monkeypatch.setattr(openai_api, "orjson", None)
    bodies.append(openai_api.embeddings_response("m", vecs, 5, "float"))
    for body in bodies:
        doc = json.loads(body)
        assert doc["usage"] == {"prompt_tokens": 5, "total_tokens": 5} and doc["object"] == "list"
        got = np.array([d["embedding"] for d in doc["data"]], np.float32)
        assert np.array_equal(got.view(np.uint32), vecs.view(np.uint32))  # bit for bit, -0.0 included
    assert len(bodies[0]) < len(bodies[1])  # orjson writes the shortest float32 decimals


def test_dimensions_truncate_as_the_flight_path_does(real_server):
    """OpenAI's ``dimensions``: the first K components, normalized again, equal to the Flight command's; a K the
    model cannot give or a value that is no positive integer is a 422 naming the field."""
    client = openai_client(real_server)
    with EmbeddingClient(f"grpc://127.0.0.1:{real_server.port}", token=TOKEN) as flight_client:
        want = flight_client.embed_texts(TEXTS, model="minilm", dimensions=96)
    got = client.embeddings.create(model="minilm", input=TEXTS, dimensions=96, encoding_format="float")
    values = np.array([d.embedding for d in got.data], np.float32)
    assert values.shape == (len(TEXTS), 96)
    np.testing.assert_allclose(values, want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-5)
    for bad in (0, -3, 1.5, True, "96", 385):
        status, doc, _ = post(real_server.http_port, "/v1/embeddings",
                              {"model": "minilm", "input": TEXTS[:1], "dimensions": bad})
        assert status == 422 and "dimensions" in doc["error"]["message"], (bad, status, doc)
