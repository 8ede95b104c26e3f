"""Bits and bytes of a quantized model, per layer and in total (what manifests and reports print)."""

from __future__ import annotations

from torch import nn

from .nn.packed import PackedModule
from .nn.qembedding import QEmbedding
from .nn.qlinear import QLinear


def quantized_layers(model: nn.Module) -> dict[str, QLinear]:
    """The Linear layers a quantizer replaced (bits/weight figures are over these)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear) and m.role == "linear"}


def packed_embeddings(model: nn.Module) -> dict[str, PackedModule]:
    """What the ``embeddings`` step packed: the input table and the output head (which may share its buffers)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QEmbedding) or (isinstance(m, QLinear) and m.role == "head")}


def layer_entry(layer: PackedModule) -> dict:
    """Manifest entry of one packed module: storage layout plus its effective bits per weight and bytes."""
    qw = layer.qweight
    entry = {**qw.meta(), "bias": getattr(layer, "bias", None) is not None, "bits": qw.bits,
             "bits_per_weight": round(qw.bits_per_weight, 6), "nbytes": qw.nbytes}
    if isinstance(layer, QEmbedding):
        entry.update(role="embedding", padding_idx=layer.padding_idx)
        if layer.scale != 1.0:
            entry["scale"] = layer.scale
    elif layer.role != "linear":
        entry["role"] = layer.role
    if getattr(layer, "spec", None) is not None:
        entry["spec"] = layer.spec.to_dict()
    return entry


def float_expert_weights(model: nn.Module) -> dict[str, int]:
    """Fused mixture-of-experts tensors still in float (transformers' 3-D ``experts.*`` parameters, one slice per
    expert): ``{name: weights}``. No weight quantizer packs them yet, so they are reported, never silently kept."""
    return {n: p.numel() for n, p in model.named_parameters() if p.dim() == 3}


def bits_summary(model: nn.Module) -> dict:
    """Totals over the quantized layers: weights, packed bytes, effective bits/weight (packed weights and QUAD's
    outlier columns; ``bits_per_weight_with_adapters`` adds the attached adapters' bytes), code bits/weight; and
    the packed embedding table's bytes (counted once when the head shares it)."""
    layers = quantized_layers(model)
    weights = sum(m.in_features * m.out_features for m in layers.values())
    packed = sum(m.qweight.nbytes for m in layers.values())
    outliers = sum(m.outlier.numel() * 2 for m in layers.values()
                   if getattr(m, "outlier", None) is not None)  # QUAD's float columns, stored in fp16
    adapter_bytes = sum(t.numel() * t.element_size() for m in layers.values()  # stored as they are (int codes
                        for t in (m._modules.get("adapters") or nn.ModuleDict()).state_dict().values())  # + scales)
    code_bits = sum(m.qweight.code_bits for m in layers.values())
    float_params = sum(p.numel() for p in model.parameters())  # quantized weights are buffers, not parameters
    tables = {m.codes.data_ptr(): m.qweight for m in packed_embeddings(model).values()}
    table_bytes = sum(q.nbytes for q in tables.values())
    return {
        "quantized_layers": len(layers),
        "quantized_weights": weights,
        "packed_bytes": packed,
        "outlier_bytes": outliers,
        "bits_per_weight": (packed + outliers) * 8 / weights if weights else None,
        "adapter_bytes": adapter_bytes,  # low-rank adapters (LoRA, LoRMA, RILQ, LoftQ) beside the packed weights
        "bits_per_weight_with_adapters": (packed + outliers + adapter_bytes) * 8 / weights if weights else None,
        "code_bits": code_bits / weights if weights else None,
        "float_params": float_params,
        "float_expert_weights": sum(float_expert_weights(model).values()),  # counted in float_params too
        "embedding_bytes": table_bytes,
        "embedding_bits_per_weight": table_bytes * 8 / sum(q.numel for q in tables.values()) if tables else None,
    }
