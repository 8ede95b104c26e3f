"""``api.evaluate`` (perplexity, or zero-shot tasks) and ``api.generate`` on any model source."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..data import check_data
from ..errors import LowbitError
from ..eval.perplexity import PerplexityResult, perplexity
from ..models import context_length
from ..nn.kv_cache import make_kv_cache, parse_kv_cache
from ..protocol import EVAL_SEQ_LEN, EVAL_WINDOWS
from .common import Result, check_windows


def _load_with_tokenizer(source: str):
    from ..io import load_model  # read at call time (tests watch what loads)

    model, tokenizer = load_model(source)
    if tokenizer is None:
        raise LowbitError(f"{source} has no tokenizer files; re-save it with a tokenizer")
    return model, tokenizer


@dataclass(frozen=True)
class EvalConfig:
    """``lowbit eval``: WikiText-2 test perplexity over the first ``windows`` windows (None = all) of ``seq_len``
    tokens, or with ``tasks`` zero-shot accuracy on those tasks (``limit``: the first N examples of each;
    ``batch_tokens``: :func:`lowbit.eval.tasks.evaluate_examples`).
    ``kv_cache``: the perplexity's keys and values held as ``float`` (the model's own cache), ``int8`` / ``int4``
    (Hadamard-rotated keys) or ``int8-norot`` / ``int4-norot`` (:mod:`lowbit.nn.kv_cache`)."""

    model: str
    windows: int | None = EVAL_WINDOWS
    seq_len: int = EVAL_SEQ_LEN
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    kv_cache: str = "float"
    batch_tokens: int = 0  # zero-shot examples batched up to this many padded tokens per forward (0: one each)


@dataclass
class EvalResult(Result):
    """Perplexity (``perplexity``) or task accuracies (``tasks``: ``{"piqa": {"acc", "acc_norm", "n"}, ...}``)."""

    perplexity: PerplexityResult | None
    tasks: dict | None
    seconds: float
    kv_cache: str = "float"

    def to_dict(self) -> dict:
        if self.tasks is not None:
            return dict(self.tasks)  # only the task keys, as lm-evaluation-harness users expect
        return {**self.perplexity.to_dict(), "eval": self.perplexity.label(), "kv_cache": self.kv_cache,
                "seconds": self.seconds}


def evaluate(config: EvalConfig) -> EvalResult:
    """Names, limits and data files are checked before the model loads."""
    from ..eval.tasks import evaluate_tasks, load_task, resolve_tasks

    kv_cache = parse_kv_cache(config.kv_cache)
    if config.tasks and kv_cache is not None:
        raise LowbitError("--kv-cache applies to perplexity only; drop --tasks or use --kv-cache float")
    if config.tasks or config.limit is not None:
        if not config.tasks:
            raise LowbitError("--limit applies only with --tasks (e.g. --tasks piqa,arc_easy,boolq)")
        if config.limit is not None and config.limit < 1:
            raise LowbitError(f"--limit must be a positive number of examples, got {config.limit}")
        if config.batch_tokens < 0:
            raise LowbitError(f"--batch-tokens must be 0 (one example per forward) or a positive number of tokens, "
                              f"got {config.batch_tokens}")
        names = resolve_tasks(list(config.tasks))
        for name in names:
            load_task(name, config.limit)  # a missing or malformed file fails here, before the model loads
        model, tokenizer = _load_with_tokenizer(config.model)
        start = time.perf_counter()
        results = evaluate_tasks(model, tokenizer, names, limit=config.limit, batch_tokens=config.batch_tokens)
        return EvalResult(None, results, time.perf_counter() - start)
    check_windows(config.windows, allow_skip=False)
    check_data(test=True)
    model, tokenizer = _load_with_tokenizer(config.model)
    start = time.perf_counter()
    result = perplexity(model, tokenizer, windows=config.windows, seq_len=config.seq_len, kv_cache=kv_cache)
    return EvalResult(result, None, time.perf_counter() - start, "float" if kv_cache is None else kv_cache.name)


@dataclass(frozen=True)
class GenerateConfig:
    """``lowbit generate``: greedy continuation of ``prompt`` — one text, or a list of texts generated as one batch
    (left-padded to the longest) — each wrapped in the chat template when ``chat``, with keys and values cached as
    ``kv_cache`` (``float``, ``int8``, ``int4``, ``int8-norot``, ``int4-norot``). ``engine``: ``native``
    (:mod:`lowbit.native`, one C++ call per token for the whole batch; an error naming why when the model or batch
    is not one it runs), ``transformers`` (``model.generate``) or ``auto`` (native where it applies)."""

    model: str
    prompt: str | list[str]
    max_new_tokens: int = 64
    chat: bool = True
    kv_cache: str = "float"
    engine: str = "auto"


ENGINES = ("auto", "native", "transformers")


@dataclass
class GenerateResult(Result):
    """``prompt`` and ``text``: a string each for one prompt, lists in the prompts' order for several.
    ``new_tokens``: generated tokens in all (each sequence's up to its end-of-sequence id), ``tok_s`` their rate."""

    prompt: str | list[str]
    text: str | list[str]
    new_tokens: int
    seconds: float
    tok_s: float
    kv_cache: str = "float"
    engine: str = "transformers"
    batch: int = 1


def _prompt_ids(tok, prompts: list[str], chat: bool) -> list:
    """Each prompt's token ids ``(T_i,)`` (each prompt non-blank), through the chat template when ``chat`` and the
    tokenizer has one."""
    rows = []
    for prompt in prompts:
        if chat and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"][0]
        else:
            ids = tok(prompt, return_tensors="pt").input_ids[0]
        if ids.numel() == 0:
            raise LowbitError(f"--prompt {prompt!r} encodes to no tokens with this tokenizer; give other text")
        rows.append(ids)
    return rows


def _left_padded(rows: list, pad: int):
    """``(ids (B, T), attention_mask (B, T))`` of the rows left-padded with ``pad`` to the longest, as
    transformers' ``generate`` takes a batch."""
    import torch

    longest = max(r.numel() for r in rows)
    ids = torch.full((len(rows), longest), pad, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - r.numel():], mask[i, longest - r.numel():] = r, 1
    return ids, mask


def generate(config: GenerateConfig) -> GenerateResult:
    import torch

    from ..kernels import prepare
    from ..native import native_decoder, native_reason

    kv_cache = parse_kv_cache(config.kv_cache)
    prompts = [config.prompt] if isinstance(config.prompt, str) else list(config.prompt)
    if config.engine not in ENGINES:
        raise LowbitError(f"--engine must be one of {', '.join(ENGINES)}, got {config.engine!r}")
    if config.engine == "native" and kv_cache is not None:
        raise LowbitError("--engine native keeps a float KV cache: drop --kv-cache or use --engine transformers")
    if config.max_new_tokens < 1:
        raise LowbitError(f"--max-new-tokens must be at least 1, got {config.max_new_tokens}")
    if not prompts:
        raise LowbitError("no --prompt given; pass one, or several (--prompt A --prompt B) to generate a batch")
    for prompt in prompts:
        if not prompt.strip():
            raise LowbitError("--prompt is empty; give the text to continue, e.g. --prompt \"What is the capital of "
                              "France?\"")
    model, tok = _load_with_tokenizer(config.model)
    rows = _prompt_ids(tok, prompts, config.chat)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = _left_padded(rows, 0 if pad is None else pad)
    context, prompt_tokens = context_length(model), ids.shape[1]
    if context is not None and prompt_tokens + config.max_new_tokens > context:
        raise LowbitError(f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {config.max_new_tokens} is more "
                          f"than the model's context of {context} tokens; use --max-new-tokens "
                          f"{max(context - prompt_tokens, 0)} or less, or a shorter prompt")
    cache = {} if kv_cache is None else {"past_key_values": make_kv_cache(model, kv_cache)}
    prepare()  # a first-time kernel build is not generation time
    native, batch = None, len(rows)
    if config.engine != "transformers" and kv_cache is None:
        length = prompt_tokens + config.max_new_tokens
        native = native_decoder(model, length, batch)
        if native is None and config.engine == "native":
            raise LowbitError(f"--engine native does not run this model: {native_reason(model, length, batch)}; use "
                              "--engine transformers")
    stop = model.generation_config.eos_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        if native is not None:
            out = native.generate(ids, config.max_new_tokens, eos_token_id=stop, pad_token_id=pad,
                                  attention_mask=mask if batch > 1 else None)
        else:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=config.max_new_tokens, do_sample=False,
                                 **cache, pad_token_id=pad)
    seconds = time.perf_counter() - start
    stops = set() if stop is None else {stop} if isinstance(stop, int) else set(stop)
    texts, total = [], 0
    for new in out[:, prompt_tokens:].tolist():
        ended = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))  # through the end-of-sequence id
        texts.append(tok.decode(new[:ended], skip_special_tokens=True))
        total += ended
    one = isinstance(config.prompt, str)
    return GenerateResult(config.prompt if one else prompts, texts[0] if one else texts, total, seconds,
                          total / seconds, "float" if kv_cache is None else kv_cache.name,
                          "transformers" if native is None else "native", batch)
