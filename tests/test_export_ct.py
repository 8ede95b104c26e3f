"""compressed-tensors export (``lowbit export --to compressed-tensors``), proven by the loader users run:
transformers with the compressed-tensors package, in a fresh interpreter that never imports lowbit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit.errors import LowbitError
from lowbit.export_ct import export_compressed_tensors
from lowbit.quantizers.embeddings import EmbeddingsConfig
from lowbit.quantizers.rtn import RTNConfig

IDS = [[1, 5, 9, 77, 3, 200, 14, 8, 31, 2, 250, 6]]

# What transformers computes from the export, in a process where lowbit is never imported. Asymmetric grids load
# only through its dequantize-at-load path: its compressed path sizes the zero points unpacked (compressed-tensors'
# own asymmetric checkpoints fail the same way with transformers 5.23 and compressed-tensors 0.20.1).
LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
config = json.load(open(sys.argv[1] + "/config.json"))["quantization_config"]
symmetric = all(g["weights"]["symmetric"] for g in config["config_groups"].values())
extra = {} if symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, **extra).eval()
assert not any(m == "lowbit" or m.startswith("lowbit.") for m in sys.modules), "lowbit was imported"
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
torch.save(logits, sys.argv[3])
"""


def transformers_logits(folder, tmp_path) -> torch.Tensor:
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", LOAD, str(folder), json.dumps(IDS), str(out)], check=True,
                   capture_output=True, text=True)
    return torch.load(out)


def exported(tmp_path, recipe, family="llama", **overrides):
    """(lowbit's logits of the saved checkpoint, transformers' logits of its export, the export's details)."""
    src = tmp_path / "src"
    tiny_model(family, max_position_embeddings=256, **overrides).save_pretrained(src)
    model, _ = lowbit.load_model(src)
    lowbit.quantize(model, lowbit.Recipe(recipe))
    lowbit.save(model, tmp_path / "ckpt")
    model, _ = lowbit.load(tmp_path / "ckpt")
    with torch.no_grad():
        ours = model(torch.tensor(IDS)).logits
    details = export_compressed_tensors(model, tmp_path / "ct")
    return ours, transformers_logits(tmp_path / "ct", tmp_path), details


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    rel = ((ours - theirs).norm() / ours.norm()).item()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("config", [
    RTNConfig(bits=4, group_size=32),  # asymmetric int4 g32: zero points packed along the rows
    RTNConfig(bits=4, group_size=64, symmetric=True),
    RTNConfig(bits=3, group_size=32),  # 3-bit codes straddle int32 words
    RTNConfig(bits=2, group_size=128),  # 64-wide rows: one short group of 64, written as groups of 64
    RTNConfig(bits=8, granularity="channel", symmetric=True),
    RTNConfig(bits=4, granularity="channel"),
], ids=["int4-g32", "int4sym-g64", "int3-g32", "int2-g128-short", "int8sym-channel", "int4-channel"])
def test_transformers_reads_the_export(tmp_path, config):
    ours, theirs, details = exported(tmp_path, [config])
    assert details["packed_layers"] == 14 and not details["dequantized"]
    assert_close(ours, theirs)
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    weights = [g["weights"] for g in q["config_groups"].values()]
    assert {w["num_bits"] for w in weights} == {config.bits}
    assert {w["symmetric"] for w in weights} == {config.symmetric}


def test_uneven_groups_split_exactly(tmp_path):
    """An intermediate width of 96 in groups of 64 (one of 64, one short of 32): every layer is written in groups
    of 32, one config group."""
    ours, theirs, details = exported(tmp_path, [RTNConfig(bits=4, group_size=64)], intermediate_size=96)
    assert_close(ours, theirs)
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["group_size"] for g in q["config_groups"].values()] == [32]


def test_packed_embeddings_are_written_float(tmp_path):
    """A packed table (tied to the head) has no form in the format: written dequantized, the logits unchanged."""
    ours, theirs, details = exported(tmp_path, [RTNConfig(bits=4, group_size=32),
                                                EmbeddingsConfig(bits=4, group_size=32)], tie_word_embeddings=True)
    assert details["dequantized"] == ["model.embed_tokens"]
    assert_close(ours, theirs)


def test_formats_it_cannot_express_are_refused(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    model, _ = lowbit.load_model(src)
    lowbit.quantize(model, lowbit.Recipe([RTNConfig(bits=4, group_size=32, format="nf")]))
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.self_attn\.q_proj is packed as nf4.*int recipe"):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    float_model, _ = lowbit.load_model(src)
    with pytest.raises(LowbitError, match="no packed layer"):
        export_compressed_tensors(float_model, tmp_path / "ct")


def test_cli_export_and_refusals(tmp_path, ckpt):
    out = tmp_path / "ct"
    cmd = [sys.executable, "-m", "lowbit", "export", str(ckpt), "--to", "compressed-tensors", "--out", str(out)]
    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["format"] == "compressed-tensors" and "model.safetensors" in result["files"]
    assert result["details"]["packed_layers"] == 14
    again = subprocess.run(cmd, capture_output=True, text=True)  # an existing output is refused without --force
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    bad = subprocess.run([*cmd[:-4], "--to", "onnx", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "compressed-tensors" in bad.stderr and "Traceback" not in bad.stderr


def test_requantize_rounds_other_grids_into_int(tmp_path):
    """--requantize: NF4 layers are rounded into int4 in their own groups; the export holds that model exactly."""
    from lowbit.export_ct import requantize_to_int

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    model, _ = lowbit.load_model(src)
    lowbit.quantize(model, lowbit.Recipe([RTNConfig(bits=4, group_size=32, format="nf")]))
    errors = requantize_to_int(model)
    assert len(errors) == 14 and all(0 < e < 0.2 for e in errors.values())
    assert {m.fmt for m in model.modules() if isinstance(m, lowbit.QLinear)} == {"int4"}
    with torch.no_grad():
        ours = model(torch.tensor(IDS)).logits
    export_compressed_tensors(model, tmp_path / "ct")
    assert_close(ours, transformers_logits(tmp_path / "ct", tmp_path))


def test_api_requantize_measures_the_change(tmp_path, hf_folder):
    model, tok = lowbit.load_model(hf_folder)
    lowbit.quantize(model, lowbit.Recipe([RTNConfig(bits=4, group_size=64, format="nf")]))
    lowbit.save(model, tmp_path / "nf", tokenizer=tok)
    result = lowbit.api.export(lowbit.api.ExportConfig(model=str(tmp_path / "nf"), out=tmp_path / "ct",
                                                       layout="compressed-tensors", requantize=True, windows=1))
    d = result.details
    assert d["requantized_layers"] == 14 and d["ppl_before"] > 1 and d["ppl_after"] > 1
    assert "first 1" in d["eval"]
    with pytest.raises(LowbitError, match="--requantize applies to --to compressed-tensors"):
        lowbit.api.export(lowbit.api.ExportConfig(model=str(tmp_path / "nf"), out=tmp_path / "x.gguf",
                                                  layout="gguf", requantize=True))
