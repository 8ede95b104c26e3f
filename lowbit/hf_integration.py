"""Hugging Face integration: ``AutoModelForCausalLM.from_pretrained(DIR)`` loads a lowbit checkpoint.

``import lowbit`` registers :class:`LowbitConfig` and :class:`LowbitHfQuantizer` under ``quant_method="lowbit"``
(the value :func:`lowbit.save` writes into ``config.json``). transformers then builds the model on the meta
device and calls :meth:`LowbitHfQuantizer.preprocess_model` with the resolved ``checkpoint_files``; the quantizer
reads ``lowbit.json`` next to them and swaps every layer the manifest lists for a :class:`~lowbit.QLinear`
skeleton of the stored layout, and builds the adapters the manifest lists (LoRA, LoRMA: a fine-tune's, RILQ's,
LoftQ's). transformers' own loader then fills ``codes`` / ``scales`` / ``zeros`` as stored:
uint8 codes and fp16 scales are never cast (only float tensors such as norms, embeddings and biases follow the
``dtype`` passed to ``from_pretrained``), nothing is requantized, and tied embeddings are tied by transformers.

The checkpoint is checked exactly as :func:`lowbit.load` checks it (:func:`lowbit.io.verify_files`: manifest
checksum, file list, sizes, SHA-256 unless ``LOWBIT_VERIFY=sizes``, shard headers against the index) before any
tensor is read. What differs: no tokenizer is returned (use ``AutoTokenizer``). ``model.save_pretrained`` is
refused (the manifest would be lost): save with :func:`lowbit.save`. ``model.dequantize()`` turns the model back
into float ``nn.Linear`` layers.

If the installed transformers lacks the quantizer registry, ``import lowbit`` still works and logs why at debug
level; :func:`lowbit.load` is the path that always works.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .adapters import attach_from_manifest
from .architectures import architecture, unfuse_experts
from .errors import CheckpointError
from .io import crafted_entries, packed_module
from .manifest import FORMAT_VERSION, MANIFEST, hashes_by_default, manifest_recipe, read_manifest, verify_files
from .models import set_module
from .nn.gemv_linear import use_gemv_head
from .nn.qlinear import QLinear
from .state import state_of

log = logging.getLogger(__name__)

QUANT_METHOD = "lowbit"
REGISTERED = False

try:
    from transformers.quantizers.auto import register_quantization_config, register_quantizer
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin
except (ImportError, AttributeError) as _e:  # transformers missing or without a quantizer registry
    log.debug("lowbit: transformers quantizer registry unavailable (%s); AutoModelForCausalLM.from_pretrained "
              "will not load lowbit checkpoints, use lowbit.load", _e)
else:

    class LowbitConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a lowbit checkpoint (``config.json``): format version and recipe.

        Built by transformers from ``config.json``; it is not a way to quantize a float model on load
        (use :func:`lowbit.quantize`). Unknown keys are kept, so newer writers can add fields.
        """

        def __init__(self, format_version: int = FORMAT_VERSION, recipe: dict | None = None, **kwargs):
            kwargs.pop("quant_method", None)
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.recipe = recipe
            for key, value in kwargs.items():
                setattr(self, key, value)
            self.post_init()

        def post_init(self):
            if self.format_version != FORMAT_VERSION:
                raise CheckpointError(f"quantization_config has lowbit format_version {self.format_version!r}; "
                                      f"this lowbit reads version {FORMAT_VERSION}. Upgrade lowbit or re-create "
                                      "the checkpoint.")

    class LowbitHfQuantizer(HfQuantizer):
        """Loads lowbit checkpoints through ``from_pretrained``: QLinear skeletons in, packed tensors as stored."""

        requires_calibration = True  # only pre-quantized checkpoints; quantize with lowbit.quantize

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.folder: Path | None = None
            self.manifest: dict | None = None
            self.packed_names: set[str] = set()
            self.recipe = None

        def validate_environment(self, *args, **kwargs):
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and "disk" in device_map.values():
                raise ValueError("lowbit checkpoints cannot be offloaded to disk; use a device_map without "
                                 "'disk' (the packed weights are small enough to keep in memory)")

        def _find_folder(self, model, checkpoint_files) -> Path:
            candidates = []
            if checkpoint_files:
                candidates.append(Path(checkpoint_files[0]).parent)
            name = getattr(model.config, "name_or_path", None)
            if name and os.path.isdir(name):
                candidates.append(Path(name))
            for folder in candidates:
                if (folder / MANIFEST).is_file():
                    return folder
            if name and not os.path.isdir(name):  # a Hub repo: fetch the manifest like the other files
                try:
                    from transformers.utils import cached_file

                    found = cached_file(name, MANIFEST, _raise_exceptions_for_missing_entries=False)
                except Exception as e:  # offline, no such repo, ...
                    log.debug("could not fetch %s from %s: %s", MANIFEST, name, e)
                    found = None
                if found:
                    return Path(found).parent
            where = candidates[0] if candidates else name
            raise CheckpointError(f"{MANIFEST} is missing next to the weights in {where}: config.json says "
                                  "quant_method 'lowbit' but the folder is not a complete lowbit checkpoint; "
                                  "re-save it with lowbit.save")

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
            folder = self._find_folder(model, checkpoint_files)
            manifest = read_manifest(folder)
            verify_files(folder, manifest, hashes=hashes_by_default(), essential_only=True)
            float_dtype = dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype()
            # not transformers' meta-device context: formats build (and cache) CPU tables
            with torch.device("cpu"):
                self.recipe = manifest_recipe(folder, manifest)
                with crafted_entries(folder):
                    self._swap_layers(model, folder, manifest, float_dtype)
            self.folder, self.manifest = folder, manifest
            return model

        def _swap_layers(self, model, folder, manifest, float_dtype):
            prefix = getattr(model, "base_model_prefix", "")
            # AutoModel builds the bare base model from a causal-LM checkpoint: its names lack "model." and the
            # head's layers have no place in it (transformers ignores their tensors as it does lm_head.weight).
            bare = bool(prefix) and not _has_module(model, prefix)
            if manifest.get("experts"):  # saved with one Linear per expert
                unfuse_experts(model)
            rotation = manifest.get("rotation") or {}
            if rotation.get("outliers") or (rotation and architecture(model).post_norms):
                if bare:  # QUAD's d + r wide residual stream, or post-norms rotating into the stream
                    raise CheckpointError(f"{folder} holds a rotated residual stream (QUAD's widened one or rotated "
                                          "post-norms): load it with AutoModelForCausalLM or lowbit.load, not as a "
                                          "bare base model")
                from .transforms.rotate import widen_skeleton

                widen_skeleton(model, rotation["outliers"])
            def target_of(name: str) -> str | None:
                if not bare:
                    return name
                if name.startswith(prefix + "."):
                    return name[len(prefix) + 1:]
                log.debug("skipping %s: not part of the bare %s", name, type(model).__name__)
                return None

            for name, entry in {**manifest["layers"], **manifest.get("embeddings", {})}.items():
                target = target_of(name)
                if target is None:
                    continue
                if not _has_module(model, target):
                    raise CheckpointError(f"{folder / MANIFEST} lists layer {name!r} that {type(model).__name__} "
                                          f"built from {folder / 'config.json'} does not have")
                module = packed_module(entry, torch.device("meta"), float_dtype)
                set_module(model, target, module)
                self.packed_names.update(f"{target}.{leaf}" for leaf in module.packed_names)
            # Adapters (LoRA, LoRMA; RILQ's, LoftQ's, a fine-tune's) are part of the model's function: build them
            # as lowbit.load does, on the meta device, so transformers' loader fills them from the float shard.
            adapters = {key: {**entry, "layers": [t for t in map(target_of, entry["layers"]) if t is not None]}
                        for key, entry in manifest.get("adapters", {}).items()}
            with torch.device("meta"):
                attach_from_manifest(model, adapters)
            # adapters load in the dtype they were stored in (bf16 by default; int8 or packed int4 codes and fp32
            # scales), as lowbit.load keeps them
            self.packed_names.update(n for n, _ in [*model.named_parameters(), *model.named_buffers()]
                                     if ".adapters." in n)

        def get_new_dtype(self, converter, param, dtype):
            # The packed tensors load exactly as stored (uint8 codes and zero points, fp16 scales).
            if any(t in self.packed_names for t in getattr(converter, "target_patterns", ())):
                return None
            return super().get_new_dtype(converter, param, dtype)

        def _process_model_after_weight_loading(self, model, **kwargs):
            for module in model.modules():
                if isinstance(module, QLinear) and module.bias is not None:
                    module.bias.requires_grad_(False)  # the loader makes float params trainable; QLinear's is frozen
            for alias, source in (self.manifest or {}).get("aliases", {}).items():
                _share(model, alias, source)  # transformers ties the embeddings; any other alias lowbit.load would
            use_gemv_head(model)  # as lowbit.load: a float head's decode step through lowbit's fp32 GEMV
            manifest = self.manifest or {}
            state_of(model).manifest = manifest
            state_of(model).source = manifest.get("source")
            state_of(model).float_dtype = manifest.get("float_dtype")
            state_of(model).recipe = self.recipe
            return model

        def _dequantize(self, model, dtype=None):
            from .export import float_modules_

            return float_modules_(model, dtype or torch.get_default_dtype())

        def is_serializable(self, *args, **kwargs):
            log.warning("save a lowbit model with lowbit.save(model, folder): save_pretrained would drop the "
                        "lowbit.json manifest the checkpoint needs")
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    def _register() -> bool:
        for register, cls in ((register_quantization_config, LowbitConfig), (register_quantizer, LowbitHfQuantizer)):
            try:
                register(QUANT_METHOD)(cls)
            except ValueError as e:  # already registered, e.g. by an earlier copy of this module
                log.debug("lowbit: %s not registered with transformers: %s", cls.__name__, e)
                return False
        return True

    REGISTERED = _register()


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _share(model: nn.Module, alias: str, source: str) -> None:
    """Make tensor ``alias`` the very tensor ``source`` (as :func:`lowbit.load` does), if both exist."""
    a_owner, _, a_leaf = alias.rpartition(".")
    s_owner, _, s_leaf = source.rpartition(".")
    if not (_has_module(model, a_owner) and _has_module(model, s_owner)):
        return
    a_mod, s_mod = model.get_submodule(a_owner), model.get_submodule(s_owner)
    a_t, s_t = getattr(a_mod, a_leaf, None), getattr(s_mod, s_leaf, None)
    if a_t is None or s_t is None or a_t is s_t:
        return
    if a_leaf in a_mod._buffers:
        a_mod._buffers[a_leaf] = s_t
    else:
        setattr(a_mod, a_leaf, s_t)
