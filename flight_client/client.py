"""EmbeddingClient: embed images, texts or token ids on an ArrowEngine Flight server.

Imports only pyarrow and numpy (never torch or the engine). Protocol:
:mod:`flight_server.protocol`. Example::

    from flight_client import EmbeddingClient
    with EmbeddingClient("grpc://127.0.0.1:8815") as client:
        vecs = client.embed_texts(["a photo of a cat", "a dog"])   # (2, D) float32

Embeddings come back as numpy views of the received Arrow buffers (read-only, no copy)
when the result is one batch; several result batches are concatenated (one copy).

Every embed call takes the request options of the protocol: ``dimensions`` (Matryoshka truncation to the first
K components), ``output_dtype`` (float32, float16, int8, uint8, binary, ubinary) and, for texts and token ids,
``truncate`` (False: a text over the model's token limit is a row error). The embed_* helpers return the
values; int8 / uint8 come with a per-row scale (and offset), which ``embed_table`` / ``embed_stream`` return as
the ``embedding_scale`` / ``embedding_offset`` columns.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from flight_client.exchange import ClientExchange, StreamState, check_batch
from flight_server import protocol

log = logging.getLogger(__name__)


class EmbeddingRowErrors(Exception):
    """Some rows failed on the server; ``errors[i]`` is row i's reason or None.

    ``embeddings`` holds the full (N, D) result (failed rows are zeros).
    """

    def __init__(self, errors: list[str | None], embeddings: np.ndarray) -> None:
        self.errors = errors
        self.embeddings = embeddings
        failed = [(i, e) for i, e in enumerate(errors) if e is not None]
        head = "; ".join(f"row {i}: {e}" for i, e in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        super().__init__(f"{len(failed)} of {len(errors)} rows failed: {head}{more}; "
                         "pass errors='return' to get the other rows and the reasons")


class ScoreRowErrors(EmbeddingRowErrors):
    """Some pairs failed on the server; ``errors[i]`` is row i's reason or None. ``scores`` holds the full
    result (failed rows are 0)."""

    def __init__(self, errors: list[str | None], scores: np.ndarray) -> None:
        super().__init__(errors, scores)
        self.scores = scores


def scores_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N,) float32 numpy of a ``score`` column (a ``fixed_size_list`` one: (N, L)), without a copy when it is
    one chunk without nulls; null (failed) rows read as 0."""
    if pa.types.is_fixed_size_list(column.type):
        return embeddings_to_numpy(column)
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    if column.null_count:
        return column.fill_null(0.0).to_numpy(zero_copy_only=False)
    return column.to_numpy(zero_copy_only=True)


def embeddings_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N, D) numpy view of an ``embedding`` column (float32, or the request's ``output_dtype``: float16, int8,
    uint8), without a copy when possible.

    Copies only when the column has several chunks or its buffer is not aligned for its type.
    Null (failed) rows read as whatever the server sent (zeros from the engine).
    """
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 1:
            column = column.chunk(0)
        else:
            dim = column.type.list_size
            parts = [embeddings_to_numpy(c) for c in column.chunks]
            return np.concatenate(parts) if parts else np.zeros((0, dim), column.type.value_type.to_pandas_dtype())
    dim = column.type.list_size
    values = column.values.slice(column.offset * dim, len(column) * dim)  # (N * D,)
    if values.null_count:
        flat = values.fill_null(0).to_numpy(zero_copy_only=False)
    else:
        flat = values.to_numpy(zero_copy_only=True)
    if flat.ctypes.data % flat.dtype.alignment:
        flat = flat.copy()  # misaligned IPC body: copy once rather than hand out a slow view
    return flat.reshape(len(column), dim)  # (N, D)


def _read_options() -> Any:
    alignment = getattr(pa.ipc, "Alignment", None)
    if alignment is None:
        return None
    return pa.ipc.IpcReadOptions(ensure_alignment=alignment.DataTypeSpecific)


class EmbeddingClient:
    """A client of the ArrowEngine Flight server.

    Args:
        location: ``grpc://host:port``, ``grpc+tls://host:port`` or ``(host, port)``.
        token: bearer token, sent as ``authorization: Bearer <token>``.
        tls_root_certs: PEM bytes, or a path to a PEM file, of the CA that signed the server.
        retries: how many times to retry a call that failed with FlightUnavailableError
            (server down or busy), with exponential backoff from ``backoff_s`` and random
            jitter (defaults: 5 retries over ~3-6 s, enough for a busy server to free a slot).
        batch_rows / batch_bytes: how the embed_* helpers split their input into batches.
        timeout_s: per-call timeout (None: no timeout).
    """

    def __init__(self, location: str | tuple[str, int], token: str | None = None,
                 tls_root_certs: bytes | str | Path | None = None, *, retries: int = 5,
                 backoff_s: float = 0.2, batch_rows: int = 1024, batch_bytes: int = 64 * 1024 ** 2,
                 timeout_s: float | None = None, override_hostname: str | None = None) -> None:
        if isinstance(tls_root_certs, (str, Path)):
            text = str(tls_root_certs)
            tls_root_certs = text.encode() if text.lstrip().startswith("-----BEGIN") else Path(text).read_bytes()
        kwargs: dict[str, Any] = {}
        if override_hostname:
            kwargs["override_hostname"] = override_hostname
        self._client = flight.FlightClient(location, tls_root_certs=tls_root_certs, **kwargs)
        self._plaintext = isinstance(location, tuple) or not str(location).lower().startswith("grpc+tls")
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else None
        self._options = flight.FlightCallOptions(timeout=timeout_s, headers=headers,
                                                 read_options=_read_options())
        self.retries = retries
        self.backoff_s = backoff_s
        self.batch_rows = batch_rows
        self.batch_bytes = batch_bytes

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def __enter__(self) -> "EmbeddingClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- actions ----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Liveness: ``{"status": "ok", "uptime_s": ...}``."""
        return self._action(protocol.ACTION_HEALTH)

    def ready(self) -> dict[str, Any]:
        """Readiness: ``{"ready": bool, "models": [...], "active_exchanges": n, ...}`` (with a ``"reason"`` when
        not ready: warming up, shutting down, or every exchange slot taken)."""
        return self._action(protocol.ACTION_READY)

    def models(self) -> list[dict[str, Any]]:
        """The served models' metadata (keys: ``protocol.METADATA_KEYS``), default first."""
        return self._action(protocol.ACTION_MODELS)

    def stats(self) -> dict[str, Any]:
        """The server's counters."""
        return self._action(protocol.ACTION_STATS)

    def limits(self) -> dict[str, Any]:
        """The server's request limits (``max_batch_rows``, ``max_batch_bytes``, ``max_image_bytes``, ...)."""
        return self._action(protocol.ACTION_LIMITS)

    def endpoints(self, model: str | None = None) -> list[str]:
        """URIs the server advertises for ``model`` (default: its default model) in get_flight_info.

        A cluster's servers can each advertise the others (``serve --advertise``), so one known
        address is enough to find them all.
        """
        def call() -> list[str]:
            name = model or self.models()[0]["name"]
            info = self._client.get_flight_info(flight.FlightDescriptor.for_path(name), self._options)
            return list(dict.fromkeys(loc.uri.decode() if isinstance(loc.uri, bytes) else str(loc.uri)
                                      for ep in info.endpoints for loc in ep.locations))
        return self._with_retries(call)

    def _action(self, name: str) -> Any:
        def call() -> Any:
            results = list(self._client.do_action(flight.Action(name, b""), self._options))
            return json.loads(results[0].body.to_pybytes())
        return self._with_retries(call)

    def _with_retries(self, call: Any) -> Any:
        for attempt in itertools.count():
            try:
                return call()
            except flight.FlightUnavailableError as exc:
                self._back_off_or_raise(attempt, exc)

    def _back_off_or_raise(self, attempt: int, exc: flight.FlightUnavailableError, replayable: bool = True) -> None:
        """After an "unavailable" failure: sleep ``backoff_s * 2**attempt`` (jittered to 50-100 % so that many
        clients do not retry at once) before the next try, or raise when retrying cannot help or may not."""
        reason = str(exc).split(". Detail:")[0]  # gRPC repeats the message in its debug context
        if any(s in reason for s in _TLS_SETUP_FAILURES):
            raise flight.FlightUnavailableError(
                f"TLS handshake with the server failed: check tls_root_certs (the CA that signed the server's "
                f"certificate) and the host name in the URI (or override_hostname); gRPC said: {reason}") from exc
        if not replayable or attempt >= self.retries:
            if self._plaintext and "Socket closed" in reason:  # a plaintext client a TLS server hung up on?
                raise flight.FlightUnavailableError(
                    f"{reason}; if the server uses TLS, connect with grpc+tls://HOST:PORT (and tls_root_certs)") \
                    from exc
            raise exc
        delay = self.backoff_s * 2 ** attempt * random.uniform(0.5, 1.0)
        log.warning("server unavailable (%s); retry %d of %d in %.2fs", reason[:200], attempt + 1, self.retries,
                    delay)
        time.sleep(delay)

    # ---- embedding --------------------------------------------------------------------

    def embed_texts(self, texts: Sequence[str | None] | pa.Array, model: str | None = None,
                    normalize: bool = True, errors: str = "raise", prompt_name: str | None = None, *,
                    dimensions: int | None = None, output_dtype: str = "float32", truncate: bool = True) -> Any:
        """Embed texts -> (N, D) float32; with ``errors="return"``, ``(array, errors)``. ``prompt_name``: one of
        the model's prompts (``models()`` lists them) put before every text; None: the model's default prompt.
        ``dimensions`` / ``output_dtype``: (N, K) of that dtype ((N, ceil(K / 8)) for binary / ubinary);
        ``truncate=False``: a text over the model's token limit is a row error.

        Raises:
            TypeError: ``texts`` is a single str (wrap it in a list), or a row is not a str
                or None (the message names the row).
            EmbeddingRowErrors: some rows failed on the server (``errors="raise"``).
        """
        return self._embed_array(_as_array(texts, "text"), "text", model, normalize, errors, prompt_name,
                                 dimensions=dimensions, output_dtype=output_dtype, truncate=truncate)

    def embed_images(self, images: Iterable[bytes | None] | pa.Array, model: str | None = None,
                     normalize: bool = True, errors: str = "raise", *, dimensions: int | None = None,
                     output_dtype: str = "float32") -> Any:
        """Embed encoded image files (PNG, JPEG, ...) -> (N, D) float32 (see embed_texts).

        Raises:
            TypeError: ``images`` is a single bytes / bytearray / memoryview (wrap it in a
                list), or a row is not bytes-like or None.
        """
        return self._embed_array(_as_array(images, "image"), "image", model, normalize, errors,
                                 dimensions=dimensions, output_dtype=output_dtype)

    def embed_tokens(self, tokens: Sequence[Sequence[int]] | pa.Array, model: str | None = None,
                     normalize: bool = True, errors: str = "raise", *, dimensions: int | None = None,
                     output_dtype: str = "float32", truncate: bool = True) -> Any:
        """Embed token-id sequences (special tokens included) -> (N, D) float32 (see embed_texts). Token-id rows
        are never cut: one over the model's limit is a row error whatever ``truncate`` says.

        Raises:
            TypeError: ``tokens`` is one flat sequence of ids or a str / bytes (wrap it in a
                list), or a row or an id has the wrong type.
            ValueError: a token id is outside the int32 range.
        """
        return self._embed_array(_as_array(tokens, "tokens"), "tokens", model, normalize, errors,
                                 dimensions=dimensions, output_dtype=output_dtype, truncate=truncate)

    def embed_table(self, table: pa.Table, column: str | None = None, kind: str = "text",
                    passthrough: Sequence[str] = (), model: str | None = None,
                    normalize: bool = True, prompt_name: str | None = None, *, dimensions: int | None = None,
                    output_dtype: str = "float32", truncate: bool = True) -> pa.Table:
        """Embed one column of a table -> table of passthrough columns, ``embedding`` (``embedding_scale`` and,
        uint8, ``embedding_offset`` for int8 / uint8 output), ``error``.

        Row errors do not raise: they are in the ``error`` column.
        """
        command = protocol.EmbedCommand.create(kind, model=model, column=column, normalize=normalize,
                                               passthrough=passthrough, prompt_name=prompt_name,
                                               dimensions=dimensions, output_dtype=output_dtype, truncate=truncate)
        return self._run_table(command, table)

    def _run_table(self, command: protocol.EmbedCommand, table: pa.Table) -> pa.Table:
        """Send the command's columns of ``table`` (in batches) and gather the result table."""
        names = list(dict.fromkeys([*command.input_columns, *command.passthrough]))
        missing = [n for n in names if n not in table.column_names]
        if missing:
            raise KeyError(f"column(s) {missing} not in the table; it has {table.column_names}")
        selected = table.select(names)

        def send() -> list[pa.RecordBatch]:
            batches = list(self._split(selected))
            return self._with_retries(lambda: list(self._exchange(command, batches[0], iter(batches[1:]))))

        try:
            results = send()
        except flight.FlightServerError as exc:
            # A server started with lower batch limits than this client's: take its limits, send again.
            if protocol.error_code(exc) != protocol.CODE_LIMIT or not self._adopt_server_limits():
                raise
            results = send()
        return pa.Table.from_batches(results, schema=results[0].schema)

    # ---- reranking ------------------------------------------------------------------------

    def score_pairs(self, queries: Sequence[str | None] | pa.Array, documents: Sequence[str | None] | pa.Array,
                    model: str | None = None, errors: str = "raise", prompt_name: str | None = None, *,
                    truncate: bool = True) -> Any:
        """Score (query, document) pairs with a reranker: ``queries[i]`` against ``documents[i]`` -> (N,) float32
        (a model of L > 1 labels: (N, L)); with ``errors="return"``, ``(scores, errors)``. ``prompt_name``: one of
        the model's prompts, put before every query. ``truncate``: a pair over the model's token limit is cut
        (longest_first); False: it is a row error.

        Raises:
            TypeError: ``queries`` or ``documents`` is a single str, or a row is not a str or None.
            ValueError: not as many documents as queries.
            ScoreRowErrors: some rows failed on the server (``errors="raise"``).
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return'; got {errors!r}")
        q = _as_array(queries, "text", "queries")
        d = _as_array(documents, "text", "documents")
        if len(q) != len(d):
            raise ValueError(f"expected one document per query; got {len(q)} queries and {len(d)} documents")
        query, document = protocol.DEFAULT_QUERY_COLUMN, protocol.DEFAULT_DOCUMENT_COLUMN
        result = self.score_table(pa.table({query: q, document: d}), model=model, prompt_name=prompt_name,
                                  truncate=truncate)
        scores = scores_to_numpy(result.column(protocol.SCORE_FIELD))
        row_errors = result.column(protocol.ERROR_FIELD).to_pylist()
        if errors == "return":
            return scores, row_errors
        if any(e is not None for e in row_errors):
            raise ScoreRowErrors(row_errors, scores)
        return scores

    def rerank(self, query: str, documents: Sequence[str | None] | pa.Array, model: str | None = None,
               errors: str = "raise", prompt_name: str | None = None, *, truncate: bool = True) -> Any:
        """Score one query against every document -> (N,) float32 in the documents' order
        (``np.argsort(-scores)`` ranks them); see :meth:`score_pairs`."""
        if not isinstance(query, str):
            raise TypeError(f"query: expected one str, got {type(query).__name__}; for many queries use "
                            "score_pairs(queries, documents)")
        d = _as_array(documents, "text", "documents")
        return self.score_pairs(pa.array([query] * len(d), pa.string()), d, model, errors, prompt_name,
                                truncate=truncate)

    def score_table(self, table: pa.Table, query_column: str | None = None, document_column: str | None = None,
                    passthrough: Sequence[str] = (), model: str | None = None,
                    prompt_name: str | None = None, *, truncate: bool = True) -> pa.Table:
        """Score the (query, document) pairs of two string columns of a table (default ``query`` and
        ``document``) -> table of passthrough columns, ``score``, ``error``. Row errors do not raise."""
        command = protocol.EmbedCommand.create(protocol.PAIRS, model=model, query_column=query_column,
                                               document_column=document_column, passthrough=passthrough,
                                               prompt_name=prompt_name, truncate=truncate)
        return self._run_table(command, table)

    def _adopt_server_limits(self) -> bool:
        """Lower batch_rows / batch_bytes to the server's limits; False if they were not lower."""
        try:
            limits = self.limits()
        except flight.FlightError as exc:  # e.g. a server without the `limits` action
            log.warning("could not read the server's limits: %s", exc)
            return False
        rows = min(self.batch_rows, int(limits.get("max_batch_rows", self.batch_rows)))
        size = min(self.batch_bytes, int(limits.get("max_batch_bytes", self.batch_bytes)))
        if (rows, size) == (self.batch_rows, self.batch_bytes):
            return False
        log.info("the server's limits are %d rows / %d bytes per batch; splitting batches to fit", rows, size)
        self.batch_rows, self.batch_bytes = rows, size
        return True

    def embed_stream(self, batches: Iterable[pa.RecordBatch], kind: str, column: str | None = None,
                     passthrough: Sequence[str] = (), model: str | None = None,
                     normalize: bool = True, prompt_name: str | None = None, *, dimensions: int | None = None,
                     output_dtype: str = "float32", truncate: bool = True) -> Iterator[pa.RecordBatch]:
        """Stream record batches through the server; yields one result batch per input batch.

        For inputs larger than memory: a writer thread sends batches ahead while results
        are read. Batches must share one schema. A connection failure or a busy server is
        retried only before any result came back (the batches sent until then are kept
        to be sent again).

        Raises:
            TypeError: ``batches`` is a single RecordBatch or Table (wrap it in a list, or use
                embed_table), or an item is not a RecordBatch.
            ValueError: a batch's schema differs from the first batch's.
        """
        command = protocol.EmbedCommand.create(kind, model=model, column=column, normalize=normalize,
                                               passthrough=passthrough, prompt_name=prompt_name,
                                               dimensions=dimensions, output_dtype=output_dtype, truncate=truncate)
        if isinstance(batches, (pa.RecordBatch, pa.Table)):  # iterating one gives its columns
            alternative = " or pass the table to embed_table(table, ...)" if isinstance(batches, pa.Table) else ""
            raise TypeError(f"batches: expected an iterable of pyarrow RecordBatches, got a single "
                            f"{type(batches).__name__}; wrap it in a list: embed_stream([batch], ...){alternative}")
        source = iter(batches)
        first = next(source, None)
        if first is None:
            return
        check_batch(first, 0)
        for attempt in itertools.count():
            state = StreamState()
            try:
                yield from self._exchange(command, first, source, state)
                return
            except flight.FlightUnavailableError as exc:
                self._back_off_or_raise(attempt, exc, replayable=not state.results)
                source = itertools.chain(state.sent, source)  # nothing came back: send them all again

    def _embed_array(self, array: pa.Array, kind: str, model: str | None, normalize: bool,
                     errors: str, prompt_name: str | None = None, **options: Any) -> Any:
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return'; got {errors!r}")
        column = protocol.DEFAULT_COLUMNS[kind]
        table = pa.table({column: array})
        result = self.embed_table(table, column=column, kind=kind, model=model, normalize=normalize,
                                  prompt_name=prompt_name, **options)
        embeddings = embeddings_to_numpy(result.column(protocol.EMBEDDING_FIELD))
        row_errors = result.column(protocol.ERROR_FIELD).to_pylist()
        if errors == "return":
            return embeddings, row_errors
        if any(e is not None for e in row_errors):
            raise EmbeddingRowErrors(row_errors, embeddings)
        return embeddings

    def _split(self, table: pa.Table) -> Iterator[pa.RecordBatch]:
        """Split a table into batches of at most batch_rows rows and ~batch_bytes bytes."""
        if table.num_rows == 0:
            yield pa.RecordBatch.from_pylist([], schema=table.schema)
            return
        for batch in table.to_batches(max_chunksize=self.batch_rows):
            yield from _fit_bytes(batch, self.batch_bytes)

    def _exchange(self, command: protocol.EmbedCommand, first: pa.RecordBatch,
                  rest: Iterator[pa.RecordBatch], state: StreamState | None = None
                  ) -> Iterator[pa.RecordBatch]:
        """One do_exchange: a thread writes ``first`` then ``rest``; this generator reads (see ClientExchange)."""
        writer, reader = self._client.do_exchange(command.descriptor(), self._options)
        yield from ClientExchange(writer, reader, first, rest, state)


# gRPC reports a TLS set-up mistake on this side as "unavailable": retrying cannot help.
_TLS_SETUP_FAILURES = ("Ssl handshake failed", "certificate verify failed", "is not in peer certificate")


def _fit_bytes(batch: pa.RecordBatch, limit: int) -> Iterator[pa.RecordBatch]:
    """Slices of ``batch`` of at most ``limit`` bytes each (a single row over it goes alone)."""
    if batch.nbytes <= limit or batch.num_rows == 1:
        yield batch
        return
    rows = max(1, batch.num_rows * limit // batch.nbytes)  # < num_rows: every slice is smaller
    for start in range(0, batch.num_rows, rows):
        yield from _fit_bytes(batch.slice(start, rows), limit)


# Per input kind: (argument name, what it must be, the call to suggest for one row, Arrow type).
_ROWS: dict[str, tuple[str, str, str, pa.DataType]] = {
    "text": ("texts", "a sequence of strings (a list, or an Arrow string array)",
             "embed_texts([text])", pa.string()),
    "image": ("images", "a sequence of encoded image files as bytes (a list, or an Arrow binary array)",
              "embed_images([image])", pa.binary()),
    "tokens": ("tokens", ("a sequence of token-id sequences (a list of lists of int, or an Arrow "
                          "list<int32> array)"), "embed_tokens([ids])", pa.list_(pa.int32())),
}
_BYTES_LIKE = (bytes, bytearray, memoryview)
_INT32 = (-2 ** 31, 2 ** 31 - 1)


def _as_array(values: Any, kind: str, name: str | None = None) -> pa.Array:
    """The rows of an embed_* call as one Arrow array; TypeError / ValueError on bad input. ``name``: the
    argument's name in messages (default: the kind's)."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    default_name, expected, one_row, type_ = _ROWS[kind]
    if name is not None:  # queries / documents of score_pairs
        one_row = f"{name}=[{name.removesuffix('ies').removesuffix('s')}{'y' if name.endswith('ies') else ''}]"
    name = name or default_name
    if isinstance(values, (str, *_BYTES_LIKE)):  # list() would split it into one row per character
        size = (f"{len(values)} characters" if isinstance(values, str)
                else f"{memoryview(values).nbytes} bytes")
        raise TypeError(f"{name}: expected {expected}, got a single {type(values).__name__} of {size}; "
                        f"wrap it in a list: {one_row}")
    try:
        rows = list(values)
    except TypeError as exc:
        raise TypeError(f"{name}: expected {expected}, got {type(values).__name__}") from exc
    if kind == "image":  # pyarrow would send a str row as its UTF-8 bytes: a path or a URL, never an image
        for i, row in enumerate(rows):
            if isinstance(row, str):
                raise TypeError(f"{name}[{i}]: expected the bytes of an encoded image, got str {row[:60]!r}; "
                                "for a file, send its contents: Path(path).read_bytes()")
    try:
        if kind == "image":
            return pa.array(rows, type=type_)
        # inferred first: converting straight to the target type would take a bytes row as text and 2.0 as an id
        inferred = pa.array(rows)
        if not _inferred_fits(inferred.type, kind):
            raise TypeError(f"{name}: expected {expected}, got Arrow type {inferred.type} from the rows")
        return inferred.cast(type_)
    except (pa.ArrowTypeError, pa.ArrowInvalid, TypeError) as exc:  # find the row only now: the fast path stays fast
        bad = _bad_row(rows, kind, name)
        if bad is None:
            raise
        raise bad from exc


def _inferred_fits(type_: pa.DataType, kind: str) -> bool:
    if pa.types.is_null(type_):  # no rows, or only None
        return True
    if kind == "text":
        return pa.types.is_string(type_) or pa.types.is_large_string(type_)
    return pa.types.is_list(type_) and (pa.types.is_integer(type_.value_type) or pa.types.is_null(type_.value_type))


def _bad_row(rows: list, kind: str, name: str | None = None) -> TypeError | ValueError | None:
    """The error describing the first row that cannot be ``kind`` input, or None."""
    default_name, _, one_row, _ = _ROWS[kind]
    name = name or default_name
    for i, row in enumerate(rows):
        if row is None:
            continue
        if kind == "text" and not isinstance(row, str):
            return TypeError(f"{name}[{i}]: expected str or None, got {_describe(row)}")
        if kind == "image" and not isinstance(row, _BYTES_LIKE):
            return TypeError(f"{name}[{i}]: expected bytes or None, got {_describe(row)}")
        if kind != "tokens":
            continue
        if isinstance(row, (str, *_BYTES_LIKE)) or not isinstance(row, Iterable):
            return TypeError(f"{name}[{i}]: expected a sequence of int or None, got {_describe(row)}; "
                             f"for one sequence of ids, wrap it in a list: {one_row}")
        for j, token in enumerate(row):
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
                return TypeError(f"{name}[{i}][{j}]: expected int, got {_describe(token)}")
            if not _INT32[0] <= token <= _INT32[1]:
                return ValueError(f"{name}[{i}][{j}]: {token} is outside int32 [{_INT32[0]}, {_INT32[1]}]; "
                                  "token ids must fit in int32")
    return None


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
