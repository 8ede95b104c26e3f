"""LLaMA-shaped models with random weights, for speed and scale measurements: decode and prefill speed do not
depend on the weights' values, so a 1B-shaped model measures what users' 1B models will run at without
downloading one. ``random:llama-1b`` (any size of :data:`SHAPES`) is a model source every command accepts.

Weights are normal with std 0.02 (norms 1), seeded, in bf16, written as an HF folder of safetensors shards one
tensor at a time (never the whole model in memory), with SmolLM2's tokenizer (its ids fit every vocabulary).
The folder is written once under ``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``) ``/random/llama-SIZE``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import LowbitError

PREFIX = "random:"
# hidden, intermediate, blocks, heads, kv heads, vocab, tied: 0.1b is SmolLM2-135M's shape, 1b and 3b
# Llama-3.2's, 8b Llama-3.1's, 1.6b a TinyLlama-wide model of 34 blocks with SmolLM2's vocabulary.
SHAPES = {
    "0.1b": (576, 1536, 30, 9, 3, 49152, True),
    "1b": (2048, 8192, 16, 32, 8, 128256, True),
    "1.6b": (2048, 5632, 34, 32, 4, 49152, False),
    "3b": (3072, 8192, 28, 24, 8, 128256, True),
    "8b": (4096, 14336, 32, 32, 8, 128256, False),
}


def config_for(size: str, blocks: int | None = None) -> dict:
    """The HF ``config.json`` of a random LLaMA of shape ``size`` (``blocks`` overrides its depth)."""
    hidden, inter, layers, heads, kv, vocab, tied = SHAPES[size]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": blocks or layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192, "rope_theta": 500000.0, "hidden_act": "silu", "dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2}


def write_random_model(folder: Path, config: dict, tokenizer, shard_bytes: int = 2 << 30) -> Path:
    """A random bf16 LLaMA as an HF folder, tensor by tensor, written to ``folder.tmp`` then renamed (a crash
    leaves no half-written model under the final name); ``tokenizer()`` gives the tokenizer saved beside it.
    Returns ``folder`` (left alone if it exists)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    with init_empty_weights():
        skeleton = LlamaForCausalLM(cfg)
    shapes = {n: t.shape for n, t in skeleton.named_parameters()}
    if config["tie_word_embeddings"]:  # a tied head is the embedding table: written, it would load untied
        head = skeleton.get_output_embeddings()
        shapes.pop(next(n for n, m in skeleton.named_modules() if m is head) + ".weight", None)
    gen = torch.Generator().manual_seed(0)
    shards, shard, size = [], {}, 0  # names per written shard; the tensors of the one being filled
    for i, (name, shape) in enumerate(shapes.items()):
        shard[name] = torch.ones(shape, dtype=torch.bfloat16) if name.endswith("norm.weight") else \
            (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= shard_bytes or i == len(shapes) - 1:
            shards.append(list(shard))
            save_file(shard, tmp / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
            shard, size = {}, 0
    weight_map = {}
    for i, names in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (tmp / f"part-{i}.safetensors").rename(tmp / final)
        weight_map.update(dict.fromkeys(names, final))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer().save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def cache_root() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")).expanduser()


def random_model_folder(source: str, tokenizer) -> Path:
    """``random:llama-SIZE`` -> its HF folder (written on first use with ``tokenizer()``'s tokenizer; a 1B model
    takes about a minute and 2.5 GB)."""
    name = source[len(PREFIX):]
    size = name.removeprefix("llama-")
    if not name.startswith("llama-") or size not in SHAPES:
        raise LowbitError(f"unknown random model {source!r}; pass one of "
                          f"{', '.join(PREFIX + 'llama-' + s for s in SHAPES)}")
    return write_random_model(cache_root() / "random" / name, config_for(size), tokenizer)
