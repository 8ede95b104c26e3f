"""Streaming calibration: windows, block-by-block statistics, shared Hessians, quantized outputs fed forward."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, ByteTokenizer, tiny_model

from lowbit import LowbitError
from lowbit.calibration import (
    Calibration,
    _collect_stats,
    block_inputs,
    calibration_windows,
    for_each_block,
    generated_windows,
    read_calibration_text,
    run_blockwise,
)
from lowbit.kernels.cpu import extension as lowbit_ext
from lowbit.models import decoder_blocks, find_linears
from lowbit.sensitivity import input_power, output_sensitivity
from lowbit.streamed import offload_hidden


def _captured_inputs(model, windows):
    """Every Linear's input over all windows, captured from a plain float forward."""
    seen = {}
    def hook(name):
        return lambda mod, args, out: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))

    hooks = [m.register_forward_hook(hook(n)) for n, m in find_linears(model, ("@decoder",), ())]
    with torch.no_grad():
        for row in windows:
            model(row.unsqueeze(0))
    for h in hooks:
        h.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}


def test_block_statistics_equal_the_hessian_of_each_layers_inputs_and_readers_of_one_input_share():
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (3, 24))
    inputs = _captured_inputs(model, windows)
    hidden, kwargs = block_inputs(model, windows)
    names = [n for n in inputs if n.startswith("model.layers.0.")]
    stats = _collect_stats(model.model.layers[0], hidden, kwargs, {n: model.get_submodule(n) for n in names})
    for n in names:
        x = inputs[n]
        torch.testing.assert_close(stats[n].hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
        assert stats[n].tokens == 3 * 24
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert stats[attn + "q_proj"] is stats[attn + "k_proj"] is stats[attn + "v_proj"]
    assert stats[mlp + "gate_proj"] is stats[mlp + "up_proj"]
    assert stats[attn + "o_proj"] is not stats[attn + "q_proj"]
    assert stats[mlp + "gate_proj"] is not stats[attn + "q_proj"]  # same shape, different tensor
    assert len({id(s) for s in stats.values()}) == 4


def test_input_power_is_the_hessian_diagonal_of_the_float_model():
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (2, 16))
    inputs = _captured_inputs(model, windows)
    power = input_power(model, windows, list(inputs))
    for n, x in inputs.items():
        torch.testing.assert_close(power[n], 2 * (x * x).mean(0), rtol=1e-5, atol=1e-6)


def test_blockwise_feeds_the_quantized_block_outputs_to_the_next_block():
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (2, 16))
    names = [n for n, _ in find_linears(model, ("@decoder",), ())]
    seen_blocks = []

    def zero_block(stats):
        # "quantize" by zeroing this block's Linears; the next block's statistics must see the change
        block = next(iter(stats)).split(".")[2]
        seen_blocks.append((block, {n: s.hessian.clone() for n, s in stats.items()}))
        for n in stats:
            model.get_submodule(n).weight.data.zero_()

    reference = tiny_model("llama")
    for m in reference.model.layers[0].modules():  # block 1's inputs if block 0's Linears had been zeroed
        if isinstance(m, torch.nn.Linear):
            m.weight.data.zero_()
    expected = _captured_inputs(reference, windows)
    run_blockwise(model, windows, names, zero_block)
    assert [b for b, _ in seen_blocks] == ["0", "1"]
    x = expected["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(seen_blocks[1][1]["model.layers.1.self_attn.q_proj"], 2 * x.T @ x / x.shape[0],
                               rtol=1e-4, atol=1e-5)


def test_windows_are_seeded_and_short_text_is_refused():
    tok = ByteTokenizer()
    text = "abcdefghij" * 50
    a = calibration_windows(tok, n=4, seq_len=32, seed=1, text=text)
    assert a.shape == (4, 32) and torch.equal(a, calibration_windows(tok, n=4, seq_len=32, seed=1, text=text))
    assert not torch.equal(a, calibration_windows(tok, n=4, seq_len=32, seed=2, text=text))
    with pytest.raises(LowbitError, match="has 20 tokens, fewer than one window of 32"):
        calibration_windows(tok, n=4, seq_len=32, text="x" * 20)


def test_calibration_files_text_and_jsonl(tmp_path):
    plain = tmp_path / "c.txt"
    plain.write_text("hello world\n")
    assert read_calibration_text(plain) == "hello world\n"
    rows = tmp_path / "c.jsonl"
    rows.write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"prompt": "q?", "response": "r."}) + "\n")
    assert read_calibration_text(rows) == "a b q? r."
    rows.write_text("{not json\n")
    with pytest.raises(LowbitError, match=r"c.jsonl:1 is not valid JSON"):
        read_calibration_text(rows)
    with pytest.raises(LowbitError, match="does not exist"):
        read_calibration_text(tmp_path / "nope.txt")


def test_output_sensitivity_is_the_mean_squared_gradient_at_each_layer_output():
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (2, 32))
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    sens = output_sensitivity(model, windows, names, chunk=16)  # four 16-token pieces
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # no weight gradients, flags kept
    for name in names:
        ref = torch.zeros(model.get_submodule(name).out_features)
        captured = []
        handle = model.get_submodule(name).register_forward_hook(lambda m, a, o, c=captured: c.append(o))
        for piece in windows.reshape(-1, 16):
            loss = model(piece.unsqueeze(0), labels=piece.unsqueeze(0), use_cache=False).loss
            (g,) = torch.autograd.grad(loss, captured[-1])
            ref += (g**2).reshape(-1, g.shape[-1]).sum(0)
        handle.remove()
        torch.testing.assert_close(sens[name], ref / 64, rtol=1e-4, atol=0)


def test_self_generated_windows_are_sampled_from_the_model_seeded_without_repeats():
    model = tiny_model("llama")
    tok = ByteTokenizer()
    state = torch.random.get_rng_state()
    a = generated_windows(model, tok, n=3, seq_len=40, seed=1, tokens_per_sequence=15, batch=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    b = generated_windows(model, tok, n=3, seq_len=40, seed=1, tokens_per_sequence=15, batch=4)
    c = generated_windows(model, tok, n=3, seq_len=40, seed=2, tokens_per_sequence=15, batch=4)
    assert a.shape == (3, 40) and torch.equal(a, b) and not torch.equal(a, c)
    flat = a.reshape(-1)
    assert (flat[::16] == tok.eos_token_id).all()  # sequences of 1 start token + 15 sampled, laid end to end
    assert len(set(flat.tolist())) > 20  # sampled at temperature 1, not a greedy loop


def test_self_generated_calibration_quantizes_with_gptq_and_refuses_text_beside_it():
    import lowbit

    tok = ByteTokenizer()
    model = tiny_model("llama")
    calib = Calibration(tokenizer=tok, n=4, seq_len=64, self_generated=True)
    with pytest.raises(LowbitError, match="needs the float model"):
        calib.get_windows()
    q = lowbit.quantize(model, "gptq-w4g128", calib=calib)
    assert calib.windows.shape == (4, 64)
    assert any(type(m).__name__ == "QLinear" for m in q.modules())
    with pytest.raises(LowbitError, match="not both"):
        Calibration(tokenizer=tok, text="some text", self_generated=True)


def test_offloaded_activations_stay_in_their_file(tmp_path):
    """The streamed path's activations live in a memory-mapped file; the block loop updates them in place, so
    they stay file-backed, and the result equals the in-memory loop's."""
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (3, 16))
    plain, kwargs = block_inputs(model, windows)
    hidden, _ = block_inputs(model, windows)
    mapped = offload_hidden(hidden, tmp_path / "acts")
    assert (tmp_path / "acts").stat().st_size == 3 * 16 * 64 * 4 and all(h is None for h in hidden)
    pointers = [h.data_ptr() for h in mapped]
    for_each_block(model, (plain, kwargs), lambda prefix, collect: None)
    for_each_block(model, (mapped, kwargs), lambda prefix, collect: None)
    assert [h.data_ptr() for h in mapped] == pointers
    assert all(torch.equal(a, b) for a, b in zip(plain, mapped, strict=True))


def test_layer_stats_fold_the_upper_panels_into_the_full_hessian_when_read():
    from lowbit.hessian import PANEL, LayerStats

    width = PANEL + 44  # two panels, the second one short
    batches = [torch.randn(2, 30, width) for _ in range(3)]
    stats = LayerStats(torch.zeros(width, width))
    for i, x in enumerate(batches):
        stats.add(x)
        seen = torch.cat([b.reshape(-1, width) for b in batches[: i + 1]]).double()
        expected = 2 * seen.T @ seen / seen.shape[0]
        assert stats.tokens == seen.shape[0]
        assert torch.allclose(stats.hessian.double(), expected, atol=1e-4)  # read after every batch: folded each time
        assert torch.equal(stats.hessian, stats.hessian.T)
    stats.hessian = torch.eye(width)  # a replaced Hessian (MoE shrinkage) drops nothing pending
    assert torch.equal(stats.hessian, torch.eye(width))


@pytest.mark.parametrize("choice", ["auto", "exact"])
def test_calibration_passes_attend_through_lowbits_kernel_under_auto_only_and_skip_the_last_blocks_outputs(choice):
    """Under ``LOWBIT_KERNEL=auto`` the passes run lowbit's attention (the Linears still forced exact); under
    ``exact`` torch's SDPA. Either way the model is back on ``sdpa`` afterwards, and the last block runs once per
    window (its outputs would feed nothing)."""
    from lowbit.kernels import calls, force

    if lowbit_ext() is None or not lowbit_ext().causal_attention_applies(16):
        pytest.skip("the C++ extension did not build here, or no AVX-512 or AVX2")
    model = tiny_model("llama")
    _, blocks = decoder_blocks(model)
    runs = [0] * len(blocks)
    handles = [b.register_forward_hook(lambda m, a, o, i=i: runs.__setitem__(i, runs[i] + 1))
               for i, b in enumerate(blocks)]
    windows = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    before = calls["cpu-attention"]
    with force(choice):
        for_each_block(model, block_inputs(model, windows), lambda prefix, collect: collect([]), precision="auto")
    for h in handles:
        h.remove()
    assert runs == [6] * (len(blocks) - 1) + [3]  # collect and next inputs; the last block collects only
    assert calls["cpu-attention"] - before == (3 * (2 * len(blocks) - 1) if choice == "auto" else 0)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_familys_calibration_runs_under_auto_kernels(family):
    """Under ``LOWBIT_KERNEL=auto`` GPTQ's bf16 passes attend through lowbit's kernel wherever a call fits it (and
    through SDPA where it does not: sliding windows, soft-capping, sinks): every family quantizes, lands within
    the coverage matrix's GPTQ bound, and is back on its own attention implementation afterwards."""
    from test_composition import SMALL, STEPS, TEXT
    from tolerances import FAMILY_STEP_REL_ERROR

    import lowbit
    from lowbit.kernels import force

    model = tiny_model(family, **{**SMALL, "hidden_size": 64, "num_attention_heads": 2})  # heads of 32: the kernel's
    before = model.config._attn_implementation
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits.float()
    calib = lowbit.Calibration(tokenizer=ByteTokenizer(), n=2, seq_len=48, text=TEXT)
    with force("auto"):
        lowbit.quantize(model, lowbit.Recipe([STEPS["gptq"]], name="gptq"), calib=calib)
        with torch.no_grad():
            out = model(ids).logits.float()
    assert float((out - reference).norm() / reference.norm()) <= FAMILY_STEP_REL_ERROR["gptq"]
    assert model.config._attn_implementation in (before, "lowbit_cpu")  # apply_recipe may switch a packed model


def test_a_pass_whose_outputs_nothing_reads_stops_once_every_listed_linear_has_read_its_input():
    """Without ``outputs`` each window's pass ends at the last listed Linear's input: ``down_proj`` never runs for a
    whole block, the MLP never runs when only attention layers are listed, and the statistics equal those of the
    full pass; with ``outputs`` the block runs to its end."""
    from torch import nn


    model = tiny_model("llama")
    windows = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))
    hidden, kwargs = block_inputs(model, windows)
    block = decoder_blocks(model)[1][0]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    ran = {"down": 0, "up": 0}
    handles = [block.mlp.down_proj.register_forward_hook(lambda *a: ran.__setitem__("down", ran["down"] + 1)),
               block.mlp.up_proj.register_forward_hook(lambda *a: ran.__setitem__("up", ran["up"] + 1))]
    with torch.inference_mode():
        outputs: list[torch.Tensor] = []
        full = _collect_stats(block, hidden, kwargs, linears, outputs)
        assert len(outputs) == 3 and ran == {"down": 3, "up": 3}
        early = _collect_stats(block, hidden, kwargs, linears)
        assert ran == {"down": 3, "up": 6}  # down_proj read its input, then the pass stopped
        attention = {n: m for n, m in linears.items() if n.startswith("self_attn.")}
        only = _collect_stats(block, hidden, kwargs, attention)
        assert ran == {"down": 3, "up": 6}
        for name in linears:
            assert early[name].tokens == full[name].tokens == 72
            assert torch.equal(early[name].hessian, full[name].hessian)
        for name in attention:
            assert torch.equal(only[name].hessian, full[name].hessian)
    for h in handles:
        h.remove()
