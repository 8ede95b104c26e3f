"""Checkpoints: bit-identical save/load round trips, the manifest, atomic saves, and clear errors for damaged
folders (each a CheckpointError naming the file at fault)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import lowbit
import lowbit.io as lio
from lowbit import CheckpointError, LowbitError, QLinear, Recipe
from lowbit.formats import LAYOUT
from lowbit.nn import GEMVLinear
from lowbit.state import state_of

IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 0, 33], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 255, 254]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _packed_buffers(model) -> dict[str, torch.Tensor]:
    packed = {f"{n}.{leaf}" for n, m in model.named_modules() if isinstance(m, QLinear) for leaf in m.packed_names}
    return {n: b for n, b in model.named_buffers() if n in packed}


def _assert_identical(loaded, original):
    """Same logits bit for bit, same packed buffers (values and dtypes), same state_dict."""
    assert torch.equal(_logits(loaded), _logits(original))
    packed, packed_ref = _packed_buffers(loaded), _packed_buffers(original)
    assert packed.keys() == packed_ref.keys()
    for name, buf in packed_ref.items():
        assert packed[name].dtype == buf.dtype and torch.equal(packed[name], buf), name
    sd, sd_ref = loaded.state_dict(), original.state_dict()
    assert sd.keys() == sd_ref.keys()
    assert all(torch.equal(sd[k], v) and sd[k].dtype == v.dtype for k, v in sd_ref.items())
    assert {n for n, m in loaded.named_modules() if isinstance(m, QLinear)} == \
        {n for n, m in original.named_modules() if isinstance(m, QLinear)}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _saved(tmp_path, arch="llama", recipe="rtn-w4g64", name="ckpt", **overrides):
    model = tiny_model(arch, **overrides)
    if recipe is not None:
        lowbit.quantize(model, recipe)
    return model, lowbit.save(model, tmp_path / name)


# ---- round trips ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["rtn-w4g64", "nf4-g64", "rtn-w4-sym-channel", "lowra-b1.5"])
def test_round_trip_is_bit_identical(tmp_path, recipe):
    model, path = _saved(tmp_path, recipe=recipe)
    loaded, tokenizer = lowbit.load(path)
    assert tokenizer is None  # none was saved
    _assert_identical(loaded, model)
    assert state_of(loaded).recipe == Recipe.from_name(recipe) == state_of(model).recipe
    assert loaded.config.quantization_config["quant_method"] == "lowbit"
    assert not loaded.training


def test_symmetric_per_channel_stores_no_zero_points(tmp_path):
    from safetensors import safe_open

    model, path = _saved(tmp_path, recipe="rtn-w4-sym-channel")
    with safe_open(path / lio.PACKED_SHARD, "pt") as f:
        keys = set(f.keys())
    assert keys and not any(k.endswith(".zeros") for k in keys)
    assert {k.rpartition(".")[2] for k in keys} == {"codes", "scales"}
    q = lowbit.load(path)[0].model.layers[0].self_attn.q_proj
    assert "zeros" not in q.packed_names and q.qweight.zeros is None
    assert q.fmt == "int4_sym" and q.granularity == "channel" and q.scales.shape == (64, 1)


def test_tied_embeddings_stay_tied_and_are_stored_once(tmp_path):
    from safetensors.torch import load_file

    model, path = _saved(tmp_path, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loaded, _ = lowbit.load(path)
    _assert_identical(loaded, model)
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    manifest = json.loads((path / lio.MANIFEST).read_text())
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    floats = load_file(path / lio.FLOAT_SHARD)
    assert "model.embed_tokens.weight" in floats and "lm_head.weight" not in floats


def test_untied_head_is_stored_and_loaded_separately(tmp_path):
    model, path = _saved(tmp_path, tie_word_embeddings=False)
    loaded, _ = lowbit.load(path)
    _assert_identical(loaded, model)
    assert not loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    assert json.loads((path / lio.MANIFEST).read_text())["aliases"] == {}


def test_qwen2_biases_round_trip(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model("qwen2")
    with torch.no_grad():  # HF initialises biases to zero; make them count
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_()
    lowbit.quantize(model, "rtn-w4g64")
    path = lowbit.save(model, tmp_path / "ckpt")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QLinear) and q.bias is not None and q.bias.abs().min() > 0
    loaded, _ = lowbit.load(path)
    _assert_identical(loaded, model)
    lq = loaded.model.layers[0].self_attn.q_proj
    assert torch.equal(lq.bias, q.bias)
    manifest = json.loads((path / lio.MANIFEST).read_text())
    with_bias = {n for n, e in manifest["layers"].items() if e["bias"]}
    assert with_bias == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj")}
    assert "model.layers.0.self_attn.q_proj.bias" in load_file(path / lio.FLOAT_SHARD)  # biases stay float


@pytest.mark.parametrize("tied", [False, True])
def test_float_model_round_trips(tmp_path, tied):
    model, path = _saved(tmp_path, recipe=None, tie_word_embeddings=tied)
    loaded, _ = lowbit.load(path)
    _assert_identical(loaded, model)
    assert not any(isinstance(m, QLinear) for m in loaded.modules())
    assert state_of(loaded).recipe is None
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    manifest = lio.read_manifest(path)
    assert manifest["recipe"] is None and manifest["layers"] == {}
    assert manifest["summary"]["quantized_layers"] == 0 and manifest["summary"]["bits_per_weight"] is None


def test_loaded_model_still_generates_like_the_original(tmp_path):
    model, path = _saved(tmp_path)
    loaded, _ = lowbit.load(path)
    assert type(loaded.lm_head) is GEMVLinear  # the float head's decode steps run lowbit's fp32 GEMV
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(loaded.generate(IDS[:1], **kwargs), model.generate(IDS[:1], **kwargs))


# ---- the manifest -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def w4g64(tmp_path_factory):
    """A tiny llama quantized with rtn-w4g64 and saved once: ``(model, path)``. Tests copy it before damaging it."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    lowbit.quantize(model, "rtn-w4g64")
    state_of(model).source = "tiny-llama (test)"
    path = lowbit.save(model, tmp_path_factory.mktemp("io") / "ckpt", extra={"note": "from the test"})
    return model, path


@pytest.fixture
def ckpt(w4g64, tmp_path):
    """A private copy of the saved checkpoint, free to damage."""
    return Path(shutil.copytree(w4g64[1], tmp_path / "ckpt"))


def test_manifest_versions_recipe_and_layers(w4g64):
    model, path = w4g64
    manifest = lio.read_manifest(path)
    assert manifest["format_version"] == lio.FORMAT_VERSION == 1
    assert manifest["packing_layout"] == LAYOUT
    assert manifest["versions"]["lowbit"] == lowbit.__version__
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["source"] == "tiny-llama (test)" and manifest["extra"] == {"note": "from the test"}
    assert Recipe.from_dict(manifest["recipe"]) == Recipe.from_name("rtn-w4g64")
    assert manifest["quantize_seconds"] == state_of(model).quantize_seconds

    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert len(qlinears) == 14 and manifest["layers"].keys() == qlinears.keys()
    for name, entry in manifest["layers"].items():
        m = qlinears[name]
        nbytes = sum(b.numel() * b.element_size() for b in m.buffers())
        assert entry["fmt"] == "int4" and entry["bits"] == 4 and entry["granularity"] == "group"
        assert entry["group_size"] == 64 and entry["shape"] == [m.out_features, m.in_features]
        assert entry["bias"] is False and entry["nbytes"] == nbytes
        assert entry["bits_per_weight"] == pytest.approx(nbytes * 8 / (m.out_features * m.in_features))

    # the files the manifest lists are exactly the folder's other files, with their true sizes and hashes
    files = manifest["files"]
    assert sorted(files) == sorted(n for n in _siblings(path) if n != lio.MANIFEST)
    for name, info in files.items():
        assert info["bytes"] == (path / name).stat().st_size and info["sha256"] == lio.sha256(path / name)
    index = json.loads((path / lio.INDEX).read_text())
    assert index["weight_map"]["model.layers.0.self_attn.q_proj.codes"] == lio.PACKED_SHARD
    assert index["weight_map"]["model.embed_tokens.weight"] == lio.FLOAT_SHARD


def test_manifest_summary_matches_the_packed_buffers(w4g64):
    model, path = w4g64
    summary = lio.read_manifest(path)["summary"]
    qlinears = [m for m in model.modules() if isinstance(m, QLinear)]
    weights = sum(m.in_features * m.out_features for m in qlinears)
    packed = sum(b.numel() * b.element_size() for m in qlinears for b in m.buffers())
    assert summary["quantized_layers"] == 14 and summary["quantized_weights"] == weights
    assert summary["packed_bytes"] == packed
    assert summary["bits_per_weight"] == packed * 8 / weights
    # int4 codes + one fp16 scale and one uint8 zero per 64 weights (every in_features is a multiple of 64)
    assert summary["bits_per_weight"] == 4 + (16 + 8) / 64 and summary["code_bits"] == 4.0

    file_bytes = (path / lio.PACKED_SHARD).stat().st_size
    assert summary["packed_file_bytes"] == file_bytes
    assert 0 < file_bytes - packed < 64 * 1024  # the shard is the packed tensors plus a safetensors header
    assert summary["size_bytes"] == sum(p.stat().st_size for p in path.iterdir() if p.name != lio.MANIFEST)


def test_model_carries_its_manifest_after_load(w4g64):
    model, path = w4g64
    loaded, _ = lowbit.load(path)
    assert state_of(loaded).manifest == lio.read_manifest(path)
    assert state_of(loaded).source == "tiny-llama (test)"
    assert state_of(loaded).recipe.to_dict() == state_of(model).recipe.to_dict()


# ---- atomic saves -----------------------------------------------------------------------------------------

def test_existing_folder_is_refused_without_force_and_left_untouched(ckpt):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    other = tiny_model("llama", tie_word_embeddings=True)
    with pytest.raises(LowbitError) as e:
        lowbit.save(other, ckpt)
    assert not isinstance(e.value, CheckpointError)
    assert str(ckpt) in str(e.value) and "--force" in str(e.value)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert _siblings(ckpt.parent) == ["ckpt"]


def test_an_existing_non_folder_is_refused_even_with_force(tmp_path):
    target = tmp_path / "model"
    target.write_text("not a checkpoint")
    with pytest.raises(LowbitError, match="not a folder"):
        lowbit.save(tiny_model("llama"), target, force=True)
    assert target.read_text() == "not a checkpoint" and _siblings(tmp_path) == ["model"]


def test_force_replaces_the_folder_and_leaves_no_siblings(ckpt):
    (ckpt / "stale.txt").write_text("from an older save")
    other = tiny_model("llama", tie_word_embeddings=True)
    lowbit.quantize(other, "nf4-g64")
    assert lowbit.save(other, ckpt, force=True) == ckpt
    assert not (ckpt / "stale.txt").exists()
    assert _siblings(ckpt.parent) == ["ckpt"]  # no .ckpt.tmp-* or .ckpt.old-* left behind
    loaded, _ = lowbit.load(ckpt)
    _assert_identical(loaded, other)
    assert state_of(loaded).recipe.name == "nf4-g64"


def test_save_creates_missing_parents_and_leaves_no_temp_folder(tmp_path):
    model = tiny_model("llama")
    path = lowbit.save(model, tmp_path / "a" / "b" / "ckpt")
    assert _siblings(tmp_path / "a" / "b") == ["ckpt"]
    assert torch.equal(_logits(lowbit.load(path)[0]), _logits(model))


class DiskFull(OSError):
    pass


def _fail_on_safetensors(monkeypatch):
    from lowbit.shards import TensorAppender

    calls = []

    def boom(self, name, tensor):
        calls.append(self.path)
        raise DiskFull("no space left on device")

    monkeypatch.setattr(TensorAppender, "append", boom)
    return calls


def _fail_on_manifest(monkeypatch):
    """Make writing lowbit.json (the very last file) fail, after the shards and config were written."""
    calls = []

    real = lio.json_text

    def json_text(obj, *args, **kwargs):
        if isinstance(obj, dict) and "format_version" in obj:
            calls.append(obj)
            raise DiskFull("no space left on device")
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(lio, "json_text", json_text)
    return calls


@pytest.mark.parametrize("failure", [_fail_on_safetensors, _fail_on_manifest])
def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch, failure):
    model = tiny_model("llama")
    lowbit.quantize(model, "rtn-w4g64")
    calls = failure(monkeypatch)
    with pytest.raises(DiskFull):
        lowbit.save(model, tmp_path / "ckpt")
    assert calls  # the failure really happened inside save
    assert _siblings(tmp_path) == []  # neither the folder nor a .ckpt.tmp-* folder


@pytest.mark.parametrize("failure", [_fail_on_safetensors, _fail_on_manifest])
def test_failed_forced_save_keeps_the_existing_checkpoint(ckpt, w4g64, monkeypatch, failure):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    other = tiny_model("llama", tie_word_embeddings=True)
    calls = failure(monkeypatch)
    with pytest.raises(DiskFull):
        lowbit.save(other, ckpt, force=True)
    assert calls
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert _siblings(ckpt.parent) == ["ckpt"]
    assert torch.equal(_logits(lowbit.load(ckpt)[0]), _logits(w4g64[0]))


def test_failed_final_rename_restores_the_existing_checkpoint(ckpt, w4g64, monkeypatch):
    """Without an atomic exchange (another OS or file system), the swap moves the old folder aside first; if
    moving the new one in fails, the old one goes back."""
    import lowbit.fileio

    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    real_rename = os.rename
    monkeypatch.setattr(lowbit.fileio, "_exchange", lambda a, b: False)

    def rename(src, dst):
        if ".tmp-" in Path(src).name:
            raise DiskFull("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(DiskFull):
        lowbit.save(tiny_model("llama"), ckpt, force=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert _siblings(ckpt.parent) == ["ckpt"]
    assert torch.equal(_logits(lowbit.load(ckpt)[0]), _logits(w4g64[0]))


# ---- damaged checkpoints ----------------------------------------------------------------------------------

def _load_error(path, verify=True) -> str:
    with pytest.raises(CheckpointError) as e:
        lowbit.load(path, verify=verify)
    assert isinstance(e.value, LowbitError)
    return str(e.value)


def test_missing_folder(tmp_path):
    msg = _load_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg


def test_folder_without_manifest(ckpt):
    (ckpt / lio.MANIFEST).unlink()
    msg = _load_error(ckpt)
    assert str(ckpt / lio.MANIFEST) in msg and "not a lowbit checkpoint" in msg


@pytest.mark.parametrize("text", ['{"format_version": 1, "files": {', "", "\xff\xfe"])
def test_manifest_that_is_not_json(ckpt, text):
    (ckpt / lio.MANIFEST).write_bytes(text.encode("latin-1"))
    msg = _load_error(ckpt)
    assert str(ckpt / lio.MANIFEST) in msg and "not valid JSON" in msg


@pytest.mark.parametrize("text", ["[]", "null", "1"])
def test_manifest_that_is_not_an_object(ckpt, text):
    (ckpt / lio.MANIFEST).write_text(text)
    msg = _load_error(ckpt)
    assert str(ckpt / lio.MANIFEST) in msg


@pytest.mark.parametrize("version", [99, 0, "1", None])
def test_unknown_format_version(ckpt, version):
    manifest = json.loads((ckpt / lio.MANIFEST).read_text())
    manifest["format_version"] = version
    (ckpt / lio.MANIFEST).write_text(json.dumps(manifest))
    msg = _load_error(ckpt)
    assert str(ckpt / lio.MANIFEST) in msg and repr(version) in msg and "Upgrade lowbit" in msg


def test_unknown_packing_layout(ckpt):
    manifest = json.loads((ckpt / lio.MANIFEST).read_text())
    manifest["packing_layout"] = "msb-cols-v9"
    (ckpt / lio.MANIFEST).write_text(json.dumps(manifest))
    msg = _load_error(ckpt)
    assert str(ckpt / lio.MANIFEST) in msg and "msb-cols-v9" in msg


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_shard(ckpt, verify):
    shard = ckpt / lio.PACKED_SHARD
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    msg = _load_error(ckpt, verify=verify)  # sizes are checked even without hashing
    assert str(shard) in msg and "truncated" in msg and str(len(data)) in msg


def test_missing_shard(ckpt):
    (ckpt / lio.FLOAT_SHARD).unlink()
    msg = _load_error(ckpt)
    assert str(ckpt / lio.FLOAT_SHARD) in msg and "missing" in msg


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # tensor data, not the header: the file still parses
    path.write_bytes(bytes(data))


def test_tampered_shard_fails_the_hash_check(ckpt):
    shard = ckpt / lio.PACKED_SHARD
    size = shard.stat().st_size
    _flip_last_byte(shard)
    assert shard.stat().st_size == size
    msg = _load_error(ckpt)
    assert str(shard) in msg and "SHA-256" in msg and "modified" in msg


def test_verify_false_skips_the_hash_check(ckpt, w4g64):
    _flip_last_byte(ckpt / lio.PACKED_SHARD)
    loaded, _ = lowbit.load(ckpt, verify=False)  # the flipped byte is read as is
    changed = [n for n, b in _packed_buffers(w4g64[0]).items() if not torch.equal(loaded.get_buffer(n), b)]
    assert len(changed) == 1


def test_unreadable_shard_header(ckpt):
    shard = ckpt / lio.FLOAT_SHARD
    data = bytearray(shard.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")  # header length far beyond the file
    shard.write_bytes(bytes(data))
    assert "SHA-256" in _load_error(ckpt)
    msg = _load_error(ckpt, verify=False)
    assert str(shard) in msg and "safetensors" in msg


def craft(path: Path, edit=None) -> dict:
    """What a crafted (or consistently damaged) checkpoint looks like: ``edit(manifest)``, then every recorded size
    and hash made to agree with the files again and the manifest re-signed, so only the deeper checks can tell."""
    from lowbit.fileio import sha256
    from lowbit.manifest import manifest_digest

    manifest = json.loads((path / lio.MANIFEST).read_text())
    if edit is not None:
        edit(manifest)
    files = manifest.get("files")
    for name, info in (files.items() if isinstance(files, dict) else ()):
        fp = path / name
        if isinstance(info, dict) and name and "/" not in name and ".." not in name and fp.is_file():
            info.update(bytes=fp.stat().st_size, sha256=sha256(fp))
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / lio.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def _edit_config(path: Path, key: str, old, new) -> None:
    """Change one value in config.json keeping the file's byte size (so only the hash or the shapes can tell)."""
    cfg = path / "config.json"
    text = cfg.read_text()
    before, after = f'"{key}": {old},', f'"{key}": {new},'
    assert text.count(before) == 1 and len(before) == len(after)
    cfg.write_text(text.replace(before, after))


@pytest.mark.parametrize("key,old,new", [("hidden_size", 64, 32), ("num_hidden_layers", 2, 1),
                                         ("num_hidden_layers", 2, 3), ("intermediate_size", 128, 256)])
def test_config_that_does_not_match_the_tensors(ckpt, key, old, new):
    _edit_config(ckpt, key, old, new)
    msg = _load_error(ckpt, verify=False)  # config.json's hash is in the manifest and always checked
    assert str(ckpt / "config.json") in msg and "SHA-256" in msg
    craft(ckpt)
    msg = _load_error(ckpt)  # the shape / layer check itself
    assert str(ckpt / "config.json") in msg and "not match" in msg


def test_config_with_fewer_layers_names_the_missing_layer(ckpt):
    _edit_config(ckpt, "num_hidden_layers", 2, 1)
    craft(ckpt)
    msg = _load_error(ckpt)
    assert "'model.layers.1." in msg and str(ckpt / lio.MANIFEST) in msg


def test_config_that_is_not_json(ckpt):
    cfg = ckpt / "config.json"
    cfg.write_text("x" * cfg.stat().st_size)  # same size: only the hash notices, which is always checked
    assert "SHA-256" in _load_error(ckpt) and "SHA-256" in _load_error(ckpt, verify=False)
    craft(ckpt)
    msg = _load_error(ckpt)
    assert str(cfg) in msg


def test_a_good_checkpoint_still_loads_after_the_copy(ckpt, w4g64):
    """The damage tests start from a copy that is itself valid (so each error comes from its damage alone)."""
    loaded, _ = lowbit.load(ckpt)
    assert torch.equal(_logits(loaded), _logits(w4g64[0]))
    assert math.isfinite(_logits(loaded).abs().max().item())


def test_config_with_other_layer_widths_names_the_layer(ckpt):
    """Packed layers are shaped from the manifest, so a config whose widths differ must be caught explicitly."""
    _edit_config(ckpt, "intermediate_size", 128, 256)
    craft(ckpt)
    msg = _load_error(ckpt)
    assert "'model.layers.0.mlp.gate_proj'" in msg and "[128, 64]" in msg and "[256, 64]" in msg
    assert str(ckpt / "config.json") in msg


def test_attached_group_scales_are_stored_folded_into_the_packed_scales(tmp_path):
    from lowbit import adapters as ad

    model = lowbit.quantize(tiny_model("llama"), "rtn-w2g64")
    layer = model.model.layers[0].mlp.down_proj
    ad.train_group_scales([layer])
    with torch.no_grad():
        layer.group_scale.uniform_(0.8, 1.2)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    lowbit.save(model, tmp_path / "ck")
    loaded, _ = lowbit.load(tmp_path / "ck")
    stored = loaded.model.layers[0].mlp.down_proj
    assert stored.group_scale is None
    assert torch.equal(stored.scales, (layer.scales.float() * layer.group_scale.detach()).half())
    with torch.no_grad():
        out = loaded(ids).logits
    assert (out - ref).norm() / ref.norm() < 1e-2  # only the fp16 rounding of the folded scales differs
    with pytest.raises(lowbit.LowbitError, match="cannot fold trained scales"):
        layer.qweight.fold_multiplier(torch.ones(3, 2))


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/passwd", "sub/file", "..", ""])
def test_manifest_paths_outside_the_folder_are_refused(tmp_path, name):
    """A crafted ``files`` entry is never opened, hashed or reported on: both loaders refuse the manifest."""
    model = tiny_model("llama")
    lowbit.quantize(model, "rtn-w4g64")
    path = lowbit.save(model, tmp_path / "ck")
    (tmp_path / "outside.txt").write_text("secret")
    manifest = craft(path, lambda m: m["files"].update({name: {"bytes": 6, "sha256": "0" * 64}}))
    with pytest.raises(lowbit.CheckpointError, match="not a file of the checkpoint folder"):
        lowbit.load(path)
    with pytest.raises(lowbit.CheckpointError, match="not a file of the checkpoint folder"):
        lio.verify_files(path, manifest, hashes=False)
    with pytest.raises(lowbit.CheckpointError, match="not a file of the checkpoint folder"):
        AutoModelForCausalLM.from_pretrained(path)


def test_a_manifest_without_its_file_list_is_refused(tmp_path):
    model = tiny_model("llama")
    lowbit.quantize(model, "rtn-w4g64")
    path = lowbit.save(model, tmp_path / "ck")
    craft(path, lambda m: m.pop("files"))
    with pytest.raises(lowbit.CheckpointError, match="no list of the checkpoint's files"):
        lowbit.load(path)
    with pytest.raises(lowbit.CheckpointError, match="no list of the checkpoint's files"):
        AutoModelForCausalLM.from_pretrained(path)


def test_a_path_source_is_recorded_absolute(tmp_path, monkeypatch, hf_folder):
    monkeypatch.chdir(hf_folder.parent)
    model, _ = lowbit.load_model(hf_folder.name)  # relative to the current folder
    assert lowbit.state_of(model).source == str(hf_folder.resolve())


def test_unquantized_tensors_keep_the_source_dtype(tmp_path):
    """A bf16 source (an HF folder whose config says so) quantized in fp32: the checkpoint stores its embeddings,
    norms and head in bf16 (half the bytes of fp32); the model evaluated in memory, lowbit.load's and
    from_pretrained's compute the same logits in fp32."""
    import transformers as tf

    from lowbit.models import load_float_model
    from lowbit.state import state_of

    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "src")
    model, _ = load_float_model(tmp_path / "src")
    assert next(model.parameters()).dtype == torch.float32 and state_of(model).float_dtype == "bfloat16"
    lowbit.quantize(model, "rtn-w4g64")
    path = lowbit.save(model, tmp_path / "ck")
    from safetensors import safe_open

    with safe_open(path / lowbit.io.FLOAT_SHARD, "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["model.norm.weight"] == "BF16"
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        out = model(ids).logits
        ours, _ = lowbit.load(path)
        theirs = tf.AutoModelForCausalLM.from_pretrained(path)
        assert next(ours.parameters()).dtype == torch.float32
        assert torch.equal(ours(ids).logits, out) and torch.equal(theirs(ids).logits, out)
    assert lowbit.io.read_manifest(path)["float_dtype"] == "bfloat16"
    again = lowbit.save(ours, tmp_path / "again")  # re-saving keeps the rule
    assert (again / lowbit.io.FLOAT_SHARD).stat().st_size == (path / lowbit.io.FLOAT_SHARD).stat().st_size
