"""Export a packed model to compressed-tensors' ``pack-quantized`` layout: the checkpoint format vLLM serves and
transformers loads (with the ``compressed-tensors`` package; lowbit need not be installed).

Every packed Linear on a uniform integer grid is written as the format stores it:

* ``weight_packed`` int32 ``(out, ceil(in·b/32))``: the signed codes ``q - 2^(b-1)`` packed densely across
  int32 words (compressed-tensors' own :func:`pack_to_int32`, so the bit order is the loader's by construction);
* ``weight_scale`` ``(out, groups)`` (``(out, 1)`` per channel, ``(1,)`` per tensor): lowbit's fp16 scales,
  stored in fp16 for an fp16 model and in fp32 otherwise (bf16 would round them);
* ``weight_zero_point`` (asymmetric grids): the integer zero points, signed the same way and packed along the
  output dimension (per tensor: one int8);
* ``weight_shape`` int64 ``[out, in]``.

lowbit's asymmetric grid ``w = s (q - z)`` and symmetric grid ``w = s (q - 2^(b-1))`` are the format's
``w = s (q' - z')`` with ``q' = q - 2^(b-1)``, ``z' = z - 2^(b-1)``: the export holds the same numbers. A grouped
layer whose width is not a multiple of its group size (SmolLM2's 576 columns in groups of 128: four groups of
128 and a short one of 64) is written with groups of ``gcd(group, width)`` (64) and each scale repeated over
the smaller groups it covers — the same weights, since the format needs equal groups. All layers of one bit
width share one layout and one ``config_group`` (:func:`shared_layouts`).

Packed embedding tables have no form in the format: they are written dequantized, in the checkpoint's float
dtype (exact; reported); a head that shares a packed table (lowbit unties it in the config) stays packed.
Weights the format cannot express — LowRA's mixed codebooks, NF/FP grids, QUAD's float outlier columns, online
rotations, activation quantization, attached adapters — are refused, naming the layer, its format and what does
apply; so are MoE experts (transformers fuses them into one tensor per projection, a layout this export does not
write yet).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .errors import LowbitError
from .fileio import staged_folder
from .formats.int import IntFormat
from .models import set_module, storage_dtype
from .nn.experts import ExpertList
from .nn.qembedding import QEmbedding
from .nn.qlinear import QLinear
from .shards import TensorAppender
from .state import state_of

WEIGHTS_FILE = "model.safetensors"
FORMAT = "pack-quantized"


def ct_layout(name: str, layer: QLinear) -> dict:
    """The compressed-tensors weight arguments of one packed Linear (``num_bits``, ``symmetric``, ``strategy``;
    ``group_size``: the largest equal group its grouping splits into, its width per channel or tensor), or a
    :class:`LowbitError` naming what in it the format cannot express."""
    fmt = layer.weight_meta.get("fmt")
    grid = IntFormat.parse(fmt or "")
    if grid is None:
        raise LowbitError(f"{name} is packed as {fmt or layer.weight_meta.get('kind')}, which compressed-tensors "
                          "cannot express (it stores integer grids only): export with --requantize (nearest int "
                          "grid, perplexity change measured), quantize with an int recipe (rtn-w4g128, "
                          "gptq-w4g128), or use --to gguf where that format applies")
    if layer.spec is not None or layer.outlier is not None:
        raise LowbitError(f"{name} rotates or splits its input ({layer.spec.describe() if layer.spec else 'QUAD'})"
                          ", which compressed-tensors' pack-quantized layout cannot express: export the merged "
                          "float model instead (lowbit export --format native)")
    if len(layer._modules.get("adapters") or ()):
        raise LowbitError(f"{name} carries adapters: merge them into the packed weights first (lowbit merge), "
                          "then export the merged checkpoint")
    if layer.channel_scale is not None or layer.group_scale is not None:
        raise LowbitError(f"{name} holds trained scale multipliers not yet folded in: save and reload the model "
                          "(a checkpoint stores them folded into the scales), then export")
    in_f = layer.qweight.in_features
    natural = math.gcd(layer.group_size, in_f) if layer.granularity == "group" else in_f
    return {"num_bits": grid.bits, "symmetric": grid.symmetric, "strategy": layer.granularity,
            "group_size": natural, "type": "int", "dynamic": False}


@torch.no_grad()
def requantize_to_int(model: nn.Module) -> dict[str, float]:
    """In place: every packed Linear whose grid compressed-tensors cannot store (NF, FP, IQ4_NL, LowRA's mixed
    codebooks) is rounded again into the nearest integer grid — asymmetric int of its bits (LowRA: its bits per
    weight, rounded, 2-8) in its own grouping (LowRA: groups of 64), round-to-nearest on the dequantized weight.
    Returns each such layer's added relative weight error ``‖Q(Ŵ) − Ŵ‖_F / ‖Ŵ‖_F``."""
    from .nn.qlinear import carried_parts, packed_linear
    from .quantizers.rtn import rtn_quantize

    errors = {}
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]:
        if IntFormat.parse(layer.weight_meta.get("fmt") or "") is not None:
            continue
        if layer.spec is not None or layer.outlier is not None or len(layer._modules.get("adapters") or ()):
            ct_layout(name, layer)  # raises the refusal that names the fix
        w = layer.merged_weight()
        meta = layer.weight_meta
        if meta.get("granularity") in ("tensor", "channel", "group"):
            bits, granularity, group = layer.qweight.bits, meta["granularity"], int(meta["group_size"])
        else:
            bits, granularity, group = min(8, max(2, round(layer.qweight.bits_per_weight))), "group", 64
        q = rtn_quantize(w, IntFormat(bits), granularity, group)
        errors[name] = float((q.dequantize() - w).norm() / w.norm().clamp_min(1e-12))
        set_module(model, name, packed_linear(q, **carried_parts(layer), role=layer.role))
    return errors


def shared_layouts(layouts: dict[str, dict]) -> dict[str, dict]:
    """One layout per bit width: asymmetric if any layer of that width is (a symmetric grid is the asymmetric one
    with its zero point in the middle), one strategy — a mix becomes groups — and one group size, the gcd of
    theirs (each scale is repeated over the smaller groups it covers). The weights stay the same; transformers
    (5.23 with compressed-tensors 0.20.1) decodes every dense layer with the first config group's arguments
    when it dequantizes at load, so one group keeps that path right."""
    shared: dict[int, dict] = {}
    for layout in layouts.values():
        bits = layout["num_bits"]
        if bits not in shared:
            shared[bits] = dict(layout)
            continue
        s = shared[bits]
        s["symmetric"] = s["symmetric"] and layout["symmetric"]
        s["group_size"] = math.gcd(s["group_size"], layout["group_size"])
        if s["strategy"] != layout["strategy"]:
            s["strategy"] = "group"
    for s in shared.values():
        if s["strategy"] != "group":
            s["group_size"] = None
    return {n: shared[layout["num_bits"]] for n, layout in layouts.items()}


def ct_tensors(layer: QLinear, layout: dict, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for one packed Linear in ``layout`` (from :func:`shared_layouts`),
    its scales in ``scale_dtype`` (the loader dequantizes in the scales' dtype: fp16 scales of an fp32 model
    would round every weight to fp16)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    qw = layer.qweight
    (out_f, in_f), strategy = qw.shape, layout["strategy"]
    bits, offset = layout["num_bits"], 1 << (layout["num_bits"] - 1)
    codes = (qw.unpacked_codes().to(torch.int16) - offset).to(torch.int8)
    out = {"weight_packed": pack_to_int32(codes, bits), "weight_shape": torch.tensor(qw.shape, dtype=torch.int64)}
    zeros = torch.full_like(qw.scales, offset, dtype=torch.uint8) if qw.zeros is None else qw.zeros
    zeros = (zeros.to(torch.int16) - offset).to(torch.int8)  # a symmetric layer's zero point: 0

    def spread(t: torch.Tensor) -> torch.Tensor:  # lowbit's (rows, groups) -> the layout's
        if strategy == "tensor":
            return t.reshape(1)
        t = t.expand(out_f, -1)
        if strategy == "channel":
            return t.contiguous()
        repeat = qw.group_size // layout["group_size"]
        return t.repeat_interleave(repeat, dim=1)[:, :in_f // layout["group_size"]].contiguous()

    out["weight_scale"] = spread(qw.scales).to(scale_dtype)
    if not layout["symmetric"]:
        zeros = spread(zeros)
        out["weight_zero_point"] = zeros if strategy == "tensor" else pack_to_int32(zeros, bits, packed_dim=0)
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    return out


def quantization_config(groups: dict[tuple, list[str]], ignore: list[str]) -> dict:
    """``config.json``'s ``quantization_config``: one ``config_group`` per distinct weight layout, targeting its
    layers by name; built and serialized by compressed-tensors' own config classes."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    schemes = {f"group_{i}": QuantizationScheme(targets=names, weights=QuantizationArgs(**dict(layout)),
                                                format=FORMAT)
               for i, (layout, names) in enumerate(groups.items())}
    config = QuantizationConfig(config_groups=schemes, ignore=ignore, format=FORMAT, quantization_status="compressed")
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **config.model_dump(exclude=["quant_method"])}


def export_compressed_tensors(model: nn.Module, path: str | Path, tokenizer=None, force: bool = False) -> dict:
    """Write ``model`` (a packed lowbit model) to the folder ``path`` in compressed-tensors' ``pack-quantized``
    layout (see the module docstring); atomic. Returns ``{"packed_layers", "config_groups", "dequantized"}``
    (the packed tables written as float)."""
    packed = {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}
    if not packed:
        raise LowbitError("the model holds no packed layer: quantize it first (lowbit quantize), then export")
    experts = next((n for n, m in model.named_modules() if isinstance(m, ExpertList)), None)
    if experts is not None:
        raise LowbitError(f"{experts} holds MoE experts, which the compressed-tensors export does not write yet "
                          "(transformers fuses them into one tensor per projection): export the merged float "
                          "model instead (lowbit export --format native)")
    layouts = shared_layouts({n: ct_layout(n, m) for n, m in packed.items()})
    dtype = storage_dtype(model) or torch.float32
    scale_dtype = torch.float16 if dtype == torch.float16 else torch.float32  # lowbit's fp16 scales, exactly
    dequantized = [n for n, m in model.named_modules() if isinstance(m, QEmbedding)]
    groups: dict[tuple, list[str]] = {}
    for n, layout in layouts.items():
        groups.setdefault(tuple(sorted(layout.items())), []).append(n)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layouts]

    with staged_folder(Path(path), force) as tmp:
        writer = TensorAppender(tmp / WEIGHTS_FILE, {"format": "pt"})
        skip = set()
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            if name in layouts:
                for key, t in ct_tensors(module, layouts[name], scale_dtype).items():
                    writer.append(prefix + key, t)
            elif isinstance(module, QEmbedding):
                writer.append(prefix + "weight", module.weight.to(dtype))
            else:
                continue
            skip.update(prefix + k for k, _ in module.named_parameters(recurse=True))
            skip.update(prefix + k for k, _ in module.named_buffers(recurse=True))
            skip.add(prefix + "weight")
        for key, t in model.state_dict().items():
            if key not in skip:
                writer.append(key, t.to(dtype) if t.is_floating_point() else t)
        writer.close()
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.dtype = dtype
        config.quantization_config = quantization_config(groups, ignore)
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return {"packed_layers": len(layouts), "config_groups": len(groups), "dequantized": dequantized,
            "source": state_of(model).source}
