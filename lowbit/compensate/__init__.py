"""Error compensation: low-rank adapters that cancel a quantized model's error (LoftQ, RILQ)."""

from . import loftq  # noqa: F401  (registers the step)
from .loftq import LoftQConfig, loftq_layer

__all__ = ["LoftQConfig", "loftq_layer"]
