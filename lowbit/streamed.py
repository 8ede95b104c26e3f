"""Quantizing a model larger than memory: streamed from its safetensors shards into the checkpoint, one decoder
block at a time.

:func:`quantize_streamed` fills the input embeddings just long enough to compute the calibration windows'
inputs to block 0, then for each block: fill it from the shards (:class:`~lowbit.sharded_source.ShardedSource`),
run every step's :meth:`~lowbit.quantizers.base.Step.apply_block` on it (GPTQ's statistics come from the
windows' hidden states entering that block, produced by the already quantized blocks before it), feed the
windows through it, append its tensors to the checkpoint's shards (:class:`~lowbit.io.CheckpointTensors`) and
empty it. Then the parts outside the blocks are filled and the steps' ``apply_rest`` runs (the embeddings
step), and the manifest is written as :func:`lowbit.save` writes it. Memory tracks one block, the calibration
activations (windows × length × width floats) and the embeddings, never the model: the checkpoint is the same,
byte for byte, as the in-memory path's for the same recipe and calibration windows.

A step that needs the whole model (a global bit assignment, rotation, RILQ, LoftQ) is refused, naming the memory
the in-memory path would need.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .calibration import Calibration, block_inputs, for_each_block
from .errors import LowbitError
from .fileio import staged_folder
from .io import CheckpointTensors, block_parts, check_savable, write_metadata
from .models import decoder_blocks, module_name, storage_dtype
from .recipe import Recipe
from .registry import get
from .sharded_source import fp32_bytes, open_sharded
from .state import state_of
from .summary import float_expert_weights

log = logging.getLogger(__name__)



def offload_hidden(hidden: list[torch.Tensor], path: Path) -> list[torch.Tensor]:
    """The windows' activations ``hidden`` moved into the file ``path`` (created; memory-mapped and shared), one
    window at a time: they become file-backed pages the kernel writes back and reclaims under memory pressure,
    instead of anonymous memory (16 windows of 2048 tokens at width 4096: 512 MiB). Same values; the caller
    removes the file once the returned tensors are gone."""
    import numpy as np

    if not hidden:
        return hidden
    shape, dtype = tuple(hidden[0].shape), hidden[0].dtype
    store = torch.from_numpy(np.memmap(path, dtype=np.float32 if dtype == torch.float32 else np.float16 if
                                       dtype == torch.float16 else np.uint16, mode="w+",
                                       shape=(len(hidden), *shape))).view(dtype)
    out = []
    for i in range(len(hidden)):
        store[i].copy_(hidden[i])
        hidden[i] = None  # the anonymous copy goes now
        out.append(store[i])
    return out

def memory_text(nbytes: int) -> str:
    """``12.3 GiB`` or, below a GiB, ``345 MiB``."""
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def streaming_refusal(recipe: Recipe, calib: Calibration | None) -> str | None:
    """Why ``recipe`` (with ``calib``) cannot stream, or None when it can: a step that needs the whole model, or
    calibration text the float model samples itself."""
    for config in recipe.steps:
        if not get("step", config.step).streams:
            return f"step {config.step!r} needs the whole float model in memory (it does not run block by block)"
    if calib is not None and calib.self_generated:
        return "self-generated calibration samples text from the whole float model"
    return None


ACTIVATIONS = ".calibration-activations"  # in the staged folder, removed before the checkpoint is complete


def quantize_streamed(source: str | Path, recipe: Recipe, calib: Calibration, out: Path, force: bool = False,
                      extra: dict | None = None):
    """Quantize ``source`` (an HF folder of safetensors shards, or a Hub id) with ``recipe`` into the checkpoint
    folder ``out``, one decoder block in memory at a time. Returns ``(model, tokenizer)``: the model's blocks are
    empty (meta device; shapes and layouts only), its other parts filled. Atomic like :func:`lowbit.save`."""
    reason = streaming_refusal(recipe, calib)
    model, tokenizer, shards = open_sharded(source)
    if reason is not None:
        raise LowbitError(f"{reason}: it cannot be streamed, and loading the model whole needs about "
                          f"{memory_text(fp32_bytes(shards.folder))} (fp32); quantize in memory where that fits "
                          "(--no-stream) or choose a recipe of block-wise steps (rtn, gptq, embeddings)")
    if float_expert_weights(model):
        raise LowbitError(f"{source} is a mixture-of-experts model whose experts transformers fuses while loading: "
                          "it cannot be streamed yet; quantize it in memory (--no-stream)")
    steps = [get("step", config.step)(config) for config in recipe.steps]
    for step in steps:
        step.check(model)  # e.g. a target pattern that matches nothing, before any work
    start = time.perf_counter()
    check_savable(model)
    parts = block_parts(model)
    _, blocks = decoder_blocks(model)
    with staged_folder(Path(out), force) as tmp:
        inputs, activations = None, tmp / ACTIVATIONS
        if any(step.needs_calibration for step in steps):
            calib.tokenizer = calib.tokenizer or tokenizer
            windows = calib.get_windows()
            embed = model.get_input_embeddings()
            embed_prefix = module_name(model, embed) + "."
            shards.load(model, lambda name: name.startswith(embed_prefix))
            hidden, kwargs = block_inputs(model, windows)
            shards.release(embed)
            inputs = offload_hidden(hidden, activations), kwargs
        tensors = CheckpointTensors(tmp)

        def work(prefix: str, collect) -> None:
            for step in steps:
                step.apply_block(model, prefix, collect)

        def done(prefix: str) -> None:
            index = int(prefix.rstrip(".").rpartition(".")[2])
            check_savable(blocks[index])
            tensors.add(model, parts[index])
            shards.release(blocks[index])

        def load(prefix: str) -> None:
            shards.load(model, lambda name: name.startswith(prefix))

        precision = calib.precision if all(step.follows_precision for step in steps) else "fp32"
        for_each_block(model, inputs, work, desc=f"streamed {recipe.name}", load=load, done=done,
                       device=calib.device, precision=precision)
        inputs = None  # the memory-mapped activations go before their file
        activations.unlink(missing_ok=True)
        rest = parts[-1]
        whole = any(step.outside_blocks(model) for step in steps)
        if whole:  # a step changes the embeddings or the head: they are filled together
            shards.load(model, rest)
        for step in steps:
            step.apply_rest(model, calib)
        state_of(model).recipe = recipe
        state_of(model).quantize_seconds = time.perf_counter() - start
        if whole:
            tensors.add(model, rest)
        else:
            copy_by_tensor(model, shards, tensors, rest)
        tensors.finish()
        write_metadata(model, tmp, tensors.aliases, tokenizer, extra)
    log.info("saved %s (streamed)", out)
    return model, tokenizer


def copy_by_tensor(model, shards, tensors: CheckpointTensors, keep) -> None:
    """Write the tensors ``keep`` accepts one at a time (filled, stored, emptied), in state-dict order: the
    embeddings and head of a large model are never all in memory. Those the source holds in the dtype the
    checkpoint stores are copied without the fp32 detour (the fp32 model holds them exactly, so the bytes are the
    in-memory path's). A head tied to the input embeddings is recorded as their alias, as :func:`lowbit.save` does."""
    embed = module_name(model, model.get_input_embeddings()) + ".weight"
    stored = storage_dtype(model)
    for name, held in [(n, t) for n, t in model.state_dict().items() if keep(n)]:
        if shards.is_tied(model, name):
            tensors.aliases[name] = embed
            continue
        shards.load(model, lambda n, name=name: n == name, tie=False, stored=stored)
        tensors.add(model, lambda n, name=name: n == name)
        shards.empty(model, name, like=held)  # the model's own dtype again (the manifest reads it)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the emptied head shares the emptied table again (the manifest counts it once)
