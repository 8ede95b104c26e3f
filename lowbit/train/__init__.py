"""Fine-tuning adapters over a packed base: data, the training loop, logs and loss curves."""

from .data import TrainData, jsonl_pairs, load_data, text_windows
from .engine import Engine, OptimConfig, set_checkpointing
from .report import plot_losses, write_log
from .trainer import TrainConfig, TrainResult, lm_loss, train

__all__ = ["TrainData", "load_data", "text_windows", "jsonl_pairs", "TrainConfig", "TrainResult", "train", "lm_loss",
           "set_checkpointing", "write_log", "plot_losses", "Engine", "OptimConfig"]
