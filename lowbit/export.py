"""Merge adapters into a float model, requantize it, or export LoRA adapters in PEFT's layout (methods.md §8.5).

* :func:`merged_float_model`: every packed layer becomes an ``nn.Linear`` holding its *effective* weight
  ``T_out (Q(W) + sum dW) T_in`` (adapters merged into the dequantized base, never into the original float
  weights: that would re-introduce the quantization error the adapters learned to cancel); packed embeddings
  become ``nn.Embedding``. The result is a plain transformers model.
* :func:`requantize`: the merged weights quantized again with each layer's own grid (uniform layers), with the
  error this adds reported per layer.
* :func:`export_peft`: LoRA adapters as ``adapter_config.json`` + ``adapter_model.safetensors`` written by
  ``peft`` itself, plus the dequantized base (``base/``) they apply to, so ``PeftModel.from_pretrained`` on that
  base reproduces lowbit's logits. LoRMA has no PEFT form: :func:`export_native` writes its factors per layer
  plus the merged float model.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from .adapters import LoRA, adapted_layers, manifest_entry
from .architectures import expert_layer_names, fuse_experts
from .errors import LowbitError
from .fileio import staged_folder
from .models import set_module
from .nn.qembedding import QEmbedding, ScaledEmbedding
from .nn.qlinear import QLinear, carried_parts, packed_linear
from .state import state_of

log = logging.getLogger(__name__)


def _float_config(model: nn.Module):
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


@torch.no_grad()
def float_modules_(model: nn.Module, dtype: torch.dtype = torch.float32, merge_adapters: bool = True) -> nn.Module:
    """In place: every QLinear becomes an ``nn.Linear`` holding its effective weight (adapters merged, or just the
    dequantized base with ``merge_adapters=False``), every QEmbedding an ``nn.Embedding``; a head that shared the
    packed table is tied to the float table again. Tensors stay on the device the packed buffers were on."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = isinstance(embed, QEmbedding) and isinstance(head, QLinear) and head.codes is embed.codes \
        and not len(head._modules.get("adapters") or ())
    for name, module in list(model.named_modules()):
        if isinstance(module, QLinear):
            device = getattr(module, module.packed_names[0]).device
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype,
                               device=device)
            linear.weight.copy_(module.merged_weight(dtype, adapters=merge_adapters))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            set_module(model, name, linear)
        elif isinstance(module, QEmbedding):
            scaled = {"embed_scale": module.scale} if module.scale != 1.0 else {}
            table = (ScaledEmbedding if scaled else nn.Embedding)(
                module.num_embeddings, module.embedding_dim, module.padding_idx, dtype=dtype,
                device=module.codes.device, **scaled)
            table.weight.copy_(module.qweight.dequantize(dtype))
            set_module(model, name, table)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    fuse_experts(model)
    return model


def merged_float_model(model: nn.Module, dtype: torch.dtype = torch.float32, merge_adapters: bool = True
                       ) -> nn.Module:
    """A float copy of ``model`` with adapters merged (see the module docstring; ``merge_adapters=False``: the
    dequantized base alone); ``model`` is not changed. A head that shares the packed embedding table becomes tied
    float embeddings again."""
    out = float_modules_(copy.deepcopy(model), dtype, merge_adapters)
    out.config = _float_config(out)
    if out.get_output_embeddings().weight is out.get_input_embeddings().weight:
        out.config.tie_word_embeddings = True
    state_of(out).recipe = state_of(out).manifest = None  # a float model: no recipe, no checkpoint
    return out.requires_grad_(False).eval()


def save_float(model: nn.Module, path: str | Path, tokenizer=None, force: bool = False) -> Path:
    """``save_pretrained`` into ``path`` atomically (temp folder, then rename); loadable by transformers alone."""
    path = Path(path)
    with staged_folder(path, force) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


@torch.no_grad()
def requantize(model: nn.Module) -> tuple[nn.Module, dict[str, float]]:
    """A packed copy of ``model`` whose adapted layers hold their merged weights, quantized again with each
    layer's own format, granularity and group size (round-to-nearest, min/max scales); adapters removed.

    Returns the model and, per adapted layer, the relative weight error requantization added,
    ``‖Q(W_eff) − W_eff‖_F / ‖W_eff‖_F``."""
    from .formats import format_from_name
    from .quantizers.rtn import rtn_quantize

    out = copy.deepcopy(model)
    errors = {}
    for name, layer in adapted_layers(out).items():
        if layer.qweight.kind != "uniform":
            raise LowbitError(f"layer {name!r} is stored as {layer.qweight.kind} (e.g. LowRA): requantizing it is not "
                              "supported; merge to float instead (lowbit merge without --requantize)")
        if layer.spec is not None:  # its merged weight folds the online Hadamard in: no packed form keeps the spec
            raise LowbitError(f"layer {name!r} has an input transform ({layer.spec.describe()}): requantizing a "
                              "rotated or W4A4 layer is not supported; merge to float instead (lowbit merge "
                              "without --requantize)")
        w = layer.merged_weight()
        meta = layer.weight_meta
        q = rtn_quantize(w, format_from_name(meta["fmt"]), meta["granularity"], int(meta["group_size"]))
        errors[name] = float((q.dequantize() - w).norm() / w.norm().clamp_min(1e-12))
        set_module(out, name, packed_linear(q, **{**carried_parts(layer), "adapters": None}, role=layer.role))
    return out, errors


def lora_layers(model: nn.Module) -> dict[str, LoRA]:
    """``{layer name: LoRA}`` for the single LoRA adapter the PEFT export needs (error if none or several)."""
    found: dict[str, dict[str, nn.Module]] = {}
    for name, layer in adapted_layers(model).items():
        for key, a in layer.adapters.items():
            found.setdefault(key, {})[name] = a
    if not found:
        raise LowbitError("the model has no adapters to export; fine-tune one first (lowbit finetune)")
    if len(found) > 1:
        raise LowbitError(f"the model has several adapters ({', '.join(found)}); PEFT export takes one: remove the "
                          "others first")
    (key, layers), = found.items()
    kinds = {a.kind for a in layers.values()}
    if kinds != {"lora"}:
        raise LowbitError(f"adapter {key!r} is {', '.join(sorted(kinds))}: only LoRA has a PEFT layout; export "
                          "LoRMA with --format native (its factors plus a merged float model)")
    return layers


@torch.no_grad()
def export_peft(model: nn.Module, path: str | Path, tokenizer=None, force: bool = False) -> Path:
    """Write ``path/`` = PEFT adapter files (by ``peft``) + ``path/base/`` (the dequantized base they apply to).

    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path/"base"), path)`` then computes what
    lowbit computes, up to fp32 rounding."""
    from peft import LoraConfig, get_peft_model

    layers = lora_layers(model)
    configs = {a.config for a in layers.values()}
    if len(configs) > 1:
        raise LowbitError("the LoRA layers have different configs; PEFT export needs one config")
    (config,) = configs
    experts = expert_layer_names(model, layers)
    if experts:
        raise LowbitError(f"{experts[0]} is an MoE expert: PEFT's LoRA layers cannot sit on the fused expert tensors "
                          "transformers loads the base with; export with --format native (factors + merged model) "
                          "or lowbit merge")
    base = merged_float_model(model, merge_adapters=False)
    path = Path(path)
    with staged_folder(path, force) as tmp:
        base.save_pretrained(tmp / "base")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "base")
        peft_config = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                                 use_rslora=config.rslora, target_modules=sorted(layers), bias="none",
                                 task_type="CAUSAL_LM", base_model_name_or_path=str(path / "base"))
        peft_model = get_peft_model(base, peft_config)
        for name, adapter in layers.items():
            target = peft_model.base_model.model.get_submodule(name)
            A, B = adapter.factors()  # integer-coded factors dequantized
            target.lora_A["default"].weight.copy_(A)
            target.lora_B["default"].weight.copy_(B)
        peft_model.save_pretrained(tmp)
        # PEFT records the temp folder it saw; point it at the final base folder.
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str((path / "base").resolve())
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


@torch.no_grad()
def export_native(model: nn.Module, path: str | Path, tokenizer=None, force: bool = False) -> Path:
    """Any adapters (LoRMA included) as ``adapters.safetensors`` (``{layer}.{adapter}.{A|B}``) + ``adapters.json``
    (per adapter name: kind, config, layers; LoRMA's mode/variant/alpha/rank are in its config), plus
    ``merged/``, the float model with every adapter merged."""
    from safetensors.torch import save_file

    layers = adapted_layers(model)
    if not layers:
        raise LowbitError("the model has no adapters to export; fine-tune one first (lowbit finetune)")
    tensors = {f"{name}.{key}.{p}": t.detach().contiguous().cpu()
               for name, layer in layers.items() for key, a in layer.adapters.items()
               for p, t in a.float_tensors().items()}  # integer-coded LoRA dequantized
    merged = merged_float_model(model)
    path = Path(path)
    with staged_folder(path, force) as tmp:
        save_file(tensors, tmp / "adapters.safetensors")
        (tmp / "adapters.json").write_text(json.dumps(manifest_entry(model), indent=1))
        merged.save_pretrained(tmp / "merged")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "merged")
    return path
