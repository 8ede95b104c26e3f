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
    engine: str = "transformers"  # or "native" (lowbit.native: one C++ call per decode token)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def decode_speed(model, tokenizer, new_tokens: int = 128, prompt: str = "The history of the city",
                 warmup_tokens: int = 8, batch: int = 1, native: bool = False) -> DecodeSpeed:
    """Greedy-decode exactly ``new_tokens`` tokens after a short prompt, for ``batch`` copies of it at once; a
    warm-up run goes first (it also triggers any one-time kernel compilation, which is not part of the timing).
    Tokens per second count every sequence's tokens. ``native``: through :mod:`lowbit.native` where it applies
    to the model and batch (else transformers' ``generate``, and ``engine`` says so)."""
    from ..native import native_decoder

    ids = tokenizer(prompt, return_tensors="pt").input_ids.expand(batch, -1).contiguous()
    step = native_decoder(model, ids.shape[1] + max(new_tokens, warmup_tokens), batch) if native else None
    if step is not None:
        def generate(n):
            return step.generate(ids, n)
    else:
        kwargs = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id, eos_token_id=None)

        def generate(n):
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
    generate(warmup_tokens)
    reset_counts()
    start = time.perf_counter()
    out = generate(new_tokens)
    seconds = time.perf_counter() - start
    produced = out.shape[1] - ids.shape[1]
    return DecodeSpeed(tok_s=batch * produced / seconds, new_tokens=produced, seconds=seconds,
                       kernel=kernel_summary(), batch=batch, engine="transformers" if step is None else "native")
