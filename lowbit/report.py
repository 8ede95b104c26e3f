"""Reports drawn from benchmark results: the bits-vs-perplexity curve of every quantization method."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import LowbitError
from .fileio import atomic_write, read_text
from .protocol import EVAL_SEQ_LEN

METHOD_PREFIXES = ("lowra-gptq", "lowra", "gptq", "rtn", "nf", "fp4", "fp8")


def method_of(recipe: str) -> str:
    """The method a preset name belongs to (``gptq-w4g128`` -> ``gptq``); custom names pass through."""
    for prefix in METHOD_PREFIXES:
        if recipe == prefix or recipe.startswith(prefix + "-") or (prefix in ("nf", "fp4", "fp8")
                                                                   and recipe.startswith(prefix)):
            return prefix
    return recipe.split("+")[0]


def is_number(value) -> bool:
    """A finite int or float (not a bool, not NaN): something a chart can place."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_rows(path: str | Path, x: str = "bits_per_weight") -> list[dict]:
    """Result rows (``recipe``, ``ppl``, ``bits_per_weight`` …) from a benchmark JSON file: a list of objects (or
    ``{"rows": [...]}``) each with a ``recipe`` string and a positive ``ppl``, ``x`` a number where present, and at
    least one row with an ``x`` to draw. Anything else is an error naming the file and the first bad row."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"results file {path} does not exist; run python benchmarks/quantizers.py first")
    try:
        data = json.loads(read_text(path, "results file"))
    except json.JSONDecodeError as e:
        raise LowbitError(f"{path} is not JSON ({e.msg})") from e
    rows = data["rows"] if isinstance(data, dict) and "rows" in data else data
    shape = "a list of objects with a 'recipe' string and a positive 'ppl' number"
    if not isinstance(rows, list) or not rows:
        raise LowbitError(f"{path} holds no result rows ({shape})")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("recipe"), str) or not is_number(r.get("ppl")) or \
                r["ppl"] <= 0 or (r.get(x) is not None and not is_number(r[x])):
            raise LowbitError(f"{path} row {i} is not a result row ({shape}, {x!r} a number or absent): {r!r:.120}")
    if not any(r.get(x) is not None for r in rows):
        raise LowbitError(f"no row of {path} has {x!r}: nothing to draw; pick another --x or a results file with it")
    return rows


def plot_bits_vs_ppl(rows: list[dict], out: str | Path, x: str = "bits_per_weight", title: str | None = None) -> Path:
    """Write a PNG: perplexity (log scale) against bits per weight, one line per method, FP32 as a level line.

    ``x`` is ``bits_per_weight`` (effective: scales, zeros and codebooks included) or ``code_bits``.
    The file is written to a temporary name and renamed, so a crash never leaves half a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if r["recipe"] == "fp32":
            ax.axhline(r["ppl"], color="black", ls="--", lw=1, label=f"FP32 ({r['ppl']:.2f})")
        elif r.get(x) is not None:
            by_method.setdefault(method_of(r["recipe"]), []).append(r)
    for method, pts in sorted(by_method.items()):
        pts = sorted(pts, key=lambda r: r[x])
        ax.plot([p[x] for p in pts], [p["ppl"] for p in pts], marker="o", label=method)
        for p in pts:
            ax.annotate(p["recipe"], (p[x], p["ppl"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight" if x == "bits_per_weight" else "average code bits per weight")
    ax.set_ylabel("WikiText-2 test perplexity")
    windows = {r.get("windows") for r in rows if r.get("windows")}
    first = f" (first {windows.pop()} windows of {EVAL_SEQ_LEN})" if len(windows) == 1 else ""
    ax.set_title(title or "bits vs perplexity" + first)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out, dpi=130, bbox_inches="tight")


def save_figure(fig, out: str | Path, **savefig_kwargs) -> Path:
    """Write a matplotlib figure as PNG to ``out`` atomically (a crash never leaves half a file), then close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", **savefig_kwargs))
    finally:
        plt.close(fig)
