"""OpenAI CLIP's tokenizer, rebuilt from its BPE merges file with no download.

``bpe_simple_vocab_16e6.txt.gz`` (MIT, OpenAI; also shipped by open_clip) defines the
49,408-token vocabulary of every OpenAI CLIP model: 256 byte symbols, the same with
``</w>``, the first 48,894 merges, then ``<|startoftext|>`` and ``<|endoftext|>``.
Useful for CLIP checkpoints that come without tokenizer files, and for making test and
benchmark checkpoints offline.
"""
from __future__ import annotations

import gzip
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # merges used by the released CLIP vocabulary


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def clip_vocab_and_merges(bpe_file: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary (token -> id) and its merges, read from the gzipped merges file."""
    lines = gzip.open(bpe_file, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(out: str | Path, bpe_file: str | Path, max_length: int = 77) -> None:
    """Write HF CLIP tokenizer files (tokenizer.json, tokenizer_config.json, ...) into ``out``.

    Needs ``transformers`` (the ``convert`` extra).
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(bpe_file)
    CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_length).save_pretrained(str(out))
