"""CPU decode path: a small C++ kernel (``csrc/qgemv.cpp``) built on first use with torch's extension loader.

Decode (one token at a time) is memory-bound: the float path reads 4 bytes per weight, this one reads the
packed codes (0.5 bytes per weight at 4 bits) plus the scales, unpacks one group at a time into a buffer that
stays in L1, and never writes a dequantized copy of the weight. Rows are split across torch's intra-op threads.
Prefill, batches and training (more than one row) run tile GEMMs: int8 tiles (AVX2), or the weight dequantized one
cache-sized tile at a time and multiplied in bf16 (AVX512-BF16) or fp32 (:func:`qmatmul_cpu_tiled`).
The same extension holds an fp32 GEMV for the float LM head a packed model keeps (:func:`linear_cpu`): torch's
fp32 matrix-vector product reaches about a third of this CPU's read bandwidth on it.

The build takes a minute or a few once per machine (cached under ``$TORCH_EXTENSIONS_DIR``; :mod:`.build` keeps
concurrent and killed builds safe); if no C++ compiler is available the reference path is used and a warning
says why.
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
from .build import load as load_extension

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "qgemv.cpp"
SOURCES = (SOURCE, SOURCE.with_name("int_gemm.cpp"), SOURCE.with_name("gptq.cpp"), SOURCE.with_name("decode.cpp"),
           SOURCE.with_name("attention.cpp"), SOURCE.with_name("gram.cpp"),
           SOURCE.with_name("scales.cpp"), SOURCE.with_name("gemm_i8.cpp"), SOURCE.with_name("hadamard.cpp"))


@functools.cache
def extension():
    """The compiled extension module, or None if it cannot be built here (with a warning naming the cause)."""
    try:
        return load_extension("lowbit_qgemv", SOURCES, cflags=["-O3", "-march=native", "-fopenmp"],
                              ldflags=["-fopenmp"])
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


def int8_applies(qweight: PackedWeight) -> bool:
    """Whether :func:`qmatmul_cpu` with ``int8_x=True`` rounds the activations to int8 for this weight (integer
    codes in groups of whole 4-byte lanes: of 1, 2, 4 or 8 bits on a CPU with AVX512-VNNI, of 1, 2 or 4 bits with
    AVX2): see ``csrc/qgemv.cpp``."""
    return _int8_rule(qweight, "int8_x_applies")


def _int8_rule(qweight: PackedWeight, rule: str) -> bool:
    if not isinstance(qweight, QuantizedWeight) or extension() is None:
        return False
    bits, levels, _ = _format_args(qweight.fmt)
    return bool(getattr(extension(), rule)(bits, qweight.group_size, levels is not None))


def gemv_function(qweight: PackedWeight, int8_x: bool = False):
    """``fn(x (in,) fp32 contiguous) -> (out,) fp32``: :func:`qmatmul_cpu` for one row with the weight's arguments
    bound once (the decode step's fast path). A mixed-codebook weight's function also takes ``(M, in) -> (M, out)``
    (:func:`qmatmul_cpu_rows`)."""
    ext = extension()
    if isinstance(qweight, MixedCodebookWeight):
        widths = list(qweight.rows)
        codes, books = [qweight.codes[b] for b in widths], [qweight.codebooks[b] for b in widths]
        return lambda x: ext.qgemv_mixed(x, widths, codes, books, qweight.absmax, qweight.perm, qweight.block_size)
    bits, levels, offset = _format_args(qweight.fmt)
    args = (qweight.codes, qweight.scales, qweight.zeros, levels, bits, qweight.group_size, offset, int8_x)
    return lambda x: ext.qgemv(x, *args)


def qmatmul_cpu(x: torch.Tensor, qweight: PackedWeight, int8_x: bool = False) -> torch.Tensor:
    """``x (..., in)`` with one row -> ``(..., out)``; equals the reference up to fp32 summation order, or with
    ``int8_x`` (where :func:`int8_applies`) up to the rounding of each activation group to int8 (symmetric,
    ``max|x_g| / 127``), as llama.cpp's Q8 dot products round it: the error of output ``n`` is at most
    ``Σ_g s_ng · (max|x_g| / 254) · Σ_{k∈g} |q_nk − z_ng|``."""
    y = gemv_function(qweight, int8_x)(x.reshape(-1).float().contiguous())
    return y.reshape(*x.shape[:-1], qweight.out_features).to(x.dtype)


SMALL_BATCH = 16  # at most this many rows run the int8-activation kernel (small batches); more: bf16 tiles, or
# where the build has no bf16 tiles but the AVX2 int8 tile GEMM (:func:`many_rows_i8_applies`), that GEMM
# LowRA's mixed rows: at most this many rows run the decode GEMV (more: bf16 tiles where they build);
# per SmolLM2 layer, 1 thread, the tiles took 0.7x the GEMV's time at 4 rows, 0.25x at 16, 2.7x at 1.
MIXED_GEMV_ROWS = 2


def rows_i8_function(qweight: QuantizedWeight):
    """``fn(x (M, in) fp32, M <= SMALL_BATCH) -> (M, out)``: :func:`qmatmul_cpu_rows_i8` with the weight's arguments
    bound once (a batched decode step's fast path). Only where :func:`int8_applies`."""
    ext = extension()
    bits, _, offset = _format_args(qweight.fmt)
    args = (qweight.codes, qweight.scales, qweight.zeros, bits, qweight.group_size, offset)
    return lambda x: ext.qgemm_i8(x if x.is_contiguous() else x.contiguous(), *args)


def many_rows_i8_applies(qweight: PackedWeight) -> bool:
    """Whether rows beyond :data:`SMALL_BATCH` (prefill, large batches; not scoring, see ``fp32_activations``) run
    :func:`qmatmul_cpu_rows_i8` too: :func:`int8_applies` on a build with ``csrc/gemm_i8.cpp``'s tile GEMM (AVX2
    without AVX-512, so no bf16 tiles; per SmolLM2 layer it takes 0.5-0.7x the time of fp32 ``F.linear`` at 512
    rows, BENCHMARKS.md)."""
    return int8_applies(qweight) and bool(extension().gemm_i8_tiles_built())


def qmatmul_cpu_rows_i8(x: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    """``x (..., in)`` with a few rows (``<= SMALL_BATCH``, or any number where :func:`many_rows_i8_applies`) ->
    ``(..., out)``, each row's activation groups rounded to int8 as in the one-row kernel (same bound per row), the
    packed weight read once per call. Only where :func:`int8_applies`."""
    y = rows_i8_function(qweight)(x.reshape(-1, x.shape[-1]).float())
    return y.reshape(*x.shape[:-1], qweight.out_features).to(x.dtype)


def act_gemm_applies(x: torch.Tensor, qweight: PackedWeight) -> bool:
    """Whether :func:`qmatmul_cpu_act` runs ``x`` against ``qweight``: CPU tensors without autograd and a weight
    the integer GEMMs take — integer codes in whole 4-byte lanes on a CPU with AVX512-VNNI, or codes of 1, 2 or 4
    bits on an AVX2 build (``csrc/gemm_i8.cpp``'s tiles, any rows: even one decode row took 0.1-0.2x the simulated
    path's time on SmolLM2's layers). Any activation width of :class:`~lowbit.formats.act.ActQuantConfig`, 2-8 bits,
    fits their int8 codes."""
    if x.device.type != "cpu" or not isinstance(qweight, QuantizedWeight) or qweight.codes.device.type != "cpu":
        return False
    if x.requires_grad and torch.is_grad_enabled() or extension() is None:
        return False
    return _int8_rule(qweight, "vnni_applies") or many_rows_i8_applies(qweight)


def qmatmul_cpu_act(x: torch.Tensor, qweight: QuantizedWeight, act_bits: int, clip_ratio: float) -> torch.Tensor:
    """``x (..., in)`` -> ``(..., out)``: each row quantized per token as
    :func:`~lowbit.formats.act.quantize_per_token` quantizes it (symmetric, the same codes), then the integer GEMM
    with the packed codes (int8 x int8 products summed in int32, scales applied once per group): up to
    :data:`SMALL_BATCH` rows (decode, batches) or group-wise scales in the C++ VNNI kernel, which reads the packed
    weight directly; more rows of a weight with one scale per row (QUAD's and QuaRot's per-channel weights) in
    oneDNN's int8 GEMM over int8 tiles of ``q - z`` (:func:`_int_mm_tiled`); on an AVX2 build every row count in
    ``csrc/gemm_i8.cpp``'s tile GEMM. Equal to the simulated path (fake-quantized ``x`` times the dequantized
    weight) up to fp32 rounding. Only where :func:`act_gemm_applies`."""
    bits, _, offset = _format_args(qweight.fmt)
    x2 = x.reshape(-1, x.shape[-1]).float()
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()  # rows may be strided (QUAD: the columns after the outliers)
    vnni = _int8_rule(qweight, "vnni_applies")  # else AVX2: qgemm_act runs csrc/gemm_i8.cpp's tiles, any rows
    if vnni and x2.shape[0] > SMALL_BATCH and qweight.scales.shape[-1] == 1 and (bits <= 4 or offset):
        y = _int_mm_tiled(x2, qweight, act_bits, clip_ratio, bits, offset)
    else:
        y = extension().qgemm_act(x2, qweight.codes, qweight.scales, qweight.zeros, bits, qweight.group_size,
                                  offset, act_bits, clip_ratio)
    return y.reshape(*x.shape[:-1], qweight.out_features).to(x.dtype)


def _int_mm_tiled(x2: torch.Tensor, qweight: QuantizedWeight, act_bits: int, clip_ratio: float, bits: int,
                  offset: int) -> torch.Tensor:
    """Many rows ``x2 (M, in)`` of a weight with one scale per row (channel/tensor granularity: the scales factor
    out of the sums, ``y = s_a s_wᵀ ⊙ (q_a (q_w - z)ᵀ)``): the activation codes times int8 tiles of ``q_w - z``
    through oneDNN's int8 GEMM (``torch._int_mm``, int32 sums), one cache-sized tile of rows at a time."""
    codes, s_a = extension().act_codes(x2, act_bits, clip_ratio)
    out_f, in_f = qweight.shape
    s_w = qweight.scales.float().reshape(-1).expand(out_f)
    y = torch.empty(x2.shape[0], out_f)
    rows = _tile_rows(qweight)
    tile = torch.empty(rows, in_f, dtype=torch.int8)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        extension().unpack_int8(qweight.codes, qweight.zeros, bits, offset, r0, r1, tile[: r1 - r0])
        acc = torch._int_mm(codes, tile[: r1 - r0].t())  # (M, r1 - r0) int32, exact
        torch.mul(acc, s_a * s_w[r0:r1], out=y[:, r0:r1])
    return y


def qmatmul_cpu_rows(x: torch.Tensor, qweight: MixedCodebookWeight) -> torch.Tensor:
    """``x (..., in)`` with a few rows (``<= MIXED_GEMV_ROWS``, or ``SMALL_BATCH`` without the bf16 tiles) of a
    mixed-codebook weight (LowRA) -> ``(..., out)``: the fp32 decode GEMV over all rows in one call (on AVX2 each
    decoded code meets four rows; elsewhere the weight is read once per row), never dequantized. Equal to the
    reference up to summation order."""
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    y = gemv_function(qweight)(rows)
    return y.reshape(*x.shape[:-1], qweight.out_features).to(x.dtype)


TILE_ELEMENTS = 1 << 20  # weights per tile (2 MiB bf16): bf16 training 17% and prefill 3% faster than 1 MiB here


def tiled_supports(x: torch.Tensor, qweight: PackedWeight, dtype: torch.dtype = torch.bfloat16) -> bool:
    """True for CPU inputs of a uniform or mixed-codebook (LowRA) packed weight (any number of rows) where
    :func:`qmatmul_cpu_tiled` multiplies in ``dtype``: fp32 wherever the extension builds, bf16 where it builds with
    AVX512-BF16. Whether it should run (prefill, batches, training) is the caller's choice."""
    if x.device.type != "cpu":
        return False
    if isinstance(qweight, QuantizedWeight):  # groups start on whole bytes (per-channel: any row length)
        on_cpu = qweight.codes.device.type == "cpu" and qweight.group_size % 8 == 0
    elif isinstance(qweight, MixedCodebookWeight):
        on_cpu = qweight.absmax.device.type == "cpu"
    else:
        return False
    return on_cpu and extension() is not None and (dtype == torch.float32 or _bf16())


@functools.cache
def _bf16() -> bool:
    return bool(extension().bf16()) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _tile_rows(qweight: PackedWeight) -> int:
    """Weight rows per tile of the tiled GEMMs: :data:`TILE_ELEMENTS` weights, at least 16 rows, at most all."""
    out_f, in_f = qweight.shape
    return min(out_f, max(16, TILE_ELEMENTS // in_f))


def _single_tile(qweight: PackedWeight) -> bool:
    return _tile_rows(qweight) == qweight.shape[0]


def _dequantized_tiles(qweight: QuantizedWeight | MixedCodebookWeight, dtype: torch.dtype):
    """``(r0, r1, (r1 - r0, in) dtype)`` tiles (bf16 or fp32) of :data:`TILE_ELEMENTS` weights covering the *stored*
    rows ``[r0, r1)``, dequantized by the C++ kernel into one reused buffer (never a float copy of the whole layer). A
    mixed-codebook weight stores its rows permuted (:meth:`~lowbit.qtensor.PackedWeight.stored_rows`), one width
    segment after another: a tile's rows are filled segment by segment."""
    out_f, in_f = qweight.shape
    rows = _tile_rows(qweight)
    buf = torch.empty(rows, in_f, dtype=dtype)
    if isinstance(qweight, MixedCodebookWeight):
        segments, total = [], 0  # (width, first stored row, rows)
        for b, n in qweight.rows.items():
            segments.append((b, total, n))
            total += n
        for r0 in range(0, out_f, rows):
            r1 = min(out_f, r0 + rows)
            for b, first, n in segments:
                s0, s1 = max(r0, first), min(r1, first + n)
                if s0 < s1:
                    extension().dequant_mixed_rows(qweight.codes[b], qweight.codebooks[b], qweight.absmax, b,
                                                   qweight.block_size, first, s0 - first, s1 - first,
                                                   buf[s0 - r0:s1 - r0])
            yield r0, r1, buf[: r1 - r0]
        return
    bits, levels, offset = _format_args(qweight.fmt)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        tile = buf[: r1 - r0]
        extension().dequant_rows(qweight.codes, qweight.scales, qweight.zeros, levels, bits, qweight.group_size,
                                 offset, r0, r1, tile)
        yield r0, r1, tile


def qmatmul_cpu_tiled(x: torch.Tensor, qweight: QuantizedWeight | MixedCodebookWeight,
                      out_dtype: torch.dtype | None = None, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``x (..., in)`` -> ``(..., out)`` multiplied in ``dtype`` (bf16: AVX512-BF16; fp32: anywhere), one dequantized
    tile of output rows at a time (oneDNN's / MKL's GEMM); returned in ``out_dtype`` (default ``x.dtype``). Equal to
    the reference (run under bf16 autocast for bf16) up to summation order: in bf16 the weight and the input are each
    rounded once, the output once; in fp32 the tiles hold exactly the reference's weights."""
    xb = x.reshape(-1, x.shape[-1]).to(dtype)
    out_dtype = out_dtype or x.dtype
    tiles = _dequantized_tiles(qweight, dtype)
    if _single_tile(qweight):  # the whole weight in one tile: the product is y
        y = torch.mm(xb, next(tiles)[2].t()).to(out_dtype)
    else:
        y = torch.empty(xb.shape[0], qweight.out_features, dtype=out_dtype)
        for r0, r1, tile in tiles:  # each tile's columns of y: whole-row copies, no transpose
            y[:, r0:r1] = torch.mm(xb, tile.t())
    order = qweight.stored_rows()
    if not isinstance(order, slice):  # stored rows permuted: y's columns back to the original order
        y = torch.empty_like(y).index_copy_(1, order, y)
    return y.reshape(*x.shape[:-1], qweight.out_features)


def input_grad_cpu_tiled(grad_y: torch.Tensor, qweight: QuantizedWeight | MixedCodebookWeight) -> torch.Tensor:
    """``grad_y (..., out)`` -> ``(..., in)`` = ``grad_y @ W`` in tiles (the backward of :func:`qmatmul_cpu_tiled`):
    bf16 tiles for a bf16 ``grad_y``, fp32 tiles otherwise; returned in ``grad_y.dtype``."""
    dtype = torch.bfloat16 if grad_y.dtype == torch.bfloat16 else torch.float32
    g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
    order = qweight.stored_rows()
    if not isinstance(order, slice):  # stored rows permuted: grad_y's columns in stored order
        g = g.index_select(1, order)
    tiles = _dequantized_tiles(qweight, dtype)
    if _single_tile(qweight):  # one product, rounded once
        out = torch.mm(g, next(tiles)[2])
    else:
        out = torch.zeros(g.shape[0], qweight.in_features, dtype=torch.float32)  # tiles summed in fp32
        for r0, r1, tile in tiles:
            out += g[:, r0:r1] @ tile
    return out.to(grad_y.dtype).reshape(*grad_y.shape[:-1], qweight.in_features)


def _plain_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 CPU operands without autograd, the weight contiguous: what both float-head kernels take."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()


def float_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for one fp32 CPU row without autograd against a contiguous fp32 CPU weight, when the AVX-512 build
    of the kernel is available (only that build was measured faster than torch's own GEMV)."""
    return x.numel() == x.shape[-1] and _plain_fp32(x, weight) and extension() is not None and _simd()


def onednn_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for more than one fp32 CPU row without autograd against a contiguous fp32 CPU weight, where torch
    was built with oneDNN: its fp32 GEMM ran the head of a batch 2-3x faster than ``F.linear`` (MKL's sgemm) on
    this AMD CPU, at every row count from 2 to 1024 (BENCHMARKS.md)."""
    return x.numel() not in (0, x.shape[-1]) and _plain_fp32(x, weight) and _onednn()


@functools.cache
def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for fp32 ``x (..., in)``, ``weight (out, in)`` through oneDNN's fp32 GEMM
    (no copy of the weight, no reduced precision) -> ``(..., out)``; equal up to fp32 summation order."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [None], "")


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


def attention_supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """True for fp32 or bf16 CPU ``query (B, H, L, D)`` over ``key``/``value (B, Hkv, L, D)`` of the same length
    and width (H a multiple of Hkv, L >= 2), without autograd, where the build takes that head width (AVX-512, or
    AVX2 + FMA up to 1,536 tokens, beyond which torch's kernel measured as fast there): :func:`causal_attention`
    applies. Whether the call is causal and unmasked is the caller's to know."""
    if query.device.type != "cpu" or query.dtype not in (torch.float32, torch.bfloat16) or query.shape[2] < 2:
        return False
    if value.shape != key.shape or key.shape[2:] != query.shape[2:] or query.shape[1] % key.shape[1]:
        return False  # (also values of another width than the keys, as multi-head latent attention has)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False
    ext = extension()
    return (ext is not None and ext.causal_attention_applies(query.shape[-1])
            and query.shape[2] <= ext.causal_attention_longest())


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     bf16: bool = False) -> torch.Tensor:
    """Causal softmax attention of :func:`attention_supports` inputs (``csrc/attention.cpp``): ``(B, L, H, D)`` in
    the query's dtype. ``bf16``: Q Kᵀ and P V multiply bf16-rounded values into fp32 sums (twice the fp32 rate, the
    probabilities rounded to bf16 as FlashAttention does on GPUs) where the build has AVX512-BF16; else fp32."""
    ext = extension()
    kind = torch.bfloat16 if bf16 and ext.bf16_attention_applies() else torch.float32
    q, k, v = (t.to(kind) for t in (query, key, value))
    if kind == torch.bfloat16 and any(s % 2 for t in (q, k) for s in t.stride()[:3]):
        q, k = q.contiguous(), k.contiguous()  # (the bf16 kernel reads q and k rows as pairs)
    return ext.causal_attention(q, k, v, float(scale)).to(query.dtype)


def gram_bf16_supports(x: torch.Tensor) -> bool:
    """True for a CPU ``x`` where the build has AVX512-BF16: :func:`gram_upper_bf16` applies."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    ext = extension()
    return ext is not None and ext.gram_bf16_applies()


def gram_upper_bf16(x: torch.Tensor, upper: torch.Tensor) -> None:
    """``upper (d, d)`` fp32 += ``xᵀx`` of ``x (N, d)`` rounded to bf16, products and sums in fp32 (``csrc/gram.cpp``);
    valid on and above the diagonal."""
    extension().gram_upper_bf16(x if x.stride(-1) == 1 else x.contiguous(), upper)
