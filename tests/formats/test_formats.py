"""Number formats: level tables vs published values, integer error bounds, idempotent encoding, errors."""

from __future__ import annotations

import pytest
import torch
from tolerances import NF_TABLE_ATOL, ROUNDING_SLACK

from lowbit.errors import LowbitError
from lowbit.formats import format_family_names, format_from_name, get_format
from lowbit.formats.base import as_storage_scale
from lowbit.formats.codebook import CodebookFormat

# methods.md §2.2, recomputed with SciPy to 6 d.p.; NF4 equals bitsandbytes' table.
NF4 = [-1.0, -0.696193, -0.525073, -0.394917, -0.284441, -0.184773, -0.09105, 0.0,
       0.07958, 0.16093, 0.246112, 0.337915, 0.44071, 0.562617, 0.722957, 1.0]
NF3 = [-1.0, -0.478629, -0.217142, 0.0, 0.16093, 0.337915, 0.562617, 1.0]
NF2 = [-1.0, 0.0, 0.337915, 1.0]
# methods.md §2.3: E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} with a sign bit, +-0 collapsed.
FP4_DISTINCT = [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]

ALL_NAMES = ([f"int{b}" for b in range(1, 9)] + [f"int{b}_sym" for b in range(2, 9)]
             + ["nf2", "nf3", "nf4", "fp4_e2m1", "fp8_e4m3", "iq4_nl"])


def _decode_levels(fmt) -> torch.Tensor:
    """Every code of ``fmt`` decoded with scale 1 (and zero 0), in code order."""
    codes = torch.arange(2**fmt.bits).to(torch.uint8)
    z = torch.zeros(()) if fmt.has_zero else None
    return fmt.decode(codes, torch.ones(()), z)


@pytest.mark.parametrize("bits,table", [(4, NF4), (3, NF3), (2, NF2)])
def test_nf_tables_match_published_values(bits, table):
    fmt = get_format("nf", bits)
    assert fmt.name == f"nf{bits}" and fmt.bits == bits and not fmt.has_zero
    levels = _decode_levels(fmt)
    assert levels.shape == (2**bits,)
    torch.testing.assert_close(levels, torch.tensor(table), atol=NF_TABLE_ATOL, rtol=0)
    assert levels[2 ** (bits - 1) - 1] == 0.0  # an exact zero
    assert levels.max() == 1.0 and levels.min() == -1.0


def test_fp4_e2m1_levels_and_code_order():
    fmt = get_format("fp4", 4)
    assert fmt.name == "fp4_e2m1"
    levels = _decode_levels(fmt)
    assert sorted(set(levels.tolist())) == FP4_DISTINCT
    # E2M1 bit order: bit 3 is the sign, bits 0-2 index the magnitudes.
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert levels[:8].tolist() == mags
    assert levels[8:].abs().tolist() == mags and torch.all(levels[9:] < 0)
    # Encoding never emits the -0 code.
    codes = fmt.encode(torch.tensor([0.0, -0.0, -0.1, 0.1]), torch.ones(()), None)
    assert codes.tolist() == [0, 0, 0, 0]


def test_fp8_e4m3_matches_torch_cast():
    fmt = get_format("fp8", 8)
    assert fmt.name == "fp8_e4m3" and fmt.max_level == 448.0
    g = torch.Generator().manual_seed(1)
    mag = 2.0 ** (torch.rand(4096, generator=g) * 19 - 10)  # 2^-10 .. 2^9, subnormals to the top binade
    sign = torch.where(torch.rand(4096, generator=g) < 0.5, -1.0, 1.0)
    u = (mag * sign).clamp(-448, 448)
    codes = fmt.encode(u, torch.ones(()), None)
    cast = u.to(torch.float8_e4m3fn)
    assert torch.equal(fmt.decode(codes, torch.ones(())), cast.float())
    nonzero = cast.float() != 0
    assert torch.equal(codes[nonzero], cast.view(torch.uint8)[nonzero])  # codes are the float8 bytes


def test_fp8_scaled_group_matches_torch_cast():
    fmt = get_format("fp8", 8)
    w = torch.randn(6, 64)
    s, z = fmt.fit(w)
    assert z is None
    s = s.unsqueeze(-1)
    expect = (w / s).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(fmt.decode(fmt.encode(w, s, None), s), expect)


@pytest.mark.parametrize("bits", range(1, 9))
def test_int_asymmetric_error_within_half_step(bits):
    fmt = get_format("int", bits)
    w = torch.randn(32, 64) * 3 + 0.5
    s, z = fmt.fit(w)
    assert torch.equal(s, as_storage_scale(s))  # scales are fp16 values
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 2**bits - 1
    s, z = s.unsqueeze(-1), z.unsqueeze(-1)
    codes = fmt.encode(w, s, z)
    assert codes.dtype == torch.uint8 and codes.max() <= 2**bits - 1
    w_hat = fmt.decode(codes, s, z)
    lo, hi = -z * s, (2**bits - 1 - z) * s  # the representable range of each group
    inside = (w >= lo) & (w <= hi)
    # Only the extremes fall outside: the integer zero point and fp16 scale shift the range by under one step.
    near_edge = (w <= w.amin(-1, keepdim=True) + s) | (w >= w.amax(-1, keepdim=True) - s)
    assert torch.all(inside | near_edge)
    if bits >= 3:  # at 1-2 bits one step spans most of the range
        assert inside.float().mean() > 0.95
    err = (w - w_hat).abs()
    assert torch.all(err[inside] <= (s / 2 * (1 + ROUNDING_SLACK)).expand_as(w)[inside])
    # Outside it (the fp16-rounded scale and integer zero clip the extremes) the error stays below one step.
    assert torch.all(err <= s * (1 + ROUNDING_SLACK))


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_symmetric_grid_and_error(bits):
    fmt = get_format("int", bits, symmetric=True)
    assert fmt.name == f"int{bits}_sym" and not fmt.has_zero
    assert _decode_levels(fmt).tolist() == list(range(-(2 ** (bits - 1)), 2 ** (bits - 1)))
    w = torch.randn(16, 64)
    s, z = fmt.fit(w)
    assert z is None
    s = s.unsqueeze(-1)
    torch.testing.assert_close(s, as_storage_scale(w.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)))
    w_hat = fmt.decode(fmt.encode(w, s, None), s, None)
    assert torch.all((w - w_hat).abs() <= s / 2 * (1 + ROUNDING_SLACK))


def test_constant_and_zero_groups_do_not_divide_by_zero():
    for name in ALL_NAMES:
        fmt = format_from_name(name)
        w = torch.stack([torch.zeros(16), torch.full((16,), 0.25)])
        s, z = fmt.fit(w)
        assert torch.all(torch.isfinite(s)) and torch.all(s > 0)
        s = s.unsqueeze(-1)
        z = None if z is None else z.unsqueeze(-1)
        w_hat = fmt.decode(fmt.encode(w, s, z), s, z)
        if name == "iq4_nl":  # no zero level: a zero group decodes to the smallest scale times level 1
            assert torch.all(w_hat[0].abs() <= torch.finfo(torch.float16).tiny), name
        else:
            assert torch.all(w_hat[0] == 0), name
        assert torch.all(torch.isfinite(w_hat)), name


@pytest.mark.parametrize("name", ALL_NAMES)
def test_encode_of_decoded_codes_is_identity(name):
    fmt = format_from_name(name)
    w = torch.randn(8, 4, 32) * torch.logspace(-3, 2, 8).view(8, 1, 1)  # groups of very different magnitudes
    s, z = fmt.fit(w)
    s = s.unsqueeze(-1)
    z = None if z is None else z.unsqueeze(-1)
    codes = fmt.encode(w, s, z)
    w_hat = fmt.decode(codes, s, z)
    assert torch.equal(fmt.encode(w_hat, s, z), codes)
    assert torch.equal(fmt.decode(fmt.encode(w_hat, s, z), s, z), w_hat)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_canonical_code_round_trips(name):
    """Each code whose level is not a duplicate (-0) or NaN decodes and re-encodes to itself."""
    fmt = format_from_name(name)
    codes = torch.arange(2**fmt.bits).to(torch.uint8)
    s = torch.tensor(0.37).to(torch.float16).float()
    z = torch.tensor(float(2 ** (fmt.bits - 1))) if fmt.has_zero else None
    levels = _decode_levels(fmt)
    if isinstance(fmt, CodebookFormat):
        canonical = torch.tensor([i == int(torch.nonzero(levels == levels[i])[0]) for i in range(len(codes))])
        if name == "fp8_e4m3":
            nan_bytes = torch.arange(256).to(torch.uint8).view(torch.float8_e4m3fn).float().isnan()
            canonical &= ~nan_bytes
    else:
        canonical = torch.ones(len(codes), dtype=torch.bool)
    assert canonical.sum() == {"fp4_e2m1": 15, "fp8_e4m3": 253}.get(name, 2**fmt.bits)
    assert torch.equal(fmt.encode(fmt.decode(codes, s, z), s, z)[canonical], codes[canonical])


def test_iq4_nl_is_ggmls_grid():
    """Code i decodes to ggml's kvalues_iq4nl[i] times the scale (the GGUF block's d)."""
    fmt = get_format("iq4_nl", 4)
    assert fmt.name == "iq4_nl" and fmt.max_level == 127.0
    assert _decode_levels(fmt).tolist() == [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def test_nearest_level_is_chosen():
    fmt = get_format("nf", 2)  # levels -1, 0, 0.337915, 1
    u = torch.tensor([-0.9, -0.49, -0.01, 0.16, 0.18, 0.6, 0.7, 2.0, -3.0])
    assert fmt.encode(u, torch.ones(()), None).tolist() == [0, 1, 1, 1, 2, 2, 3, 3, 0]


def test_symmetric_1_bit_raises():
    with pytest.raises(LowbitError, match="at least 2 bits"):
        get_format("int", 1, symmetric=True)
    assert get_format("int", 1).name == "int1"  # asymmetric 1-bit is fine


@pytest.mark.parametrize("family,bits,fix", [("nf", 5, "int5"), ("nf", 1, "int1"), ("fp4", 3, "bits=4"),
                                             ("fp8", 4, "bits=8")])
def test_unsupported_width_names_the_fix(family, bits, fix):
    with pytest.raises(LowbitError, match=fix):
        get_format(family, bits)


@pytest.mark.parametrize("bits", [0, 9, 2.0, "4"])
def test_bits_out_of_range_raise(bits):
    with pytest.raises(LowbitError, match="1..8"):
        get_format("int", bits)


def test_unknown_family_lists_known_ones():
    assert format_family_names() == ["fp4", "fp8", "int", "iq4_nl", "nf"]
    with pytest.raises(LowbitError, match="fp4, fp8, int, iq4_nl, nf"):
        get_format("mxfp4", 4)
    with pytest.raises(LowbitError, match="Did you mean 'int'"):
        get_format("innt", 4)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_format_from_name_round_trips(name):
    fmt = format_from_name(name)
    assert fmt.name == name
    assert format_from_name(fmt.name).bits == fmt.bits
    assert repr(fmt) == f"Format({name})"


@pytest.mark.parametrize("name", ["int9", "int0", "nf5", "fp4", "fp8", "int4_asym", "INT4", "", "int1_sym"])
def test_format_from_name_rejects_unknown(name):
    with pytest.raises(LowbitError):
        format_from_name(name)
