"""The Python API: ``quantize`` a model with a recipe; ``save``/``load`` live in :mod:`lowbit.io`."""

from __future__ import annotations

import logging
import time

from torch import nn

from .nn import use_gemv_head
from .recipe import Recipe
from .registry import get

log = logging.getLogger(__name__)


def quantize(model: nn.Module, recipe: Recipe | str, calib=None) -> nn.Module:
    """Apply every step of ``recipe`` (a :class:`Recipe`, a preset name or a YAML path) to ``model`` in place.

    Returns the model; ``model.lowbit_recipe`` records the recipe and ``model.lowbit_quantize_seconds`` the
    wall time, so :func:`lowbit.save` can write both to the manifest.
    """
    recipe = Recipe.parse(recipe)
    start = time.perf_counter()
    steps = [get("step", config.step)(config) for config in recipe.steps]
    for step in steps:  # e.g. RILQ caches the float model's outputs before any step quantizes it
        step.prepare(model, calib)
    for step in steps:
        model = step.apply(model, calib)
    use_gemv_head(model)  # decode reads a float head through lowbit's fp32 GEMV (same parameters)
    model.lowbit_recipe = recipe
    model.lowbit_quantize_seconds = time.perf_counter() - start
    return model
