"""Jobs on saved checkpoints and results: ``merge``, ``export``, ``info``, ``recipes`` and ``report``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..data import check_data
from ..errors import LowbitError
from ..eval.perplexity import perplexity
from ..fileio import MARKER, check_output, read_text
from ..io import save
from ..manifest import hashes_by_default, read_manifest, verify_files
from ..protocol import EVAL_WINDOWS
from .common import Result, check_out, check_windows

log = logging.getLogger(__name__)

EXPORT_LAYOUTS = ("peft", "native", "compressed-tensors", "gguf")


@dataclass(frozen=True)
class MergeConfig:
    """``lowbit merge``: adapters merged into the dequantized base, written as a float transformers model or
    (``requantize``) a packed lowbit checkpoint; ``windows`` > 0 evaluates before and after."""

    model: str
    out: Path
    requantize: bool = False
    windows: int | None = 0
    force: bool = False


@dataclass
class MergeResult(Result):
    omit_none = True
    source: str
    out: str
    adapted_layers: int
    kind: str
    ppl_adapters: float | None = None
    ppl_merged: float | None = None
    windows: int | None = None
    requantize_rel_error_mean: float | None = None
    requantize_rel_error_max: float | None = None


def merge(config: MergeConfig) -> MergeResult:
    from ..adapters import adapted_layers
    from ..export import merged_float_model, requantize, save_float
    from ..io import load

    check_windows(config.windows)
    check_data(test=config.windows != 0)
    check_out(config.out, config.force, config.model, size_ratio=1.0 if config.requantize else 2.0)
    model, tok = load(config.model)
    if not adapted_layers(model):
        raise LowbitError(f"{config.model} has no adapters to merge; fine-tune it first (lowbit finetune)")
    result = MergeResult(str(config.model), str(config.out), len(adapted_layers(model)), "float")
    evaluate = config.windows != 0
    if evaluate:
        result.ppl_adapters = perplexity(model, tok, windows=config.windows).ppl
    if config.requantize:
        merged, errors = requantize(model)
        save(merged, config.out, tokenizer=tok, force=config.force)
        result.kind = "lowbit"
        result.requantize_rel_error_mean = sum(errors.values()) / len(errors)
        result.requantize_rel_error_max = max(errors.values())
    else:
        merged = merged_float_model(model)
        save_float(merged, config.out, tokenizer=tok, force=config.force)
    if evaluate:
        ppl = perplexity(merged, tok, windows=config.windows)
        result.ppl_merged, result.windows = ppl.ppl, ppl.windows
    return result


@dataclass(frozen=True)
class ExportConfig:
    """``lowbit export``: adapters in PEFT's layout (LoRA; plus the dequantized base) or lowbit's ``native`` one
    (any adapter: factors plus the merged float model); or the packed model for a serving engine:
    ``compressed-tensors`` (a folder: vLLM; transformers with the compressed-tensors package) or ``gguf`` (one
    file: llama.cpp, Ollama, LM Studio; transformers)."""

    model: str
    out: Path
    layout: str = "peft"
    force: bool = False
    requantize: bool = False  # compressed-tensors: round grids it cannot store into the nearest int grid
    windows: int | None = EVAL_WINDOWS  # with requantize: test windows the perplexity change is measured on; 0 = skip


@dataclass
class ExportResult(Result):
    source: str
    out: str
    format: str
    files: list[str]
    details: dict = field(default_factory=dict)


def export(config: ExportConfig) -> ExportResult:
    from ..export import export_native, export_peft
    from ..export_ct import export_compressed_tensors
    from ..export_gguf import export_gguf
    from ..io import load

    if config.layout not in EXPORT_LAYOUTS:
        raise LowbitError(f"--to must be one of {', '.join(EXPORT_LAYOUTS)}, got {config.layout!r}")
    if config.layout == "gguf":
        check_output(config.out, config.force, kind="file")
        if Path(config.out).exists() and not config.force:
            raise LowbitError(f"{config.out} exists: pass --force to replace it")
    else:
        check_out(config.out, config.force, config.model, size_ratio=2.0)
    if config.requantize and config.layout != "compressed-tensors":
        raise LowbitError("--requantize applies to --to compressed-tensors; for gguf, quantize into its grid with "
                          "lowbit quantize --target gguf:q4_0")
    if config.requantize and config.windows != 0:
        check_data(test=True, valid=False)
    model, tok = load(config.model)
    measured = {}
    if config.requantize:
        from ..export_ct import requantize_to_int

        before = perplexity(model, tok, windows=config.windows) if config.windows != 0 else None
        errors = requantize_to_int(model)
        after = perplexity(model, tok, windows=config.windows) if config.windows != 0 and errors else before
        measured = {"requantized_layers": len(errors), "max_weight_error": max(errors.values(), default=0.0),
                    "ppl_before": before.ppl if before else None, "ppl_after": after.ppl if after else None,
                    "eval": before.label() if before else "skipped"}
        if before:
            log.info("requantized %d layers into int grids: perplexity %.3f -> %.3f (%s)", len(errors), before.ppl,
                     after.ppl, before.label())
    writer = {"peft": export_peft, "native": export_native, "compressed-tensors": export_compressed_tensors,
              "gguf": export_gguf}
    details = writer[config.layout](model, config.out, tokenizer=tok, force=config.force)
    out = Path(config.out)
    files = [out.name] if out.is_file() else \
        sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MARKER)
    return ExportResult(str(config.model), str(config.out), config.layout, files,
                        {**(details if isinstance(details, dict) else {}), **measured})


def info(path: str | Path, layers: bool = False) -> dict:
    """``lowbit info``: what a checkpoint holds (recipe, bits per weight, sizes, versions; ``layers``: each
    quantized layer's layout), read from its manifest after every file is checked against it (as a loader would:
    a truncated, missing or modified file is an error)."""
    m = read_manifest(path)
    verify_files(Path(path), m, hashes=hashes_by_default())
    s = m["summary"]
    out = {
        "path": str(path), "recipe": m["recipe"], "bits_per_weight": s["bits_per_weight"],
        "code_bits": s["code_bits"], "quantized_layers": s["quantized_layers"],
        "quantized_weights": s["quantized_weights"], "packed_bytes": s["packed_bytes"],
        "packed_file_bytes": s["packed_file_bytes"],
        "packed_file_bits_per_weight": s["packed_file_bytes"] * 8 / s["quantized_weights"]
        if s["quantized_weights"] else None,
        "size_bytes": s["size_bytes"], "float_expert_weights": s.get("float_expert_weights", 0),
        "experts": sum((m.get("experts") or {}).values()),  # MoE experts held (and packed) one Linear each
        "versions": m["versions"], "eval": m.get("extra", {}).get("eval"),
    }
    if layers:
        out["layers"] = m["layers"]
        out["expert_tokens"] = m.get("expert_tokens")  # calibration tokens routed to each expert layer
    return out


def recipes() -> dict[str, list[dict]]:
    """``lowbit recipes``: every named preset and the step configs it expands to."""
    from ..presets import PRESETS
    from ..recipe import Recipe

    return {name: Recipe.from_name(name).to_dict()["steps"] for name in PRESETS}


def report(results: Path, out: Path, x: str = "bits_per_weight", train_logs: tuple[Path, ...] = ()) -> dict:
    """``lowbit report``: the bits-vs-perplexity chart of a results file, or the loss curves of
    ``train_log.json`` files of ``lowbit finetune`` overlaid."""
    from ..report import is_number, load_rows, method_of, plot_bits_vs_ppl
    from ..train import plot_losses

    check_output(out, what="--out", kind="file")
    if train_logs:
        curves = {}
        for log_path in map(Path, train_logs):
            try:
                log_data = json.loads(read_text(log_path, "training log"))
            except json.JSONDecodeError as e:
                raise LowbitError(f"cannot read {log_path} as a train_log.json of lowbit finetune ({e})") from e
            losses = log_data.get("losses") if isinstance(log_data, dict) else None
            if not isinstance(losses, list) or not losses or not all(is_number(v) for v in losses):
                raise LowbitError(f"{log_path} has no 'losses' list of numbers: not a train_log.json of lowbit "
                                  "finetune")
            curves[f"{log_data.get('adapter', '?')} r{log_data.get('rank', '?')} ({log_path.parent.name})"] = \
                log_data["losses"]
        return {"png": str(plot_losses(curves, out)), "curves": list(curves)}
    if x not in ("bits_per_weight", "code_bits"):
        raise LowbitError(f"--x must be bits_per_weight or code_bits, got {x!r}")
    rows = load_rows(results, x)
    path = plot_bits_vs_ppl(rows, out, x=x)
    return {"png": str(path), "rows": len(rows), "methods": sorted({method_of(r["recipe"]) for r in rows})}
