"""Zero-shot multiple-choice evaluation (PIQA, ARC-Easy, BoolQ), the protocol of lm-evaluation-harness.

Each example is a context and two or more answers; the model scores each answer as a continuation of the
context and the answer with the highest score is its pick. The sets are found as :mod:`lowbit.data` says:
``--data``/``$LOWBIT_DATA``/``../shared/data`` ``tasks/`` files, else the Hugging Face datasets cache.

Prompts (lm-eval's, zero-shot, answers joined to the context by one space, its ``target_delimiter``):

* ``piqa`` (validation, 1,838): ``"Question: {goal}\\nAnswer:"`` -> ``" {sol1}"`` / ``" {sol2}"``;
* ``arc_easy`` (test, 2,376): ``"Question: {question}\\nAnswer:"`` -> ``" {text}"`` for each choice; the gold
  index is the answer key's position in the label list, so ``A``-``E`` and ``1``-``5`` labels both work;
* ``boolq`` (dev, 3,270): ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` -> ``" no"`` / ``" yes"``.

Scoring: the log-likelihood of a continuation is the sum of the log-probabilities (natural log) of its tokens
given everything before them. As lm-eval does, trailing whitespace of the context moves to the continuation,
then ``context + continuation`` and the context are tokenized separately with the tokenizer's defaults (a BOS
only where the tokenizer adds one by itself) and the continuation's tokens are ``whole[len(context_tokens):]``,
so a merge across the boundary is counted in the continuation. Sequences longer than ``max_length + 1`` tokens
lose tokens on the left. Metrics per task:

* ``acc``: share of examples where the gold answer has the highest log-likelihood;
* ``acc_norm``: the same with each log-likelihood divided by the answer's length in characters, without the
  delimiter (lm-eval's ``len(choice)`` for ``doc_to_choice``): ``" yes"`` counts 3, ``" no"`` 2;
* ``n``: examples scored.

lm-eval reports only ``acc`` for BoolQ; ``acc_norm`` is given here too, by the same rule, for completeness.

The answers of one example run as one batch (right-padded, one attention mask), in ``torch.inference_mode``; with
``batch_tokens`` several examples of similar length share a forward (left-padded, position ids from the mask):
faster, at the price described in :func:`evaluate_examples`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import SETS, hub_rows, local_path
from ..errors import LowbitError
from ..fileio import read_text
from ..kernels import fp32_activations

MAX_LENGTH = 2048  # tokens of context + continuation the model sees (left truncation beyond it)
BATCH_TOKENS = 4096  # padded input tokens per forward (rows × longest row) where batches are asked for
BATCH_POSITIONS = 512  # scored positions per forward (rows × longest continuation), each a vocab-wide logit row


@dataclass(frozen=True)
class Example:
    """One multiple-choice question: ``context`` (the prompt), ``choices`` (answer texts, without the
    delimiter), ``gold`` (index of the right answer in ``choices``). The scored continuation of answer ``i``
    is ``delimiter + choices[i]``."""

    context: str
    choices: list[str]
    gold: int
    delimiter: str = " "

    @property
    def continuations(self) -> list[str]:
        return [self.delimiter + c for c in self.choices]


# ---- data -------------------------------------------------------------------------------------------------

def task_rows(key: str) -> tuple[str, list[dict]]:
    """``(where, rows)`` of task ``key``: its JSONL file in the data folder (PIQA's labels file merged in as
    ``label``), or its rows from the Hugging Face datasets cache (BoolQ's 0/1 labels as booleans, as in the file)."""
    path = local_path(key)
    if path is None:
        rows = [dict(r) for r in hub_rows(key)]
        if key == "boolq":
            rows = [{**r, "label": bool(r["label"])} if r.get("label") in (0, 1) else r for r in rows]
        return SETS[key].repo, rows
    rows = _jsonl(path)
    if key == "piqa":
        labels_path = path.with_name("valid-labels.lst")
        if not labels_path.is_file():
            raise LowbitError(f"{labels_path} is missing; restore the PIQA labels beside {path.name}")
        labels = [line.strip() for line in read_text(labels_path, "task labels file").splitlines() if line.strip()]
        if len(labels) != len(rows):
            raise LowbitError(f"{labels_path} has {len(labels)} labels for the {len(rows)} rows of {path}")
        for number, label in enumerate(labels, 1):
            if label not in ("0", "1"):
                raise LowbitError(f"{labels_path}:{number} is {label!r}, not 0 or 1")
        rows = [{**row, "label": int(label)} for row, label in zip(rows, labels, strict=True)]
    return str(path), rows


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(read_text(path, "task file").split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise LowbitError(f"{path}:{number} is not valid JSON ({e})") from e
        if not isinstance(rows[-1], dict):
            raise LowbitError(f"{path}:{number} is not a JSON object; restore the task file")
    return rows


def _field(where: str, number: int, row: dict, key: str):
    if key not in row:
        raise LowbitError(f"{where}:{number} has no {key!r} field")
    return row[key]


def load_piqa() -> list[Example]:
    """PIQA validation: ``{goal, sol1, sol2, label}`` (``piqa/valid.jsonl`` with ``valid-labels.lst``)."""
    where, rows = task_rows("piqa")
    out = []
    for number, row in enumerate(rows, 1):
        goal, sol1, sol2, label = (_field(where, number, row, k) for k in ("goal", "sol1", "sol2", "label"))
        if label not in (0, 1):
            raise LowbitError(f"{where}:{number}: label is {label!r}, not 0 or 1")
        out.append(Example(f"Question: {goal}\nAnswer:", [sol1, sol2], int(label)))
    return out


def load_arc_easy() -> list[Example]:
    """ARC-Easy test: ``arc_easy/ARC-Easy-test.jsonl`` ``{id, question, choices: {text, label}, answerKey}``;
    gold = position of ``answerKey`` among the labels (``A``-``E`` or ``1``-``5``)."""
    where, rows = task_rows("arc_easy")
    out = []
    for number, row in enumerate(rows, 1):
        choices = _field(where, number, row, "choices")
        texts, labels = choices.get("text", []), choices.get("label", [])
        key = _field(where, number, row, "answerKey")
        if len(texts) != len(labels) or len(texts) < 2 or key not in labels:
            raise LowbitError(f"{where}:{number}: answerKey {key!r} is not one of the labels {labels} "
                              f"(or the {len(texts)} texts do not match them)")
        out.append(Example(f"Question: {_field(where, number, row, 'question')}\nAnswer:", list(texts),
                           labels.index(key)))
    return out


def load_boolq() -> list[Example]:
    """BoolQ dev (SuperGLUE ``val.jsonl``): ``{question, passage, idx, label: bool}``; answers ``no``/``yes``,
    gold = 1 (yes) when ``label`` is true. lm-eval reports only ``acc`` for BoolQ; ``acc_norm`` is computed here
    by the same character-length rule as the other tasks."""
    where, rows = task_rows("boolq")
    out = []
    for number, row in enumerate(rows, 1):
        label = _field(where, number, row, "label")
        if not isinstance(label, bool):
            raise LowbitError(f"{where}:{number}: label must be a JSON boolean, got {label!r}")
        passage, question = _field(where, number, row, "passage"), _field(where, number, row, "question")
        context = f"{passage}\nQuestion: {question}?\nAnswer:"
        out.append(Example(context, ["no", "yes"], int(label)))
    return out


TASKS: dict[str, Callable[[], list[Example]]] = {
    "piqa": load_piqa,
    "arc_easy": load_arc_easy,
    "boolq": load_boolq,
}


def resolve_tasks(names: list[str]) -> list[str]:
    """Known task names in the given order, duplicates dropped; a LowbitError lists the known ones."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise LowbitError(f"no task given; choose from {', '.join(TASKS)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise LowbitError(f"unknown task {', '.join(map(repr, unknown))}; known tasks: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def load_task(name: str, limit: int | None = None) -> list[Example]:
    """The examples of task ``name``, the first ``limit`` of them if given (file order, deterministic)."""
    (name,) = resolve_tasks([name])
    if limit is not None and limit < 1:
        raise LowbitError(f"limit must be a positive number of examples, got {limit}")
    examples = TASKS[name]()
    return examples if limit is None else examples[:limit]


# ---- scoring ----------------------------------------------------------------------------------------------

def _ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text).input_ids
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` as lm-eval splits them: trailing whitespace of ``context`` moves to
    ``continuation``; ``continuation_ids = ids(context + continuation)[len(ids(context)):]``. An empty context
    becomes the EOS (else BOS) token, as lm-eval conditions on its end-of-text token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _ids(tokenizer, context + continuation)
    context_ids = _ids(tokenizer, context) if context else []
    continuation_ids = whole[len(context_ids):]
    if not context_ids:
        start = getattr(tokenizer, "eos_token_id", None)
        start = start if start is not None else getattr(tokenizer, "bos_token_id", None)
        if start is None:
            raise LowbitError("an empty context needs a tokenizer with an EOS or BOS token to condition on")
        context_ids = [int(start)]
    if not continuation_ids:
        raise LowbitError(f"the continuation {continuation!r} of {context[-40:]!r} gives no tokens")
    return context_ids, continuation_ids


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
@fp32_activations()
def pair_logliks(model, pairs: list[tuple[list[int], list[int]]], max_length: int = MAX_LENGTH,
                 pad_id: int = 0, left: bool = False) -> list[float]:
    """Log-likelihood (natural log, summed over tokens) of each ``(context_ids, continuation_ids)`` pair, all
    pairs in one forward: rows ``(context + continuation)[-(max_length + 1):][:-1]`` right-padded to ``(rows, L)``
    with an attention mask, each distinct row once (answers of one token after the same context, BoolQ's
    ``no``/``yes``, share one row); only the positions that predict continuation tokens are run through the LM head
    (``logits_to_keep`` where the model takes it). ``left`` (for rows of several examples; models that take
    ``position_ids``): left-padded instead, positions counted from each row's first token, so every continuation
    ends at the last position and the head runs over the longest continuation only."""
    rows, conts = [], []
    for ctx, cont in pairs:
        if len(cont) > max_length:
            raise LowbitError(f"a continuation of {len(cont)} tokens does not fit max_length={max_length}")
        seq = (list(ctx) + list(cont))[-(max_length + 1):]
        rows.append(seq[:-1])
        conts.append(list(cont))
    distinct: dict[tuple[int, ...], int] = {}  # row -> its index in the batch
    for row in rows:
        distinct.setdefault(tuple(row), len(distinct))
    width = max(len(r) for r in rows)
    left = left and _accepts(model, "position_ids")
    device = next(model.parameters(), torch.empty(0)).device
    ids = torch.full((len(distinct), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(distinct), width), dtype=torch.long)
    for row, i in distinct.items():
        start = width - len(row) if left else 0
        ids[i, start:start + len(row)] = torch.tensor(row)
        mask[i, start:start + len(row)] = 1
    kwargs = {"attention_mask": mask.to(device)}
    if left:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        keep = max(len(c) for c in conts)  # every row ends at the last position
    else:
        first = min(len(r) - len(c) for r, c in zip(rows, conts, strict=True))  # first position scoring a token
        keep = width - first
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    logits = model(ids.to(device), **kwargs).logits[:, -keep:]  # (rows, keep, vocab): the last `keep` positions
    out = []
    for row, cont in zip(rows, conts, strict=True):
        end = keep if left else len(row) - first  # just past the row's last position, in the kept positions
        logprobs = torch.log_softmax(logits[distinct[tuple(row)], end - len(cont):end].float(), dim=-1)
        target = torch.tensor(cont, device=logprobs.device)
        out.append(logprobs.gather(-1, target[:, None]).sum().item())
    return out


def example_pairs(tokenizer, example: Example) -> list[tuple[list[int], list[int]]]:
    """``(context_ids, continuation_ids)`` of each answer of ``example`` (:func:`encode_pair`)."""
    return [encode_pair(tokenizer, example.context, c) for c in example.continuations]


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else 0


def example_logliks(model, tokenizer, example: Example, max_length: int = MAX_LENGTH) -> list[float]:
    """Log-likelihood of each continuation of ``example`` given its context (one batched forward)."""
    return pair_logliks(model, example_pairs(tokenizer, example), max_length=max_length, pad_id=_pad_id(tokenizer))


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of equal maxima, as numpy's argmax


def predictions(example: Example, logliks: list[float]) -> tuple[int, int]:
    """``(pick, pick_norm)``: argmax of the log-likelihoods, and of each divided by its answer's length in
    characters (without the delimiter; lm-eval's acc_norm)."""
    normed = [ll / max(len(c), 1) for ll, c in zip(logliks, example.choices, strict=True)]
    return _argmax(logliks), _argmax(normed)


def batches(pairs: list[list[tuple[list[int], list[int]]]], max_length: int = MAX_LENGTH,
            tokens: int = BATCH_TOKENS, positions: int = BATCH_POSITIONS) -> list[list[int]]:
    """Indices of the examples whose answers' ``pairs`` are given, grouped into forwards: examples of similar length
    together (sorted by their longest row), each group within ``tokens`` of padded input (rows × longest row) and
    ``positions`` scored positions (rows × longest continuation: the LM head's output, a vocab-wide row each); an
    example over either budget alone is a group of its own."""
    sizes = sorted((min(max(len(c) + len(k) for c, k in group) - 1, max_length), len(group),
                    max(len(k) for _, k in group), i) for i, group in enumerate(pairs))
    groups: list[list[int]] = []
    rows = width = cont = 0
    for w, n, k, i in sizes:
        if groups and ((rows + n) * max(width, w) > tokens or (rows + n) * max(cont, k) > positions):
            rows = width = cont = 0  # this example starts the next group
        if rows == 0:
            groups.append([])
        groups[-1].append(i)
        rows, width, cont = rows + n, max(width, w), max(cont, k)
    return groups


def scored(model, tokenizer, examples: list[Example], max_length: int = MAX_LENGTH, batch_tokens: int = 0):
    """Yield ``(index, log-likelihoods of its answers)`` for every example, one forward per example
    (``batch_tokens=0``, right-padded) or per :func:`batches` group of up to ``batch_tokens`` padded tokens
    (left-padded); see :func:`evaluate_examples` for what batching changes."""
    if batch_tokens < 0:
        raise LowbitError(f"batch_tokens must be 0 (one example per forward) or a positive count, got {batch_tokens}")
    pairs = [example_pairs(tokenizer, ex) for ex in examples]
    groups = batches(pairs, max_length, tokens=batch_tokens) if batch_tokens else [[i] for i in range(len(pairs))]
    for group in groups:
        flat = pair_logliks(model, [p for i in group for p in pairs[i]], max_length, _pad_id(tokenizer),
                            left=bool(batch_tokens))
        for i in group:
            yield i, flat[:len(pairs[i])]
            flat = flat[len(pairs[i]):]


def evaluate_examples(model, tokenizer, examples: list[Example], desc: str = "tasks", progress: bool = True,
                      max_length: int = MAX_LENGTH, batch_tokens: int = 0) -> dict:
    """``{"acc", "acc_norm", "n"}`` over ``examples``: one example per forward (``batch_tokens=0``, the protocol
    every figure in BENCHMARKS.md used), or :func:`batches` of up to ``batch_tokens`` padded tokens, left-padded.
    Batches are faster (SmolLM2 packed, 2 cores: 1.4-2.1×), but a log-likelihood depends on the padding and on its
    neighbours through floating-point summation order — and through each bf16 rounding of a packed model's tiled
    products, which moved some by up to 1e-1 relative and flipped up to 2 picks in 100 on SmolLM2 (acc within ±1
    point on 300 examples)."""
    if not examples:
        raise LowbitError(f"{desc}: no examples to evaluate")
    hits = hits_norm = done = 0
    bar = tqdm(total=len(examples), desc=desc, unit="q", disable=not progress, leave=False)
    for i, lls in scored(model, tokenizer, examples, max_length, batch_tokens):
        pick, pick_norm = predictions(examples[i], lls)
        hits += pick == examples[i].gold
        hits_norm += pick_norm == examples[i].gold
        done += 1
        bar.update(1)
        bar.set_postfix(acc=f"{hits / done:.3f}", acc_norm=f"{hits_norm / done:.3f}")
    bar.close()
    return {"acc": hits / len(examples), "acc_norm": hits_norm / len(examples), "n": len(examples)}


def evaluate_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, progress: bool = True,
                   max_length: int = MAX_LENGTH, batch_tokens: int = 0) -> dict[str, dict]:
    """Zero-shot accuracy of ``model`` on each task: ``{"piqa": {"acc": float, "acc_norm": float, "n": int}, ...}``.

    ``limit``: only the first N examples of each task; ``batch_tokens``: as in :func:`evaluate_examples`. Every
    task's data is read before any scoring, so a missing file fails at once. The model runs in eval mode (its
    previous mode is restored afterwards)."""
    names = resolve_tasks(list(tasks))
    data = {name: load_task(name, limit) for name in names}
    was_training = model.training
    model.eval()
    try:
        return {name: evaluate_examples(model, tokenizer, examples, desc=name, progress=progress,
                                        max_length=max_length, batch_tokens=batch_tokens)
                for name, examples in data.items()}
    finally:
        model.train(was_training)
