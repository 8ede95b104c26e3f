"""LowRA: weighted Lloyd–Max codebooks, exact precision assignment, mixed-precision storage, end to end."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit import LowbitError, QLinear
from lowbit.formats.codebook import normal_float_levels
from lowbit.qmixed import MixedCodebookWeight, block_absmax
from lowbit.quantizers.lowra import LowRAConfig, encode_layer, fit_layer, lloyd_fit, nearest, normalise
from lowbit.quantizers.precision import assign_widths
from lowbit.state import state_of
from lowbit.summary import bits_summary


def _weighted_error(u, w, levels):
    """Brute-force nearest level (argmin over levels) and its weighted squared error per row."""
    idx = (u.unsqueeze(-1) - levels.unsqueeze(1)).abs().argmin(-1)
    return (w * (u - torch.gather(levels, 1, idx)) ** 2).sum(1)


# ---- Lloyd–Max --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_fit_beats_its_nf_start_and_reports_its_own_error(bits):
    gen = torch.Generator().manual_seed(bits)
    u = torch.randn(8, 512, generator=gen).clamp(-3, 3) / 3
    w = torch.rand(8, 512, generator=gen) + 0.1
    levels, err = lloyd_fit(u, w, bits)
    assert levels.shape == (8, 2**bits)
    assert torch.all(levels[:, 1:] >= levels[:, :-1])  # sorted
    assert torch.equal(levels, levels.half().float())  # stored as fp16 exactly
    torch.testing.assert_close(err, _weighted_error(u, w, levels), rtol=1e-5, atol=1e-6)
    if bits > 1:
        start = normal_float_levels(bits).expand(8, -1)
        assert torch.all(err <= _weighted_error(u, w, start) + 1e-6)


def test_weighted_fit_minimises_the_weighted_error():
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(4, 1000, generator=gen) * 2 - 1
    w = torch.where(u > 0, 100.0, 1.0)  # positive values matter 100x more
    weighted, e_w = lloyd_fit(u, w, 2)
    plain, _ = lloyd_fit(u, torch.ones_like(u), 2)
    assert torch.all(e_w < _weighted_error(u, w, plain))
    assert torch.all((weighted > 0).sum(1) >= 3)  # most levels spent where the weight is


def test_normalisation_keeps_values_in_unit_range_and_weights_are_squared_scales():
    w = torch.randn(6, 200) * torch.logspace(-2, 1, 200)
    absmax, u, omega = normalise(w, 64)
    assert absmax.shape == (6, 4) and u.abs().max() <= 1
    torch.testing.assert_close(u * omega.sqrt(), w)


# ---- precision assignment ---------------------------------------------------------------------------------

def _brute_force(E, n, widths, budget):
    best, arg = float("inf"), None
    for combo in itertools.product(range(len(widths)), repeat=E.shape[0]):
        bits = sum(widths[k] * n[g] for g, k in enumerate(combo))
        if bits <= budget * n.sum() + 1e-9:
            err = sum(E[g, k] for g, k in enumerate(combo))
            if err < best:
                best, arg = err, combo
    return best, arg


def _convex_errors(G, widths, gen):
    # error falls with width, by ratios that differ per group (as real codebook errors do)
    base = torch.rand(G, 1, generator=gen) * 10 + 0.1
    decay = torch.rand(G, len(widths), generator=gen).cumsum(1) * 1.5
    return (base * torch.exp(-decay)).double()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [1.15, 1.5, 2.0, 2.25, 3.0])
def test_assignment_equals_the_brute_force_optimum(seed, budget):
    gen = torch.Generator().manual_seed(seed)
    widths = (1, 2, 3, 4)
    E = _convex_errors(6, widths, gen)
    n = torch.randint(1, 5, (6,), generator=gen) * 64
    choice = assign_widths(E, n, widths, budget)
    best, _ = _brute_force(E.numpy(), n.numpy(), widths, budget)
    got = float(E[torch.arange(6), choice].sum())
    used = float((torch.tensor(widths)[choice] * n).sum())
    assert used <= budget * float(n.sum()) + 1e-6
    assert got == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_lagrangian_path_is_feasible_fills_the_budget_and_is_near_optimal(seed):
    gen = torch.Generator().manual_seed(seed)
    widths = (1, 2, 3, 4)
    E = _convex_errors(400, widths, gen)
    n = torch.full((400,), 64)
    exact = assign_widths(E, n, widths, 1.5)
    approx = assign_widths(E, n, widths, 1.5, exact_limit=0)  # forces Lagrangian + repair
    used = (torch.tensor(widths)[approx] * n).sum() / n.sum()
    assert 1.5 - 0.01 <= used <= 1.5
    e_exact, e_approx = E[torch.arange(400), exact].sum(), E[torch.arange(400), approx].sum()
    assert e_exact <= e_approx + 1e-9
    assert e_approx <= 1.01 * e_exact  # the Lagrangian optimum differs from the exact one by a group or two


def test_unreachable_budget_is_refused():
    with pytest.raises(LowbitError, match="unreachable.*narrowest width is 1"):
        LowRAConfig(budget=0.5)
    with pytest.raises(LowbitError, match="unreachable"):
        assign_widths(torch.ones(3, 2), torch.ones(3), (2, 4), 1.5)


# ---- mixed-precision storage ------------------------------------------------------------------------------

def test_mixed_weight_dequantizes_in_the_original_row_order():
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, bs = 10, 100, 32
    widths = torch.tensor([4, 1, 2, 4, 3, 1, 1, 2, 4, 3])
    books = {b: torch.randn(out_f, 2**b, generator=gen).sort(1).values.half().float() for b in (1, 2, 3, 4)}
    codes = torch.stack([torch.randint(0, 2 ** int(b), (in_f,), generator=gen) for b in widths]).to(torch.uint8)
    absmax = block_absmax(torch.randn(out_f, in_f, generator=gen), bs)
    qw = MixedCodebookWeight.from_rows(codes, widths, books, absmax, bs)
    a = absmax.repeat_interleave(bs, dim=1)[:, :in_f]
    reference = torch.stack([books[int(widths[r])][r][codes[r].long()] for r in range(out_f)]) * a
    assert torch.equal(qw.dequantize(), reference)
    assert qw.rows == {1: 3, 2: 2, 3: 2, 4: 3}
    assert list(widths[qw.perm.long()]) == sorted(widths.tolist())  # stored rows grouped by width
    assert qw.code_bits == int(widths.sum()) * in_f
    rebuilt = MixedCodebookWeight.from_tensors(qw.meta(), qw.tensors())
    assert torch.equal(rebuilt.dequantize(), reference)


@pytest.fixture(scope="module")
def lowra_tiny():
    model = tiny_model("llama")
    ref = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    start = time.perf_counter()
    lowbit.quantize(model, "lowra-b2.0")
    return model, ref, time.perf_counter() - start


def test_tiny_llama_quantizes_end_to_end_quickly_within_budget(lowra_tiny):
    model, ref, seconds = lowra_tiny
    assert seconds < 10
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    assert set(layers) == {n for n in ref if n != "lm_head"}
    summary = bits_summary(model)
    assert 2.0 - 0.01 <= summary["code_bits"] <= 2.0
    assert summary["bits_per_weight"] > summary["code_bits"]  # absmax, codebooks and perm are counted
    widths = set()
    for m in layers.values():
        widths |= set(m.qweight.rows)
    assert len(widths) > 1  # really mixed
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (1, 16))).logits).all()


def test_every_layer_dequantizes_to_the_unpermuted_reference(lowra_tiny):
    """Each original row rebuilt on its own: its stored block scales (at most the block absmax: the scale search
    only clips), nearest level of its own codebook, in the original row order."""
    model, ref, _ = lowra_tiny
    for name, m in model.named_modules():
        if not isinstance(m, QLinear):
            continue
        qw = m.qweight
        w = ref[name]
        absmax, _, _ = normalise(w, qw.block_size)
        got = qw.dequantize()
        stored = torch.empty(w.shape[0], dtype=torch.long)
        stored[qw.perm.long()] = torch.arange(w.shape[0])
        offsets, start = {}, 0
        for b, rows in qw.rows.items():
            offsets[b] = start
            start += rows
        for r in range(w.shape[0]):
            i = int(stored[r])
            b = int(qw.row_bits[r])
            assert offsets[b] <= i < offsets[b] + qw.rows[b]  # row r sits in its width's segment
            book = qw.codebooks[b][i - offsets[b]].float()
            scale = qw.absmax[i].float()
            assert (scale <= absmax[r]).all()
            a = scale.repeat_interleave(qw.block_size)[: w.shape[1]]
            code = (w[r].unsqueeze(-1) / a.unsqueeze(-1) - book).abs().argmin(-1)
            torch.testing.assert_close(got[r], book[code] * a, rtol=0, atol=1e-6 * float(w.abs().max()))


def test_lowra_round_trips_through_save_and_load(lowra_tiny, tmp_path):
    model, _, _ = lowra_tiny
    path = lowbit.save(model, tmp_path / "lowra")
    loaded, _ = lowbit.load(path)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert state_of(loaded).manifest["summary"]["code_bits"] == pytest.approx(bits_summary(model)["code_bits"])
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids).logits)


def test_more_budget_means_less_weight_error():
    errors = []
    for budget in (1.15, 2.0, 3.0):
        model = tiny_model("llama")
        ref = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        lowbit.quantize(model, f"lowra-b{budget}")
        errors.append(sum(float(((m.weight - ref[n]) ** 2).sum())
                          for n, m in model.named_modules() if isinstance(m, QLinear)))
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("recipe", ["lowra-b2.0", "rtn-w4g64"])
def test_nan_or_inf_weights_are_refused_before_any_layer_changes(recipe):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(LowbitError, match=r"model.layers.1.mlp.up_proj.*NaN/Inf"):
        lowbit.quantize(model, recipe)
    assert not any(isinstance(m, QLinear) for m in model.modules())


def test_codes_use_the_nearest_stored_level():
    u = torch.tensor([[-0.9, -0.1, 0.05, 0.6]])
    levels = torch.tensor([[-0.5, 0.0, 0.5, 1.0]])
    assert nearest(levels, u).tolist() == [[0, 1, 1, 2]]


@pytest.mark.parametrize("weighted", [False, True])
def test_scale_search_never_loses_to_absmax_and_reports_the_error_it_encodes(weighted):
    """The search includes p = 1 (absmax) and the refit only lowers the error, so every width's error is at most
    absmax's; the error reported for the assignment is the one the stored weight really has."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 200, generator=gen) * torch.rand(32, 1, generator=gen)
    w[3, 17] = 8.0  # an outlier: its block is where clipping pays
    col = torch.rand(200, generator=gen) if weighted else None
    plain = fit_layer(w, LowRAConfig(block_size=64, scale_search="none"), col)
    config = LowRAConfig(block_size=64, scale_search="mse")
    searched = fit_layer(w, config, col)
    assert (searched.errors <= plain.errors * (1 + 1e-4) + 1e-7).all()
    assert searched.errors.sum() < plain.errors.sum()
    choice = assign_widths(searched.errors, torch.full((32,), 200), config.widths, 2.0)
    qw = encode_layer(w, searched, choice, config.widths, 64)
    cw = torch.ones(200) if col is None else col
    encoded = (((w - qw.dequantize()) ** 2) * cw).sum(1)
    expected = searched.errors[torch.arange(32), choice]
    torch.testing.assert_close(encoded, expected, rtol=1e-3, atol=1e-6)
