"""QLinear: a drop-in ``nn.Linear`` whose weight is a frozen, bit-packed :class:`QuantizedWeight`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowbitError
from ..formats.act import fake_quantize
from ..kernels import group_scaled_weight, qmatmul, qmatmul_act, qmatmul_group_scaled
from ..kernels.compiled import packed_matmul
from ..kernels.hadamard import hadamard_matrix
from ..qtensor import QuantizedWeight
from .input_transform import InputSpec, TransformedLinear, rotate_input, split_input
from .packed import PackedModule


class QLinear(PackedModule):
    """``y = x Wᵀ + b`` with ``W`` stored packed.

    ``W`` is any packed weight (a uniform :class:`~lowbit.qtensor.QuantizedWeight`, or a registered kind such as
    LowRA's :class:`~lowbit.qmixed.MixedCodebookWeight`), held as buffers (:class:`PackedModule`) with no
    gradient. Gradients flow to the input. Input ``x (..., in_features)`` in any float dtype; output
    ``(..., out_features)`` in the input's dtype.

    Adapters (:mod:`lowbit.adapters`) live in ``self.adapters`` (created when the first is attached) and act in
    the fixed order of methods.md §8.4.

    ``role`` is ``"linear"`` for the layers a quantizer replaced and ``"head"`` for an output head quantized by
    the ``embeddings`` step (kept apart in bits-per-weight accounting; it may share its buffers with the
    input embedding).

    ``spec`` (:class:`~lowbit.nn.input_transform.InputSpec`, W4A4 models): the input is Hadamard-rotated online,
    its first ``r`` coordinates multiply the float ``outlier (out, r)`` weight (QUAD; trainable) and the rest is
    activation-quantized per token before the packed GEMM, whose weight then has ``in_features - r`` columns.

    ``channel_scale`` (``(out,)`` fp32 Parameter or None): a trainable multiplier of each output row of the packed
    weight, i.e. its per-output-channel scale (QUAD's PEFT, methods.md §7.4; gradient ``Σ_k dW_jk · Q(W)_jk``).
    Attached by :func:`lowbit.adapters.train_outliers`; a checkpoint stores it folded into the packed scales.

    ``group_scale`` (``(out, groups)`` fp32 Parameter or None, the packed scales' shape): a trainable multiplier of
    every quantization group's scale (RILQ's ``scales="group"``, :func:`lowbit.adapters.train_group_scales`);
    the GEMM then runs through :func:`lowbit.kernels.qmatmul_group_scaled`. Also folded into the packed scales.
    """

    def __init__(self, qweight, bias: torch.Tensor | None = None, role: str = "linear", spec: InputSpec | None = None,
                 outlier: torch.Tensor | None = None):
        super().__init__()
        r = 0 if spec is None else spec.outliers
        if (outlier is None) != (r == 0) or (outlier is not None and tuple(outlier.shape) != (qweight.out_features, r)):
            raise LowbitError(f"outlier weight must be ({qweight.out_features}, {r}) exactly when spec.outliers={r}")
        self.in_features, self.out_features = qweight.in_features + r, qweight.out_features
        self.role = role
        self.spec = None if spec is None or spec.is_identity else spec
        self._register_packed(qweight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # QUAD keeps the outlier columns in fp16 (methods.md §7.3); PEFT trains an fp32 copy (train_outliers), which
        # a checkpoint then stores as fp32 (loading assigns the stored tensor)
        self.outlier = None if outlier is None else nn.Parameter(outlier.detach().to(torch.float16).clone(),
                                                                 requires_grad=False)
        self.register_parameter("channel_scale", None)
        self.register_parameter("group_scale", None)

    @property
    def granularity(self) -> str | None:
        """Uniform weights only (None for other kinds)."""
        return self.weight_meta.get("granularity")

    @property
    def group_size(self) -> int | None:
        """Uniform weights only (None for other kinds)."""
        return self.weight_meta.get("group_size")

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized fp32 copy of the weight, for code that inspects ``.weight`` (never cached)."""
        return self.qweight.dequantize()

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized GEMM of the (rotated) input: activation quantization and the outlier columns if any."""
        act = None if self.spec is None else self.spec.act
        x_out, x_q = (None, x) if self.spec is None else split_input(x, self.spec, quantize=act is None)
        if self.group_scale is not None:
            y = qmatmul_group_scaled(x_q if act is None else fake_quantize(x_q, act), self.qweight, self.group_scale)
        elif act is not None:  # the real integer GEMM where it applies (W4A8, W4A4), else the simulated one
            y = qmatmul_act(x_q, self.qweight, act)
        else:
            y = qmatmul(x_q, self.qweight)
        if self.channel_scale is not None:
            y = y * self.channel_scale.to(y.dtype)
        if x_out is None:
            return y
        if y.dtype == x_out.dtype and y.dim() >= 2:  # one pass: y + x_out W_outᵀ
            y2, x2, w_out = y.reshape(-1, y.shape[-1]), x_out.reshape(-1, x_out.shape[-1]), self.outlier.to(x_out.dtype)
            if torch.is_grad_enabled() and (y.requires_grad or x_out.requires_grad):
                return torch.addmm(y2, x2, w_out.t()).reshape(y.shape)
            return y2.addmm_(x2, w_out.t()).reshape(y.shape)  # y is this call's own product: added in place
        return y + F.linear(x_out, self.outlier.to(x_out.dtype)).to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = self._modules.get("adapters")
        if torch.compiler.is_compiling() and self._plain_uniform(adapters):  # opaque ops (lowbit.nn.compile)
            m, zeros, plan = self.weight_meta, self._buffers.get("zeros"), self.__dict__.get("decode_plan")
            if plan is not None and x.dtype == torch.float32 and x.numel() == x.shape[-1]:  # a decode row: C++
                bits, levels, offset, int8 = plan
                y = torch.ops.lowbit.qgemv(x, self.codes, self.scales, zeros, levels, bits, m["group_size"], offset,
                                           int8)
            else:
                y = packed_matmul(x, self.codes, self.scales, zeros, m["fmt"], m["granularity"], m["group_size"],
                                  self.out_features, self.in_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.spec is not None:
            x = rotate_input(x, self.spec)
        if not adapters:
            y = self._base(x)
        else:  # methods.md §8.4: input-side transform, base + additive updates, output-side transform
            x = next((a(x) for a in adapters.values() if a.place == "input"), x)
            y = self._base(x)
            for a in adapters.values():
                if a.place == "add":
                    y = y + a(x).to(y.dtype)
            y = next((a(y) for a in adapters.values() if a.place == "output"), y)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _plain_uniform(self, adapters) -> bool:
        """A uniform packed weight with nothing around it (no adapters, input transform or trained scales)."""
        return (self._weight_cls is QuantizedWeight and not adapters and self.spec is None
                and self.group_scale is None and self.channel_scale is None)

    def merged_weight(self, dtype: torch.dtype = torch.float32, adapters: bool = True) -> torch.Tensor:
        """The effective float weight ``(out, in)``: ``T_out (Q(W) + sum dW) T_in`` of the attached adapters
        (just the dequantized base with ``adapters=False`` or none attached; trained channel scales included),
        relative to the layer's own input: QUAD's outlier columns come first and an online Hadamard is folded in
        (``W Hᵀ``). Activation quantization has no float-weight form and is left out. Exact up to fp32 rounding;
        never cached."""
        with torch.no_grad():
            w = self.qweight.dequantize() if self.group_scale is None else \
                group_scaled_weight(self.qweight, self.group_scale)
            if self.channel_scale is not None:
                w = w * self.channel_scale.float()[:, None]
            if self.outlier is not None:
                w = torch.cat([self.outlier.float(), w], dim=1)
            attached = list((self._modules.get("adapters") or {}).values()) if adapters else []
            for place in ("add", "input", "output"):
                for a in attached:
                    if a.place == place:
                        w = a.merge(w)
            if self.spec is not None and self.spec.hadamard:  # y = (x H) Wᵀ = x (W Hᵀ)ᵀ
                w = w @ hadamard_matrix(self.in_features, torch.float64).T.to(w.dtype)
        return w.to(dtype)

    def folded_scales(self) -> torch.Tensor:
        """The packed weight's row-wise scales (its :attr:`~lowbit.qtensor.PackedWeight.scale_layout` tensor,
        stored order and dtype) with the trained ``group_scale`` and ``channel_scale`` folded in: what a
        checkpoint stores and :meth:`fold_trained_scales` keeps."""
        trained = [t for t in (self.group_scale, self.channel_scale) if t is not None]
        factor = torch.ones(self.out_features, 1, device=trained[0].device if trained else None)
        if self.group_scale is not None:
            factor = factor * self.group_scale.detach().float()
        if self.channel_scale is not None:
            factor = factor * self.channel_scale.detach().float()[:, None]
        return self.qweight.fold_multiplier(factor)

    def fold_trained_scales(self) -> None:
        """Fold the trained multipliers into the packed scales and drop them: decode then runs the plain packed
        kernels on the same weight (up to one rounding of the scales to their stored dtype)."""
        if self.group_scale is None and self.channel_scale is None:
            return
        setattr(self, self.qweight.scale_layout[0], self.folded_scales())
        self.group_scale = self.channel_scale = None

    def extra_repr(self) -> str:
        role = "" if self.role == "linear" else f", role={self.role}"
        spec = "" if self.spec is None else f", {self.spec.describe()}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.layout()}, " \
               f"bias={self.bias is not None}{role}{spec}"


def packed_linear(qweight, *, bias: torch.Tensor | None = None, spec: InputSpec | None = None,
                  outlier: torch.Tensor | None = None, role: str = "linear",
                  adapters: nn.ModuleDict | None = None) -> QLinear:
    """The one place a :class:`QLinear` is built from a packed weight (quantizers, checkpoint loading, export).

    ``qweight`` holds the packed ``(out, in - r)`` columns; ``spec``/``outlier`` the input transform and QUAD's
    float ``(out, r)`` columns; ``adapters`` (a ``ModuleDict``) are carried over as they are."""
    layer = QLinear(qweight, bias, role=role, spec=spec, outlier=outlier)
    if adapters is not None and len(adapters):
        layer.adapters = adapters
    return layer


def carried_parts(layer: nn.Module) -> dict:
    """What a packed replacement of ``layer`` keeps, as :func:`packed_linear` keywords: the bias, and for a
    :class:`TransformedLinear` or a :class:`QLinear` the input spec and float outlier columns, for a QLinear
    also its adapters. A float ``nn.Linear`` carries only its bias."""
    bias = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, TransformedLinear):
        outlier = layer.outlier_weight()
        return {"bias": bias, "spec": layer.spec, "outlier": None if outlier is None else outlier.detach()}
    if isinstance(layer, QLinear):
        return {"bias": bias, "spec": layer.spec, "outlier": None if layer.outlier is None else layer.outlier.detach(),
                "adapters": layer._modules.get("adapters")}
    return {"bias": bias}


def packable_weight(layer: nn.Module) -> torch.Tensor:
    """``(out, in - r)`` fp32: the columns of a float layer that a weight quantizer packs (all of them for an
    ``nn.Linear``; the transformed basis without QUAD's outlier columns for a :class:`TransformedLinear`)."""
    w = layer.quantizable_weight() if isinstance(layer, TransformedLinear) else layer.weight
    return w.detach().float()
