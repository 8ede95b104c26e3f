"""Weight quantizers: one file per method, each registered as a recipe step."""

from ..formats.act import ActQuantConfig
from . import activations, blockwise, embeddings, gptq, lowra, lowra_gptq, rtn  # noqa: F401  (registers the steps)
from .activations import ActivationsConfig
from .base import GridConfig, Quantizer, QuantizerConfig, Step
from .blockwise import BlockwiseConfig
from .embeddings import EmbeddingsConfig
from .gptq import GPTQConfig, gptq_round
from .lowra import LowRAConfig
from .rtn import RTNConfig, rtn_quantize

__all__ = ["GridConfig", "EmbeddingsConfig", "Quantizer", "QuantizerConfig", "Step", "RTNConfig", "rtn_quantize",
           "GPTQConfig", "gptq_round", "LowRAConfig", "BlockwiseConfig",
           "ActQuantConfig", "ActivationsConfig"]
