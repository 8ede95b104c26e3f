"""Low-rank adapters on packed layers: attach by name patterns, train, freeze, remove, merge.

    from lowbit.adapters import LoRAConfig, attach
    attach(model, LoRAConfig(rank=16))          # every decoder QLinear gets model.layers.*.adapters["default"]
    ...train only lowbit.adapters.parameters(model)...

Adapters live in ``QLinear.adapters`` (an ``nn.ModuleDict`` keyed by adapter name), so ``state_dict``,
:func:`lowbit.save` and :func:`lowbit.load` carry them; the manifest records each name's config and layers.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import StepConfig
from ..errors import LowbitError
from ..models import DECODER, select_layers
from ..nn.qlinear import QLinear
from ..registry import get
from . import lora, lorma  # noqa: F401  (registers the adapters)
from .base import Adapter, AdapterConfig
from .lora import LoRA, LoRAConfig
from .lorma import LoRMA, LoRMAConfig

log = logging.getLogger(__name__)

__all__ = ["Adapter", "AdapterConfig", "LoRA", "LoRAConfig", "LoRMA", "LoRMAConfig", "attach", "remove", "freeze",
           "parameters", "adapted_layers", "find_qlinears", "config_from_dict", "manifest_entry",
           "attach_from_manifest", "train_outliers", "store_adapter", "store_adapters", "adapter_dtype",
           "check_storage"]


def config_from_dict(data: dict) -> AdapterConfig:
    """An adapter config from its ``to_dict`` output (``{"step": "lora", ...}``)."""
    return StepConfig.from_dict(data, kind="adapter")


def find_qlinears(model: nn.Module, targets=(DECODER,), ignore=()) -> list[tuple[str, QLinear]]:
    """Quantized layers (``role == "linear"``) selected by :func:`lowbit.models.select_layers`."""
    if not any(isinstance(m, QLinear) and m.role == "linear" for m in model.modules()):
        raise LowbitError("the model has no quantized layers to adapt: quantize it first (lowbit quantize) or load "
                          "a lowbit checkpoint")
    return select_layers(model, targets, ignore, (QLinear,), lambda m: m.role == "linear", what="quantized layer")


def attach(model: nn.Module, config: AdapterConfig, name: str = "default") -> list[str]:
    """Give every target layer a new adapter ``name`` built from ``config``; returns the layer names.

    All checks (targets, rank vs width, one multiplicative adapter per side, unused name) run before any layer
    changes. The base stays frozen; the new adapter parameters train."""
    cls = get("adapter", config.step)
    if not name.isidentifier():
        raise LowbitError(f"adapter name {name!r} must be a Python identifier (letters, digits, underscores)")
    layers = find_qlinears(model, config.targets, config.ignore)
    built = []
    for layer_name, layer in layers:
        existing = layer.adapters if "adapters" in layer._modules else {}
        if name in existing:
            raise LowbitError(f"layer {layer_name!r} already has an adapter named {name!r}; pick another name or "
                              "remove it first")
        adapter = cls(config, layer.in_features, layer.out_features)
        if adapter.place != "add" and any(a.place == adapter.place for a in existing.values()):
            raise LowbitError(f"layer {layer_name!r} already has a multiplicative adapter on its {adapter.place} "
                              "side; one per side is supported")
        built.append((layer, adapter))
    device = next((b for b in model.buffers()), torch.empty(0)).device
    for layer, adapter in built:
        if "adapters" not in layer._modules:
            layer.adapters = nn.ModuleDict()
        layer.adapters[name] = adapter.to(device)
    log.info("attached %s adapter %r to %d layers", config.step, name, len(built))
    return [n for n, _ in layers]


def adapted_layers(model: nn.Module) -> dict[str, QLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QLinear) and len(m._modules.get("adapters") or ())}


def remove(model: nn.Module, name: str | None = None) -> int:
    """Drop adapter ``name`` (every adapter when None) from every layer; returns how many were removed."""
    count = 0
    for layer in adapted_layers(model).values():
        for key in [k for k in layer.adapters if name is None or k == name]:
            del layer.adapters[key]
            count += 1
        if not len(layer.adapters):
            del layer.adapters
    if name is not None and not count:
        raise LowbitError(f"no adapter named {name!r} in the model")
    return count


def parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` (every adapter when None), in a stable order."""
    return [p for layer in adapted_layers(model).values() for key, a in layer.adapters.items()
            if name is None or key == name for p in a.parameters()]


def freeze(model: nn.Module, trainable: str | None = None) -> list[nn.Parameter]:
    """Make only adapter ``trainable`` (every adapter when None) require gradients, in fp32 (adapters stored in
    bf16, int8 or int4 train from an fp32 copy of their values: :func:`store_adapters` rounds them back); returns
    those parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapted_layers(model).values():  # LoRA stored as codes trains from float values again
        for key, a in layer.adapters.items():
            if (trainable is None or key == trainable) and isinstance(a, LoRA):
                a.unpack()
    params = parameters(model, trainable)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


FLOAT_STORAGE = {"bfloat16": torch.bfloat16, "float32": torch.float32}
CODE_STORAGE = {"int8": 8, "int4": 4}  # LoRA only: integer codes, :meth:`LoRA.store_codes`
ADAPTER_DTYPES = (*FLOAT_STORAGE, *CODE_STORAGE)


def adapter_dtype(name: str) -> str:
    """``name`` if it is an ``adapter_dtype`` setting (``bfloat16`` | ``float32`` | ``int8`` | ``int4``), else a
    one-line error."""
    if name not in ADAPTER_DTYPES:
        raise LowbitError(f"adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {name!r}")
    return name


def check_storage(kind: str, dtype: str) -> None:
    """A one-line error unless an adapter of ``kind`` (``lora`` | ``lorma``) can be stored as ``dtype``: integer
    codes (int8, int4) store LoRA only."""
    if adapter_dtype(dtype) in CODE_STORAGE and kind != "lora":
        raise LowbitError(f"adapter_dtype {dtype} stores LoRA adapters; {kind} keeps bfloat16 or float32")


def stored_codes(adapter: Adapter) -> str | None:
    """``int8`` or ``int4`` for a LoRA stored as integer codes, None for float values."""
    bits = adapter.code_bits if isinstance(adapter, LoRA) else None
    return None if bits is None else f"int{bits}"


def store_adapter(adapter: Adapter, dtype: str = "bfloat16") -> None:
    """Store one adapter as a checkpoint holds it, in place: float parameters rounded to ``dtype`` and frozen;
    ``int8`` / ``int4`` (LoRA only): integer codes with a scale per rank component (:meth:`LoRA.store_codes`). An
    adapter already stored as codes stays as it is (rounding it again would only lose)."""
    check_storage(adapter.kind, dtype)
    if stored_codes(adapter) is not None:
        return
    if dtype in CODE_STORAGE:
        adapter.store_codes(CODE_STORAGE[dtype])
        return
    for p in adapter.parameters():
        p.requires_grad_(False)
        p.data = p.data.to(FLOAT_STORAGE[dtype])


def store_adapters(model: nn.Module, dtype: str = "bfloat16") -> int:
    """Store every adapter of ``model`` in ``dtype`` (:func:`store_adapter`; ``bfloat16``: half the bytes of
    fp32, so +0.74 bits/weight instead of +1.47 at rank 16 on SmolLM2; ``int8``: a quarter, +0.37; ``int4``: an
    eighth, +0.19), in place: the model in memory is then exactly what a checkpoint stores. The forward runs in the
    adapters' dtype (codes: dequantized to fp32); merges are computed in fp32. Checks every adapter before changing
    any. Returns the number of adapter weights (factor entries, not bytes: int4 packs two in one)."""
    adapters = [a for layer in adapted_layers(model).values() for a in layer.adapters.values()]
    for a in adapters:
        check_storage(a.kind, dtype)
    for a in adapters:
        store_adapter(a, dtype)
    return sum(t.numel() for a in adapters for t in a.float_tensors().values())


def has_row_scales(layer: QLinear) -> bool:
    """Whether the layer's packed weight has one scale row per output channel (uniform channel- or group-wise
    weights, LowRA's block absmax), so a per-channel or per-group multiplier folds into it exactly."""
    return layer.qweight.scale_layout is not None


def _train_multipliers(layers: list[QLinear], attr: str, kind: str, shape) -> int:
    """Make ``layer.<attr>`` (initialised to ones of ``shape(layer)``, or kept if already there) of each layer
    trainable; layers without row-wise scales (:func:`has_row_scales`) are an error. Returns the count."""
    for m in layers:
        if not has_row_scales(m):
            raise LowbitError(f"{m.layout()} weights have no {kind} scales to train (per-tensor scales); use "
                              "channel- or group-wise weights")
        if getattr(m, attr) is None:
            device = m.qweight.tensors()[m.qweight.scale_layout[0]].device
            setattr(m, attr, nn.Parameter(torch.ones(shape(m), device=device)))
        getattr(m, attr).requires_grad_(True)
    return sum(getattr(m, attr).numel() for m in layers)


def train_channel_scales(layers: list[QLinear]) -> int:
    """Make a per-output-channel scale ``(out,)`` (initialised to 1, or kept if already there) of each layer
    trainable: ``y = c ⊙ Q(W) x``, the gradient of ``c`` costs one product with the output, no weight gradient.
    Layers whose weight has no row-wise scales (:func:`has_row_scales`) are an error. Returns the count."""
    return _train_multipliers(layers, "channel_scale", "per-channel", lambda m: m.out_features)


def train_group_scales(layers: list[QLinear]) -> int:
    """Make a multiplier ``(out, groups)`` of every quantization group's scale (initialised to 1, or kept) of
    each layer trainable: ``W = g ⊙ Q(W)``, i.e. the packed scales themselves train (gradient: group sums of
    ``dW ⊙ Q(W)``, one more GEMM per layer in the backward). A checkpoint stores them folded into the fp16
    scales, so they add no bits. Layers without row-wise scales (:func:`has_row_scales`) are an error. Returns
    the count of trainable multipliers."""
    return _train_multipliers(layers, "group_scale", "group", lambda m: (m.out_features, m.qweight.scale_groups))


def train_outliers(model: nn.Module, scales: bool = True) -> int:
    """QUAD's PEFT (methods.md §7.4): make the float outlier columns ``(out, r)`` of every QLinear trainable and,
    with ``scales``, the per-output-channel scales (:func:`train_channel_scales`) of every W4A4 layer with
    row-wise scales; on top of whatever already trains (adapters attached and frozen with :func:`freeze` keep
    training). Returns the number of trainable weights added. The outliers train in fp32 (stored in fp16 before
    and after); a checkpoint folds the channel scales into the packed scales."""
    layers = [m for m in model.modules() if isinstance(m, QLinear) and m.outlier is not None]
    if not layers:
        raise LowbitError("the model has no full-precision outlier columns to train: quantize it with a QUAD "
                          "recipe first (e.g. quad-w4a4a8)")
    for m in layers:
        m.outlier = nn.Parameter(m.outlier.detach().float(), requires_grad=True)
    added = sum(m.outlier.numel() for m in layers)
    if scales:
        added += train_channel_scales([m for m in model.modules() if isinstance(m, QLinear) and m.spec is not None
                                       and has_row_scales(m)])
    return added


def manifest_entry(model: nn.Module) -> dict:
    """``{adapter name: {"config": ..., "layers": [...]}}`` for the checkpoint manifest, plus ``"storage": "int8"``
    or ``"int4"`` for LoRA stored as integer codes (:meth:`LoRA.store_codes`), which the loaders' skeletons must
    hold."""
    out: dict[str, dict] = {}
    for layer_name, layer in adapted_layers(model).items():
        for key, adapter in layer.adapters.items():
            entry = out.setdefault(key, {"config": adapter.config.to_dict(), "layers": []})
            entry["layers"].append(layer_name)
            codes = stored_codes(adapter)
            if len(entry["layers"]) == 1 and codes:
                entry["storage"] = codes
            elif codes != entry.get("storage"):
                raise LowbitError(f"adapter {key!r} is stored as {codes or 'float'} on some layers and as "
                                  f"{entry.get('storage', 'float')} on others; store them alike "
                                  "(lowbit.adapters.store_adapters) before saving")
    return out


def attach_from_manifest(model: nn.Module, adapters: dict) -> None:
    """Rebuild the adapters a manifest lists (uninitialised values; ``load_state_dict`` fills them), integer-coded
    ones with their codes and scales."""
    for key, entry in adapters.items():
        config = config_from_dict(entry["config"])
        storage = entry.get("storage", "float")
        if storage != "float" and storage not in CODE_STORAGE:
            raise LowbitError(f"adapter {key!r} has storage {storage!r}; this lowbit reads float, "
                              f"{' and '.join(CODE_STORAGE)}")
        for layer_name in entry["layers"]:
            layer = model.get_submodule(layer_name)
            if "adapters" not in layer._modules:
                layer.adapters = nn.ModuleDict()
            adapter = get("adapter", config.step)(config, layer.in_features, layer.out_features)
            if storage != "float":
                store_adapter(adapter, storage)
            layer.adapters[key] = adapter
