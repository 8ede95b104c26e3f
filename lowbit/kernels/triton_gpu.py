"""GPU path: one Triton kernel for ``y = x @ Wᵀ`` with the dequantization of the packed ``W`` fused into the matmul.

``W`` is never written to global memory as floats: every program loads a tile of packed codes, unpacks and
decodes it in registers and feeds it to ``tl.dot`` with fp32 accumulation. One kernel covers

* uniform int formats (``int{1..8}`` asymmetric with uint8 zero points, ``int{2..8}_sym`` with the offset
  ``2**(bits-1)``), per-tensor / per-channel / per-group fp16 scales;
* codebook formats (``nf2..4``, ``fp4_e2m1``, ``fp8_e4m3``): code -> level through a ``2**bits`` fp32 table;
* mixed-codebook (LowRA) weights: one launch per present width over that width's stored rows, each row with its
  own fp16 codebook and one fp16 absmax per block of columns; outputs are stored straight to their original
  columns through ``perm``, so no extra gather pass is needed.

Layout (``lsb-rows-v1``, :mod:`lowbit.formats.packing`): code ``k`` of a row occupies stream bits
``[k*bits, (k+1)*bits)``. The kernel reads byte ``k*bits // 8`` and, for widths that do not divide 8 (3, 5, 6, 7),
also the next byte, then shifts by ``k*bits % 8`` and masks: a 3-bit code that straddles a byte boundary comes out
of the 16-bit window whole. For 1/2/4/8 bits one byte read suffices.

Tiling: programs cover ``BLOCK_M x BLOCK_N`` outputs and walk K in ``BLOCK_K`` steps. When each K tile lies in one
scale group (``BLOCK_K`` divides the group size, or there is one group per row) the tile is decoded *without* its
scale (``q - z`` or ``level[q]``), multiplied on ``tl.dot`` and the fp32 partial product is scaled per output
column; integer ``q - z`` is exact in fp16/bf16, so this loses nothing. Otherwise (group sizes like 24 or 40) the
scale is gathered per element and applied before the dot. fp32 activations use ``input_precision="ieee"`` (no
TF32), fp16/bf16 activations run the dot in their own dtype (in the interpreter bf16 is upcast to fp32 first:
Triton 3.9's interpreter multiplies bf16 dot operands as raw bit patterns). Decode (M = 1) uses ``BLOCK_M = 16``
with masking: simple and correct; a split-K GEMV variant would be faster for fp32 activations. Tile sizes: on a
GPU the first call of each (M bucket, shape, format, dtype) times up to 7 candidates (:func:`_candidates`) and
keeps the fastest (:func:`tune`; ``LOWBIT_TRITON_AUTOTUNE=0`` keeps the default :func:`_blocks`); the interpreter
uses the default. So far the kernel has only been checked in the interpreter: the tuning has not run on a GPU.

The interpreter: with ``TRITON_INTERPRET=1`` and CPU tensors :func:`supports` is True and the same kernel runs in
Triton's numpy interpreter (slow; used by the tests). The kernel only uses Triton builtins (no ``tl.sum`` or other
``@triton.jit`` library functions), so it interprets correctly whether or not Triton was imported with the
variable set. Triton is imported lazily: ``import lowbit`` works without it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import time

import torch

from ..formats import format_from_name
from ..formats.codebook import CodebookFormat
from ..qmixed import MixedCodebookWeight
from ..qtensor import PackedWeight, QuantizedWeight

KINDS = ("uniform", "mixed-codebook")
MODE_INT, MODE_TABLE, MODE_ROW_BOOK = 0, 1, 2  # how a code decodes: (q - z), levels[q], codebook[row, q]
_DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

tl = None  # triton.language, bound by _kernel() on first use (the kernel body resolves it as a global)


@functools.cache
def available() -> bool:
    """True when ``triton`` can be imported here (it is not imported by this check)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. a None entry in sys.modules
        return False


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def supports(x: torch.Tensor, qweight: PackedWeight) -> bool:
    """True when :func:`qmatmul_triton` applies: a uniform or mixed-codebook weight on ``x``'s device, no autograd
    through ``x``, triton installed, and ``x`` on CUDA (or on CPU with ``TRITON_INTERPRET=1``: the interpreter)."""
    if qweight.kind not in KINDS or not x.is_floating_point():
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False  # the kernel has no backward; the reference path does
    device = (qweight.codes if qweight.kind == "uniform" else qweight.perm).device
    if device != x.device or not available():
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and _interpret_requested())


def _qmm_kernel(
    x_ptr, c_ptr, s_ptr, z_ptr, lv_ptr, perm_ptr, out_ptr,
    M, N, K, GROUP,
    stride_xm, stride_xk, stride_cn, stride_sn, stride_zn, stride_ln, stride_om, stride_on,
    BITS: tl.constexpr, MODE: tl.constexpr, HAS_ZERO: tl.constexpr, OFFSET: tl.constexpr,
    HAS_PERM: tl.constexpr, TILE_SCALE: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m, col(n)] = sum_k x[m, k] * decode(codes[n, k]) for one (BLOCK_M, BLOCK_N) tile; see the module doc.

    Scales ``s[n * stride_sn + k // GROUP]`` (stride_sn = 0: one shared row), zeros likewise with stride_zn,
    level tables ``lv[n * stride_ln + q]`` (stride_ln = 0: one table for all rows). col(n) = perm[n] or n.
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    row_bytes = (K * BITS + 7) // 8
    codes_col = c_ptr + rn64[None, :] * stride_cn  # (1, BN): W tiles are built as (BK, BN)
    x_row = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)  # tl.full, not the @jit tl.zeros: see module doc
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        xt = tl.load(x_row + rk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # ---- unpack (BK, BN) codes: byte k*BITS//8, plus the next byte when a code can straddle two ----
        bit = rk * BITS
        byte = bit >> 3
        wmask = k_ok[:, None] & n_ok[None, :]
        lo = tl.load(codes_col + byte[:, None], mask=wmask, other=0).to(tl.int32)
        if BITS == 8:
            q = lo
        elif 8 % BITS == 0:
            q = (lo >> (bit & 7)[:, None]) & ((1 << BITS) - 1)
        else:
            hi_ok = wmask & ((byte + 1) < row_bytes)[:, None]
            hi = tl.load(codes_col + (byte + 1)[:, None], mask=hi_ok, other=0).to(tl.int32)
            q = ((lo | (hi << 8)) >> (bit & 7)[:, None]) & ((1 << BITS) - 1)
        # ---- decode without the scale ----
        if MODE == 0:
            if HAS_ZERO:
                if TILE_SCALE:
                    z = tl.load(z_ptr + rn64 * stride_zn + k0 // GROUP, mask=n_ok, other=0).to(tl.float32)[None, :]
                else:
                    z = tl.load(z_ptr + rn64[None, :] * stride_zn + (rk // GROUP)[:, None], mask=wmask,
                                other=0).to(tl.float32)
                w = q.to(tl.float32) - z
            else:
                w = q.to(tl.float32) - OFFSET
        elif MODE == 1:
            w = tl.load(lv_ptr + q).to(tl.float32)  # table padded to 2**BITS entries; masked codes are 0
        else:
            w = tl.load(lv_ptr + rn64[None, :] * stride_ln + q, mask=wmask, other=0.0).to(tl.float32)
        # ---- scale and multiply ----
        if TILE_SCALE:  # the whole K tile lies in one group: scale the fp32 partial product per column
            s = tl.load(s_ptr + rn64 * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
            if DOT_FP32:
                part = tl.dot(xt.to(tl.float32), w, input_precision="ieee")
            else:
                part = tl.dot(xt, w.to(xt.dtype))
            acc += part * s[None, :]
        else:
            s = tl.load(s_ptr + rn64[None, :] * stride_sn + (rk // GROUP)[:, None], mask=wmask, other=0.0)
            w = w * s.to(tl.float32)
            if DOT_FP32:
                acc += tl.dot(xt.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(xt, w.to(xt.dtype))
    if HAS_PERM:
        cols = tl.load(perm_ptr + rn, mask=n_ok, other=0).to(tl.int64)
    else:
        cols = rn64
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel: compiled for the GPU, or (``interpret``) Triton's numpy interpreter, chosen explicitly
    here rather than by the environment at import time."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        return triton.jit(_qmm_kernel)


@functools.lru_cache(maxsize=64)
def _format_args(fmt_name: str, device: torch.device) -> tuple[int, int, bool, int, torch.Tensor | None]:
    """(bits, mode, has_zero, offset, level table padded to 2**bits fp32 on ``device`` or None)."""
    fmt = format_from_name(fmt_name)
    if isinstance(fmt, CodebookFormat):
        table = torch.zeros(2**fmt.bits, dtype=torch.float32)
        table[: fmt.levels.numel()] = fmt.levels
        return fmt.bits, MODE_TABLE, False, 0, table.to(device)
    symmetric = getattr(fmt, "symmetric", False)
    return fmt.bits, MODE_INT, not symmetric, fmt.offset if symmetric else 0, None


def _blocks(M: int, group: int, groups: int) -> tuple[int, int, int]:
    """Default (BLOCK_M, BLOCK_N, BLOCK_K): the interpreter's, and the first candidate of :func:`_candidates`.
    BLOCK_M >= 16 (``tl.dot``'s minimum); BLOCK_K is chosen to divide the group size when it can, so each K tile
    has one scale per row."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_k = 64
    if groups > 1:
        block_k = next((b for b in (128, 64, 32, 16) if group % b == 0), 64)
    return block_m, 64, block_k


def _candidates(M: int, group: int, groups: int) -> list[tuple[int, int, int]]:
    """The tile shapes tried on a GPU: the default, then BLOCK_N 64/128 with every BLOCK_K of 32-128 that keeps
    one scale per K tile (at most 7)."""
    default = _blocks(M, group, groups)
    ks = [k for k in (32, 64, 128) if groups == 1 or group % k == 0] or [default[2]]
    return list(dict.fromkeys([default] + [(default[0], n, k) for n in (64, 128) for k in ks]))


_TUNED: dict[tuple, tuple[int, int, int]] = {}  # (M bucket, rows, K, group, bits, mode, dtype, device) -> tiles


def tune(key: tuple, candidates: list[tuple[int, int, int]], run, timer, repeats: int = 3) -> tuple[int, int, int]:
    """The fastest of ``candidates`` for ``key``, found once by timing ``run(blocks)`` ``repeats`` times each
    (``timer()``: seconds, synchronised with the device) and cached. The first call of each candidate is not
    timed (it compiles)."""
    if key not in _TUNED:
        best, choice = math.inf, candidates[0]
        for blocks in candidates:
            run(blocks)
            start = timer()
            for _ in range(repeats):
                run(blocks)
            seconds = timer() - start
            if seconds < best:
                best, choice = seconds, blocks
        _TUNED[key] = choice
    return _TUNED[key]


def _cuda_timer() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def _launch(x2, out, codes, scales, zeros, table, perm, *, n_rows, K, group, bits, mode, has_zero, offset,
            stride_sn, stride_ln, blocks):
    M = x2.shape[0]
    groups = math.ceil(K / group)
    interpret = x2.device.type != "cuda"
    args = (x2, out, codes, scales, zeros, table, perm)
    kw = dict(n_rows=n_rows, K=K, group=group, bits=bits, mode=mode, has_zero=has_zero, offset=offset,
              stride_sn=stride_sn, stride_ln=stride_ln)
    if blocks is None and not interpret and os.environ.get("LOWBIT_TRITON_AUTOTUNE", "1") != "0":
        key = (1 << max(0, M - 1).bit_length(), n_rows, K, group, bits, mode, x2.dtype, x2.device)
        blocks = tune(key, _candidates(M, group, groups), lambda b: _launch(*args, **kw, blocks=b), _cuda_timer)
    block_m, block_n, block_k = blocks or _blocks(M, group, groups)
    tile_scale = groups == 1 or group % block_k == 0
    # Triton 3.9's interpreter multiplies bf16 tl.dot operands as raw uint16 bit patterns: upcast there.
    dot_fp32 = x2.dtype == torch.float32 or (interpret and x2.dtype == torch.bfloat16)
    dummy = scales
    grid = (math.ceil(M / block_m), math.ceil(n_rows / block_n))
    _kernel(interpret)[grid](
        x2, codes, scales, dummy if zeros is None else zeros, dummy if table is None else table,
        dummy if perm is None else perm, out,
        M, n_rows, K, group,
        x2.stride(0), x2.stride(1), codes.stride(0), stride_sn, stride_sn if zeros is not None else 0, stride_ln,
        out.stride(0), out.stride(1),
        BITS=bits, MODE=mode, HAS_ZERO=has_zero, OFFSET=offset, HAS_PERM=perm is not None, TILE_SCALE=tile_scale,
        DOT_FP32=dot_fp32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )


def qmatmul_triton(x: torch.Tensor, qweight: PackedWeight, *,
                   blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x (..., in)`` -> ``(..., out)`` = ``x @ dequantize(W)ᵀ`` in ``x.dtype``, accumulated in fp32.

    Args:
        x: activations, any number of leading dims (flattened to M rows); fp16/bf16 run the dot in their own
            dtype, fp32 in full fp32, other float dtypes are computed in fp32 and cast back.
        qweight: a :class:`QuantizedWeight` or :class:`MixedCodebookWeight` on ``x``'s device. CUDA tensors run
            the compiled kernel; CPU tensors always run in Triton's interpreter (slow; see :func:`supports`).
        blocks: ``(BLOCK_M, BLOCK_N, BLOCK_K)`` override (powers of two, each >= 16); tests use it to cover
            multi-tile paths with small shapes.
    """
    if qweight.kind not in KINDS:
        raise TypeError(f"qmatmul_triton does not handle packed weights of kind {qweight.kind!r}")
    N, K = qweight.out_features, qweight.in_features
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight expects {K}")
    x2 = x.reshape(math.prod(x.shape[:-1]), K)
    if x2.dtype not in _DOT_DTYPES:
        x2 = x2.float()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x2.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.reshape(*x.shape[:-1], N).to(x.dtype)
    if K == 0:
        return out.zero_().reshape(*x.shape[:-1], N).to(x.dtype)
    if isinstance(qweight, MixedCodebookWeight):
        absmax = qweight.absmax.contiguous()
        perm = qweight.perm.contiguous()
        r0 = 0
        for b, n in qweight.rows.items():
            if n:
                _launch(x2, out, qweight.codes[b].contiguous(), absmax[r0:r0 + n], None,
                        qweight.codebooks[b].contiguous(), perm[r0:r0 + n], n_rows=n, K=K,
                        group=qweight.block_size, bits=b, mode=MODE_ROW_BOOK, has_zero=False, offset=0,
                        stride_sn=absmax.stride(0), stride_ln=2**b, blocks=blocks)
            r0 += n
    else:
        assert isinstance(qweight, QuantizedWeight)
        bits, mode, has_zero, offset, table = _format_args(qweight.fmt, x.device)
        scales = qweight.scales.contiguous()
        zeros = None if qweight.zeros is None else qweight.zeros.contiguous()
        _launch(x2, out, qweight.codes.contiguous(), scales, zeros, table, None, n_rows=N, K=K,
                group=qweight.group_size, bits=bits, mode=mode, has_zero=has_zero, offset=offset,
                stride_sn=0 if scales.shape[0] == 1 else scales.stride(0), stride_ln=0, blocks=blocks)
    return out.reshape(*x.shape[:-1], N).to(x.dtype)
