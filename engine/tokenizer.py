"""Text front end: texts or token ids -> validated, ragged id rows -> length buckets.

Texts are tokenized with HF ``tokenizers`` (Rust) from the model directory's
``tokenizer.json``. Truncation keeps the special tokens the post-processor adds,
so a CLIP text cut at 77 tokens still ends with its end-of-text token, as
``CLIPTokenizer(truncation=True, max_length=77)`` does.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer, normalizers

from engine.config import tokenizer_config
from engine.errors import InputError, ModelConfigError
from engine.files import MAX_TOKENIZER_BYTES, check_model_file, read_model_file

log = logging.getLogger(__name__)


class TextTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with the model's truncation length; never pads.

    Built from a model directory it can be lazy: parsing ``tokenizer.json`` takes
    0.1-0.2 s (longer than mapping a whole B/32 model), so :func:`engine.load_model`
    defers it to the first text call, or to :meth:`load`. An image-only user never pays it.
    """

    def __init__(self, source: Path, max_length: int, lowercase: bool = False, truncation_side: str = "right",
                 prefix: str = "") -> None:
        if truncation_side not in ("right", "left"):
            raise ModelConfigError(f"truncation_side should be 'right' or 'left', got {truncation_side!r}")
        self.source = source  # tokenizer.json
        self.max_length = max_length
        self.lowercase = lowercase  # lowercase texts first (sentence-transformers' do_lower_case)
        self.truncation_side = truncation_side  # which end of a long text is cut (HF's truncation_side)
        self.prefix = prefix  # put before every text (a sentence-transformer's default prompt)
        self._lock = threading.Lock()
        self._tok: Tokenizer | None = None
        self._pairs: _PairTokenizer | None = None

    @classmethod
    def from_dir(cls, model_dir: Path, max_length: int, lazy: bool = False, lowercase: bool = False,
                 required: bool = True, prefix: str = "") -> "TextTokenizer":
        """The tokenizer of a model directory, cutting texts at ``max_length`` tokens on the side that
        tokenizer_config.json's ``truncation_side`` names (right by default, as HF).

        ``lazy`` parses tokenizer.json on first use; ``lowercase`` puts a Lowercase normalizer before the
        file's own, as sentence-transformers' do_lower_case; ``prefix`` goes before every text (a default
        prompt). A missing tokenizer.json is an error here when
        ``required``, else on the first text call (a CLIP model without one still embeds images and token ids).
        A tokenizer.json that is there is checked now, even when ``lazy`` (a regular file inside the directory,
        at most ``engine.files.MAX_TOKENIZER_BYTES``; no byte is read until it is parsed).
        """
        path = Path(model_dir) / "tokenizer.json"
        if not os.path.lexists(path):
            if required or not lazy:
                raise ModelConfigError(_missing(path))
        else:
            _check_file(path)
        side = tokenizer_config(model_dir).get("truncation_side", "right")
        tok = cls(path, max_length, lowercase, side, prefix)
        return tok if lazy else tok.load()

    @property
    def loaded(self) -> bool:
        return self._tok is not None

    @property
    def available(self) -> bool:
        """Whether there is a tokenizer.json to parse."""
        return self._tok is not None or os.path.lexists(self.source)

    def load(self) -> "TextTokenizer":
        """Parse ``tokenizer.json`` now (once; thread-safe). Raises ModelConfigError if it is missing or unreadable."""
        if self._tok is None:
            with self._lock:
                if self._tok is None:
                    tok = self._parse()
                    tok.enable_truncation(self.max_length, direction=self.truncation_side)
                    self._tok = tok
                    log.debug("parsed %s", self.source)
        return self

    def _parse(self) -> Tokenizer:
        """A new ``tokenizers.Tokenizer`` from ``tokenizer.json`` (lowercasing first when asked), not padding
        and not truncating."""
        data = read_model_file(self.source.parent, self.source.name, MAX_TOKENIZER_BYTES,
                               "the model's tokenizer", missing=_missing(self.source))
        try:  # the bytes that were checked, not the file again
            tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # tokenizers raises plain Exception subclasses; UnicodeDecodeError
            raise ModelConfigError(f"{self.source} could not be read by the tokenizers library: {exc}") from exc
        if self.lowercase:
            first = [normalizers.Lowercase()]
            tok.normalizer = normalizers.Sequence(first + ([tok.normalizer] if tok.normalizer else []))
        tok.no_padding()
        tok.no_truncation()
        return tok

    @property
    def window(self) -> int:
        """Characters of a text that are tokenized at first (see :data:`WINDOW_CHARS_PER_TOKEN`)."""
        return max(WINDOW_MIN_CHARS, WINDOW_CHARS_PER_TOKEN * self.max_length)

    def encode(self, texts: Sequence[str | None] | pa.Array | pa.ChunkedArray, prefix: str | None = None,
               truncate: bool = True) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Tokenize texts, each after ``prefix`` (default: the tokenizer's own, e.g. a default prompt). Returns
        (ids per row or None, error per row or None). ``truncate``: cut a text longer than :attr:`max_length`
        tokens (prefix and special tokens included) to that length; False: such a text is a row error naming
        its token count and the limit.

        Only the characters truncation can keep are tokenized: a text longer than :attr:`window` characters
        is cut to that many on the side truncation keeps, which gives the ids of the whole text when a space
        lies between the kept tokens and the cut (the word the cut splits is then not among them). A text whose
        window does not settle it (too few tokens: long runs of characters the tokenizer drops; or one endless
        word) is tried again with a larger window, up to :data:`MAX_WINDOW_GROWTH` times the first, and whole
        if it is no longer than that; past that it is a row error. So the time and memory one row costs are
        bounded by the model's length, not by the size of the text; rows go to the tokenizer in calls of at
        most :data:`TOKENIZE_CHUNK_CHARS` characters.
        """
        values, whole = _text_values(texts, self.window, self.truncation_side)
        errors = [_value_error(t) for t in values]
        good = [i for i, e in enumerate(errors) if e is None]
        rows: list[np.ndarray | None] = [None] * len(values)
        if good and not self.available:
            raise InputError(f"this model cannot tokenize texts: {_missing(self.source)}; or send token ids "
                             "(input kind 'tokens')")
        tok = self.load()._tok
        prefix = self.prefix if prefix is None else prefix
        for i, enc, read in self._encodings(tok, values, whole, good, prefix, self.max_length, True, errors):
            if not truncate and enc.overflowing:
                errors[i] = self._too_long(enc, read)
                continue
            rows[i] = np.asarray(enc.ids, dtype=np.int64)
        return rows, errors

    def _encodings(self, tok: Tokenizer, values: list, whole: dict[int, Callable[[], object]], good: list[int],
                   prefix: str, max_length: int, special: bool, errors: list[str | None]):
        """(row, encoding, characters read) for the rows ``good`` of ``values`` (cut as :func:`_text_values` cuts
        them) that settle within the window (see :meth:`encode`); the others get their error in ``errors``.
        ``tok`` truncates at ``max_length`` tokens; ``special``: add the special tokens. Characters read: how many
        characters of a text longer than the window were tokenized (None: the whole text was)."""
        for chunk in _chunks(good, [len(values[i]) for i in good], TOKENIZE_CHUNK_CHARS):
            batch = [prefix + values[i] for i in chunk]
            for k, (i, enc) in enumerate(zip(chunk, tok.encode_batch(batch, add_special_tokens=special))):
                read = len(values[i]) if i in whole else None  # characters tokenized of a text cut to the window
                if i in whole and not self._kept_inside(enc, batch[k], len(prefix)):
                    enc, errors[i], read = self._encode_wider(tok, whole[i](), self.window, prefix, max_length,
                                                              special)
                    if enc is None:
                        continue
                yield i, enc, read
    def encode_pairs(self, queries: Sequence[str | None] | pa.Array | pa.ChunkedArray,
                     documents: Sequence[str | None] | pa.Array | pa.ChunkedArray, prefix: str | None = None,
                     truncate: bool = True) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Tokenize (query, document) pairs as HF's tokenizer does for text pairs with
        ``truncation="longest_first"`` at :attr:`max_length` (the query after ``prefix``, default the tokenizer's
        own). Returns per row a (2, T) int64 array, the token ids over the token type ids the tokenizer's pair
        template gives, or None, and an error or None; a null or non-string query or document is that row's
        error.

        Each side is tokenized alone (without special tokens, cut at the tokens the pair can hold, long texts
        windowed as :meth:`encode` does), then both are cut the way ``longest_first`` cuts them
        (:func:`longest_first`) and put into the pair template: the same ids as tokenizing the pair whole. Where
        both sides are cut and the room left by the special tokens is odd, the longer side keeps the odd token:
        both sides' tokens are then counted, over at most :data:`MAX_WINDOW_GROWTH` x :attr:`window` characters
        of each (past that, which side is longer is decided on those characters). ``truncate`` False: a pair
        over :attr:`max_length` tokens (special tokens included) is a row error naming its token count instead.

        Raises:
            InputError: not sequences of strings (or Arrow string arrays), or not as many documents as queries.
        """
        q_values, q_whole = _text_values(queries, self.window, self.truncation_side)
        d_values, d_whole = _text_values(documents, self.window, self.truncation_side)
        if len(q_values) != len(d_values):
            raise InputError(f"queries and documents: expected one document per query, got {len(q_values)} "
                             f"queries and {len(d_values)} documents")
        errors: list[str | None] = [None] * len(q_values)
        for i, (q, d) in enumerate(zip(q_values, d_values)):
            q_error, d_error = _value_error(q), _value_error(d)
            if q_error or d_error:
                errors[i] = "; ".join(f"{side}: {e}" for side, e in (("query", q_error), ("document", d_error)) if e)
        good = [i for i, e in enumerate(errors) if e is None]
        rows: list[np.ndarray | None] = [None] * len(q_values)
        if good and not self.available:
            raise InputError(f"this model cannot tokenize texts: {_missing(self.source)}")
        pair = self._load_pairs()
        prefix = self.prefix if prefix is None else prefix
        sides = ((q_values, q_whole, prefix, "query"), (d_values, d_whole, "", "document"))
        ids: list[dict[int, list[int]]] = []
        counted: list[dict[int, tuple[int, bool]]] = []  # per side: (tokens, whether the whole text was read)
        for values, whole, side_prefix, name in sides:
            side_errors: list[str | None] = [None] * len(values)
            encodings = list(self._encodings(pair.tok, values, whole, good, side_prefix, pair.room, False,
                                             side_errors))
            ids.append({i: enc.ids for i, enc, _ in encodings})
            counted.append({i: (len(enc.ids) + sum(len(o.ids) for o in enc.overflowing), read is None)
                            for i, enc, read in encodings})
            for i, e in enumerate(side_errors):
                if e is not None:
                    errors[i] = f"{name}: {e}" if errors[i] is None else f"{errors[i]}; {name}: {e}"
        for i in good:
            if errors[i] is not None:
                continue
            query, document = ids[0][i], ids[1][i]
            if not truncate and counted[0][i][0] + counted[1][i][0] > pair.room:
                tokens = counted[0][i][0] + counted[1][i][0] + self.max_length - pair.room
                exact = counted[0][i][1] and counted[1][i][1]
                errors[i] = (f"the pair is {'' if exact else 'at least '}{tokens} tokens long (prompt and special "
                             f"tokens included), over the model's limit of {self.max_length} tokens; the request "
                             "set truncate=false: shorten the query or the document, or send the pair with "
                             "truncate=true to have it cut (longest_first)")
                continue
            counts = None
            if pair.room % 2 and len(query) == len(document) == pair.room:
                # both sides cut and an odd room: the longer side keeps the odd token, so count both
                counts = tuple(self._count(pair.tok, side_prefix + (whole[i]() if i in whole else values[i]))
                               for values, whole, side_prefix, _ in sides)
            rows[i] = pair.join(query, document, self.truncation_side, counts)
        return rows, errors

    def _count(self, tok: Tokenizer, text: str) -> int:
        """Tokens of ``text`` without special tokens, counted over its first (``truncation_side``: last)
        :data:`MAX_WINDOW_GROWTH` x :attr:`window` characters at most (``tok`` truncates; the overflowing pieces
        hold the rest)."""
        enc = tok.encode(_cut(text, self.window * MAX_WINDOW_GROWTH, self.truncation_side), add_special_tokens=False)
        return len(enc.ids) + sum(len(o.ids) for o in enc.overflowing)

    def _load_pairs(self) -> "_PairTokenizer":
        """The pair set-up, made on first use (thread-safe): its own tokenizer (truncating one side at the tokens
        a pair can hold, a setting the single-text tokenizer must not share) and the pair template."""
        if self._pairs is None:
            with self._lock:
                if self._pairs is None:
                    self._pairs = _PairTokenizer.build(self._parse(), self.max_length, self.truncation_side,
                                                       self.source)
        return self._pairs

    def _kept_inside(self, enc, text: str, prefix_chars: int) -> bool:
        """Whether ``enc``, the encoding of ``text`` (prompt + a cut text), holds the ids of the whole text: it
        was truncated, and a whitespace character (a boundary for every pre-tokenizer) lies between the tokens
        truncation kept and the cut, so the word the cut splits is not among them."""
        if not enc.overflowing:  # not even truncated: the cut dropped tokens
            return False
        spans = [o for o, special in zip(enc.offsets, enc.special_tokens_mask) if not special]
        if not spans:
            return False
        if self.truncation_side == "right":
            return _SPACE.search(text, max(end for _, end in spans)) is not None
        return _SPACE.search(text, prefix_chars, min(start for start, _ in spans)) is not None

    def _too_long(self, enc, read: int | None) -> str:
        """The row error of a text over :attr:`max_length` tokens when the request does not truncate: ``enc`` is
        its truncated encoding; ``read`` how many characters of a text longer than the window were tokenized
        (None: the whole text was)."""
        tokens = len(enc.ids) + sum(sum(1 for special in o.special_tokens_mask if not special)
                                    for o in enc.overflowing)  # the kept ids + the content of the cut-off rest
        which = "first" if self.truncation_side == "right" else "last"
        count = (f"the text is {tokens} tokens long" if read is None
                 else f"the text's {which} {read} characters alone are {tokens} tokens")
        return (f"{count} (prompt and special tokens included), over the model's limit of {self.max_length} "
                "tokens; the request set truncate=false: shorten or split the text, or send it with truncate=true "
                "to have it cut at the limit")

    def _encode_wider(self, tok: Tokenizer, text: str, window: int, prefix: str, max_length: int, special: bool):
        """Encode one long text from growing windows until the kept tokens lie inside the cut; (encoding, None,
        characters of the text encoded or None for all of them) or (None, the row error, None)."""
        limit = window * MAX_WINDOW_GROWTH
        while True:
            window *= 4
            part = _cut(text, window, self.truncation_side)
            enc = tok.encode(prefix + part, add_special_tokens=special)
            if len(part) == len(text) or self._kept_inside(enc, prefix + part, len(prefix)):
                return enc, None, (None if len(part) == len(text) else len(part))
            if window >= limit:
                which = "first" if self.truncation_side == "right" else "last"
                return None, (f"text of {len(text)} characters: the {max_length} tokens the model keeps could "
                              f"not be told from its {which} {window} characters (too few tokens there, or no space "
                              f"between them and the rest), and a text is read at most that far "
                              f"({MAX_WINDOW_GROWTH}x {self.window} characters); cut the text, or remove long runs "
                              "of spaces or symbols"), None


# How much of a long text is tokenized. A token covers a few characters of real text (English ~4, a rare
# word or a long number more; WordPiece reads words of at most 100 characters); 16 per token plus a floor
# leaves room for both, and for the rest of the word the cut splits.
WINDOW_CHARS_PER_TOKEN = 16
WINDOW_MIN_CHARS = 4096
MAX_WINDOW_GROWTH = 64   # a text whose first window does not settle its ids is read at most 64x as far
_SPACE = re.compile(r"\s")


# The tokenizer holds ~50 bytes per character it works on (offsets and alignments): rows go to it in calls of at
# most this many characters, so one call of a big batch peaks near 50 MB, not 50 x the batch.
TOKENIZE_CHUNK_CHARS = 1_000_000


def _chunks(items: list[int], sizes: list[int], budget: int) -> list[list[int]]:
    """``items`` in order, cut into runs whose ``sizes`` add up to at most ``budget`` (a bigger item alone)."""
    out: list[list[int]] = []
    run: list[int] = []
    total = 0
    for item, size in zip(items, sizes):
        if run and total + size > budget:
            out.append(run)
            run, total = [], 0
        run.append(item)
        total += size
    if run:
        out.append(run)
    return out


def _cut(text: str, chars: int, side: str) -> str:
    """The ``chars`` characters of ``text`` that truncation on ``side`` keeps."""
    return text[:chars] if side == "right" else text[-chars:]


def _check_file(path: Path) -> None:
    """Refuse a tokenizer.json that is not a regular file inside its folder or is too large (stat only)."""
    real = check_model_file(path.parent, path.name, "the model's tokenizer", missing=_missing(path))
    size = os.stat(real).st_size
    if size > MAX_TOKENIZER_BYTES:
        raise ModelConfigError(f"{path} (the model's tokenizer) is {size:,} bytes, more than the "
                               f"{MAX_TOKENIZER_BYTES:,} such a file may have; this is not a file the model needs "
                               "as it is: check where the folder came from")


def _missing(path: Path) -> str:
    return (f"{path} is missing: the model has no fast tokenizer; re-run `arrowengine convert` with transformers "
            "installed so it can build one")


def _text_values(texts, window: int, side: str) -> tuple[list, dict[int, Callable[[], object]]]:
    """Python values of the rows, each string cut to ``window`` characters on the side truncation keeps, and
    for every cut row a function that gives its whole value (read again only when the cut is not enough).

    An Arrow column is cut before it becomes Python strings, so a huge row never exists in Python unless it
    must be read further.
    """
    if isinstance(texts, pa.ChunkedArray):
        texts = pa.concat_arrays(texts.chunks) if texts.num_chunks != 1 else texts.chunk(0)
    if isinstance(texts, pa.DictionaryArray):  # e.g. a pandas categorical column: its values, row by row
        texts = texts.dictionary_decode()
    if isinstance(texts, pa.Array):
        if getattr(pa.types, "is_string_view", lambda t: False)(texts.type):  # Polars' strings: one copy
            texts = texts.cast(pa.large_string())
        if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
            raise InputError(f"texts: expected an Arrow string, large_string or string_view array, got {texts.type}")
        return _arrow_text_values(texts, window, side)
    if isinstance(texts, (str, bytes)):
        raise InputError("texts: expected a sequence of strings, got a single string; wrap it in a list")
    values = _as_list(texts, "texts", "strings")
    whole: dict[int, Callable[[], object]] = {}
    for i, t in enumerate(values):
        if not isinstance(t, str):
            continue
        if len(t) > window:
            whole[i] = (lambda t=t: t)
            values[i] = t = _cut(t, window, side)
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: no tokenizer takes it
                values[i] = _BadUtf8()
    return values, whole


def _as_list(values, what: str, items: str) -> list:
    """``list(values)``, or InputError for something that is not a sequence."""
    try:
        return list(values)
    except TypeError as exc:
        raise InputError(f"{what}: expected a sequence of {items} or an Arrow array, got "
                         f"{type(values).__name__}") from exc


def _arrow_text_values(texts: pa.Array, window: int, side: str) -> tuple[list, dict[int, Callable[[], object]]]:
    try:
        lengths = pc.utf8_length(texts).to_numpy(zero_copy_only=False)  # characters per row (NaN for nulls)
        long_rows = np.flatnonzero(np.nan_to_num(lengths.astype(np.float64)) > window).tolist()
        if long_rows:
            texts_cut = (pc.utf8_slice_codeunits(texts, 0, window) if side == "right"
                         else pc.utf8_slice_codeunits(texts, -window))
        else:
            texts_cut = texts
        values = texts_cut.to_pylist()  # raises on invalid UTF-8 (so does the slice)
    except (UnicodeDecodeError, pa.ArrowInvalid):  # a client sent bytes that are not UTF-8 in a string column
        raw = texts.view(pa.large_binary() if pa.types.is_large_string(texts.type) else pa.binary())
        values = [_decode_or_marker(b) for b in raw.to_pylist()]
        long_rows = [i for i, t in enumerate(values) if isinstance(t, str) and len(t) > window]
        whole = {i: (lambda t=values[i]: t) for i in long_rows}
        for i in long_rows:
            values[i] = _cut(values[i], window, side)
        return values, whole
    return values, {i: (lambda i=i: texts[i].as_py()) for i in long_rows}


class _BadUtf8:
    """Marks a row whose bytes are not valid UTF-8."""


def _value_error(value) -> str | None:
    """Why a row's value (from :func:`_text_values`) cannot be tokenized; None for a string."""
    if value is None:
        return "null text: expected a string"
    if isinstance(value, _BadUtf8):
        return "text is not valid UTF-8 (or holds a lone surrogate); send UTF-8 encoded strings"
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    return None


def longest_first(n_a: int, n_b: int, room: int) -> tuple[int, int]:
    """How many tokens of each side of a pair HF's ``truncation="longest_first"`` keeps when the pair holds at
    most ``room`` tokens besides its special tokens (the rule of the tokenizers library): nothing is cut when
    both fit; else the longer side is cut down to what the shorter leaves, but not below the shorter's length;
    if that still does not fit, each side keeps half the room (the longer one the odd token; on a tie, the
    document)."""
    if n_a + n_b <= room:
        return n_a, n_b
    swap = n_a > n_b
    short, long_ = (n_b, n_a) if swap else (n_a, n_b)
    long_ = short if short > room else max(short, room - short)
    if short + long_ > room:
        short = room // 2
        long_ = short + room % 2
    return (long_, short) if swap else (short, long_)


@dataclass(frozen=True)
class _PairTokenizer:
    """How a tokenizer joins a pair: special tokens before the query, between the sides and after the document,
    and the token type ids of each part (its post-processor's pair template, read by running it once)."""

    tok: Tokenizer  # truncates one side at ``room`` tokens, adds no special tokens
    room: int  # tokens the pair holds besides its special tokens
    head: tuple[tuple[int, int], ...]  # (id, type id) of the special tokens before the query
    middle: tuple[tuple[int, int], ...]  # ... between query and document
    tail: tuple[tuple[int, int], ...]  # ... after the document
    query_type: int
    document_type: int

    @classmethod
    def build(cls, tok: Tokenizer, max_length: int, side: str, source: Path) -> "_PairTokenizer":
        """Read the pair template of ``tok`` (parsed, not truncating) for pairs of at most ``max_length`` tokens.

        Raises:
            ModelConfigError: the template is not special tokens around the query and the document in that
                order, or ``max_length`` leaves no room for both sides.
        """
        probe_a, probe_b = (tok.encode(t, add_special_tokens=False) for t in ("a", "b"))
        if not probe_a.ids or not probe_b.ids:
            raise ModelConfigError(f"{source}: the tokenizer makes no token of the text 'a' or 'b'; cannot read "
                                   "its pair template")
        enc = tok.post_process(probe_a, probe_b, add_special_tokens=True)
        marks = ["s" if special else "t" for special in enc.special_tokens_mask]
        parts = re.fullmatch(r"(s*)(t+)(s*)(t+)(s*)", "".join(marks))
        n_a, n_b = len(probe_a.ids), len(probe_b.ids)
        if parts is None or len(parts[2]) != n_a or len(parts[4]) != n_b:
            raise ModelConfigError(f"{source}: the tokenizer's pair template makes {''.join(marks)} of a one-token "
                                   "query and document (s: a special token, t: a token of the texts); expected "
                                   "special tokens around the query and the document, in that order")
        pieces = list(zip(enc.ids, enc.type_ids))
        ends = np.cumsum([len(p) for p in parts.groups()])
        head, query, middle, document, tail = (pieces[a:b] for a, b in zip([0, *ends[:-1]], ends))
        if len({t for _, t in query}) != 1 or len({t for _, t in document}) != 1:
            raise ModelConfigError(f"{source}: the tokenizer's pair template gives one side several token types")
        room = max_length - tok.num_special_tokens_to_add(True)
        if room < 2:
            raise ModelConfigError(f"{source}: pairs of at most {max_length} tokens leave {room} tokens besides the "
                                   "special tokens; expected room for a query and a document")
        tok.enable_truncation(room, direction=side)
        return cls(tok, room, tuple(head), tuple(middle), tuple(tail), query[0][1], document[0][1])

    def join(self, query: list[int], document: list[int], side: str,
             counts: tuple[int, int] | None = None) -> np.ndarray:
        """The (2, T) int64 ids over type ids of a pair whose sides were tokenized alone (each at most ``room``
        tokens), cut as ``longest_first`` cuts them on ``side``. ``counts``: the sides' whole token counts, where
        both were cut (which of them is longer then decides who keeps an odd token)."""
        k_q, k_d = longest_first(*(counts or (len(query), len(document))), self.room)
        if side == "right":
            query, document = query[:k_q], document[:k_d]
        else:
            query, document = query[len(query) - k_q:], document[len(document) - k_d:]
        pieces = [*self.head, *((i, self.query_type) for i in query), *self.middle,
                  *((i, self.document_type) for i in document), *self.tail]
        return np.array(pieces, dtype=np.int64).T.copy()  # (2, T): ids, type ids


def _decode_or_marker(b: bytes | None):
    if b is None:
        return None
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return _BadUtf8()


_NULL_INSIDE = object()


def token_rows(tokens, vocab_size: int, max_length: int, pad_id: int | None = None
               ) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Validate token-id rows: ids in [0, vocab_size), 1..max_length ids, no nulls.

    Accepts an Arrow list/large_list array of integers (read as zero-copy views)
    or a sequence of integer sequences. A bad row is an error for that row only.
    With ``pad_id``, trailing pad ids are cut off first (rows padded as HF's
    ``padding=True`` pads them; without an attention mask they would be read as tokens).
    """
    rows = _token_values(tokens)
    out: list[np.ndarray | None] = [None] * len(rows)
    errors: list[str | None] = [None] * len(rows)
    for i, r in enumerate(rows):
        if r is None:
            errors[i] = "null row: expected a list of token ids"
            continue
        if r is _NULL_INSIDE:
            errors[i] = "the row contains null token ids"
            continue
        if isinstance(r, str):
            errors[i] = "expected a list of token ids, got a string"
            continue
        try:
            a = np.asarray(r)
        except (ValueError, TypeError) as exc:
            errors[i] = f"token ids are not a flat list of integers: {exc}"
            continue
        if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            errors[i] = f"expected a flat list of integer token ids, got array of {a.dtype} with shape {a.shape}"
            continue
        if pad_id is not None and a.size and a[-1] == pad_id:
            real = np.flatnonzero(a != pad_id)
            if not real.size:
                errors[i] = f"the row holds only the pad id {pad_id}"
                continue
            a = a[: real[-1] + 1]
        if a.size == 0:
            errors[i] = "empty token list"
        elif a.size > max_length:
            errors[i] = f"{a.size} tokens, more than the model's {max_length} positions; truncate the row"
        elif int(a.min()) < 0 or int(a.max()) >= vocab_size:
            bad = int(a[(a < 0) | (a >= vocab_size)][0])
            errors[i] = f"token id {bad} is outside the vocabulary [0, {vocab_size})"
        else:
            out[i] = a.astype(np.int64, copy=False)
    return out, errors


def _token_values(tokens) -> list:
    if isinstance(tokens, pa.ChunkedArray):
        tokens = pa.concat_arrays(tokens.chunks) if tokens.num_chunks != 1 else tokens.chunk(0)
    if not isinstance(tokens, pa.Array):
        if isinstance(tokens, (str, bytes)):
            raise InputError("tokens: expected a sequence of token-id lists, got a single string")
        return _as_list(tokens, "tokens", "token-id lists")
    t = tokens.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_integer(t.value_type):
        raise InputError(f"tokens: expected an Arrow list or large_list of integers, got {t}")
    n = len(tokens)
    offsets = tokens.offsets.to_numpy(zero_copy_only=False)  # (n+1,) absolute into values
    values = tokens.values
    has_nulls = values.null_count > 0
    flat = values.fill_null(0).to_numpy() if has_nulls else values.to_numpy(zero_copy_only=True)
    valid = tokens.is_valid().to_numpy(zero_copy_only=False) if tokens.null_count else None
    rows: list = []
    for i in range(n):
        if valid is not None and not valid[i]:
            rows.append(None)
            continue
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        if has_nulls and values.slice(lo, hi - lo).null_count:
            rows.append(_NULL_INSIDE)
            continue
        rows.append(flat[lo:hi])
    return rows


def length_buckets(lengths: Sequence[int], max_rows: int, max_tokens: int,
                   max_padding: float = 0.1, min_rows: int = 8) -> list[np.ndarray]:
    """Group row indices by length so each group pads little.

    Sort by length, then cut before a row where the group would pass ``max_rows`` rows or
    ``max_tokens`` padded tokens (rows x longest), or where padding would pass
    ``max_padding`` of the real tokens once the group has ``min_rows`` rows.
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    groups, start, real = [], 0, 0
    for j in range(len(order)):
        n = lengths[order[j]]
        rows = j + 1 - start
        padded = rows * n
        if j > start and (rows > max_rows or padded > max_tokens
                          or (rows > min_rows and padded > (1 + max_padding) * (real + n))):
            groups.append(order[start:j])
            start, real = j, 0
        real += n
    if start < len(order):
        groups.append(order[start:])
    return groups
