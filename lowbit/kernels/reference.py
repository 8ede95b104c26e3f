"""The ground truth: dequantize to fp32, then ``F.linear``. Correct everywhere.

Large uniform weights (more than :data:`TILE_ELEMENTS` weights, e.g. a 49152×576 LM head) are dequantized
:data:`TILE_ELEMENTS` at a time, a block of output rows per tile, so no full float copy of the layer exists:
a tied int8 head costs 9 MB of transient memory per call instead of 113 MB. The result is the same (each output
column is one tile's dot products)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..qtensor import PackedWeight, QuantizedWeight

TILE_ELEMENTS = 1 << 21  # weights per dequantized tile (8 MiB in fp32)


def _row_tiles(qweight: PackedWeight):
    """``(r0, r1, fp32 rows)`` blocks covering the weight; one block unless it is a large uniform weight."""
    out_f, in_f = qweight.shape
    if not isinstance(qweight, QuantizedWeight) or out_f * in_f <= TILE_ELEMENTS:
        yield 0, out_f, qweight.dequantize(torch.float32)
        return
    rows = max(1, TILE_ELEMENTS // in_f)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        index = torch.arange(r0, r1, device=qweight.codes.device)
        yield r0, r1, qweight.select_rows(index).dequantize(torch.float32)


def qmatmul_reference(x: torch.Tensor, qweight: PackedWeight,
                      compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x (..., in)`` -> ``(..., out)`` = ``x @ dequantize(W)ᵀ`` computed in ``compute_dtype`` (fp32 unless an
    autocast region asks for bf16/fp16, as it would of ``nn.Linear``), returned in ``x.dtype``."""
    xf = x.to(compute_dtype)
    tiles = _row_tiles(qweight)
    r0, r1, w = next(tiles)
    if r1 == qweight.shape[0]:
        return F.linear(xf, w.to(compute_dtype)).to(x.dtype)
    y = xf.new_empty(*x.shape[:-1], qweight.shape[0])
    y[..., r0:r1] = F.linear(xf, w.to(compute_dtype))
    for r0, r1, w in tiles:
        y[..., r0:r1] = F.linear(xf, w.to(compute_dtype))
    return y.to(x.dtype)


def input_grad_reference(grad_y: torch.Tensor, qweight: PackedWeight) -> torch.Tensor:
    """``grad_y (..., out)`` -> ``(..., in)`` = ``grad_y @ dequantize(W)``, tiled as :func:`qmatmul_reference`.

    A bf16/fp16 ``grad_y`` (the forward ran under autocast) is multiplied in that dtype, as autocast would;
    otherwise in fp32."""
    low = grad_y.dtype in (torch.bfloat16, torch.float16)
    g = None
    for r0, r1, w in _row_tiles(qweight):
        w = w.to(grad_y.dtype) if low else w
        part = grad_y[..., r0:r1].to(w.dtype) @ w
        g = part if g is None else g.add_(part)
    return g.to(grad_y.dtype)
