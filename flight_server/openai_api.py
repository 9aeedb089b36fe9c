"""The OpenAI-compatible embeddings API as data: a JSON request -> engine calls -> a JSON response, and errors.

No HTTP here (:mod:`flight_server.http_server` serves it) and no torch. One request becomes one
:class:`EngineCall` per input kind (texts, token ids, images), each an ``EmbedCommand`` of the Flight protocol
and one Arrow column of rows, so the HTTP front runs exactly what a Flight exchange of the same rows runs.
:func:`engine_calls` is the one place where request options become command options.

Request (``POST /v1/embeddings``; OpenAI's keys, then ours)::

    {"model": "minilm",                 # a served name (omitted or null: the server's default model)
     "input": "a text" | ["texts", ...] | [token ids] | [[token ids], ...],
     "encoding_format": "float",        # or "base64": little-endian float32 bytes, base64-encoded
     "user": "...",                     # accepted, ignored
     "input_type": "auto",              # extension: "auto" | "text" | "image" (how strings are read)
     "normalize": true,                 # extension: L2-normalize (default true)
     "prompt_name": "query"}            # extension: one of the model's prompts, for texts

Strings are texts, except (``input_type`` ``auto``) a string that starts with ``data:image/<type>;base64,``,
which is an image; ``input_type: "image"`` reads every string as an image, a data URL or plain base64, and
``input_type: "text"`` every string as a text. Response: OpenAI's ``{"object": "list", "data": [{"object":
"embedding", "index": i, "embedding": [...] | "base64"}], "model", "usage": {"prompt_tokens",
"total_tokens"}}``, usage counting the token ids the model ran (special tokens and prompt included; images
count 0). A row the engine cannot embed fails the whole request (422, naming each failed row): OpenAI's
response has no place for a per-row error.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}`` (:class:`ApiError`).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from flight_server import protocol

try:  # the http extra installs it; the float encoding falls back to the json module without it
    import orjson
except ImportError:  # pragma: no cover - exercised by tests/test_http_api.py with orjson hidden
    orjson = None

REQUEST_KEYS: tuple[str, ...] = ("model", "input", "encoding_format", "user", "input_type", "normalize",
                                 "prompt_name", "dimensions")
ENCODINGS: tuple[str, ...] = ("float", "base64")
INPUT_TYPES: tuple[str, ...] = ("auto", "text", "image")
DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,")  # at the start of a string: an image
MAX_LISTED_ROWS = 10  # failed rows a 422 names in its message (all of them are in its "rows")

# OpenAI's error types (the "type" of the error body).
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable"


class ApiError(Exception):
    """A request the server answers with an HTTP error status and OpenAI's error body."""

    def __init__(self, status: int, message: str, code: str, type: str = INVALID_REQUEST,
                 param: str | None = None, rows: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = protocol.cut_message(message)
        self.code = code
        self.type = type
        self.param = param
        self.rows = list(rows) if rows else None

    def body(self) -> bytes:
        """``{"error": {"message", "type", "param", "code"}}`` (plus ``rows``: every failed row)."""
        error: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param,
                                 "code": self.code}
        if self.rows is not None:
            error["rows"] = self.rows
        return json.dumps({"error": error}).encode("utf-8")


def invalid(message: str, param: str | None = "input", code: str = "invalid_input") -> ApiError:
    """422: the request is well-formed HTTP but not a valid embeddings request."""
    return ApiError(422, message, code, param=param)


def optional_name(doc: dict[str, Any], key: str) -> str | None:
    """``doc[key]``: absent / null, or a non-empty string (a prompt name); else a 422 naming the key."""
    value = doc.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise invalid(f'"{key}" must be a non-empty string; got {protocol.quote(value)}', param=key)
    return value


def optional_positive_int(doc: dict[str, Any], key: str, meaning: str) -> int | None:
    """``doc[key]``: absent / null, or an integer >= 1 (not a bool); else a 422 naming the key and ``meaning``."""
    value = doc.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise invalid(f'"{key}" must be a positive integer ({meaning}); got {protocol.quote(value)}', param=key)
    return value


def from_protocol_error(exc: Exception) -> ApiError:
    """The ApiError of a Flight-protocol or engine input error (unknown model, wrong modality, limit)."""
    message = str(exc)
    if isinstance(exc, protocol.UnknownModelError):
        return ApiError(404, message, "model_not_found", param="model")
    if isinstance(exc, protocol.LimitExceededError):
        return ApiError(413, message, "limit_exceeded")
    return invalid(message, param=None)


@dataclass(frozen=True)
class EmbeddingsRequest:
    """A parsed ``POST /v1/embeddings`` body; build with :func:`parse_embeddings_request`."""

    model: str | None                    # None: the server's default model
    kinds: tuple[str, ...]               # per row: "text" | "tokens" | "image"
    rows: tuple[Any, ...]                # per row: str (text), list[int] (token ids), bytes (an encoded image)
    encoding_format: str = "float"
    normalize: bool = True
    prompt_name: str | None = None
    dimensions: int | None = None        # Matryoshka truncation (the Flight command's "dimensions")


@dataclass(frozen=True)
class EngineCall:
    """The rows of one input kind: what a Flight exchange with ``command`` would send in one batch."""

    command: protocol.EmbedCommand
    index: np.ndarray                    # (K,) int64: positions of these rows in the request's input
    values: pa.Array | tuple[pa.Array, ...]  # the K rows, in the Arrow type the Flight protocol takes for the
                                             # kind; pairs: (queries, documents)


def json_object(body: bytes | bytearray, keys: Sequence[str], example: str, endpoint: str) -> dict[str, Any]:
    """A request body parsed as a JSON object of no other keys than ``keys``; raises :class:`ApiError` (422)
    whose message shows ``example`` (a valid body) and names ``endpoint``."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError; also an integer of over 4,300 digits
        raise invalid(f"the body is not JSON ({protocol.cut_message(str(exc), 200)}); send a JSON object like "
                      f"{example} with Content-Type: application/json", param=None, code="invalid_json") from None
    except RecursionError:
        raise invalid(f"the body nests JSON too deeply; expected an object like {example}", param=None,
                      code="invalid_json") from None
    if not isinstance(doc, dict):
        raise invalid(f"the body must be a JSON object; got {json_type(doc)}", param=None)
    unknown = sorted(set(doc) - set(keys))
    if unknown:
        raise invalid(f"unknown field(s) {protocol.quote(unknown)}; {endpoint} takes {list(keys)}",
                      param=unknown[0], code="unknown_parameter")
    return doc


def parse_embeddings_request(body: bytes | bytearray, max_rows: int) -> EmbeddingsRequest:
    """Parse and check an embeddings request body; raises :class:`ApiError` (422, or 413 over ``max_rows``)."""
    doc = json_object(body, REQUEST_KEYS, '{"model": "NAME", "input": ["a text"]}', "POST /v1/embeddings")
    model = doc.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise invalid(f'"model" must be a served model\'s name (GET /v1/models lists them); got '
                      f"{protocol.quote(model)}", param="model")
    encoding = doc.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise invalid(f'"encoding_format" must be one of {list(ENCODINGS)}; got {protocol.quote(encoding)}',
                      param="encoding_format")
    input_type = doc.get("input_type") or "auto"
    if input_type not in INPUT_TYPES:
        raise invalid(f'"input_type" must be one of {list(INPUT_TYPES)}; got {protocol.quote(input_type)}',
                      param="input_type")
    normalize = doc.get("normalize", True)
    if not isinstance(normalize, bool):
        raise invalid(f'"normalize" must be true or false; got {protocol.quote(normalize)}', param="normalize")
    prompt_name = optional_name(doc, "prompt_name")
    dimensions = optional_positive_int(doc, "dimensions", "how many leading components to keep, at most the "
                                                          "model's dimension")
    user = doc.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid(f'"user" must be a string; got {protocol.quote(user)}', param="user")
    if "input" not in doc:
        raise invalid('the request has no "input"; give a string, a list of strings, a list of token ids or a '
                      "list of lists of token ids")
    rows, token_rows = _input_rows(doc["input"])
    if len(rows) > max_rows:
        raise ApiError(413, f'"input" has {len(rows)} rows; the limit is {max_rows} rows per request '
                            "(serve --max-batch-rows): send fewer per request", "limit_exceeded", param="input")
    if token_rows:
        kinds = ("tokens",) * len(rows)
    else:
        kinds, rows = _read_strings(rows, input_type)
    return EmbeddingsRequest(model=model, kinds=kinds, rows=tuple(rows), encoding_format=encoding,
                             normalize=normalize, prompt_name=prompt_name, dimensions=dimensions)


_INPUT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def json_type(value: Any) -> str:
    """What a parsed JSON value was, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "a number", float: "a number", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _input_rows(value: Any) -> tuple[list, bool]:
    """The rows of ``input`` and whether they are token-id rows."""
    if isinstance(value, str):
        return [value], False
    if not isinstance(value, list):
        raise invalid(f'"input" must be {_INPUT_SHAPES}; got {json_type(value)}')
    if not value:
        raise invalid('"input" is an empty list; give at least one row')
    first = value[0]
    if isinstance(first, str):
        odd = next((i for i, v in enumerate(value) if not isinstance(v, str)), None)
        if odd is not None:
            raise invalid(f'"input" is a list of strings but input[{odd}] is {protocol.quote(value[odd])}; '
                          "every row must be a string")
        return value, False
    if _is_id(first):
        odd = next((i for i, v in enumerate(value) if not _is_id(v)), None)
        if odd is not None:
            raise invalid(f'"input" is a list of token ids but input[{odd}] is {protocol.quote(value[odd])}; '
                          "token ids are integers (for several rows give a list of lists)")
        return [value], True
    if isinstance(first, list):
        for i, row in enumerate(value):
            if not isinstance(row, list) or not row:
                raise invalid(f'"input" is a list of token-id lists but input[{i}] is {protocol.quote(row)}; every '
                              "row must be a non-empty list of integers")
            odd = next((j for j, v in enumerate(row) if not _is_id(v)), None)
            if odd is not None:
                raise invalid(f"input[{i}][{odd}] is {protocol.quote(row[odd])}; token ids are integers")
        return value, True
    raise invalid(f'"input" must be {_INPUT_SHAPES}; input[0] is {protocol.quote(first)}')


def _read_strings(rows: list[str], input_type: str) -> tuple[tuple[str, ...], list]:
    """Each string as a text, or (a data URL or, with ``input_type`` image, plain base64) an image's bytes."""
    kinds: list[str] = []
    out: list = []
    for i, row in enumerate(rows):
        url = DATA_URL.match(row) if input_type != "text" else None
        if url is None and input_type != "image":
            if not row:
                raise invalid(f"input[{i}] is an empty string; every text needs at least one character")
            kinds.append("text")
            out.append(row)
            continue
        payload = row[url.end():] if url is not None else row
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(f"input[{i}] is not valid base64 after {'its data: URL prefix' if url else 'all'} "
                          f"(got {protocol.quote(row)}); an image is 'data:image/<type>;base64,<base64 of the "
                          "file>', or plain base64 with \"input_type\": \"image\"") from None
        if not data:
            raise invalid(f"input[{i}] is an empty image")
        kinds.append("image")
        out.append(data)
    return tuple(kinds), out


def engine_calls(request: EmbeddingsRequest) -> list[EngineCall]:
    """One EngineCall per input kind in the request, rows in request order within each: the one place where a
    request's options become Flight command options. Raises :class:`ApiError` (422)."""
    calls = []
    kinds = np.array(request.kinds)
    for kind in ("text", "tokens", "image"):
        index = np.flatnonzero(kinds == kind).astype(np.int64)
        if not len(index):
            continue
        rows = [request.rows[i] for i in index]
        try:
            command = protocol.EmbedCommand.create(
                kind, model=request.model, normalize=request.normalize,
                prompt_name=request.prompt_name if kind == "text" else None, dimensions=request.dimensions)
        except protocol.ProtocolError as exc:
            raise from_protocol_error(exc) from None
        if request.prompt_name is not None and kind != "text":
            raise invalid(f'"prompt_name" applies to texts; this request has {kind} rows (input[{index[0]}])',
                          param="prompt_name")
        calls.append(EngineCall(command, index, _column(kind, rows, index)))
    return calls


def _column(kind: str, rows: list, index: np.ndarray) -> pa.Array:
    if kind == "text":
        try:
            return pa.array(rows, type=pa.string() if sum(map(len, rows)) < 2 ** 30 else pa.large_string())
        except UnicodeEncodeError:  # JSON allows "\ud800" alone, which is no character
            bad = next(j for j, row in enumerate(rows) if not _is_unicode(row))
            raise invalid(f"input[{index[bad]}] holds a lone surrogate escape (such as \\ud800), which is not a "
                          "character; send valid Unicode text") from None
    if kind == "image":
        return pa.array(rows, type=pa.binary() if sum(map(len, rows)) < 2 ** 30 else pa.large_binary())
    try:
        return pa.array(rows, type=pa.list_(pa.int64()))
    except (pa.ArrowInvalid, OverflowError):
        raise invalid("a token id is outside the 64-bit integer range; token ids are the model's vocabulary "
                      "indices") from None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def row_errors(errors: Sequence[tuple[int, str]], field: str = "input", done: str = "embedded") -> ApiError:
    """422 for the rows the engine could not embed (``done``): (index in the request's ``field``, reason) each, in
    request order."""
    listed = "; ".join(f"{field}[{i}]: {reason}" for i, reason in errors[:MAX_LISTED_ROWS])
    more = f"; and {len(errors) - MAX_LISTED_ROWS} more" if len(errors) > MAX_LISTED_ROWS else ""
    return ApiError(422, f"{len(errors)} row(s) could not be {done}, so none was returned: {listed}{more}",
                    "invalid_input", param=field,
                    rows=[{"index": int(i), "error": protocol.cut_message(reason, 500)} for i, reason in errors])


def embeddings_response(model: str, embeddings: np.ndarray, tokens: int, encoding_format: str) -> bytes:
    """OpenAI's embeddings response for (N, D) float32 ``embeddings``, as JSON bytes.

    ``float``: each float32 as a decimal that parses back to the same float32 (with orjson, the shortest such;
    without, the float64 value's shortest, a few digits longer). ``base64``: the row's little-endian float32
    bytes, base64-encoded.
    """
    usage = {"prompt_tokens": int(tokens), "total_tokens": int(tokens)}
    if encoding_format == "base64":
        little = embeddings.astype("<f4", copy=False)
        data: Any = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    elif orjson is not None:  # float32 rows written by orjson itself: ~25x faster than json.dumps
        items = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(embeddings)]
        return orjson.dumps({"object": "list", "data": items, "model": model, "usage": usage},
                            option=orjson.OPT_SERIALIZE_NUMPY)
    else:
        data = embeddings.tolist()
    items = [{"object": "embedding", "index": i, "embedding": vec} for i, vec in enumerate(data)]
    return json.dumps({"object": "list", "data": items, "model": model, "usage": usage},
                      separators=(",", ":")).encode("utf-8")


def models_response(models: Sequence[Mapping[str, Any]], created: int) -> bytes:
    """``GET /v1/models``: OpenAI's model list; each entry also carries our metadata (dimension, ...)."""
    return json.dumps({"object": "list", "data": [model_entry(m, created) for m in models]}).encode("utf-8")


def model_entry(metadata: Mapping[str, Any], created: int) -> dict[str, Any]:
    """One model as OpenAI lists it (``id``, ``object``, ``created``, ``owned_by``), plus ``metadata``: the
    Flight ``models`` action's entry."""
    return {"id": metadata["name"], "object": "model", "created": created, "owned_by": "arrowengine",
            "metadata": dict(metadata)}
