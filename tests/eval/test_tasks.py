"""Zero-shot multiple-choice tasks: the real data files, lm-eval's prompt and token split, exact scoring with a
hand-built model, batching, truncation, and ``lowbit eval --tasks`` on a tiny checkpoint."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ByteTokenizer, tiny_model, word_tokenizer
from test_cli import invoke, no_loading, one_error_line, one_json_object  # noqa: F401 (no_loading: a fixture)
from torch import nn

import lowbit
from lowbit import LowbitError
from lowbit.data import data_dir
from lowbit.eval import tasks as T

# ---- data ---------------------------------------------------------------------------------------------------


def test_piqa_loads_every_row_with_lm_eval_prompt():
    examples = T.load_piqa()
    assert len(examples) == 1838
    assert {e.gold for e in examples} == {0, 1} and all(len(e.choices) == 2 for e in examples)
    first = json.loads((data_dir() / "tasks/piqa/valid.jsonl").open().readline())
    labels = (data_dir() / "tasks/piqa/valid-labels.lst").read_text().split()
    assert examples[0].context == f"Question: {first['goal']}\nAnswer:"
    assert examples[0].continuations == [" " + first["sol1"], " " + first["sol2"]]
    assert [e.gold for e in examples] == [int(x) for x in labels]


def test_arc_easy_loads_every_row_and_maps_numeric_labels():
    examples = T.load_arc_easy()
    assert len(examples) == 2376
    assert all(0 <= e.gold < len(e.choices) for e in examples)
    assert sorted({len(e.choices) for e in examples}) == [3, 4, 5]
    rows = [json.loads(line) for line in (data_dir() / "tasks/arc_easy/ARC-Easy-test.jsonl").open()]
    assert rows[0]["id"] == "Mercury_417466" and examples[0].context.startswith("Question: Which statement best")
    numeric = [(r, e) for r, e in zip(rows, examples, strict=True) if r["choices"]["label"][0] == "1"]
    assert len(numeric) == 97
    assert all(e.gold == int(r["answerKey"]) - 1 for r, e in numeric)
    letters = [(r, e) for r, e in zip(rows, examples, strict=True) if r["choices"]["label"][0] == "A"]
    assert all(e.gold == "ABCDE".index(r["answerKey"]) for r, e in letters)
    assert all(e.choices == r["choices"]["text"] for r, e in letters[:50])


def test_boolq_loads_every_row_with_no_yes_answers():
    examples = T.load_boolq()
    assert len(examples) == 3270
    assert sum(e.gold for e in examples) == 2033  # true labels, per the data README
    first = json.loads((data_dir() / "tasks/boolq/val.jsonl").open().readline())
    assert examples[0].context == f"{first['passage']}\nQuestion: {first['question']}?\nAnswer:"
    assert examples[0].continuations == [" no", " yes"] and examples[0].gold == int(first["label"])


def test_limit_takes_the_first_examples():
    assert T.load_task("arc_easy", limit=5) == T.load_arc_easy()[:5]
    with pytest.raises(LowbitError, match="positive"):
        T.load_task("piqa", limit=0)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(LowbitError, match=r"unknown task 'hellaswag'; known tasks: piqa, arc_easy, boolq"):
        T.evaluate_tasks(None, None, ["piqa", "hellaswag"])
    assert T.resolve_tasks([" boolq", "piqa", "boolq", ""]) == ["boolq", "piqa"]


def test_missing_file_names_it_and_the_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    with pytest.raises(LowbitError) as err:
        T.load_boolq()
    assert str(tmp_path / "tasks" / "boolq" / "val.jsonl") in str(err.value) and "LOWBIT_DATA" in str(err.value)


# ---- token split ----------------------------------------------------------------------------------------------


def _bpe(merges: list[tuple[str, str]], bos: bool = False):
    """A character BPE over a-e and space with the given merges; ``bos``: prepend <s> by default."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abcde ")}}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, merges))
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>"), vocab


def test_continuation_tokens_are_those_after_the_context():
    tok, v = _bpe([("a", "b")])
    assert T.encode_pair(tok, "ca", " de") == ([v["c"], v["a"]], [v[" "], v["d"], v["e"]])
    # a merge across the boundary: lm-eval keeps the context's own tokens and cuts the whole string after them
    assert tok("cabd").input_ids == [v["c"], v["ab"], v["d"]]
    assert T.encode_pair(tok, "ca", "bd") == ([v["c"], v["a"]], [v["d"]])
    # trailing whitespace of the context moves to the continuation
    assert T.encode_pair(tok, "ca ", "d") == ([v["c"], v["a"]], [v[" "], v["d"]])


def test_bos_only_where_the_tokenizer_adds_it():
    tok, v = _bpe([], bos=True)
    assert T.encode_pair(tok, "ab", " c") == ([v["<s>"], v["a"], v["b"]], [v[" "], v["c"]])
    plain = word_tokenizer()  # adds nothing
    ctx, cont = T.encode_pair(plain, "the of", " and")
    assert ctx == plain("the of").input_ids and 1 not in ctx and cont == plain("and").input_ids


# ---- scoring --------------------------------------------------------------------------------------------------


class BiasLM(nn.Module):
    """Logits that ignore the input: ``bias`` (vocab,) at every position, so a continuation's log-likelihood is
    the sum of ``log_softmax(bias)`` over its tokens. Records each batch it is called with."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.float(), requires_grad=False)
        self.calls: list[tuple[int, int]] = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(tuple(input_ids.shape))
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def _expected(bias: torch.Tensor, text: str) -> float:
    lp = torch.log_softmax(bias.float(), -1)
    return sum(lp[b].item() for b in text.encode())


def test_scoring_picks_the_continuation_the_model_prefers():
    bias = torch.zeros(256)
    bias[list(b"yes")] = 6.0  # the model likes the letters of "yes"
    model = BiasLM(bias)
    ex = T.Example("Question: is it?\nAnswer:", ["no", "yes"], gold=1)
    lls = T.example_logliks(model, ByteTokenizer(), ex)
    assert lls == pytest.approx([_expected(bias, " no"), _expected(bias, " yes")], abs=1e-5)
    assert lls[1] > lls[0] and T.predictions(ex, lls) == (1, 1)
    assert model.calls == [(2, len(ex.context) + 3)]  # both answers in one forward, right-padded


def test_acc_and_acc_norm_are_exact(monkeypatch):
    # uniform logits: every byte costs log(256), so acc picks the shortest answer and acc_norm, dividing by
    # len(choice) (not counting the delimiter), picks the longest: (L + 1) / L falls with L
    model = BiasLM(torch.zeros(256))
    toy = [
        T.Example("ctx one", ["ab", "abcdef"], gold=1),  # acc wrong, acc_norm right
        T.Example("ctx two", ["abcdef", "ab"], gold=1),  # acc right, acc_norm wrong
        T.Example("ctx three", ["a", "abc", "abcde"], gold=2),  # acc wrong, acc_norm right
        T.Example("ctx four", ["abcd", "abc"], gold=1),  # acc right, acc_norm wrong
    ]
    lls = T.example_logliks(model, ByteTokenizer(), toy[2])
    assert lls == pytest.approx([-2 * math.log(256), -4 * math.log(256), -6 * math.log(256)], abs=1e-4)
    assert T.predictions(toy[2], lls) == (0, 2)  # counting the delimiter would tie all three at -log(256)
    monkeypatch.setitem(T.TASKS, "toy", lambda: list(toy))
    model.train()
    result = T.evaluate_tasks(model, ByteTokenizer(), ["toy"], progress=False)
    assert result == {"toy": {"acc": 0.5, "acc_norm": 0.5, "n": 4}}
    assert model.training  # the mode is restored
    assert T.evaluate_tasks(model, ByteTokenizer(), ["toy"], limit=3, progress=False) == {
        "toy": {"acc": 1 / 3, "acc_norm": 2 / 3, "n": 3}}


def _reference_loglik(model, ctx: list[int], cont: list[int]) -> float:
    """One unpadded forward over ``ctx + cont``, full logits: the sum of the continuation's log-probs."""
    with torch.inference_mode():
        logits = model(torch.tensor([ctx + cont])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_batched_choices_match_one_at_a_time_and_an_unpadded_reference():
    model = tiny_model("llama")
    tok = ByteTokenizer()
    ex = T.Example("The kettle is hot.\nAnswer:", ["pour the water", "no", "wait a minute or two"], gold=0)
    pairs = [T.encode_pair(tok, ex.context, c) for c in ex.continuations]
    batched = T.pair_logliks(model, pairs)
    single = [T.pair_logliks(model, [p])[0] for p in pairs]
    reference = [_reference_loglik(model, c, k) for c, k in pairs]
    assert batched == pytest.approx(single, abs=1e-5)
    assert batched == pytest.approx(reference, abs=1e-4)
    assert T.example_logliks(model, tok, ex) == pytest.approx(batched, abs=1e-6)


def test_one_token_answers_after_one_context_share_one_row():
    """BoolQ's no/yes: both rows are the context, run once (a batch of one row), scored as when run apart."""
    model = tiny_model("llama")
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))  # pair_logliks passes ids first
    ctx = list(range(10, 30))
    pairs = [(ctx, [40]), (ctx, [41]), (ctx[:7], [42, 43])]
    got = T.pair_logliks(model, pairs)
    assert seen == [torch.Size([2, 20])]  # two distinct rows: the shared context, and ctx[:7] + [42]
    assert got == pytest.approx([_reference_loglik(model, c, k) for c, k in pairs], abs=1e-4)


def test_long_inputs_are_truncated_on_the_left():
    model = tiny_model("llama")
    ctx, cont = list(range(10, 40)), [50, 51, 52]
    got = T.pair_logliks(model, [(ctx, cont), (ctx[:5], cont)], max_length=12)
    seq = (ctx + cont)[-13:]  # the model sees the last 12 tokens as input, scoring the last 3 of them
    assert got[0] == pytest.approx(_reference_loglik(model, seq[:-3], cont), abs=1e-4)
    assert got[1] == pytest.approx(_reference_loglik(model, ctx[:5], cont), abs=1e-4)
    with pytest.raises(LowbitError, match="does not fit"):
        T.pair_logliks(model, [(ctx, cont)], max_length=2)


def test_batches_of_examples_keep_the_budgets_and_score_as_one_example_per_forward():
    """Examples grouped by length within the padded-token and scored-position budgets (each exactly once; one over
    a budget alone); left-padded rows of several examples give each answer its unpadded log-likelihood (fp32
    model: within summation order), and the accuracies of one example per forward."""
    pairs = [[(list(range(n)), [7] * k) for k in (1, 3)] for n in (5, 40, 12, 90, 3, 25)]
    groups = T.batches(pairs, tokens=150, positions=8)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for group in groups:
        rows = sum(len(pairs[i]) for i in group)
        width = max(len(c) + len(k) - 1 for i in group for c, k in pairs[i])
        assert len(group) == 1 or (rows * width <= 150 and rows * 3 <= 8)
    assert [3] in groups  # 2 rows × 92 tokens: over the budget alone

    model = tiny_model("llama")
    tok = ByteTokenizer()
    examples = [T.Example(f"Question {i}: what goes in the kettle{'?' * i}\nAnswer:", ["water", "tea", "a cat"], i % 3)
                for i in range(7)]
    flat = [p for ex in examples for p in T.example_pairs(tok, ex)]
    batched = T.pair_logliks(model, flat, left=True)
    assert batched == pytest.approx([_reference_loglik(model, c, k) for c, k in flat], abs=1e-4)
    one_each = T.evaluate_examples(model, tok, examples, progress=False)
    assert T.evaluate_examples(model, tok, examples, progress=False, batch_tokens=300) == one_each
    with pytest.raises(LowbitError, match="batch_tokens must be 0"):
        T.evaluate_examples(model, tok, examples, progress=False, batch_tokens=-5)


# ---- command line ---------------------------------------------------------------------------------------------


def test_cli_tasks_json(ckpt):
    payload = one_json_object(invoke("eval", ckpt, "--tasks", "piqa", "--limit", "3", "--json"))
    assert list(payload) == ["piqa"] and payload["piqa"]["n"] == 3
    assert all(payload["piqa"][k] in (0, 1 / 3, 2 / 3, 1) for k in ("acc", "acc_norm"))  # hits out of 3
    model, tok = lowbit.load(ckpt)
    assert payload == T.evaluate_tasks(model, tok, ["piqa"], limit=3, progress=False)


@pytest.mark.parametrize("args,expected", [
    (["--tasks", "piqa,hellaswag"], "unknown task 'hellaswag'; known tasks: piqa, arc_easy, boolq"),
    (["--tasks", " , "], "no task given"),
    (["--tasks", "piqa", "--limit", "0"], "--limit must be a positive number of examples, got 0"),
    (["--limit", "3"], "--limit applies only with --tasks"),
    (["--tasks", "piqa", "--batch-tokens", "-1"], "--batch-tokens must be 0 (one example per forward) or a positive"),
])
def test_cli_bad_tasks_fail_before_loading(ckpt, no_loading, args, expected):  # noqa: F811
    line = one_error_line(invoke("eval", ckpt, *args, "--json"))
    assert expected in line, line
    assert no_loading == []


def test_cli_missing_task_file_fails_before_loading(ckpt, no_loading, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    line = one_error_line(invoke("eval", ckpt, "--tasks", "arc_easy", "--json"))
    assert str(tmp_path / "tasks" / "arc_easy" / "ARC-Easy-test.jsonl") in line and "LOWBIT_DATA" in line
    assert no_loading == []


def test_cli_tasks_table_for_people(ckpt, monkeypatch):
    from rich.console import Console

    import lowbit.cli.common

    monkeypatch.setattr(lowbit.cli.common, "out_console", Console(width=200, soft_wrap=True))
    result = invoke("eval", ckpt, "--tasks", "boolq,piqa", "--limit", "2")
    assert result.exit_code == 0, (result.stderr, result.exception)
    rows = [line for line in result.stdout.splitlines() if "boolq" in line or "piqa" in line]
    assert len(rows) == 2 and rows[0].split()[1] == "boolq" and rows[0].split()[-2] == "2", result.stdout
