"""Text front end: texts or token ids -> validated, ragged id rows -> length buckets.

Texts are tokenized with HF ``tokenizers`` (Rust) from the model directory's
``tokenizer.json``. Truncation keeps the special tokens the post-processor adds,
so a CLIP text cut at 77 tokens still ends with its end-of-text token, as
``CLIPTokenizer(truncation=True, max_length=77)`` does.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, normalizers

from engine.config import tokenizer_config
from engine.errors import InputError, ModelConfigError

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

    @classmethod
    def from_dir(cls, model_dir: Path, max_length: int, lazy: bool = False, lowercase: bool = False,
                 required: bool = True, prefix: str = "") -> "TextTokenizer":
        """The tokenizer of a model directory, cutting texts at ``max_length`` tokens on the side that
        tokenizer_config.json's ``truncation_side`` names (right by default, as HF).

        ``lazy`` parses tokenizer.json on first use; ``lowercase`` puts a Lowercase normalizer before the
        file's own, as sentence-transformers' do_lower_case; ``prefix`` goes before every text (a default
        prompt). A missing tokenizer.json is an error here when
        ``required``, else on the first text call (a CLIP model without one still embeds images and token ids).
        """
        path = Path(model_dir) / "tokenizer.json"
        if not path.exists() and (required or not lazy):
            raise ModelConfigError(_missing(path))
        side = tokenizer_config(model_dir).get("truncation_side", "right")
        tok = cls(path, max_length, lowercase, side, prefix)
        return tok if lazy else tok.load()

    @property
    def loaded(self) -> bool:
        return self._tok is not None

    @property
    def available(self) -> bool:
        """Whether there is a tokenizer.json to parse."""
        return self._tok is not None or self.source.exists()

    def load(self) -> "TextTokenizer":
        """Parse ``tokenizer.json`` now (once; thread-safe). Raises ModelConfigError if it is missing or unreadable."""
        if self._tok is None:
            with self._lock:
                if self._tok is None:
                    if not self.source.exists():
                        raise ModelConfigError(_missing(self.source))
                    try:
                        tok = Tokenizer.from_file(str(self.source))
                    except Exception as exc:  # tokenizers raises plain Exception subclasses
                        raise ModelConfigError(f"{self.source} could not be read by the tokenizers library: {exc}") \
                            from exc
                    if self.lowercase:
                        first = [normalizers.Lowercase()]
                        tok.normalizer = normalizers.Sequence(first + ([tok.normalizer] if tok.normalizer else []))
                    tok.no_padding()
                    tok.enable_truncation(self.max_length, direction=self.truncation_side)
                    self._tok = tok
                    log.debug("parsed %s", self.source)
        return self

    def encode(self, texts: Sequence[str | None] | pa.Array | pa.ChunkedArray) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Tokenize texts. Returns (ids per row or None, error per row or None)."""
        values = _text_values(texts)
        errors: list[str | None] = [None] * len(values)
        good = [i for i, t in enumerate(values) if isinstance(t, str)]
        for i, t in enumerate(values):
            if t is None:
                errors[i] = "null text: expected a string"
            elif isinstance(t, _BadUtf8):
                errors[i] = "text is not valid UTF-8; send UTF-8 encoded strings"
            elif not isinstance(t, str):
                errors[i] = f"expected a string, got {type(t).__name__}"
        rows: list[np.ndarray | None] = [None] * len(values)
        if good and not self.available:
            raise InputError(f"this model cannot tokenize texts: {_missing(self.source)}; or send token ids "
                             "(input kind 'tokens')")
        batch = [self.prefix + values[i] for i in good] if self.prefix else [values[i] for i in good]
        for i, enc in zip(good, self.load()._tok.encode_batch(batch, add_special_tokens=True)):
            rows[i] = np.asarray(enc.ids, dtype=np.int64)
        return rows, errors


def _missing(path: Path) -> str:
    return (f"{path} is missing: the model has no fast tokenizer; re-run `arrowengine convert` with transformers "
            "installed so it can build one")


def _text_values(texts) -> list:
    if isinstance(texts, pa.ChunkedArray):
        texts = pa.concat_arrays(texts.chunks) if texts.num_chunks != 1 else texts.chunk(0)
    if isinstance(texts, pa.DictionaryArray):  # e.g. a pandas categorical column: its values, row by row
        texts = texts.dictionary_decode()
    if isinstance(texts, pa.Array):
        if getattr(pa.types, "is_string_view", lambda t: False)(texts.type):  # Polars' strings: one copy
            texts = texts.cast(pa.large_string())
        if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
            raise InputError(f"texts: expected an Arrow string, large_string or string_view array, got {texts.type}")
        try:
            return texts.to_pylist()
        except UnicodeDecodeError:  # a client sent bytes that are not UTF-8 in a string column
            raw = texts.view(pa.large_binary() if pa.types.is_large_string(texts.type) else pa.binary())
            return [_decode_or_marker(b) for b in raw.to_pylist()]
    if isinstance(texts, (str, bytes)):
        raise InputError("texts: expected a sequence of strings, got a single string; wrap it in a list")
    return list(texts)


class _BadUtf8:
    """Marks a row whose bytes are not valid UTF-8."""


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
        return list(tokens)
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
