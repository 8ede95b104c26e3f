"""What happens to a Linear's input before its GEMM (methods.md §8.4): an online Hadamard, the QUAD split into
full-precision outlier coordinates and the rest, and the per-token activation quantizer of the rest.

``x (..., in)`` -> ``H`` (optional, ``x @ H_in``, orthonormal) -> ``x_out = x[..., :r]`` (full precision, hits
the float ``w_outlier (out, r)``) and ``x_rest = x[..., r:]`` -> ``act_quant(x_rest)`` (per-token int4/int8, or
nothing) -> the (packed) GEMM with the weight's last ``in - r`` columns.

:class:`TransformedLinear` is the float form a transform step (:mod:`lowbit.transforms.rotate`) leaves behind;
a weight quantizer turns it into a :class:`~lowbit.nn.QLinear` that carries the same :class:`InputSpec`,
quantizing only the rest columns (:meth:`TransformedLinear.quantizable_weight`) with calibration statistics of
the input the packed weight really sees (:meth:`TransformedLinear.calibration_input`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowbitError
from ..formats.act import ActQuantConfig, fake_quantize
from ..kernels.hadamard import hadamard_transform


@dataclass(frozen=True)
class InputSpec:
    hadamard: bool = False  # online Hadamard over the whole input (before o_proj / down_proj)
    outliers: int = 0  # leading input coordinates kept in full precision (QUAD's r)
    act: ActQuantConfig | None = None  # per-token quantizer of the rest (None = float activations)

    def __post_init__(self):
        if not isinstance(self.outliers, int) or self.outliers < 0:
            raise LowbitError(f"outliers must be a non-negative integer, got {self.outliers!r}")

    @property
    def is_identity(self) -> bool:
        return not self.hadamard and not self.outliers and self.act is None

    def with_act(self, act: ActQuantConfig | None) -> InputSpec:
        return replace(self, act=act)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["act"] = None if self.act is None else self.act.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        act = d.get("act")
        return cls(hadamard=bool(d.get("hadamard", False)), outliers=int(d.get("outliers", 0)),
                   act=None if act is None else ActQuantConfig.from_dict(act))

    def describe(self) -> str:
        parts = (["hadamard"] if self.hadamard else []) + ([f"outliers={self.outliers}"] if self.outliers else [])
        if self.act is not None:
            parts.append(f"a{self.act.bits}")
        return " ".join(parts)


def rotate_input(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """``x (..., in)`` -> ``x @ H_in`` when the spec has an online Hadamard, else ``x``."""
    return hadamard_transform(x) if spec.hadamard else x


def split_input(x: torch.Tensor, spec: InputSpec, quantize: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``x (..., in)`` (already rotated) -> ``(x_out (..., r) or None when r = 0, x_q (..., in - r))``: the
    full-precision outlier coordinates and the rest, activation-quantized (fake quantization) unless
    ``quantize=False`` (for a GEMM that quantizes it itself, :func:`lowbit.kernels.qmatmul_act`)."""
    r = spec.outliers
    x_out, rest = (x[..., :r], x[..., r:]) if r else (None, x)
    return x_out, rest if spec.act is None or not quantize else fake_quantize(rest, spec.act)


class TransformedLinear(nn.Linear):
    """A float ``nn.Linear`` whose input goes through an :class:`InputSpec` first: ``y = x_q W_restᵀ +
    x_out W_outᵀ + b`` with ``W (out, in)`` in the transformed basis (``W_out = W[:, :r]``)."""

    def __init__(self, linear: nn.Linear, spec: InputSpec):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.weight = linear.weight
        self.bias = linear.bias
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_out, rest = split_input(rotate_input(x, self.spec), self.spec)
        r = self.spec.outliers
        y = F.linear(rest, self.weight[:, r:], self.bias)
        return y if x_out is None else y + F.linear(x_out, self.weight[:, :r])

    def calibration_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in - r)``: the float input the quantized rest columns see (Hadamard applied, outliers
        dropped, activations not quantized): what GPTQ's Hessian is built from."""
        return split_input(rotate_input(x, self.spec), self.spec.with_act(None))[1]

    def quantizable_weight(self) -> torch.Tensor:
        """``(out, in - r)``: the columns a weight quantizer packs."""
        return self.weight[:, self.spec.outliers:]

    def outlier_weight(self) -> torch.Tensor | None:
        """``(out, r)`` float columns kept in full precision (None when ``r = 0``)."""
        return self.weight[:, :self.spec.outliers] if self.spec.outliers else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.spec.describe()}"
