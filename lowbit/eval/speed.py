"""Decode speed: greedy generation (batch 1 or a batch of copies), tokens per second of wall time."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..kernels import kernel_summary, reset_counts


@dataclass(frozen=True)
class DecodeSpeed:
    tok_s: float  # new tokens per second over the whole batch (prompt processing included, it is a few tokens)
    new_tokens: int  # per sequence
    seconds: float
    kernel: str  # which qmatmul implementations ran (empty model: "none")
    batch: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def decode_speed(model, tokenizer, new_tokens: int = 128, prompt: str = "The history of the city",
                 warmup_tokens: int = 8, batch: int = 1) -> DecodeSpeed:
    """Greedy-decode exactly ``new_tokens`` tokens after a short prompt, for ``batch`` copies of it at once; a
    warm-up run goes first (it also triggers any one-time kernel compilation, which is not part of the timing).
    Tokens per second count every sequence's tokens."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.expand(batch, -1).contiguous()
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id, eos_token_id=None)
    model.generate(ids, max_new_tokens=warmup_tokens, min_new_tokens=warmup_tokens, **kwargs)
    reset_counts()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    seconds = time.perf_counter() - start
    produced = out.shape[1] - ids.shape[1]
    return DecodeSpeed(tok_s=batch * produced / seconds, new_tokens=produced, seconds=seconds,
                       kernel=kernel_summary(), batch=batch)
