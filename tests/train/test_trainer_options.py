"""The trainer beyond the basics: a PEFT-wrapped float model (the benchmark's baseline), schedules and warmup,
per-step timings, checkpointing left as found, more bad input, and ``lowbit finetune --resume`` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ByteTokenizer, tiny_model, word_tokenizer
from test_cli import invoke, one_error_line, one_json_object

import lowbit.train
from lowbit import LowbitError
from lowbit import adapters as ad
from lowbit.train import TrainConfig, load_data, text_windows, train
from lowbit.train.engine import checkpointing_on, make_scheduler, set_checkpointing


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    return load_data(tok, None, 64)


def test_a_peft_wrapped_float_model_trains_its_lora_only(data):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    result = train(model, data, TrainConfig(steps=30, batch=4, lr=5e-3), progress=False)
    assert result.final_loss < result.first_loss - 0.3
    assert len(result.step_seconds) == 30 and len(result.to_dict()["step_tokens_per_second"]) == 30
    assert result.tokens_per_step == 4 * 64
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(trainable[n], p) for n, p in model.named_parameters() if n in trainable)
    assert not checkpointing_on(model)  # switched on for training, off again afterwards


def test_checkpointing_that_was_on_stays_on(data):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    set_checkpointing(model, True)
    train(model, data, TrainConfig(steps=1, batch=1), progress=False)
    assert checkpointing_on(model)


def _lrs(config: TrainConfig) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    sched = make_scheduler(opt, config.optim())
    out = []
    for _ in range(config.steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules_and_warmup():
    assert TrainConfig(steps=100).warmup == 3 and TrainConfig(steps=100, warmup_steps=10).warmup == 10
    constant = _lrs(TrainConfig(steps=6, lr=1.0, warmup_steps=2, schedule="constant"))
    assert constant == pytest.approx([0.0, 0.5, 1, 1, 1, 1])
    cosine = _lrs(TrainConfig(steps=6, lr=1.0, warmup_steps=2))
    assert cosine[:3] == pytest.approx([0.0, 0.5, 1.0]) and cosine[2] > cosine[3] > cosine[4] > cosine[5] > 0
    linear = _lrs(TrainConfig(steps=6, lr=1.0, warmup_steps=2, schedule="linear"))
    assert linear == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
    for bad in (dict(schedule="step"), dict(warmup_steps=6), dict(steps=0), dict(lr=0.0), dict(log_every=-1)):
        with pytest.raises(LowbitError):
            TrainConfig(**{"steps": 6, **bad})


def test_more_bad_data(tok, tmp_path):
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": "a", "response": "b"}, {"prompt": "a", "response": "b"}, {"response": "b"})))
    with pytest.raises(LowbitError, match="line 3 has no string field 'prompt'"):
        load_data(tok, no_prompt, 16)
    not_json = tmp_path / "not_json.jsonl"
    not_json.write_text('{"prompt": "a", "response": "b"}\n{prompt: a}\n')
    with pytest.raises(LowbitError, match="line 2 is not valid JSON"):
        load_data(tok, not_json, 16)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n  \n")
    with pytest.raises(LowbitError, match="holds no examples"):
        load_data(tok, blank, 16)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(LowbitError, match="not UTF-8"):
        load_data(tok, latin, 16)
    with pytest.raises(LowbitError, match="is not a file"):
        load_data(tok, tmp_path, 16)
    with pytest.raises(LowbitError, match="at least 2"):
        load_data(tok, None, 1)


def test_finetune_resume_continues_a_killed_command_to_the_same_curve(ckpt, tmp_path, monkeypatch):
    args = ["--steps", "5", "--batch", "2", "--seq-len", "32", "--rank", "2", "--lr", "5e-3", "--checkpoint-every",
            "2", "--json"]
    whole = one_json_object(invoke("finetune", ckpt, "--out", tmp_path / "whole", *args))
    expected = json.loads((tmp_path / "whole" / "train_log.json").read_text())["losses"]
    assert len(expected) == 5 and whole["steps"] == 5

    class Killed(Exception):
        pass

    def kill_at_3(step, loss):
        if step == 3:
            raise Killed

    real_train = lowbit.train.train
    monkeypatch.setattr(lowbit.train, "train", lambda *a, **k: real_train(*a, **k, on_step=kill_at_3))
    out = tmp_path / "resumed"
    killed = invoke("finetune", ckpt, "--out", out, *args)
    assert isinstance(killed.exception, Killed) and not out.exists()
    assert (tmp_path / "resumed.trainer" / "state.json").is_file()  # written at step 2: safetensors + JSON, no pickle
    monkeypatch.setattr(lowbit.train, "train", real_train)
    assert "other settings" in one_error_line(invoke("finetune", ckpt, "--out", out, *args[:-1], "--seed", "1",
                                                     "--resume"))
    assert "other training data" in one_error_line(invoke("finetune", ckpt, "--out", out, *args, "--seq-len", "16",
                                                          "--resume"))
    resumed = one_json_object(invoke("finetune", ckpt, "--out", out, *args, "--resume"))
    assert resumed["steps"] == 5
    assert json.loads((out / "train_log.json").read_text())["losses"] == pytest.approx(expected, abs=1e-5)
    assert not (tmp_path / "resumed.trainer").exists()
    assert "nothing to resume" in one_error_line(invoke("finetune", ckpt, "--out", tmp_path / "new", *args,
                                                        "--resume"))


def test_resume_never_unpickles_and_the_package_has_no_pickle_loads(tmp_path):
    """The training state is safetensors + JSON: a pickle planted where the old state lived is never read."""
    import pickle
    from pathlib import Path

    import lowbit

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    state_dir = tmp_path / "run.trainer"
    state_dir.mkdir()
    (state_dir / "trainer_state.pt").write_bytes(pickle.dumps(Payload()))
    model = tiny_model("llama")
    lowbit.quantize(model, "rtn-w4g64")
    ad.attach(model, ad.LoRAConfig(rank=2))
    ad.freeze(model)
    data = text_windows(ByteTokenizer(), "abc " * 200, 16)
    with pytest.raises(LowbitError, match="nothing to resume"):
        train(model, data, TrainConfig(steps=2, batch=2), state_dir=state_dir, resume=True, progress=False)
    assert not marker.exists()
    sources = [p.read_text() for p in Path(lowbit.__file__).parent.rglob("*.py")]
    assert not any("torch.load(" in s or "import pickle" in s for s in sources)
