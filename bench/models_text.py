"""Inputs of ``bench/models.py`` for the text models: English texts of mixed length and one stand-in tokenizer per
family, all made offline from text that ships with Python, deterministic (fixed seeds).

Texts: prose paragraphs of the CPython reference (``pydoc_data.topics``, the text of ``help('topics')``) cut into
sentences, paragraphs and runs of paragraphs, 10-300 tokens. Only the topics of one half (a seeded split) are used.

Tokenizers (STAND-INS: the real ones cannot be downloaded): byte-level / byte-fallback BPEs trained with the
``tokenizers`` library on the other half of the topics plus the docstrings of the standard library (~1.7 MB of
English technical prose, disjoint from the texts, so words the vocabulary has not seen split as they would with a
real one), each with its family's normalizer, pre-tokenizer, special tokens and post-processor:
    modernbert  NFC, ByteLevel, [CLS] $A [SEP] (as gte-modernbert-base's; real vocabulary 50,368)
    qwen3       NFC, Qwen2's split regex + ByteLevel, $A <|endoftext|> (as Qwen3-Embedding's; real 151,669)
    gemma       spaces as "▁", byte fallback, <bos> $A <eos> (transformers' GemmaTokenizer; real 262,144)
"""
from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path

VOCAB = 50_000  # BPE tokens asked of the trainer (it stops earlier once every word of the corpus is one token)
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


# ---------------------------------------------------------------------------------------------- corpus
def _topics() -> tuple[list[str], list[str]]:
    """(topics the texts come from, topics the tokenizers learn from): a seeded half each."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    random.Random(0).shuffle(keys)
    half = len(keys) // 2
    return [topics[k] for k in sorted(keys[:half])], [topics[k] for k in sorted(keys[half:])]


def _docstrings() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if parts[0] in ("test", "site-packages", "idlelib", "lib2to3") or "tests" in parts:
            continue
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc)
    return out


def training_corpus() -> list[str]:
    return _topics()[1] + _docstrings()


def _paragraphs(topic: str) -> list[str]:
    """Prose paragraphs of a topic: blocks between blank lines with no indented (code, grammar) line and no
    heading underline, joined into one line."""
    out = []
    for block in re.split(r"\n\s*\n", topic):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines or any(ln[:1].isspace() for ln in lines) or re.fullmatch(r"[*=\-~^]+", lines[-1].strip()):
            continue
        text = " ".join(" ".join(lines).split())
        if len(text.split()) >= 6 and sum(c.isalpha() for c in text) > 0.6 * len(text):
            out.append(text)
    return out


def make_texts(n: int, count_tokens, seed: int = 0, lo: int = 10, hi: int = 300) -> list[str]:
    """``n`` texts of ``lo``-``hi`` tokens (``count_tokens(text)``, special tokens included): ~40 % sentences,
    ~40 % paragraphs, ~20 % runs of consecutive paragraphs (up to ``hi`` tokens), shuffled."""
    pools: dict[str, list[str]] = {"sentence": [], "paragraph": [], "run": []}
    for topic in _topics()[0]:
        paras = _paragraphs(topic)
        for p in paras:
            pools["paragraph"].append(p)
            pools["sentence"] += [s for s in re.split(r"(?<=[.!?:])\s+(?=[A-Z])", p) if len(s.split()) >= 6]
        for i in range(len(paras) - 1):
            run = paras[i]
            for nxt in paras[i + 1:]:
                if count_tokens(run + " " + nxt) > hi:
                    break
                run += " " + nxt
            if run != paras[i]:
                pools["run"].append(run)
    rng = random.Random(seed)
    out, seen = [], set()
    for kind, share in (("sentence", 0.4), ("paragraph", 0.4), ("run", 0.2)):
        pool = [t for t in dict.fromkeys(pools[kind]) if lo <= count_tokens(t) <= hi and t not in seen]
        rng.shuffle(pool)
        take = pool[: round(n * share)] if kind != "run" else pool[: n - len(out)]
        seen.update(take)
        out += take
    if len(out) < n:
        raise SystemExit(f"only {len(out)} texts of {lo}-{hi} tokens in pydoc_data.topics; ask for fewer")
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------------------------------------- tokenizers
def _train_bpe(tok, corpus: list[str], specials: list[str]):
    from tokenizers import pre_tokenizers, trainers

    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=VOCAB, show_progress=False, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(specials)  # after the BPE vocabulary, as both real tokenizers have them
    return tok


def modernbert_tokenizer(out: Path, corpus: list[str]) -> int:
    """ModernBERT's layout (OLMo-style byte-level BPE); returns the vocabulary size."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    _train_bpe(tok, corpus, ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                            pad_token="[PAD]", mask_token="[MASK]", model_max_length=8192,
                            model_input_names=["input_ids", "attention_mask"]).save_pretrained(str(out))
    return tok.get_vocab_size()


def qwen3_tokenizer(out: Path, corpus: list[str]) -> int:
    """Qwen3-Embedding's layout: the Qwen2 split regex, byte-level BPE, <|endoftext|> appended, left padding."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    _train_bpe(tok, corpus, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    eot = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A:0 <|endoftext|>:0", pair="$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", eot)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "padding_side": "left", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None}))
    return tok.get_vocab_size()


def gemma_tokenizer(out: Path, corpus: list[str]) -> int:
    """Gemma's layout as transformers' GemmaTokenizer builds it: <pad> <eos> <bos> <unk> <mask> = 0-4, the 256 byte
    tokens, then BPE pieces with "▁" for spaces (trained per word, "▁" leading), <bos> $A <eos>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=VOCAB - 261, show_progress=False,
                                                         limit_alphabet=400))
    trained = json.loads(bpe.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=True)
    tok.save_pretrained(str(out))
    return len(tok)


def t5_tokenizer(out: Path, corpus: list[str], size: int = 8000, max_length: int = 64) -> int:
    """SigLIP's text side (T5-style SentencePiece unigram, ``</s>`` end and pad, SigLIP's canonicalization). The
    benchmark times images only; this makes the folder complete (AutoProcessor loads it)."""
    import string

    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([
        normalizers.Lowercase(), normalizers.Replace(Regex("[" + re.escape(string.punctuation) + "]"), ""),
        normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=size, show_progress=False, unk_token="<unk>",
                                                            special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="</s>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=max_length).save_pretrained(str(out))
    return tok.get_vocab_size()


def token_counter(tokenizer_json: Path, prompt: str = ""):
    """``count(text)``: token ids of ``prompt + text`` with the special tokens (what the model runs)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    return lambda text: len(tok.encode(prompt + text).ids)
