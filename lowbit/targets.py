"""Export targets as quantization grids: ``lowbit quantize --target gguf:q4_0`` makes the recipe's weight steps
round straight into the grid a serving format stores (GPTQ's Hessian-aware rounding included), so the saved
checkpoint and its export (:mod:`lowbit.export_gguf`, :mod:`lowbit.export_ct`) hold the same numbers."""

from __future__ import annotations

import dataclasses

from .errors import LowbitError
from .recipe import Recipe

_INT = {"format": "int", "granularity": "group"}
TARGETS: dict[str, dict] = {
    "gguf:q4_0": {**_INT, "bits": 4, "symmetric": True, "group_size": 32},  # w = d (q - 8)
    "gguf:q4_1": {**_INT, "bits": 4, "symmetric": False, "group_size": 32},  # w = d q + m (m rounded to fp16)
    "gguf:q8_0": {**_INT, "bits": 8, "symmetric": True, "group_size": 32},  # w = d q
    "gguf:iq4_nl": {"format": "iq4_nl", "bits": 4, "granularity": "group", "group_size": 32},  # w = d level[q]
    # K-quant: 256-column super-blocks of 16 groups of 16, w = d · k_j · (q - 32), d fp16, k_j int8 (1..127)
    "gguf:q6_k": {**_INT, "bits": 6, "symmetric": True, "group_size": 16, "scale_steps": 127},
    "compressed-tensors:w4a16": {**_INT, "bits": 4, "symmetric": True, "group_size": 128},  # llm-compressor's
    "compressed-tensors:w4a16-asym": {**_INT, "bits": 4, "symmetric": False, "group_size": 128},
    "compressed-tensors:w8a16": {"format": "int", "bits": 8, "symmetric": True, "granularity": "channel"},
}
RETARGETED = ("rtn", "gptq", "embeddings")  # the steps whose grid a target sets


def recipe_for_target(recipe: Recipe, target: str) -> Recipe:
    """``recipe`` with the grid of ``target`` (a key of :data:`TARGETS`) set on every rtn, gptq and embeddings
    step; a step that makes another kind of weight (LowRA codebooks, LoftQ/RILQ adapters, rotations) is refused."""
    grid = TARGETS.get(target)
    if grid is None:
        raise LowbitError(f"unknown --target {target!r}; known: {', '.join(TARGETS)}")
    other = [s.step for s in recipe.steps if s.step not in RETARGETED]
    if other:
        raise LowbitError(f"--target {target} sets the grid of rtn, gptq and embeddings steps; recipe "
                          f"{recipe.name!r} also has {', '.join(other)}, whose weights {target.split(':')[0]} "
                          "cannot hold: use an rtn or gptq recipe (e.g. gptq-w4g128)")
    steps = []
    for step in recipe.steps:
        fields = {f.name for f in dataclasses.fields(step)}
        here = {k: v for k, v in grid.items() if k in fields}
        steps.append(dataclasses.replace(step, **here))
    return Recipe(steps, name=f"{recipe.name}@{target}")
