"""Cross-encoder rerankers: BertForSequenceClassification, XLMRobertaForSequenceClassification and
RobertaForSequenceClassification, as sentence-transformers' ``CrossEncoder`` runs them (cross-encoder/ms-marco-*,
BAAI/bge-reranker-*).

Reference: transformers 5.25 ``models/bert/modeling_bert.py`` (BertForSequenceClassification: BertModel, its pooler,
a classifier Linear) and ``models/roberta/modeling_roberta.py`` / ``xlm_roberta`` (the classification head), and
sentence-transformers 6.3 ``cross_encoder/model.py`` (``CrossEncoder.predict``). A pair is tokenized as the HF
tokenizer tokenizes text pairs (engine.tokenizer ``encode_pairs``) and scored:

- the encoder is engine.bert's (the same blocks, positions and masks as the sentence-transformers there), given the
  tokenizer's token type ids where the model reads them (BERT: 0 for the query and its special tokens, 1 for the
  document; RoBERTa / XLM-R's tokenizers pass none, so every token is type 0);
- the head reads the first token's state: BERT ``classifier(tanh(pooler.dense(h)))``, RoBERTa / XLM-R
  ``classifier.out_proj(tanh(classifier.dense(h)))``, giving ``num_labels`` logits (dropout is off at inference);
- then the activation sentence-transformers applies in ``predict`` (:func:`score_activation`), in fp32.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import bert
from engine.config import (BertConfig, bert_encoder_config, config_size, length_cap, read_json, st_module_names,
                           st_prompts, tokenizer_config)
from engine.config_check import ShapeCheck, check_config_against_weights
from engine.errors import ModelConfigError
from engine.layers import Linear
from engine.registry import Parts, TextSide

log = logging.getLogger(__name__)

# HF architecture -> (the head, the encoder model_types it sits on)
HEADS: dict[str, tuple[str, tuple[str, ...]]] = {
    "BertForSequenceClassification": ("bert", ("bert",)),
    "XLMRobertaForSequenceClassification": ("roberta", ("xlm-roberta",)),
    "RobertaForSequenceClassification": ("roberta", ("roberta",)),
}
# What predict applies to the logits, by torch.nn class name (the last part of the configured path).
ACTIVATIONS: dict[str, Any] = {
    "Identity": lambda x: x,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Softmax": lambda x: torch.softmax(x, dim=-1),  # nn.Softmax() on (rows, labels) picks the labels' dim
}


@dataclass(frozen=True)
class RerankerConfig:
    """A cross-encoder as sentence-transformers' CrossEncoder runs it (config.json and, in its 6.x layout,
    modules.json and config_sentence_transformers.json)."""

    encoder: BertConfig  # max_seq_length: the most tokens a pair keeps (special tokens included)
    architecture: str  # one of HEADS
    labels: int  # num_labels: scores per pair
    activation: str  # one of ACTIVATIONS
    prompt: str = ""  # the default prompt's text, put before every query
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt: str | None = None

    @property
    def head(self) -> str:
        """"bert" (pooler + classifier) or "roberta" (classifier.dense + classifier.out_proj)."""
        return HEADS[self.architecture][0]

    @property
    def token_types(self) -> bool:
        """Whether the tokenizer's token type ids reach the model (BERT's tokenizer returns them; RoBERTa's and
        XLM-R's do not, so their models see type 0 everywhere)."""
        return self.encoder.model_type == "bert" and self.encoder.type_vocab_size > 1


def reranker_config(model_dir: Path) -> RerankerConfig:
    """Read a cross-encoder's folder: a HF ``*ForSequenceClassification`` checkpoint, with or without the
    sentence-transformers 6.x files around it (modules.json naming one Transformer module).

    Raises:
        ModelConfigError: another architecture or module list, a config that is not the weights', an activation
            other than :data:`ACTIVATIONS`.
    """
    model_dir = Path(model_dir)
    cfg = read_json(model_dir, "config.json")
    where = f"{model_dir}/config.json"
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in HEADS:
        raise ModelConfigError(f"{where}: architectures {archs!r:.200}; a reranker is one of {sorted(HEADS)}")
    encoder = bert_encoder_config(cfg, where, HEADS[arch][1])
    labels = _num_labels(cfg, where)
    modules = read_json(model_dir, "modules.json", optional=True, kind=object)
    st: dict[str, Any] = {}
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt = None
    max_length: Any = None
    if modules is not None:  # sentence-transformers 6.x CrossEncoder layout
        names = st_module_names(modules)
        if names != ["Transformer"]:
            raise ModelConfigError(f"{model_dir}/modules.json: a CrossEncoder of one Transformer module is supported; "
                                   f"got the modules {names!r:.200}")
        st = read_json(model_dir, "config_sentence_transformers.json", optional=True) or {}
        prompts, default_prompt = st_prompts(model_dir)
        module_cfg = read_json(model_dir, "sentence_bert_config.json", optional=True) or {}
        task = module_cfg.get("transformer_task", "sequence-classification")
        if task != "sequence-classification":
            raise ModelConfigError(f"{model_dir}/sentence_bert_config.json: transformer_task {task!r:.100}; a "
                                   "reranker is 'sequence-classification'")
        max_length = module_cfg.get("max_seq_length")
    if max_length is None:
        max_length = tokenizer_config(model_dir).get("model_max_length")
    encoder = dataclasses.replace(encoder, max_seq_length=length_cap(max_length, encoder.positions))
    prompt = dict(prompts).get(default_prompt, "") if default_prompt else ""
    return RerankerConfig(encoder=encoder, architecture=arch, labels=labels,
                          activation=score_activation(cfg, st, labels, model_dir),
                          prompt=prompt, prompts=prompts, default_prompt=default_prompt if prompt else None)


def _num_labels(cfg: dict[str, Any], where: str) -> int:
    """transformers' ``num_labels``: one per entry of ``id2label`` (what save_pretrained writes), else the
    ``num_labels`` key, else 2 (PretrainedConfig's default)."""
    id2label = cfg.get("id2label")
    if id2label is not None:
        if not isinstance(id2label, dict) or not id2label:
            raise ModelConfigError(f"{where}: id2label should map label indices to names, got {id2label!r:.200}")
        return config_size({"id2label": len(id2label)}, "id2label", None, where, maximum=1 << 20)
    return config_size(cfg, "num_labels", 2, where, maximum=1 << 20)


def score_activation(cfg: dict[str, Any], st: dict[str, Any], labels: int, model_dir: Path) -> str:
    """The activation CrossEncoder.predict applies to the logits, found as sentence-transformers 6.3 finds it:
    config_sentence_transformers.json's ``activation_fn`` (the 6.x layout, ``st``), else config.json's
    ``sentence_transformers.activation_fn`` (4.x-5.x), else its ``sbert_ce_default_activation_function``
    (before 4.0); a path outside ``torch.`` is not trusted (sentence-transformers then warns and falls back, and
    so does this). The fallback: Sigmoid for one label, else Identity.

    Raises:
        ModelConfigError: a torch activation other than :data:`ACTIVATIONS`.
    """
    def trusted(key: str, path: Any) -> str | None:
        if path is None:
            return None
        if not isinstance(path, str) or not path.startswith("torch."):
            log.warning("%s: %s %r is not a torch activation: not trusted (sentence-transformers needs "
                        "trust_remote_code for it); using the default", model_dir, key, path)
            return None
        name = path.rsplit(".", 1)[-1]
        if name not in ACTIVATIONS:
            raise ModelConfigError(f"{model_dir}: {key} is {path!r:.200}; supported: torch.nn's {sorted(ACTIVATIONS)}")
        return name

    if st.get("activation_fn") is not None:
        name = trusted("config_sentence_transformers.json activation_fn", st["activation_fn"])
        if name:
            return name
    section = cfg.get("sentence_transformers")
    if isinstance(section, dict) and "activation_fn" in section:
        name = trusted("config.json sentence_transformers.activation_fn", section["activation_fn"])
    elif cfg.get("sbert_ce_default_activation_function") is not None:
        name = trusted("config.json sbert_ce_default_activation_function", cfg["sbert_ce_default_activation_function"])
    else:
        name = None
    if name:
        return name
    return "Sigmoid" if labels == 1 else "Identity"


class _Pooler(nn.Module):
    """BERT's pooler: ``dense`` (then tanh) over the first token's state."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = Linear(width, width)


class _ClassificationHead(nn.Module):
    """RoBERTa / XLM-R's classification head: ``out_proj(tanh(dense(h)))`` over the first token's state."""

    def __init__(self, width: int, labels: int) -> None:
        super().__init__()
        self.dense = Linear(width, width)
        self.out_proj = Linear(width, labels)


class CrossEncoder(bert.SentenceBert):
    """A BERT-family encoder with a sequence-classification head. :meth:`score_pairs` gives (B, labels) float32
    scores after the activation."""

    INT8_FLOAT_MODULES = ("pooler", "classifier")  # engine.quantize keeps the head in float: scores are its output

    def __init__(self, cfg: RerankerConfig) -> None:
        super().__init__(cfg.encoder)
        self.reranker = cfg
        width = cfg.encoder.tower.width
        if cfg.head == "bert":
            self.pooler = _Pooler(width)
            self.classifier = Linear(width, cfg.labels)
        else:
            self.classifier = _ClassificationHead(width, cfg.labels)
        self._activation = ACTIVATIONS[cfg.activation]

    def score_pairs(self, ids: torch.Tensor, types: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids, types (B, T) right-padded token ids and token type ids; lengths (B,). Returns (B, labels) float32
        scores."""
        x, _ = self.hidden(ids, lengths, types if self.reranker.token_types else None)
        first = x[:, 0]  # (B, C)
        if self.reranker.head == "bert":
            logits = self.classifier(torch.tanh(self.pooler.dense(first)))  # (B, labels)
        else:
            head = self.classifier
            logits = head.out_proj(torch.tanh(head.dense(first)))  # (B, labels)
        return self._activation(logits.float())


def load_parts(path: Path, shapes: Mapping[str, tuple[int, ...]], weights: str = "weights.arrow") -> Parts:
    """The cross-encoder of a converted folder: its configs read and checked against the weights' ``shapes``,
    the network built (parameters on the meta device), and the pair front end's settings."""
    cfg = reranker_config(path)
    check_config_against_weights(*weight_checks(cfg), shapes, path, weights)
    enc = cfg.encoder
    text = TextSide(max_length=enc.max_seq_length, max_tokens=enc.positions, vocab_size=enc.vocab_size,
                    prompt=cfg.prompt, prompts=cfg.prompts, default_prompt=cfg.default_prompt)
    return Parts(net=CrossEncoder(cfg), config=cfg, dim=cfg.labels, text=text, score_activation=cfg.activation)


def weight_checks(cfg: RerankerConfig) -> tuple[list, list[ShapeCheck]]:
    """The encoder's block counts and shapes (engine.bert) and the head's."""
    counts, checks = bert.weight_checks(cfg.encoder)
    conf, width = "config.json", ("hidden_size", cfg.encoder.tower.width)
    labels = ("num_labels (id2label)", cfg.labels)
    if cfg.head == "bert":
        checks += [ShapeCheck("pooler.dense.weight", (width, width), conf),
                   ShapeCheck("classifier.weight", (labels, width), conf)]
    else:
        checks += [ShapeCheck("classifier.dense.weight", (width, width), conf),
                   ShapeCheck("classifier.out_proj.weight", (labels, width), conf)]
    return counts, checks
