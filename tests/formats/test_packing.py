"""Packed layout ``lsb-rows-v1``: exact round trips, byte counts, zeroed padding bits, worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.errors import LowbitError
from lowbit.formats.packing import LAYOUT, pack, packed_row_bytes, unpack

# Deterministic (same examples every run), no example database written to disk, no per-example deadline.
PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=150)


@st.composite
def codes_and_bits(draw):
    """``(codes, bits)``: uint8 codes < 2**bits of shape ``(*lead, n)``; lead has 0 to 2 dims (1-D to 3-D)."""
    bits = draw(st.integers(1, 8))
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=5))
    n = draw(st.integers(1, 70))  # mostly not a multiple of 8
    arr = draw(hnp.arrays(np.uint8, (*lead, n), elements=st.integers(0, (1 << bits) - 1)))
    return torch.from_numpy(arr), bits


@PROPERTY
@given(codes_and_bits())
def test_unpack_inverts_pack_exactly(cb):
    codes, bits = cb
    n = codes.shape[-1]
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*codes.shape[:-1], math.ceil(n * bits / 8))
    out = unpack(packed, bits, n)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)


@PROPERTY
@given(codes_and_bits())
def test_unused_high_bits_of_last_byte_are_zero(cb):
    codes, bits = cb
    n = codes.shape[-1]
    packed = pack(codes, bits)
    used = n * bits - 8 * (packed.shape[-1] - 1)  # stream bits that land in the last byte, 1..8
    assert 1 <= used <= 8
    assert torch.all((packed[..., -1].to(torch.int32) >> used) == 0)


@PROPERTY
@given(st.integers(1, 8), st.integers(0, 5000))
def test_packed_row_bytes_is_ceil_of_bits(bits, n):
    expect = (n * bits + 7) // 8  # integer ceil, independent of the library's math.ceil
    assert packed_row_bytes(n, bits) == expect


@PROPERTY
@given(codes_and_bits())
def test_pack_accepts_wider_and_non_contiguous_integer_inputs(cb):
    codes, bits = cb
    wide = codes.to(torch.int64)
    assert torch.equal(pack(wide, bits), pack(codes, bits))
    if codes.dim() >= 2:
        # A transposed-then-transposed-back copy is non-contiguous but holds the same values.
        nc = codes.transpose(0, -1).contiguous().transpose(0, -1)
        assert torch.equal(pack(nc, bits), pack(codes, bits))


def test_layout_name_is_versioned():
    assert LAYOUT == "lsb-rows-v1"


def test_docstring_worked_example_3_bits():
    packed = pack(torch.tensor([5, 1, 7]), 3)
    assert packed.tolist() == [0xCD, 0x01]
    assert unpack(packed, 3, 3).tolist() == [5, 1, 7]


def test_4_bit_is_low_nibble_first():
    packed = pack(torch.tensor([[0x1, 0x2, 0xA, 0xF, 0x7]]), 4)
    # byte j holds code 2j in its low nibble and code 2j+1 in its high nibble; the last high nibble is zero.
    assert packed.tolist() == [[0x21, 0xFA, 0x07]]


def test_1_2_and_8_bit_examples():
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1]), 1).tolist() == [0b10001101, 0b1]
    assert pack(torch.tensor([3, 0, 2, 1, 2]), 2).tolist() == [0b01_10_00_11, 0b10]
    assert pack(torch.tensor([0, 200, 255]), 8).tolist() == [0, 200, 255]


def test_every_bit_is_set_in_stream_order():
    """Each code set alone to its max lights exactly stream bits [i*b, (i+1)*b)."""
    for bits in range(1, 9):
        n = 11
        for i in range(n):
            codes = torch.zeros(n, dtype=torch.uint8)
            codes[i] = (1 << bits) - 1
            packed = pack(codes, bits)
            stream = sum(int(byte) << (8 * j) for j, byte in enumerate(packed.tolist()))
            assert stream == ((1 << bits) - 1) << (i * bits), (bits, i)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits_raise(bits):
    with pytest.raises(LowbitError, match="1..8"):
        pack(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(LowbitError, match="1..8"):
        unpack(torch.zeros(4, dtype=torch.uint8), bits, 4)
    with pytest.raises(LowbitError, match="1..8"):
        packed_row_bytes(4, bits)


def test_unpack_rejects_mismatched_byte_count():
    packed = pack(torch.zeros(2, 10, dtype=torch.uint8), 3)  # 4 bytes per row
    assert packed.shape == (2, 4)
    with pytest.raises(LowbitError, match="4 bytes"):
        unpack(packed, 3, 11)  # 11 codes of 3 bits need 5 bytes
    with pytest.raises(LowbitError):
        unpack(packed[:, :3], 3, 10)
