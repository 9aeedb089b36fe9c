"""A model folder is untrusted input: bounded regular-file reads (engine/files.py), config values checked
before anything is built, manifests that cannot point outside their folder, and conversions that do not follow
links out of the source.

Corrupted folders are copies of the session's converted models made with hard links (instant, and each
corrupted file is replaced by a new inode, never written in place, so the shared fixtures stay intact).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import engine
from convert.cli import main as convert_main
from convert.pipeline import convert_checkpoint
from convert.verify import verify
from engine.errors import ModelConfigError, WeightFormatError
from engine.files import MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, MAX_TOKENIZER_BYTES, read_model_file
from engine.format import Manifest
from engine.image_config import ImageConfig
from engine.tokenizer import TextTokenizer
from engine.weights import WeightFile, load_weights, read_manifest

REPO = Path(__file__).resolve().parent.parent


def _link_copy(src: Path, dst: Path) -> Path:
    """``src`` copied to ``dst`` as hard links (falls back to copies across file systems)."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link, symlinks=True)
    return dst


def _replace_text(path: Path, text: str) -> None:
    path.unlink()  # a new inode: the hard-linked original is never written
    path.write_text(text)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    _replace_text(path, json.dumps(data))


def _replace_with_link(path: Path, target: str | Path) -> None:
    if os.path.lexists(path):
        path.unlink()
    path.symlink_to(target)


@pytest.fixture()
def clip_copy(tmp_path, tiny_clip_dir) -> Path:
    return _link_copy(tiny_clip_dir, tmp_path / "clip")


@pytest.fixture()
def minilm_copy(tmp_path, minilm_model_dir) -> Path:
    return _link_copy(minilm_model_dir, tmp_path / "minilm")


# -- 1. bounded, regular-file reads ----------------------------------------------------------------------
# Each case links one file of a copied model to a device or a FIFO and loads the model. The old loader read
# such a file without bound (or blocked on the FIFO), so the cases run in a child process under a memory
# limit and a timeout: a regression fails the test instead of hanging it or eating the machine's memory.
DEVICE_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import engine
    kb = int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmSize")).split()[1])
    resource.setrlimit(resource.RLIMIT_AS, (kb * 1024 + (1 << 30), resource.RLIM_INFINITY))
    for folder, rel, target in json.loads(sys.argv[1]):
        path = Path(folder) / rel
        saved = path.with_name(path.name + ".saved")
        os.rename(path, saved)
        if target == "fifo":
            os.mkfifo(path)
        else:
            os.symlink(target, path)
        try:
            engine.load_model(folder)
            result = [rel, target, None, "loaded"]
        except BaseException as exc:
            result = [rel, target, type(exc).__name__, str(exc)]
        finally:
            os.unlink(path)
            os.rename(saved, path)
        print(json.dumps(result), flush=True)
""")

_CLIP_FILES = {"config.json": ModelConfigError, "manifest.json": WeightFormatError, "weights.arrow": WeightFormatError,
               "tokenizer.json": ModelConfigError, "tokenizer_config.json": ModelConfigError,
               "preprocessor_config.json": ModelConfigError}
_MINILM_FILES = {"modules.json": ModelConfigError, "1_Pooling/config.json": ModelConfigError,
                 "sentence_bert_config.json": ModelConfigError, "config_sentence_transformers.json": ModelConfigError}


def test_files_linked_to_devices_or_fifos_are_refused_before_reading(clip_copy, minilm_copy):
    cases = [[str(clip_copy), rel, t] for rel in _CLIP_FILES for t in ("/dev/zero", "/dev/urandom")]
    cases += [[str(minilm_copy), rel, t] for rel in _MINILM_FILES for t in ("/dev/zero", "fifo")]
    cases += [[str(clip_copy), "config.json", "fifo"], [str(clip_copy), "manifest.json", "fifo"]]
    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, json.dumps(cases)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(results) == len(cases), f"the child stopped early (rc {proc.returncode}): {proc.stderr[-3000:]}"
    expected = {**_CLIP_FILES, **_MINILM_FILES}
    for rel, target, kind, message in results:
        assert kind == expected[rel].__name__, (rel, target, kind, message)
        assert rel in message, message  # names the file
        want = "a FIFO (named pipe); expected a regular file" if target == "fifo" else "outside the model folder"
        assert want in message, (rel, target, message)


def test_a_device_given_directly_is_not_a_weight_file_and_reads_are_bounded(tmp_path):
    with pytest.raises(WeightFormatError, match="character device .*expected a regular file"):
        WeightFile.open("/dev/zero")
    (tmp_path / "zero.arrow").symlink_to("/dev/zero")
    with pytest.raises(WeightFormatError, match="zero.arrow .*character device"):
        load_weights(tmp_path / "zero.arrow")
    with pytest.raises(ModelConfigError, match="character device"):
        read_model_file("/dev", "zero", 16, "a test file")  # the folder itself: still not a regular file


@pytest.mark.parametrize("rel, cap", [("config.json", MAX_CONFIG_BYTES), ("tokenizer.json", MAX_TOKENIZER_BYTES),
                                      ("manifest.json", MAX_MANIFEST_BYTES),
                                      ("preprocessor_config.json", MAX_CONFIG_BYTES)])
def test_huge_files_are_refused_by_size_before_reading(clip_copy, rel, cap):
    path = clip_copy / rel
    path.unlink()
    with open(path, "wb") as f:  # sparse: the size is there, the bytes are not
        f.truncate(cap + 1)
    error = WeightFormatError if rel == "manifest.json" else ModelConfigError
    with pytest.raises(error) as info:
        engine.load_model(clip_copy)
    assert rel in str(info.value) and f"is {cap + 1:,} bytes, more than the {cap:,}" in str(info.value)


def test_a_directory_or_a_link_out_of_the_folder_is_refused(clip_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(clip_copy / "config.json", elsewhere / "config.json")  # a valid config, outside the folder
    _replace_with_link(clip_copy / "config.json", elsewhere / "config.json")
    with pytest.raises(ModelConfigError, match=r"config.json \(a model config file\) is a link to .*elsewhere/config"
                                               r".json, outside the model folder"):
        engine.load_model(clip_copy)
    _replace_with_link(clip_copy / "config.json", "../elsewhere/config.json")  # relative links too
    with pytest.raises(ModelConfigError, match="outside the model folder"):
        engine.load_model(clip_copy)
    (clip_copy / "config.json").unlink()
    (clip_copy / "sub").mkdir()
    shutil.copy(elsewhere / "config.json", clip_copy / "sub" / "config.json")
    (clip_copy / "config.json").symlink_to("sub/config.json")  # a link that stays inside the folder is fine
    assert read_model_file(clip_copy, "config.json", MAX_CONFIG_BYTES, "a test file") == \
        (elsewhere / "config.json").read_bytes()
    (clip_copy / "preprocessor_config.json").unlink()
    (clip_copy / "preprocessor_config.json").mkdir()
    with pytest.raises(ModelConfigError, match="preprocessor_config.json .*is a directory; expected a regular file"):
        ImageConfig.from_dir(clip_copy)
    (clip_copy / "preprocessor_config.json").rmdir()
    (clip_copy / "preprocessor_config.json").symlink_to("nowhere.json")
    with pytest.raises(ModelConfigError, match="preprocessor_config.json .*is a broken link"):
        engine.load_model(clip_copy)


def test_a_file_that_grows_after_the_size_check_is_still_cut(tmp_path, monkeypatch):
    """At most max_bytes + 1 bytes are read, whatever the size said when it was checked."""
    (tmp_path / "config.json").write_bytes(b" " * 100)
    real_fstat = os.fstat

    def said_10_bytes(fd):
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, 10,
                               int(st.st_atime), int(st.st_mtime), int(st.st_ctime)))

    monkeypatch.setattr(os, "fstat", said_10_bytes)
    with pytest.raises(ModelConfigError, match="config.json .*grew past the 50 bytes"):
        read_model_file(tmp_path, "config.json", 50, "a test file")


def test_tokenizer_is_parsed_from_the_checked_bytes_and_checked_at_load(clip_copy, tmp_path):
    (tmp_path / "other.json").write_bytes((clip_copy / "tokenizer.json").read_bytes())
    _replace_with_link(clip_copy / "tokenizer.json", tmp_path / "other.json")
    with pytest.raises(ModelConfigError, match="tokenizer.json .*outside the model folder"):
        TextTokenizer.from_dir(clip_copy, 77, lazy=True, required=False)  # lazy: checked now, parsed later
    (clip_copy / "tokenizer.json").unlink()
    (clip_copy / "tokenizer.json").write_bytes((tmp_path / "other.json").read_bytes())
    tok = TextTokenizer.from_dir(clip_copy, 77, lazy=True)
    assert tok.encode(["a photo of a cat"])[0][0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_a_hub_cache_snapshot_of_a_converted_model_loads(tiny_clip_dir, tmp_path):
    """Files of a hub snapshot link to ../../blobs/<sha>: inside the repo cache folder, so they are fine."""
    snapshot = _hub_snapshot(tiny_clip_dir, tmp_path / "hub")
    model = engine.load_model(snapshot)
    assert model.encode_text(["a photo of a cat"]).shape == (1, 48)
    assert verify(snapshot) == []


# -- 2. config values checked before anything is built ------------------------------------------------------
def _no_build(monkeypatch) -> None:
    """Make building a network fail: every bad config must be refused before (the old loader built 10**9
    layers for a config that asked for them)."""
    import engine.bert
    import engine.clip

    def refuse(self, *args, **kwargs):
        raise AssertionError("the network was built before the config was checked")

    monkeypatch.setattr(engine.clip.CLIP, "__init__", refuse)
    monkeypatch.setattr(engine.bert.SentenceBert, "__init__", refuse)


def _set(section: str | None, **values):
    def edit(cfg):
        (cfg[section] if section else cfg).update(values)
    return edit


@pytest.mark.parametrize("edit, field", [
    (_set("text_config", num_hidden_layers=10**9), "num_hidden_layers is 1000000000"),
    (_set("vision_config", num_hidden_layers=3), "the vision tower's num_hidden_layers is 3, but weights.arrow holds 2"),
    (_set("text_config", hidden_size=0), "hidden_size is 0"),
    (_set("text_config", num_attention_heads=0), "num_attention_heads is 0"),
    (_set("vision_config", num_attention_heads=5), "hidden_size 64 is not divisible by num_attention_heads 5"),
    (_set("vision_config", patch_size=0), "patch_size is 0"),
    (_set("vision_config", image_size=-224), "image_size is -224"),
    (_set("text_config", vocab_size=0), "vocab_size is 0"),
    (_set("text_config", intermediate_size=-1), "intermediate_size is -1"),
    (_set("text_config", max_position_embeddings=0), "max_position_embeddings is 0"),
    (_set(None, projection_dim=0), "projection_dim is 0"),
    (_set("text_config", layer_norm_eps=-1.0), "layer_norm_eps is -1.0"),
    (_set("text_config", hidden_size=2**30, vocab_size=2**31 - 1), "the text tower's vocab_size is 2147483647, but"),
    (_set("vision_config", patch_size=16), "the vision tower's patch_size is 16, but"),
    (_set("text_config", intermediate_size=100), "the text tower's intermediate_size is 100, but"),
    (_set(None, projection_dim=40), "projection_dim is 40, but"),
])
def test_bad_clip_config_values_fail_before_the_build(clip_copy, monkeypatch, edit, field):
    _edit_json(clip_copy / "config.json", edit)
    _no_build(monkeypatch)
    with pytest.raises(ModelConfigError) as info:
        engine.load_model(clip_copy)
    assert "config.json" in str(info.value) and field in str(info.value), str(info.value)


@pytest.mark.parametrize("edit, field", [
    (_set(None, num_hidden_layers=10**9), "num_hidden_layers is 1000000000"),
    (_set(None, num_hidden_layers=7), "num_hidden_layers is 7, but weights.arrow holds 6 blocks"),
    (_set(None, intermediate_size=1000), "intermediate_size is 1000, but"),
    (_set(None, hidden_size=768, num_attention_heads=12), "hidden_size is 768, but"),
    (_set(None, vocab_size=0), "vocab_size is 0"),
    (_set(None, type_vocab_size=5), "type_vocab_size is 5, but"),
    (_set(None, max_position_embeddings=-3), "max_position_embeddings is -3"),
])
def test_bad_bert_config_values_fail_before_the_build(minilm_copy, monkeypatch, edit, field):
    _edit_json(minilm_copy / "config.json", edit)
    _no_build(monkeypatch)
    with pytest.raises(ModelConfigError) as info:
        engine.load_model(minilm_copy)
    assert "config.json" in str(info.value) and field in str(info.value), str(info.value)


def test_a_missing_tensor_that_carries_a_size_is_a_weight_error(tmp_path, tiny_clip_source):
    """The sizes are checked against the tensor table: a weight file without the tensor a size shapes is a
    WeightFormatError naming the tensor, before anything is built."""
    from safetensors.torch import load_file, save_file

    src = _link_copy(tiny_clip_source, tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    del state["text_model.embeddings.token_embedding.weight"]
    (src / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    convert_checkpoint(src, tmp_path / "out", progress=False)
    with pytest.raises(WeightFormatError, match="weights.arrow: .*text_model.embeddings.token_embedding.weight"):
        engine.load_model(tmp_path / "out")


def test_module_paths_in_modules_json_must_stay_inside(minilm_copy):
    modules = json.loads((minilm_copy / "modules.json").read_text())
    _replace_text(minilm_copy / "modules.json", json.dumps(modules[:2] + [{"idx": 2, "name": "2", "path": "../x",
                                                                           "type": "sentence_transformers.models.Dense"}]
                                                          + modules[2:]))
    with pytest.raises(ModelConfigError, match=r"modules.json: a Dense module's path is '\.\./x'"):
        engine.load_model(minilm_copy)
    modules[1] = {**modules[1], "path": "../../etc"}
    _replace_text(minilm_copy / "modules.json", json.dumps(modules))
    with pytest.raises(ModelConfigError, match=r"'\.\./\.\./etc/config.json', expected a plain relative path"):
        engine.load_model(minilm_copy)


# -- 3. the manifest may not point outside its folder ----------------------------------------------------
@pytest.mark.parametrize("files", [["../secret"], ["/etc/passwd"], ["a/../../b"], ["sub/../x"], [""], ["a\\..\\b"],
                                   ["./config.json"]])
def test_manifest_files_must_stay_inside_the_folder(clip_copy, files):
    data = json.loads((clip_copy / "manifest.json").read_text())
    with pytest.raises(ValueError, match="'files' must be relative paths inside the model directory"):
        Manifest.from_json(json.dumps({**data, "files": files}))
    _replace_text(clip_copy / "manifest.json", json.dumps({**data, "files": files}))
    with pytest.raises(WeightFormatError, match=r"manifest.json: invalid manifest: 'files' must be relative"):
        read_manifest(clip_copy)
    assert convert_main(["inspect", str(clip_copy), "--verify"]) == 1


@pytest.mark.parametrize("weights", ["../weights.arrow", "/tmp/weights.arrow", "sub/weights.arrow", "..", ""])
def test_manifest_weights_must_be_a_plain_file_name(clip_copy, weights):
    data = json.loads((clip_copy / "manifest.json").read_text())
    with pytest.raises(ValueError, match="'weights' is .*expected a plain file name"):
        Manifest.from_json(json.dumps({**data, "weights": weights}))


def test_verify_does_not_follow_a_listed_file_out_of_the_folder(clip_copy, tmp_path, capsys):
    (tmp_path / "secret.json").write_text("{}")
    _replace_with_link(clip_copy / "tokenizer_config.json", tmp_path / "secret.json")
    problems = verify(clip_copy)
    assert len(problems) == 1 and "file tokenizer_config.json:" in problems[0] and "outside" in problems[0]
    assert convert_main(["inspect", str(clip_copy), "--verify"]) == 1
    assert "outside the model folder" in capsys.readouterr().out
    os.link(clip_copy / "weights.arrow", tmp_path / "w.arrow")  # the same bytes, outside the folder
    _replace_with_link(clip_copy / "weights.arrow", tmp_path / "w.arrow")
    with pytest.raises(WeightFormatError, match="weights.arrow .*outside the model folder"):
        verify(clip_copy)
    with pytest.raises(WeightFormatError, match="weights.arrow .*outside the model folder"):
        load_weights(clip_copy)


# -- 4. conversion does not follow links out of the source ------------------------------------------------
def _nothing_written(parent: Path, before: set[str], out: Path) -> None:
    assert not out.exists()
    assert {p.name for p in parent.iterdir()} == before, "a temporary directory was left behind"


@pytest.mark.parametrize("name", ["merges.txt", "vocab.json", "tokenizer.json", "special_tokens_map.json"])
def test_convert_refuses_a_small_file_linked_out_of_the_source(tiny_clip_source, tmp_path, name):
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "secret.txt").write_text("#version: 0.2\nnot yours\n")
    src = _link_copy(tiny_clip_source, tmp_path / "src")
    _replace_with_link(src / name, tmp_path / "private" / "secret.txt")
    out_root = tmp_path / "models"
    out_root.mkdir()
    with pytest.raises(ModelConfigError, match=f"src/{name} is a link to .*secret.txt, outside the checkpoint"):
        convert_checkpoint(src, out_root / "out", progress=False)
    _nothing_written(out_root, set(), out_root / "out")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "model.safetensors.index.json"])
def test_convert_refuses_weights_and_config_linked_out_of_the_source(tiny_clip_source, tmp_path, name):
    src = _link_copy(tiny_clip_source, tmp_path / "src")
    if name == "model.safetensors.index.json":  # a sharded checkpoint whose index lies elsewhere
        (tmp_path / "index.json").write_text(json.dumps({"weight_map": {}}))
        _replace_with_link(src / name, tmp_path / "index.json")
    else:
        _replace_with_link(src / name, tiny_clip_source / name)  # the same bytes, but outside the source
    with pytest.raises(ModelConfigError, match=f"src/{name} .*is a link to .*, outside the model folder"):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_module_folders_and_module_weights_linked_out(minilm_source, tmp_path):
    src = _link_copy(minilm_source, tmp_path / "src")
    shutil.copytree(src / "1_Pooling", tmp_path / "pooling")
    shutil.rmtree(src / "1_Pooling")
    (src / "1_Pooling").symlink_to(tmp_path / "pooling")
    with pytest.raises(ModelConfigError, match="src/1_Pooling \\(a sentence-transformers module folder\\) is a link"):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    _replace_with_link(src / "modules.json", minilm_source / "modules.json")
    with pytest.raises(ModelConfigError, match="src/modules.json .*outside the model folder"):
        convert_checkpoint(src, tmp_path / "out", progress=False)


def test_convert_does_not_descend_into_linked_folders(tiny_clip_source, tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "extra.json").write_text("{}")
    src = _link_copy(tiny_clip_source, tmp_path / "src")
    (src / "extra").symlink_to(tmp_path / "outside")
    (src / "notes.md").symlink_to(tmp_path / "outside" / "extra.json")  # not a file convert copies: ignored
    m = convert_checkpoint(src, tmp_path / "out", progress=False).manifest
    assert not any(f.startswith("extra") for f in m.files) and not (tmp_path / "out" / "extra").exists()


def _hub_snapshot(folder: Path, cache: Path) -> Path:
    """``folder`` laid out as a HuggingFace hub cache: ``models--a--b/blobs/<n>`` and
    ``models--a--b/snapshots/rev/<path>`` links to ``../../blobs/<n>``."""
    repo = cache / "models--a--b"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    for n, f in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
        rel = f.relative_to(folder)
        os.link(f, blobs / f"blob{n}")
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).symlink_to(Path(*[".."] * len(rel.parts), "..", "blobs", f"blob{n}"))
    return snapshot


def test_convert_accepts_a_hub_cache_snapshot(tiny_clip_source, tmp_path):
    snapshot = _hub_snapshot(tiny_clip_source, tmp_path / "hub")
    assert (snapshot / "config.json").is_symlink()
    m = convert_checkpoint(snapshot, tmp_path / "out", progress=False).manifest
    assert m.files == ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")
    for f in m.files:
        out = tmp_path / "out" / f
        assert not out.is_symlink() and out.read_bytes() == (tiny_clip_source / f).read_bytes()
