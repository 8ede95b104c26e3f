"""The trainer: chunked loss = transformers' loss, only adapters change, loss goes down, a killed run resumes to
the same curve, jsonl masking, bad input; ``lowbit finetune`` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, word_tokenizer
from test_cli import invoke, one_error_line, one_json_object

import lowbit
from lowbit import LowbitError
from lowbit import adapters as ad
from lowbit.train import TrainConfig, jsonl_pairs, lm_loss, load_data, train
from lowbit.train.data import IGNORE


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    return load_data(tok, None, 64)  # WikiText-2 valid, 64-token windows


def _adapted(adapter=ad.LoRAConfig(rank=4)):
    model = lowbit.quantize(tiny_model("llama", max_position_embeddings=2048), "rtn-w4g64")
    torch.manual_seed(0)
    ad.attach(model, adapter)
    ad.freeze(model)
    return model


def test_chunked_loss_equals_the_models_own_loss(data):
    model = _adapted()
    ids, labels = data.input_ids[:3], data.labels[:3].clone()
    labels[:, :10] = IGNORE
    expected = model(input_ids=ids, labels=labels).loss
    assert torch.allclose(lm_loss(model, ids, labels, chunk=50), expected, atol=1e-5)
    assert torch.allclose(lm_loss(model, ids, labels, chunk=0), expected)


@pytest.mark.parametrize("adapter", [ad.LoRAConfig(rank=4), ad.LoRMAConfig(rank=4)], ids=["lora", "lorma"])
def test_training_lowers_the_loss_and_changes_only_adapters(data, adapter):
    model = _adapted(adapter)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train(model, data, TrainConfig(steps=30, batch=4, lr=5e-3), progress=False)
    assert result.final_loss < result.first_loss - 0.3
    assert result.steps == 30 and result.tokens == 30 * 4 * 64 and result.peak_rss_mb > 0
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)


def test_a_killed_run_resumes_to_the_same_loss_curve(data, tmp_path):
    config = TrainConfig(steps=12, batch=2, grad_accum=2, lr=5e-3, checkpoint_every=5)
    full = train(_adapted(), data, config, progress=False).losses

    class Killed(Exception):
        pass

    def kill_at_7(step, loss):
        if step == 7:
            raise Killed

    model = _adapted()
    with pytest.raises(Killed):
        train(model, data, config, state_dir=tmp_path, on_step=kill_at_7, progress=False)
    resumed_model = _adapted()  # a fresh process: same base and adapter init, state from the checkpoint (step 5)
    resumed = train(resumed_model, data, config, state_dir=tmp_path, resume=True, progress=False)
    assert resumed.steps == 12 and len(resumed.losses) == 12
    assert resumed.losses == pytest.approx(full, abs=1e-5)
    with pytest.raises(LowbitError, match="other settings"):
        train(_adapted(), data, TrainConfig(steps=20, batch=2), state_dir=tmp_path, resume=True, progress=False)


def test_jsonl_takes_the_loss_on_the_response_only(tok, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "the city of", "response": "the game was"}) + "\n\n" +
                    json.dumps({"prompt": "in the", "response": "first season"}) + "\n")
    pairs = jsonl_pairs(tok, path, seq_len=8)
    prompt, response = tok("the city of").input_ids, tok("the game was").input_ids + [tok.eos_token_id]
    assert pairs.input_ids[0, :6].tolist() == prompt + response[:3]
    assert pairs.labels[0].tolist() == [IGNORE] * 3 + response + [IGNORE]
    assert pairs.labels[1, :2].tolist() == [IGNORE, IGNORE] and (pairs.labels[1, 2:4] != IGNORE).all()


def test_bad_data_is_refused_with_the_reason(tok, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(LowbitError, match="is empty"):
        load_data(tok, empty, 16)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(LowbitError, match="line 2 has no string field 'response'"):
        load_data(tok, bad, 16)
    short = tmp_path / "short.txt"
    short.write_text("the city")
    with pytest.raises(LowbitError, match="fewer than one window"):
        load_data(tok, short, 16)
    with pytest.raises(LowbitError, match="does not exist"):
        load_data(tok, tmp_path / "missing.txt", 16)
    frozen = lowbit.quantize(tiny_model("llama"), "rtn-w4g64")
    ad.freeze(frozen)  # no adapters: nothing left to train
    with pytest.raises(LowbitError, match="no trainable parameters"):
        train(frozen, load_data(tok, None, 16), TrainConfig(steps=1))


def test_finetune_command_end_to_end(ckpt, tmp_path):
    out = tmp_path / "tuned"
    payload = one_json_object(invoke("finetune", ckpt, "--out", out, "--steps", "6", "--batch", "2", "--seq-len",
                                     "32", "--rank", "4", "--lr", "5e-3", "--windows", "1", "--json"))
    for key in ("first_loss", "final_loss", "steps", "tokens_per_second", "peak_rss_mb", "ppl"):
        assert key in payload
    assert payload["steps"] == 6 and payload["windows"] == 1
    assert (out / "loss.png").stat().st_size > 0
    assert len(json.loads((out / "train_log.json").read_text())["losses"]) == 6
    assert not (tmp_path / "tuned.trainer").exists()  # the resumable state goes once the checkpoint is saved
    loaded, _ = lowbit.load(out)
    assert len(ad.adapted_layers(loaded)) == 14
    again = one_json_object(invoke("finetune", out, "--out", tmp_path / "again", "--steps", "2", "--batch", "1",
                                   "--seq-len", "16", "--adapter", "lorma", "--json"))
    assert again["adapter"] == "lora" and again["rank"] == 4  # the checkpoint's adapters go on training
    assert len(ad.adapted_layers(lowbit.load(tmp_path / "again")[0])) == 14
    evaluated = one_json_object(invoke("eval", out, "--windows", "1", "--json"))
    assert evaluated["ppl"] == pytest.approx(payload["ppl"], rel=1e-5)
    lorma = one_json_object(invoke("finetune", ckpt, "--out", tmp_path / "m", "--adapter", "lorma", "--steps", "2",
                                   "--batch", "1", "--seq-len", "16", "--rank", "2", "--json"))
    assert lorma["steps"] == 2
    overlay = one_json_object(invoke("report", "--train-logs", f"{out}/train_log.json,{tmp_path}/m/train_log.json",
                                     "--out", tmp_path / "overlay.png", "--json"))
    assert len(overlay["curves"]) == 2 and (tmp_path / "overlay.png").stat().st_size > 0
    assert "not a train_log.json" in one_error_line(invoke("report", "--train-logs", out / "lowbit.json"))
    assert "matches no quantized layer" in one_error_line(
        invoke("finetune", ckpt, "--out", tmp_path / "x", "--targets", "*.nope", "--steps", "1"))
    assert "rank 64 is not below" in one_error_line(
        invoke("finetune", ckpt, "--out", tmp_path / "x", "--rank", "64", "--steps", "1"))
    assert "already exists" in one_error_line(invoke("finetune", ckpt, "--out", out, "--steps", "1"))
