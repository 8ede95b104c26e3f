"""What every API job shares: the evaluation-window rule, the calibration settings, output-folder checks and
the conversion of a result dataclass to the one JSON object the CLI prints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..calibration import PRECISIONS, Calibration, read_calibration_text
from ..errors import LowbitError
from ..fileio import check_output
from ..models import source_bytes
from ..protocol import CALIB_SEQ_LEN, CALIB_WINDOWS

ALL = None  # windows=ALL: every window of the split


def check_windows(windows: int | None, flag: str = "--windows", allow_skip: bool = True) -> None:
    """One meaning everywhere: ``N`` > 0 evaluates the first N windows, ``None`` (``all`` on the command line) all
    of them, ``0`` skips the evaluation where a command can skip it."""
    if windows is None:
        return
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 0 or (windows == 0 and not allow_skip):
        least = "0 (skip)" if allow_skip else "1"
        raise LowbitError(f"{flag} must be 'all' or a whole number >= {least}, got {windows!r}")


def check_out(out: Path, force: bool, source: str | Path | None = None, size_ratio: float = 0.0) -> None:
    """Check an output folder before any work (:func:`lowbit.fileio.check_output`; the save checks again), with
    free space for about ``size_ratio`` x the bytes of ``source``'s weight files: a lower bound of what the job
    writes (4-bit codes of a bf16 source are 0.25 of it)."""
    need = int(source_bytes(source) * size_ratio) if source is not None and size_ratio else 0
    check_output(out, force, need)


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration windows come from: WikiText-2 *valid* by default, a text/.jsonl ``file``, or text the float
    model samples itself (``self_generated``). ``windows``/``seq_len`` size the windows of the steps that take
    the recipe's calibration size (GPTQ, lowra-gptq); RILQ and QUAD size theirs in their own configs."""

    windows: int = CALIB_WINDOWS
    seq_len: int = CALIB_SEQ_LEN
    file: Path | None = None
    self_generated: bool = False
    seed: int = 0
    precision: str = "auto"  # of GPTQ's calibration passes (lowbit.calibration.for_each_block)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise LowbitError(f"--calib-precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.windows < 1 or self.seq_len < 2:
            raise LowbitError("--calib-windows must be >= 1 and --calib-seq-len >= 2")
        if self.self_generated and self.file is not None:
            raise LowbitError("--calib-self and --calib-file both set: calibrate on one of them")

    def build(self, tokenizer, device=None) -> Calibration:
        """``device``: where block-wise steps compute (:func:`lowbit.device.resolve_device`); the CPU = in place."""
        text = read_calibration_text(self.file) if self.file is not None else None
        return Calibration(tokenizer=tokenizer, n=self.windows, seq_len=self.seq_len, seed=self.seed, text=text,
                           self_generated=self.self_generated, precision=self.precision,
                           device=None if device is None or device.type == "cpu" else device)


@dataclass(kw_only=True)
class Evaluated:
    """The evaluation a job ran after its work, if any: WikiText-2 test perplexity over ``windows`` windows."""

    ppl: float | None = None
    windows: int | None = None


class Result:
    """Mixin of every result dataclass: ``to_dict()`` is the JSON object ``--json`` prints: every field shown in
    its repr, and with ``omit_none`` only those that hold a value (a skipped evaluation prints no ``ppl`` key)."""

    omit_none: ClassVar[bool] = False

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}
        return {k: v for k, v in out.items() if v is not None} if self.omit_none else out
