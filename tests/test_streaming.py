"""Streamed quantize (a model read one decoder block at a time from its shards): the same checkpoint, byte for
byte, as the in-memory path; at most one block filled at any time; refusals named before any output."""

from __future__ import annotations

import hashlib
import importlib
import json
import struct

import pytest
import torch
from conftest import tiny_model, word_tokenizer
from safetensors.torch import load_file
from test_cli import invoke, one_error_line, one_json_object

import lowbit
from lowbit import LowbitError
from lowbit.api import CalibrationConfig, QuantizeConfig, quantize
from lowbit.sharded_source import ShardedSource, fp32_bytes
from lowbit.shards import TensorAppender

CALIB = CalibrationConfig(windows=2, seq_len=64)
TIMING = ("quantize_seconds", "manifest_sha256")


def _source(folder, tied=False, arch="llama", layers=3):
    model = tiny_model(arch, max_position_embeddings=2048, num_hidden_layers=layers, tie_word_embeddings=tied)
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
    word_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _source(tmp_path_factory.mktemp("stream") / "src")


@pytest.fixture(scope="module")
def tied_source(tmp_path_factory):
    return _source(tmp_path_factory.mktemp("stream") / "tied", tied=True)


def _digests(folder):
    out = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.name == "lowbit.json":
            data = json.dumps({k: v for k, v in json.loads(data).items() if k not in TIMING}).encode()
        out[p.name] = hashlib.sha256(data).hexdigest()
    return out


def _quantize(src, out, recipe, stream, **kwargs):
    return quantize(QuantizeConfig(out=out, model=str(src), recipe=recipe, windows=0, stream=stream,
                                   calibration=CALIB, **kwargs))


@pytest.mark.parametrize("recipe", ["rtn-w4g64", "gptq-w4g64", "rtn-w3g32+emb8", "nf4-g64", "loftq-w2g64-r4",
                                    "blockwise-gptq-w2g64"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_streamed_checkpoint_is_byte_identical_to_the_in_memory_one(source, tied_source, tmp_path, recipe, tied):
    src = tied_source if tied else source
    memory = _quantize(src, tmp_path / "memory", recipe, stream=False)
    streamed = _quantize(src, tmp_path / "streamed", recipe, stream=True)
    assert not memory.streamed and streamed.streamed
    a, b = _digests(tmp_path / "memory"), _digests(tmp_path / "streamed")
    assert a == b, [k for k in a if a[k] != b.get(k)]
    assert streamed.bits_per_weight == memory.bits_per_weight and streamed.size_bytes == memory.size_bytes
    model, _ = lowbit.load(tmp_path / "streamed")  # and it loads
    assert len(lowbit.state_of(model).manifest["layers"]) == 3 * 7
    assert not recipe.startswith("loftq") or lowbit.state_of(model).manifest["adapters"]


def test_at_most_one_block_is_filled_at_any_time(source, tmp_path, monkeypatch):
    seen = []  # after each fill: (blocks holding memory, tensors outside the blocks holding memory)
    real = ShardedSource.load

    def load(self, model, keep, tie=True, stored=None):
        real(self, model, keep, tie, stored)
        prefix, blocks = lowbit.models.decoder_blocks(model)
        outside = [n for n, t in model.state_dict().items() if not n.startswith(prefix + ".") and not t.is_meta]
        seen.append((sum(any(not t.is_meta for t in b.state_dict().values()) for b in blocks), len(outside)))

    monkeypatch.setattr(ShardedSource, "load", load)
    _quantize(source, tmp_path / "q", "gptq-w4g64", stream=True)
    # the input embeddings (for the calibration inputs), each block alone, then embeddings, norm, head one by one
    assert seen == [(0, 1), (1, 0), (1, 0), (1, 0), (0, 1), (0, 1), (0, 1)]


@pytest.mark.parametrize(("recipe", "phrase"), [
    ("lowra-b2.0", "step 'lowra' needs the whole float model in memory"),
    ("rtn-w2g64+rilq8", "step 'rilq' needs the whole float model in memory"),
    ("quarot-w4a4", "step 'rotate' needs the whole float model in memory"),
])
def test_a_step_that_needs_the_whole_model_is_refused_with_its_memory_need(source, tmp_path, recipe, phrase):
    line = one_error_line(invoke("quantize", source, "--recipe", recipe, "--stream", "--no-eval", "--out",
                                 tmp_path / "q"))
    assert phrase in line and "(fp32)" in line and "--no-stream" in line, line
    assert not (tmp_path / "q").exists()


def test_self_generated_calibration_and_a_gguf_source_do_not_stream(source, tmp_path):
    line = one_error_line(invoke("quantize", source, "--recipe", "gptq-w4g64", "--stream", "--calib-self",
                                 "--no-eval", "--out", tmp_path / "q"))
    assert "self-generated calibration" in line and "cannot be streamed" in line, line
    line = one_error_line(invoke("quantize", "smollm2-135m", "--stream", "--no-eval", "--out", tmp_path / "q"))
    assert "not a folder of safetensors weights" in line and "--no-stream" in line, line
    assert not (tmp_path / "q").exists()


def test_tensor_names_transformers_renames_are_refused(tmp_path):
    src = _source(tmp_path / "src")
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    for shard in sorted(src.glob("*.safetensors")):  # the legacy layout: no "model." prefix
        tensors = {k.removeprefix("model."): v for k, v in load_file(shard).items()}
        from safetensors.torch import save_file

        save_file(tensors, shard, metadata={"format": "pt"})
    data["weight_map"] = {k.removeprefix("model."): v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with pytest.raises(LowbitError, match=r"holds no tensor .* cannot be streamed, quantize it in memory"):
        _quantize(src, tmp_path / "q", "rtn-w4g64", stream=True)


def test_a_moe_model_is_refused(tmp_path):
    src = tmp_path / "moe"
    tiny_model("qwen3_moe", max_position_embeddings=2048).save_pretrained(src)
    word_tokenizer().save_pretrained(src)
    with pytest.raises(LowbitError, match="cannot be streamed"):
        _quantize(src, tmp_path / "q", "rtn-w4g64", stream=True)


def test_streaming_is_chosen_when_the_fp32_model_needs_over_half_the_memory(source, tmp_path, monkeypatch):
    api = importlib.import_module("lowbit.api.quantize")  # the module (the package re-exports the function)
    need = fp32_bytes(source)
    monkeypatch.setattr(api, "available_memory_bytes", lambda: int(need * 1.5))
    assert _quantize(source, tmp_path / "a", "rtn-w4g64", stream=None).streamed
    monkeypatch.setattr(api, "available_memory_bytes", lambda: need * 4)
    assert not _quantize(source, tmp_path / "b", "rtn-w4g64", stream=None).streamed


def test_a_model_that_neither_fits_nor_streams_is_refused_before_it_loads(source, tmp_path, monkeypatch):
    import lowbit.io

    api = importlib.import_module("lowbit.api.quantize")

    monkeypatch.setattr(api, "available_memory_bytes", lambda: fp32_bytes(source) // 2)
    monkeypatch.setattr(lowbit.io, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(LowbitError, match=r"needs .* in fp32 and .* are available; step 'lowra' needs the "
                                          r"whole float model in memory"):
        _quantize(source, tmp_path / "q", "lowra-b2.0", stream=None)


def test_a_failure_mid_stream_leaves_the_previous_checkpoint_untouched(source, tmp_path, monkeypatch):
    out = tmp_path / "q"
    _quantize(source, out, "rtn-w4g64", stream=True)
    before = _digests(out)
    calls = []
    real = ShardedSource.release

    def release(module):
        calls.append(module)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(module)

    monkeypatch.setattr(ShardedSource, "release", staticmethod(release))
    with pytest.raises(OSError):
        _quantize(source, out, "gptq-w4g64", stream=True, force=True)
    assert _digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_the_cli_reports_a_streamed_run_and_evaluates_the_saved_checkpoint(source, tmp_path):
    out = one_json_object(invoke("quantize", source, "--recipe", "rtn-w4g64", "--stream", "--windows", "1",
                                 "--out", tmp_path / "q", "--json"))
    assert out["streamed"] is True and out["fp_ppl"] is None and out["windows"] == 1
    model, tok = lowbit.load(tmp_path / "q")
    assert out["ppl"] == pytest.approx(lowbit.perplexity(model, tok, windows=1).ppl, rel=1e-6)


def test_the_tensor_appender_writes_what_safetensors_reads(tmp_path):
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7, dtype=torch.uint8),
               "h": torch.randn(4).half(), "i": torch.tensor(3, dtype=torch.int32), "e": torch.zeros(0, 4),
               "f": torch.tensor([True, False])}
    writer = TensorAppender(tmp_path / "x.safetensors", {"format": "pt"})
    for name, t in tensors.items():
        writer.append(name, t)
    size = writer.close()
    path = tmp_path / "x.safetensors"
    assert size == path.stat().st_size and sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], t) for k, t in tensors.items())
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 8 == 0  # the data starts 8-byte aligned
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert list(header)[1:] == list(tensors)  # in the order appended, after the metadata
    with pytest.raises(LowbitError, match="written twice"):
        w = TensorAppender(tmp_path / "y.safetensors")
        w.append("a", torch.zeros(1))
        w.append("a", torch.zeros(1))


def test_an_emptied_block_keeps_no_packed_tensor_alive(source, tmp_path, monkeypatch):
    from lowbit.nn.packed import PackedModule

    alive = []
    real = ShardedSource.release

    def release(module):
        real(module)
        packed = [m for m in module.modules() if isinstance(m, PackedModule)]
        alive.append(sum(not t.is_meta for m in packed for t in m.__dict__.get("_qweight_cache", ([],))[0]))
        alive[-1] += sum(not t.is_meta for m in packed for t in m.buffers())

    monkeypatch.setattr(ShardedSource, "release", staticmethod(release))
    _quantize(source, tmp_path / "q", "gptq-w4g64", stream=True)
    # GPTQ ran each quantized block forward, which caches a view of its packed buffers; emptying the block must
    # drop it, or every block's packed weights would stay in memory (a model-sized leak)
    assert alive == [0, 0, 0, 0]  # the embeddings, then each block


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "streamed"])
def test_the_kernels_are_ready_before_the_quantization_clock_starts(source, tmp_path, monkeypatch, stream):
    """A first-time build of the C++ extension (a minute) must not count in ``quantize_seconds``: the job builds it
    before the recipe (whose clock that is) starts."""
    import lowbit.streamed

    api = importlib.import_module("lowbit.api.quantize")
    order = []

    def traced(name, real):
        return lambda *a, **k: order.append(name) or real(*a, **k)

    monkeypatch.setattr(api, "prepare", traced("prepare", api.prepare))
    monkeypatch.setattr(api, "apply_recipe", traced("recipe", api.apply_recipe))
    monkeypatch.setattr(lowbit.streamed, "quantize_streamed", traced("recipe", lowbit.streamed.quantize_streamed))
    _quantize(source, tmp_path / "q", "rtn-w4g64", stream=stream)
    assert order == ["prepare", "recipe"]
