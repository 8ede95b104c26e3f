"""The packed matmul and the float head's GEMV as ops ``torch.compile`` keeps opaque, for a compiled decode step
(:func:`lowbit.nn.compile.compile_decode`: transformers' static KV cache, ``torch.compile`` of the forward, which
fuses the norms, rotary embeddings, attention bookkeeping and cache updates around the packed layers).

* ``lowbit::qgemv`` and ``lowbit::gemv_f32``: the C++ extension's decode kernels registered with torch's
  dispatcher (no Python per call: a Python custom op costs about 20 µs a call, more than a small layer's kernel);
  a compiled graph calls them for one-row layers. They do not count calls in :data:`lowbit.kernels.calls`.
* ``lowbit::packed_matmul`` and ``lowbit::float_linear``: Python custom ops running :func:`lowbit.kernels.qmatmul`
  / :func:`lowbit.kernels.linear` (the eager dispatch, counted), for everything else (the prompt pass, batches,
  or no C++ extension).

Eager execution never goes through these ops (``QLinear`` and ``GEMVLinear`` use them only while dynamo traces):
the eager path stays the reference.
"""

from __future__ import annotations

import functools

import torch

from ..qtensor import QuantizedWeight


@torch.library.custom_op("lowbit::packed_matmul", mutates_args=())
def packed_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, fmt: str,
                  granularity: str, group_size: int, out_features: int, in_features: int) -> torch.Tensor:
    """``x (..., in)`` -> ``(..., out)`` for a uniform packed weight given by its tensors and layout. A decode row
    goes straight to the GEMV (its arguments depend only on the format, the group size and the kernel choice:
    cached), anything else through :func:`lowbit.kernels.qmatmul`."""
    from . import _choice, calls, qmatmul
    from .cpu import extension

    if x.dtype == torch.float32 and x.numel() == x.shape[-1] and x.device.type == "cpu" and codes.is_cpu:
        plan = _row_plan(fmt, group_size, _choice())
        if plan is not None:
            name, bits, levels, offset, int8 = plan
            calls[name] += 1
            y = extension().qgemv(x.reshape(-1).contiguous(), codes, scales, zeros, levels, bits, group_size, offset,
                                  int8)
            return y.reshape(*x.shape[:-1], out_features)
    qweight = QuantizedWeight(codes, scales, zeros, fmt, granularity, group_size, (out_features, in_features))
    return qmatmul(x, qweight)


@functools.cache
def _row_plan(fmt: str, group_size: int, choice: str):
    """``(counter name, bits, levels, offset, int8)`` of the CPU GEMV for this layout and choice, or None."""
    from . import FASTEST
    from .cpu import _format_args, extension

    if choice not in FASTEST or extension() is None:
        return None
    bits, levels, offset = _format_args(fmt)
    int8 = choice == "auto" and bool(extension().int8_x_applies(bits, group_size, levels is not None))
    return ("cpu-gemv-i8" if int8 else "cpu-gemv"), bits, levels, offset, int8


@packed_matmul.register_fake
def _(x, codes, scales, zeros, fmt, granularity, group_size, out_features, in_features):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("lowbit::float_linear", mutates_args=())
def float_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` through :func:`lowbit.kernels.linear` (the fp32 GEMV for one row)."""
    from . import linear

    return linear(x, weight)


@float_linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def native_ops() -> bool:
    """Whether the C++ extension's dispatcher ops ``lowbit::qgemv`` and ``lowbit::gemv_f32`` (registered when it
    loads; C++ kernels with no Python in between) are available, with their shape functions for tracing."""
    from .cpu import extension

    if extension() is None:
        return False
    if not _fakes_registered:
        torch.library.register_fake("lowbit::qgemv")(
            lambda x, codes, scales, zeros, levels, bits, group_size, offset, int8_x:
            x.new_empty(*x.shape[:-1], codes.shape[0]))
        torch.library.register_fake("lowbit::gemv_f32")(lambda x, w: x.new_empty(*x.shape[:-1], w.shape[0]))
        _fakes_registered.append(True)
    return True


_fakes_registered: list = []


def row_plan(fmt: str, group_size: int, choice: str):
    """Public name of the cached ``(counter name, bits, levels, offset, int8)`` GEMV plan (see :func:`_row_plan`)."""
    return _row_plan(fmt, group_size, choice)
