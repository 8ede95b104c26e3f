"""Weight quantizers: one file per method, each registered as a recipe step."""

from . import rtn  # noqa: F401  (registers "rtn")
from .base import Quantizer, QuantizerConfig, Step
from .rtn import RTNConfig, rtn_quantize

__all__ = ["Quantizer", "QuantizerConfig", "Step", "RTNConfig", "rtn_quantize"]
