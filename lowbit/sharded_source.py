"""A float model read from its safetensors shards one part at a time: the streamed quantize's source.

:func:`open_sharded` builds the model from its ``config.json`` with every weight on the meta device (no memory)
and returns a :class:`ShardedSource` that fills a part of it (:meth:`~ShardedSource.load`: a decoder block, the
embeddings, the rest) from the shards — memory-mapped, opened for that part and closed after, each tensor
converted to the model's dtype as ``from_pretrained(dtype=...)`` converts it — and empties it again
(:meth:`~ShardedSource.release`). Resident memory then tracks one part, not the model.

Only sources whose tensor names are the model's own stream (LLaMA-like families; a checkpoint that transformers
renames or fuses while loading, e.g. per-expert MoE tensors, is refused with the in-memory path named).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from .errors import LowbitError
from .fileio import read_text
from .models import TOKENIZER_FILES, check_source, module_name, source_float_dtype
from .state import state_of

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


def source_tensors(folder: Path) -> dict[str, tuple[str, list[int], str]]:
    """``{tensor name: (file name, shape, safetensors dtype)}`` of an HF folder's safetensors weights, read from
    the headers only (the index says which shard holds what; a single file is its own map)."""
    from safetensors import safe_open

    index = folder / INDEX
    files = sorted(set(json.loads(read_text(index, "shard index"))["weight_map"].values())) if index.is_file() \
        else sorted(p.name for p in folder.glob("*.safetensors"))
    held = {}
    for name in files:
        with safe_open(folder / name, "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                held[key] = (name, list(sl.get_shape()), sl.get_dtype())
    return held


def fp32_bytes(folder: Path) -> int:
    """Bytes the float model of an HF folder takes in fp32 (its parameter count × 4, from the shard headers)."""
    total = 0
    for _, shape, _ in source_tensors(folder).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return 4 * total


class ShardedSource:
    """The shards of one HF folder, filling the meta-device model :func:`open_sharded` built, part by part."""

    def __init__(self, folder: Path, model: nn.Module, dtype: torch.dtype):
        self.folder = folder
        self.dtype = dtype
        self.tensors = source_tensors(folder)
        expected = set(model.state_dict())
        tied = {n for n in expected if n not in self.tensors and self.is_tied(model, n)}
        missing = sorted(expected - tied - set(self.tensors))
        if missing:
            raise LowbitError(f"{folder} holds no tensor {missing[0]!r} ({len(missing)} names the model has are not "
                              "stored under them; transformers renames or fuses them while loading): this source "
                              "cannot be streamed, quantize it in memory (--no-stream)")

    def is_tied(self, model: nn.Module, name: str) -> bool:
        """Whether ``name`` is the output head's weight, tied to the input embeddings (stored once, as theirs)."""
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return bool(getattr(model.config, "tie_word_embeddings", False)) and out is not None \
            and name == module_name(model, out) + ".weight"

    def load(self, model: nn.Module, keep, tie: bool = True, stored: torch.dtype | None = None) -> None:
        """Fill the meta tensors of ``model`` whose state-dict names ``keep`` accepts from the shards (each shard
        opened once, closed after), in the model's dtype (integer tensors as stored, and float tensors the shard
        holds in dtype ``stored``: a copy into a checkpoint that stores that dtype needs no fp32 detour); re-tie a
        tied head."""
        from safetensors import safe_open

        wanted = defaultdict(list)
        for name, t in model.state_dict(keep_vars=True).items():
            if keep(name) and t.is_meta and name in self.tensors:
                wanted[self.tensors[name][0]].append(name)
        for file, names in wanted.items():
            with safe_open(self.folder / file, "pt") as f:
                for name in names:
                    t = f.get_tensor(name)
                    _assign(model, name, t.to(self.dtype) if t.is_floating_point() and t.dtype != stored else t)
        if tie and getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()

    @staticmethod
    def release(module: nn.Module) -> None:
        """Empty ``module``'s tensors (moved to the meta device: shapes and layouts stay, memory goes)."""
        module.to("meta")

    @staticmethod
    def empty(model: nn.Module, name: str, like: torch.Tensor) -> None:
        """Empty the one tensor ``name`` of ``model``: a meta tensor shaped and typed as ``like`` in its place."""
        _assign(model, name, torch.empty_like(like, device="meta"))


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = tensor


def open_sharded(source: str | Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, ShardedSource)`` for an HF folder or Hub id: the model as :func:`load_float_model`
    builds it (config, generation config, tokenizer, recorded source and float dtype), its weights on the meta
    device until :meth:`ShardedSource.load` fills them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    kind, path = check_source(source)
    if kind != "hf" or not any(path.glob("*.safetensors")):
        raise LowbitError(f"{source} is not a folder of safetensors weights: only those stream (a GGUF file is "
                          "dequantized whole by transformers); quantize it in memory (--no-stream)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    tokenizer = None
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    state_of(model).source = str(path.resolve())
    state_of(model).float_dtype = source_float_dtype(kind, path)
    return model, tokenizer, ShardedSource(path, model, dtype)
