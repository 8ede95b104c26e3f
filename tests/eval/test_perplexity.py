"""The perplexity protocol: dataset rows, one tokenization, non-overlapping windows, mean of window NLLs."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ByteTokenizer, tiny_model

from lowbit import LowbitError
from lowbit import data as data_mod
from lowbit.eval.perplexity import perplexity


def test_rows_keep_newlines_and_blank_lines_become_empty():
    rows = data_mod.wikitext2_rows("test")
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert len(rows) == 4358 and all(r == "" or r.endswith("\n") for r in rows)
    text = data_mod.wikitext2_text("test")
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n")


def test_ppl_is_exp_of_mean_window_nll(monkeypatch):
    p = sys.modules["lowbit.eval.perplexity"]  # the package re-exports a function of the same name

    monkeypatch.setattr(p, "wikitext2_text", lambda split="test": "abcdefgh" * 40)
    p._tokenized.cache_clear()
    model = tiny_model("llama")
    tok = ByteTokenizer()
    result = perplexity(model, tok, windows=3, seq_len=64, progress=False)
    ids = tok("abcdefgh" * 40).input_ids[0]
    nlls = []
    with torch.no_grad():
        for i in range(3):
            w = ids[i * 64:(i + 1) * 64].unsqueeze(0)
            logits = model(w).logits[0, :-1]
            nlls.append(F.cross_entropy(logits, w[0, 1:]).item())
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / 3), rel=1e-6)
    assert (result.windows, result.total_windows, result.tokens) == (3, 320 // 64, 320)
    assert "first 3 of 5" in result.label()
    again = perplexity(model, tok, windows=3, seq_len=64, progress=False)
    assert again.ppl == result.ppl  # deterministic
    with pytest.raises(LowbitError, match="between 1 and 5"):
        perplexity(model, tok, windows=6, seq_len=64, progress=False)
    p._tokenized.cache_clear()


def test_missing_data_folder_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    with pytest.raises(LowbitError, match="LOWBIT_DATA"):
        data_mod.wikitext2_rows("test")
    with pytest.raises(LowbitError, match="train is not available"):
        data_mod.wikitext2_path("train")
