"""The trainer's JSON log and loss-curve PNG (one run, or several overlaid: LoRA vs LoRMA)."""

from __future__ import annotations

from pathlib import Path

from ..fileio import atomic_write, json_text
from ..report import save_figure


def write_log(path: str | Path, payload: dict) -> Path:
    """``payload`` (a TrainResult dict plus whatever the caller adds) as indented JSON, atomically."""
    return atomic_write(Path(path), json_text(payload, indent=1, default=str))


def plot_losses(curves: dict[str, list[float]], path: str | Path, title: str = "fine-tuning loss") -> Path:
    """One line per run: training loss per optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (next-token CE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, Path(path))
