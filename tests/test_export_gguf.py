"""GGUF export (``lowbit export --to gguf``) and quantizing straight into an export grid (``--target``), proven
by transformers' GGUF loader in a fresh interpreter that never imports lowbit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import bpe_tokenizer, tiny_model, word_tokenizer

import lowbit
from lowbit.errors import LowbitError
from lowbit.export_gguf import export_gguf
from lowbit.quantizers import RTNConfig
from lowbit.recipe import Recipe
from lowbit.targets import recipe_for_target

IDS = [[1, 5, 9, 77, 3, 200, 14, 8, 31, 2, 250, 6]]
TEXT = "The tower is 324 metres tall, about the same height as an 81-storey building."

LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, name = sys.argv[1].rsplit("/", 1)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
assert not any(m == "lowbit" or m.startswith("lowbit.") for m in sys.modules), "lowbit was imported"
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
torch.save({"logits": logits, "ids": tok(sys.argv[4]).input_ids}, sys.argv[3])
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf") / "src"
    tiny_model("llama", max_position_embeddings=256, vocab_size=300).save_pretrained(folder)
    bpe_tokenizer(300).save_pretrained(folder)
    return folder


def transformers_read(path, tmp_path) -> dict:
    out = tmp_path / "read.pt"
    subprocess.run([sys.executable, "-c", LOAD, str(path), json.dumps(IDS), str(out), TEXT], check=True,
                   capture_output=True, text=True)
    return torch.load(out)


def quantized(source, target: str, recipe: str = "rtn-w4g128", calib=None):
    model, tok = lowbit.load_model(source)
    lowbit.quantize(model, recipe_for_target(Recipe.parse(recipe), target), calib=calib)
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits
    return model, tok, logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("target,qtype", [("gguf:q4_0", "Q4_0"), ("gguf:q8_0", "Q8_0"), ("gguf:iq4_nl", "IQ4_NL")])
def test_block_grids_export_exactly(tmp_path, source, target, qtype):
    model, tok, ours = quantized(source, target)
    details = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    assert details["types"] == {qtype: 14} and details["max_encoding_error"] == 0.0
    read = transformers_read(tmp_path / "m.gguf", tmp_path)
    assert relative(ours, read["logits"]) < 1e-4
    assert read["ids"] == tok(TEXT).input_ids  # the vocabulary and merges round-trip


@pytest.mark.parametrize("family,extra", [("qwen2", {}), ("qwen3", {"head_dim": 128})])
def test_qwen_families_export_exactly(tmp_path, family, extra):
    """Qwen2 (q/k/v biases, written F32) and Qwen3 (q/k norms; head_dim 128, what transformers' GGUF loader
    assumes) in their own GGUF architectures, rows not permuted."""
    src = tmp_path / "src"
    float_model = tiny_model(family, max_position_embeddings=256, vocab_size=300, **extra)
    biases = [m.bias for m in float_model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert len(biases) == (6 if family == "qwen2" else 0)
    with torch.no_grad():
        for b in biases:
            b.normal_(0, 0.5)  # initialised to zero: a dropped bias would go unseen
    float_model.save_pretrained(src)
    bpe_tokenizer(300).save_pretrained(src)
    model, tok, ours = quantized(src, "gguf:q4_0")
    details = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    assert details["types"] == {"Q4_0": 14} and details["max_encoding_error"] == 0.0
    read = transformers_read(tmp_path / "m.gguf", tmp_path)
    assert relative(ours, read["logits"]) < 1e-4


def test_table_wider_than_the_tokenizer_pads_the_token_list(tmp_path):
    """An embedding table padded past its tokenizer (320 rows, 300 tokens: Llama-3-shaped random models, padded
    vocabularies): the token list is padded to the table with unused ``[PADi]`` tokens, as llama.cpp requires."""
    from gguf import GGUFReader

    src = tmp_path / "src"
    tiny_model("llama", max_position_embeddings=256, vocab_size=320).save_pretrained(src)
    bpe_tokenizer(300).save_pretrained(src)
    model, tok, ours = quantized(src, "gguf:q4_0")
    export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    fields = GGUFReader(tmp_path / "m.gguf").fields
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens.data) == 320
    assert [int(types.parts[i][0]) for i in types.data[300:]] == [5] * 20
    assert bytes(tokens.parts[tokens.data[-1]]).decode() == "[PAD319]"
    read = transformers_read(tmp_path / "m.gguf", tmp_path)
    assert relative(ours, read["logits"]) < 1e-4
    assert read["ids"] == tok(TEXT).input_ids


def test_gptq_into_q4_0(tmp_path, source):
    """GPTQ's Hessian-aware rounding straight into Q4_0's grid: the file holds exactly what lowbit computed."""
    calib = lowbit.Calibration(windows=torch.randint(0, 300, (4, 64)))
    model, tok, ours = quantized(source, "gguf:q4_0", "gptq-w4g128", calib)
    assert {m.fmt for m in model.modules() if isinstance(m, lowbit.QLinear)} == {"int4_sym"}
    export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    assert relative(ours, transformers_read(tmp_path / "m.gguf", tmp_path)["logits"]) < 1e-4


@pytest.fixture(scope="module")
def wide_source(tmp_path_factory):
    """Rows 256 and 512 wide: whole K-quant super-blocks."""
    folder = tmp_path_factory.mktemp("gguf") / "wide"
    tiny_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, vocab_size=300).save_pretrained(folder)
    bpe_tokenizer(300).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("recipe", ["rtn-w4g128", "gptq-w4g128"])
def test_k_quant_q6_k_exports_exactly(tmp_path, wide_source, recipe):
    """``--target gguf:q6_k``: groups of 16 whose scales are ``d · k_j`` per 256 columns; the Q6_K blocks decode
    (gguf-py's reference dequantizer and transformers' loader) to exactly lowbit's weights and logits."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    calib = lowbit.Calibration(windows=torch.randint(0, 300, (4, 64)))
    model, tok, ours = quantized(wide_source, "gguf:q6_k", recipe, calib)
    details = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    assert details["types"] == {"Q6_K": 14} and details["max_encoding_error"] == 0.0
    down = model.model.layers[1].mlp.down_proj
    tensor = next(t for t in GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.1.ffn_down.weight")
    assert torch.equal(torch.from_numpy(dequantize(tensor.data, tensor.tensor_type)), down.weight.float())
    assert relative(ours, transformers_read(tmp_path / "m.gguf", tmp_path)["logits"]) < 1e-4


def test_k_quant_refusals(tmp_path, source, wide_source):
    with pytest.raises(LowbitError, match="64-wide weight in groups of 16 is not a whole number of 256-column"):
        quantized(source, "gguf:q6_k")
    with pytest.raises(LowbitError, match="scale_steps .* needs a symmetric grid in groups that divide 256"):
        RTNConfig(bits=6, symmetric=False, group_size=16, scale_steps=127)
    model, tok = lowbit.load_model(wide_source)
    lowbit.quantize(model, Recipe([RTNConfig(bits=6, symmetric=True, group_size=16)]))
    with pytest.raises(LowbitError, match=r"q_proj's int6_sym g16 scales are free fp16 values.*--target gguf:q6_k"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []


def test_q4_1_rounds_only_the_min(tmp_path, source):
    """Q4_1 stores the min ``-s z`` in fp16: the export reports the largest weight change that rounding makes."""
    model, tok, ours = quantized(source, "gguf:q4_1")
    details = export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    assert details["types"] == {"Q4_1": 14} and 0 < details["max_encoding_error"] < 1e-3
    assert relative(ours, transformers_read(tmp_path / "m.gguf", tmp_path)["logits"]) < 5e-3


def test_refusals_write_nothing(tmp_path, source):
    model, tok = lowbit.load_model(source)
    lowbit.quantize(model, "rtn-w4g128")
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.self_attn\.q_proj is packed as int4 group g128.*"
                                          r"--target gguf:q4_0"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    assert list(tmp_path.iterdir()) == []
    gemma = tiny_model("gemma")
    lowbit.quantize(gemma, recipe_for_target(Recipe.parse("rtn-w4g128"), "gguf:q4_0"))
    with pytest.raises(LowbitError, match="writes llama, mistral, qwen2, qwen3 models so far, not gemma"):
        export_gguf(gemma, tmp_path / "q.gguf")
    model, _, _ = quantized(source, "gguf:q4_0")
    with pytest.raises(LowbitError, match="WordLevel, not byte-level BPE.*convert_hf_to_gguf"):
        export_gguf(model, tmp_path / "w.gguf", tokenizer=word_tokenizer())
    assert not (tmp_path / "w.gguf").exists()
    (tmp_path / "old.gguf").write_bytes(b"kept")
    model, tok, _ = quantized(source, "gguf:q4_0")
    with pytest.raises(LowbitError, match="--force"):
        export_gguf(model, tmp_path / "old.gguf", tokenizer=tok)
    assert (tmp_path / "old.gguf").read_bytes() == b"kept"


def test_target_refuses_other_steps_and_flags():
    with pytest.raises(LowbitError, match="unknown --target 'gguf:q3_k'"):
        recipe_for_target(Recipe.parse("gptq-w4g128"), "gguf:q3_k")
    with pytest.raises(LowbitError, match="lowra"):
        recipe_for_target(Recipe.parse("lowra-b2.0"), "gguf:q4_0")
    steps = recipe_for_target(Recipe.parse("gptq-w4g128+emb8"), "compressed-tensors:w4a16").steps
    assert [(s.bits, s.symmetric, s.group_size) for s in steps] == [(4, True, 128), (4, True, 128)]


def test_cli_quantize_into_q4_0_then_export(tmp_path, source):
    ckpt, out = tmp_path / "ckpt", tmp_path / "m.gguf"
    q = subprocess.run([sys.executable, "-m", "lowbit", "quantize", str(source), "--recipe", "rtn-w4g128",
                        "--target", "gguf:q4_0", "--no-eval", "--calib-seq-len", "128", "--out", str(ckpt), "--json"],
                       capture_output=True, text=True)
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout)["recipe"] == "rtn-w4g128@gguf:q4_0"
    e = subprocess.run([sys.executable, "-m", "lowbit", "export", str(ckpt), "--to", "gguf", "--out", str(out),
                        "--json"], capture_output=True, text=True)
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["details"]["types"] == {"Q4_0": 14} and out.is_file()
    again = subprocess.run([sys.executable, "-m", "lowbit", "export", str(ckpt), "--to", "gguf", "--out", str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    both = subprocess.run([sys.executable, "-m", "lowbit", "quantize", str(source), "--target", "gguf:q4_0",
                           "--bits", "3", "--no-eval", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert both.returncode == 2 and "--target gguf:q4_0 sets the grid" in both.stderr


def test_float_model_exports_as_llama_cpp_input(tmp_path, source):
    """A float model becomes the F32/F16 file llama.cpp's own quantizer starts from (its side-by-side baseline)."""
    model, tok = lowbit.load_model(source)
    with torch.no_grad():
        ours = model(torch.tensor(IDS)).logits
    details = export_gguf(model, tmp_path / "f.gguf", tokenizer=tok)
    assert details["types"] == {} and details["tensors"] == 21
    assert relative(ours, transformers_read(tmp_path / "f.gguf", tmp_path)["logits"]) < 1e-5
