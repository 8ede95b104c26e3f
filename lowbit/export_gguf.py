"""Export a packed model to a GGUF file (llama.cpp, Ollama, LM Studio; transformers reads it too), with the
metadata and tokenizer llama.cpp needs. Families: llama and mistral (GGUF's ``llama`` architecture), qwen2 (its
q/k/v biases as F32) and qwen3 (its q/k norms).

Packed Linears whose grid is a GGUF block format are written as that format's blocks, holding lowbit's numbers:

* ``int4_sym`` in groups of 32 → ``Q4_0``: per block an fp16 ``d`` and 32 4-bit ``q``, ``w = d (q - 8)`` — lowbit's
  symmetric code is that ``q`` and its fp16 scale that ``d``: exact;
* ``int8_sym`` in groups of 32 → ``Q8_0``: fp16 ``d`` and 32 int8 ``q``, ``w = d q``: exact;
* ``iq4_nl`` in groups of 32 → ``IQ4_NL``: fp16 ``d`` and 32 4-bit indices into ggml's 16 levels, ``w = d ·
  level[q]``: exact;
* ``int4`` (asymmetric) in groups of 32 → ``Q4_1``: fp16 ``d``, fp16 ``m``, ``w = d q + m`` with ``d = s``,
  ``m = -s z``; ``m`` is rounded to fp16 (the largest weight change this makes is reported);
* ``int6_sym`` in groups of 16 with super-block scales (``--target gguf:q6_k``) → the K-quant ``Q6_K``: per 256
  columns an fp16 ``d``, 16 int8 ``k_j`` and 256 6-bit ``q``, ``w = d k_j (q - 32)``; lowbit's scales are
  ``d · k_j`` with a power-of-two ``d`` (:func:`lowbit.qtensor.superblock_scales`): exact. Rows must be a
  multiple of 256 wide (SmolLM2's 576 is not).

Quantize straight into one of these (``lowbit quantize --target gguf:q4_0``, GPTQ included) to export exactly;
other grids and group sizes are refused, naming the layer and that flag. Float tensors: norms in F32, the
rest in the checkpoint's storage dtype (F32, F16 or BF16: the same numbers); a packed embedding table on a block
grid stays packed, any other is written as float (reported).
LLaMA's q and k rows are permuted to llama.cpp's rotary layout (as llama.cpp's own converter does; every
loader undoes it; Qwen's are not); a row permutation moves whole blocks, so packed rows are permuted as they are.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .architectures import architecture
from .errors import LowbitError
from .fileio import atomic_write
from .models import module_name, storage_dtype
from .nn.qembedding import QEmbedding
from .nn.qlinear import QLinear
from .qtensor import SUPERBLOCK, superblock_step
from .state import state_of

log = logging.getLogger(__name__)

QTYPES = {("int4_sym", 32): "Q4_0", ("int4", 32): "Q4_1", ("int8_sym", 32): "Q8_0", ("iq4_nl", 32): "IQ4_NL",
          ("int6_sym", 16): "Q6_K"}  # lowbit grid and group size -> GGUF block type
BLOCK_COLUMNS = {"Q6_K": SUPERBLOCK}  # columns per GGUF block; 32 for the others
FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q6_K": 18, "IQ4_NL": 25}  # general.file_type (LlamaFileType)
FLOAT_FILE_TYPES = {"F32": 0, "F16": 1, "BF16": 32}  # a float model (llama.cpp quantizes such files itself)
# lowbit family -> (GGUF architecture, q/k rows permuted to llama.cpp's rotary layout, tokenizer pre-tokenizer)
ARCHITECTURES = {"llama": ("llama", True, "default"), "mistral": ("llama", True, "default"),
                 "qwen2": ("qwen2", False, "qwen2"), "qwen3": ("qwen3", False, "qwen2")}


def gguf_type(name: str, module: nn.Module) -> str:
    """The GGUF block type a packed layer's grid is, or a :class:`LowbitError` naming the layer and the fix."""
    fmt, meta = module.weight_meta.get("fmt"), module.weight_meta
    qtype = QTYPES.get((fmt or "", meta.get("group_size"))) if meta.get("granularity") == "group" else None
    if isinstance(module, QLinear) and (module.spec is not None or len(module._modules.get("adapters") or ())):
        raise LowbitError(f"{name} rotates its input or carries adapters, which GGUF cannot express: merge the "
                          "adapters first (lowbit merge); rotated (W4A4) models have no GGUF form")
    if qtype is None:
        raise LowbitError(f"{name} is packed as {fmt or meta.get('kind')} {meta.get('granularity')} "
                          f"g{meta.get('group_size')}, which no GGUF block format holds (Q4_0: int4_sym g32, Q4_1: "
                          "int4 g32, Q8_0: int8_sym g32, IQ4_NL: iq4_nl g32, Q6_K: int6_sym g16 with super-block "
                          "scales): quantize into one with --target gguf:q4_0 (or q4_1, q8_0, iq4_nl, q6_k)")
    return qtype


def q6_k_blocks(name: str, codes: np.ndarray, scales: torch.Tensor) -> np.ndarray:
    """Q6_K blocks, uint8 ``(out, in/256, 210)`` (``ql``, ``qh``, int8 scales, fp16 ``d``; ggml's
    ``block_q6_K``), of 6-bit codes ``(out, in)`` with fp16 group-of-16 scales ``(out, in/16)`` that are
    super-block scales ``d · k_j``; a :class:`LowbitError` naming ``name`` where they are not."""
    out_f, in_f = codes.shape
    s = scales.float().view(out_f, in_f // SUPERBLOCK, SUPERBLOCK // 16)
    d = superblock_step(s, 127)
    k = s / d
    if not (torch.equal(k, k.round()) and bool((k >= 1).all()) and bool((k <= 127).all())):
        raise LowbitError(f"{name}'s int6_sym g16 scales are free fp16 values, not Q6_K super-block scales: "
                          "quantize with --target gguf:q6_k to export Q6_K exactly")
    c = codes.reshape(out_f, -1, 2, 4, 32)  # (rows, super-blocks, halves of 128, quarters of 32, 32)
    ql = (c[:, :, :, :2] & 0xF) | ((c[:, :, :, 2:] & 0xF) << 4)  # quarter t and t+2 share a byte's nibbles
    qh = sum((c[:, :, :, t] >> 4) << (2 * t) for t in range(4))  # the four quarters' top two bits
    d16 = d.to(torch.float16).numpy().view(np.uint8)  # (rows, super-blocks, 2)
    return np.concatenate([ql.reshape(out_f, -1, 128).astype(np.uint8), qh.reshape(out_f, -1, 64).astype(np.uint8),
                           k.to(torch.int8).numpy().view(np.uint8), d16], axis=-1)


def gguf_blocks(name: str, module: nn.Module, qtype: str) -> tuple[np.ndarray, float]:
    """``(blocks, error)``: the layer's packed weight as GGUF ``qtype`` blocks, uint8 ``(out, in/32 · block
    bytes)``, and the largest weight change the encoding makes (0 where it is exact)."""
    qw = module.qweight
    out_f, in_f = qw.shape
    block = BLOCK_COLUMNS.get(qtype, 32)
    if in_f % block:
        raise LowbitError(f"{name}: a {in_f}-wide row is not a whole number of {qtype} blocks of {block} columns")
    if qtype == "Q6_K":
        return q6_k_blocks(name, qw.unpacked_codes().numpy(), qw.scales).reshape(out_f, -1), 0.0
    codes = qw.unpacked_codes().view(out_f, in_f // 32, 32).numpy()
    d = qw.scales.to(torch.float16).view(out_f, -1, 1).numpy().view(np.uint8)  # (out, blocks, 2)
    error = 0.0
    if qtype == "Q8_0":
        body = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        parts = [d, body]
    else:
        nibbles = (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)
        parts = [d, nibbles]
        if qtype == "Q4_1":
            s, z = qw.scales.float(), qw.zeros.float()
            m = (-s * z).to(torch.float16)
            error = float(((m.float() + s * z).abs()).max())
            parts = [d, m.view(out_f, -1, 1).numpy().view(np.uint8), nibbles]
    return np.concatenate(parts, axis=-1).reshape(out_f, -1), error


def _float_tensor(t: torch.Tensor, float_type: str) -> tuple[np.ndarray, str]:
    """``(data, GGUF type)`` of a float tensor: F32 for vectors (norms), else ``float_type`` (the checkpoint's
    storage dtype: the same numbers). BF16 goes as raw uint16 words, numpy having no bfloat16."""
    t = t.detach()
    if t.dim() == 1 or float_type == "F32":
        return t.to(torch.float32).numpy(), "F32"
    if float_type == "F16":
        return t.to(torch.float16).numpy(), "F16"
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(t.shape[0], -1), "BF16"


def rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives a q or k projection of ``heads`` heads (its ``permute``)."""
    return torch.arange(rows).view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def tokenizer_fields(tokenizer, vocab_size: int = 0) -> dict:
    """The GGUF tokenizer fields of a byte-level BPE tokenizer (``tokenizer.json``): the ``gpt2`` model, tokens,
    their types (control for special added tokens), merges, special ids, chat template. Ids the tokenizer lacks
    below ``vocab_size`` (an embedding table padded past the tokenizer, e.g. 128,256 rows over a 49,152-token
    tokenizer) become ``[PADi]`` tokens of type unused, as llama.cpp's converter writes them: llama.cpp refuses a
    token list shorter than the table."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise LowbitError(f"the tokenizer is {model.get('type')}, not byte-level BPE: the GGUF export writes BPE "
                          "vocabularies so far; convert this model with llama.cpp's convert_hf_to_gguf.py")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in state.get("added_tokens", [])}}
    tokens = [None] * max(max(vocab.values()) + 1, vocab_size)
    for text, i in vocab.items():
        tokens[i] = text
    special = {t["id"] for t in state.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in state.get("added_tokens", [])}
    types = [5 if t is None else 3 if i in special else 4 if i in added else 1 for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], "types": types,
            "merges": merges, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id,
            "chat_template": getattr(tokenizer, "chat_template", None)}


def _write_metadata(writer, model: nn.Module, vocab: dict | None, file_type: int, pre: str) -> None:
    c = model.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    writer.add_name(Path(str(state_of(model).source or "lowbit")).name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(getattr(c, "rope_theta", None) or
                                    (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)
    if vocab is None:
        return
    t = vocab
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(t["tokens"])
    writer.add_token_types(t["types"])
    writer.add_token_merges(t["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if t[key] is not None:
            add(int(t[key]))
    writer.add_add_bos_token(False)
    if t["chat_template"]:
        writer.add_chat_template(t["chat_template"])


def export_gguf(model: nn.Module, path: str | Path, tokenizer=None, force: bool = False) -> dict:
    """Write ``model`` (a packed lowbit model of a family in :data:`ARCHITECTURES`, or a float one: the file
    llama.cpp's own quantizer starts from) to the GGUF file ``path`` (see the module docstring); atomic, an
    existing file is refused unless ``force``. Returns ``{"tensors", "types", "dequantized", "max_encoding_error"}``."""
    import gguf

    spec = architecture(model)
    family = spec.family
    if family not in ARCHITECTURES:
        raise LowbitError(f"the GGUF export writes {', '.join(ARCHITECTURES)} models so far, not {family}: export "
                          "it with --to compressed-tensors, or convert the merged float model with llama.cpp's "
                          "convert_hf_to_gguf.py")
    arch, permuted, pre = ARCHITECTURES[family]
    path = Path(path)
    if path.exists() and not force:
        raise LowbitError(f"{path} exists: pass --force to replace it")
    c = model.config
    heads, kv_heads = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), c.num_hidden_layers)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, (QLinear, QEmbedding))}
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    shared_head = isinstance(head, QLinear) and isinstance(embed, QEmbedding) and head.codes is embed.codes
    float_type = {torch.float16: "F16", torch.bfloat16: "BF16"}.get(storage_dtype(model), "F32")
    tensors: list[tuple[str, np.ndarray, str]] = []  # (GGUF name, data, GGUF type)
    types, dequantized, error = {}, [], 0.0

    q_name, k_name = spec.attn_readers[:2]
    head_name = None if head is None else module_name(model, head)

    def rows_for(hf_name: str, rows: int) -> torch.Tensor | None:
        leaf = hf_name.rsplit(".", 1)[-1]
        if not permuted or leaf not in (q_name, k_name):
            return None
        return rotary_rows(rows, heads if leaf == q_name else kv_heads)

    def gguf_name(hf_name: str, kind: str = "weight") -> str:
        name = names.get_name(hf_name)
        if name is None:
            raise LowbitError(f"{hf_name} has no GGUF tensor name in the {arch} architecture: this {family} "
                              "model's layout is not the one llama.cpp knows")
        return f"{name}.{kind}"

    for name, module in packed.items():
        if module is head and shared_head:
            continue  # llama.cpp and transformers use token_embd for a missing output
        try:
            qtype = gguf_type(name, module)
        except LowbitError:
            if isinstance(module, QLinear):
                raise
            dequantized.append(name)
            tensors.append((gguf_name(name), *_float_tensor(module.weight, float_type)))
            continue
        blocks, err = gguf_blocks(name, module, qtype)
        perm = rows_for(name, blocks.shape[0])
        if perm is not None:
            blocks = blocks[perm.numpy()]
        error = max(error, err)
        types[qtype] = types.get(qtype, 0) + 1
        tensors.append((gguf_name(name), blocks, qtype))
    skip = {f"{n}.{k}" for n, m in packed.items() for k, _ in m.named_buffers()}
    skip |= {f"{n}.{k}" for n, m in packed.items() for k, _ in m.named_parameters() if k != "bias"}
    for key, t in model.state_dict().items():
        owner, kind = key.rsplit(".", 1)
        if key in skip or not t.is_floating_point():
            continue
        if owner == head_name and getattr(c, "tie_word_embeddings", False):
            continue
        perm = rows_for(owner, t.shape[0])
        t = t.detach()[perm] if perm is not None else t.detach()
        tensors.append((gguf_name(owner, kind), *_float_tensor(t, float_type)))  # vectors (biases, norms): F32
    file_type = FILE_TYPES[max(types, key=types.get)] if types else FLOAT_FILE_TYPES[float_type]
    vocab = None
    if tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
        log.warning("no tokenizer: the GGUF file holds no vocabulary (transformers reads its weights; llama.cpp "
                    "needs the vocabulary)")
    else:
        vocab = tokenizer_fields(tokenizer, c.vocab_size)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        _write_metadata(writer, model, vocab, file_type, pre)
        for name, data, qtype in tensors:
            raw = getattr(gguf.GGMLQuantizationType, qtype)
            if qtype in ("F16", "F32"):
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)
    return {"tensors": len(tensors), "types": types, "dequantized": dequantized, "max_encoding_error": error}
