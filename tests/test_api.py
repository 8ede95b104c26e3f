"""The typed Python API and the command line are one thing: for quantize, eval, finetune and compensate on a tiny
model, ``lowbit <verb> --json`` prints exactly ``api.<verb>(config).to_dict()`` (timings and memory aside, which
no two runs share). And every command, given a bad input, exits 2 with one line and no traceback."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from lowbit import api
from lowbit.cli import app
from lowbit.train import TrainConfig

runner = CliRunner()

# Measured per run, so they differ between any two runs of the same job.
VOLATILE = {"seconds", "quantize_seconds", "quantize_peak_rss_mb", "peak_rss_mb", "tokens_per_second",
            "step_tokens_per_second", "out", "loss_curve"}


def cli_json(*args) -> dict:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    (line,) = result.stdout.splitlines()
    return json.loads(line)


def same(cli: dict, python: dict) -> None:
    python = json.loads(json.dumps(python, default=str))  # what --json would print of it
    assert set(cli) == set(python)
    assert {k: v for k, v in cli.items() if k not in VOLATILE} == {k: v for k, v in python.items() if k not in VOLATILE}


def test_quantize(hf_folder, tmp_path):
    cli = cli_json("quantize", hf_folder, "--recipe", "rtn-w4g64", "--windows", "1", "--out", tmp_path / "a",
                   "--json")
    python = api.quantize(api.QuantizeConfig(out=tmp_path / "b", model=str(hf_folder), recipe="rtn-w4g64", windows=1))
    same(cli, python.to_dict())
    assert cli["ppl"] == python.ppl and cli["out"] == str(tmp_path / "a")


def test_eval(ckpt):
    python = api.evaluate(api.EvalConfig(str(ckpt), windows=1))
    same(cli_json("eval", ckpt, "--windows", "1", "--json"), python.to_dict())


def test_finetune(ckpt, tmp_path):
    args = ["--steps", "2", "--batch", "2", "--seq-len", "32", "--rank", "2", "--json"]
    cli = cli_json("finetune", ckpt, "--out", tmp_path / "a", *args)
    python = api.finetune(api.FinetuneConfig(str(ckpt), tmp_path / "b", rank=2, seq_len=32,
                                             train=TrainConfig(steps=2, batch=2, checkpoint_every=25)))
    same(cli, python.to_dict())
    assert cli["final_loss"] == python.final_loss


def test_compensate(ckpt, tmp_path):
    args = ["--method", "loftq", "--rank", "2", "--windows", "1", "--json"]
    cli = cli_json("compensate", ckpt, "--out", tmp_path / "a", *args)
    python = api.compensate(api.CompensateConfig(str(ckpt), tmp_path / "b", method="loftq", rank=2, windows=1))
    same(cli, python.to_dict())
    assert cli["ppl"] == python.ppl


# One bad input per command: each must exit 2 with one line naming the problem, never a traceback.
BAD = {
    "quantize": (["quantize", "no-such-model", "--out", "{tmp}/o"], "unknown model"),
    "eval": (["eval", "{ckpt}", "--windows", "0"], "--windows must be 'all' or a whole number >= 1"),
    "generate": (["generate", "{tmp}/missing", "--prompt", "hi"], "unknown model"),
    "info": (["info", "{tmp}/missing"], "does not exist"),
    "recipes": None,  # takes no input
    "report": (["report", "{tmp}/missing.json", "--out", "{tmp}/x.png"], "missing.json"),
    "bench": (["bench", "--recipes", "rtn-w4-g128", "--out", "{tmp}/b"], "unknown preset"),
    "finetune": (["finetune", "{ckpt}", "--out", "{tmp}/o", "--adapter", "dora"], "--adapter must be lora"),
    "merge": (["merge", "{ckpt}", "--out", "{tmp}/o"], "has no adapters to merge"),
    "compensate": (["compensate", "{ckpt}", "--out", "{tmp}/o", "--method", "svd"], "--method must be rilq or loftq"),
    "export": (["export", "{ckpt}", "--out", "{tmp}/o", "--format", "onnx"], "--to must be one of peft, native"),
}


def test_every_command_is_covered():
    assert {c.name or c.callback.__name__ for c in app.registered_commands} == set(BAD)


@pytest.mark.parametrize("command", [c for c, v in BAD.items() if v is not None])
def test_bad_input_is_one_line(command, ckpt, tmp_path):
    args, expected = BAD[command]
    result = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(ckpt)) for a in args])
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_windows_mean_the_same_everywhere(hf_folder, ckpt, tmp_path, monkeypatch):
    """N = the first N test windows, all = every one, 0 = skip (quantize, finetune, compensate, merge); eval needs
    at least one."""
    skipped = cli_json("quantize", hf_folder, "--recipe", "rtn-w4g64", "--windows", "0", "--out", tmp_path / "q",
                       "--json")
    assert skipped["ppl"] is None and skipped["eval"] == "skipped"
    module, seen = sys.modules["lowbit.api.evaluate"], []
    real = module.perplexity

    def record(model, tok, windows, seq_len, kv_cache=None):
        seen.append(windows)
        return real(model, tok, windows=1, seq_len=seq_len, kv_cache=kv_cache)  # one window checks the plumbing

    monkeypatch.setattr(module, "perplexity", record)
    cli_json("eval", ckpt, "--windows", "all", "--json")
    assert seen == [None]  # None: every window (lowbit.perplexity's "all")


def test_model_source_is_the_first_argument_and_the_old_option_still_works(hf_folder, tmp_path):
    new = cli_json("quantize", hf_folder, "--recipe", "rtn-w4g64", "--windows", "0", "--out", tmp_path / "a", "--json")
    old = cli_json("quantize", "--model", hf_folder, "--recipe", "rtn-w4g64", "--windows", "0", "--out", tmp_path / "b",
                   "--json")
    assert new["model"] == old["model"] == str(hf_folder)
    result = runner.invoke(app, ["quantize", str(hf_folder), "--model", "smollm2-135m", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "two model sources" in result.stderr
