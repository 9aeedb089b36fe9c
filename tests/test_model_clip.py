"""CLIP parity against HuggingFace's own CLIPModel on the same weights, and the model API."""
from __future__ import annotations


import numpy as np
import pyarrow as pa
import pytest
import torch

import engine
from engine.config import ACTIVATIONS
from engine.errors import InputError, PrecisionError, RowErrors

TEXTS = [
    "a photo of a cat",
    "",
    "A diagram of the Falcon 9 rocket on its launch pad at dawn, with steam rising",
    "word " * 120,  # truncated at the model's positions, end-of-text kept
    "Ünïcode: café, naïve, 日本語",
]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _hf(source):
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(str(source)).eval(), AutoTokenizer.from_pretrained(str(source))


def _check_parity(source, model_dir, seed=0):
    hf, tok = _hf(source)
    model = engine.load_model(model_dir)
    cfg = model.config
    ours = model.encode_text(TEXTS, normalize=False)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=cfg.text.max_positions, return_tensors="pt")
    with torch.no_grad():
        ref = hf.get_text_features(**enc).pooler_output.numpy()
    assert ours.dtype == np.float32 and ours.flags.c_contiguous and ours.shape == (len(TEXTS), cfg.projection_dim)
    assert _cos(ours, ref).min() >= 0.99999
    assert np.abs(ours - ref).max() <= 1e-4

    g = torch.Generator().manual_seed(seed)
    px = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ours = model.encode_pixels(px.numpy(), normalize=False)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=px).pooler_output.numpy()
    assert _cos(ours, ref).min() >= 0.99999
    assert np.abs(ours - ref).max() <= 1e-4
    return model


def test_tiny_clip_parity(checkpoints, tiny_clip_source, tiny_clip_dir):
    _check_parity(tiny_clip_source, tiny_clip_dir)


def test_unusual_clip_parity(checkpoints):
    """gelu, image 170 with patch 20 (8x8 patches, 10 pixels dropped as HF's conv does), projection 72,
    64 positions, eps 1e-6."""
    src = checkpoints.clip_source("odd")
    model = _check_parity(src, checkpoints.converted(src, "odd"))
    assert model.info.dim == 72 and model.config.vision.patch_size == 20 and model.config.vision.grid == 8


@pytest.mark.slow
def test_b32_clip_parity(checkpoints):
    src = checkpoints.clip_source("b32")
    model = _check_parity(src, checkpoints.converted(src, "b32"))
    assert model.info.dim == 512


def _variant(src, tmp_path, name, edit):
    """A copy of the HF folder ``src`` changed by ``edit(folder)``, converted; returns the loaded model."""
    import shutil

    from convert.pipeline import convert_checkpoint

    folder = tmp_path / name
    shutil.copytree(src, folder)
    edit(folder)
    convert_checkpoint(folder, tmp_path / f"{name}-converted", progress=False)
    return engine.load_model(tmp_path / f"{name}-converted")


def test_checkpoint_layouts_that_transformers_loads(tiny_clip_source, tiny_clip_dir, tmp_path, caplog):
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, CLIPConfig

    photo = (Path(__file__).parent / "data" / "photos" / "rocket.jpg").read_bytes()
    base = engine.load_model(tiny_clip_dir)
    want = base.encode_image([photo])

    def hf5_processor(folder):  # transformers 5's CLIPProcessor.save_pretrained: no preprocessor_config.json
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        (folder / "processor_config.json").write_text(json.dumps({"image_processor": pre,
                                                                  "processor_class": "CLIPProcessor"}))
        (folder / "preprocessor_config.json").unlink()

    np.testing.assert_array_equal(_variant(tiny_clip_source, tmp_path, "hf5", hf5_processor).encode_image([photo]),
                                  want)
    # no image processor file at all: CLIPImageProcessor's defaults at the model's size (the tiny one's own)
    no_proc = _variant(tiny_clip_source, tmp_path, "noproc", lambda f: (f / "preprocessor_config.json").unlink())
    np.testing.assert_array_equal(no_proc.encode_image([photo]), want)
    assert "no preprocessor_config.json" in caplog.text

    # no tokenizer: images and token ids still work, texts are a clear error
    def no_tokenizer(folder):
        for name in ("tokenizer.json", "vocab.json", "merges.txt"):
            (folder / name).unlink(missing_ok=True)
    no_tok = _variant(tiny_clip_source, tmp_path, "notok", no_tokenizer)
    np.testing.assert_array_equal(no_tok.encode_image([photo]), want)
    ids = base.prepare_texts(["a photo of a cat"])[0]
    np.testing.assert_allclose(no_tok.encode_tokens(ids), base.encode_text(["a photo of a cat"]), atol=1e-6)
    with pytest.raises(InputError, match="tokenizer.json is missing.*token ids"):
        no_tok.encode_text(["a photo of a cat"])
    import pyarrow.flight as flight

    from flight_server.config import ServerConfig
    from flight_server.servicer import EmbeddingServer
    with EmbeddingServer({"clip": no_tok}, ServerConfig(port=0)) as server:
        server.warm_up()  # with an image: a text warm-up would fail and leave the server never ready
        ready = list(flight.connect(f"grpc://127.0.0.1:{server.port}").do_action(flight.Action("ready", b"")))
        assert json.loads(ready[0].body.to_pybytes())["ready"] is True

    # tokenizer_config.json's model_max_length below the positions: texts are cut there, as HF's truncation=True
    def short_tokenizer(folder):
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps(dict(cfg, model_max_length=16)))
    short = _variant(tiny_clip_source, tmp_path, "short", short_tokenizer)
    hf_ids = AutoTokenizer.from_pretrained(str(tmp_path / "short"))([TEXTS[2]], truncation=True)["input_ids"][0]
    assert short.prepare_texts([TEXTS[2]])[0][0].tolist() == hf_ids and len(hf_ids) == 16

    # an older config's text_config_dict overrides text_config, as transformers applies it
    def config_dict(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg["text_config_dict"] = {"hidden_act": "gelu"}
        (folder / "config.json").write_text(json.dumps(cfg))
    assert CLIPConfig.from_pretrained(str(tmp_path / "short")).text_config.hidden_act == "quick_gelu"
    overridden = _variant(tiny_clip_source, tmp_path, "cfgdict", config_dict)
    assert CLIPConfig.from_pretrained(str(tmp_path / "cfgdict")).text_config.hidden_act == "gelu"
    assert overridden.config.text.tower.act == "gelu" and overridden.config.vision.tower.act == "quick_gelu"


def test_normalized_by_default_and_similarity(tiny_clip_dir):
    model = engine.load_model(tiny_clip_dir)
    t = model.encode_text(["a cat", "a dog"])
    assert np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    s = model.similarity(t, t)
    assert s.shape == (2, 2) and np.allclose(np.diag(s), 1, atol=1e-5)


def test_embedding_does_not_depend_on_batch(tiny_clip_dir):
    model = engine.load_model(tiny_clip_dir)
    alone = np.concatenate([model.encode_text([t]) for t in TEXTS])
    together = model.encode_text(TEXTS)
    reordered = model.encode_text(TEXTS[::-1])[::-1]
    assert np.abs(alone - together).max() <= 1e-5
    assert np.abs(together - reordered).max() <= 1e-5


def test_tokens_equal_texts_and_bad_rows_are_row_errors(tiny_clip_dir, tiny_clip_source):
    from transformers import AutoTokenizer

    model = engine.load_model(tiny_clip_dir)
    ids = AutoTokenizer.from_pretrained(str(tiny_clip_source))(TEXTS[:3], truncation=True, max_length=77)["input_ids"]
    from_tokens = model.encode_tokens(pa.array(ids, type=pa.list_(pa.int32())))
    assert np.abs(from_tokens - model.encode_text(TEXTS[:3])).max() <= 1e-5

    bad = ids[:1] + [[49406, 60000, 49407], [49406] + [320] * 100 + [49407], [49406, 320], []] + ids[1:2]
    res = model.embed_tokens(bad)
    assert res.errors[0] is None and res.errors[-1] is None
    assert "60000" in res.errors[1] and "77" in res.errors[2] and "end-of-text" in res.errors[3]
    assert "empty" in res.errors[4]
    assert np.abs(res.embeddings[0] - from_tokens[0]).max() <= 1e-5
    assert not res.embeddings[1:5].any()
    with pytest.raises(RowErrors) as info:
        model.encode_tokens(bad)
    assert len([e for e in info.value.errors if e]) == 4


def test_images_with_bad_rows(tiny_clip_dir):
    import cv2

    model = engine.load_model(tiny_clip_dir)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, size=(300, 400, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", img)[1].tobytes()
    png = cv2.imencode(".png", img[:, :, 0])[1].tobytes()
    arr = pa.array([jpeg, b"not an image", png, None, jpeg[: len(jpeg) // 3]], type=pa.binary())
    res = model.embed_images(arr)
    assert res.errors[0] is None and res.errors[2] is None
    assert all(res.errors[i] for i in (1, 3, 4))
    good = model.encode_image([jpeg, png])
    assert np.abs(res.embeddings[[0, 2]] - good).max() <= 1e-5
    assert not res.embeddings[[1, 3, 4]].any()


@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_images_over_many_batches_any_prefetch_depth(tiny_clip_dir, prefetch):
    """Chunks decoded ahead (BatchLimits.prefetch) land on their own rows, bad rows included."""
    import cv2

    from engine.model import BatchLimits

    rng = np.random.default_rng(1)
    blobs = [cv2.imencode(".jpg", rng.integers(0, 255, size=(60 + 7 * i, 90, 3), dtype=np.uint8))[1].tobytes()
             for i in range(9)]
    blobs[4] = b"broken"
    model = engine.load_model(tiny_clip_dir, limits=BatchLimits(image_batch=2, prefetch=prefetch))
    res = model.embed_images(blobs)
    assert [i for i, e in enumerate(res.errors) if e] == [4]
    one_by_one = np.concatenate([model.encode_image([b]) for i, b in enumerate(blobs) if i != 4])
    assert np.abs(res.embeddings[[i for i in range(9) if i != 4]] - one_by_one).max() <= 1e-5
    assert not res.embeddings[4].any()


def test_gpu_text_shapes_give_the_same_embeddings(tiny_clip_dir):
    """Lengths rounded up to 8 with no padding cut (the CUDA default) change shapes, not results."""
    from engine.model import BatchLimits

    texts = [("word " * n).strip() for n in (1, 3, 9, 17, 30, 75, 200)] + TEXTS
    plain = engine.load_model(tiny_clip_dir)
    padded = engine.load_model(tiny_clip_dir, limits=BatchLimits(text_pad_to=8, text_max_padding=float("inf"),
                                                                 text_rows=4))
    groups = padded.text_groups([2, 5, 9, 16, 17, 77, 77, 40])
    assert sorted(i for g, _ in groups for i in g) == list(range(8))
    assert all(t % 8 == 0 or t == 77 for _, t in groups) and max(t for _, t in groups) == 77
    assert all(len(g) <= 4 for g, _ in groups)
    assert np.abs(plain.encode_text(texts) - padded.encode_text(texts)).max() <= 1e-5


def test_prefetch_below_one_is_a_clear_error(tiny_clip_dir):
    from engine.model import BatchLimits

    with pytest.raises(InputError, match="prefetch"):
        engine.load_model(tiny_clip_dir, limits=BatchLimits(prefetch=0))
    with pytest.raises(InputError, match="image_rows"):
        engine.load_model(tiny_clip_dir, limits=BatchLimits(image_rows=-1))


def test_forward_calls_split_by_tower_rows_give_the_same_embeddings(tiny_clip_dir, monkeypatch):
    """BatchLimits.image_rows cuts a batch into forward calls of rows // tokens-per-image images; results stay."""
    from engine.model import IMAGE_ROWS_CPU, BatchLimits

    whole = engine.load_model(tiny_clip_dir, limits=BatchLimits(image_rows=0))
    v = whole.config.vision
    tokens = (v.image_size // v.patch_size) ** 2 + 1  # patches + the class token
    split = engine.load_model(tiny_clip_dir, limits=BatchLimits(image_rows=2 * tokens + 1))  # 2 images a call
    assert split.image.tokens == tokens
    assert engine.load_model(tiny_clip_dir)._image_split == IMAGE_ROWS_CPU // tokens  # the CPU default
    pixels = torch.randn(7, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(0))
    calls = []
    forward = split.net.encode_image
    monkeypatch.setattr(split.net, "encode_image", lambda x: calls.append(x.shape[0]) or forward(x))
    got = split.encode_pixels(pixels)
    assert calls == [2, 2, 2, 1]
    assert np.abs(got - whole.encode_pixels(pixels)).max() <= 1e-5


def test_bf16_and_int8_modes_run_and_stay_close(tiny_clip_dir):
    ref = engine.load_model(tiny_clip_dir).encode_text(TEXTS)
    for precision, floor in (("bf16", 0.99), ("int8", 0.95)):
        got = engine.load_model(tiny_clip_dir, precision=precision).encode_text(TEXTS)
        assert got.dtype == np.float32
        assert _cos(got, ref).min() >= floor, precision


def test_int8_images_batched_on_onednn_match_each_image_alone_on_fbgemm(tiny_clip_dir):
    """A batch big enough for oneDNN's int8 GEMM (>= engine.quantize.ONEDNN_MIN_ROWS rows) gives each image the
    embedding it gets alone (fewer rows: fbgemm): same int8 levels, bit-identical GEMMs; only the fp32 parts
    sum in another order, which can move a value across a rounding edge (cosine 0.99993 at worst here)."""
    from engine import quantize

    model = engine.load_model(tiny_clip_dir, precision="int8")
    size = model.config.vision.image_size
    rng = np.random.default_rng(7)
    pixels = rng.standard_normal((24, 3, size, size), dtype=np.float32)
    batched = model.encode_pixels(pixels)
    alone = np.stack([model.encode_pixels(pixels[i:i + 1])[0] for i in range(len(pixels))])
    int8 = [m for m in model.net.modules() if isinstance(m, quantize.Int8Linear)]
    assert int8 and any(m._onednn is not None for m in int8) == quantize.onednn_int8_available()
    assert _cos(batched, alone).min() >= 0.999
    assert _cos(batched, engine.load_model(tiny_clip_dir).encode_pixels(pixels)).min() >= 0.99


def test_bad_precision_and_device_are_clear_errors(tiny_clip_dir):
    with pytest.raises(PrecisionError, match="expected one of"):
        engine.load_model(tiny_clip_dir, precision="fp8")
    with pytest.raises(PrecisionError, match="CUDA"):
        engine.load_model(tiny_clip_dir, precision="fp16")
    with pytest.raises(engine.ArrowEngineError, match="device"):
        engine.load_model(tiny_clip_dir, device="tpu")


def test_pixels_of_wrong_shape_rejected(tiny_clip_dir):
    model = engine.load_model(tiny_clip_dir)
    with pytest.raises(InputError, match="expected shape"):
        model.encode_pixels(np.zeros((1, 3, 100, 100), np.float32))


def test_weights_are_views_of_the_mapped_file(tiny_clip_dir):
    """fp32 from an fp32 file: every parameter points into the mapped weights file."""
    model = engine.load_model(tiny_clip_dir)
    maps = [line.split() for line in open("/proc/self/maps") if "weights.arrow" in line and str(tiny_clip_dir) in line]
    spans = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps]
    assert spans, "weights.arrow is not mapped"
    for name, p in model.net.named_parameters():
        ptr = p.data_ptr()
        assert any(lo <= ptr < hi for lo, hi in spans), name
        assert not p.requires_grad, name
    assert not any(m.training for m in model.net.modules())  # eval mode


@pytest.mark.parametrize("image_size, patch, batch", [(32, 8, 1), (30, 7, 3), (28, 14, 2)])
def test_patch_embedding_matmul_equals_strided_conv(image_size, patch, batch):
    """The patch embedding runs as a matmul over patches; it must equal HF's Conv2d(stride=patch, no bias),
    including sizes that patch does not divide (conv drops the remainder)."""
    from engine.clip import _VisionEmbeddings
    from engine.config import ClipVisionConfig, TowerConfig

    cfg = ClipVisionConfig(TowerConfig(width=16, layers=1, heads=2, mlp_width=32, act="quick_gelu", eps=1e-5),
                           image_size=image_size, patch_size=patch)
    emb = _VisionEmbeddings(cfg)
    g = torch.Generator().manual_seed(0)
    emb.patch_embedding.weight = torch.nn.Parameter(torch.randn(16, 3, patch, patch, generator=g), requires_grad=False)
    emb.class_embedding = torch.nn.Parameter(torch.randn(16, generator=g), requires_grad=False)
    emb.position_embedding.weight = torch.nn.Parameter(torch.randn(cfg.grid ** 2 + 1, 16, generator=g),
                                                       requires_grad=False)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    with torch.inference_mode():
        got = emb(pixels)
        conv = torch.nn.functional.conv2d(pixels, emb.patch_embedding.weight, stride=patch).flatten(2).transpose(1, 2)
    assert got.shape == (batch, cfg.grid ** 2 + 1, 16)
    assert torch.allclose(got[:, 1:], conv + emb.position_embedding.weight[1:], atol=1e-4)
    assert torch.allclose(got[:, 0], emb.class_embedding + emb.position_embedding.weight[0], atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_last_block_at_the_pooled_rows_equals_the_full_block(tiny_clip_dir, causal, fused):
    """The encoder's last block computes only the pooled positions: the same values as computing every
    position and picking those, for any position (causal or not, separate or fused q/k/v)."""
    from engine.layers import swap_linears

    model = engine.load_model(tiny_clip_dir)
    encoder = model.net.text_model.encoder
    if fused:  # one fp32 Linear for q, k and v, the layout int8 uses (exact here)
        def cat(lins):
            out = torch.nn.Linear(lins[0].in_features, sum(m.out_features for m in lins))
            out.weight.data = torch.cat([m.weight for m in lins])
            out.bias.data = torch.cat([m.bias for m in lins])
            return out
        swap_linears(encoder, lambda m: m, cat)
    assert (encoder.layers[-1].self_attn.qkv is not None) == fused
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 11, model.config.text.tower.width, generator=g)
    rows = torch.tensor([0, 10, 3, 7, 10])
    with torch.inference_mode():
        full = encoder(x, causal=causal)[torch.arange(5), rows]  # (B, C)
        pooled = encoder(x, causal=causal, rows=rows)  # (B, C)
    assert pooled.shape == full.shape
    torch.testing.assert_close(pooled, full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activations_match_hf(name):
    from transformers.activations import ACT2FN

    from engine.layers import activation

    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 4  # well into both tails
    want = ACT2FN[name](x.clone())
    y = activation(name)(x)  # may overwrite x: the MLPs give it the fresh output of fc1
    torch.testing.assert_close(y, want, rtol=1e-6, atol=2e-6)


# ---------------------------------------------------------------- one tower with its projection


def _single_tower(root, kind: str, projection: bool = True):
    """A random-weight CLIPVisionModelWithProjection (gelu, patch 12 on 60 px) or CLIPTextModelWithProjection
    (40 positions) saved as diffusers and IP-Adapter ship them; ``projection=False``: the bare tower."""
    import transformers
    from checkpoints import write_clip_tokenizer, write_preprocessor_config

    small = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, projection_dim=24)
    if kind == "vision":
        config = transformers.CLIPVisionConfig(image_size=60, patch_size=12, hidden_act="gelu", **small)
        cls = transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel
    else:
        config = transformers.CLIPTextConfig(max_position_embeddings=40, **small)
        cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    torch.manual_seed(3)
    src = root / f"{kind}-{'proj' if projection else 'bare'}"
    cls(config).eval().save_pretrained(str(src))
    if kind == "vision":
        write_preprocessor_config(src, 60, 60)
    else:
        write_clip_tokenizer(src)
    return src


@pytest.mark.parametrize("kind", ["vision", "text"])
def test_one_clip_tower_with_its_projection_runs_as_hf_runs_it(tmp_path, kind):
    """CLIPVisionModelWithProjection (IP-Adapter's image encoders) and CLIPTextModelWithProjection (diffusers'
    text encoders) convert to runnable models of one modality, equal to HF's image_embeds / text_embeds."""
    import transformers

    from convert.pipeline import convert_checkpoint
    from engine.errors import ModalityError

    src = _single_tower(tmp_path, kind)
    out = convert_checkpoint(src, tmp_path / "model", progress=False).out_dir
    model = engine.load_model(out)
    other = "text" if kind == "vision" else "image"
    assert model.info.modalities == (("image",) if kind == "vision" else ("text",)) and model.info.dim == 24
    if kind == "vision":
        hf = transformers.CLIPVisionModelWithProjection.from_pretrained(str(src)).eval()
        px = torch.randn(3, 3, 60, 60, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = hf(pixel_values=px).image_embeds.numpy()
        ours = model.encode_pixels(px.numpy(), normalize=False)
        embed = lambda m: m.encode_pixels(px.numpy())  # noqa: E731
        assert model.info.max_tokens == 0
    else:
        hf = transformers.CLIPTextModelWithProjection.from_pretrained(str(src)).eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(src))
        enc = tok(TEXTS, padding=True, truncation=True, max_length=40, return_tensors="pt")
        with torch.no_grad():
            ref = hf(**enc).text_embeds.numpy()
        ours = model.encode_text(TEXTS, normalize=False)
        embed = lambda m: m.encode_text(TEXTS)  # noqa: E731
        assert model.info.max_tokens == 40
    assert _cos(ours, ref).min() >= 0.99999 and np.abs(ours - ref).max() <= 1e-4
    with pytest.raises(ModalityError, match=f"has no {other} encoder"):
        model.encode_text(["a cat"]) if kind == "vision" else model.encode_image([b"\x89PNG"])
    fp32 = embed(model)
    for precision, floor in (("bf16", 0.999), ("int8", 0.99)):
        assert _cos(embed(engine.load_model(out, precision=precision)), fp32).min() >= floor, precision


def test_a_clip_tower_without_its_projection_is_stored_not_run(tmp_path):
    """CLIPVisionModel / CLIPTextModel have the towers' model_type but no projection: store mode, a clear error."""
    from convert.pipeline import convert_checkpoint
    from engine.errors import NotRunnableError

    out = convert_checkpoint(_single_tower(tmp_path, "vision", projection=False), tmp_path / "m",
                             progress=False).out_dir
    with pytest.raises(NotRunnableError, match="'CLIPVisionModel' checkpoint converted in store mode"):
        engine.load_model(out)


def test_an_image_only_clip_serves_images_over_flight(tmp_path):
    from convert.pipeline import convert_checkpoint
    from flight_client import EmbeddingClient
    from flight_server.config import ServerConfig
    from flight_server.servicer import EmbeddingServer

    out = convert_checkpoint(_single_tower(tmp_path, "vision"), tmp_path / "m", progress=False).out_dir
    model = engine.load_model(out)
    png = __import__("cv2").imencode(".png", np.full((80, 90, 3), 120, np.uint8))[1].tobytes()
    with EmbeddingServer({"encoder": model}, ServerConfig(port=0)) as server:
        server.warm_up()
        with EmbeddingClient(f"grpc://127.0.0.1:{server.port}") as client:
            assert client.models()[0]["modalities"] == ["image"]
            assert np.array_equal(client.embed_images([png]), model.encode_image([png]))
            with pytest.raises(Exception, match=r"model 'encoder' embeds \['image'\], not 'text' input"):
                client.embed_texts(["a cat"])
