"""The typed Python API that owns every job the command line runs: each is one function taking a frozen config
dataclass and returning a result dataclass whose ``to_dict()`` is the JSON object ``lowbit <verb> --json``
prints. The CLI only parses flags into these configs.

    from lowbit import api
    result = api.quantize(api.QuantizeConfig(out="ck/", model="smollm2-135m", recipe="rtn-w4g128"))
    print(result.ppl, result.bits_per_weight)

In-memory work (a model you already hold) uses ``lowbit.quantize``, ``lowbit.save`` and ``lowbit.load``.
"""

from ..bench import BenchConfig, BenchJob, BenchResult, bench
from .artifacts import ExportConfig, ExportResult, MergeConfig, MergeResult, export, info, merge, recipes, report
from .common import ALL, CalibrationConfig
from .evaluate import EvalConfig, EvalResult, GenerateConfig, GenerateResult, evaluate, generate
from .quantize import QuantizeConfig, QuantizeResult, quantize, recipe_with_overrides
from .training import CompensateConfig, CompensateResult, FinetuneConfig, FinetuneResult, compensate, finetune

__all__ = ["ALL", "BenchConfig", "BenchJob", "BenchResult", "CalibrationConfig", "CompensateConfig", "CompensateResult",
           "EvalConfig", "EvalResult", "ExportConfig", "ExportResult", "FinetuneConfig", "FinetuneResult",
           "GenerateConfig", "GenerateResult", "MergeConfig", "MergeResult", "QuantizeConfig", "QuantizeResult",
           "bench", "compensate", "evaluate", "export", "finetune", "generate", "info", "merge", "quantize",
           "recipe_with_overrides", "recipes", "report"]
