"""A quantized KV cache behind transformers' ``Cache`` interface: int8 or int4 keys and values, per token and head.

Every cached vector — one token of one KV head, ``head_dim`` numbers — is quantized asymmetrically on its own
(one group of ``head_dim``): ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, ``s = fp16↑((hi - lo) / (2^b - 1))``,
``z = round(-lo / s)``, ``u = clamp(round(x / s) + z, 0, 2^b - 1)``, ``x̂ = s · (u - z)`` — the asymmetric rule of
:mod:`lowbit.formats.act` with clip 1, except that the scale is rounded to fp16 *before* the codes are computed, so
the stored fp16 scale is exactly the one the codes were rounded with (rounded up, so no code clips and every
number is within ``s / 2``). Codes are packed by :func:`lowbit.formats.packing.pack` (int4: two per byte), scale
and zero point are fp16: ``head_dim · b / 8 + 4`` bytes per token and head — 4.5 bits per number at int4 and
``head_dim = 64``, 8.5 at int8.

``rotate_keys`` (QuaRot): keys are multiplied by an orthonormal Hadamard ``H`` over ``head_dim`` before quantizing
and by ``Hᵀ`` after dequantizing, so attention sees ``Q(k H) Hᵀ`` and queries are unchanged; the rotation spreads
an outlier channel over all of ``head_dim`` so it no longer sets every token's scale alone.

Unlike transformers' ``QuantizedLayer`` (float on the first call, a float residual window after), ``update``
returns the *dequantized* full keys and values, the tokens just added included: one forward over a window already
attends to quantized K/V, and decode steps append to the quantized store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..errors import LowbitError
from ..formats.packing import pack, unpack
from ..kernels.hadamard import hadamard_matrix, supports_hadamard

_FP16_TINY = torch.finfo(torch.float16).tiny  # smallest normal fp16: the floor of a stored scale
_SCALE_BYTES = 2 + 2  # fp16 scale + fp16 zero point per token and head

KV_CACHE_CHOICES = ("float", "int8", "int4", "int8-norot", "int4-norot")


@dataclass(frozen=True)
class KVCacheConfig:
    """How a :class:`QuantizedKVCache` stores keys and values: ``bits`` per number (8 or 4) and whether keys are
    Hadamard-rotated over ``head_dim`` before quantizing (``rotate_keys``)."""

    bits: int = 8
    rotate_keys: bool = True

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise LowbitError(f"KVCacheConfig.bits must be 4 or 8, got {self.bits!r}; use bits=8 or bits=4")
        if not isinstance(self.rotate_keys, bool):
            raise LowbitError(f"KVCacheConfig.rotate_keys must be True or False, got {self.rotate_keys!r}")

    @property
    def name(self) -> str:
        """The ``--kv-cache`` spelling: ``int8``, ``int4``, ``int8-norot``, ``int4-norot``."""
        return f"int{self.bits}" + ("" if self.rotate_keys else "-norot")


def parse_kv_cache(text: str, flag: str = "--kv-cache") -> KVCacheConfig | None:
    """``float`` -> None (transformers' own cache), ``int8`` / ``int4`` -> rotated keys, ``int8-norot`` /
    ``int4-norot`` -> plain keys."""
    name = text.strip().lower() if isinstance(text, str) else text
    if name == "float":
        return None
    if name not in KV_CACHE_CHOICES:
        raise LowbitError(f"{flag} must be one of {', '.join(KV_CACHE_CHOICES)}, got {text!r}")
    return KVCacheConfig(bits=int(name[3]), rotate_keys=not name.endswith("-norot"))


class PackedTokens(NamedTuple):
    """Quantized vectors: ``codes (b, h, s, ceil(d·bits/8))`` uint8, ``scale`` and ``zero`` ``(b, h, s, 1)`` fp16."""

    codes: Tensor
    scale: Tensor
    zero: Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)

    def cat(self, other: PackedTokens | None) -> PackedTokens:
        """``self`` followed by ``other`` along the token dim (-2)."""
        if other is None:
            return self
        return PackedTokens(*(torch.cat([a, b], dim=-2) for a, b in zip(self, other, strict=True)))

    def map(self, fn) -> PackedTokens:
        """``fn`` applied to each of the three tensors (slicing, batch selection, device moves)."""
        return PackedTokens(*(fn(t) for t in self))


def quantize_tokens(x: Tensor, bits: int) -> PackedTokens:
    """``x (..., d)`` float -> one asymmetric ``bits``-bit group per vector over its last dim (see module doc)."""
    xf = x.detach().float()
    umax = 2**bits - 1
    lo = xf.amin(-1, keepdim=True).clamp_max(0)
    hi = xf.amax(-1, keepdim=True).clamp_min(0)
    # rounded up to fp16 (x (1 + 2^-10) beats fp16's 2^-11 rounding), so (hi - lo) / scale <= umax: no code clips
    scale = ((hi - lo) / umax * (1 + 2**-10)).clamp_min(_FP16_TINY).to(torch.float16)
    s = scale.float()
    zero = torch.round(-lo / s).clamp_(0, umax)
    codes = torch.round(xf / s).add_(zero).clamp_(0, umax).to(torch.uint8)
    return PackedTokens(pack(codes, bits), scale, zero.to(torch.float16))


def dequantize_tokens(q: PackedTokens, bits: int, dim: int) -> Tensor:
    """``scale · (codes - zero)``: ``(..., dim)`` fp32."""
    return unpack(q.codes, bits, dim).float().sub_(q.zero.float()).mul_(q.scale.float())


def check_rotation(head_dim: int) -> None:
    """LowbitError when no Hadamard matrix of width ``head_dim`` exists (rotate_keys cannot apply)."""
    if not supports_hadamard(head_dim):
        raise LowbitError(f"no Hadamard matrix for head_dim {head_dim}, so keys cannot be rotated; use an unrotated "
                          f"KV cache (--kv-cache int8-norot / int4-norot, rotate_keys=False)")


class QuantizedKVLayer(CacheLayerMixin):
    """One attention layer's cache: keys and values as :class:`PackedTokens` over ``(batch, kv_heads, tokens)``.

    ``update(k (b, h, s, d_k), v (b, h, s, d_v))`` appends the new tokens to the quantized store and returns the
    dequantized full store ``(b, h, tokens, d)`` in the input dtype. No float copy is kept."""

    is_sliding = False
    is_croppable = True

    def __init__(self, bits: int = 8, rotate_keys: bool = True):
        super().__init__()
        self.bits, self.rotate_keys = bits, rotate_keys
        self.cumulative_length = 0  # tokens seen (== tokens stored for a full-attention layer)
        self.qkeys: PackedTokens | None = None
        self.qvalues: PackedTokens | None = None
        self._rotation: Tensor | None = None  # (d_k, d_k) fp32 orthonormal Hadamard

    def __repr__(self):
        return f"{type(self).__name__}(bits={self.bits}, rotate_keys={self.rotate_keys})"

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_dim, self.value_dim = key_states.shape[-1], value_states.shape[-1]
        if self.rotate_keys:
            check_rotation(self.key_dim)
            self._rotation = hadamard_matrix(self.key_dim, torch.float32).to(self.device)
        self.is_initialized = True

    def _quantize(self, key_states: Tensor, value_states: Tensor) -> tuple[PackedTokens, PackedTokens]:
        keys = key_states.float() @ self._rotation if self.rotate_keys else key_states
        return quantize_tokens(keys, self.bits), quantize_tokens(value_states, self.bits)

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """The stored keys ``(b, h, tokens, d_k)`` and values ``(b, h, tokens, d_v)``, dequantized, in the model's
        dtype (keys rotated back by ``Hᵀ``)."""
        keys = dequantize_tokens(self.qkeys, self.bits, self.key_dim)
        if self.rotate_keys:
            keys = keys @ self._rotation.T
        values = dequantize_tokens(self.qvalues, self.bits, self.value_dim)
        return keys.to(self.dtype), values.to(self.dtype)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_keys, new_values = self._quantize(key_states, value_states)
        self.qkeys = new_keys if self.qkeys is None else self.qkeys.cat(new_keys)
        self.qvalues = new_values if self.qvalues is None else self.qvalues.cat(new_values)
        self.cumulative_length += key_states.shape[-2]
        return self.dequantized()

    def stored_tokens(self) -> int:
        return 0 if self.qkeys is None else self.qkeys.codes.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes stored: codes + scales + zero points of keys and values."""
        return sum(q.nbytes() for q in (self.qkeys, self.qvalues) if q is not None)

    def _map(self, fn) -> None:
        if self.qkeys is not None:
            self.qkeys, self.qvalues = self.qkeys.map(fn), self.qvalues.map(fn)

    def reset(self) -> None:
        self.qkeys = self.qvalues = None
        self.cumulative_length = 0
        self.is_initialized = False

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as transformers' ``DynamicLayer``)."""
        if tokens_to_remove > 0:
            raise LowbitError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or self.qkeys is None:
            return
        self._map(lambda t: t[..., :tokens_to_remove, :])
        self.cumulative_length = self.stored_tokens()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices, ...])


class QuantizedSlidingKVLayer(QuantizedKVLayer):
    """A sliding-window layer: returns the stored window plus the new tokens, then keeps only the last
    ``sliding_window - 1`` tokens quantized (as transformers' ``DynamicSlidingWindowLayer``, without its
    past recording for assisted decoding, so it cannot be cropped)."""

    is_sliding = True
    is_croppable = False

    def __init__(self, sliding_window: int, bits: int = 8, rotate_keys: bool = True):
        super().__init__(bits, rotate_keys)
        self.sliding_window = sliding_window

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        full = super().update(key_states, value_states)
        keep = self.sliding_window - 1
        if self.stored_tokens() > keep:
            self._map(lambda t: t[..., -keep:, :] if keep > 0 else t[..., :0, :])
        return full

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        return min(self.cumulative_length, self.sliding_window - 1) + query_length, offset

    def get_max_length(self) -> int:
        return self.sliding_window

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise LowbitError("a quantized sliding-window KV cache cannot be cropped; use --kv-cache float for "
                              "assisted or speculative decoding")


class QuantizedKVCache(Cache):
    """transformers ``Cache`` of :class:`QuantizedKVLayer` / :class:`QuantizedSlidingKVLayer`, one per decoder layer;
    pass it as ``past_key_values=`` to a forward or to ``generate``."""

    def __init__(self, layers: list[QuantizedKVLayer], config: KVCacheConfig):
        super().__init__(layers=layers)
        self.config = config


def _head_dims(text_config) -> int | None:
    """The model config's key head_dim, when it states one (``head_dim`` or hidden_size / attention heads)."""
    head_dim = getattr(text_config, "head_dim", None)
    if isinstance(head_dim, int):
        return head_dim
    hidden, heads = getattr(text_config, "hidden_size", None), getattr(text_config, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def make_kv_cache(model, config: KVCacheConfig) -> QuantizedKVCache:
    """A fresh quantized cache for ``model`` (one layer per decoder layer of its config); full-attention and
    sliding-window layers are supported, any other layer type (chunked, linear, shared KV) is refused."""
    if not isinstance(config, KVCacheConfig):
        raise LowbitError(f"make_kv_cache needs a KVCacheConfig, got {type(config).__name__}")
    text_config = model.config.get_text_config(decoder=True)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    if unsupported := sorted(set(layer_types) - {"full_attention", "sliding_attention"}):
        raise LowbitError(f"{type(model).__name__} has {', '.join(unsupported)} layers, which the quantized KV cache "
                          f"does not support; use --kv-cache float")
    head_dim = _head_dims(text_config)
    if config.rotate_keys and head_dim is not None:
        check_rotation(head_dim)
    layers = [QuantizedSlidingKVLayer(kwargs["sliding_window"], config.bits, config.rotate_keys)
              if kind == "sliding_attention" else QuantizedKVLayer(config.bits, config.rotate_keys)
              for kind, kwargs in zip(layer_types, layer_kwargs, strict=True)]
    return QuantizedKVCache(layers, config)


@dataclass(frozen=True)
class KVCacheBytes:
    """Bytes a cache holds, and the same tokens in float: ``stored`` (codes + scales + zero points), ``codes``,
    ``scales`` (scales and zero points), ``float_model_dtype`` (the model's dtype, e.g. fp32: 4 bytes a number),
    ``float_bf16`` (2 bytes a number); ``numbers``: keys + values elements held."""

    stored: int
    codes: int
    scales: int
    numbers: int
    float_model_dtype: int
    float_bf16: int
    model_dtype: str

    @property
    def bits_per_number(self) -> float:
        return 8 * self.stored / self.numbers if self.numbers else 0.0

    def to_dict(self) -> dict:
        return {"stored_bytes": self.stored, "code_bytes": self.codes, "scale_zero_bytes": self.scales,
                "numbers": self.numbers, "bits_per_number": self.bits_per_number,
                f"float_{self.model_dtype}_bytes": self.float_model_dtype, "float_bf16_bytes": self.float_bf16,
                f"ratio_to_{self.model_dtype}": self.stored / self.float_model_dtype if self.numbers else 0.0,
                "ratio_to_bf16": self.stored / self.float_bf16 if self.numbers else 0.0}


def float_kv_bytes(cache: Cache, dtype: torch.dtype) -> int:
    """Bytes the tokens ``cache`` holds would take as float ``dtype`` keys and values."""
    return _numbers(cache) * torch.empty(0, dtype=dtype).element_size()


def _numbers(cache: Cache) -> int:
    """Key + value elements held (per layer: batch · heads · stored tokens · head_dim, keys and values)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, QuantizedKVLayer):
            if layer.qkeys is not None:
                b, h, s, _ = layer.qkeys.codes.shape
                total += b * h * s * (layer.key_dim + layer.value_dim)
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.numel() + layer.values.numel()
    return total


def kv_cache_bytes(cache: Cache) -> KVCacheBytes:
    """What ``cache`` stores, in bytes, beside the same tokens held in float (see :class:`KVCacheBytes`). A float
    cache (transformers' ``DynamicCache``) counts its own tensors as ``stored``."""
    codes = scales = 0
    dtype = torch.float32
    for layer in cache.layers:
        if isinstance(layer, QuantizedKVLayer):
            for q in (layer.qkeys, layer.qvalues):
                if q is not None:
                    codes += q.codes.numel() * q.codes.element_size()
                    scales += q.nbytes() - q.codes.numel() * q.codes.element_size()
            dtype = getattr(layer, "dtype", dtype)
        elif getattr(layer, "keys", None) is not None:
            codes += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            dtype = layer.keys.dtype
    return KVCacheBytes(stored=codes + scales, codes=codes, scales=scales, numbers=_numbers(cache),
                        float_model_dtype=float_kv_bytes(cache, dtype),
                        float_bf16=float_kv_bytes(cache, torch.bfloat16), model_dtype=str(dtype).removeprefix("torch."))
