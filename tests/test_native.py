"""The native decode step (lowbit.native, csrc/decode.cpp): the same greedy tokens and logits as transformers'
eager forward on packed tiny models of every family it runs, an fp16 head only where exact, and a clear reason
(then transformers) for every model it does not run."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_cli import invoke, one_error_line, one_json_object

import lowbit
from lowbit import Recipe, RTNConfig
from lowbit.adapters import LoRAConfig, attach
from lowbit.bench import tensor_bytes, weight_bytes_per_token
from lowbit.native import _layer_cache, native_decoder, native_reason

pytestmark = pytest.mark.skipif(lowbit.kernels.cpu.extension() is None, reason="the C++ extension did not build")
# A batch runs the small-batch int8 kernel, which needs AVX512-VNNI or AVX2 (every packed layer of a batch takes it).
needs_int8 = pytest.mark.skipif(lowbit.kernels.cpu.extension() is None or
                                not lowbit.kernels.cpu.extension().int8_x_applies(4, 32, False),
                                reason="no int8 GEMV (AVX512-VNNI or AVX2): the native step runs one sequence")


def _packed(arch: str, bits: int = 4, group_size: int = 32):
    model = tiny_model(arch)
    lowbit.quantize(model, Recipe([RTNConfig(bits=bits, group_size=group_size)]))
    return model


def _step_logits(model, decoder, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """The native step's logits at positions prompt..T-1 of ``ids``, its cache filled by the model's prompt pass."""
    out = model(ids[:, :prompt], use_cache=True)
    decoder._decoder.reset(ids.shape[1])
    for i in range(len(model.model.layers)):
        keys, values = _layer_cache(out.past_key_values, i)
        decoder._decoder.set_cache(i, keys[0], values[0])
    return torch.stack([decoder.logits(int(ids[0, p]), p) for p in range(prompt, ids.shape[1])])


def _assert_matches_transformers(model, decoder, new_tokens: int, seed: int) -> None:
    """Greedy tokens equal to ``model.generate``'s, and the step's logits within 1e-5 (relative to each row's
    largest) of the whole sequence's forward without a cache (an independent path)."""
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        reference = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0)
        out = decoder.generate(ids, new_tokens)
        full = model(out).logits[0, 6:]
        step = _step_logits(model, decoder, out, 6)
    assert torch.equal(out, reference)
    assert ((step - full).abs() / full.abs().amax(dim=-1, keepdim=True)).max() < 1e-5


@pytest.mark.parametrize("arch,bits,group_size", [("llama", 4, 32), ("llama", 2, 64), ("llama", 3, 32),
                                                  ("qwen2", 4, 32), ("mistral", 2, 32)])
def test_native_greedy_tokens_and_logits_match_transformers(arch, bits, group_size):
    model = _packed(arch, bits, group_size)
    assert native_reason(model) is None
    decoder = native_decoder(model, 64)
    _assert_matches_transformers(model, decoder, 16, seed=1)


def test_lowra_mixed_rows_run_natively():
    model = tiny_model("llama")
    lowbit.quantize(model, "lowra-b2.0")
    assert native_reason(model) is None
    decoder = native_decoder(model)
    assert decoder._decoder.fused_groups() == 0  # mixed rows: one call per Linear
    _assert_matches_transformers(model, decoder, 8, seed=5)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (2, 64), (3, 32)])
def test_weights_sharing_an_input_in_one_call_equal_one_call_each(bits, group_size):
    """qgemv_multi (a layer's q/k/v or gate/up in one parallel region) computes each weight's GEMV exactly as
    qgemv does, on the fp32 path and on the int8-activation path where it applies."""
    from lowbit.kernels.compiled import row_plan

    model = _packed("llama", bits, group_size)
    attn = model.model.layers[0].self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    ext = lowbit.kernels.cpu.extension()
    _, _, levels, offset, _ = row_plan(layers[0].weight_meta["fmt"], group_size, "exact")
    x = torch.randn(layers[0].in_features)
    args = ([m.codes for m in layers], [m.scales for m in layers], [m._buffers.get("zeros") for m in layers])
    for int8 in (False, bool(ext.int8_x_applies(bits, group_size, levels is not None))):
        fused = ext.qgemv_multi(x, *args, levels, bits, group_size, offset, int8)
        single = [ext.qgemv(x, c, s, z, levels, bits, group_size, offset, int8) for c, s, z in zip(*args, strict=True)]
        assert [y.shape for y in fused] == [y.shape for y in single]
        assert all(torch.equal(a, b) for a, b in zip(fused, single, strict=True))
    assert native_decoder(model)._decoder.fused_groups() == 2 * len(model.model.layers)


def test_long_context_attention_runs_heads_in_parallel_and_stays_exact():
    """At 256+ positions the heads are split over threads; the result does not change."""
    model = _packed("llama")
    decoder = native_decoder(model)
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(ids).logits[0, 270:]
        step = _step_logits(model, decoder, ids, 270)
    assert ((step - full).abs() / full.abs().amax(dim=-1, keepdim=True)).max() < 1e-5


def _assert_head_read_as(model, dtype: torch.dtype) -> None:
    """The native step reads ``model``'s head as ``dtype`` and decodes the same 8 greedy tokens as transformers."""
    decoder = native_decoder(model)
    assert decoder.head_dtype == dtype
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(decoder.generate(ids, 8), model.generate(ids, max_new_tokens=8, do_sample=False,
                                                                     pad_token_id=0))


def test_the_head_is_read_as_fp16_only_when_every_value_is_an_fp16_number():
    model = _packed("llama")
    assert native_decoder(model).head_dtype == torch.float32  # random fp32 init: not fp16 numbers
    twin = _packed("llama")
    head = twin.get_output_embeddings()
    head.weight.data = head.weight.data.half().float()
    _assert_head_read_as(twin, torch.float16)
    # columns short of one 64-column step (the bound before the one-row loop), and steps plus a ragged tail
    for n, k, atol in ((67, 40, 1e-5), (130, 1000, 1e-4)):
        x, w = torch.randn(k), torch.randn(n, k).half()
        torch.testing.assert_close(lowbit.kernels.cpu.extension().gemv_f16(x, w), w.float() @ x, rtol=1e-5,
                                   atol=atol)


def test_a_head_of_bf16_values_is_read_as_bf16():
    """A bf16 model's table (values that are bf16 but not all fp16 numbers: some below fp16's normal range) is read
    as bf16, half the fp32 bytes; greedy decoding is unchanged."""
    twin = _packed("llama")
    head = twin.get_output_embeddings()
    values = head.weight.data.clone()
    values[0, :4] = torch.tensor([1e-7, -3e-6, 2e-7, -5e-7])  # off fp16's subnormal grid, on bf16's once rounded
    head.weight.data = values.bfloat16().float()
    _assert_head_read_as(twin, torch.bfloat16)
    for n, k in ((67, 40), (5, 16), (130, 1000)):  # columns off the 64-column steps and the 16-column tail
        x, w = torch.randn(k), torch.randn(n, k).bfloat16()
        torch.testing.assert_close(lowbit.kernels.cpu.extension().gemv_bf16(x, w), w.float() @ x, rtol=1e-5,
                                   atol=1e-4)


def test_decode_speed_reports_the_native_step_and_its_calls():
    from conftest import ByteTokenizer

    from lowbit.eval.speed import decode_speed

    model = _packed("llama")
    speed = decode_speed(model, ByteTokenizer(), new_tokens=5, warmup_tokens=2, native=True)
    assert speed.engine == "native" and speed.new_tokens == 5 and "native-step:4" in speed.kernel
    plain = decode_speed(model, ByteTokenizer(), new_tokens=5, warmup_tokens=2)
    assert plain.engine == "transformers" and "native-step" not in plain.kernel
    head = tensor_bytes(model.get_output_embeddings())
    assert weight_bytes_per_token(model) - weight_bytes_per_token(model, half_head=True) == head // 2


def test_a_packed_table_and_head_emb8_run_natively_with_the_tables_own_lookup():
    model = tiny_model("llama", tie_word_embeddings=True)
    lowbit.quantize(model, "rtn-w4g32+emb8")
    assert type(model.get_input_embeddings()).__name__ == "QEmbedding" and native_reason(model) is None
    decoder = native_decoder(model)
    assert decoder.head_dtype is None  # the head is the packed table
    _assert_matches_transformers(model, decoder, 8, seed=6)


def test_generation_stops_after_an_end_of_sequence_token():
    model = _packed("llama")
    ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(4))
    decoder = native_decoder(model)
    with torch.inference_mode():
        free = decoder.generate(ids, 6)
        stop = int(free[0, 5])  # the second new token
        assert decoder.generate(ids, 6, eos_token_id=stop).tolist() == free[:, :6].tolist()
        assert torch.equal(decoder.generate(ids, 6, eos_token_id=[stop], min_new_tokens=6), free)


def test_models_it_does_not_run_are_named_and_left_to_transformers():
    model = _packed("llama")
    attach(model, LoRAConfig(rank=2))
    assert "adapters" in native_reason(model) and native_decoder(model) is None
    hooked = _packed("llama")
    hooked.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert "forward hooks" in native_reason(hooked)
    assert "model type 'gemma'" in native_reason(tiny_model("gemma"))
    assert "model type 'qwen3'" in native_reason(tiny_model("qwen3"))  # q/k norms: not LLaMA's block
    on_meta = tiny_model("llama").to("meta")
    assert "the model is on meta" in native_reason(on_meta)
    windowed = _packed("mistral")
    windowed.config.sliding_window = 8
    assert "exceed the sliding window of 8" in native_reason(windowed, 9) and native_reason(windowed, 8) is None


def test_generate_cli_runs_native_where_it_applies_and_says_which_engine_ran(ckpt):
    args = ("generate", ckpt, "--prompt", "the game was", "--max-new-tokens", "4", "--raw", "--json")
    native = one_json_object(invoke(*args))
    plain = one_json_object(invoke(*args, "--engine", "transformers"))
    assert native["engine"] == "native" and plain["engine"] == "transformers"
    assert native["text"] == plain["text"] and native["new_tokens"] == plain["new_tokens"]
    assert "--engine must be one of auto, native, transformers" in one_error_line(invoke(*args, "--engine", "x"))
    line = one_error_line(invoke(*args, "--engine", "native", "--kv-cache", "int8"))
    assert "keeps a float KV cache" in line


@needs_int8
@pytest.mark.parametrize("arch,bits,group_size", [("llama", 4, 32), ("llama", 2, 64), ("qwen2", 4, 32)])
def test_a_batch_decodes_as_transformers_and_as_each_sequence_alone(arch, bits, group_size):
    """Four different prompts of one length in one native batch: the tokens transformers' batched ``generate``
    picks (the same small-batch int8 kernel under ``auto``), and at every step each row's logits those of its
    sequence decoded alone (the one-row int8 GEMV: the same rounding of each activation group, other sums) within
    1e-5 of the row's largest, from the same prompt caches — rows do not leak into each other."""
    model = _packed(arch, bits, group_size)
    ids = torch.randint(0, 256, (4, 6), generator=torch.Generator().manual_seed(7))
    with lowbit.kernels.force("auto"), torch.inference_mode():
        assert native_reason(model, 22, batch=4) is None
        decoder = native_decoder(model, 22, batch=4)
        reference = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
        out = decoder.generate(ids, 16)
        prompts = [model(out[r:r + 1, :6], use_cache=True).past_key_values for r in range(4)]  # as alone below
        decoder._decoder.reset(22, 4)
        for i in range(len(model.model.layers)):
            keys, values = zip(*(_layer_cache(p, i) for p in prompts), strict=True)
            decoder._decoder.set_cache(i, torch.cat(keys), torch.cat(values))
        batch = torch.stack([decoder._head(decoder._decoder.hidden(decoder._rows(out[:, p]), p))
                             for p in range(6, 22)], dim=1)
        alone = torch.stack([_step_logits(model, decoder, out[r:r + 1], 6) for r in range(4)])
    assert torch.equal(out, reference)
    assert len(set(map(tuple, out[:, 6:].tolist()))) > 1  # the rows differ: a real batch, not four copies
    assert ((batch - alone).abs() / alone.abs().amax(dim=-1, keepdim=True)).max() < 1e-5


@needs_int8
def test_a_batch_pads_sequences_that_ended_and_stops_when_all_have():
    """A sequence that emits the end-of-sequence id gets ``pad_token_id`` after it, as in transformers'
    ``generate``; the batch ends when every sequence has ended."""
    model = _packed("llama")
    ids = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(8))
    with lowbit.kernels.force("auto"), torch.inference_mode():
        decoder = native_decoder(model, 17, batch=3)
        free = decoder.generate(ids, 12)
        stop = int(free[0, 7])  # sequence 0's third new token
        out = decoder.generate(ids, 12, eos_token_id=stop, pad_token_id=0)
        reference = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=stop, pad_token_id=0)
        every = decoder.generate(ids, 12, eos_token_id=[int(t) for t in free[:, 5]], pad_token_id=0)
    assert torch.equal(out, reference) and out[0, 8:].eq(0).all()
    assert every.shape == (3, 6)  # each sequence's first new token ends it: one step in all


@needs_int8
def test_batches_the_native_step_has_no_kernel_for_are_named():
    mixed = tiny_model("llama")
    lowbit.quantize(mixed, "lowra-b2.0")
    three = _packed("llama", 3, 32)
    with lowbit.kernels.force("auto"):
        for model in (mixed, three):
            assert native_reason(model, batch=1) is None
            assert "no several-row kernel" in native_reason(model, batch=2)
            assert native_decoder(model, batch=2) is None
        assert "a batch of 17" in native_reason(_packed("llama"), batch=17)
        decoder = native_decoder(three)
        with pytest.raises(RuntimeError, match="no several-row kernel"):
            decoder._decoder.reset(8, 2)


@needs_int8
def test_decode_speed_runs_a_batch_through_the_native_step_where_it_applies():
    from conftest import ByteTokenizer

    from lowbit.eval.speed import decode_speed

    model = _packed("llama")
    with lowbit.kernels.force("auto"):
        speed = decode_speed(model, ByteTokenizer(), new_tokens=5, warmup_tokens=2, batch=4, native=True)
        assert speed.engine == "native" and speed.batch == 4 and "native-step:4" in speed.kernel
        three = decode_speed(_packed("llama", 3, 32), ByteTokenizer(), new_tokens=5, warmup_tokens=2, batch=4,
                             native=True)
        assert three.engine == "transformers"


@needs_int8
def test_a_batch_over_a_packed_table_and_head_decodes_as_transformers():
    """``+emb8``: a batch's rows are looked up by the packed table and its logits come from the packed head."""
    model = tiny_model("llama", tie_word_embeddings=True)
    lowbit.quantize(model, "rtn-w4g32+emb8")
    ids = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(9))
    with lowbit.kernels.force("auto"), torch.inference_mode():
        batch = native_decoder(model, 13, batch=3).generate(ids, 8)
        assert torch.equal(batch, model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0))


def _left_padded_prompts(lengths: list[int], seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Random prompts of ``lengths`` (ids 1..255), and their batch left-padded with 0 and its attention mask."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, 256, (n,), generator=gen) for n in lengths]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, ids.shape[1] - row.numel():], mask[r, ids.shape[1] - row.numel():] = row, 1
    return rows, ids, mask


@needs_int8
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_left_padded_batch_decodes_as_transformers_and_as_each_prompt_alone(arch):
    """Prompts of 2, 5 and 3 tokens, left-padded with an attention mask: the tokens transformers' batched
    ``generate`` picks on the same batch, and at every step each row's logits those of its prompt decoded alone
    without padding within 1e-5 of the row's largest — positions count from each prompt's first token and the
    padding is never attended to. (The padded prompt pass is 15 rows, so it runs the same per-row int8 kernel as
    each prompt alone; over 16 rows it runs bf16 tiles, another rounding.)"""
    model = _packed(arch)
    rows, ids, mask = _left_padded_prompts([2, 5, 3], seed=11)
    with lowbit.kernels.force("auto"), torch.inference_mode():
        decoder = native_decoder(model, 17, batch=3)
        out = decoder.generate(ids, 12, attention_mask=mask)
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                   pad_token_id=0)
        batch = torch.stack([decoder._head(decoder._decoder.hidden(decoder._rows(out[:, p]), p))
                             for p in range(5, 17)], dim=1)  # from generate's own caches: the step leaves them
        alone = torch.stack([_step_logits(model, native_decoder(model, 17),
                                          torch.cat([row, out[r, 5:]]).unsqueeze(0), row.numel())
                             for r, row in enumerate(rows)])
    assert torch.equal(out, reference)
    assert ((batch - alone).abs() / alone.abs().amax(dim=-1, keepdim=True)).max() < 1e-5


def test_an_attention_mask_the_native_step_cannot_take_is_refused():
    model = _packed("llama")
    decoder = native_decoder(model, 16)
    _, ids, mask = _left_padded_prompts([2, 5], seed=12)
    for bad, match in ((mask.flip(-1), "left padding only"), (mask[:, 1:], "the shape of ids"),
                       (mask * 0, "at least one 1"), (mask * 2, "0s and 1s")):
        with pytest.raises(ValueError, match=match):
            decoder.generate(ids, 4, attention_mask=bad)


@needs_int8
def test_generate_cli_decodes_several_prompts_as_one_batch(ckpt):
    """``--prompt`` repeated: one native batch whose texts are each prompt's own generation (alone, and in
    transformers' padded batch); the JSON holds lists in the prompts' order."""
    prompts = ["the game was", "in the", "it was released"]  # 3 x 3 padded prompt rows: the int8 kernel, as alone
    args = ("--max-new-tokens", "4", "--raw", "--json")
    with lowbit.kernels.force("auto"):  # (the tests' default, exact, has no batch kernel)
        batch = one_json_object(invoke("generate", ckpt, *[a for p in prompts for a in ("--prompt", p)], *args))
        plain = one_json_object(invoke("generate", ckpt, *[a for p in prompts for a in ("--prompt", p)], *args,
                                       "--engine", "transformers"))
        alone = [one_json_object(invoke("generate", ckpt, "--prompt", p, *args)) for p in prompts]
    assert batch["engine"] == "native" and plain["engine"] == "transformers" and batch["batch"] == 3
    assert batch["prompt"] == prompts and batch["text"] == plain["text"] == [a["text"] for a in alone]
    assert batch["new_tokens"] == plain["new_tokens"] == sum(a["new_tokens"] for a in alone)
    assert all(a["batch"] == 1 and isinstance(a["text"], str) for a in alone)
