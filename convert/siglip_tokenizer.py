"""SigLIP (v1)'s text tokenizer as a ``tokenizer.json``, built from the checkpoint's ``spiece.model``.

SigLIP v1 checkpoints (google/siglip-base-patch16-224, siglip-so400m-patch14-384, ...) ship ``spiece.model`` (a
SentencePiece unigram model: T5's 32,000-piece English vocabulary) and ``tokenizer_config.json`` naming
``SiglipTokenizer``, a slow, sentencepiece-backed tokenizer; transformers has no fast one and no tokenizer.json. This
module writes one with the ``tokenizers`` library that gives the ids ``SiglipTokenizer`` gives (transformers
``models/siglip/tokenization_siglip.py``), read with no extra package: ``spiece.model`` is a small protobuf message
read here directly (:func:`read_spiece`), so neither sentencepiece nor protobuf is needed to convert.

What SiglipTokenizer does to a text (``tokenize`` -> ``_tokenize`` -> ``build_inputs_with_special_tokens``), and the
tokenizer.json's normalizer step for each (the normalizer sees the whole text, so the special tokens become
stand-in characters first and the steps that act per piece act beside them):

1. ``"▁" + text.replace("▁", " ")``, split on its special tokens (``</s>``, ``<unk>``: exact, case-sensitive), whose
   ``lstrip`` / ``rstrip`` eat the whitespace beside them; each other piece goes on alone.
   -- ``Replace("▁", " ")``; each special token with the whitespace it eats -> a noncharacter (U+FDD0 ...).
2. ``canonicalize_text`` of each piece: ``lower()`` (``do_lower_case``, default true), ASCII punctuation
   (``string.punctuation``) removed, each run of whitespace (Python's ``\\s``) made one space, ``strip()``.
   -- Σ -> ς where ``str.lower`` makes it final (Python's Final_Sigma rule, as a regex), ``Lowercase``; the
   punctuation removed; runs of the characters ``str.isspace`` accepts (listed out: the regex engine's ``\\s`` lacks
   U+001C..U+001F) made one space; spaces at the text's end and beside the stand-ins removed.
3. SentencePiece encodes ``"<unk>" + piece`` and the pieces of ``"<unk>"`` are dropped. It normalizes with the
   model's charsmap (NFKC and nmt_nfkc's rules, :func:`_charsmap_steps`), reads the "▁" in front of the first
   piece as a space (whitespace after it adds nothing), makes runs of spaces one, drops trailing spaces ("▁"
   included: a piece that comes out empty gives no token), writes spaces "▁", and runs its unigram lattice over
   the whole string. So the first piece is read as "▁" + its text, a piece after a special token with no "▁".
   -- ``NFKC`` + ``Precompiled``; a space in front (``Prepend``, not of an empty text), runs of spaces made one,
   spaces before a stand-in and at the end dropped (so a text that starts with a special token gets no "▁"); spaces
   -> "▁"; each stand-in back to its special token. Pre-tokenizer: each special token a word of its own (so it is
   not fused with an unknown character beside it); model: ``Unigram`` with spiece.model's pieces and scores (no
   split at "▁": SentencePiece reads the whole string).
4. ``</s>`` appended (not when the ids already end with it); ``truncation=True`` keeps ``max_length - 1`` ids and
   then the ``</s>``. The processor pads to 64 with ``</s>`` (``padding="max_length"``); the engine pads itself.
   -- a ``</s>`` stand-in at the text's end removed; post-processor ``$A </s>``; the engine truncates.

Where it is not exact (tests/test_siglip_tokenizer.py checks the rest against SiglipTokenizer: every character,
in context and alone, combining sequences, NFD / NFKD text, special tokens in texts, long texts):

* Combining sequences the charsmap and NFKC compose differently: SentencePiece composes only the sequences that
  are charsmap keys, contiguous and in order (a letter's NFD, a compatibility character + marks); NFKC also
  composes across an unblocked mark and after a multi-character compatibility mapping. E.g. "a" + U+0327 + U+0300
  (NFKC: "à" + U+0327; SentencePiece leaves it), "ﬁ" + U+0301 (NFKC: "fí"; SentencePiece: "fi" + U+0301). Real
  text in NFC or NFD hardly holds these.
* Characters NFKC (tokenizers' Unicode tables) and the charsmap (the Unicode of the sentencepiece that built it)
  treat differently are kept from NFKC by stand-ins (:func:`_charsmap_steps`); ``Lowercase`` and the final-sigma
  regex use Rust's / Oniguruma's Unicode tables where transformers uses Python's: they can differ on characters
  new in one of those Unicode versions.
* A control piece (``<pad>``, ``</s>``, ``<unk>``) spelled by NFKC itself (full-width ``＜pad＞``: ASCII ``<`` ``>``
  ``/`` are punctuation and removed before) is matched as that piece by ``Unigram``; SentencePiece never matches
  control pieces in text.
* A text whose ids, cut at ``max_length - 1``, end with a ``</s>`` it spells itself (a literal ``</s>`` as its
  63rd token) gets one more ``</s>``: SiglipTokenizer adds none then.
* Texts holding the stand-ins' characters (noncharacters U+FDD0..U+FDEF, private-use U+10FF00..U+10FF3F) are read
  as holding U+FFFE / U+10FFFD, which give the same ids unless a model has them as pieces (refused).
"""
from __future__ import annotations

import functools
import json
import logging
import string
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPIECE_FILE = "spiece.model"
SPACE = "▁"  # SentencePiece's whitespace symbol (U+2581)

# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM = 1

# SiglipTokenizer.__init__'s defaults
_DEFAULT_SPECIAL = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}


class SpieceError(ValueError):
    """spiece.model cannot be read, or is a kind this module does not rebuild exactly."""


@dataclass
class Spiece:
    """What the tokenizer needs from a SentencePiece ModelProto (sentencepiece_model.proto; defaults as there)."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type) by id
    model_type: int = UNIGRAM
    unk_id: int = 0
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


# ---------------------------------------------------------------- spiece.model (protobuf wire format)


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise SpieceError("truncated varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise SpieceError("varint longer than 10 bytes")


def _fields(data: bytes):
    """(field number, wire type, value) of a protobuf message: ints for varints, bytes for fixed and
    length-delimited fields."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i:i + size], i + size
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise SpieceError(f"unsupported protobuf wire type {wire} (field {number})")
        if i > len(data):
            raise SpieceError(f"field {number} runs past the end of the message")
        yield number, wire, value


def _expect(wire: int, want: int, what: str) -> None:
    if wire != want:
        raise SpieceError(f"{what}: wire type {wire}, expected {want}")


def read_spiece(data: bytes) -> Spiece:
    """Parse a SentencePiece model file (its pieces, trainer and normalizer specs); no sentencepiece or protobuf
    package needed.

    Raises:
        SpieceError: not a SentencePiece model.
    """
    sp = Spiece()
    for number, wire, value in _fields(data):
        if number == 1:  # repeated SentencePiece pieces
            _expect(wire, 2, "pieces")
            piece, score, kind = None, 0.0, NORMAL
            for n, w, v in _fields(value):
                if n == 1:
                    _expect(w, 2, "piece")
                    piece = v.decode("utf-8")
                elif n == 2:
                    _expect(w, 5, "score")
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    _expect(w, 0, "type")
                    kind = v
            if piece is None:
                raise SpieceError(f"piece {len(sp.pieces)} has no text")
            sp.pieces.append((piece, score, kind))
        elif number == 2:  # TrainerSpec
            _expect(wire, 2, "trainer_spec")
            for n, w, v in _fields(value):
                if n == 3 and w == 0:
                    sp.model_type = v
                elif n == 40 and w == 0:
                    sp.unk_id = v
                elif n == 35 and w == 0:
                    sp.byte_fallback = bool(v)
                elif n == 24 and w == 0:
                    sp.treat_whitespace_as_suffix = bool(v)
        elif number == 3:  # NormalizerSpec
            _expect(wire, 2, "normalizer_spec")
            for n, w, v in _fields(value):
                if n == 2 and w == 2:
                    sp.charsmap = bytes(v)
                elif n == 3 and w == 0:
                    sp.add_dummy_prefix = bool(v)
                elif n == 4 and w == 0:
                    sp.remove_extra_whitespaces = bool(v)
                elif n == 5 and w == 0:
                    sp.escape_whitespaces = bool(v)
    if not sp.pieces:
        raise SpieceError("no pieces: not a SentencePiece model")
    return sp


def _check_supported(sp: Spiece) -> None:
    """Refuse the SentencePiece options the tokenizer.json below does not reproduce exactly."""
    if sp.model_type != UNIGRAM:
        raise SpieceError(f"model_type {sp.model_type} (only unigram, 1, is rebuilt)")
    if sp.byte_fallback:
        raise SpieceError("byte_fallback is set (not rebuilt)")
    if sp.treat_whitespace_as_suffix or not sp.escape_whitespaces or not sp.remove_extra_whitespaces:
        raise SpieceError("treat_whitespace_as_suffix / escape_whitespaces / remove_extra_whitespaces differ from "
                          "SigLIP's (not rebuilt)")
    odd = sorted({t for _, _, t in sp.pieces} - {NORMAL, UNKNOWN, CONTROL})
    if odd:
        raise SpieceError(f"piece types {odd} (user-defined, unused or byte pieces: not rebuilt)")
    if not 0 <= sp.unk_id < len(sp.pieces) or sp.pieces[sp.unk_id][2] != UNKNOWN:
        raise SpieceError(f"unk_id {sp.unk_id} is not the model's unknown piece")


# ---------------------------------------------------------------- tokenizer.json


def _char_class(chars: str) -> str:
    """A regex character class matching exactly ``chars`` (code points written out: no escaping questions)."""
    return "[" + "".join(f"\\x{{{ord(c):X}}}" for c in sorted(set(chars))) + "]"


def _python_whitespace() -> str:
    """The characters Python's ``re`` ``\\s`` matches in a str pattern (``str.isspace``), as SiglipTokenizer's
    ``re.sub(r"\\s+", " ", text)`` sees them."""
    return "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer files write it: a string, or an AddedToken object with its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _special_tokens(config: dict[str, Any], vocab: dict[str, int]) -> list[dict[str, Any]]:
    """The added tokens SiglipTokenizer splits texts on: its eos / unk / pad tokens (lstrip and rstrip, as its
    ``__init__`` makes them) and the entries of ``added_tokens_decoder`` / ``additional_special_tokens``, each with
    the id of its piece.

    Raises:
        SpieceError: a token that is not a piece of spiece.model (SiglipTokenizer would give it an id past the
            vocabulary, which the text tower has no row for).
    """
    tokens: dict[str, dict[str, Any]] = {}

    def add(content: str | None, lstrip: bool, rstrip: bool) -> None:
        if content and content not in tokens:
            if content not in vocab:
                raise SpieceError(f"special token {content!r} is not a piece of {SPIECE_FILE}")
            tokens[content] = {"content": content, "lstrip": lstrip, "rstrip": rstrip}

    decoder = config.get("added_tokens_decoder") or {}
    flags = {}
    if isinstance(decoder, dict):
        for entry in decoder.values():
            if isinstance(entry, dict) and _token_text(entry):
                flags[entry["content"]] = (bool(entry.get("lstrip", False)), bool(entry.get("rstrip", False)))
    for key, default in _DEFAULT_SPECIAL.items():
        raw = config.get(key, default)
        content = _token_text(raw)
        if isinstance(raw, dict):
            lr = (bool(raw.get("lstrip", False)), bool(raw.get("rstrip", False)))
        else:
            lr = flags.get(content, (True, True))
        add(content, *lr)
    for content, lr in flags.items():
        add(content, *lr)
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    for raw in extra if isinstance(extra, list) else []:
        content = _token_text(raw)
        lr = ((bool(raw.get("lstrip", False)), bool(raw.get("rstrip", False))) if isinstance(raw, dict)
              else flags.get(content, (False, False)))
        add(content, *lr)
    return list(tokens.values())


# NFKC runs before the charsmap unless it would change more characters than this against the charsmap alone (a
# charsmap that is not NFKC-based: NFC then)
MAX_NFKC_EXCEPTIONS = 64
# Stand-ins: the text's special tokens while the normalizer works (noncharacters U+FDD0..U+FDEF), and the characters
# kept from NFKC (private use U+10FF00..). The same characters in a text are first made U+FFFE / U+10FFFD, which the
# model reads just as them (unknown pieces, untouched by every step).
_SPECIAL_BASE, _SPECIAL_MAX, _SPECIAL_STANDIN = 0xFDD0, 32, "\ufffe"
_KEEP_BASE, _KEEP_STANDIN = 0x10FF00, "\U0010fffd"


def _charsmap_steps(charsmap: bytes) -> list:
    """SentencePiece's normalization by its precompiled charsmap, as tokenizers normalizers.

    SentencePiece maps the longest key of the charsmap at each point of the text: single characters (NFKC's
    mappings, plus nmt_nfkc's own: control characters removed, some spaces, U+FF5E kept as it is) and whole
    sequences (a compatibility character or a decomposed letter with its combining marks, composed: "ｶﾞ" -> "ガ",
    "e\\u0323\\u0302" -> "ệ"). tokenizers' ``Precompiled`` maps single characters exactly but not those sequences
    (within one grapheme cluster shorter than 6 bytes it maps the whole cluster by its shortest mapped prefix and
    drops the rest; longer clusters character by character, composing nothing). So ``NFKC`` runs first (it
    composes those sequences as the charsmap does), then ``Precompiled``; the characters whose NFKC form the
    charsmap maps otherwise than the character itself (U+FF5E in nmt_nfkc; also characters NFKC maps under a newer
    Unicode than the charsmap was built with) are swapped for stand-ins around ``NFKC``, so that only the charsmap
    sees them.
    """
    from tokenizers import normalizers

    nfkc, pre = normalizers.NFKC(), normalizers.Precompiled(charsmap)
    keep = _nfkc_exceptions(charsmap)
    if len(keep) > MAX_NFKC_EXCEPTIONS:
        log.debug("charsmap differs from NFKC on %d characters: NFC before it, not NFKC", len(keep))
        return [normalizers.NFC(), pre]
    hide = [normalizers.Replace(c, chr(_KEEP_BASE + i)) for i, c in enumerate(keep)]
    show = [normalizers.Replace(chr(_KEEP_BASE + i), c) for i, c in enumerate(keep)]
    return hide + [nfkc] + show + [pre]


@functools.lru_cache(maxsize=4)
def _nfkc_exceptions(charsmap: bytes) -> tuple[str, ...]:
    """The characters whose NFKC form the charsmap maps otherwise than the character itself (a scan of every code
    point: ~0.6 s)."""
    from tokenizers import normalizers

    nfkc, pre = normalizers.NFKC(), normalizers.Precompiled(charsmap)
    keep = []
    for code in range(sys.maxunicode + 1):
        if 0xD800 <= code < 0xE000:
            continue
        c = chr(code)
        k = nfkc.normalize_str(c)
        if k != c and pre.normalize_str(k) != pre.normalize_str(c):
            keep.append(c)
    return tuple(keep)


def build_siglip_tokenizer(spiece: bytes, config: dict[str, Any] | None = None):
    """A ``tokenizers.Tokenizer`` giving SiglipTokenizer's ids, from spiece.model's bytes and tokenizer_config.json.

    Raises:
        SpieceError: spiece.model unreadable or of a kind not rebuilt (see :func:`_check_supported`), or special
            tokens that are not its pieces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    config = config or {}
    sp = read_spiece(spiece)
    _check_supported(sp)
    vocab: dict[str, int] = {}
    for i, (piece, _, _) in enumerate(sp.pieces):
        vocab.setdefault(piece, i)
    specials = sorted(_special_tokens(config, vocab), key=lambda t: -len(t["content"]))  # longest first, as a trie
    if len(specials) > _SPECIAL_MAX:
        raise SpieceError(f"{len(specials)} special tokens (at most {_SPECIAL_MAX} are rebuilt)")
    reserved = {_SPECIAL_STANDIN, _KEEP_STANDIN, *map(chr, range(_SPECIAL_BASE, _SPECIAL_BASE + _SPECIAL_MAX)),
                *map(chr, range(_KEEP_BASE, _KEEP_BASE + MAX_NFKC_EXCEPTIONS))}
    clash = sorted({c for piece in vocab for c in piece if c in reserved})
    if clash:
        raise SpieceError(f"pieces of {SPIECE_FILE} hold {', '.join(f'U+{ord(c):04X}' for c in clash)}, which "
                          "this tokenizer uses as stand-ins")
    eos = _token_text(config.get("eos_token", _DEFAULT_SPECIAL["eos_token"]))
    lower = config.get("do_lower_case", True)
    if not isinstance(lower, bool):
        raise SpieceError(f"do_lower_case should be true or false, got {lower!r}")

    ws = _char_class(_python_whitespace())
    mark = {t["content"]: chr(_SPECIAL_BASE + i) for i, t in enumerate(specials)}  # stand-in of each special token
    steps = [  # the stand-ins, if a text holds them, become characters the model reads alike
        normalizers.Replace(Regex(f"[\\x{{{_SPECIAL_BASE:X}}}-\\x{{{_SPECIAL_BASE + _SPECIAL_MAX - 1:X}}}]"),
                            _SPECIAL_STANDIN),
        normalizers.Replace(Regex(f"[\\x{{{_KEEP_BASE:X}}}-\\x{{{_KEEP_BASE + MAX_NFKC_EXCEPTIONS - 1:X}}}]"),
                            _KEEP_STANDIN),
        normalizers.Replace(SPACE, " "),  # text.replace("▁", " ")
    ]
    # the special tokens, split off first (before any other step), with the whitespace their lstrip / rstrip eat
    for t in specials:
        pattern = (ws + "*" if t["lstrip"] else "") + _literal(t["content"]) + (ws + "*" if t["rstrip"] else "")
        steps.append(normalizers.Replace(Regex(pattern), mark[t["content"]]))
    if lower:  # str.lower(): Σ is ς at a word's end (Python's Final_Sigma rule), then per-character lowercase
        cased = r"[\p{Cased}&&[^\p{Case_Ignorable}]]"
        steps += [normalizers.Replace(
            Regex(rf"(?<={cased}\p{{Case_Ignorable}}*)\x{{3A3}}(?!\p{{Case_Ignorable}}*{cased})"), "\u03c2"),
            normalizers.Lowercase()]
    steps += [
        normalizers.Replace(Regex(_char_class(string.punctuation)), ""),  # remove_punctuation
        normalizers.Replace(Regex(ws + "+"), " "),  # re.sub(r"\s+", " ", text)
        normalizers.Replace(Regex(r" \z"), ""),  # strip() of the text's last piece
    ]
    # strip() of each piece beside a special token
    steps += [normalizers.Replace(Regex(f" ?{m} ?"), m) for m in mark.values()]
    if sp.charsmap:
        steps += _charsmap_steps(sp.charsmap)
    steps += [
        # "▁" in front of the text's first piece: SentencePiece reads it as a space (so a space there is no other
        # "▁"), and drops it with the trailing spaces when nothing comes after it
        normalizers.Prepend(" "),
        normalizers.Replace(Regex(" {2,}"), " "),  # remove_extra_whitespaces: runs of spaces made one,
        *[normalizers.Replace(Regex(f" +{m}"), m) for m in mark.values()],  # the trailing ones of each piece
        normalizers.Replace(Regex(r" +\z"), ""),  # dropped
    ]
    if eos in mark:  # a text that ends with its end-of-text token gets no other (the post-processor adds it)
        steps.append(normalizers.Replace(Regex(mark[eos] + r"\z"), ""))
    steps += [
        normalizers.Replace(" ", SPACE),
        *[normalizers.Replace(m, content) for content, m in mark.items()],
    ]
    tok = Tokenizer(models.Unigram([(p, s) for p, s, _ in sp.pieces], unk_id=sp.unk_id, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(steps)
    if specials:  # each special token its own word: next to an unknown character (or <unk>) it is not fused with it
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(_literal(t["content"]) for t in specials)),
                                                 behavior="isolated")
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    if eos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:0 {eos}:0", special_tokens=[(eos, vocab[eos])])
    return tok


def _literal(text: str) -> str:
    """A regex matching exactly ``text``."""
    return "".join(f"\\x{{{ord(c):X}}}" for c in text)


def write_siglip_tokenizer(folder: Path, source: object = None) -> bool:
    """Write ``folder/tokenizer.json`` from ``folder/spiece.model`` and ``folder/tokenizer_config.json`` when the
    folder is a SigLIP v1 one (spiece.model, no tokenizer.json, SiglipTokenizer or no tokenizer class named).

    Reads only the files in ``folder`` (the converter's checked copies); ``source`` only names the checkpoint in
    messages. A spiece.model that cannot be rebuilt exactly is a warning, not an error: the model still embeds
    images and token ids. Returns whether tokenizer.json was written.
    """
    folder = Path(folder)
    where = source if source is not None else folder
    if (folder / "tokenizer.json").exists() or not (folder / SPIECE_FILE).is_file():
        return False
    no_texts = ("the model will embed images and token ids but not texts (send ids from transformers' "
                "SiglipTokenizer, input kind 'tokens')")
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")) \
            if (folder / "tokenizer_config.json").is_file() else {}
    except (OSError, ValueError) as exc:
        log.warning("%s: tokenizer_config.json is not readable JSON (%s): no tokenizer.json built from %s; %s",
                    where, exc, SPIECE_FILE, no_texts)
        return False
    if not isinstance(config, dict):
        config = {}
    cls = config.get("tokenizer_class")
    if cls not in (None, "SiglipTokenizer"):
        log.warning("%s has %s for a %s, not a SiglipTokenizer: no tokenizer.json built; %s", where, SPIECE_FILE,
                    cls, no_texts)
        return False
    try:
        tok = build_siglip_tokenizer((folder / SPIECE_FILE).read_bytes(), config)
    except (SpieceError, UnicodeDecodeError) as exc:
        log.warning("%s: could not build tokenizer.json from %s (%s); %s", where, SPIECE_FILE, exc, no_texts)
        return False
    tok.save(str(folder / "tokenizer.json"))
    log.info("%s: built tokenizer.json from %s (SiglipTokenizer's ids)", where, SPIECE_FILE)
    return True
