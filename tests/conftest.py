"""Shared fixtures: seeded tests, no hub access, tiny random models of each supported architecture."""

from __future__ import annotations

import collections
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests hold the math to fp32 tolerances: the kernels that keep activations fp32 (``exact``). The fast choice
# users get (``auto``: int8 decode activations, bf16 prefill tiles) has its own tests with its own bounds
# (tests/kernels/test_kernels.py, the ``auto`` fixture).
os.environ.setdefault("LOWBIT_KERNEL", "exact")
# Under pytest-xdist (``make test`` runs one worker per core, up to TEST_WORKERS) each worker gets its share of
# the cores, so workers do not oversubscribe them: torch's and OpenMP's thread counts are read when torch loads,
# and the CLI subprocesses a test starts inherit the same share.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


# Each family of lowbit's architecture table: (config class, model class, what a tiny config needs beyond TINY).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def tiny_model(arch: str = "llama", **overrides):
    """A tiny random causal LM of family ``arch`` (a key of :data:`FAMILIES`), in eval mode."""
    import transformers as tf

    config_name, model_name, extra = FAMILIES[arch]
    kwargs = {**TINY, **extra, **overrides}
    torch.manual_seed(0)
    return getattr(tf, model_name)(getattr(tf, config_name)(**kwargs)).eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


class ByteTokenizer:
    """Minimal tokenizer for tiny models: one token per byte (vocab 256), no special tokens added."""

    eos_token_id = 0
    pad_token_id = 0
    chat_template = None

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([list(text.encode("utf-8"))])

        class Out:
            input_ids = ids

        return Out()

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save_pretrained(self, path):  # tiny test checkpoints carry no tokenizer files
        return None


def word_tokenizer():
    """A fast tokenizer: the 253 commonest words of the start of WikiText-2 test, plus <unk>, <s>, </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lowbit.data import wikitext2_text

    common = collections.Counter(wikitext2_text("test")[:20000].split()).most_common(253)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, (w, _) in enumerate(common)}}
    assert len(vocab) == 256  # the tiny models' vocab_size
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny llama and its tokenizer saved as a local Hugging Face model folder."""
    folder = tmp_path_factory.mktemp("cli") / "tiny-llama"
    tiny_model("llama", max_position_embeddings=2048).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, hf_folder) -> Path:
    """A lowbit checkpoint (rtn-w4g64, with tokenizer) of the tiny llama, made with the Python API."""
    import lowbit

    model, tok = lowbit.load_model(hf_folder)
    lowbit.quantize(model, "rtn-w4g64")
    return lowbit.save(model, tmp_path_factory.mktemp("cli") / "ckpt", tokenizer=tok)


def bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer (GPT-2's kind, what the GGUF export writes) of ``vocab_size`` tokens, trained on
    the start of WikiText-2 test: 256 byte tokens, merges, and <|endoftext|> (id 0, bos/eos/pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.data import wikitext2_text

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([wikitext2_text("test")[:20000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
