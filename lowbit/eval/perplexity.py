"""WikiText-2 perplexity, the protocol of the GPTQ line of papers (methods.md §9, yardstick.md).

Test split read as dataset rows, joined with "\\n\\n", tokenized once with the tokenizer's defaults, cut into
non-overlapping windows of ``seq_len`` tokens; ``ppl = exp(mean over windows of each window's mean NLL)``.
The first ``windows`` windows are evaluated (16 is the figure lowbit compares on). With ``kv_cache`` each window's
forward runs with a fresh quantized KV cache (:mod:`lowbit.nn.kv_cache`), so every token attends to quantized
keys and values.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import wikitext2_text
from ..errors import LowbitError
from ..kernels import fp32_activations
from ..models import check_seq_len
from ..nn.kv_cache import KVCacheConfig, make_kv_cache
from ..protocol import EVAL_SEQ_LEN, EVAL_WINDOWS, LOGITS_CHUNK


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    windows: int  # windows evaluated
    total_windows: int  # windows the split holds at this seq_len
    seq_len: int
    tokens: int  # tokens in the whole tokenized split

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        return f"WikiText-2 test, windows of {self.seq_len}, first {self.windows} of {self.total_windows}"


@functools.lru_cache(maxsize=4)
def _tokenized(tokenizer, split: str) -> torch.Tensor:
    return tokenizer(wikitext2_text(split), return_tensors="pt").input_ids[0]


@torch.inference_mode()
@fp32_activations()
def window_nll(model, input_ids: torch.Tensor, kv_cache: KVCacheConfig | None = None) -> float:
    """Mean next-token NLL of one window ``input_ids (1, L)``; logits are computed in chunks to bound memory.
    ``kv_cache``: run the forward with a fresh quantized KV cache of this config (None: the model's own)."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cache = {} if kv_cache is None else {"past_key_values": make_kv_cache(model, kv_cache), "use_cache": True}
    if backbone is None or head is None:
        logits = model(input_ids, **cache).logits[0, :-1].float()
        return F.cross_entropy(logits, input_ids[0, 1:]).item()
    hidden = backbone(input_ids, **cache).last_hidden_state[0, :-1]
    targets = input_ids[0, 1:]
    total = 0.0
    for start in range(0, hidden.shape[0], LOGITS_CHUNK):
        logits = head(hidden[start:start + LOGITS_CHUNK]).float()
        total += F.cross_entropy(logits, targets[start:start + LOGITS_CHUNK], reduction="sum").item()
    return total / targets.numel()


def perplexity(model, tokenizer, windows: int | None = EVAL_WINDOWS, seq_len: int = EVAL_SEQ_LEN, split: str = "test",
               progress: bool = True, kv_cache: KVCacheConfig | None = None) -> PerplexityResult:
    """Perplexity over the first ``windows`` windows (None or 0 = all) of ``seq_len`` tokens; ``kv_cache``: each
    window attends to keys and values quantized by a fresh cache of this config (None: float, the model's own)."""
    if seq_len < 2:
        raise LowbitError(f"seq_len must be at least 2, got {seq_len}")
    check_seq_len(model, seq_len)
    ids = _tokenized(tokenizer, split)
    total = ids.numel() // seq_len
    n = total if not windows else windows
    if n < 1 or n > total:
        raise LowbitError(f"windows must be between 1 and {total} (the split holds {total} windows of {seq_len} "
                          f"tokens), got {windows}")
    device = next(model.parameters(), torch.empty(0)).device
    nlls = []
    bar = tqdm(range(n), desc="perplexity", unit="window", disable=not progress, leave=False)
    for i in bar:
        window = ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0).to(device)
        nlls.append(window_nll(model, window, kv_cache))
        bar.set_postfix(ppl=f"{math.exp(sum(nlls) / len(nlls)):.3f}")
    return PerplexityResult(ppl=math.exp(sum(nlls) / n), windows=n, total_windows=total, seq_len=seq_len,
                            tokens=ids.numel())
