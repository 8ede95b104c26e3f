"""Bits and bytes of a quantized model, per layer and in total (what manifests and reports print)."""

from __future__ import annotations

from torch import nn

from .nn.qlinear import QLinear


def quantized_layers(model: nn.Module) -> dict[str, QLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear)}


def layer_entry(layer: QLinear) -> dict:
    """Manifest entry of one layer: storage layout plus its effective bits per weight and bytes."""
    qw = layer.qweight
    return {**qw.meta(), "bias": layer.bias is not None, "bits": qw.bits,
            "bits_per_weight": round(qw.bits_per_weight, 6), "nbytes": qw.nbytes}


def bits_summary(model: nn.Module) -> dict:
    """Totals over the quantized layers: weights, packed bytes, effective bits/weight, code bits/weight."""
    layers = quantized_layers(model)
    weights = sum(m.in_features * m.out_features for m in layers.values())
    packed = sum(m.qweight.nbytes for m in layers.values())
    code_bits = sum(m.qweight.code_bits for m in layers.values())
    float_params = sum(p.numel() for p in model.parameters())  # quantized weights are buffers, not parameters
    return {
        "quantized_layers": len(layers),
        "quantized_weights": weights,
        "packed_bytes": packed,
        "bits_per_weight": packed * 8 / weights if weights else None,
        "code_bits": code_bits / weights if weights else None,
        "float_params": float_params,
    }
