"""The bit layout of packed codes: the one place that knows it.

Layout ``lsb-rows-v1`` (recorded in every checkpoint manifest):

* codes are unsigned integers of ``bits`` bits (1 <= bits <= 8), shape ``(..., n)``;
* each row of ``n`` codes becomes one little-endian bit stream: code ``i`` occupies stream bits
  ``[i*bits, (i+1)*bits)``, least significant bit first; stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``;
* a row takes exactly ``ceil(n * bits / 8)`` bytes (uint8 container, no further alignment); unused high bits
  of the last byte are zero.

Worked example, ``bits=3``, codes ``[5, 1, 7]``: stream = ``101 | 100 | 111`` (LSB first, i.e. 5 -> bits 1,0,1)
so byte 0 = ``0b11_001_101`` = 0xCD and byte 1 = ``0b0000000_1`` = 0x01: two bytes for nine bits.
For bits in {1, 2, 4, 8} this is the familiar "low nibble first" layout: with 4 bits, byte ``j`` holds code
``2j`` in its low nibble and code ``2j+1`` in its high nibble.
"""

from __future__ import annotations

import math

import torch

from ..errors import LowbitError

LAYOUT = "lsb-rows-v1"
SUPPORTED_BITS = tuple(range(1, 9))


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise LowbitError(f"bits must be an integer in 1..8, got {bits!r}")


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes one packed row of ``n`` codes takes: ``ceil(n * bits / 8)``."""
    _check_bits(bits)
    return math.ceil(n * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``(..., n)`` (any integer dtype, values < 2**bits) into uint8 ``(..., ceil(n*bits/8))``."""
    _check_bits(bits)
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    c = codes.reshape(-1, n)
    if bits == 8:
        return c.to(torch.uint8).reshape(*lead, n).clone()
    nbytes = packed_row_bytes(n, bits)
    if 8 % bits == 0:  # 1, 2, 4: whole codes per byte
        per = 8 // bits
        c = torch.nn.functional.pad(c.to(torch.uint8), (0, nbytes * per - n)).view(-1, nbytes, per)
        out = torch.zeros(c.shape[:2], dtype=torch.uint8, device=c.device)
        for i in range(per):
            out |= c[..., i] << (i * bits)
        return out.reshape(*lead, nbytes)
    # 3, 5, 6, 7: eight codes make exactly `bits` bytes
    n8 = math.ceil(n / 8)
    c = torch.nn.functional.pad(c.to(torch.int64), (0, n8 * 8 - n)).view(-1, n8, 8)
    word = torch.zeros(c.shape[:2], dtype=torch.int64, device=c.device)
    for i in range(8):
        word |= c[..., i] << (i * bits)
    out = torch.stack([(word >> (8 * j)) & 0xFF for j in range(bits)], dim=-1).to(torch.uint8)
    return out.view(-1, n8 * bits)[:, :nbytes].reshape(*lead, nbytes).contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``(..., ceil(n*bits/8))`` -> uint8 codes ``(..., n)``."""
    _check_bits(bits)
    nbytes = packed.shape[-1]
    if nbytes != packed_row_bytes(n, bits):
        raise LowbitError(
            f"packed rows hold {nbytes} bytes but {n} codes of {bits} bits need {packed_row_bytes(n, bits)}"
        )
    lead = packed.shape[:-1]
    p = packed.reshape(-1, nbytes)
    if bits == 8:
        return p.reshape(*lead, n).clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        out = torch.stack([(p >> (i * bits)) & mask for i in range(per)], dim=-1)
        return out.view(p.shape[0], nbytes * per)[:, :n].reshape(*lead, n)
    n8 = math.ceil(n / 8)
    b = torch.nn.functional.pad(p.to(torch.int64), (0, n8 * bits - nbytes)).view(-1, n8, bits)
    word = torch.zeros(b.shape[:2], dtype=torch.int64, device=p.device)
    for j in range(bits):
        word |= b[..., j] << (8 * j)
    out = torch.stack([(word >> (i * bits)) & mask for i in range(8)], dim=-1).to(torch.uint8)
    return out.view(-1, n8 * 8)[:, :n].reshape(*lead, n).contiguous()
