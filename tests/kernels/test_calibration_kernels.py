"""The C++ kernels of calibration: the bf16 Gram update of GPTQ's Hessian (csrc/gram.cpp, through
lowbit.hessian.LayerStats) and the integer grids' "mse" scale search (csrc/scales.cpp, lowbit.kernels.scales)."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.formats import fit_searched as reference_search
from lowbit.formats import get_format
from lowbit.hessian import LayerStats
from lowbit.kernels.scales import fit_searched

ext = lowbit.kernels.cpu.extension()
needs_ext = pytest.mark.skipif(ext is None, reason="the C++ extension did not build here")


def _hessian_of(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return 2 * x.T @ x / x.shape[0]


@needs_ext
@pytest.mark.parametrize("width", [1, 37, 64, 300])
@pytest.mark.parametrize("tokens", [1, 31, 64])
def test_under_bf16_autocast_the_hessian_is_that_of_the_bf16_rounded_inputs(width, tokens):
    """What a Linear under bf16 autocast multiplies is bf16(x): the statistics are 2/N Σ bf16(x)ᵀbf16(x), summed in
    fp32 (csrc/gram.cpp where the CPU has AVX512-BF16, the fp32 panels otherwise), folded across batches and
    symmetric; widths off the kernel's 32-column panels and odd token counts included."""
    gen = torch.Generator().manual_seed(width * 100 + tokens)
    batches = [torch.randn(1, tokens, width, generator=gen) * 3 for _ in range(3)]
    stats = LayerStats(torch.zeros(width, width))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x in batches:
            stats.add(x)
    expected = _hessian_of(torch.cat(batches, 1).bfloat16())
    assert stats.tokens == 3 * tokens
    assert torch.allclose(stats.hessian.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(stats.hessian, stats.hessian.T)


@needs_ext
def test_bf16_inputs_outside_autocast_take_the_same_statistics_and_fp32_inputs_stay_fp32():
    x = torch.randn(50, 70, generator=torch.Generator().manual_seed(1))
    rounded, plain, low = (LayerStats(torch.zeros(70, 70)) for _ in range(3))
    rounded.add(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low.add(x)
    plain.add(x)
    assert torch.equal(rounded.hessian, low.hessian)
    assert torch.allclose(plain.hessian.double(), _hessian_of(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain.hessian, rounded.hessian, rtol=1e-6, atol=0)  # fp32 inputs are not rounded


@needs_ext
@pytest.mark.parametrize(("bits", "symmetric"), [(1, False), (2, False), (3, True), (4, False), (8, False)])
@pytest.mark.parametrize(("groups", "group_size", "weighted"), [(4, 128, True), (3, 37, False), (1, 1, True)])
def test_the_compiled_mse_search_chooses_the_scales_the_python_search_chooses(bits, symmetric, groups, group_size,
                                                                              weighted):
    """The same clipped fits, codes and errors in the same fp32 operations; only each group's error sum runs in
    another order, so a choice may differ only on an fp32 tie: at most 1 group in 1,000, never with a larger
    error."""
    gen = torch.Generator().manual_seed(bits * 10 + group_size)
    w = torch.randn(200, groups, group_size, generator=gen) * torch.rand(200, groups, 1, generator=gen)
    w[0] = 0.0  # an all-zero group row: the unit scale
    weight = torch.rand(groups, group_size, generator=gen) if weighted else None
    fmt = get_format("int", bits, symmetric)
    s, z = fit_searched(fmt, w, "mse", weight)
    s_ref, z_ref = reference_search(fmt, w, "mse", weight)
    same = s == s_ref if z is None else (s == s_ref) & (z == z_ref)
    assert (z is None) == (z_ref is None) == symmetric
    assert same.float().mean() >= 0.999

    def error(scale, zero):
        zz = None if zero is None else zero.unsqueeze(-1)
        d = fmt.decode(fmt.encode(w, scale.unsqueeze(-1), zz), scale.unsqueeze(-1), zz) - w
        return (d * d if weight is None else d * d * weight).sum(-1)

    assert torch.allclose(error(s, z), error(s_ref, z_ref), rtol=1e-6, atol=0)


def test_other_searches_and_formats_go_to_the_python_search():
    w = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(3))
    for fmt, search in ((get_format("nf", 4), "mse"), (get_format("int", 4), "minmax")):
        s, z = fit_searched(fmt, w, search)
        s_ref, z_ref = reference_search(fmt, w, search)
        assert torch.equal(s, s_ref) and (z is None) == (z_ref is None)
