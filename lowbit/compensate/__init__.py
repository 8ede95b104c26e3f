"""Error compensation: low-rank adapters that cancel a quantized model's error (LoftQ, RILQ)."""

from . import loftq, rilq  # noqa: F401  (registers the steps)
from .loftq import LoftQConfig, loftq_layer
from .rilq import RILQConfig

__all__ = ["LoftQConfig", "loftq_layer", "RILQConfig"]
