"""A safetensors file written as its tensors arrive, never held whole in memory.

``safetensors.torch.save_file`` needs every tensor of a file at once; a checkpoint written while a model larger
than memory streams through it cannot give it that. :class:`TensorAppender` writes each tensor's bytes to a
data file as it comes and, on :meth:`~TensorAppender.close`, the file itself: the 8-byte header length, the
JSON header (padded with spaces to 8 bytes, as the format allows) and the data, copied in by the kernel. The
result is an ordinary safetensors file (tensors in the order they were appended, no gaps) that
``safetensors``, transformers and lowbit read as any other. Both the in-memory and the streamed quantize write
through it, in the same order, so their checkpoints are byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from .errors import LowbitError

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class TensorAppender:
    """One safetensors file at ``path``, written tensor by tensor (:meth:`append`) and completed by :meth:`close`.

    Until it closes, the bytes live in ``path`` + ``.data`` beside it (same folder: a staged checkpoint's)."""

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")  # noqa: SIM115 - closed in close()
        self.header: dict[str, dict] = {}
        self.nbytes = 0

    def append(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (any device; copied to CPU, contiguous) under ``name``, after what came before."""
        if name in self.header:
            raise LowbitError(f"tensor {name!r} written twice to {self.path.name}: a lowbit bug, please report it")
        if tensor.dtype not in DTYPES:
            raise LowbitError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        t = tensor.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._data.write(raw)
        size = t.numel() * t.element_size()
        self.header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.nbytes, self.nbytes + size]}
        self.nbytes += size

    def close(self) -> int:
        """Write the finished file (header, then the data) and remove the data file; returns the file's bytes."""
        self._data.close()
        header = {"__metadata__": self.metadata, **self.header} if self.metadata else dict(self.header)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            shutil.copyfileobj(data, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        self._data_path.unlink()
        return 8 + len(text) + self.nbytes
