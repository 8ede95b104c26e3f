"""The native decode step: greedy generation of LLaMA-style models with every decode token computed by one C++ call
(``csrc/decode.cpp``) instead of transformers' modules — for one sequence, or for a small batch of sequences
(left-padded to one length, as transformers pads a batch for generation) whose packed layers have the several-row
int8 kernel (``qgemm_i8``).

On SmolLM2-135M a transformers decode step spends more time in per-layer Python and about 400 small ops per token
than in the packed weights; the native step runs the same arithmetic (RMSNorm, rotary attention over grouped KV
heads, SiLU-gated MLP, residuals, final norm, head) in fp32 around the packed layers' C++ kernels, with the KV
cache preallocated for the whole generation. The prompt still goes through the model's own forward (its GEMM
kernels), and its KV cache is copied into the native one.

What it computes exactly like transformers' fp32 eager forward (only the order of fp32 sums differs; a greedy
token can differ after a near tie): families of the architecture table with LLaMA's block (:func:`_llama_block`:
llama, mistral, qwen2 today) whose decoder Linears are plain packed layers — uniform grids or LowRA's mixed
rows; no adapters, online rotation, activation quantization or trained scales left unfolded — or plain fp32
Linears, with fp32 norms, an fp32 or packed embedding table (``+emb8``: its rows looked up by the table's own
QEmbedding), SiLU MLPs, rotary embeddings whose frequencies do not depend on the length
(:data:`ROPE_TYPES`), no hooks inside the model and a float KV cache. :func:`native_reason` names the first thing
that rules a model out; anything else generates through transformers.

A float head whose fp32 values are all fp16 numbers (a lowbit checkpoint of a GGUF file stores it in fp16) is read
as fp16, one whose values are all bf16 numbers (a bf16 model's) as bf16: half the bytes per token, the same products.
"""

from __future__ import annotations

import torch
from torch import nn

from .architectures import Architecture, known
from .kernels import _choice, calls
from .kernels.compiled import row_plan
from .kernels.cpu import SMALL_BATCH, extension
from .nn.gemv_linear import is_float_linear
from .nn.qembedding import QEmbedding
from .nn.qlinear import QLinear
from .qmixed import MixedCodebookWeight
from .threads import ThreadGovernor

ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inverse frequencies that do not depend on the length


class _Unsupported(Exception):
    pass


def native_reason(model: nn.Module, length: int | None = None, batch: int = 1) -> str | None:
    """Why the native step cannot generate with ``model`` (for ``batch`` sequences of ``length`` positions in all),
    or None if it can."""
    try:
        _check(model, length, batch)
    except _Unsupported as e:
        return str(e)
    return None


def _llama_block(arch: Architecture | None) -> bool:
    """Whether the family's decoder block is LLaMA's: a norm in front of attention (q, k, v readers, one writer)
    and of a gated MLP (gate, up readers, one writer), no q/k norms, post-norms, gain offset, embedding scale or
    experts."""
    return (arch is not None and bool(arch.attn_norm and arch.mlp_norm) and len(arch.attn_readers) == 3
            and len(arch.mlp_readers) == 2 and not (arch.qk_norm or arch.post_norms or arch.embed_scale)
            and arch.norm_offset == 0 and arch.moe is None)


def parts(arch: Architecture, layer: nn.Module) -> tuple[list[nn.Module], list[nn.Module], nn.Module, nn.Module]:
    """A LLaMA block's ``[q, k, v, o]``, ``[gate, up, down]`` Linears and its two norms, by the table's names."""
    attn, mlp = getattr(layer, arch.attn), getattr(layer, arch.mlp)
    return ([getattr(attn, n) for n in (*arch.attn_readers, arch.attn_writer)],
            [getattr(mlp, n) for n in (*arch.mlp_readers, arch.mlp_writer)],
            getattr(layer, arch.attn_norm), getattr(layer, arch.mlp_norm))


def _check(model: nn.Module, length: int | None, batch: int) -> None:
    config = getattr(model, "config", None)
    if not 1 <= batch <= SMALL_BATCH:
        raise _Unsupported(f"a batch of {batch} (the native step decodes 1 to {SMALL_BATCH} sequences at once)")
    arch = known(model)
    if not _llama_block(arch):
        raise _Unsupported(f"model type {getattr(config, 'model_type', None)!r} (the native step runs families "
                           "with LLaMA's decoder block: llama, mistral, qwen2)")
    if extension() is None:
        raise _Unsupported("the C++ extension did not build here")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise _Unsupported(f"the model is on {device} (the native step runs on the CPU)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise _Unsupported(f"hidden_act {config.hidden_act!r} (the native step runs SiLU MLPs)")
    window = getattr(config, "sliding_window", None)
    sliding = arch.sliding_window and window and getattr(config, "use_sliding_window", True)
    if sliding and (length or 0) > window:
        raise _Unsupported(f"{length} positions exceed the sliding window of {window}")
    body = model.get_decoder()
    rotary = getattr(body, "rotary_emb", None)
    if getattr(rotary, "rope_type", None) not in ROPE_TYPES:
        raise _Unsupported(f"rotary type {getattr(rotary, 'rope_type', None)!r} (the native step runs "
                           f"{', '.join(ROPE_TYPES)})")
    for name, module in model.named_modules():
        hooks = [h for h in module._forward_pre_hooks.values() if not isinstance(h, ThreadGovernor)]
        if hooks or module._forward_hooks:
            raise _Unsupported(f"{name or 'the model'} has forward hooks")
    embed = model.get_input_embeddings()
    plain = type(embed) is nn.Embedding and embed.weight.dtype == torch.float32
    if not (plain or (type(embed) is QEmbedding and embed.scale == 1.0)):
        raise _Unsupported("the input embedding is neither a plain fp32 table nor a packed one")
    _linear_args(model.get_output_embeddings(), "the output head")  # (a batch's head: the module's own forward)
    final = getattr(body, arch.final_norm)
    for i, layer in enumerate(body.layers):
        try:
            linears, mlp, *norms = parts(arch, layer)
        except AttributeError as e:
            raise _Unsupported(f"layer {i} is not the {arch.family} layout ({e})") from None
        if len(layer._modules) != 4 or len(getattr(layer, arch.attn)._modules) != 4:
            raise _Unsupported(f"layer {i} holds modules beyond LLaMA's block")
        for norm in (*norms, final):
            if getattr(norm, "weight", None) is None or norm.weight.dtype != torch.float32 or \
                    not hasattr(norm, "variance_epsilon"):
                raise _Unsupported(f"layer {i}'s norms are not fp32 RMSNorms")
        for j, linear in enumerate(linears + mlp):
            _batched_args(linear, f"layer {i} Linear {j}", batch)


def _batched_args(module: nn.Module, what: str, batch: int) -> tuple:
    """:func:`_linear_args`, checked to have a kernel for ``batch`` rows: several rows run a float weight, or
    integer codes with int8 activations (``qgemm_i8``), as ``NativeLinear.batches`` in ``csrc/decode.cpp``."""
    args = _linear_args(module, what)
    if batch > 1 and not (args[0] == "float" or (args[0] == "packed" and args[8])):
        raise _Unsupported(f"{what} has no several-row kernel in the native step (LowRA's mixed rows, or a format "
                           "without int8 activations): decode one sequence at a time")
    return args


def _linear_args(module: nn.Module, what: str) -> tuple:
    """``("packed", codes, scales, zeros, levels, bits, group_size, offset, int8, bias)``, ``("mixed", widths,
    codes, codebooks, absmax, perm, block_size, bias)`` (LowRA's rows) or ``("float", weight, bias)`` for the
    native step, or :class:`_Unsupported`."""
    bias = None if module.bias is None else module.bias.detach().float().contiguous()
    if type(module) is QLinear and module._weight_cls is MixedCodebookWeight and not module._modules.get("adapters") \
            and module.spec is None and module.group_scale is None and module.channel_scale is None:
        w = module.qweight
        widths = list(w.rows)
        return ("mixed", widths, [w.codes[b] for b in widths], [w.codebooks[b] for b in widths], w.absmax, w.perm,
                w.block_size, bias)
    if type(module) is QLinear and module._plain_uniform(module._modules.get("adapters")):
        plan = row_plan(module.weight_meta["fmt"], module.weight_meta["group_size"], _choice())
        if plan is None:
            raise _Unsupported(f"{what}: no CPU GEMV for its format under LOWBIT_KERNEL={_choice()}")
        _, bits, levels, offset, int8 = plan
        return ("packed", module.codes, module.scales, module._buffers.get("zeros"), levels, bits,
                module.weight_meta["group_size"], offset, int8, bias)
    if is_float_linear(module) and module.weight.dtype == torch.float32:
        return "float", module.weight.detach().contiguous(), bias
    raise _Unsupported(f"{what} is a {type(module).__name__} the native step does not run (adapters, rotations, "
                       "activation quantization, trained scales or a non-fp32 float weight)")


def _half_if_exact(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as fp16 when every value is an fp16 number, else as bf16 when every value is a bf16 number (a
    bf16 model's table: the same products, half the bytes), else itself."""
    for dtype in (torch.float16, torch.bfloat16):
        half = weight.to(dtype)
        exact = all(torch.equal(h.float(), w) for h, w in zip(half.split(4096), weight.split(4096), strict=True))
        if exact:  # (compared 4,096 rows at a time: no fp32 copy of the whole table)
            return half
    return weight


class NativeDecoder:
    """The C++ decode step bound to ``model``'s tensors (no copies, except an fp16 or bf16 head where exact).

    :meth:`generate` runs greedy decoding for one sequence or a small batch. Build it with :func:`native_decoder`,
    which checks the model first and caches the decoder on it."""

    def __init__(self, model: nn.Module):
        ext, body, config, arch = extension(), model.get_decoder(), model.config, known(model)
        to_native = {"packed": ext.packed_linear, "mixed": ext.mixed_linear, "float": ext.float_linear}
        rotary, attn = body.rotary_emb, getattr(body.layers[0], arch.attn)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.model = model
        kind, *args = _linear_args(model.get_output_embeddings(), "the output head")
        if kind == "float":  # (a batch's rows go through the model's own head: see _generate_batch)
            args[0] = _half_if_exact(args[0])
        self.head_dtype = args[0].dtype if kind == "float" else None  # None: a packed head
        final = getattr(body, arch.final_norm)
        embed = model.get_input_embeddings()
        self._lookup = embed if type(embed) is QEmbedding else None  # a packed table: rows looked up in Python
        self._head = model.get_output_embeddings()  # a batch's head: its own forward (oneDNN's GEMM for fp32)
        self._table = torch.empty(0, config.hidden_size) if self._lookup is not None else embed.weight.detach()
        self._decoder = ext.NativeDecoder(self._table, final.weight.detach(),
                                          to_native[kind](*args), rotary.inv_freq.detach().float().contiguous(),
                                          float(rotary.attention_scaling), heads, kv_heads, attn.head_dim,
                                          float(attn.scaling), float(final.variance_epsilon))
        for layer in body.layers:
            linears, mlp, attn_norm, mlp_norm = parts(arch, layer)
            natives = [to_native[kind](*args) for kind, *args in (_linear_args(m, "") for m in linears + mlp)]
            self._decoder.add_layer(*natives, attn_norm.weight.detach(), mlp_norm.weight.detach())
        self._governor = next((h for h in model._forward_pre_hooks.values() if isinstance(h, ThreadGovernor)), None)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                 min_new_tokens: int = 0, pad_token_id: int | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy continuation of ``ids (B, T)`` (``B > 1`` where :func:`native_reason` allows that batch):
        ``(B, T + n)`` token ids, ``n <= max_new_tokens``. Sequences of different lengths come left-padded with
        ``attention_mask (B, T)`` (0 on the padding, then 1s), as transformers' ``generate`` takes them: each
        sequence's positions count from its first token and its padding is never attended to. A sequence ends after
        an end-of-sequence id once ``min_new_tokens`` are out; in a batch its later places hold ``pad_token_id``
        (default: the first end-of-sequence id), and generation stops when every sequence has ended. The prompt
        runs through the model's forward."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if ids.dim() != 2 or not 1 <= ids.shape[0] <= SMALL_BATCH:
            raise ValueError(f"ids must be (B, T) with 1 <= B <= {SMALL_BATCH}, got {tuple(ids.shape)}")
        stop = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        batch, prompt = ids.shape
        starts, inputs = left_padding(attention_mask, ids.shape), {}
        if any(starts):  # positions as transformers' generate counts them: from each sequence's first token
            inputs = {"attention_mask": attention_mask,
                      "position_ids": (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)}
        out = self.model(ids, use_cache=True, logits_to_keep=1, **inputs)
        self._decoder.reset(prompt + max_new_tokens, batch, starts)
        for i in range(len(self.model.get_decoder().layers)):
            keys, values = _layer_cache(out.past_key_values, i)
            self._decoder.set_cache(i, keys.float(), values.float())
        first = out.logits[:, -1].argmax(-1)
        if batch > 1:
            new = self._generate_batch(first, prompt, max_new_tokens, stop, min_new_tokens,
                                       pad_token_id if pad_token_id is not None or not stop else stop[0])
            return torch.cat([ids, new.to(ids.dtype)], dim=1)
        token = int(first[0])
        tokens = [token]
        for pos in range(prompt, prompt + max_new_tokens - 1):
            if token in stop and len(tokens) >= min_new_tokens:
                break
            if self._governor is not None:
                self._governor(None, None)
            if self._lookup is None:
                token = self._decoder.greedy(token, pos)
            else:
                token = self._decoder.greedy_row(self._row(token), pos)
            tokens.append(token)
        calls["native-step"] += len(tokens) - 1  # counted like the kernels (lowbit.kernels.kernel_summary)
        return torch.cat([ids, torch.tensor([tokens], dtype=ids.dtype)], dim=1)

    def _generate_batch(self, tokens: torch.Tensor, prompt: int, max_new_tokens: int, stop: list[int],
                        min_new_tokens: int, pad: int | None) -> torch.Tensor:
        """The new tokens ``(B, n)`` of a batch whose first new tokens are ``tokens (B,)`` (see :meth:`generate`)."""
        stop_ids = torch.tensor(stop, dtype=tokens.dtype)
        ended = torch.zeros_like(tokens, dtype=torch.bool)
        columns = [tokens]
        for pos in range(prompt, prompt + max_new_tokens - 1):
            if len(columns) >= min_new_tokens:
                ended |= torch.isin(tokens, stop_ids)
                if bool(ended.all()):
                    break
            if self._governor is not None:
                self._governor(None, None)
            tokens = self._head(self._decoder.hidden(self._rows(tokens), pos)).argmax(-1)
            if pad is not None:
                tokens = torch.where(ended, pad, tokens)
            columns.append(tokens)
        calls["native-step"] += len(columns) - 1
        return torch.stack(columns, dim=1)

    def logits(self, token: int, pos: int) -> torch.Tensor:
        """The next-token logits ``(vocab,)`` of ``token`` at ``pos`` (positions before it already cached)."""
        if self._lookup is None:
            return self._decoder.step(token, pos)
        return self._decoder.forward(self._row(token), pos)

    def _row(self, token: int) -> torch.Tensor:
        """``token``'s embedding ``(hidden,)`` fp32 (see :meth:`_rows`)."""
        return self._rows(torch.tensor([token]))[0]

    def _rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embeddings ``(B, hidden)`` fp32 of ``tokens (B,)`` — a packed table's by its own lookup
        (QEmbedding.forward) — as a new tensor (the step updates it in place)."""
        rows = self._lookup(tokens) if self._lookup is not None else self._table.index_select(0, tokens)
        return rows.float().contiguous()


def left_padding(mask: torch.Tensor | None, shape: torch.Size) -> list[int]:
    """Each sequence's count of left padding in ``mask (B, T)`` (0 on the padding, then 1s; None: no padding), or
    a ValueError naming what is wrong with it."""
    if mask is None:
        return [0] * shape[0]
    if mask.shape != shape:
        raise ValueError(f"attention_mask must have the shape of ids {tuple(shape)}, got {tuple(mask.shape)}")
    mask = mask.long()
    ones = mask.sum(-1)
    if bool(((mask != 0) & (mask != 1)).any()) or bool((ones == 0).any()):
        raise ValueError("attention_mask must hold 0s and 1s, with at least one 1 in every row")
    starts = shape[1] - ones
    real = torch.arange(shape[1]) >= starts.unsqueeze(1)
    if not torch.equal(mask.bool(), real):
        raise ValueError("the native step takes left padding only (the 0s of attention_mask before the 1s): "
                         "tokenize with padding_side='left'")
    return starts.tolist()


def _layer_cache(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``i``'s keys and values ``(1, kv_heads, T, head_dim)`` of a transformers cache (``layers[i]`` since
    transformers 4.56, ``key_cache[i]`` before)."""
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def native_decoder(model: nn.Module, length: int | None = None, batch: int = 1) -> NativeDecoder | None:
    """The model's :class:`NativeDecoder` (built once per kernel choice and kept on the model: it holds the
    model's own tensors, so a model whose modules are later replaced needs ``model.__dict__.pop("_lowbit_native")``),
    or None when :func:`native_reason` rules the model out for ``batch`` sequences of ``length`` positions."""
    if native_reason(model, length, batch) is not None:
        return None
    built = model.__dict__.setdefault("_lowbit_native", {})  # by kernel choice: the layers' plans depend on it
    if _choice() not in built:
        built[_choice()] = NativeDecoder(model)
    return built[_choice()]
