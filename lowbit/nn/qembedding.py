"""QEmbedding: a drop-in ``nn.Embedding`` whose table is a frozen, bit-packed weight."""

from __future__ import annotations

import torch

from .packed import PackedModule


class QEmbedding(PackedModule):
    """Token embeddings stored packed: a lookup dequantizes only the rows it reads.

    ``table`` is a uniform :class:`~lowbit.qtensor.QuantizedWeight` of shape ``(num_embeddings,
    embedding_dim)``. Input ``ids (...)`` integer; output ``(..., embedding_dim)`` fp32. When the model ties its
    output head to these embeddings, the head is a :class:`~lowbit.QLinear` holding the very same buffers.
    ``scale`` multiplies the looked-up rows (Gemma's ``√d`` embedding scaling; 1 for most families), never the
    head that shares the table.
    """

    def __init__(self, table, padding_idx: int | None = None, scale: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.shape
        self.padding_idx, self.scale = padding_idx, scale
        self._register_packed(table)

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized fp32 copy of the table, for code that inspects ``.weight`` (never cached)."""
        return self.qweight.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.select_rows(ids.reshape(-1).to(torch.long)).dequantize()
        if self.scale != 1.0:
            rows = rows * self.scale
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        scale = f", scale={self.scale:g}" if self.scale != 1.0 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.layout()}{scale}"


class ScaledEmbedding(torch.nn.Embedding):
    """A float ``nn.Embedding`` whose rows are multiplied by ``embed_scale`` (a dequantized scaled table)."""

    def __init__(self, *args, embed_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale
