"""What QLinear and QEmbedding share: a packed weight held as buffers, viewed (not copied) as a weight object."""

from __future__ import annotations

import operator

from torch import nn


class PackedModule(nn.Module):
    """A module whose weight is a frozen packed weight (:class:`~lowbit.qtensor.QuantizedWeight` or a registered
    kind). Its tensors are buffers named as the weight names them (``codes``, ``scales``, ``zeros``), so
    ``state_dict`` and device moves see them; they are never cast to another dtype (fp16 scales stay fp16)."""

    def _register_packed(self, qweight) -> None:
        self.weight_meta = qweight.meta()
        self._weight_cls = type(qweight)
        self.packed_names = tuple(qweight.tensors())
        for name, t in qweight.tensors().items():
            self.register_buffer(name, t)

    @property
    def fmt(self) -> str:
        return self.weight_meta["fmt"]

    @property
    def qweight(self):
        """The packed weight, viewing this module's buffers (no copy). The view is rebuilt only when a buffer
        was replaced (device moves, ``load_state_dict(assign=True)``): decode calls this once per layer per token,
        and building and validating the weight object costs more than a small layer's matmul."""
        current = [self._buffers[n] for n in self.packed_names]
        cached = self.__dict__.get("_qweight_cache")
        if cached is None or not all(map(operator.is_, cached[0], current)):
            tensors = dict(zip(self.packed_names, current, strict=True))
            qweight = self._weight_cls.from_tensors(self.weight_meta, tensors)
            cached = self.__dict__["_qweight_cache"] = (current, qweight)
        return cached[1]

    def _apply(self, fn, recurse=True):
        # Device moves apply to the packed buffers, dtype casts do not: their dtypes are part of the format.
        kept = {n: getattr(self, n) for n in self.packed_names}
        self.__dict__.pop("_qweight_cache", None)  # it would keep the old buffers alive (and their memory)
        super()._apply(fn, recurse)
        device = getattr(self, self.packed_names[0]).device
        for n, t in kept.items():
            setattr(self, n, t.to(device=device))
        return self

    def layout(self) -> str:
        """``int4 g128``, ``int8_sym channel``, ``nf2 mixed-codebook``: the storage in a few words."""
        m = self.weight_meta
        if "granularity" in m:
            return f"{m['fmt']} " + (f"g{m['group_size']}" if m["granularity"] == "group" else m["granularity"])
        return f"{m['fmt']} {m.get('kind', '')}".strip()
