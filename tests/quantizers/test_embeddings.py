"""The ``embeddings`` step: packed token embeddings, a tied head sharing them, save/load and recipe composition."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

import lowbit
from lowbit import EmbeddingsConfig, LowbitError, QEmbedding, QLinear, Recipe, RTNConfig
from lowbit.bench import weight_bytes_per_token
from lowbit.state import state_of
from lowbit.summary import bits_summary

IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 0, 33]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_tied_head_shares_the_packed_table_and_lookups_match_it():
    model = tiny_model("llama", tie_word_embeddings=True)
    table_fp = model.get_input_embeddings().weight.detach().clone()
    ref = _logits(model)
    lowbit.quantize(model, "emb8")

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, QEmbedding) and isinstance(head, QLinear) and head.role == "head"
    assert all(getattr(head, n) is getattr(embed, n) for n in embed.packed_names)  # one table, stored once
    assert not model.config.tie_word_embeddings  # lowbit ties the packed buffers; HF must not re-tie
    table = embed.qweight.dequantize()
    assert torch.equal(embed(IDS), table[IDS])
    # int8 with one scale per row: every entry within half a step of its row's absmax / 127
    step = table_fp.abs().amax(dim=1, keepdim=True) / 127
    assert ((table - table_fp).abs() <= step / 2 + 1e-6).all()
    out = _logits(model)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_untied_head_is_quantized_on_its_own():
    model = tiny_model("llama")  # TINY llama does not tie
    head_fp = model.lm_head.weight.detach().clone()
    lowbit.quantize(model, "emb8")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(head, QLinear) and head.codes is not embed.codes
    assert torch.allclose(head.qweight.dequantize(), head_fp, atol=head_fp.abs().max().item() / 127)


def test_head_false_keeps_a_float_head_with_the_original_weights():
    model = tiny_model("llama", tie_word_embeddings=True)
    table_fp = model.get_input_embeddings().weight.detach().clone()
    lowbit.quantize(model, Recipe([EmbeddingsConfig(head=False)]))
    head = model.get_output_embeddings()
    assert isinstance(head, nn.Linear) and torch.equal(head.weight, table_fp)
    assert isinstance(model.get_input_embeddings(), QEmbedding) and not model.config.tie_word_embeddings


def test_bits_per_weight_of_the_layers_is_unchanged_and_the_table_is_counted_apart():
    plain = lowbit.quantize(tiny_model("llama", tie_word_embeddings=True), "rtn-w4g64")
    both = lowbit.quantize(tiny_model("llama", tie_word_embeddings=True), "rtn-w4g64+emb8")
    s_plain, s_both = bits_summary(plain), bits_summary(both)
    assert s_both["bits_per_weight"] == s_plain["bits_per_weight"]
    assert s_both["quantized_layers"] == s_plain["quantized_layers"] == 14
    # 256 x 64 int8 codes + one fp16 scale per row, once although the head shares it
    assert s_both["embedding_bytes"] == 256 * 64 + 256 * 2
    assert s_both["embedding_bits_per_weight"] == pytest.approx(8 + 16 / 64)
    # decode reads the whole table once (it is the head): float 4 bytes/weight -> packed ~1
    saved = weight_bytes_per_token(plain) - weight_bytes_per_token(both)
    assert saved == 256 * 64 * 4 - s_both["embedding_bytes"]


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_is_bit_identical_and_keeps_the_table_shared(tmp_path, tied):
    model = lowbit.quantize(tiny_model("llama", tie_word_embeddings=tied), "rtn-w4g64+emb8")
    path = lowbit.save(model, tmp_path / "ckpt")
    loaded, _ = lowbit.load(path)
    assert torch.equal(_logits(loaded), _logits(model))
    embed, head = loaded.get_input_embeddings(), loaded.get_output_embeddings()
    assert isinstance(embed, QEmbedding) and isinstance(head, QLinear) and head.role == "head"
    assert (head.codes.data_ptr() == embed.codes.data_ptr()) == tied
    manifest = state_of(loaded).manifest
    assert {e["role"] for e in manifest["embeddings"].values()} == {"embedding", "head"}
    assert set(manifest["layers"]) == {n for n, m in loaded.named_modules() if isinstance(m, QLinear)} - {"lm_head"}
    assert ("lm_head.codes" in manifest["aliases"]) == tied


def test_from_pretrained_loads_the_packed_table(tmp_path):
    hf_integration = pytest.importorskip("lowbit.hf_integration")
    if not hf_integration.REGISTERED:
        pytest.skip("this transformers has no quantizer registry")
    from transformers import AutoModelForCausalLM

    model = lowbit.quantize(tiny_model("llama", tie_word_embeddings=True), "rtn-w4g64+emb8")
    path = lowbit.save(model, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(path)
    embed = hf.get_input_embeddings()
    assert isinstance(embed, QEmbedding) and embed.scales.dtype == torch.float16
    assert hf.get_output_embeddings().codes is embed.codes
    assert torch.equal(_logits(hf), _logits(model))
    hf.dequantize()
    assert type(hf.get_input_embeddings()) is nn.Embedding
    assert torch.allclose(_logits(hf), _logits(model), atol=1e-5)


def test_presets_compose_with_plus():
    recipe = Recipe.parse("rtn-w2g64+emb8")
    assert recipe.steps == [RTNConfig(bits=2, group_size=64), EmbeddingsConfig()] and recipe.name == "rtn-w2g64+emb8"
    with pytest.raises(LowbitError, match="emb9"):
        Recipe.parse("rtn-w2g64+emb9")


def test_bad_input_is_refused_before_any_change():
    model = tiny_model("llama", tie_word_embeddings=True)
    with pytest.raises(LowbitError, match="already quantized"):
        lowbit.quantize(model, "emb8+emb8")
    model = tiny_model("llama", tie_word_embeddings=True)
    with torch.no_grad():
        model.get_input_embeddings().weight[3, 5] = float("nan")
    with pytest.raises(LowbitError, match="embed_tokens.*NaN"):
        lowbit.quantize(model, "emb8")
    assert type(model.get_input_embeddings()) is nn.Embedding  # nothing was replaced
    with pytest.raises(LowbitError, match="bits"):
        EmbeddingsConfig(bits=9)
