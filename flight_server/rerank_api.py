"""The HTTP reranking API (text-embeddings-inference's ``POST /rerank`` shape) as data: JSON request -> one engine
call -> JSON response.

No HTTP here (:mod:`flight_server.http_server` serves it) and no torch. A request becomes one
:class:`~flight_server.openai_api.EngineCall` of ``pairs`` input (the query repeated beside each text), so it runs
exactly what a Flight exchange of the same pairs runs, coalesced with other callers' pairs.

Request (TEI's keys, then ours)::

    {"query": "what is a panda?",          # the query every text is scored against
     "texts": ["a bear of China", ...],    # the documents, 1 to --max-batch-rows of them
     "raw_scores": false,                  # true: the logits (only for a model whose scores are its logits)
     "return_text": false,                 # true: each result carries its text
     "truncate": true,                     # false: a pair over the model's token limit fails the request
     "truncation_direction": "right",      # the only direction there is
     "model": "reranker",                  # extension: a served reranker's name (default: the server's default)
     "prompt_name": null,                  # extension: one of the model's prompts, put before the query
     "top_n": null}                        # extension: only the best N results

Response: a JSON list, best score first, ``[{"index": i, "score": s}, ...]`` (plus ``"text"`` with
``return_text``), ``index`` being the text's position in ``texts``. The scores are what the Flight path returns for
the same pairs: sentence-transformers' ``CrossEncoder.predict`` of the model (its logit, or the activation its
config names). A pair the engine cannot score fails the request (422, naming each failed text). Errors are the
same JSON as the OpenAI endpoint's (:class:`~flight_server.openai_api.ApiError`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from flight_server import protocol
from flight_server.openai_api import (ApiError, EngineCall, from_protocol_error, invalid, json_object, optional_name,
                                      optional_positive_int)

REQUEST_KEYS: tuple[str, ...] = ("query", "texts", "raw_scores", "return_text", "truncate",
                                 "truncation_direction", "model", "prompt_name", "top_n")


@dataclass(frozen=True)
class RerankRequest:
    """A parsed ``POST /rerank`` body; build with :func:`parse_rerank_request`."""

    query: str
    texts: tuple[str, ...]
    model: str | None = None        # None: the server's default model
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = True
    prompt_name: str | None = None
    top_n: int | None = None        # None: every text


def parse_rerank_request(body: bytes | bytearray, max_rows: int, max_bytes: int) -> RerankRequest:
    """Parse and check a rerank request body; raises :class:`ApiError` (422; 413 over ``max_rows`` texts, or
    when the query beside every text makes over ``max_bytes``)."""
    doc = json_object(body, REQUEST_KEYS, '{"query": "a question", "texts": ["a passage", "another"]}',
                      "POST /rerank")
    query = doc.get("query")
    if not isinstance(query, str) or not query:
        raise invalid(f'"query" must be a non-empty string; got {protocol.quote(query)}', param="query")
    texts = doc.get("texts")
    if not isinstance(texts, list) or not texts:
        raise invalid(f'"texts" must be a non-empty list of strings (the documents to score against the query); '
                      f"got {protocol.quote(texts)}", param="texts")
    odd = next((i for i, t in enumerate(texts) if not isinstance(t, str) or not t), None)
    if odd is not None:
        raise invalid(f"texts[{odd}] is {protocol.quote(texts[odd])}; every text must be a non-empty string",
                      param="texts")
    if len(texts) > max_rows:
        raise ApiError(413, f'"texts" has {len(texts)} rows; the limit is {max_rows} per request '
                            "(serve --max-batch-rows): send fewer per request", "limit_exceeded", param="texts")
    # The query goes beside every text, so the pairs hold it len(texts) times: that must fit the body limit too.
    paired = len(query.encode("utf-8", "surrogatepass")) * len(texts) + sum(len(t) for t in texts)
    if paired > max_bytes:
        raise ApiError(413, f"the query ({len(query)} characters) beside each of the {len(texts)} texts makes "
                            f"{paired} bytes of pairs; the limit is {max_bytes} (serve --max-batch-bytes): send a "
                            "shorter query or fewer texts per request", "limit_exceeded", param="query")
    flags = {}
    for key, default in (("raw_scores", False), ("return_text", False), ("truncate", True)):
        value = doc.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, bool):
            raise invalid(f'"{key}" must be true or false; got {protocol.quote(value)}', param=key)
        flags[key] = value
    direction = doc.get("truncation_direction") or "right"
    if direction not in ("right", "Right"):
        raise invalid(f'"truncation_direction" must be "right" (texts are cut at their end); got '
                      f"{protocol.quote(direction)}", param="truncation_direction")
    model = doc.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise invalid(f'"model" must be a served reranker\'s name (GET /v1/models lists them); got '
                      f"{protocol.quote(model)}", param="model")
    prompt_name = optional_name(doc, "prompt_name")
    top_n = optional_positive_int(doc, "top_n", "how many of the best results to return")
    return RerankRequest(query=query, texts=tuple(texts), model=model, prompt_name=prompt_name, top_n=top_n,
                         **flags)


def engine_call(request: RerankRequest) -> EngineCall:
    """The request as one ``pairs`` engine call: (the query, text i) for every i. Raises :class:`ApiError`."""
    try:
        command = protocol.EmbedCommand.create(protocol.PAIRS, model=request.model, prompt_name=request.prompt_name,
                                               truncate=request.truncate)
    except protocol.ProtocolError as exc:
        raise from_protocol_error(exc) from None
    n = len(request.texts)
    try:
        queries = pa.array([request.query] * n, type=pa.string())  # within max_batch_bytes (checked on parse)
        documents = pa.array(request.texts, type=pa.string())
    except UnicodeEncodeError:  # JSON allows "\ud800" alone, which is no character
        raise invalid("the query or a text holds a lone surrogate escape (such as \\ud800), which is not a "
                      "character; send valid Unicode text", param="texts") from None
    return EngineCall(command, np.arange(n, dtype=np.int64), (queries, documents))


def check_scores(raw_scores: bool, activation: str | None, labels: int, name: str) -> None:
    """Refuse (422) what a model cannot answer: more than one score per pair, or raw scores of a model whose
    scores pass through an activation."""
    if labels != 1:
        raise invalid(f"model {name!r} gives {labels} scores per pair; POST /rerank ranks by one score: use the "
                      'Flight "pairs" input, which returns them all', param="model")
    if raw_scores and activation not in (None, "Identity"):
        raise invalid(f"model {name!r} scores pairs with the {activation} of its logit (its configuration says "
                      'so), and the logit itself is not kept; send "raw_scores": false', param="raw_scores")


def rerank_response(request: RerankRequest, scores: np.ndarray) -> bytes:
    """The response: ``[{"index", "score"[, "text"]}]``, best first (ties in text order), ``top_n`` of them."""
    order = np.argsort(-scores, kind="stable")
    if request.top_n is not None:
        order = order[:request.top_n]
    results: list[dict[str, Any]] = []
    for i in order.tolist():
        item: dict[str, Any] = {"index": i, "score": float(scores[i])}
        if request.return_text:
            item["text"] = request.texts[i]
        results.append(item)
    return json.dumps(results, ensure_ascii=False).encode("utf-8")
