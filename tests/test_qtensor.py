"""QuantizedWeight: storage counted by hand, ragged groups, granularity shapes, layout rebuild, validation."""

from __future__ import annotations

import json

import pytest
import torch
from tolerances import ROUNDING_SLACK

from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.qtensor import QuantizedWeight, check_group_size
from lowbit.quantizers.rtn import rtn_quantize

CASES = [  # (family, bits, symmetric, granularity, group_size)
    ("int", 4, False, "group", 128),
    ("int", 3, False, "group", 64),
    ("int", 2, False, "group", 32),
    ("int", 8, True, "channel", None),
    ("int", 4, True, "tensor", None),
    ("nf", 4, False, "group", 64),
    ("fp4", 4, False, "group", 32),
    ("fp8", 8, False, "channel", None),
]


def _quantize(w, family, bits, symmetric, granularity, group_size):
    return rtn_quantize(w, get_format(family, bits, symmetric), granularity, group_size or 128)


def test_bits_per_weight_int4_g128_by_hand():
    q = _quantize(torch.randn(576, 576), "int", 4, False, "group", 128)
    # 576 columns at 4 bits = 288 bytes per row; ceil(576 / 128) = 5 groups of fp16 scale + uint8 zero.
    codes_bytes, scale_bytes, zero_bytes = 576 * 288, 576 * 5 * 2, 576 * 5
    assert q.codes.shape == (576, 288) and q.codes.dtype == torch.uint8
    assert q.scales.shape == (576, 5) and q.scales.dtype == torch.float16
    assert q.zeros.shape == (576, 5) and q.zeros.dtype == torch.uint8
    assert q.nbytes == codes_bytes + scale_bytes + zero_bytes == 174528
    assert q.bits_per_weight == pytest.approx((165888 + 5760 + 2880) * 8 / 331776)
    assert q.bits_per_weight == pytest.approx(4.208333333, abs=1e-9)


def test_bits_per_weight_other_layouts_by_hand():
    w = torch.randn(576, 576)
    nf4 = _quantize(w, "nf", 4, False, "group", 64)  # 9 fp16 absmax per row, no zero
    assert nf4.zeros is None and nf4.bits_per_weight == pytest.approx(4.25)
    int3 = _quantize(w, "int", 3, False, "group", 128)  # 216 bytes per row
    assert int3.codes.shape == (576, 216)
    assert int3.bits_per_weight == pytest.approx(3 + 24 * 5 / 576)
    sym = _quantize(w, "int", 4, True, "channel", None)  # one fp16 scale per row
    assert sym.bits_per_weight == pytest.approx(4 + 16 / 576)
    tensor = _quantize(w, "int", 8, False, "tensor", None)  # one fp16 scale + one byte zero for everything
    assert tensor.bits_per_weight == pytest.approx(8 + 24 / (576 * 576))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_nbytes_is_the_sum_of_stored_tensor_bytes(case):
    q = _quantize(torch.randn(24, 72), *case)
    expect = q.codes.numel() + 2 * q.scales.numel() + (0 if q.zeros is None else q.zeros.numel())
    assert q.nbytes == expect
    # The tensors own exactly those bytes: packed codes are not views into a larger unpacked buffer.
    assert sum(t.untyped_storage().nbytes() for t in q.tensors().values()) == expect
    assert set(q.tensors()) == ({"codes", "scales"} if q.zeros is None else {"codes", "scales", "zeros"})


def test_ragged_last_group_is_fitted_on_its_own_columns():
    w = torch.randn(8, 576) * 10
    w[:, 512:] = torch.randn(8, 64) * 0.01  # the short last group is tiny compared with the rest
    fmt = get_format("int", 4)
    q = rtn_quantize(w, fmt, "group", 128)
    assert q.scales.shape == (8, 5)  # four groups of 128 and one of 64
    s_last, z_last = fmt.fit(w[:, 512:])
    assert torch.equal(q.scales[:, 4].float(), s_last)
    assert torch.equal(q.zeros[:, 4].float(), z_last)
    s3, _ = fmt.fit(w[:, 384:512])
    assert torch.equal(q.scales[:, 3].float(), s3)
    err = (q.dequantize() - w)[:, 512:].abs()
    assert torch.all(err <= s_last.unsqueeze(-1) * (1 + ROUNDING_SLACK))
    assert err.max() < 1e-2  # a scale fitted across columns 448..575 would give errors ~1


@pytest.mark.parametrize("granularity,rows", [("tensor", 1), ("channel", 24)])
def test_tensor_and_channel_granularity_shapes(granularity, rows):
    w = torch.randn(24, 40)
    q = rtn_quantize(w, get_format("int", 4), granularity, 128)
    assert q.group_size == 40
    assert q.scales.shape == (rows, 1) and q.zeros.shape == (rows, 1)
    s_expect, _ = get_format("int", 4).fit(w.reshape(1, -1) if rows == 1 else w)
    assert torch.equal(q.scales.float().flatten(), s_expect.flatten())


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_metadata_and_empty_rebuild_the_same_layout(case):
    q = _quantize(torch.randn(24, 72), *case)
    assert (q.out_features, q.in_features, q.numel) == (24, 72, 24 * 72)
    assert q.bits == case[1]
    meta = json.loads(json.dumps(q.meta()))  # JSON-able
    e = QuantizedWeight.empty(meta)
    assert e.meta() == q.meta()
    assert e.nbytes == q.nbytes
    for name, t in q.tensors().items():
        assert e.tensors()[name].shape == t.shape and e.tensors()[name].dtype == t.dtype, name
    assert set(e.tensors()) == set(q.tensors())


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_dequantize_round_trips_through_codes(case):
    w = torch.randn(24, 72)
    q = _quantize(w, *case)
    w_hat = q.dequantize()
    assert w_hat.shape == (24, 72) and w_hat.dtype == torch.float32
    assert torch.equal(q.dequantize(torch.float16), w_hat.to(torch.float16))
    # Re-quantizing the dequantized weight with the same scales reproduces the same codes.
    fmt = q.format
    s = q.scales.float().repeat_interleave(q.group_size, dim=1)[:, :72]
    z = None if q.zeros is None else q.zeros.float().repeat_interleave(q.group_size, dim=1)[:, :72]
    assert torch.equal(fmt.encode(w_hat, s, z), q.unpacked_codes())
    assert (w_hat - w).norm() / w.norm() < 0.5


def test_dequantize_error_bound_int_asymmetric():
    w = torch.randn(16, 200)  # g=64: groups of 64, 64, 64, 8
    q = rtn_quantize(w, get_format("int", 4), "group", 64)
    s = q.scales.float().repeat_interleave(64, dim=1)[:, :200]
    z = q.zeros.float().repeat_interleave(64, dim=1)[:, :200]
    inside = (w >= -z * s) & (w <= (15 - z) * s)
    err = (q.dequantize() - w).abs()
    assert torch.all(err[inside] <= (s / 2 * (1 + ROUNDING_SLACK))[inside])
    assert inside.float().mean() > 0.95


def test_to_device_copies_metadata():
    q = _quantize(torch.randn(8, 32), "int", 3, False, "group", 16)
    moved = q.to("cpu")
    assert moved.meta() == q.meta()
    assert torch.equal(moved.dequantize(), q.dequantize())


def _parts(**overrides):
    q = rtn_quantize(torch.randn(8, 40), get_format("int", 4), "group", 16)
    kw = dict(codes=q.codes, scales=q.scales, zeros=q.zeros, fmt=q.fmt, granularity=q.granularity,
              group_size=q.group_size, shape=q.shape)
    kw.update(overrides)
    return kw


@pytest.mark.parametrize("bad,match", [
    (dict(codes=torch.zeros(8, 21, dtype=torch.uint8)), "codes must be uint8"),
    (dict(codes=torch.zeros(8, 20, dtype=torch.int32)), "codes must be uint8"),
    (dict(shape=(8, 48)), "codes must be uint8"),
    (dict(scales=torch.zeros(8, 2, dtype=torch.float16)), "scales must have shape"),
    (dict(scales=torch.zeros(1, 3, dtype=torch.float16)), "scales must have shape"),
    (dict(zeros=None), "needs zero points"),
    (dict(fmt="nf4"), "has no zero points"),
    (dict(granularity="row"), "granularity must be one of"),
    (dict(fmt="int9"), "unknown format name"),
    (dict(group_size=0), "multiple of 8"),
    (dict(group_size=12), "multiple of 8"),
    (dict(granularity="channel", scales=torch.zeros(8, 3, dtype=torch.float16)), "group_size == in_features"),
])
def test_invalid_layouts_raise(bad, match):
    assert QuantizedWeight(**_parts())  # the unmodified parts are valid
    with pytest.raises(LowbitError, match=match):
        QuantizedWeight(**_parts(**bad))


@pytest.mark.parametrize("g", [0, -8, 12, 7, 8.0, True, "64"])
def test_check_group_size_rejects(g):
    with pytest.raises(LowbitError, match="multiple of 8"):
        check_group_size(g)


@pytest.mark.parametrize("g", [8, 32, 64, 128, 256])
def test_check_group_size_accepts(g):
    assert check_group_size(g) is None


@pytest.mark.parametrize("granularity,group_size", [("tensor", 40), ("channel", 40), ("group", 16)])
def test_select_rows_dequantizes_like_the_full_weight(granularity, group_size):
    w = torch.randn(12, 40)
    q = rtn_quantize(w, get_format("int", 3, False), granularity, group_size)
    index = torch.tensor([5, 0, 5, 11])
    part = q.select_rows(index)
    assert part.shape == (4, 40)
    assert torch.equal(part.dequantize(), q.dequantize()[index])
