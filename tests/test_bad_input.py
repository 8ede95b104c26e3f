"""Every command, given bad arguments, broken sources, damaged checkpoints, undecodable files or impossible output
paths: exit status 2, one line on stderr naming the problem, no traceback, nothing on stdout, and nothing of the
user's lost. One table, in process (a subprocess per case would cost seconds each)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_io import craft
from typer.testing import CliRunner

from lowbit.cli import app

runner = CliRunner()
NOT_UTF8 = b"\xff\xfe\x00bits: 4\n"


def _hf(tmp: Path, src: Path, name: str, edit=None, drop=None, cut=None) -> Path:
    folder = tmp / name
    shutil.copytree(src, folder)
    if edit:
        config = json.loads((folder / "config.json").read_text())
        config.update(edit)
        (folder / "config.json").write_text(json.dumps(config))
    if drop:
        (folder / drop).unlink()
    if cut:
        (folder / cut).write_bytes((folder / cut).read_bytes()[:5000])
    return folder


def _ck(tmp: Path, src: Path, name: str, damage) -> Path:
    folder = tmp / name
    shutil.copytree(src, folder)
    damage(folder)
    return folder


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def cases(t: Path, hf: Path, ck: Path) -> dict[str, tuple[list, str]]:
    """name -> (arguments, a phrase the one error line must hold)."""
    file = _write(t / "file", "x")
    bad = _write(t / "bad.yaml", NOT_UTF8)
    badtxt = _write(t / "bad.txt", NOT_UTF8)
    mine = t / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep")
    out = str(t / "o")
    q = ["quantize"]
    return {
        # non-UTF-8 files
        "recipe yaml": (q + [hf, "--recipe", bad, "--out", out], "not UTF-8"),
        "calib file": (q + [hf, "--recipe", "gptq-w4g128", "--calib-file", badtxt, "--out", out], "not UTF-8"),
        "report input": (["report", badtxt, "--out", t / "r.png"], "not UTF-8"),
        "train logs": (["report", "--train-logs", badtxt, "--out", t / "r.png"], "not UTF-8"),
        "finetune data": (["finetune", ck, "--out", out, "--data", badtxt, "--steps", "1"], "not UTF-8"),
        # broken model sources
        "random gguf": (q + [_write(t / "r.gguf", os.urandom(64)), "--out", out], "not a GGUF"),
        "truncated gguf": (q + [_write(t / "t.gguf", b"GGUF"), "--out", out], "not a GGUF"),
        "config not json": (q + [_write(_hf(t, hf, "h1") / "config.json", "{x").parent, "--out", out],
                            "not valid JSON"),
        "unknown model type": (q + [_hf(t, hf, "h2", edit={"model_type": "nosuch"}), "--out", out], "nosuch"),
        "unsupported family": (q + [_hf(t, hf, "h8", edit={"model_type": "gpt2"}), "--recipe", "quarot-w4a4",
                                    "--out", out],
                               "architecture 'gpt2' is not supported; lowbit supports llama, mistral, qwen2"),
        "config wrong type": (q + [_hf(t, hf, "h3", edit={"hidden_size": "big"}), "--out", out], "hidden_size"),
        "config shapes": (q + [_hf(t, hf, "h4", edit={"hidden_size": 96}), "--out", out, "--windows", "0"],
                          "cannot be loaded"),
        "no weights": (q + [_hf(t, hf, "h5", drop="model.safetensors"), "--out", out], "has no weights"),
        "truncated weights": (q + [_hf(t, hf, "h6", cut="model.safetensors"), "--out", out], "truncated"),
        "broken tokenizer": (q + [_hf(t, hf, "h7", drop="tokenizer.json"), "--out", out], "tokenizer"),
        "not a model": (q + [t, "--out", out], "neither a .gguf file nor a folder"),
        # output paths
        "out below a file": (q + [hf, "--out", file / "x"], "which is a file"),
        "out is a file": (q + [hf, "--out", file, "--force"], "not a folder"),
        "out is cwd": (q + [hf, "--out", ".", "--force"], "current folder"),
        "out is root": (q + [hf, "--out", "/", "--force"], "root or mount point"),
        "out unwritable": (q + [hf, "--out", "/proc/x"], "cannot write"),
        "force over user folder": (q + [hf, "--out", mine, "--force"], "lowbit did not write"),
        "finetune out below file": (["finetune", ck, "--out", file / "x"], "which is a file"),
        "compensate out below file": (["compensate", ck, "--out", file / "x"], "which is a file"),
        "merge out below file": (["merge", ck, "--out", file / "x"], "which is a file"),
        "export out below file": (["export", ck, "--out", file / "x"], "which is a file"),
        "bench out below file": (["bench", hf, "--recipes", "rtn-w4g64", "--out", file / "x"], "which is a file"),
        "report out is a folder": (["report", badtxt, "--out", t], "is a folder"),
        # recipe fields of the wrong type
        "bits word": (q + [hf, "--recipe", _write(t / "r1.yaml", "steps:\n- {step: rtn, bits: four}"), "--out", out],
                      "bits must be an integer"),
        "targets number": (q + [hf, "--recipe", _write(t / "r2.yaml", "steps:\n- {step: rtn, targets: 5}"),
                                "--out", out], "targets must be a list of strings"),
        "budget word": (q + [hf, "--recipe", _write(t / "r3.yaml", "steps:\n- {step: lowra, budget: two}"),
                             "--out", out], "budget must be a number"),
        "widths number": (q + [hf, "--recipe", _write(t / "r4.yaml", "steps:\n- {step: lowra, widths: 3}"),
                               "--out", out], "widths must be a list"),
        "seed list": (q + [hf, "--recipe", _write(t / "r5.yaml", "steps:\n- {step: rotate, seed: [1]}"),
                           "--out", out], "seed must be an integer"),
        "recipe name list": (q + [hf, "--recipe", _write(t / "r6.yaml", "name: [1]\nsteps:\n- {step: rtn}"),
                                  "--out", out], "name must be"),
        "recipe not yaml": (q + [hf, "--recipe", _write(t / "r7.yaml", "steps: [\n"), "--out", out], "not valid YAML"),
        # values out of range
        "budget 9": (q + [hf, "--recipe", "lowra-b2.0", "--budget", "9", "--out", out], "more than the widest"),
        "budget 0": (q + [hf, "--recipe", "lowra-b2.0", "--budget", "0", "--out", out], "unreachable"),
        "eval past context": (["eval", ck, "--windows", "1", "--seq-len", "4096"], "longer than the model's context"),
        "finetune past context": (["finetune", ck, "--out", out, "--seq-len", "99999"], "longer than the model's"),
        "lr inf": (["finetune", ck, "--out", out, "--lr", "inf"], "lr must be a positive finite number"),
        "empty prompt": (["generate", ck, "--prompt", ""], "--prompt is empty"),
        "blank prompt": (["generate", ck, "--prompt", "   "], "--prompt is empty"),
        "generate past context": (["generate", ck, "--prompt", "hi", "--max-new-tokens", "5000"],
                                  "more than the model's context"),
        "calibration past context": (q + [hf, "--recipe", "gptq-w4g128", "--calib-seq-len", "100000", "--out", out],
                                     "longer than the model's context"),
        # usage errors: one line too
        "unknown option": (["finetune", ck, "--out", out, "--warmup-ratio", "2"], "No such option"),
        "missing option": (q + [hf], "Missing option '--out'"),
        "wrong value type": (q + [hf, "--bits", "x", "--out", out], "valid integer"),
        # report inputs
        "report empty file": (["report", _write(t / "e.json", ""), "--out", t / "r.png"], "not JSON"),
        "report no rows": (["report", _write(t / "e2.json", "{}"), "--out", t / "r.png"], "no result rows"),
        "report mistyped rows": (["report", _write(t / "e3.json", '[{"recipe": "a", "ppl": "high"}]'),
                                  "--out", t / "r.png"], "row 0 is not a result row"),
        "report nothing to draw": (["report", _write(t / "e4.json", '[{"recipe": "a", "ppl": 3}]'),
                                    "--out", t / "r.png"], "nothing to draw"),
        "train log mistyped": (["report", "--train-logs", _write(t / "l.json", '{"losses": ["a"]}'),
                                "--out", t / "r.png"], "losses"),
        # damaged checkpoints, through every command that reads one
        "info truncated shard": (["info", _ck(t, ck, "c1", lambda c: _write(c / "model-00002-of-00002.safetensors",
                                                                            b"x"))], "truncated"),
        "info deleted shard": (["info", _ck(t, ck, "c2", lambda c: (c / "model-00001-of-00002.safetensors").unlink())],
                               "missing"),
        "eval edited manifest": (["eval", _ck(t, ck, "c3", lambda c: _write(
            c / "lowbit.json", (c / "lowbit.json").read_text().replace('"bits": 4', '"bits": 3')))],
            "changed after it was saved"),
        "generate crafted manifest": (["generate", _ck(t, ck, "c4", lambda c: craft(
            c, lambda m: m["layers"].update({next(iter(m["layers"])): {"shape": [1]}}))), "--prompt", "hi"],
            "cannot build"),
        "finetune crafted aliases": (["finetune", _ck(t, ck, "c5", lambda c: craft(
            c, lambda m: m.update(aliases={"a": "b"}))), "--out", out], "alias"),
        "merge manifest not json": (["merge", _ck(t, ck, "c6", lambda c: _write(c / "lowbit.json", NOT_UTF8)),
                                     "--out", out], "not valid JSON"),
        "export flipped config": (["export", _ck(t, ck, "c7", lambda c: _write(
            c / "config.json", (c / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 65'))),
            "--out", out], "config.json"),
        "compensate no manifest": (["compensate", _ck(t, ck, "c8", lambda c: (c / "lowbit.json").unlink()),
                                    "--out", out, "--method", "loftq"], "not a lowbit checkpoint"),
    }


def one_error(result) -> str:
    """The one ``error:`` line of a refused command: exit 2, nothing on stdout, no traceback, the error line last
    (progress bars may come before it)."""
    lines = result.stderr.strip().replace("\r", "\n").splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert (result.exit_code == 2 and len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.stderr
            and result.stdout == ""), (result.exit_code, result.exception, result.stderr[-300:])
    return errors[0]


def test_every_bad_input_is_one_clear_line(hf_folder, ckpt, tmp_path):
    table = cases(tmp_path, hf_folder, ckpt)
    failures = []
    for name, (args, phrase) in table.items():
        try:
            line = one_error(runner.invoke(app, [str(a) for a in args]))
            assert phrase in line, line
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "keep"  # --force never touched the user's folder
    assert not (tmp_path / "o").exists()  # every case failed before writing anything
    assert len(table) >= 50


def test_no_space_is_found_before_any_work(hf_folder, tmp_path, monkeypatch):
    import shutil as sh

    import lowbit.fileio
    import lowbit.io

    monkeypatch.setattr(lowbit.fileio.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10, 10, 1))
    monkeypatch.setattr(lowbit.io, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    line = one_error(runner.invoke(app, ["quantize", str(hf_folder), "--out", str(tmp_path / "o")]))
    assert "MiB free" in line and "free some space" in line


def test_a_read_only_place_is_found_before_any_work(hf_folder, tmp_path, monkeypatch):
    import errno

    import lowbit.fileio
    import lowbit.io

    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(lowbit.fileio.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(lowbit.io, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    line = one_error(runner.invoke(app, ["quantize", str(hf_folder), "--out", str(tmp_path / "o")]))
    assert "Read-only file system" in line and "writable" in line


def test_a_disk_that_fills_during_the_save_loses_nothing(hf_folder, ckpt, tmp_path, monkeypatch):
    """The estimate said yes, then the disk filled up: one line, the old checkpoint untouched, no staging left."""
    import errno

    from lowbit.shards import TensorAppender

    out = tmp_path / "ck"
    shutil.copytree(ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(TensorAppender, "append", full)
    line = one_error(runner.invoke(app, ["quantize", str(hf_folder), "--recipe", "rtn-w4g64", "--out", str(out),
                                          "--force", "--windows", "0"]))
    assert "No space left on device" in line and "free some space" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
