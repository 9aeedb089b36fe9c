"""The ArrowEngine wire protocol, in one place: server and client both import it.

Only ``pyarrow`` at import (no torch, no engine) so that :mod:`flight_client` stays light; the output options
are checked and applied by :mod:`engine.output` (numpy only), imported when a command or an output uses them.

Embedding call: ``do_exchange`` with ``FlightDescriptor.for_command(<UTF-8 JSON>)``::

    {"model": "all-MiniLM-L6-v2",   # optional: omitted or null = the server's default model
     "input": "text",               # "image" | "text" | "tokens" | "pairs"
     "column": "text",              # optional: default "image" / "text" / "input_ids"
     "normalize": true,             # optional: L2-normalize the embeddings (default true)
     "passthrough": ["id"],         # optional: input columns copied to the output (default [])
     "prompt_name": "query",        # optional, text or pairs input: one of the model's prompts (default: its default)
     "dimensions": 256,             # optional: keep the first K components (default: all D)
     "output_dtype": "int8",        # optional: float32 (default), float16, int8, uint8, binary, ubinary
     "truncate": false}             # optional, text/tokens/pairs: false = a row over the token limit is a row error

Input batches (any number, any size) carry ``column`` with one of the accepted types:

    image  -> binary | large_binary            (encoded image file bytes)
    text   -> string | large_string (or a dictionary of either)
    tokens -> list | large_list of int32 | int64 (token ids, special tokens included)

For every input batch the server sends one output batch with the same rows in the same
order (:func:`output_schema`): the passthrough columns, ``embedding:
fixed_size_list<float32>[D]`` (null where the row failed; its type follows ``dimensions`` and
``output_dtype``, see :func:`output_fields`), for int8 / uint8 ``embedding_scale`` (and uint8
``embedding_offset``) float32, and ``error: string`` (null where the row succeeded). A request-level
fault fails the whole call with a Flight error; a row-level fault only fills that row's ``error``.

Reranking (a cross-encoder model): ``"input": "pairs"`` reads two string columns, ``"query_column"`` (default
``query``) and ``"document_column"`` (default ``document``), instead of ``column``, and scores each row's pair;
the output (:func:`score_schema`) holds the passthrough columns, ``score: float32`` (``fixed_size_list<float32>[L]``
for a model of L > 1 labels; null where the row failed) and ``error``. Scores are not embeddings: ``dimensions``
and ``output_dtype`` are refused for pairs; ``truncate`` false makes a pair over the token limit a row error
(else it is cut as HF's ``longest_first`` cuts it).

Discovery: ``list_flights`` gives one FlightInfo per model (descriptor
``for_path(<model name>)``, schema = ``output_schema(D)``, ``app_metadata`` = JSON with
:data:`METADATA_KEYS`). ``do_action`` answers the :data:`ACTIONS` with one JSON result.
"""
from __future__ import annotations

import json
import reprlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pyarrow as pa

# ---- command -------------------------------------------------------------------------

EMBED_KINDS: tuple[str, ...] = ("image", "text", "tokens")  # inputs an embedding model embeds
PAIRS = "pairs"  # (query, document) pairs a reranker scores
INPUT_KINDS: tuple[str, ...] = (*EMBED_KINDS, PAIRS)
DEFAULT_COLUMNS: Mapping[str, str] = {"image": "image", "text": "text", "tokens": "input_ids"}
DEFAULT_QUERY_COLUMN, DEFAULT_DOCUMENT_COLUMN = "query", "document"  # the two columns of pairs input
# Which model modality (``ModelInfo.modalities``) serves each input kind.
KIND_MODALITY: Mapping[str, str] = {"image": "image", "text": "text", "tokens": "text", PAIRS: PAIRS}
COMMAND_KEYS: tuple[str, ...] = ("model", "input", "column", "normalize", "passthrough", "prompt_name", "dimensions",
                                 "output_dtype", "truncate", "query_column", "document_column")
# The engine model's method that embeds each input kind (``engine.model.Model``, a Scheduler's ``submit`` kinds).
EMBED_METHODS: Mapping[str, str] = {"image": "embed_images", "text": "embed_texts", "tokens": "embed_tokens"}

# ---- output --------------------------------------------------------------------------

EMBEDDING_FIELD = "embedding"
SCORE_FIELD = "score"  # pairs input: a reranker's score per row
ERROR_FIELD = "error"
SCALE_FIELD = "embedding_scale"    # int8 / uint8 output: x ≈ offset + scale * q per row (engine.output)
OFFSET_FIELD = "embedding_offset"  # uint8 output
RESERVED_FIELDS: tuple[str, ...] = (EMBEDDING_FIELD, ERROR_FIELD, SCALE_FIELD, OFFSET_FIELD)  # an embedding output's
PAIRS_RESERVED_FIELDS: tuple[str, ...] = (SCORE_FIELD, ERROR_FIELD)  # the output columns of pairs input

# ---- discovery and actions -----------------------------------------------------------

# Keys of the JSON metadata of each model (FlightInfo.app_metadata and the `models` action).
METADATA_KEYS: tuple[str, ...] = (
    "name", "architecture", "kind", "modalities", "dimension", "precision", "device",
    "max_tokens", "prompts", "default_prompt", "matryoshka_dims", "score_activation", "default",
)
ACTION_HEALTH = "health"  # {"status": "ok", "uptime_s": float}
ACTION_READY = "ready"    # {"ready": bool, "models": [name, ...]}
ACTION_MODELS = "models"  # [metadata, ...]  (see METADATA_KEYS)
ACTION_STATS = "stats"    # {"requests": int, "rows": int, "row_errors": int, ...}
ACTION_LIMITS = "limits"  # {"max_batch_rows": int, "max_batch_bytes": int, ...}  (flight_server.config.ServerLimits)
ACTIONS: Mapping[str, str] = {
    ACTION_HEALTH: "Liveness: the server answers.",
    ACTION_READY: "Readiness: every model is loaded and warmed up by a real inference.",
    ACTION_MODELS: "JSON list of the served models and their metadata.",
    ACTION_STATS: "JSON counters: requests, rows, row errors, rejections, active exchanges.",
    ACTION_LIMITS: "JSON request limits: rows and bytes per input batch, bytes and pixels per image, ...",
}

# How a request reached the server (the ``protocol`` label of the Prometheus metrics): an Arrow Flight call, or
# the OpenAI-compatible HTTP API (flight_server.http_server).
VIA_FLIGHT = "flight"
VIA_HTTP = "http"

# Machine-readable reason carried in FlightError.extra_info as JSON {"code": ...}.
CODE_INVALID = "invalid_argument"
CODE_NOT_FOUND = "not_found"
CODE_LIMIT = "limit_exceeded"
CODE_BUSY = "busy"
CODE_IDLE = "idle_timeout"
CODE_INTERNAL = "internal"

# What the server echoes of a client's input is cut (a 10 MB column name must not become a 10 MB error, which
# gRPC cannot even carry in its trailers, nor a 10 MB log line).
QUOTE_CHARS = 80       # one quoted value
QUOTE_ITEMS = 20       # values of a quoted list
MAX_ERROR_CHARS = 2000  # a whole error message
MAX_COMMAND_BYTES = 64 * 1024  # default limit on the command JSON (ServerLimits.max_command_bytes)


_SHORT_REPR = reprlib.Repr()  # nested values to a fixed depth, long ones cut: never recursion without bound
_SHORT_REPR.maxlevel = 3
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = QUOTE_CHARS


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, saying how long a string was; a list shows at most
    QUOTE_ITEMS values, each cut, and nesting to a fixed depth. For anything a client sent that goes into an
    error or a log line."""
    if isinstance(value, (str, bytes)):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    if isinstance(value, (list, tuple)):
        items = [quote(v, limit) if isinstance(v, (str, bytes)) else _short(v, limit) for v in value[:QUOTE_ITEMS]]
        more = f", ... ({len(value) - QUOTE_ITEMS} more)" if len(value) > QUOTE_ITEMS else ""
        return "[" + ", ".join(items) + more + "]"
    return _short(value, limit)


def _short(value: Any, limit: int) -> str:
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def cut_message(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """An error message cut to ``limit`` characters (the last line of defence behind :func:`quote`)."""
    return message if len(message) <= limit else f"{message[:limit]}... (message cut: {len(message)} characters)"


class ProtocolError(ValueError):
    """A request does not follow the protocol; the message says what was expected and what came."""

    code = CODE_INVALID


class UnknownModelError(ProtocolError):
    """The command names a model the server does not serve."""

    code = CODE_NOT_FOUND


class LimitExceededError(ProtocolError):
    """A batch is over a server limit; the message says the limit and how to split."""

    code = CODE_LIMIT


@dataclass(frozen=True)
class EmbedCommand:
    """The parsed ``do_exchange`` command. Build with :meth:`create` or :func:`parse_command`."""

    input: str                       # "image" | "text" | "tokens" | "pairs"
    column: str                      # input column holding the rows to embed (pairs: the queries)
    model: str | None = None         # None: the server's default model
    normalize: bool = True           # L2-normalize each embedding
    passthrough: tuple[str, ...] = field(default=())  # input columns echoed to the output
    prompt_name: str | None = None   # text / pairs input: the model's prompt put before every text / query
    dimensions: int | None = None    # keep the first K components (None: all D); not for pairs
    output_dtype: str = "float32"    # engine.output.OUTPUT_DTYPES; not for pairs
    truncate: bool = True            # text / pairs input: cut at the model's token limit (False: a row error)
    document_column: str | None = None  # pairs input: the column of the documents (None for other inputs)

    @property
    def input_columns(self) -> tuple[str, ...]:
        """The input columns the rows come from: ``(column,)``; pairs: (query column, document column)."""
        return (self.column,) if self.document_column is None else (self.column, self.document_column)

    @property
    def output_fields(self) -> tuple[str, str]:
        """The columns the output adds after the passthrough ones."""
        return (SCORE_FIELD if self.input == PAIRS else EMBEDDING_FIELD), ERROR_FIELD

    @classmethod
    def create(cls, input: str, *, model: str | None = None, column: str | None = None,
               normalize: bool = True, passthrough: Sequence[str] = (),
               prompt_name: str | None = None, dimensions: int | None = None, output_dtype: str = "float32",
               truncate: bool = True, query_column: str | None = None,
               document_column: str | None = None) -> "EmbedCommand":
        """Build a validated command, filling the default column(s) for ``input``.

        Raises:
            ProtocolError: as :func:`parse_command`; also a bare ``str`` ``passthrough``.
        """
        names = passthrough if isinstance(passthrough, str) else list(passthrough)  # "id" is not ["i", "d"]
        return _from_mapping({"model": model, "input": input, "column": column, "normalize": normalize,
                              "passthrough": names, "prompt_name": prompt_name, "dimensions": dimensions,
                              "output_dtype": output_dtype, "truncate": truncate, "query_column": query_column,
                              "document_column": document_column})

    def to_json(self) -> bytes:
        """The UTF-8 JSON to put in ``FlightDescriptor.for_command`` (options only where not the default)."""
        doc: dict[str, Any] = {"input": self.input, "column": self.column,
                               "normalize": self.normalize, "passthrough": list(self.passthrough)}
        if self.input == PAIRS:
            doc = {"input": self.input, "query_column": self.column, "document_column": self.document_column,
                   "passthrough": list(self.passthrough)}
        if self.model is not None:
            doc["model"] = self.model
        if self.prompt_name is not None:
            doc["prompt_name"] = self.prompt_name
        if self.dimensions is not None:
            doc["dimensions"] = self.dimensions
        if self.output_dtype != "float32":
            doc["output_dtype"] = self.output_dtype
        if not self.truncate:
            doc["truncate"] = False
        return json.dumps(doc).encode("utf-8")

    def descriptor(self) -> "Any":
        """The ``pyarrow.flight.FlightDescriptor`` carrying this command."""
        import pyarrow.flight as flight

        return flight.FlightDescriptor.for_command(self.to_json())


def parse_command(raw: bytes | str, max_bytes: int = MAX_COMMAND_BYTES) -> EmbedCommand:
    """Parse and validate the command JSON of a ``do_exchange`` call (in time linear in its size).

    Raises:
        LimitExceededError: the command is longer than ``max_bytes`` (checked before anything else).
        ProtocolError: not UTF-8 JSON, not an object, unknown keys, wrong types or values.
    """
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise LimitExceededError(f"the command is {size} bytes; the limit is {max_bytes} bytes: a command names a "
                                 "model, an input kind, a column and a few passthrough columns")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"the command must be UTF-8 JSON; got undecodable bytes ({exc})") from exc
    if not raw.strip():
        raise ProtocolError('the command is empty; expected JSON like {"input": "text", "model": "NAME"}')
    try:
        doc = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or an integer of over 4,300 digits
        raise ProtocolError(f"the command is not valid JSON ({exc}); got {quote(raw, 200)}") from exc
    except RecursionError as exc:  # e.g. [[[[...]]]] thousands deep
        raise ProtocolError("the command nests JSON too deeply; expected a flat object like "
                            '{"input": "text", "model": "NAME"}') from exc
    if not isinstance(doc, dict):
        raise ProtocolError(f"the command must be a JSON object; got {type(doc).__name__}")
    return _from_mapping(doc)


def _from_mapping(doc: Mapping[str, Any]) -> EmbedCommand:
    unknown = sorted(set(doc) - set(COMMAND_KEYS))
    if unknown:
        raise ProtocolError(f"unknown command key(s) {quote(unknown)}; expected only {list(COMMAND_KEYS)}")
    kind = doc.get("input")
    if kind not in INPUT_KINDS:
        raise ProtocolError(f'"input" must be one of {list(INPUT_KINDS)}; got {quote(kind)}')
    model = doc.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ProtocolError(f'"model" must be a non-empty string or null; got {quote(model)}')
    column = doc.get("column")
    document_column = None
    if kind == PAIRS:
        if column is not None:
            raise ProtocolError(f'"pairs" input reads two columns: name them with "query_column" and '
                                f'"document_column" (default {DEFAULT_QUERY_COLUMN!r} and '
                                f'{DEFAULT_DOCUMENT_COLUMN!r}), not "column"; got "column": {quote(column)}')
        column = _column_name(doc, "query_column", DEFAULT_QUERY_COLUMN)
        document_column = _column_name(doc, "document_column", DEFAULT_DOCUMENT_COLUMN)
    else:
        given = [key for key in ("query_column", "document_column") if doc.get(key) is not None]
        if given:
            raise ProtocolError(f'{" and ".join(repr(k) for k in given)} apply to "pairs" input (a reranker scores '
                                f'query and document columns); got {kind!r} input, whose rows come from "column"')
        column = _column_name(doc, "column", DEFAULT_COLUMNS[kind])
    normalize = doc.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ProtocolError(f'"normalize" must be true or false; got {quote(normalize)}')
    passthrough = doc.get("passthrough")
    if passthrough is None:
        passthrough = []
    if not isinstance(passthrough, (list, tuple)) or not all(isinstance(p, str) for p in passthrough):
        raise ProtocolError(f'"passthrough" must be a list of column names; got {quote(passthrough)}')
    duplicates = sorted(p for p, n in Counter(passthrough).items() if n > 1)
    if duplicates:
        raise ProtocolError(f'"passthrough" names each column once; got duplicates {quote(duplicates)}')
    reserved = sorted(set(passthrough) & set(PAIRS_RESERVED_FIELDS if kind == PAIRS else RESERVED_FIELDS))
    if reserved:
        raise ProtocolError(f'"passthrough" cannot contain {reserved}: the output adds those columns; '
                            "rename them in the input")
    prompt_name = doc.get("prompt_name")
    if prompt_name is not None and (not isinstance(prompt_name, str) or not prompt_name):
        raise ProtocolError(f'"prompt_name" must be a non-empty string or null; got {quote(prompt_name)}')
    if prompt_name is not None and kind not in ("text", PAIRS):
        raise ProtocolError(f'"prompt_name" applies to "text" and "pairs" input (a prompt is text put before each '
                            f'text or query); got {kind!r} input: put the prompt\'s token ids in the rows instead')
    options = output_options(doc.get("dimensions"), doc.get("output_dtype", "float32"))
    if kind == PAIRS and not options.is_default:
        given = {"dimensions": doc.get("dimensions"), "output_dtype": doc.get("output_dtype", "float32")}
        raise ProtocolError(f'"dimensions" and "output_dtype" apply to embeddings; "pairs" input returns a '
                            f'reranker\'s scores (float32, one per label): leave them out; got {quote(given)}')
    truncate = doc.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ProtocolError(f'"truncate" must be true or false; got {quote(truncate)}')
    if not truncate and kind == "image":
        raise ProtocolError('"truncate" applies to "text", "tokens" and "pairs" input (token limits); got "image" '
                            "input: leave it out")
    return EmbedCommand(input=kind, column=column, model=model, normalize=normalize,
                        passthrough=tuple(passthrough), prompt_name=prompt_name, dimensions=options.dimensions,
                        output_dtype=options.output_dtype, truncate=truncate, document_column=document_column)


def output_options(dimensions: Any = None, output_dtype: Any = "float32") -> Any:
    """The checked ``engine.output.OutputOptions`` of a command's ``dimensions`` and ``output_dtype``.

    Raises:
        ProtocolError: ``dimensions`` not a positive integer or null, ``output_dtype`` unknown (the message lists
            the valid ones).
    """
    from engine.output import OUTPUT_DTYPES, OutputOptions  # numpy only; imported on use: the client stays light

    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise ProtocolError(f'"dimensions" must be a positive integer (how many leading components to keep, at most '
                            f"the model's dimension) or null for all; got {quote(dimensions)}")
    if not isinstance(output_dtype, str) or output_dtype not in OUTPUT_DTYPES:
        raise ProtocolError(f'"output_dtype" must be one of {list(OUTPUT_DTYPES)}; got {quote(output_dtype)}')
    return OutputOptions.create(dimensions, output_dtype)


def _column_name(doc: Mapping[str, Any], key: str, default: str) -> str:
    """The column named by ``doc[key]`` (``default`` when absent or null)."""
    column = doc.get(key)
    if column is None:
        return default
    if not isinstance(column, str) or not column:
        raise ProtocolError(f'"{key}" must be a non-empty string; got {quote(column)}')
    return column


# ---- input types ---------------------------------------------------------------------

ACCEPTED_TYPES: Mapping[str, str] = {
    "image": "binary, large_binary or binary_view",
    "text": "string, large_string or string_view (or a dictionary of string or large_string)",
    "tokens": "list, large_list or fixed_size_list of int32 or int64",
    PAIRS: "string, large_string or string_view (or a dictionary of string or large_string)",
}


def _is_view(type_: pa.DataType, name: str) -> bool:
    test = getattr(pa.types, name, None)  # view types came in pyarrow 16
    return bool(test and test(type_))


def is_accepted_type(kind: str, type_: pa.DataType) -> bool:
    """Whether an input column of Arrow type ``type_`` can carry rows of ``kind``."""
    if kind == "image":
        return pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or _is_view(type_, "is_binary_view")
    if kind in ("text", PAIRS):
        if pa.types.is_dictionary(type_):  # e.g. a pandas categorical column; the engine decodes it
            return pa.types.is_string(type_.value_type) or pa.types.is_large_string(type_.value_type)
        return pa.types.is_string(type_) or pa.types.is_large_string(type_) or _is_view(type_, "is_string_view")
    if kind == "tokens":
        return ((pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_))
                and type_.value_type in (pa.int32(), pa.int64()))
    raise ProtocolError(f"unknown input kind {quote(kind)}; expected one of {list(INPUT_KINDS)}")


def engine_column(kind: str, column: pa.Array) -> pa.Array:
    """An accepted input column in the layout the engine reads: fixed-size token lists become lists, with one
    copy; everything else passes as it is (the engine itself copies string_view / binary_view columns, which
    Polars and recent pandas write, once into large_string / large_binary)."""
    type_ = column.type
    if kind == "tokens" and pa.types.is_fixed_size_list(type_):
        return column.cast(pa.list_(type_.value_type))
    return column


def check_input_schema(command: EmbedCommand, schema: pa.Schema) -> list[pa.Field]:
    """Check an input schema against a command; return the passthrough fields in order.

    Raises:
        ProtocolError: the schema has duplicate column names, the input column or a
            passthrough column is missing, or the input column has a type that cannot carry
            ``command.input`` rows.
    """
    names = schema.names
    counts = Counter(names)
    if len(counts) != len(names):  # first: schema.field(name) raises KeyError on a duplicate
        duplicated = sorted(n for n, k in counts.items() if k > 1)
        raise ProtocolError(f"the input schema has duplicate column names {quote(duplicated)}; rename them "
                            f"so that each column name is unique (the columns that came are {quote(names)})")
    if command.input == PAIRS:
        missing = [f"{role} column {quote(c)}" for role, c in zip(("query", "document"), command.input_columns)
                   if c not in counts]
        if missing:
            raise ProtocolError(f"\"pairs\" input needs a query and a document column; the {' and the '.join(missing)} "
                                f"{'is' if len(missing) == 1 else 'are'} not in the batches; the columns that came are "
                                f"{quote(names)}; name yours with \"query_column\" and \"document_column\" in the "
                                "command")
    elif command.column not in counts:
        raise ProtocolError(f"input column {quote(command.column)} (for {command.input!r} input) is not in "
                            f"the batches; the columns that came are {quote(names)}; set \"column\" in the command")
    for column in command.input_columns:
        type_ = schema.field(column).type
        if not is_accepted_type(command.input, type_):
            raise ProtocolError(f"column {quote(column)} has type {cut_message(str(type_), QUOTE_CHARS)}; "
                                f"{command.input!r} input needs {ACCEPTED_TYPES[command.input]}")
    missing = [p for p in command.passthrough if p not in counts]
    if missing:
        raise ProtocolError(f"passthrough column(s) {quote(missing)} are not in the batches; the columns "
                            f"that came are {quote(names)}")
    return [schema.field(p) for p in command.passthrough]


# ---- output schema and metadata ------------------------------------------------------

def embedding_type(width: int, output_dtype: str = "float32") -> pa.DataType:
    """``fixed_size_list<T>[width]``, the type of the ``embedding`` column: T is float32, float16, int8 or uint8
    as ``output_dtype`` says (binary: int8, ubinary: uint8, ``width`` bytes of packed sign bits)."""
    from engine.output import NUMPY_TYPES

    return pa.list_(pa.field("item", pa.from_numpy_dtype(NUMPY_TYPES[output_dtype])), width)


def output_fields(dim: int, dimensions: int | None = None, output_dtype: str = "float32") -> list[pa.Field]:
    """The output columns a model of dimension ``dim`` adds for these options, in order: ``embedding``
    (``fixed_size_list`` of K values, or ceil(K / 8) bytes for binary / ubinary), then for int8 / uint8
    ``embedding_scale``, for uint8 ``embedding_offset`` (float32, one per row). ``error`` follows them."""
    from engine.output import OFFSET_DTYPES, SCALED_DTYPES

    options = output_options(dimensions, output_dtype)
    fields = [pa.field(EMBEDDING_FIELD, embedding_type(options.width(dim), options.output_dtype), nullable=True)]
    if options.output_dtype in SCALED_DTYPES:
        fields.append(pa.field(SCALE_FIELD, pa.float32(), nullable=True))
    if options.output_dtype in OFFSET_DTYPES:
        fields.append(pa.field(OFFSET_FIELD, pa.float32(), nullable=True))
    return fields


def embedding_column(embeddings: Any, errors: Sequence[str | None]) -> pa.FixedSizeListArray:
    """The ``embedding`` column: (N, W) embeddings as ``fixed_size_list<T>[W]``, rows with an error null.

    A C-contiguous float32, float16, int8 or uint8 array (what the engine and :func:`output_columns` make) is
    wrapped without a copy: the column's values buffer is the array's own memory, kept alive by the column.
    Anything else is converted to float32 once first.
    """
    import numpy as np  # the callers hand numpy arrays; the module itself needs only pyarrow

    embeddings = np.asarray(embeddings)
    if embeddings.dtype not in (np.float32, np.float16, np.int8, np.uint8):
        embeddings = embeddings.astype(np.float32)
    embeddings = np.ascontiguousarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (rows, dimension) array; got shape {embeddings.shape}")
    n, width = embeddings.shape  # (N, W)
    if len(errors) != n:
        raise ValueError(f"one error (or None) per row is needed: {n} rows, {len(errors)} errors")
    value_type = pa.from_numpy_dtype(embeddings.dtype)
    values = pa.Array.from_buffers(value_type, n * width, [None, pa.py_buffer(embeddings)])
    return pa.FixedSizeListArray.from_arrays(values, type=pa.list_(pa.field("item", value_type), width),
                                             mask=_failed_mask(errors))


def output_columns(embeddings: Any, errors: Sequence[str | None], normalize: bool = True,
                   dimensions: int | None = None, output_dtype: str = "float32") -> list[pa.Array]:
    """The output columns of :func:`output_fields` for (N, D) float32 ``embeddings`` (the engine's result) and
    one error per row: ``engine.output.convert`` applies ``dimensions`` and ``output_dtype`` (``normalize``: the
    request normalizes, so truncated rows are normalized again), then every array it made is wrapped without a
    copy. With the default options the engine's own array becomes the column."""
    from engine.output import convert

    converted = convert(embeddings, output_options(dimensions, output_dtype), normalize)
    columns: list[pa.Array] = [embedding_column(converted.values, errors)]
    for per_row in (converted.scale, converted.offset):
        if per_row is not None:
            columns.append(_row_column(per_row, errors))
    return columns


def _row_column(values: Any, errors: Sequence[str | None]) -> pa.Array:
    """A float32 column wrapping ``values`` (N,) without a copy; null where the row failed."""
    import numpy as np

    values = np.ascontiguousarray(values, dtype=np.float32)
    if len(errors) != len(values):
        raise ValueError(f"one error (or None) per row is needed: {len(values)} rows, {len(errors)} errors")
    validity = None
    if any(e is not None for e in errors):  # the bits of a bool array are a validity bitmap
        validity = pa.array([e is None for e in errors], type=pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(pa.float32(), len(values), [validity, pa.py_buffer(values)])


def _failed_mask(errors: Sequence[str | None]) -> pa.BooleanArray | None:
    failed = [e is not None for e in errors]
    return pa.array(failed, type=pa.bool_()) if any(failed) else None


def output_schema(dim: int, passthrough_fields: Sequence[pa.Field] = (), dimensions: int | None = None,
                  output_dtype: str = "float32") -> pa.Schema:
    """The schema of the output batches: passthrough columns, :func:`output_fields`, ``error``."""
    return pa.schema([*passthrough_fields, *output_fields(dim, dimensions, output_dtype),
                      pa.field(ERROR_FIELD, pa.string(), nullable=True)])


def score_type(labels: int) -> pa.DataType:
    """The type of the ``score`` column: ``float32`` for a reranker's one score per pair, else
    ``fixed_size_list<float32>[labels]``."""
    return pa.float32() if labels == 1 else embedding_type(labels)


def score_column(scores: Any, errors: Sequence[str | None]) -> pa.Array:
    """The ``score`` column: (N,) float32 scores as ``float32`` ((N, L) as ``fixed_size_list<float32>[L]``), rows
    with an error null. A C-contiguous float32 array is wrapped without a copy, as :func:`embedding_column` does."""
    import numpy as np

    scores = np.ascontiguousarray(scores, dtype=np.float32)
    if scores.ndim == 2:
        return embedding_column(scores, errors)
    if scores.ndim != 1 or len(errors) != len(scores):
        raise ValueError(f"scores must be (rows,) or (rows, labels) with one error (or None) per row; got shape "
                         f"{scores.shape} and {len(errors)} errors")
    failed = [e is not None for e in errors]
    validity = None if not any(failed) else pa.array([not f for f in failed], type=pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(pa.float32(), len(scores), [validity, pa.py_buffer(scores)],
                                 null_count=sum(failed))


def score_schema(labels: int, passthrough_fields: Sequence[pa.Field] = ()) -> pa.Schema:
    """The schema of the output batches of ``pairs`` input: passthrough columns, ``score``, ``error``."""
    return pa.schema([*passthrough_fields,
                      pa.field(SCORE_FIELD, score_type(labels), nullable=True),
                      pa.field(ERROR_FIELD, pa.string(), nullable=True)])


def result_schema(info: Any, passthrough_fields: Sequence[pa.Field] = ()) -> pa.Schema:
    """The output schema of a model (``ModelInfo``, duck-typed): :func:`score_schema` for a reranker (modality
    ``pairs``), else :func:`output_schema`."""
    if PAIRS in tuple(getattr(info, "modalities", ())):
        return score_schema(int(info.dim), passthrough_fields)
    return output_schema(int(info.dim), passthrough_fields)


def model_metadata(name: str, info: Any, default: bool = False) -> dict[str, Any]:
    """JSON-ready metadata of one served model (keys: :data:`METADATA_KEYS`).

    ``info`` is the engine's ``ModelInfo`` (duck-typed: architecture, kind, modalities,
    dim, precision, device, max_tokens, prompts, default_prompt, matryoshka_dims, score_activation). A reranker has
    the modality ``pairs``; its dimension is its scores per pair.
    """
    return {
        "name": name,
        "architecture": getattr(info, "architecture", None),
        "kind": getattr(info, "kind", None),
        "modalities": list(getattr(info, "modalities", ())),
        "dimension": int(info.dim),
        "precision": getattr(info, "precision", None),
        "device": str(getattr(info, "device", "")),
        "max_tokens": getattr(info, "max_tokens", None),
        "prompts": dict(getattr(info, "prompts", ()) or ()),
        "default_prompt": getattr(info, "default_prompt", None),
        "matryoshka_dims": _sizes(getattr(info, "matryoshka_dims", None)),
        "score_activation": getattr(info, "score_activation", None),
        "default": default,
    }


def _sizes(sizes: Any) -> list[int] | None:
    return None if sizes is None else [int(k) for k in sizes]


def error_info(code: str) -> bytes:
    """The ``extra_info`` bytes attached to a Flight error with a machine-readable code."""
    return json.dumps({"code": code}).encode("utf-8")


def error_code(exc: BaseException) -> str | None:
    """The protocol code of a Flight error received by a client, or None."""
    raw = getattr(exc, "extra_info", b"") or b""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc.get("code") if isinstance(doc, dict) else None
