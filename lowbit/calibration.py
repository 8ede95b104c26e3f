"""Streaming calibration: run the model one decoder block at a time and collect what each Linear sees.

The inputs of block 0 are captured once for every calibration window; then for each block in turn the
target Linears' input statistics are accumulated online (:class:`~lowbit.hessian.LayerStats`), the
block's layers are quantized, and the *quantized* block is re-run to produce the next block's inputs (the
sequential scheme of GPTQ's drivers). Peak memory is the float model plus one block's activations for all
windows (N × L × d floats: 16 × 2048 × 576 × 4 B = 75 MB for SmolLM2), never a second copy of the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import expert_layer_names
from .data import wikitext2_rows
from .device import to_device
from .errors import LowbitError
from .fileio import read_text
from .hessian import LayerStats
from .kernels import _choice, force, native_bf16
from .memory import release_free_memory, trim_heap
from .models import decoder_blocks
from .nn.attention import calibration_attention
from .nn.experts import EXPERT_INPUT
from .protocol import CALIB_SEQ_LEN, CALIB_WINDOWS
from .sampling import generated_windows
from .state import state_of

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "bf16", "fp32")  # of the calibration forward passes (for_each_block)


def calibration_windows(tokenizer, n: int = CALIB_WINDOWS, seq_len: int = CALIB_SEQ_LEN, seed: int = 0,
                        text: str | None = None) -> torch.Tensor:
    """``n`` random windows ``(n, seq_len)`` of token ids, seeded, from ``text`` or WikiText-2 *valid*
    (rows joined with a space; the test split is for evaluation only)."""
    if text is None:
        text = " ".join(wikitext2_rows("valid"))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    release_free_memory()  # the tokenizer's working memory (~150 MB for WikiText-2 valid) goes back to the OS
    if ids.numel() <= seq_len:
        raise LowbitError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
                          "pass a longer file or shorter windows (seq_len, --calib-seq-len)")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def read_calibration_text(path: str | Path) -> str:
    """Calibration text from a file: plain text as is; ``.jsonl`` rows joined with a space, each row's ``text``
    field or else its ``prompt`` and ``response`` (every other shape is an error naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"calibration file {path} does not exist; pass an existing text or .jsonl file")
    raw = read_text(path, "calibration file")
    if path.suffix != ".jsonl":
        return raw
    rows = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowbitError(f"{path}:{i} is not valid JSON ({e.msg}); each line of a .jsonl file must be one "
                              "object") from e
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            rows.append(row["text"])
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            rows.append(row["prompt"] + " " + row["response"])
        else:
            raise LowbitError(f"{path}:{i} has neither a 'text' string nor 'prompt' and 'response' strings")
    return " ".join(rows)


class StopForward(Exception):
    """Raised by a forward hook to end a model's forward early, once it has seen what it needs."""


@torch.no_grad()
def block_inputs(model: nn.Module, windows: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering block 0 for each window ``(1, L, d)``, and the keyword arguments the model passes
    to its blocks (attention mask, rotary embeddings, positions) for one window."""
    _, blocks = decoder_blocks(model)
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if vocab is not None and windows.numel() and int(windows.max()) >= vocab:
        raise LowbitError(f"calibration token id {int(windows.max())} is outside the model's vocabulary of {vocab}: "
                          "the tokenizer does not belong to this model; use the model's own tokenizer")
    hidden: list[torch.Tensor] = []
    kwargs: dict = {}

    def catch(module, args, kw):
        hidden.append(args[0] if args else kw["hidden_states"])
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for row in windows:
            try:
                model(row.unsqueeze(0), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder block returns for one window's ``hidden (1, L, d)``."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _collect_stats(block: nn.Module, hidden: list[torch.Tensor], kwargs: dict, linears: dict[str, nn.Module],
                   outputs: list[torch.Tensor] | None = None) -> dict[str, LayerStats]:
    """Run ``block`` over every window and accumulate each Linear's input Hessian; ``outputs``, if given, gets
    the block's output ``(1, L, d)`` on each window appended (what a step that trains the block matches).

    Linears that read the very same input tensor (q/k/v, gate/up) share one :class:`LayerStats`, so its
    ``XᵀX`` is computed once (the sharing is found on the first window by tensor identity). Without ``outputs``,
    a window's pass stops as soon as every listed Linear has read its input: the last one (``down_proj`` for a
    whole block) and what follows it would compute an output nothing reads.
    """
    stats: dict[str, LayerStats] = {}
    owner: dict[str, str] = {}  # layer name -> name of the layer whose statistics it shares
    # inputs met in the current window: (data_ptr, shape) -> (first reader, the tensor). Holding the tensor keeps
    # its memory from being reused by a later, different input of the same shape.
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}
    reached: set[str] = set()  # the listed Linears that have read their input in the current window

    def add(name: str, module: nn.Module, x: torch.Tensor) -> None:
        if name not in owner:
            owner[name] = seen.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), (name, x))[0]
        if owner[name] != name:
            return
        if hasattr(module, "calibration_input"):  # rotated / QUAD-split input: what the packed weight sees
            x = module.calibration_input(x)
        if name not in stats:
            stats[name] = LayerStats(torch.zeros(x.shape[-1], x.shape[-1], device=x.device))
        stats[name].add(x)

    def hook(name):
        def fn(module, args):
            add(name, module, args[0])
            reached.add(name)
            if outputs is None and len(reached) == len(linears):
                raise StopForward  # nothing left in this window's pass that anything reads
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for h in hidden:
            seen.clear()
            reached.clear()
            try:
                out = block_output(block, h, kwargs)
            except StopForward:
                continue
            if outputs is not None:
                outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    return {n: stats[owner[n]] if n in owner else _unseen(m) for n, m in linears.items()}


def _unseen(layer: nn.Module) -> LayerStats:
    """Empty statistics of a layer no calibration token reached (an MoE expert the router never chose)."""
    x = torch.zeros(1, layer.in_features)
    if hasattr(layer, "calibration_input"):
        x = layer.calibration_input(x)
    return LayerStats(torch.zeros(x.shape[-1], x.shape[-1]))


def shrink_routed(stats: dict[str, LayerStats], routed: set[str]) -> dict[str, int]:
    """For the layers of MoE experts (``routed`` names), which see only the tokens routed to them: an expert that
    received fewer tokens than its input width has a rank-deficient Hessian, so it is shrunk towards the identity
    (``H + mean(diag H)·I``; ``I`` when no token came), which moves GPTQ towards plain rounding instead of fitting
    a few tokens. Returns ``{name: tokens}`` of those layers, in place on ``stats``."""
    tokens = {}
    for name in sorted(routed & set(stats)):
        st = stats[name]
        tokens[name] = st.tokens
        width = st.hessian.shape[0]
        if st.tokens < width:
            level = float(st.hessian.diagonal().mean()) if st.tokens else 1.0
            st.hessian = st.hessian + level * torch.eye(width, device=st.hessian.device)
    return tokens


Collect = Callable[[list[str]], dict[str, LayerStats]]


@torch.no_grad()
def for_each_block(model: nn.Module, inputs: tuple[list[torch.Tensor], dict] | None,
                   work: Callable[[str, Collect], None], desc: str = "calibrate",
                   load: Callable[[str], None] | None = None, done: Callable[[str], None] | None = None,
                   device: torch.device | None = None, precision: str = "fp32") -> None:
    """The one loop over decoder blocks every block-wise step runs, in memory or streamed.

    For each block (its name prefix ``"model.layers.3."``): ``load(prefix)`` (streamed: fill it from the source),
    ``work(prefix, collect)`` — where ``collect(names)`` runs the block over the calibration windows and returns
    the :class:`LayerStats` of the named Linears in it (MoE experts' shrunk by :func:`shrink_routed`;
    ``collect(names, outputs=[])`` also appends the block's output on each window to that list), and
    ``collect.block``, ``collect.hidden`` (the windows' inputs to this block, ``(1, L, d)`` each, or None) and
    ``collect.kwargs`` (the block's keyword arguments) let a step run the block itself —, then the
    block's outputs become the next block's inputs (so each block is calibrated on what the already quantized
    blocks before it produce), then ``done(prefix)`` (streamed: write the block and free it).

    ``inputs``: :func:`block_inputs` of the calibration windows, or None for data-free work (no forward pass).
    ``device``: where the work runs (a GPU; None = where the model is): the windows' activations move there once,
    each block moves there for its work and back to the CPU before ``done`` — the model stays in CPU memory.
    ``precision``: of the calibration passes (``collect`` and the next block's inputs; not ``work``): ``fp32``,
    or ``bf16``/``auto`` where the device multiplies bf16 natively (autocast matmuls, attention and Hessians from
    bf16 products with fp32 sums; the residual stream stays fp32). Under ``LOWBIT_KERNEL=auto`` the model attends
    through lowbit's CPU kernel (:func:`~lowbit.nn.attention.calibration_attention`).
    """
    prefix, blocks = decoder_blocks(model)
    hidden, kwargs = inputs if inputs is not None else (None, {})
    home = None
    if device is not None and device.type != "cpu":
        home = torch.device("cpu")
        hidden = None if hidden is None else [h.to(device) for h in hidden]
        kwargs = to_device(kwargs, device)
    routed_tokens: dict[str, int] = {}
    kind = hidden[0].device.type if hidden else None  # where the passes compute: where the windows' activations are
    low = kind is not None and precision in ("auto", "bf16") and native_bf16(kind)

    def passes():  # the calibration forward passes' precision
        return torch.autocast(kind, dtype=torch.bfloat16) if low else contextlib.nullcontext()

    attention = calibration_attention(model) if _choice() == "auto" else contextlib.nullcontext()
    with force("exact"), attention:  # statistics and next inputs from fp32 activations (bf16 training keeps bf16)
        for i in tqdm(range(len(blocks)), desc=desc, unit="block", leave=False):
            here = f"{prefix}.{i}."
            if load is not None:
                load(here)
            block = blocks[i]
            if home is not None:
                block.to(device)

            def collect(names: list[str], block=block, outputs: list[torch.Tensor] | None = None
                        ) -> dict[str, LayerStats]:
                if hidden is None:
                    raise LowbitError("this step reads calibration statistics but no calibration windows were given")
                with passes():
                    stats = _collect_stats(block, hidden, kwargs, {n: model.get_submodule(n) for n in names}, outputs)
                routed_tokens.update(shrink_routed(stats, set(expert_layer_names(model, names))))
                return stats

            collect.block, collect.hidden, collect.kwargs = block, hidden, kwargs  # for steps that run the block
            work(here, collect)
            if hidden is not None and i + 1 < len(blocks):  # (the last block's outputs feed nothing)
                with passes():  # in place: one copy of the activations (file-backed ones stay so), plus one output
                    for h in hidden:
                        h.copy_(block_output(block, h, kwargs))
            if home is not None:
                block.to(home)
            if done is not None:
                done(here)
            trim_heap()  # the replaced float weights' pages go back to the OS: RSS tracks the live set
    if routed_tokens:
        report_expert_tokens(model, routed_tokens)


@torch.no_grad()
def run_blockwise(model: nn.Module, windows: torch.Tensor, layer_names: list[str],
                  quantize_block: Callable[[dict[str, LayerStats]], None], desc: str = "calibrate",
                  device: torch.device | None = None) -> None:
    """For each decoder block (:func:`for_each_block`, in memory): collect :class:`LayerStats` of the listed
    Linears in it, call ``quantize_block(stats)`` (which replaces those Linears), then feed the quantized block's
    outputs on."""

    def work(prefix: str, collect: Collect) -> None:
        names = [n for n in layer_names if n.startswith(prefix)]
        if names:  # a block with no targets needs only the pass that feeds the next block
            quantize_block(collect(names))

    for_each_block(model, block_inputs(model, windows), work, desc, device=device)


def report_expert_tokens(model: nn.Module, tokens: dict[str, int]) -> None:
    """Record the calibration tokens routed to each expert layer (the manifest's ``expert_tokens``) and warn
    about the experts that received fewer tokens than their input width (their Hessians were shrunk)."""
    state_of(model).history["expert_tokens"] = dict(tokens)
    inputs = {n: t for n, t in tokens.items() if n.endswith("." + EXPERT_INPUT)}  # one per expert
    few = {n: t for n, t in inputs.items() if t < model.get_submodule(n).in_features}
    if few:
        log.warning("%d of %d experts received fewer calibration tokens than their input width (%s); their "
                    "Hessians were shrunk towards plain rounding. More or longer calibration windows reach more "
                    "experts", len(few), len(inputs),
                    ", ".join(f"{n}: {t}" for n, t in list(few.items())[:4]) + (", ..." if len(few) > 4 else ""))


@dataclass
class Calibration:
    """What a calibrating step reads: token windows, built lazily from a tokenizer when not given.

    ``self_generated=True``: the windows are text the float model samples itself (:func:`generated_windows`;
    data-free), built from the model passed to :meth:`get_windows` the first time it is called."""

    windows: torch.Tensor | None = None  # (n, L) token ids
    tokenizer: object | None = None
    device: torch.device | None = None  # where block-wise steps compute (lowbit.device); None = the model's
    precision: str = "auto"  # of GPTQ's calibration passes: auto (bf16 where native), bf16 or fp32 (for_each_block)
    n: int = CALIB_WINDOWS
    seq_len: int = CALIB_SEQ_LEN
    seed: int = 0
    text: str | None = field(default=None, repr=False)
    self_generated: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise LowbitError(f"calibration precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.self_generated and self.text is not None:
            raise LowbitError("calibration is either self-generated or read from text, not both; drop one")

    def get_windows(self, model: nn.Module | None = None) -> torch.Tensor:
        """The recipe's calibration windows ``(n, seq_len)`` (drawn once, then kept); ``model`` (the float model)
        is needed only for self-generated ones."""
        if self.windows is None:
            self.windows = self.draw(self.n, self.seq_len, self.seed, model)
        return self.windows

    def draw(self, n: int, seq_len: int, seed: int, model: nn.Module | None = None,
             own_share: float = 0.0) -> torch.Tensor:
        """``(n, seq_len)`` token ids from this calibration's source, for a step that sizes its own windows (RILQ,
        QUAD): WikiText-2 valid or the given text, or text the float ``model`` samples itself. The one source of
        calibration windows every step reads, so ``--calib-file`` and ``--calib-self`` reach all of them.
        ``own_share``: this fraction of the windows (rounded down) is the model's own text whatever the source,
        shuffled in with the rest (seeded), so any leading slice holds both."""
        if self.tokenizer is None:
            raise LowbitError("this recipe needs calibration data: pass calib=lowbit.Calibration(tokenizer=tok) "
                              "(WikiText-2 valid by default) or token windows")
        own = n if self.self_generated else int(n * own_share)
        if own and model is None:
            raise LowbitError("self-generated calibration needs the float model: call get_windows(model) "
                              "before quantizing")
        parts = [calibration_windows(self.tokenizer, n - own, seq_len, seed, self.text)] if own < n else []
        if own:
            parts.append(generated_windows(model, self.tokenizer, own, seq_len, seed))
        if len(parts) == 1:
            return parts[0]
        windows = torch.cat(parts)
        return windows[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
