"""The only package that computes with packed weights. ``qmatmul`` picks an implementation per call.

Implementations:
``reference`` (dequantize + F.linear; ground truth and fallback); on CPU (:mod:`.cpu`) ``cpu-gemv`` (C++ decode
GEMV, one row), ``cpu-gemv-i8`` (the same with each activation group rounded to int8 for VNNI dot products, as
llama.cpp's Q8 dot products do, where the format allows), ``cpu-gemm-i8`` (the same for small batches, up to 16
rows, and on AVX2 CPUs without AVX-512 for any number of rows: prefill and batches too; ``cpu-gemv-rows``: LowRA's,
the GEMV once per row), ``cpu-int-gemm`` (:func:`qmatmul_act`:
activation-quantized layers, W4A8 and W4A4, as a real integer GEMM: the C++ VNNI kernel, or oneDNN's int8 GEMM over
int8 weight tiles for prefill), ``cpu-tiled-bf16`` (prefill, batches and bf16 training of uniform and LowRA weights:
the weight dequantized one cache-sized tile at a time and multiplied in bf16), ``cpu-tiled-f32`` (the same tiles in
fp32, wherever the extension builds: fp32 training's forward and input gradient, scoring under :func:`fp32_activations`
or ``exact``, and the prefill of formats no int8 kernel takes; equal to the reference up to summation order),
``cpu-gemv-f32`` (the fp32 GEMV of a
packed model's float LM head, :func:`linear`) and ``cpu-onednn-f32`` (oneDNN's fp32 GEMM for that head's batches and
prefill); ``triton`` (dequant-fused matmul for CUDA tensors, :mod:`.triton_gpu`, needs the ``gpu`` extra). Not a
matmul but counted here: ``cpu-attention`` (:mod:`lowbit.nn.attention`, causal attention over whole sequences,
``auto`` only). ``auto``
(the default) picks the fastest that applies. ``LOWBIT_KERNEL=exact`` keeps activations in fp32 (no int8 decode
rounding, no bf16 tiles outside autocast): equal to the reference up to summation order. ``LOWBIT_KERNEL=reference``
(or :func:`force`) pins the reference for debugging; ``LOWBIT_KERNEL=triton`` forces Triton wherever it applies (with
``TRITON_INTERPRET=1`` that includes CPU tensors, through Triton's interpreter: slow, for tests). :data:`calls`
counts which implementation ran, so benchmarks can print it."""

from __future__ import annotations

import collections
import contextlib
import logging
import os

import torch
import torch.nn.functional as F

from ..errors import LowbitError
from ..formats.act import ActQuantConfig, fake_quantize
from ..qmixed import MixedCodebookWeight
from ..qtensor import PackedWeight
from .cpu import (
    MIXED_GEMV_ROWS,
    SMALL_BATCH,
    act_gemm_applies,
    float_supports,
    gemv_function,
    input_grad_cpu_tiled,
    int8_applies,
    linear_cpu,
    linear_onednn,
    many_rows_i8_applies,
    onednn_supports,
    qmatmul_cpu,
    qmatmul_cpu_act,
    qmatmul_cpu_rows,
    qmatmul_cpu_rows_i8,
    qmatmul_cpu_tiled,
    rows_i8_function,
    tiled_supports,
)
from .cpu import supports as cpu_supports
from .group_scaled import group_scaled_weight as group_scaled_weight
from .group_scaled import qmatmul_group_scaled as _qmatmul_group_scaled
from .reference import input_grad_reference, qmatmul_reference
from .triton_gpu import qmatmul_triton
from .triton_gpu import supports as triton_supports

log = logging.getLogger(__name__)
IMPLEMENTATIONS = ("auto", "exact", "reference", "triton")
FASTEST = ("auto", "exact")  # the choices that pick the fastest implementation that applies
calls: collections.Counter = collections.Counter()
_forced: list[str] = []
_fp32_activations: list[bool] = []


def _choice() -> str:
    choice = _forced[-1] if _forced else os.environ.get("LOWBIT_KERNEL", "auto")
    if choice not in IMPLEMENTATIONS:
        raise LowbitError(f"LOWBIT_KERNEL={choice!r} is not one of {', '.join(IMPLEMENTATIONS)}; unset it or pick one")
    return choice


@contextlib.contextmanager
def force(name: str):
    """Use ``reference`` (always), ``triton`` (where it applies), ``auto`` (fastest that applies) or ``exact``
    (fastest without rounding decode activations to int8) inside the block."""
    if name not in IMPLEMENTATIONS:
        raise LowbitError(f"kernel {name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


@contextlib.contextmanager
def fp32_activations():
    """Inside the block ``auto`` never rounds activations to int8 (decode rows, small batches and AVX2's many rows
    run fp32 activations; bf16 tiles and every other choice unchanged): what perplexity and task scoring run under,
    so that a score measures the weights, not the serving kernel's activation rounding. On SmolLM2 rtn-w4g128 (16
    windows, AVX2) int8 rows moved perplexity +0.67% (27.834 -> 28.020); bf16 tiles -0.02% (BENCHMARKS.md)."""
    _fp32_activations.append(True)
    try:
        yield
    finally:
        _fp32_activations.pop()


def _rounds_int8(choice: str) -> bool:
    """Whether ``choice`` lets a kernel round activations to int8 here (``auto``, outside :func:`fp32_activations`)."""
    return choice == "auto" and not _fp32_activations


class _QMatmul(torch.autograd.Function):
    """Gradient to the input only (the packed weight is frozen). Nothing float is saved for the backward: it
    dequantizes the weight again, so training memory stays at the packed size plus one layer's transient copy."""

    @staticmethod
    def forward(ctx, x, qweight):
        ctx.qweight = qweight
        with torch.no_grad():
            return _qmatmul(x, qweight, inference=False)

    @staticmethod
    def backward(ctx, grad_y):
        qweight = ctx.qweight
        if _choice() in FASTEST and grad_y.dtype in (torch.bfloat16, torch.float32):
            dtype = grad_y.dtype
            if tiled_supports(grad_y, qweight, dtype):
                calls["cpu-tiled-bf16" if dtype == torch.bfloat16 else "cpu-tiled-f32"] += 1
                return input_grad_cpu_tiled(grad_y, qweight), None
        return input_grad_reference(grad_y, qweight), None


def _gemv_plan(qweight: PackedWeight, choice: str):
    """``(counter name, fn, rows_fn)`` where ``fn(x (in,) fp32 contiguous) -> (out,)`` is the GEMV :func:`_qmatmul`
    would run for one fp32 CPU row of ``qweight`` under ``choice``, and ``rows_fn(x (M, in) fp32, M <= SMALL_BATCH)
    -> (M, out)`` its small-batch int8 GEMM for a few rows outside autocast (``cpu-gemm-i8``; None where that does not
    apply); None where no GEMV applies. Cached on the weight object (a layer rebuilds that object when its buffers
    change): a decode step calls this 210 times per token on SmolLM2, and deciding again each time cost about as much
    as a small layer's kernel (a batch-16 step: a third of the small layers' kernel time)."""
    key = (choice, _rounds_int8(choice))
    cached = qweight.__dict__.get("_gemv_plan")
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = None
    probe = torch.empty(qweight.in_features)
    if choice in FASTEST and cpu_supports(probe, qweight):
        int8 = key[1] and int8_applies(qweight)
        rows_fn = rows_i8_function(qweight) if int8 else None
        plan = ("cpu-gemv-i8" if int8 else "cpu-gemv", gemv_function(qweight, int8), rows_fn)
    qweight.__dict__["_gemv_plan"] = (key, plan)
    return plan


def qmatmul(x: torch.Tensor, qweight: PackedWeight) -> torch.Tensor:
    """``x (..., in)`` -> ``(..., out)`` = ``x @ Wᵀ`` for a packed ``W``; differentiable in ``x``."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad and x.shape[-1]:
        rows = x.numel() // x.shape[-1]  # the fast paths: decode rows, nothing to differentiate
        if rows == 1:
            plan = _gemv_plan(qweight, _choice())
            if plan is not None:
                calls[plan[0]] += 1
                return plan[1](x.reshape(-1)).reshape(*x.shape[:-1], qweight.out_features)
        elif 1 < rows <= SMALL_BATCH and _autocast_dtype(x) == torch.float32:
            plan = _gemv_plan(qweight, _choice())
            if plan is not None and plan[2] is not None:
                calls["cpu-gemm-i8"] += 1
                return plan[2](x.reshape(rows, -1)).reshape(*x.shape[:-1], qweight.out_features)
    if x.requires_grad and torch.is_grad_enabled():
        return _QMatmul.apply(x, qweight)
    return _qmatmul(x, qweight)


def qmatmul_act(x: torch.Tensor, qweight: PackedWeight, act: ActQuantConfig) -> torch.Tensor:
    """``x (..., in)`` with each row quantized per token by ``act`` (:mod:`lowbit.formats.act`), times the packed
    ``W``: ``(..., out)``. Inference on CPU (``auto``/``exact``, symmetric activations, integer codes where
    :func:`~.cpu.act_gemm_applies`) runs the real integer GEMM (``cpu-int-gemm``): int8 x int8 products summed
    in int32, equal to the simulated path up to fp32 rounding. Training (the straight-through estimator), GPUs,
    asymmetric activations, codebooks and ``reference`` run the simulated path: ``fake_quantize`` then
    :func:`qmatmul` (under ``auto`` as ``exact``: the activations are rounded by ``act`` only)."""
    choice = _choice()
    if act.symmetric and choice in FASTEST and act_gemm_applies(x, qweight):
        calls["cpu-int-gemm"] += 1
        return qmatmul_cpu_act(x, qweight, act.bits, act.clip_ratio)
    with force("exact" if choice == "auto" else choice):  # x is rounded once, by act: no int8 or bf16 on top
        return qmatmul(fake_quantize(x, act), qweight)


def qmatmul_group_scaled(x: torch.Tensor, qweight: PackedWeight, group_scale: torch.Tensor) -> torch.Tensor:
    """``x (..., in)`` -> ``(..., out)`` = ``x (g ⊙ Q(W))ᵀ`` with ``g = group_scale (out, groups)`` multiplying
    each quantization group (:mod:`.group_scaled`); differentiable in ``x`` and ``g``. Multiplies in bf16/fp16
    inside an autocast region, as ``qmatmul`` does; always the dequantizing reference (it exists for training)."""
    calls["reference"] += 1
    return _qmatmul_group_scaled(x, qweight, group_scale, _autocast_dtype(x))


def _qmatmul(x: torch.Tensor, qweight: PackedWeight, inference: bool = True) -> torch.Tensor:
    """One packed matmul. On CPU: one row (decode) runs the GEMV (:mod:`.cpu`; activations rounded to int8 per group
    under ``auto`` where the format allows). Under ``auto``, ``inference`` calls (prefill, batches, evaluation)
    of up to :data:`~.cpu.SMALL_BATCH` rows run the int8 small-batch kernel where the format allows, more rows the
    tiled bf16 GEMM (on AVX2 builds, which have no bf16 tiles, the int8 kernel again; never inside
    :func:`fp32_activations`, which scoring runs under); LowRA's mixed rows run the fp32 GEMV per row up to
    :data:`~.cpu.MIXED_GEMV_ROWS` rows (up to ``SMALL_BATCH`` under ``exact``), more rows the tiled bf16 GEMM.
    Inside a bf16 autocast region (training) the tiled bf16 GEMM too. Any other fp32 CPU call (a training forward
    outside autocast, ``inference=False``; scoring; ``exact``) runs fp32 tiles; what remains, the reference."""
    choice = _choice()
    if choice in FASTEST and x.device.type == "cpu":
        if cpu_supports(x, qweight):
            if _rounds_int8(choice) and int8_applies(qweight):
                calls["cpu-gemv-i8"] += 1
                return qmatmul_cpu(x, qweight, int8_x=True)
            calls["cpu-gemv"] += 1
            return qmatmul_cpu(x, qweight)
        inferring = _rounds_int8(choice) and inference and _autocast_dtype(x) == torch.float32
        if inferring and int8_applies(qweight) and qweight.codes.device.type == "cpu" \
                and (x.numel() <= SMALL_BATCH * x.shape[-1] or many_rows_i8_applies(qweight)):
            calls["cpu-gemm-i8"] += 1  # a small batch, or AVX2's many rows: int8 activations, the weight read once
            return qmatmul_cpu_rows_i8(x, qweight)
        rows_limit = MIXED_GEMV_ROWS if choice == "auto" and tiled_supports(x, qweight) else SMALL_BATCH
        if isinstance(qweight, MixedCodebookWeight) and inference and _autocast_dtype(x) == torch.float32 \
                and 0 < x.numel() <= rows_limit * x.shape[-1] and cpu_supports(x.reshape(-1, x.shape[-1])[0], qweight):
            calls["cpu-gemv-rows"] += 1  # LowRA's few rows: the decode GEMV per row
            return qmatmul_cpu_rows(x, qweight)
        low = _autocast_dtype(x) == torch.bfloat16 or (choice == "auto" and inference)
        if low and tiled_supports(x, qweight):
            calls["cpu-tiled-bf16"] += 1  # under autocast, y in its dtype (no round trip through x's)
            return qmatmul_cpu_tiled(x, qweight, None if _autocast_dtype(x) == torch.float32 else _autocast_dtype(x))
        if _autocast_dtype(x) == torch.float32 and tiled_supports(x, qweight, torch.float32):
            calls["cpu-tiled-f32"] += 1  # fp32 training, exact and fp32-activation scoring, AVX2's prefill
            return qmatmul_cpu_tiled(x, qweight, dtype=torch.float32)
    elif choice != "reference" and triton_supports(x, qweight):  # CUDA (auto), or forced
        calls["triton"] += 1
        return qmatmul_triton(x, qweight)
    calls["reference"] += 1
    dtype = _autocast_dtype(x)
    return qmatmul_reference(x.to(dtype) if dtype != torch.float32 else x, qweight, dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for the float layers a packed model keeps (its LM head): one fp32 CPU row without autograd
    (a decode step) runs lowbit's fp32 GEMV, more rows without autograd (batches, prefill, evaluation) oneDNN's
    fp32 GEMM, anything else ``F.linear``; ``reference`` pins ``F.linear``."""
    if _choice() in FASTEST:
        if float_supports(x, weight):
            calls["cpu-gemv-f32"] += 1
            return linear_cpu(x, weight, bias)
        if onednn_supports(x, weight):
            calls["cpu-onednn-f32"] += 1
            return linear_onednn(x, weight, bias)
    return F.linear(x, weight, bias)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an ``nn.Linear`` would multiply ``x`` in (and return) here: autocast's bf16/fp16 inside an
    autocast region (4x faster than fp32 on CPUs with AVX512-BF16: the trainer's and RILQ's forward), fp32
    otherwise (the result is then returned in ``x.dtype``)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) in (torch.bfloat16, torch.float16):
        return torch.get_autocast_dtype(kind)
    return torch.float32


def multiplies_bf16(x: torch.Tensor) -> bool:
    """Whether a matmul here multiplies ``x`` as bf16: ``x`` is bf16, or a bf16 autocast region is on for its
    device (what lowbit's attention and the calibration Hessians follow)."""
    return x.dtype == torch.bfloat16 or _autocast_dtype(x) == torch.bfloat16


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 natively (CPUs with AVX512-BF16 or AMX; CUDA with bf16 support): where
    the trainer's ``precision="auto"`` runs matmuls in bf16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def prepare() -> str:
    """Build or load the compiled CPU kernel now (it is otherwise built on first use); returns what decode
    will run: ``cpu-gemv`` or ``reference``."""
    from .cpu import extension

    return "cpu-gemv" if _choice() in FASTEST and extension() is not None else "reference"


def kernel_summary() -> str:
    """Which implementations ran since the last :func:`reset_counts`, e.g. ``cpu-gemv:4200 + reference:210``."""
    return " + ".join(f"{k}:{v}" for k, v in sorted(calls.items())) or "none"


def reset_counts() -> None:
    calls.clear()
