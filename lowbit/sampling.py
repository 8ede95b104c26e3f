"""Text the float model samples itself: data-free calibration (``--calib-self``) and distillation on the model's
own text (``rilq``'s ``data: self | mixed``)."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import LogitsProcessor

from .errors import LowbitError
from .kernels import native_bf16
from .memory import release_free_memory
from .protocol import CALIB_SEQ_LEN, CALIB_WINDOWS

log = logging.getLogger(__name__)


class CategoricalDraw(LogitsProcessor):
    """Draws each next token from the softmax of the scores (temperature 1, no top-k/top-p) by inverse CDF — one
    uniform number per row against the row's cumulative probabilities (float64) — and hands greedy search a row in
    which only the drawn token is finite. ``banned`` ids (the end-of-text tokens) get probability 0, so every
    sequence runs to its full length. The same distribution as ``generate(do_sample=True)``'s, other draws:
    ``torch.multinomial``'s exponential noise over every vocabulary entry, and the ``where`` that keeps
    ``min_new_tokens``, took about a third of each step for SmolLM2 at 64 sequences on 2 cores."""

    def __init__(self, generator: torch.Generator, banned: list[int]):
        self.generator, self.banned = generator, banned

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.double(), dim=-1)  # (rows, vocab)
        probs[:, self.banned] = 0.0
        cdf = probs.cumsum_(-1)
        u = torch.rand(cdf.shape[0], 1, generator=self.generator, dtype=cdf.dtype, device=self.generator.device)
        drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
        return torch.full_like(scores, -torch.inf).scatter_(1, drawn, 0.0)


@contextlib.contextmanager
def bf16_linear_weights(model: nn.Module, enabled: bool = True):
    """Every fp32 ``nn.Linear`` weight of ``model`` replaced by a bf16 copy while the block runs (restored after,
    tied weights included). Under ``torch.autocast(bfloat16)`` the products are the same — autocast multiplies the
    same bf16 values — but autocast casts each fp32 weight again at every forward (its cast cache holds nothing
    here: the cast was 44% of a decode step of SmolLM2 at 64 sequences). Costs 2 bytes per weight while it runs."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32]
    saved = [m.weight for m in linears] if enabled else []
    try:
        for m, w in zip(linears, saved, strict=False):
            m.weight = nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
        yield model
    finally:
        for m, w in zip(linears, saved, strict=False):
            m.weight = w


def _end_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    return sorted({int(i) for i in ids + ([eos] if eos is not None else [])})


def generated_windows(model: nn.Module, tokenizer, n: int = CALIB_WINDOWS, seq_len: int = CALIB_SEQ_LEN, seed: int = 0,
                      tokens_per_sequence: int = 512, batch: int = 64) -> torch.Tensor:
    """``(n, seq_len)`` token ids the float ``model`` samples itself: data-free calibration.

    Sequences start at the tokenizer's BOS token and are sampled at temperature 1 (no top-k/top-p, so they
    follow the model's own distribution; :class:`CategoricalDraw`), ``tokens_per_sequence`` new tokens each,
    ``batch`` at a time, in bf16 where the CPU has it; they are laid end to end and cut into the windows, so no
    token repeats. Short sequences keep generation cheap (the KV cache makes each step's cost grow with the
    length). Seeded; the global RNG is left as it was."""
    start = getattr(tokenizer, "bos_token_id", None)
    start = getattr(tokenizer, "eos_token_id", None) if start is None else start
    if start is None:
        raise LowbitError("self-generated calibration needs a tokenizer with a BOS or EOS token to start from; "
                          "pass calibration text instead")
    total = n * seq_len
    sequences = -(-total // (tokens_per_sequence + 1))
    device = next(model.parameters()).device
    bf16 = native_bf16(device)
    draw = CategoricalDraw(torch.Generator(device=device).manual_seed(seed), _end_ids(model, tokenizer))
    out = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode(), bf16_linear_weights(model, bf16), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        bar = tqdm(total=sequences * tokens_per_sequence, desc="self-generated calibration", unit="token",
                   leave=False)
        for first in range(0, sequences, batch):
            ids = torch.full((min(batch, sequences - first), 1), start, device=device)
            seqs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                  logits_processor=[draw], max_new_tokens=tokens_per_sequence,
                                  min_new_tokens=0, pad_token_id=start, top_k=None, top_p=None, temperature=None)
            out.append(seqs.cpu())
            bar.update(seqs.shape[0] * tokens_per_sequence)
        bar.close()
    release_free_memory()  # the KV cache
    flat = torch.cat([s.reshape(-1) for s in out])[:total]
    log.info("calibration: %d windows of %d tokens sampled from the model itself", n, seq_len)
    return flat.view(n, seq_len)
