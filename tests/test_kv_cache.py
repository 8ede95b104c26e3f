"""The quantized KV cache (lowbit.nn.kv_cache) on tiny random llamas built in-process: dequantized K/V against
float, packed bytes, the Hadamard key rotation, perplexity and greedy generation through it, and the CLI flag."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
import transformers as tf
from conftest import ByteTokenizer, tiny_model
from test_cli import invoke, one_error_line, one_json_object

import lowbit
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import perplexity
from lowbit.kernels.hadamard import hadamard_matrix
from lowbit.nn.kv_cache import (
    KVCacheConfig,
    QuantizedKVLayer,
    QuantizedSlidingKVLayer,
    dequantize_tokens,
    kv_cache_bytes,
    make_kv_cache,
    parse_kv_cache,
    quantize_tokens,
)

IDS = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(3))
TEXT = ("The game began development in 2010 , carrying over a large portion of the work done on Valkyria Chronicles "
        "II . While it retained the standard features of the series , it also underwent multiple adjustments . ")


def _forward(model, cache=None):
    with torch.no_grad():
        if cache is None:
            return model(IDS, use_cache=True)
        return model(IDS, past_key_values=cache, use_cache=True)


# ---- the quantizer and one layer ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
def test_every_number_is_within_half_a_step(bits):
    x = torch.randn(2, 3, 17, 64) * torch.rand(2, 3, 17, 1) * 5
    x[0, 0, 0] = 0.0  # an all-zero token: scale at its floor, codes equal the zero point, no NaN
    q = quantize_tokens(x, bits)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (2, 3, 17, 64 * bits // 8)
    assert q.scale.dtype == q.zero.dtype == torch.float16 and q.scale.shape == q.zero.shape == (2, 3, 17, 1)
    xhat = dequantize_tokens(q, bits, 64)
    assert torch.all((xhat - x).abs() <= 0.5 * q.scale.float() * (1 + 1e-4) + 1e-7)
    assert torch.equal(xhat[0, 0, 0], torch.zeros(64))


def test_int8_layer_returns_dequantized_keys_and_values_close_to_float():
    layer = QuantizedKVLayer(bits=8, rotate_keys=False)
    k, v = torch.randn(1, 2, 10, 32), torch.randn(1, 2, 10, 32)
    keys, values = layer.update(k, v)  # the first call already returns quantized states
    assert keys.shape == k.shape and not torch.equal(keys, k)
    assert float((keys - k).norm() / k.norm()) < 1e-2 and float((values - v).norm() / v.norm()) < 1e-2
    k2, v2 = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)  # a decode step appends
    keys, values = layer.update(k2, v2)
    assert keys.shape == (1, 2, 11, 32) and layer.get_seq_length() == 11 and layer.stored_tokens() == 11
    assert torch.allclose(keys[:, :, -1:], k2, atol=0.02) and torch.allclose(values[:, :, :10], values[:, :, :10])
    layer.crop(-3)
    assert layer.get_seq_length() == 8 and layer.dequantized()[0].shape == (1, 2, 8, 32)


def test_int8_cache_in_a_forward_is_close_to_the_float_cache():
    model = tiny_model("llama")
    ref = _forward(model)
    cache = make_kv_cache(model, KVCacheConfig(bits=8))
    out = _forward(model, cache)
    assert out.past_key_values is cache and cache.get_seq_length() == IDS.shape[1]
    keys, values = cache.layers[0].dequantized()  # layer 0 sees the same inputs in both runs
    fk, fv = ref.past_key_values.layers[0].keys, ref.past_key_values.layers[0].values
    assert float((keys - fk).norm() / fk.norm()) < 5e-3 and float((values - fv).norm() / fv.norm()) < 5e-3
    err = float((out.logits - ref.logits).norm() / ref.logits.norm())
    assert 0 < err < 5e-3  # the forward really attended to quantized K/V, and closely


# ---- bytes ------------------------------------------------------------------------------------------------

def test_int4_storage_is_packed_four_and_a_half_bits_per_number():
    model = tiny_model("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)  # head_dim 64
    cache = make_kv_cache(model, KVCacheConfig(bits=4))
    _forward(model, cache)
    layer = cache.layers[0]
    assert layer.qkeys.codes.shape == (1, 1, IDS.shape[1], 32)  # two codes a byte
    size = kv_cache_bytes(cache)
    numbers = 2 * 2 * 1 * IDS.shape[1] * 64  # layers x (keys, values) x kv heads x tokens x head_dim
    assert size.numbers == numbers and size.codes == numbers // 2 and size.scales == numbers // 64 * 4
    assert size.stored == numbers * 4.5 / 8 and size.bits_per_number == 4.5
    assert size.float_model_dtype == numbers * 4 and size.float_bf16 == numbers * 2
    d = size.to_dict()
    assert d["ratio_to_float32"] == 4.5 / 32 and d["ratio_to_bf16"] == 4.5 / 16 <= 0.30
    int8 = make_kv_cache(model, KVCacheConfig(bits=8))
    _forward(model, int8)
    assert kv_cache_bytes(int8).bits_per_number == 8.5
    float_cache = _forward(model).past_key_values  # transformers' own cache counts its float tensors
    assert kv_cache_bytes(float_cache).stored == size.float_model_dtype


# ---- rotation ---------------------------------------------------------------------------------------------

def test_rotation_round_trips_and_beats_plain_int4_on_an_outlier_channel():
    h = hadamard_matrix(64, torch.float32)
    k = torch.randn(1, 2, 64, 64)
    assert torch.allclose(k @ h @ h.T, k, atol=1e-5)  # no quantization: the rotation alone is lossless
    k[..., 5] *= 25.0  # one outlier channel sets every token's scale
    v = torch.randn(1, 2, 64, 64)
    rotated, plain = QuantizedKVLayer(bits=4, rotate_keys=True), QuantizedKVLayer(bits=4, rotate_keys=False)
    kr, vr = rotated.update(k, v)
    kp, vp = plain.update(k, v)
    expected = (dequantize_tokens(quantize_tokens(k @ h, 4), 4, 64) @ h.T)  # attention sees Q(k H) Hᵀ
    assert torch.allclose(kr, expected, atol=1e-5)
    assert torch.equal(vr, vp)  # values are never rotated
    err_rot, err_plain = float((kr - k).norm() / k.norm()), float((kp - k).norm() / k.norm())
    assert err_rot < 0.6 * err_plain, (err_rot, err_plain)


def test_unsupported_head_dim_and_layer_types_are_refused():
    model = tiny_model("llama", hidden_size=24, num_attention_heads=4, num_key_value_heads=2)  # head_dim 6
    with pytest.raises(LowbitError, match="no Hadamard matrix for head_dim 6.*int8-norot"):
        make_kv_cache(model, KVCacheConfig(bits=8))
    assert make_kv_cache(model, KVCacheConfig(bits=8, rotate_keys=False)) is not None
    config = tf.LlamaConfig(num_hidden_layers=2, layer_types=["full_attention", "chunked_attention"],
                            attention_chunk_size=8)
    with pytest.raises(LowbitError, match="chunked_attention layers.*--kv-cache float"):
        make_kv_cache(types.SimpleNamespace(config=config), KVCacheConfig())


@pytest.mark.parametrize("bad", [3, 16, True, "8"])
def test_config_validation(bad):
    with pytest.raises(LowbitError, match="bits must be 4 or 8"):
        KVCacheConfig(bits=bad)


def test_parse_names():
    assert parse_kv_cache("float") is None
    assert parse_kv_cache("int4") == KVCacheConfig(4, True) and parse_kv_cache("INT8-norot") == KVCacheConfig(8, False)
    with pytest.raises(LowbitError, match="--kv-cache must be one of float, int8, int4"):
        parse_kv_cache("fp8")


# ---- sliding windows --------------------------------------------------------------------------------------

def test_sliding_window_layers_keep_only_the_window_quantized():
    model = tiny_model("mistral", sliding_window=16)
    ref = _forward(model)
    cache = make_kv_cache(model, KVCacheConfig(bits=8))
    assert all(isinstance(layer, QuantizedSlidingKVLayer) for layer in cache.layers)
    out = _forward(model, cache)
    assert float((out.logits - ref.logits).norm() / ref.logits.norm()) < 5e-3
    assert cache.layers[0].stored_tokens() == 15 and cache.get_seq_length() == IDS.shape[1]
    with torch.no_grad():
        a = model.generate(IDS[:, :20], max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = model.generate(IDS[:, :20], max_new_tokens=6, do_sample=False, pad_token_id=0,
                           past_key_values=make_kv_cache(model, KVCacheConfig(bits=8)))
    assert torch.equal(a, b)


# ---- perplexity and generation ------------------------------------------------------------------------------

@pytest.fixture
def prose(monkeypatch):
    p = sys.modules["lowbit.eval.perplexity"]  # the package re-exports a function of the same name
    monkeypatch.setattr(p, "wikitext2_text", lambda split="test": TEXT * 3)
    p._tokenized.cache_clear()
    yield
    p._tokenized.cache_clear()


def test_perplexity_with_an_int8_cache_is_within_one_percent(prose):
    model, tok = tiny_model("llama"), ByteTokenizer()
    fp = perplexity(model, tok, windows=4, seq_len=128, progress=False)
    q8 = perplexity(model, tok, windows=4, seq_len=128, progress=False, kv_cache=KVCacheConfig(bits=8))
    q4 = perplexity(model, tok, windows=4, seq_len=128, progress=False, kv_cache=KVCacheConfig(bits=4))
    assert q8.ppl != fp.ppl and abs(q8.ppl / fp.ppl - 1) < 0.01
    assert math.isfinite(q4.ppl) and abs(q4.ppl / fp.ppl - 1) < 0.05
    again = perplexity(model, tok, windows=4, seq_len=128, progress=False)
    assert again.ppl == fp.ppl  # the float path is untouched


def test_greedy_generation_with_an_int8_cache_matches_float():
    model = tiny_model("llama")
    prompt = IDS[:, :12]
    cache = make_kv_cache(model, KVCacheConfig(bits=8))
    with torch.no_grad():
        a = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        b = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, past_key_values=cache)
    assert torch.equal(a, b)
    assert cache.get_seq_length() == cache.layers[0].stored_tokens() == 12 + 8 - 1  # every step went through it


# ---- the command line -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["eval", "smollm2-135m"], ["generate", "smollm2-135m", "--prompt", "hi"]])
def test_bad_kv_cache_value_is_one_line_exit_2(command):
    line = one_error_line(invoke(*command, "--kv-cache", "int3", "--json"))
    assert "--kv-cache must be one of float, int8, int4, int8-norot, int4-norot, got 'int3'" in line


def test_eval_and_generate_with_a_quantized_cache(hf_folder):
    payload = one_json_object(invoke("eval", hf_folder, "--windows", "1", "--seq-len", "64", "--kv-cache", "int8",
                                     "--json"))
    model, tok = lowbit.load_model(hf_folder)
    ref = perplexity(model, tok, windows=1, seq_len=64, progress=False, kv_cache=KVCacheConfig(bits=8))
    assert payload["kv_cache"] == "int8" and payload["ppl"] == pytest.approx(ref.ppl, rel=1e-6)
    args = ("generate", hf_folder, "--prompt", "The game was released in", "--max-new-tokens", "4", "--raw", "--json")
    fp, q8 = one_json_object(invoke(*args)), one_json_object(invoke(*args, "--kv-cache", "int8"))
    assert q8["kv_cache"] == "int8" and fp["kv_cache"] == "float" and q8["text"] == fp["text"]
    assert json.loads(json.dumps(q8))["new_tokens"] == fp["new_tokens"]
