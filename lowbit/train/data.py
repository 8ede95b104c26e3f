"""Training data: token windows of plain text (language modelling) or prompt/response pairs from jsonl.

Both give ``TrainData(input_ids (n, L) int64, labels (n, L) int64)``; labels are ``-100`` where no loss is taken
(the prompt of a pair, padding). The model shifts labels by one position itself (transformers' convention).
Default: WikiText-2 *valid* (the test split is for evaluation only). The seeded, epoch-wise shuffled batches are
drawn by the trainer (:func:`lowbit.train.trainer.batch_indices`), as a pure function of (seed, step).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LowbitError
from ..fileio import read_text

IGNORE = -100


@dataclass
class TrainData:
    input_ids: torch.Tensor  # (n, L) int64
    labels: torch.Tensor  # (n, L) int64, IGNORE where no loss is taken
    source: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def fingerprint(self) -> list:
        """``[examples, seq_len, sha1 of the token ids and labels]``: a resumed run checks it trains on the same
        data."""
        digest = hashlib.sha1(self.input_ids.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return [len(self), int(self.input_ids.shape[1]), digest.hexdigest()[:16]]

    @property
    def loss_tokens(self) -> int:
        """Tokens that carry a loss (after the model's one-position shift, per window one fewer)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


def text_windows(tokenizer, text: str, seq_len: int, source: str = "text") -> TrainData:
    """Contiguous, non-overlapping windows of ``seq_len`` tokens (the tail that does not fill one is dropped)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if n < 1:
        raise LowbitError(f"{source} has {ids.numel()} tokens, fewer than one window of {seq_len}; pass more text "
                          "or a shorter --seq-len")
    windows = ids[: n * seq_len].view(n, seq_len).clone()
    return TrainData(windows, windows.clone(), source)


def jsonl_pairs(tokenizer, path: Path, seq_len: int, prompt_key: str = "prompt",
                response_key: str = "response") -> TrainData:
    """One example per jsonl line ``{"prompt": ..., "response": ...}``: loss on the response only, truncated to
    ``seq_len`` and right-padded with the pad (else EOS) token, an EOS after the response."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows, labels = [], []
    for number, line in enumerate(read_text(path, "data file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowbitError(f"{path} line {number} is not valid JSON ({e})") from e
        for key in (prompt_key, response_key):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise LowbitError(f"{path} line {number} has no string field {key!r}; every line needs "
                                  f"{{\"{prompt_key}\": ..., \"{response_key}\": ...}}")
        prompt = tokenizer(row[prompt_key]).input_ids
        response = tokenizer(row[response_key]).input_ids + eos
        ids = (prompt + response)[:seq_len]
        lab = ([IGNORE] * len(prompt) + response)[:seq_len]
        fill = seq_len - len(ids)
        rows.append(ids + [pad] * fill)
        labels.append(lab + [IGNORE] * fill)
    if not rows:
        raise LowbitError(f"{path} holds no examples; each line must be a JSON object with {prompt_key!r} and "
                          f"{response_key!r}")
    data = TrainData(torch.tensor(rows), torch.tensor(labels), str(path))
    if data.loss_tokens == 0:
        raise LowbitError(f"every response in {path} is cut off by --seq-len {seq_len}; raise it")
    return data


def load_data(tokenizer, path: str | Path | None, seq_len: int) -> TrainData:
    """Text file (``.txt`` or anything not ``.jsonl``) or jsonl pairs; None = WikiText-2 valid."""
    if seq_len < 2:
        raise LowbitError(f"--seq-len must be at least 2, got {seq_len}")
    if path is None:
        from ..data import wikitext2_rows

        return text_windows(tokenizer, " ".join(wikitext2_rows("valid")), seq_len, "WikiText-2 valid")
    path = Path(path)
    if not path.exists():
        raise LowbitError(f"data file {path} does not exist; pass an existing .txt or .jsonl file to --data")
    if not path.is_file():
        raise LowbitError(f"data file {path} is not a file; pass a .txt or .jsonl file to --data")
    if path.stat().st_size == 0:
        raise LowbitError(f"data file {path} is empty")
    if path.suffix == ".jsonl":
        return jsonl_pairs(tokenizer, path, seq_len)
    return text_windows(tokenizer, read_text(path, "data file"), seq_len, str(path))
