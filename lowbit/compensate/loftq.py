"""LoftQ (methods.md §3.5): quantize and fit a LoRA to the residual, alternately, so ``Q + s·B A ≈ W``.

::

    B A <- 0
    repeat T times:
        Q   <- quantize(W - s·B A)
        U S Vᵀ <- SVD(W - Q)
        B <- U_r sqrt(S_r) / sqrt(s);  A <- sqrt(S_r) V_rᵀ / sqrt(s)

The ``1/sqrt(s)`` (``s = alpha / rank``) is what PEFT omits: its LoRA multiplies by ``s`` afterwards, so unless
``alpha == rank`` the initial correction there is scaled wrongly. Here ``s·B A`` equals the rank-r residual
exactly for any alpha. The base quantizer is any data-free per-layer step (RTN in every format); each layer's
weight error before and after the correction is logged and kept in ``state_of(model).history["loftq"]``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import LoRA, LoRAConfig, adapter_dtype, store_adapter
from ..config import StepConfig
from ..errors import LowbitError
from ..models import decoder_blocks, find_linears
from ..quantizers.base import Quantizer, Step, install, select_targets, targets_outside_blocks
from ..registry import get, register
from ..state import state_of

log = logging.getLogger(__name__)


def _default_base() -> dict:
    return {"step": "rtn", "bits": 2, "group_size": 64}


@dataclass(frozen=True)
class LoftQConfig(StepConfig):
    """LoftQ over ``quantizer`` (a step config dict, default RTN int2 g64) with a LoRA of ``rank``."""

    step = "loftq"
    quantizer: dict = field(default_factory=_default_base)  # a data-free per-layer quantizer step
    rank: int = 16
    alpha: float = 0.0  # 0 means 2 * rank, as LoRAConfig
    iterations: int = 1  # alternations; the paper uses up to 5
    adapter: str = "default"  # adapter name on every layer
    adapter_dtype: str = "bfloat16"  # stored: bfloat16 (half fp32's bits) | float32 | int8 | int4; fitted in fp32

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.iterations, int) or not 1 <= self.iterations <= 20:
            raise LowbitError(f"iterations must be an integer from 1 to 20, got {self.iterations!r}")
        self.lora_config()  # validates rank/alpha
        adapter_dtype(self.adapter_dtype)
        base = self.base_config()
        cls = get("step", base.step)
        if not issubclass(cls, Quantizer) or cls.needs:
            raise LowbitError(f"LoftQ re-quantizes each layer on its own without data; {base.step!r} cannot (it "
                              "needs calibration or a global bit assignment). Use an rtn quantizer, or RILQ.")

    def __hash__(self):
        return hash((self.step, tuple(sorted(self.quantizer.items())), self.rank, self.alpha, self.iterations,
                     self.adapter_dtype))

    def base_config(self):
        return StepConfig.from_dict(self.quantizer)

    def lora_config(self) -> LoRAConfig:
        base = StepConfig.from_dict(self.quantizer)
        return LoRAConfig(rank=self.rank, alpha=self.alpha, targets=base.targets, ignore=base.ignore)


@torch.no_grad()
def loftq_layer(weight: torch.Tensor, quantizer: Quantizer, lora: LoRA, iterations: int, float_columns: int = 0):
    """Quantize ``weight (out, in)`` and set ``lora``'s factors by LoftQ; returns ``(qweight, error_q, error_qa)``,
    the relative Frobenius errors ``‖W − Q‖/‖W‖`` and ``‖W − Q − s·BA‖/‖W‖``.

    The first ``float_columns`` input columns (QUAD's outlier columns, ``r``) stay in float: only ``W[:, r:]`` is
    packed (``qweight`` is ``(out, in - r)``) and the residual the adapter fits is zero there. The adapter reads
    the layer's whole (transformed) input, as :class:`~lowbit.nn.QLinear` applies it."""
    w = weight.float()
    r_cols, (rank, s) = float_columns, (lora.config.rank, lora.scale)
    correction = torch.zeros_like(w)
    for _ in range(iterations):
        q = quantizer.quantize((w - correction)[:, r_cols:])
        residual = w - torch.cat([w[:, :r_cols], q.dequantize()], dim=1)
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        root = S[:rank].sqrt()
        lora.B.copy_(U[:, :rank] * root / math.sqrt(s))
        lora.A.copy_(root[:, None] * Vh[:rank] / math.sqrt(s))
        correction = s * lora.B @ lora.A
    norm = w.norm().clamp_min(1e-12)
    return q, float(residual.norm() / norm), float((residual - correction).norm() / norm)


@register("step", "loftq")
class LoftQ(Step):
    """Each target layer packed by the base quantizer, with a LoRA that starts at the SVD of the residual."""

    Config = LoftQConfig
    streams = True  # each layer on its own: block by block on a streamed model

    def apply(self, model: nn.Module, calib=None) -> nn.Module:
        base = self.config.base_config()
        targets = select_targets(model, base.targets, base.ignore)
        self.check(model)
        self._pack(model, targets)
        self._report(model)
        return model

    def check(self, model: nn.Module) -> None:
        c, base = self.config, self.config.base_config()
        for name, layer in find_linears(model, base.targets, base.ignore):
            if c.rank >= min(layer.in_features, layer.out_features):
                raise LowbitError(f"LoftQ rank {c.rank} is not below the width of {name!r} "
                                  f"({layer.in_features}x{layer.out_features}); choose a smaller rank")
        self._errors: dict[str, tuple[float, float]] = {}

    def apply_block(self, model: nn.Module, prefix: str, collect) -> None:
        base = self.config.base_config()
        self._pack(model, select_targets(model, base.targets, base.ignore, within=lambda name: name.startswith(prefix)))

    def _pack(self, model: nn.Module, targets) -> None:
        """Each target packed by the base quantizer, with its LoRA at the SVD of the residual."""
        base = self.config.base_config()
        c, quantizer = self.config, get("step", base.step)(base)
        lora_config = c.lora_config()
        for t in tqdm(targets, desc=f"loftq r{c.rank}", unit="layer", leave=False):
            lora = LoRA(lora_config, t.layer.in_features, t.layer.out_features)
            float_columns = t.layer.in_features - t.columns
            qweight, before, after = loftq_layer(t.layer.weight.detach(), quantizer, lora, c.iterations, float_columns)
            store_adapter(lora, c.adapter_dtype)
            install(model, t, qweight, adapters=nn.ModuleDict({c.adapter: lora}))
            self._errors[t.name] = (before, after)

    def outside_blocks(self, model: nn.Module) -> bool:
        base = self.config.base_config()
        return targets_outside_blocks(model, base.targets, base.ignore)

    def apply_rest(self, model: nn.Module, calib=None) -> None:
        base = self.config.base_config()
        blocks = decoder_blocks(model)[0] + "."
        self._pack(model, select_targets(model, base.targets, base.ignore,
                                         within=lambda name: not name.startswith(blocks)))
        self._report(model)

    def _report(self, model: nn.Module) -> None:
        errors = self._errors
        if not errors:
            return
        mean_before = sum(b for b, _ in errors.values()) / len(errors)
        mean_after = sum(a for _, a in errors.values()) / len(errors)
        log.info("loftq: relative weight error %.4f -> %.4f (mean over %d layers)", mean_before, mean_after,
                 len(errors))
        state_of(model).history["loftq"] = errors
