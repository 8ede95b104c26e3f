"""The ``lowbit`` command line on tiny models: ``--json`` prints exactly one JSON object on stdout, bad input
exits with status 2 and one line on stderr before any model is loaded.

Everything runs for real (quantize, WikiText-2 perplexity, generation) on a 2-layer random llama with a
word-level tokenizer of 256 entries built in-process, saved as a local Hugging Face folder; nothing is fetched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

import lowbit
from lowbit import io as lio
from lowbit.cli import app
from lowbit.presets import PRESETS
from lowbit.state import state_of

runner = CliRunner()  # click >= 8.2 keeps result.stdout and result.stderr apart (no mix_stderr)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_json_object(result) -> dict:
    """Exit 0 and stdout holding exactly one JSON object on one line (logs and progress go to stderr)."""
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    payload = json.loads(lines[0])
    assert isinstance(payload, dict)
    return payload


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ---- info / recipes ---------------------------------------------------------------------------------------

def test_info_json(ckpt):
    info = one_json_object(invoke("info", ckpt, "--json"))
    manifest = lio.read_manifest(ckpt)
    assert info["bits_per_weight"] == manifest["summary"]["bits_per_weight"] == 4 + 24 / 64
    assert info["size_bytes"] == sum(p.stat().st_size for p in ckpt.iterdir() if p.name != lio.MANIFEST)
    assert info["recipe"] == lowbit.Recipe.from_name("rtn-w4g64").to_dict()
    assert info["quantized_layers"] == 14 and len(info["layers"]) == 14
    assert info["packed_file_bytes"] == (ckpt / lio.PACKED_SHARD).stat().st_size
    assert info["packed_file_bits_per_weight"] == info["packed_file_bytes"] * 8 / info["quantized_weights"]
    assert info["versions"]["lowbit"] == lowbit.__version__ and info["path"] == str(ckpt)


def test_info_table_for_people(ckpt, monkeypatch):
    from rich.console import Console

    import lowbit.cli.common

    monkeypatch.setattr(lowbit.cli.common, "out_console", Console(width=200, soft_wrap=True))  # no cropped cells
    result = invoke("info", ckpt)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "bits_per_weight" in out and "4.3750" in out and "rtn-w4g64" in out and "size_bytes" in out
    assert "model.layers.0.self_attn.q_proj" not in out  # only with --layers
    with_layers = invoke("info", ckpt, "--layers")
    assert with_layers.exit_code == 0, with_layers.stderr
    rows = [line for line in with_layers.stdout.splitlines() if "model.layers." in line]
    assert len(rows) == 14 and all("int4" in r and "4.3750" in r for r in rows)
    assert any("model.layers.1.mlp.down_proj" in r and "64x128" in r for r in rows)


def test_info_table_prints_bracketed_paths_as_typed(ckpt, tmp_path, monkeypatch):
    import shutil

    from rich.console import Console

    import lowbit.cli.common

    monkeypatch.setattr(lowbit.cli.common, "out_console", Console(width=300, soft_wrap=True))
    odd = Path(shutil.copytree(ckpt, tmp_path / "run[1]" / "[red]ckpt"))
    result = invoke("info", odd)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout.splitlines()[0] == f"lowbit info: {odd}"  # the title
    assert any(str(odd) in line and "path" in line for line in result.stdout.splitlines()[1:])  # the path row


def test_recipes_json_lists_every_preset():
    presets = one_json_object(invoke("recipes", "--json"))
    assert presets.keys() == PRESETS.keys()
    (step,) = presets["rtn-w4g128"]
    assert step | {} == {**step, "step": "rtn", "format": "int", "bits": 4, "group_size": 128, "symmetric": False}
    assert presets["nf4-g64"][0]["format"] == "nf"


def test_recipes_table():
    result = invoke("recipes")
    assert result.exit_code == 0 and "rtn-w4g128" in result.stdout and "nf4-g64" in result.stdout


# ---- quantize / eval / generate, for real -----------------------------------------------------------------

def test_quantize_json(hf_folder, tmp_path):
    out = tmp_path / "q"
    payload = one_json_object(invoke("quantize", "--model", hf_folder, "--recipe", "rtn-w4g64", "--out", out,
                                     "--windows", "1", "--json"))
    for key in ("fp_ppl", "ppl", "bits_per_weight", "size_bytes", "quantize_seconds"):
        assert key in payload, key
    assert payload["bits_per_weight"] == 4.375 and payload["code_bits"] == 4.0
    assert payload["size_bytes"] == sum(p.stat().st_size for p in out.iterdir() if p.name != lio.MANIFEST)
    assert payload["quantize_seconds"] >= 0 and payload["windows"] == 1 and payload["recipe"] == "rtn-w4g64"
    assert 1 < payload["fp_ppl"] < 1e4 and 1 < payload["ppl"] < 1e4
    assert payload["ppl"] != payload["fp_ppl"]  # the second figure is of the quantized model

    model, tok = lowbit.load(out)  # the checkpoint loads, and its perplexity is the one printed
    assert tok is not None and state_of(model).recipe.name == "rtn-w4g64"
    assert lowbit.perplexity(model, tok, windows=1, progress=False).ppl == pytest.approx(payload["ppl"], rel=1e-6)
    extra = lio.read_manifest(out)["extra"]["eval"]
    assert extra["fp_ppl"] == payload["fp_ppl"] and extra["ppl"] == payload["ppl"]


def test_quantize_no_eval_table_and_force(hf_folder, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("a user's file: --force must not delete it")
    args = ("quantize", "--model", hf_folder, "--recipe", "nf4-g64", "--bits", "3", "--out", out, "--no-eval",
            "--force")
    refused = invoke(*args)
    assert refused.exit_code == 2 and "lowbit did not write" in refused.stderr and (out / "old.txt").is_file()
    (out / ".lowbit").touch()  # now a folder lowbit wrote: --force replaces it
    result = invoke(*args)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "bits_per_weight" in result.stdout and "skipped" in result.stdout and "nf4-g64+custom" in result.stdout
    assert not (out / "old.txt").exists()
    manifest = lio.read_manifest(out)
    assert manifest["recipe"]["steps"][0]["bits"] == 3 and manifest["extra"] == {}
    assert {e["fmt"] for e in manifest["layers"].values()} == {"nf3"}


def test_eval_json(ckpt):
    payload = one_json_object(invoke("eval", ckpt, "--windows", "1", "--seq-len", "64", "--json"))
    model, tok = lowbit.load(ckpt)
    ref = lowbit.perplexity(model, tok, windows=1, seq_len=64, progress=False)
    assert payload["ppl"] == pytest.approx(ref.ppl, rel=1e-6) and math.isfinite(payload["ppl"])
    assert payload["windows"] == 1 and payload["seq_len"] == 64
    assert payload["total_windows"] == ref.total_windows == ref.tokens // 64
    assert payload["eval"] == ref.label() and payload["seconds"] >= 0


def _greedy(ckpt, prompt, n):
    model, tok = lowbit.load(ckpt)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), out.shape[1] - ids.shape[1]


def test_generate_json(ckpt):
    prompt = "The game was released in"
    payload = one_json_object(invoke("generate", ckpt, "--prompt", prompt, "--max-new-tokens", "3", "--json",
                                     "--raw"))
    text, n = _greedy(ckpt, prompt, 3)
    assert payload["prompt"] == prompt and payload["text"] == text and payload["new_tokens"] == n
    assert 1 <= n <= 3 and isinstance(payload["text"], str) and payload["tok_s"] > 0


def test_generate_prints_brackets_literally(ckpt):
    """Prompts and generated text are shown as typed, never read as rich markup ("[/INST]" used to crash)."""
    prompt = "[/INST] the [bold]game[/bold]"
    result = invoke("generate", ckpt, "--prompt", prompt, "--max-new-tokens", "2", "--raw")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout.splitlines()[0] == prompt
    assert result.stdout.splitlines()[1:] == [_greedy(ckpt, prompt, 2)[0]]
    assert "tokens in" in result.stderr


# ---- bad input: exit 2, one line, nothing loaded ----------------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    """Record (and refuse) every way a model could be loaded; ``calls`` must stay empty."""
    import transformers


    calls = []
    real_load_model = lio.load_model

    def load_model(source, *args, **kwargs):
        calls.append(("load_model", str(source)))
        return real_load_model(source, *args, **kwargs)  # resolves the source, then hits the refusals below

    def refuse(what):
        def fn(*args, **kwargs):
            calls.append((what, args))
            raise AssertionError(f"{what} must not be called")
        return fn

    monkeypatch.setattr(lio, "load_model", load_model)
    monkeypatch.setattr(lio, "load", refuse("lowbit.io.load"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse("from_pretrained"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse("tokenizer"))
    return calls


QUANTIZE_ERRORS = [
    (["--model", "no-such-model"], ["unknown model 'no-such-model'", "smollm2-135m"]),
    (["--model", "{tmp}/missing.gguf"], ["{tmp}/missing.gguf", "no such file"]),
    (["--recipe", "{tmp}/missing.yaml"], ["recipe file {tmp}/missing.yaml does not exist"]),
    (["--group-size", "12"], ["group_size must be a positive multiple of 8", "got 12"]),
    (["--group-size", "0"], ["group_size must be a positive multiple of 8", "got 0"]),
    (["--bits", "0"], ["bits must be an integer in 1..8, got 0"]),
    (["--bits", "9"], ["bits must be an integer in 1..8, got 9"]),
    (["--recipe", "rtn-w4-g128"], ["unknown preset 'rtn-w4-g128'", "Did you mean 'rtn-w4g128'?"]),
    (["--number-format", "int5"], ["unknown format 'int5'", "int, iq4_nl, nf"]),
    (["--granularity", "row"], ["granularity must be one of", "'row'"]),
    (["--windows", "-1"], ["--windows must be 'all' or a whole number >= 0 (skip), got -1"]),
    (["--windows", "many"], ["--windows must be 'all' or a whole number", "'many'"]),
    (["--recipe", "lowra-b2.0", "--bits", "3"], ["--bits does not apply to step 'lowra'", "budget"]),
    (["--recipe", "lowra-b2.0", "--budget", "0.5"], ["budget of 0.5 average bits is unreachable"]),
    (["--recipe", "gptq-w4g128", "--calib-file", "{tmp}/missing.txt"], ["calibration file {tmp}/missing.txt"]),
    (["--recipe", "gptq-w4g128", "--calib-self", "--calib-file", "{tmp}/x.txt"],
     ["--calib-self and --calib-file both set"]),
]


@pytest.mark.parametrize("args,expected", QUANTIZE_ERRORS, ids=[" ".join(a) for a, _ in QUANTIZE_ERRORS])
def test_quantize_bad_input(hf_folder, tmp_path, no_loading, args, expected):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["quantize", "--model", hf_folder, "--out", tmp_path / "out", "--json"]
    line = one_error_line(invoke(*base, *args))
    for text in expected:
        assert text.replace("{tmp}", str(tmp_path)) in line, line
    assert no_loading == []
    assert not (tmp_path / "out").exists()


def test_quantize_refuses_an_existing_output_folder(hf_folder, tmp_path, no_loading):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_error_line(invoke("quantize", "--model", hf_folder, "--out", out, "--json"))
    assert f"output folder {out} already exists" in line and "--force" in line
    assert no_loading == [] and [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("command", [["eval", "--json"], ["generate", "--prompt", "hi", "--json"]])
def test_eval_and_generate_on_a_missing_path(tmp_path, no_loading, command):
    missing = tmp_path / "nothing-here"
    line = one_error_line(invoke(command[0], missing, *command[1:]))
    assert f"unknown model '{missing}'" in line
    assert [c[0] for c in no_loading] == ["load_model"]  # resolving the path failed; nothing was read


def test_eval_bad_windows_and_generate_bad_token_count(ckpt, no_loading):
    assert "got -3" in one_error_line(invoke("eval", ckpt, "--windows", "-3", "--json"))
    assert "--max-new-tokens must be at least 1, got 0" in one_error_line(
        invoke("generate", ckpt, "--prompt", "hi", "--max-new-tokens", "0", "--json"))
    assert no_loading == []


def test_folder_that_is_not_a_model(tmp_path, no_loading):
    (tmp_path / "notes.txt").write_text("hello")
    line = one_error_line(invoke("eval", tmp_path, "--json"))
    assert str(tmp_path) in line and "config.json" in line
    assert [c[0] for c in no_loading] == ["load_model"]


def test_info_errors_name_the_file(tmp_path):
    missing = tmp_path / "odd[name]" / "ckpt"  # brackets are printed as typed, not read as markup
    line = one_error_line(invoke("info", missing, "--json"))
    assert f"checkpoint folder {missing} does not exist" in line
    (tmp_path / "plain").mkdir()
    line = one_error_line(invoke("info", tmp_path / "plain"))
    assert str(tmp_path / "plain" / "lowbit.json") in line and "is missing" in line


def test_damaged_checkpoint_is_a_clean_error(ckpt, tmp_path):
    import shutil

    copy = Path(shutil.copytree(ckpt, tmp_path / "ckpt"))
    shard = copy / lio.PACKED_SHARD
    shard.write_bytes(shard.read_bytes()[:-10])
    line = one_error_line(invoke("eval", copy, "--windows", "1", "--seq-len", "64", "--json"))
    assert str(shard) in line and "truncated" in line


def test_checkpoint_without_tokenizer(tmp_path):
    model = tiny_model("llama")
    lowbit.quantize(model, "rtn-w4g64")
    path = lowbit.save(model, tmp_path / "ckpt")  # no tokenizer files
    for command in (["eval", path, "--json"], ["generate", path, "--prompt", "hi", "--json"]):
        line = one_error_line(invoke(*command))
        assert f"{path} has no tokenizer files" in line


def test_bad_jsonl_calibration_file_names_the_line(hf_folder, tmp_path, no_loading):
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no response"}\n')
    line = one_error_line(invoke("quantize", "--model", hf_folder, "--recipe", "gptq-w4g64", "--calib-file", bad,
                                 "--out", tmp_path / "out", "--json"))
    assert f"{bad}:2 has neither a 'text' string" in line
    assert no_loading == []


def test_calibration_file_shorter_than_one_window_fails_before_evaluation(hf_folder, tmp_path, monkeypatch):
    import sys

    def refuse(*args, **kwargs):
        raise AssertionError("perplexity must not run")

    monkeypatch.setattr(sys.modules["lowbit.eval.perplexity"], "perplexity", refuse)
    short = tmp_path / "short.txt"
    short.write_text("the of and " * 10)
    result = invoke("quantize", "--model", hf_folder, "--recipe", "gptq-w4g64", "--calib-file", short,
                    "--calib-seq-len", "64", "--out", tmp_path / "out", "--json")
    assert result.exit_code == 2 and result.stdout == ""
    line = result.stderr.strip().splitlines()[-1]  # after the model-loading progress bar
    assert "calibration text has 30 tokens, fewer than one window of 64" in line and "--calib-seq-len" in line
    assert not (tmp_path / "out").exists()


def test_quantize_lowra_with_a_jsonl_file_and_budget_override(hf_folder, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"prompt": "the of and in", "response": "to a is was"})
                               for _ in range(40)))
    payload = one_json_object(invoke("quantize", "--model", hf_folder, "--recipe", "lowra-gptq-b2.0", "--budget",
                                     "1.5", "--calib-file", calib, "--calib-seq-len", "32", "--calib-windows", "2",
                                     "--out", tmp_path / "q", "--no-eval", "--json"))
    assert payload["recipe"] == "lowra-gptq-b2.0+custom"
    assert 1.49 <= payload["code_bits"] <= 1.5 < payload["bits_per_weight"]
    assert payload["quantize_peak_rss_mb"] > 0 and payload["fp_model_mb"] > 0


def test_quantize_with_self_generated_calibration(hf_folder, tmp_path):
    payload = one_json_object(invoke("quantize", "--model", hf_folder, "--recipe", "gptq-w4g64", "--calib-self",
                                     "--calib-seq-len", "32", "--calib-windows", "2", "--out", tmp_path / "q",
                                     "--no-eval", "--json"))
    assert payload["recipe"] == "gptq-w4g64" and payload["bits_per_weight"] > 4
    assert (tmp_path / "q").is_dir()


def test_report_draws_a_png_per_results_file(tmp_path):
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"rows": [
        {"recipe": "fp32", "ppl": 20.7, "bits_per_weight": 32.0, "code_bits": 32.0, "windows": 16},
        {"recipe": "rtn-w4g128", "ppl": 27.8, "bits_per_weight": 4.28, "code_bits": 4.0, "windows": 16},
        {"recipe": "rtn-w2g64", "ppl": 5e5, "bits_per_weight": 2.38, "code_bits": 2.0, "windows": 16},
        {"recipe": "lowra-b2.0", "ppl": 300.0, "bits_per_weight": 2.3, "code_bits": 2.0, "windows": 16}]}))
    png = tmp_path / "plots" / "bits.png"
    payload = one_json_object(invoke("report", results, "--out", png, "--json"))
    assert payload == {"png": str(png), "rows": 4, "methods": ["fp32", "lowra", "rtn"]}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["bits.png"]  # no temporary file left behind
    line = one_error_line(invoke("report", tmp_path / "missing.json", "--out", png))
    assert "does not exist" in line


# ---- bench ------------------------------------------------------------------------------------------------

def test_bench_json_keyed_by_recipe_with_ratios_and_files(hf_folder, tmp_path):
    out = tmp_path / "bench"
    payload = one_json_object(invoke("bench", "--model", hf_folder, "--recipes", "rtn-w4g64,lowra-b2.0",
                                     "--decode-tokens", "4", "--prefill-tokens", "32", "--batches", "2",
                                     "--batch-tokens", "2", "--runs", "2", "--out", out, "--json"))
    assert list(payload) == ["fp32", "rtn-w4g64", "lowra-b2.0"]
    for name, row in payload.items():
        for key in ("decode_tok_s", "decode_ratio", "prefill_tok_s", "prefill_ratio", "peak_rss_mb", "model_peak_mb",
                    "kernel", "bytes_per_token", "roofline_tok_s", "roofline_pct", "bits_per_weight",
                    "decode_b2_tok_s", "decode_b2_ratio", "contended_decode_tok_s", "contended_pct"):
            assert key in row, (name, key)
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["runs"] == 2  # two fresh processes each: the median and the range of both
        assert row["batch_engine"] == "transformers"  # no --native: every batch through transformers
        for key in ("decode_tok_s", "prefill_tok_s", "decode_b2_tok_s"):
            lo, hi = row[f"{key}_range"]
            assert lo <= row[key] <= hi and row[key] == pytest.approx((lo + hi) / 2)
        assert row["decode_ratio"] == pytest.approx(row["decode_tok_s"] / payload["fp32"]["decode_tok_s"])
        assert row["contended_pct"] == pytest.approx(100 * row["contended_decode_tok_s"] / row["decode_tok_s"])
        lo, hi = row["bandwidth_gbs_range"]  # measured before each round and after the last; the highest is used
        assert 0 < lo <= hi == row["bandwidth_gbs"]
        assert row["roofline_pct"] == pytest.approx(100 * row["decode_tok_s"] * row["bytes_per_token"] / (hi * 1e9))
    assert payload["fp32"]["decode_ratio"] == 1.0 and payload["fp32"]["kernel"] == "none"
    assert payload["rtn-w4g64"]["kernel"].startswith("cpu-gemv")  # decode steps ran the packed kernel
    assert payload["lowra-b2.0"]["kernel"].startswith("cpu-gemv")
    # packed weights are read per token instead of fp32 ones
    assert payload["rtn-w4g64"]["bytes_per_token"] < payload["fp32"]["bytes_per_token"]
    assert {p.name for p in out.iterdir()} == {"bench.md", "bench.json", "bench.png"}
    assert "| rtn-w4g64 |" in (out / "bench.md").read_text()
    assert "Roofline: the highest memory copy bandwidth" in (out / "bench.md").read_text()


def test_bench_rejects_an_unknown_recipe_before_loading(hf_folder, tmp_path, no_loading):
    line = one_error_line(invoke("bench", "--model", hf_folder, "--recipes", "rtn-w4g64,nope", "--out", tmp_path))
    assert "nope" in line
    line = one_error_line(invoke("bench", "--model", hf_folder, "--batches", "4,x", "--out", tmp_path))
    assert "--batches" in line and "4,16" in line


def test_random_model_sources_are_written_once_and_load(monkeypatch, tmp_path):
    """``random:llama-SIZE`` resolves to a seeded random HF folder under $LOWBIT_CACHE (written once, atomically
    renamed), which loads like any model; an unknown size is a one-line error listing the known ones."""
    import lowbit
    from lowbit import random_models
    from lowbit.models import resolve_source

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setitem(random_models.SHAPES, "tiny", (64, 128, 2, 4, 2, 49152, True))
    kind, folder = resolve_source("random:llama-tiny")
    assert kind == "hf" and folder == tmp_path / "random" / "llama-tiny" and (folder / "config.json").is_file()
    assert not folder.with_name("llama-tiny.tmp").exists()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert resolve_source("random:llama-tiny")[1] == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index  # tied: the head is the table
    model, tok = lowbit.load_model("random:llama-tiny")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok("hello").input_ids
    with pytest.raises(lowbit.LowbitError, match="random:llama-1b"):
        resolve_source("random:gpt-9b")


def test_bench_children_run_in_an_empty_folder(monkeypatch, tmp_path):
    """A ``lowbit/`` in the caller's folder is never imported by the measuring child: it runs in an empty folder
    and gets the data folder explicitly."""
    import subprocess

    import lowbit.bench as bench

    seen = {}

    def run(cmd, **kwargs):
        seen.update(kwargs, listing=list(Path(kwargs["cwd"]).iterdir()))

        class Done:
            returncode, stdout = 0, '{"decode_tok_s": 1}\n'
        return Done()

    monkeypatch.setattr(subprocess, "run", run)
    assert bench._child("/abs/model", bench.BenchConfig()) == {"decode_tok_s": 1}
    assert seen["listing"] == [] and Path(seen["cwd"]) != Path.cwd()
    assert seen["env"]["LOWBIT_DATA"]
