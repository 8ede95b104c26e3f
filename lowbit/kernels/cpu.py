"""CPU decode path: a small C++ kernel (``csrc/qgemv.cpp``) built on first use with torch's extension loader.

Decode (one token at a time) is memory-bound: the float path reads 4 bytes per weight, this one reads the
packed codes (0.5 bytes per weight at 4 bits) plus the scales, unpacks one group at a time into a buffer that
stays in L1, and never writes a dequantized copy of the weight. Rows are split across torch's intra-op threads.
Prefill and batches (more than one row) go to the reference path, where the dequantization is amortised.
The same extension holds an fp32 GEMV for the float LM head a packed model keeps (:func:`linear_cpu`): torch's
fp32 matrix-vector product reaches about a third of this CPU's read bandwidth on it.

The build takes about half a minute once per machine (cached under ``$TORCH_EXTENSIONS_DIR``); if no C++
compiler is available the reference path is used and a warning says why.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import torch

from ..formats import format_from_name
from ..formats.codebook import CodebookFormat
from ..qmixed import MixedCodebookWeight
from ..qtensor import PackedWeight, QuantizedWeight

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "qgemv.cpp"


@functools.cache
def extension():
    """The compiled extension module, or None if it cannot be built here (with a warning naming the cause)."""
    from torch.utils.cpp_extension import load

    try:
        return load(name="lowbit_qgemv", sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers: the reference path still works
        warnings.warn(f"lowbit's CPU decode kernel could not be built ({e}); using the slower reference path. "
                      "Install a C++ compiler (g++) to enable it.", RuntimeWarning, stacklevel=2)
        return None


@functools.lru_cache(maxsize=64)
def _format_args(fmt_name: str) -> tuple[int, torch.Tensor | None, int]:
    fmt = format_from_name(fmt_name)
    levels = fmt.levels.contiguous() if isinstance(fmt, CodebookFormat) else None
    offset = fmt.offset if getattr(fmt, "symmetric", False) else 0
    return fmt.bits, levels, offset


KINDS = ("uniform", "mixed-codebook")


def supports(x: torch.Tensor, qweight: PackedWeight) -> bool:
    """True for one CPU row without autograd (the decode case) of a uniform or mixed-codebook weight, when the
    kernel builds here. Called once per layer per decoded token: cheapest tests first."""
    if x.device.type != "cpu" or x.numel() != x.shape[-1] or qweight.kind not in KINDS:
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False
    device = (qweight.codes if qweight.kind == "uniform" else qweight.perm).device
    return device.type == "cpu" and extension() is not None


def qmatmul_cpu(x: torch.Tensor, qweight: PackedWeight) -> torch.Tensor:
    """``x (..., in)`` with one row -> ``(..., out)``; equals the reference up to fp32 summation order."""
    xv = x.reshape(-1).float().contiguous()
    if isinstance(qweight, MixedCodebookWeight):
        widths = list(qweight.rows)
        y = extension().qgemv_mixed(xv, widths, [qweight.codes[b] for b in widths],
                                    [qweight.codebooks[b] for b in widths], qweight.absmax, qweight.perm,
                                    qweight.block_size)
    else:
        assert isinstance(qweight, QuantizedWeight)
        bits, levels, offset = _format_args(qweight.fmt)
        y = extension().qgemv(xv, qweight.codes, qweight.scales, qweight.zeros, levels, bits, qweight.group_size,
                              offset)
    return y.reshape(*x.shape[:-1], qweight.out_features).to(x.dtype)


def float_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for one fp32 CPU row without autograd against a contiguous fp32 CPU weight, when the AVX-512 build
    of the kernel is available (only that build was measured faster than torch's own GEMV)."""
    if x.device.type != "cpu" or x.numel() != x.shape[-1] or x.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not weight.is_contiguous():
        return False
    return extension() is not None and _simd()


@functools.cache
def _simd() -> bool:
    return bool(extension().simd())


def linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x (..., in)`` with one row, ``weight (out, in)`` fp32 -> ``(..., out)``;
    equal up to fp32 summation order."""
    y = extension().gemv_f32(x.reshape(-1).contiguous(), weight)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])
