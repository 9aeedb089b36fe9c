"""Random-weight checkpoints at the REAL full geometries (every layer) of four embedding models, built offline at a
fixed seed and converted once, cached under ``bench/.cache/models/`` (for ``bench/models.py``):

    siglip      google/siglip-base-patch16-224: SiglipModel (vision 768 wide, 12 layers, 12 heads, MLP 3072, patch 16,
                224 px; text 768, 12 layers, vocabulary 32,000, 64 positions) + SiglipImageProcessor's config (resize
                to 224 x 224, bicubic, mean / std 0.5, no crop)
    modernbert  Alibaba-NLP/gte-modernbert-base: ModernBertModel (768, 22 layers, 12 heads, MLP 1152, window 128,
                global every 3rd layer, RoPE thetas 160,000 / 10,000, vocabulary 50,368) -> CLS pooling -> Normalize,
                max_seq_length 8192
    qwen3       Qwen/Qwen3-Embedding-0.6B: Qwen3Model (1024, 28 layers, 16 heads / 8 KV heads of 128, MLP 3072, theta
                1e6) -> last-token pooling -> Normalize, its query prompt, max_seq_length 8192; vocabulary = the
                stand-in tokenizer's (29,439 instead of 151,669: only the embedding table's size changes)
    gemma       google/embeddinggemma-300m: Gemma3TextModel, bidirectional (768, 24 layers, 3 heads / 1 KV head of
                256, MLP 1152, query_pre_attn_scalar 256, window 512, every 6th layer full, thetas 1e6 / 1e4) -> mean
                pooling -> Dense 768->3072 -> Dense 3072->768 -> Normalize, its prompts, max_seq_length 2048;
                vocabulary = the stand-in tokenizer's (50,000 instead of 262,144)

Weights: matrices N(0, 1/fan_in), norm weights 1 + 0.1 N(0, 1) (Gemma's, stored as w in (1 + w): 0.1 N(0, 1)), biases
0.02 N(0, 1). Tokenizers: ``bench/models_text.py`` (stand-ins).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bench import data, models_text

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent / ".cache" / "models"
VERSION = "v1"  # bump to rebuild every cached checkpoint
QWEN_QUERY = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
GEMMA_PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: ",
                 "Clustering": "task: clustering | query: ", "Classification": "task: classification | query: ",
                 "STS": "task: sentence similarity | query: ", "Summarization": "task: summarization | query: "}
# the prompt each text benchmark encodes with (sentence-transformers' prompt_name = ours)
PROMPT_NAME = {"modernbert": None, "qwen3": "query", "gemma": "query"}


@dataclass(frozen=True)
class Built:
    name: str
    source: Path  # HF folder (siglip) or sentence-transformers folder (text models)
    arrow: Path  # converted, fp32
    build_s: float  # 0 when cached


def randomize(model, seed: int, norm_center: float = 1.0) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name.lower() and name.endswith("weight"):
                p.copy_(norm_center + 0.1 * noise)
            elif p.ndim <= 1:
                p.copy_(0.02 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


def _new(cls, config, seed: int, norm_center: float = 1.0):
    from transformers.initialization import no_init_weights

    with no_init_weights():  # transformers' own init takes tens of seconds at these sizes: ours instead
        model = cls(config).eval()
    randomize(model, seed, norm_center)
    return model


def _st_modules():
    try:  # sentence-transformers >= 6
        from sentence_transformers.base.modules import Dense, Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    return Transformer, Pooling, Dense, Normalize


def _sentence_transformer(hf: Path, st: Path, max_seq: int, pooling: str, dense: tuple = (),
                          prompts: dict | None = None, seed: int = 1) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    Transformer, Pooling, Dense, Normalize = _st_modules()
    modules = [Transformer(str(hf), max_seq_length=max_seq)]
    width = modules[0].auto_model.config.hidden_size
    modules.append(Pooling(width, pooling_mode=pooling))
    g = torch.Generator().manual_seed(seed)
    for n_out in dense:  # EmbeddingGemma's: no bias, Identity
        modules.append(Dense(width, n_out, bias=False, activation_function=torch.nn.Identity()))
        with torch.no_grad():
            modules[-1].linear.weight.copy_(torch.randn(n_out, width, generator=g) / width ** 0.5)
        width = n_out
    modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu", prompts=prompts or {}, default_prompt_name=None).save(str(st))


# ---------------------------------------------------------------------------------------------- the four models
def _siglip(src: Path, corpus: list[str], seed: int) -> None:
    from transformers import SiglipConfig, SiglipModel

    src.mkdir(parents=True)
    models_text.t5_tokenizer(src, corpus)
    tower = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    config = SiglipConfig(text_config=dict(tower, vocab_size=32000, max_position_embeddings=64),
                          vision_config=dict(tower, image_size=224, patch_size=16))
    model = _new(SiglipModel, config, seed)
    import torch

    with torch.no_grad():  # trained-like values: a sigmoid score that is not flat
        model.logit_scale.fill_(2.302585)
        model.logit_bias.fill_(-10.0)
    model.save_pretrained(str(src))
    (src / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor"}))


def _modernbert(st: Path, corpus: list[str], seed: int) -> None:
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertModel

    hf = st.with_name("hf")
    hf.mkdir(parents=True)
    models_text.modernbert_tokenizer(hf, corpus)
    tok = AutoTokenizer.from_pretrained(str(hf))
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    config = ModernBertConfig(
        vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12,
        local_attention=128, global_attn_every_n_layers=3, max_position_embeddings=8192, hidden_activation="gelu",
        norm_eps=1e-5, pad_token_id=ids["[PAD]"], bos_token_id=ids["[CLS]"], cls_token_id=ids["[CLS]"],
        eos_token_id=ids["[SEP]"], sep_token_id=ids["[SEP]"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 160_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    _new(ModernBertModel, config, seed).save_pretrained(str(hf))
    _sentence_transformer(hf, st, 8192, "cls")


def _qwen3(st: Path, corpus: list[str], seed: int) -> None:
    from transformers import Qwen3Config, Qwen3Model

    hf = st.with_name("hf")
    hf.mkdir(parents=True)
    vocab = models_text.qwen3_tokenizer(hf, corpus)
    eot = vocab - 3  # <|endoftext|>, then <|im_start|>, <|im_end|>
    config = Qwen3Config(vocab_size=vocab, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True,
                         bos_token_id=eot, eos_token_id=eot)
    _new(Qwen3Model, config, seed).save_pretrained(str(hf))
    _sentence_transformer(hf, st, 8192, "lasttoken", prompts={"query": QWEN_QUERY, "document": ""})


def _gemma(st: Path, corpus: list[str], seed: int) -> None:
    from transformers import Gemma3TextConfig, Gemma3TextModel

    hf = st.with_name("hf")
    hf.mkdir(parents=True)
    vocab = models_text.gemma_tokenizer(hf, corpus)
    layers = 24
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=768, intermediate_size=1152, num_hidden_layers=layers, num_attention_heads=3,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        max_position_embeddings=2048, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", use_bidirectional_attention=True, pad_token_id=0, eos_token_id=1,
        bos_token_id=2)
    _new(Gemma3TextModel, config, seed, norm_center=0.0).save_pretrained(str(hf))
    _sentence_transformer(hf, st, 2048, "mean", dense=(3072, 768), prompts=GEMMA_PROMPTS)


BUILDERS = {"siglip": _siglip, "modernbert": _modernbert, "qwen3": _qwen3, "gemma": _gemma}


def build(name: str, seed: int = 0) -> Built:
    """The cached checkpoint ``name`` (made and converted on first use: 10 s to 2 min each on 2 cores)."""
    root = ROOT / f"{name}-seed{seed}-{VERSION}"
    source, arrow = root / ("hf" if name == "siglip" else "st"), root / "arrow"
    if (arrow / "manifest.json").exists():
        return Built(name, source, arrow, 0.0)
    from convert.pipeline import convert_checkpoint

    t0 = time.perf_counter()
    log.info("building %s at its full geometry in %s (once)", name, root)
    if root.exists():
        shutil.rmtree(root)
    data.cache_dir()  # bench/.cache with its .gitignore
    root.mkdir(parents=True)
    BUILDERS[name](source, models_text.training_corpus(), seed)
    if name != "siglip":
        shutil.rmtree(root / "hf")  # st/ holds a copy of everything in it
    convert_checkpoint(source, arrow, progress=False)
    return Built(name, source, arrow, time.perf_counter() - t0)


def tokenizer_json(b: Built) -> Path:
    return b.arrow / "tokenizer.json"


def prompt_text(b: Built) -> str:
    name = PROMPT_NAME.get(b.name)
    if name is None:
        return ""
    return json.loads((b.source / "config_sentence_transformers.json").read_text())["prompts"][name]
