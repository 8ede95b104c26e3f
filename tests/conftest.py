"""Shared fixtures: seeded tests, no hub access, tiny random models of each supported architecture."""

from __future__ import annotations

import collections
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def tiny_model(arch: str = "llama", **overrides):
    """A tiny random causal LM of architecture ``arch`` (llama, qwen2, mistral, gemma, gemma2), in eval mode."""
    import transformers as tf

    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    kwargs = {**TINY, **overrides}
    if arch.startswith("gemma"):
        kwargs.setdefault("head_dim", 16)
    torch.manual_seed(0)
    return model_cls(config_cls(**kwargs)).eval()


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
