"""Model sources: a Hub id resolved from a local folder laid out as the Hugging Face Hub cache (nothing is
downloaded), and sharded safetensors sources with an index, checked before any output is written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, word_tokenizer
from test_cli import invoke, one_error_line

import lowbit
from lowbit.errors import LowbitError
from lowbit.hub import is_repo_id
from lowbit.models import check_source

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding ``acme/tiny-llama`` (refs/main -> a snapshot with config, weights and tokenizer)."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / REVISION
    tiny_model("llama", max_position_embeddings=2048).save_pretrained(snapshot)
    word_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return snapshot


def test_repo_ids_are_told_from_paths():
    assert is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_repo_id("acme/tiny-llama")
    assert not is_repo_id("smollm2-135m") and not is_repo_id("/abs/path") and not is_repo_id("a/b/c")


def test_a_hub_id_loads_from_the_cache(hub_cache):
    assert check_source("acme/tiny-llama") == ("hf", hub_cache)
    model, tok = lowbit.load_model("acme/tiny-llama")
    ref = tiny_model("llama", max_position_embeddings=2048)
    ids = torch.randint(0, 200, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits) and tok is not None


def test_cli_quantizes_a_hub_id(hub_cache, tmp_path):
    result = invoke("quantize", "acme/tiny-llama", "--recipe", "rtn-w4g64", "--no-eval", "--out", tmp_path / "q",
                    "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "acme/tiny-llama" and (tmp_path / "q" / "lowbit.json").is_file()


def test_a_hub_id_not_in_the_cache_offline_is_one_clear_error(hub_cache):
    with pytest.raises(LowbitError, match=r"model 'acme/other' is not in the Hugging Face cache .* HF_HUB_OFFLINE"):
        check_source("acme/other")


@pytest.fixture
def sharded(tmp_path):
    folder = tmp_path / "sharded"
    tiny_model("llama", max_position_embeddings=2048).save_pretrained(folder, max_shard_size="100KB")
    word_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").is_file()
    return folder


def test_a_sharded_source_quantizes(sharded, tmp_path):
    model, _ = lowbit.load_model(sharded)
    ref = tiny_model("llama", max_position_embeddings=2048)
    ids = torch.randint(0, 200, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def _drop_shard(folder):
    sorted(folder.glob("*.safetensors"))[1].unlink()


def _misindex(folder):
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    other = next(v for v in data["weight_map"].values() if v != data["weight_map"][name])
    data["weight_map"][name] = other
    index.write_text(json.dumps(data))


def _truncate_header(folder):
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:20])


@pytest.mark.parametrize(("damage", "phrase"), [
    (_drop_shard, "which is missing from"),
    (_misindex, "which does not hold it"),
    (_truncate_header, "not a readable safetensors file"),
])
def test_a_broken_sharded_source_is_one_error_before_any_output(sharded, tmp_path, damage, phrase):
    damage(sharded)
    line = one_error_line(invoke("quantize", sharded, "--recipe", "rtn-w4g64", "--no-eval", "--out", tmp_path / "q",
                                 "--json"))
    assert phrase in line, line
    assert not (tmp_path / "q").exists()
