"""Mixture-of-experts experts as one Linear per expert, so every step that packs, calibrates or adapts a Linear
works on each expert unchanged.

transformers stores a block's experts fused: ``gate_up (E, 2I, d)`` and ``down (E, d, I)`` 3-D tensors read by
one module. :class:`ExpertList` holds the same weights as ``E`` :class:`Expert` modules named ``{e}.gate_up_proj``
``(2I, d)`` and ``{e}.down_proj`` ``(d, I)`` and computes the same function: for every token, the sum over its
top-k experts of ``weight · down(act(gate) · up)``. :func:`fused_tensors` stacks (dequantized) weights back into
the fused layout for a float export.
"""

from __future__ import annotations

import torch
from torch import nn

EXPERT_INPUT = "gate_up_proj"  # the name, in each expert, of the Linear reading the tokens routed to it
EXPERT_OUTPUT = "down_proj"  # and of the one writing its output


class Expert(nn.Module):
    """One expert: ``x (n, d)`` -> ``down(act(gate) · up)`` ``(n, d)``, gate and up fused in ``gate_up_proj``."""

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class ExpertList(nn.ModuleList):
    """The experts of one MoE block, called as transformers calls its fused experts module.

    ``forward(hidden (n, d), top_k_index (n, k) int, top_k_weights (n, k))`` -> ``(n, d)``. (Calibration counts
    the tokens each expert receives from its Linears' input statistics.)"""

    @classmethod
    def from_fused(cls, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module) -> ExpertList:
        """From fused tensors ``gate_up (E, 2I, d)`` and ``down (E, d, I)`` (copied; on their device and dtype)."""
        experts = []
        for e in range(gate_up.shape[0]):
            gu = nn.Linear(gate_up.shape[2], gate_up.shape[1], bias=False, device=gate_up.device, dtype=gate_up.dtype)
            dn = nn.Linear(down.shape[2], down.shape[1], bias=False, device=down.device, dtype=down.dtype)
            if not gate_up.is_meta:
                gu.weight.data.copy_(gate_up[e].detach())
                dn.weight.data.copy_(down[e].detach())
            experts.append(Expert(gu, dn, act_fn))
        return cls(experts)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        hits = torch.bincount(top_k_index.reshape(-1), minlength=len(self))[: len(self)]
        for e in hits.nonzero().flatten().tolist():
            token_idx, k_pos = torch.where(top_k_index == e)
            y = self[e](hidden[token_idx]) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def fused_tensors(experts: ExpertList, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate_up (E, 2I, d), down (E, d, I))`` in ``dtype``: the experts' (dequantized) weights stacked back into
    transformers' fused layout."""
    gate_up = torch.stack([e.gate_up_proj.weight.detach().to(dtype) for e in experts])
    down = torch.stack([e.down_proj.weight.detach().to(dtype) for e in experts])
    return gate_up, down
