"""What ``lowbit bench`` writes besides its JSON: the markdown table (medians [min–max], ratios to FP32, the
roofline's bandwidth) and the bar chart of the ratios."""

from __future__ import annotations

from pathlib import Path


def batch_key(batch: int) -> str:
    """The row key of batched decode tokens/s at ``batch`` sequences."""
    return f"decode_b{batch}_tok_s"


def _spread(row: dict, key: str, fmt: str = ".1f") -> str:
    lo, hi = row.get(f"{key}_range", (row[key], row[key]))
    return f"{row[key]:{fmt}} [{lo:{fmt}}–{hi:{fmt}}]"


def markdown_table(rows: dict[str, dict]) -> str:
    """Medians [min–max] of the runs; ratios of medians to FP32's."""
    first = next(iter(rows.values()))
    batches = sorted(int(k[len("decode_b"):-len("_tok_s")]) for k in first if k.startswith("decode_b")
                     and k.endswith("_tok_s"))
    contended = "contended_pct" in first
    head = ["model", "bits/weight", "decode tok/s", "decode / FP32", "prefill tok/s", "prefill / FP32"]
    head += [f"batch {b} tok/s (÷ FP32)" for b in batches]
    head += ["decode beside a busy process (% of quiet)"] * contended
    head += ["peak RSS MB", "model MB at peak", "MB read / token", "% of roofline", "kernel"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, f"{r['bits_per_weight']:.2f}", _spread(r, "decode_tok_s"), f"{r['decode_ratio']:.2f}×",
                 _spread(r, "prefill_tok_s", ".0f"), f"{r['prefill_ratio']:.2f}×"]
        cells += [f"{_spread(r, batch_key(b))} ({r[f'decode_b{b}_ratio']:.2f}×)" for b in batches]
        if contended:
            cells.append(f"{r['contended_decode_tok_s']:.1f} ({r['contended_pct']:.0f}%)")
        cells += [f"{r['peak_rss_mb']:.0f}", f"{r['model_peak_mb']:.0f}", f"{r['bytes_per_token'] / 1e6:.1f}",
                  f"{r['roofline_pct']:.0f}%", r["kernel"] + _engines(r)]
        lines.append("| " + " | ".join(cells) + " |")
    if "bandwidth_gbs_range" in first:
        lo, hi = first["bandwidth_gbs_range"]
        lines += ["", f"Roofline: the highest memory copy bandwidth measured in this run, {hi:.1f} GB/s "
                      f"(lowest {lo:.1f})."]
    return "\n".join(lines) + "\n"


def _engines(row: dict) -> str:
    """Which decodes ran lowbit's native step (lowbit.native), as a suffix of the kernel cell."""
    native = [what for what, key in (("batch 1", "decode_engine"), ("batches", "batch_engine"))
              if row.get(key) == "native"]
    return f" (native step: {', '.join(native)})" if native else ""


def plot_bench(rows: dict[str, dict], out: str | Path) -> Path:
    """PNG bar chart of decode and prefill ratios to FP32 (written to a temp name, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    names = list(rows)
    fig, axes = plt.subplots(1, 4, figsize=(15, 4))
    charts = {"decode_ratio": "decode tok/s ÷ FP32", "prefill_ratio": "prefill tok/s ÷ FP32",
              "peak_rss_ratio": "peak RSS ÷ FP32", "model_peak_ratio": "model memory at peak ÷ FP32"}
    for ax, (key, label) in zip(axes, charts.items(), strict=True):
        bars = ax.bar(names, [rows[n][key] for n in names], color="tab:blue")
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)
