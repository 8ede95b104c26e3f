"""``api.quantize``: load a model, evaluate it, apply a recipe, evaluate again, save a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..architectures import by_model_type
from ..data import check_data
from ..device import resolve_device
from ..errors import LowbitError
from ..eval.perplexity import perplexity
from ..io import read_manifest, save
from ..kernels import prepare
from ..memory import available_memory_bytes, peak_rss_mb, release_free_memory, reset_peak
from ..models import DEFAULT_MODEL, check_seq_len, check_source
from ..presets import DEFAULT_PRESET
from ..protocol import EVAL_WINDOWS
from ..recipe import Recipe, apply_recipe
from ..registry import get
from ..sharded_source import fp32_bytes
from ..targets import recipe_for_target
from .common import CalibrationConfig, Result, check_out, check_windows

log = logging.getLogger(__name__)

OVERRIDABLE = ("format", "bits", "group_size", "granularity", "symmetric", "budget")


def recipe_with_overrides(recipe: str | Path | Recipe, overrides: dict[str, Any]) -> Recipe:
    """The preset/YAML recipe with single-step overrides (``format``, ``bits``, ``group_size``, ``granularity``,
    ``symmetric``, ``budget``) applied to its first step; a field the step does not have is an error."""
    parsed = Recipe.parse(recipe)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(parsed.steps[0])}
    for key in overrides:
        if key not in OVERRIDABLE or key not in fields:
            flag = "--number-format" if key == "format" else "--" + key.replace("_", "-")
            raise LowbitError(f"{flag} does not apply to step {parsed.steps[0].step!r} of recipe {parsed.name!r} "
                              f"(its fields: {', '.join(sorted(fields))})")
    if overrides:
        first = dataclasses.replace(parsed.steps[0], **overrides)
        parsed = Recipe([first, *parsed.steps[1:]], name=f"{parsed.name}+custom")
    return parsed


@dataclass(frozen=True)
class QuantizeConfig:
    """``lowbit quantize``: ``model`` (built-in name, HF folder or .gguf) through ``recipe`` into ``out``."""

    out: Path
    model: str = DEFAULT_MODEL
    recipe: str | Recipe = DEFAULT_PRESET
    windows: int | None = EVAL_WINDOWS  # test windows evaluated before and after; 0 = skip, None = all
    force: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # first-step fields: format, bits, group_size, ...
    calibration: CalibrationConfig = CalibrationConfig()
    stream: bool | None = None  # one decoder block in memory at a time; None = when the fp32 model needs over half
    # the memory available (an HF folder of safetensors, a recipe of block-wise steps)
    target: str | None = None  # an export grid (lowbit.targets.TARGETS: "gguf:q4_0", ...) set on the weight steps
    device: str = "auto"  # auto | cpu | cuda[:N]: where block-wise calibration computes (the model stays in CPU RAM)


@dataclass
class QuantizeResult(Result):
    model: str
    recipe: str
    out: str
    fp_ppl: float | None
    ppl: float | None
    windows: int
    eval: str
    bits_per_weight: float | None
    code_bits: float | None
    size_bytes: int
    size_mb: float
    packed_bytes: int
    quantize_seconds: float
    quantize_peak_rss_mb: float
    fp_model_mb: float
    streamed: bool = False
    bits_per_weight_with_adapters: float | None = None  # every stored byte of the Linears, adapters included


def quantize(config: QuantizeConfig) -> QuantizeResult:
    """Run the job; every bad input fails with a :class:`LowbitError` before the model loads."""
    check_windows(config.windows)
    recipe = recipe_with_overrides(config.recipe, config.overrides)
    if config.target is not None:
        if any(v is not None for v in config.overrides.values()):
            raise LowbitError(f"--target {config.target} sets the grid: drop --bits, --group-size, --granularity, "
                              "--symmetric and --number-format, or drop --target")
        recipe = recipe_for_target(recipe, config.target)
    kind, path = check_source(config.model)
    if kind == "hf" and any(get("step", s.step).needs_architecture for s in recipe.steps):
        by_model_type(json.loads((path / "config.json").read_text(encoding="utf-8"))["model_type"])  # before loading
    check_out(config.out, config.force, config.model, size_ratio=0.25)
    device = resolve_device(config.device)
    calib = config.calibration.build(tokenizer=None, device=device)  # reads --calib-file now: fails before loading
    needs_text = any(get("step", s.step).needs_calibration for s in recipe.steps) and calib.text is None \
        and not calib.self_generated
    check_data(test=config.windows != 0, valid=needs_text)
    if choose_streaming(config, kind, path, recipe, calib):
        return _quantize_streamed(config, recipe, calib)
    from ..io import load_model  # read at call time (tests watch what loads)

    fp_model, tokenizer = load_model(config.model)
    check_seq_len(fp_model, config.calibration.seq_len, "--calib-seq-len")
    calib.tokenizer = tokenizer
    if any(get("step", s.step).needs_calibration for s in recipe.steps):
        calib.get_windows(fp_model)  # a file too short for one window fails here, before any evaluation
    evaluate = config.windows != 0
    fp = perplexity(fp_model, tokenizer, windows=config.windows) if evaluate else None
    fp_bytes = sum(p.numel() * p.element_size() for p in fp_model.parameters())
    release_free_memory()
    prepare()  # a first-time build of the C++ kernels is not quantization time (quantize_seconds)
    reset_peak()
    qmodel = apply_recipe(fp_model, recipe, calib=calib)
    peak = peak_rss_mb()
    q = perplexity(qmodel, tokenizer, windows=config.windows) if evaluate else None
    extra = {"eval": {"fp_ppl": fp.ppl, "ppl": q.ppl, **q.to_dict()}} if q else {}
    save(qmodel, config.out, tokenizer=tokenizer, force=config.force, extra=extra)
    manifest = read_manifest(config.out)
    s = manifest["summary"]
    return QuantizeResult(
        model=str(config.model), recipe=recipe.name, out=str(config.out), fp_ppl=fp.ppl if fp else None,
        ppl=q.ppl if q else None, windows=q.windows if q else 0, eval=q.label() if q else "skipped",
        bits_per_weight=s["bits_per_weight"],
        bits_per_weight_with_adapters=s["bits_per_weight_with_adapters"], code_bits=s["code_bits"],
        size_bytes=s["size_bytes"],
        size_mb=s["size_bytes"] / 1e6, packed_bytes=s["packed_file_bytes"],
        quantize_seconds=manifest["quantize_seconds"], quantize_peak_rss_mb=peak, fp_model_mb=fp_bytes / 2**20)


def choose_streaming(config: QuantizeConfig, kind: str, path: Path, recipe: Recipe, calib) -> bool:
    """Whether to stream: as asked (``config.stream``), else when the fp32 model needs more than half the memory
    available and it can stream. A model that would not fit whole and cannot stream is refused here, before
    anything loads, naming both figures."""
    from ..streamed import memory_text, streaming_refusal

    if config.stream is not None or kind != "hf":
        return bool(config.stream)
    need, room = fp32_bytes(path), available_memory_bytes()
    if room is None or need <= room // 2:
        return False
    reason = streaming_refusal(recipe, calib)
    if reason is None:
        log.info("the fp32 model needs %s of %s available: streaming it block by block", memory_text(need),
                 memory_text(room))
        return True
    if need > room:
        raise LowbitError(f"{config.model} needs {memory_text(need)} in fp32 and {memory_text(room)} are "
                          f"available; {reason}, so it cannot be streamed: choose a recipe of block-wise steps "
                          "(rtn, gptq, embeddings) or a machine with more memory")
    return False


def _quantize_streamed(config: QuantizeConfig, recipe: Recipe, calib) -> QuantizeResult:
    """The streamed job (:func:`lowbit.streamed.quantize_streamed`); the float model is never whole, so only the
    saved checkpoint is evaluated (loaded memory-mapped), when ``windows`` asks for it."""
    from ..io import load
    from ..streamed import quantize_streamed

    release_free_memory()
    prepare()  # as in quantize: a first-time kernel build is not quantization time
    reset_peak()
    quantize_streamed(config.model, recipe, calib, config.out, force=config.force)
    peak = peak_rss_mb()
    q = None
    if config.windows != 0:
        qmodel, tokenizer = load(config.out)
        q = perplexity(qmodel, tokenizer, windows=config.windows)
    manifest = read_manifest(config.out)
    s = manifest["summary"]
    kind, path = check_source(config.model)
    return QuantizeResult(
        model=str(config.model), recipe=recipe.name, out=str(config.out), fp_ppl=None, ppl=q.ppl if q else None,
        windows=q.windows if q else 0, eval=q.label() if q else "skipped", bits_per_weight=s["bits_per_weight"],
        bits_per_weight_with_adapters=s["bits_per_weight_with_adapters"],
        code_bits=s["code_bits"], size_bytes=s["size_bytes"], size_mb=s["size_bytes"] / 1e6,
        packed_bytes=s["packed_file_bytes"], quantize_seconds=manifest["quantize_seconds"],
        quantize_peak_rss_mb=peak, fp_model_mb=fp32_bytes(path) / 2**20, streamed=True)
