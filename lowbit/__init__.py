"""lowbit: 1-4 bit weights for Hugging Face causal LMs, with low-rank adapters to win the accuracy back.

    import lowbit
    model, tok = lowbit.load_model("smollm2-135m")
    lowbit.quantize(model, "rtn-w4g128")
    lowbit.save(model, "out/", tokenizer=tok)
"""

from . import api, compensate, formats, qmixed, quantizers  # noqa: E402,F401  (registers formats, weight kinds and steps)
from ._version import __version__  # noqa: E402
from .calibration import Calibration  # noqa: E402
from .config import StepConfig  # noqa: E402
from .errors import CheckpointError, LowbitError  # noqa: E402
from .eval.perplexity import perplexity  # noqa: E402
from .io import (  # noqa: E402
           load,
           load_model,  # noqa: E402
           save,
)
from .nn import QEmbedding, QLinear  # noqa: E402
from .qtensor import QuantizedWeight  # noqa: E402
from .quantizers import EmbeddingsConfig, GPTQConfig, RTNConfig  # noqa: E402
from .recipe import Recipe  # noqa: E402
from .recipe import apply_recipe as quantize  # noqa: E402
from .state import ModelState, state_of  # noqa: E402
from .transforms import rotate  # noqa: E402,F401  (registers the rotate step)

__all__ = ["quantize", "load", "save", "load_model", "perplexity", "Recipe", "StepConfig", "RTNConfig",
           "GPTQConfig", "EmbeddingsConfig", "Calibration", "QLinear", "QEmbedding", "QuantizedWeight",
           "LowbitError", "CheckpointError", "ModelState", "state_of", "api", "__version__"]

from . import hf_integration  # noqa: E402,F401  (registers quant_method "lowbit" with transformers)
