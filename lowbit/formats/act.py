"""Dynamic per-token activation quantization for W4A4 / W4A8 (QuaRot §3.6, QUAD §7.3 of methods.md).

Each token (a row over the last dim ``k`` of ``x (..., k)``) gets its own scale at run time (methods.md §2.5).

- Symmetric (QuaRot/QUAD): ``qmax = 2^(b-1) - 1``, ``s = c · max|x| / qmax``, ``q = clamp(round(x / s), -(qmax+1),
  qmax)``, ``x̂ = s · q``. The extra negative level ``-(qmax+1)`` is kept as in both reference codebases; it is
  reached only when ``c < 1`` clips a negative element (int4: codes in [-8, 7], int8: [-128, 127]).
- Asymmetric: ``lo = c · min(min x, 0)``, ``hi = c · max(max x, 0)``, ``s = (hi - lo) / (2^b - 1)``,
  ``z = round(-lo / s)``, ``u = clamp(round(x / s) + z, 0, 2^b - 1)``, ``x̂ = s · (u - z)``. Codes and zero are
  stored shifted by ``-2^(b-1)`` so both fit int8 at b = 8; the shift cancels in ``q - z``.

Scales are computed in fp32 whatever the input dtype, floored at ``finfo(float32).tiny`` so an all-zero token
gives codes 0 and no NaN. With per-channel weight scales the scales factor out of the GEMM,
``y_ij = s^x_i s^w_j Σ_k q^x_ik q^w_jk`` (§2.5), which :func:`int_matmul` simulates with exact integer sums.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..errors import LowbitError

_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class ActQuantConfig:
    """Per-token dynamic activation quantizer settings (QUAD's released scripts: int4, clip 0.9, symmetric)."""

    version: ClassVar[int] = 1
    bits: int = 4  # code bits per activation, 2..8 (4 for W4A4, 8 for the A8 writer inputs)
    clip_ratio: float = 0.9  # the per-token range is shrunk by this factor, 0 < c <= 1 (1 = plain absmax)
    symmetric: bool = True  # False: per-token zero point covering [min, max] (QuaRot's asymmetric option)

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LowbitError(f"ActQuantConfig.bits must be an int in 2..8, got {self.bits!r}")
        if isinstance(self.clip_ratio, bool) or not isinstance(self.clip_ratio, (int, float)) \
                or not 0 < self.clip_ratio <= 1:
            raise LowbitError(f"ActQuantConfig.clip_ratio must be a number in (0, 1], got {self.clip_ratio!r}")
        if not isinstance(self.symmetric, bool):
            raise LowbitError(f"ActQuantConfig.symmetric must be True or False, got {self.symmetric!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActQuantConfig:
        data = dict(data)
        if data.pop("version", cls.version) != cls.version:
            raise LowbitError(f"ActQuantConfig version must be {cls.version}; upgrade lowbit or re-create the config")
        names = {f.name for f in dataclasses.fields(cls)}
        if extra := sorted(set(data) - names):
            raise LowbitError(f"ActQuantConfig has no field(s) {extra}; its fields are {sorted(names)}")
        return cls(**data)


class QuantizedActivations(NamedTuple):
    """``codes (..., k)`` int8, ``scale (..., 1)`` fp32, ``zero (..., 1)`` int8 or None (symmetric)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor | None


def quantize_per_token(x: Tensor, config: ActQuantConfig) -> QuantizedActivations:
    """``x (..., k)`` float, one scale (and zero) per row over the last dim. Not differentiable (see
    :func:`fake_quantize` for the straight-through version)."""
    xf = x.detach().float()
    c, b = config.clip_ratio, config.bits
    if config.symmetric:
        qmax = 2 ** (b - 1) - 1
        scale = (c * xf.abs().amax(-1, keepdim=True) / qmax).clamp_min(_TINY)
        return QuantizedActivations(torch.round(xf / scale).clamp(-qmax - 1, qmax).to(torch.int8), scale, None)
    umax, shift = 2**b - 1, 2 ** (b - 1)
    lo = c * xf.amin(-1, keepdim=True).clamp_max(0)
    hi = c * xf.amax(-1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / umax).clamp_min(_TINY)
    zero = torch.round(-lo / scale).clamp(0, umax)
    codes = (torch.round(xf / scale) + zero).clamp(0, umax)
    return QuantizedActivations((codes - shift).to(torch.int8), scale, (zero - shift).to(torch.int8))


def dequantize(q: QuantizedActivations) -> Tensor:
    """``scale · (codes - zero)`` as fp32 ``(..., k)``."""
    codes = q.codes.float() if q.zero is None else q.codes.float() - q.zero.float()
    return codes * q.scale


def fake_quantize(x: Tensor, config: ActQuantConfig) -> Tensor:
    """Quantize-dequantize ``x (..., k)`` per token; same shape and dtype. Straight-through estimator: the forward
    value is exactly the quantized one, the gradient w.r.t. ``x`` is the identity (QUAD §7.4)."""
    fq = dequantize(quantize_per_token(x, config)).to(x.dtype)
    # fq + (x - x.detach()) adds an exact 0, unlike x + (fq - x).detach(), which rounds twice in bf16/fp16.
    return fq + (x - x.detach()) if x.requires_grad else fq


def int_matmul(a_codes: Tensor, a_scale: Tensor, w_codes: Tensor, w_scale: Tensor,
               a_zero: Tensor | None = None) -> Tensor:
    """Simulated integer GEMM ``y = s^a · s^wᵀ · (q^a - z^a) q^wᵀ``, methods.md §2.5.

    ``a_codes (..., k)`` int8, ``a_scale (..., 1)``, ``w_codes (n, k)`` int8, ``w_scale (n, 1)`` or ``(n,)``,
    optional ``a_zero (..., 1)`` int8 (asymmetric activations) -> ``(..., n)`` fp32. On CPU the sums are int64
    (exact for any k). Elsewhere integer matmul is often missing, so they run in fp64, which is exact too: every
    partial sum is an integer of magnitude <= k · 128 · 128 = k · 2^14 < 2^53 for k < 2^39. The scales are applied
    in fp64 and the result rounded once to fp32."""
    acc_dtype = torch.int64 if a_codes.device.type == "cpu" else torch.float64
    acc = a_codes.to(acc_dtype) @ w_codes.to(acc_dtype).T  # (..., n), exact
    if a_zero is not None:  # Σ_k (q - z) w = Σ_k q w - z Σ_k w
        acc = acc - a_zero.to(acc_dtype) * w_codes.to(acc_dtype).sum(-1)
    return (acc.double() * a_scale.double() * w_scale.double().reshape(1, -1)).float()
