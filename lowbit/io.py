"""Checkpoints: packed tensors in safetensors, the HF config, tokenizer files and a ``lowbit.json`` manifest.

Folder layout (format version 1)::

    config.json                          HF config with quantization_config = {"quant_method": "lowbit", ...}
    model-00001-of-00002.safetensors     packed tensors of the quantized layers (codes, scales, zeros)
    model-00002-of-00002.safetensors     everything else: float tensors (embeddings, norms, biases) or, after
                                         the ``embeddings`` step, the packed embedding table
    model.safetensors.index.json         HF shard index (weight name -> file)
    lowbit.json                          manifest: versions, recipe, per-layer layout and bits, file sizes/sha256
    tokenizer files, generation_config.json

The quantized layers get a shard of their own so their bits per weight can be checked from a file size.
Saving writes a temporary sibling folder and renames it into place (:func:`lowbit.fileio.staged_folder`); an
existing folder is only replaced with ``force=True``.

Loading checks every file against the manifest first (:mod:`lowbit.manifest`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ._version import __version__
from .adapters import attach_from_manifest, manifest_entry
from .architectures import expert_lists, unfuse_experts
from .errors import CheckpointError, LowbitError
from .fileio import finite, json_text, sha256, staged_folder
from .formats import LAYOUT
from .manifest import (
    FLOAT_SHARD,
    FORMAT_VERSION,
    INDEX,
    MANIFEST,
    PACKED_SHARD,
    hashes_by_default,
    manifest_digest,
    manifest_recipe,
    read_manifest,
    verify_files,
)
from .models import (
    DEFAULT_MODEL,
    decoder_blocks,
    load_float_model,
    resolve_source,
    set_module,
    source_float_tensors,
    storage_dtype,
)
from .nn.attention import use_cpu_attention
from .nn.gemv_linear import use_gemv_head
from .nn.input_transform import InputSpec, TransformedLinear
from .nn.qembedding import QEmbedding
from .nn.qlinear import packed_linear
from .qtensor import empty_weight
from .shards import TensorAppender
from .state import state_of
from .summary import bits_summary, layer_entry, packed_embeddings, quantized_layers
from .threads import adapt_threads

log = logging.getLogger(__name__)


def _versions() -> dict:
    import safetensors
    import transformers

    return {"lowbit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


class CheckpointTensors:
    """The tensor shards of a checkpoint being written into the staged folder ``folder``, one part of the model
    at a time (:meth:`add`): packed tensors of quantized layers appended to the packed shard as they come, the
    rest (embeddings, norms, biases, a float head) to the float shard; :meth:`finish` completes both and writes
    the index. Nothing is held back in memory.

    The in-memory :func:`save` adds each decoder block, then the rest; the streamed quantize adds each block as it
    is finished and freed, then the rest: the same calls in the same order, hence the same bytes. Tensors that
    share storage (a tied head, a shared rotation) are stored once and the others recorded as aliases; a stored
    tensor is remembered by a weak reference, so a freed block's storage, reused later, is never taken for it."""

    def __init__(self, folder: Path):
        meta = {"format": "pt", "lowbit_format_version": str(FORMAT_VERSION)}
        self.folder = folder
        self.packed = TensorAppender(folder / PACKED_SHARD, meta)
        self.floats = TensorAppender(folder / FLOAT_SHARD, meta)
        self.aliases: dict[str, str] = {}
        self._seen: dict[tuple, tuple[str, weakref.ref]] = {}

    def add(self, model: nn.Module, keep: Callable[[str], bool]) -> None:
        """Store the state-dict entries of ``model`` whose names ``keep`` accepts (the others are left alone)."""
        qlayers = quantized_layers(model)
        storage = storage_dtype(model)
        narrow = set(source_float_tensors(model)) if storage is not None else set()
        for name, held in model.state_dict(keep_vars=True).items():
            if not keep(name):
                continue
            key = (held.data_ptr(), held.shape, held.dtype)
            first = self._seen.get(key)
            if held.numel() and first is not None and first[1]() is not None:
                self.aliases[name] = first[0]
                continue
            self._seen[key] = (name, weakref.ref(held))
            owner, _, leaf = name.rpartition(".")
            layer = qlayers.get(owner)
            if layer is not None and leaf in ("channel_scale", "group_scale"):
                continue  # folded into the packed scales below
            t = held.detach()
            if layer is not None and (layer.group_scale is not None or layer.channel_scale is not None) \
                    and leaf == layer.qweight.scale_layout[0]:
                t = layer.folded_scales()
            elif layer is not None and leaf == "outlier":
                t = t.to(torch.float16)  # QUAD's storage (methods.md §7.3), also after PEFT trained an fp32 copy
            elif name in narrow and t.dtype.itemsize > storage.itemsize:
                t = t.to(storage)  # the source's dtype (bf16 for a bf16 model, fp16 for a GGUF file's float parts)
            if layer is not None and leaf in layer.packed_names:
                self.packed.append(name, t)
            else:
                self.floats.append(name, t)

    def finish(self) -> None:
        """Close the packed shard, write the float shard and the HF shard index."""
        self.packed.close()
        self.floats.close()
        weight_map = {**{k: PACKED_SHARD for k in self.packed.header}, **{k: FLOAT_SHARD for k in self.floats.header}}
        total = self.packed.nbytes + self.floats.nbytes
        (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=1))


def block_parts(model: nn.Module) -> list[Callable[[str], bool]]:
    """Name filters that cut a model's state dict into its decoder blocks, in order, then the rest: the order in
    which checkpoints store tensors. A model without decoder blocks is one part."""
    try:
        prefix, blocks = decoder_blocks(model)
    except LowbitError:
        return [lambda name: True]
    parts = [functools.partial(_under, f"{prefix}.{i}.") for i in range(len(blocks))]
    return [*parts, lambda name: not name.startswith(prefix + ".")]


def _under(prefix: str, name: str) -> bool:
    return name.startswith(prefix)


def check_savable(model: nn.Module) -> None:
    """Refuse a model holding a rotated float layer (a rotate or act step without a weight quantizer after it)."""
    floating = [n for n, m in model.named_modules() if isinstance(m, TransformedLinear)]
    if floating:
        raise LowbitError(f"{floating[0]} is a rotated float layer ({len(floating)} in all): a rotate or act step "
                          "without a weight quantizer after it cannot be saved; add one (e.g. gptq bits=4 "
                          "granularity=channel symmetric=true) to the recipe")


def save(model: nn.Module, path: str | Path, tokenizer=None, force: bool = False, extra: dict | None = None) -> Path:
    """Write ``model`` (quantized or not) as a lowbit checkpoint folder; atomic, refuses to overwrite unless
    ``force``. ``extra`` (JSON-able) is stored in the manifest, e.g. the eval figures at save time."""
    path = Path(path)
    check_savable(model)
    with staged_folder(path, force) as tmp:
        tensors = CheckpointTensors(tmp)
        for part in block_parts(model):
            tensors.add(model, part)
        tensors.finish()
        write_metadata(model, tmp, tensors.aliases, tokenizer, extra)
    log.info("saved %s", path)
    return path


def write_metadata(model: nn.Module, tmp: Path, aliases: dict[str, str], tokenizer=None,
                   extra: dict | None = None) -> None:
    """Everything of a checkpoint but its tensor shards, into the staged folder ``tmp`` that already holds them:
    config, generation config, tokenizer, and last the manifest (which hashes every other file). ``model`` may
    hold its decoder blocks on the meta device (a streamed quantize): only shapes and layouts are read here."""
    recipe = state_of(model).recipe
    recipe_dict = recipe.to_dict() if recipe is not None else None
    config = model.config.__class__.from_dict(model.config.to_dict())
    # As save_pretrained does: from_pretrained(dtype="auto") reads it (else the fp16 scales would set it).
    # Parameters only: packed embedding tables keep fp16 scales among the float shard's buffers.
    config.dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    config.quantization_config = {"quant_method": "lowbit", "format_version": FORMAT_VERSION,
                                  "recipe": recipe_dict}
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)

    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
    manifest = {
        "format_version": FORMAT_VERSION,
        "packing_layout": LAYOUT,
        "versions": _versions(),
        "source": state_of(model).source,
        "recipe": recipe_dict,
        "quantize_seconds": state_of(model).quantize_seconds,
        "summary": {**bits_summary(model), "packed_file_bytes": files[PACKED_SHARD]["bytes"],
                    "size_bytes": sum(f["bytes"] for f in files.values())},
        "layers": {name: layer_entry(m) for name, m in quantized_layers(model).items()},
        "embeddings": {name: layer_entry(m) for name, m in packed_embeddings(model).items()},
        "adapters": manifest_entry(model),
        "rotation": state_of(model).rotation,
        "float_dtype": state_of(model).float_dtype,  # what the unquantized tensors are stored in
        "experts": {name: len(m) for name, m in expert_lists(model).items()},  # unfused MoE experts
        "expert_tokens": state_of(model).history.get("expert_tokens"),  # calibration tokens routed to each
        "aliases": aliases,
        "files": files,
        "extra": extra or {},
    }
    manifest = finite(manifest)  # strict JSON: a diverged model's inf perplexity is stored as null
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (tmp / MANIFEST).write_text(json_text(manifest, indent=1))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for name in (PACKED_SHARD, FLOAT_SHARD):
        try:
            tensors.update(load_file(path / name))
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise CheckpointError(f"{path / name} cannot be read as safetensors ({e})") from e
    return tensors


@contextlib.contextmanager
def crafted_entries(path: Path):
    """Turn what a crafted manifest (one with a valid checksum but impossible entries) makes the layer builders
    raise into one :class:`CheckpointError` naming the manifest."""
    try:
        yield
    except CheckpointError:
        raise
    except (LowbitError, KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path / MANIFEST} has a layer entry this lowbit cannot build ({type(e).__name__}: "
                              f"{e}); the manifest is damaged or crafted: do not use this checkpoint") from e


def packed_module(entry: dict, device: torch.device, float_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Uninitialised QLinear or QEmbedding for a manifest entry (``role`` says which; absent means a Linear)."""
    qweight = empty_weight(entry, device=device)
    if entry.get("role") == "embedding":
        return QEmbedding(qweight, entry.get("padding_idx"), entry.get("scale", 1.0))
    bias = torch.empty(entry["shape"][0], dtype=float_dtype, device=device) if entry["bias"] else None
    spec = InputSpec.from_dict(entry["spec"]) if entry.get("spec") else None
    r = spec.outliers if spec is not None else 0
    outlier = torch.empty(entry["shape"][0], r, device=device) if r else None
    return packed_linear(qweight, bias=bias, spec=spec, outlier=outlier, role=entry.get("role", "linear"))


def build_skeleton(path: Path, manifest: dict) -> nn.Module:
    """The model from ``config.json`` with weights on the meta device and QLinear storage per the manifest."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{path / 'config.json'} cannot be read as a Hugging Face config ({e})") from e
    quant_config = getattr(config, "quantization_config", None)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rotation = manifest.get("rotation") or {}
    with crafted_entries(path):
        if manifest.get("experts"):  # saved with one Linear per expert
            unfuse_experts(model)
        if rotation:  # QUAD's d + r wide residual stream whose norms divide by d; rotated post-norms
            from .transforms.rotate import widen_skeleton

            with init_empty_weights(include_buffers=False):
                widen_skeleton(model, rotation["outliers"])
        entries = {**manifest["layers"], **manifest.get("embeddings", {})}
        for name, entry in entries.items():
            try:
                layer = model.get_submodule(name)
            except AttributeError as e:
                raise CheckpointError(f"{path / MANIFEST} lists layer {name!r} that {path / 'config.json'} does "
                                      "not have: the config does not match the tensors") from e
            # The packed storage is shaped from the manifest: load_state_dict cannot notice a config that disagrees.
            expected = [getattr(layer, "out_features", getattr(layer, "num_embeddings", None)),
                        getattr(layer, "in_features", getattr(layer, "embedding_dim", None))]
            stored = [entry["shape"][0], entry["shape"][1] + (entry.get("spec") or {}).get("outliers", 0)]
            if stored != expected:
                raise CheckpointError(f"{path / MANIFEST} stores layer {name!r} as {entry['shape']} but "
                                      f"{path / 'config.json'} makes it {expected}: the config does not match the "
                                      "tensors")
            set_module(model, name, packed_module(entry, torch.device("cpu")))
    try:
        attach_from_manifest(model, manifest.get("adapters", {}))
    except (LowbitError, AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path / MANIFEST} lists adapters this model cannot hold ({e}); the manifest is "
                              "damaged or from a newer lowbit") from e
    model.config.quantization_config = quant_config
    return model


def load(path: str | Path, verify: bool | None = None):
    """Load a checkpoint saved by :func:`save`: ``(model, tokenizer)`` with bit-identical tensors.

    Every file is checked first (:func:`verify_files`); ``verify=False`` (or ``LOWBIT_VERIFY=sizes``, the default
    when ``verify`` is None) skips only the SHA-256 of the tensor shards, about a second per 135M parameters."""
    from transformers import AutoTokenizer, GenerationConfig

    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest, hashes=hashes_by_default() if verify is None else verify)
    recipe = manifest_recipe(path, manifest)
    model = build_skeleton(path, manifest)
    tensors = _read_tensors(path)
    held = model.state_dict()
    for name, t in tensors.items():  # float parts stored narrower than the model computes in (fp16, bf16);
        # adapters keep their stored dtype (bf16 by default: they compute in it, as when they were saved)
        if name in held and t.is_floating_point() and held[name].is_floating_point() and t.dtype != held[name].dtype \
                and ".adapters." not in name:
            tensors[name] = t.to(held[name].dtype)
    for alias, source in manifest.get("aliases", {}).items():
        if source not in tensors:
            raise CheckpointError(f"{path / MANIFEST} makes {alias!r} an alias of {source!r}, which is not stored; "
                                  "the manifest is damaged or crafted: do not use this checkpoint")
        tensors[alias] = tensors[source]
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"the tensors in {path} do not match {path / 'config.json'}: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"the tensors in {path} do not match {path / 'config.json'}: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    use_gemv_head(model)  # a float head's decode step through lowbit's fp32 GEMV (same parameters)
    adapt_threads(model)  # fewer threads while other processes hold cores (lowbit.threads)
    use_cpu_attention(model)  # whole causal sequences through lowbit's CPU attention kernel (lowbit.nn.attention)
    model.eval()
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    state_of(model).manifest = manifest
    state_of(model).source = manifest.get("source")
    if manifest.get("rotation"):
        state_of(model).rotation = manifest["rotation"]
    state_of(model).float_dtype = manifest.get("float_dtype")
    state_of(model).recipe = recipe
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def load_model(source: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from any model source: a lowbit checkpoint (:func:`load`), or a built-in name, GGUF
    file or HF folder (:func:`lowbit.models.load_float_model`, weights in ``dtype``). Nothing is fetched from a hub."""
    kind, path = resolve_source(source)
    if kind == "lowbit":
        return load(path)
    return load_float_model(source, dtype)
