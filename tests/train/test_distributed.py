"""Device choice and data-parallel fine-tuning (issue 24): ``--device`` resolves in one place with a clear error
for a device that is not there; ``lowbit finetune --processes 2`` (two processes under accelerate, gloo) follows
the one-process loss curve step by step, only the main process prints and writes, and a run stopped after some
steps resumes with another process count and finishes on the same curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_cli import invoke, one_error_line

from lowbit import LowbitError
from lowbit.device import process_device, resolve_device
from lowbit.train.distributed import Processes, check_batch, shard


def test_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    for spec, named in (("cuda", "cuda:0"), ("cuda:1", "cuda:1")):
        with pytest.raises(LowbitError, match=f"device {named} is not available.*--device cpu"):
            resolve_device(spec)
    for bad in ("gpu", "cuda:x", "mps:0"):
        with pytest.raises(LowbitError, match="must be auto, cpu, cuda or cuda:N"):
            resolve_device(bad)


def test_a_gpu_run_picks_the_gpu_it_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(LowbitError, match=r"cuda:2 is not available: torch sees 2 CUDA GPUs \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_each_launched_process_takes_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert process_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # not launched: the device asked for
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert process_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_device(torch.device("cuda", 0)) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(LowbitError, match="process 2 has no GPU of its own: this machine has 2; pass --processes 2"):
        process_device(torch.device("cuda", 0))


def test_the_global_batch_splits_into_equal_contiguous_shards():
    idx = torch.arange(6)
    assert [shard(idx, Processes(i, 3)).tolist() for i in range(3)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(LowbitError, match="--batch 6 does not split over 4 processes"):
        check_batch(6, Processes(0, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_finetune_on_a_missing_gpu_fails_before_any_work(ckpt, tmp_path):
    line = one_error_line(invoke("finetune", ckpt, "--out", tmp_path / "x", "--steps", "1", "--device", "cuda"))
    assert "device cuda:0 is not available" in line and "--device cpu" in line
    assert not (tmp_path / "x").exists()
    line = one_error_line(invoke("compensate", ckpt, "--out", tmp_path / "x", "--device", "cuda:1"))
    assert "device cuda:1 is not available" in line and not (tmp_path / "x").exists()
    assert "--batch 3 does not split over --processes 2" in one_error_line(
        invoke("finetune", ckpt, "--out", tmp_path / "x", "--batch", "3", "--processes", "2"))


def _finetune(ckpt, out, *extra: str) -> dict:
    """``lowbit finetune`` in a fresh process (as a user runs it; --processes starts accelerate from there)."""
    args = [sys.executable, "-m", "lowbit", "finetune", str(ckpt), "--out", str(out), "--steps", "6", "--batch", "4",
            "--seq-len", "32", "--rank", "4", "--lr", "5e-3", "--precision", "fp32", "--checkpoint-every", "2",
            "--json", *extra]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout  # one JSON object: only the main process prints
    return json.loads(lines[0])


def _losses(out) -> list[float]:
    return json.loads((out / "train_log.json").read_text())["losses"]


def test_two_processes_follow_one_and_a_stopped_run_resumes_with_another_count(ckpt, tmp_path):
    one = _finetune(ckpt, tmp_path / "one")
    two = _finetune(ckpt, tmp_path / "two", "--processes", "2")
    assert one["processes"] == 1 and two["processes"] == 2
    assert two["tokens"] == one["tokens"] == 6 * 4 * 32  # the same global batches
    assert two["final_loss"] < two["first_loss"]
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no training state left behind

    stopped = _finetune(ckpt, tmp_path / "split", "--processes", "2", "--stop-after", "3")
    assert stopped["stopped_at"] == 3 and stopped["steps"] == 3
    assert not (tmp_path / "split").exists() and (tmp_path / "split.trainer").is_dir()
    resumed = _finetune(ckpt, tmp_path / "split", "--resume")  # one process finishes what two started
    assert resumed["steps"] == 6 and "stopped_at" not in resumed
    assert _losses(tmp_path / "split") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    assert not (tmp_path / "split.trainer").exists()


def test_fsdp_shards_the_float_parameters_and_follows_one_process(ckpt, tmp_path):
    """--fsdp: FSDP2 shards embeddings, norms, head and adapters over the two processes; the loss curve is the one
    process's, the saved adapters are whole, and a sharded run stopped early resumes on one plain process."""
    one = _finetune(ckpt, tmp_path / "one")
    two = _finetune(ckpt, tmp_path / "fsdp", "--processes", "2", "--fsdp")
    assert two["processes"] == 2 and two["tokens"] == one["tokens"]
    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    from safetensors.torch import load_file

    def adapters(out):
        tensors = {}
        for f in sorted(out.glob("*.safetensors")):
            tensors.update({k: v for k, v in load_file(f).items() if ".adapters." in k})
        return tensors

    a, b = adapters(tmp_path / "one"), adapters(tmp_path / "fsdp")
    assert a and a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-3
    stopped = _finetune(ckpt, tmp_path / "split", "--processes", "2", "--fsdp", "--stop-after", "3")
    assert stopped["stopped_at"] == 3 and (tmp_path / "split.trainer").is_dir()
    _finetune(ckpt, tmp_path / "split", "--resume")  # one process, no sharding, finishes what FSDP started
    assert _losses(tmp_path / "split") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    assert "--fsdp shards over several processes" in one_error_line(
        invoke("finetune", ckpt, "--out", tmp_path / "x", "--fsdp"))


def _shard_and_compare(rank: int, port: int, tied: bool, results) -> None:
    """One of two gloo processes: shard a packed tiny model with adapters, report the share of float parameters
    this process holds and the sharded loss beside the whole model's."""
    import os

    import torch.distributed as dist
    from conftest import tiny_model

    import lowbit
    from lowbit import adapters as ad
    from lowbit.train.distributed import Processes, fsdp_shard, full
    from lowbit.train.trainer import lm_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = tiny_model("llama", tie_word_embeddings=tied)
        lowbit.quantize(model, "rtn-w4g32")
        ad.attach(model, ad.LoRAConfig(rank=4))
        ad.freeze(model)
        sharded = fsdp_shard(model, Processes(rank, 2), torch.device("cpu"), loss=lm_loss)
        held = sum(p.to_local().numel() for p in sharded.parameters())
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        loss = sharded.lowbit_loss(ids, ids.clone(), 8)
        loss.backward()
        grads = [full(p.grad) for p in sharded.parameters() if p.requires_grad]
        whole = lm_loss(model, ids, ids.clone(), 8)
        whole.backward()
        reference = [p.grad for p in model.parameters() if p.requires_grad]
        gap = max((a - b).abs().max().item() for a, b in zip(grads, reference, strict=True))
        results.put((rank, held / sum(p.numel() for p in model.parameters()), loss.item(), whole.item(), gap))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tied", [True, False])
def test_fsdp_holds_half_the_float_parameters_on_each_of_two_processes(tied):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_shard_and_compare, args=(port, tied, results), nprocs=2, start_method="spawn")
    for _ in range(2):
        rank, share, loss, whole, gap = results.get(timeout=60)
        assert share == pytest.approx(0.5, abs=0.01), rank  # embeddings, norms, head and adapters: half each
        assert loss == pytest.approx(whole, rel=1e-5) and gap < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_quantize_on_a_missing_gpu_fails_before_loading(hf_folder, tmp_path):
    line = one_error_line(invoke("quantize", hf_folder, "--recipe", "gptq-w4g64", "--out", tmp_path / "q",
                                 "--windows", "0", "--device", "cuda:0"))
    assert "device cuda:0 is not available" in line and "--device cpu" in line
    assert not (tmp_path / "q").exists()


def test_rilq_on_two_processes_takes_the_steps_of_one(ckpt, tmp_path):
    curves = {}
    for count in ("1", "2"):
        out = tmp_path / f"rilq{count}"
        args = [sys.executable, "-m", "lowbit", "compensate", str(ckpt), "--method", "rilq", "--rank", "4",
                "--max-steps", "3", "--windows", "0", "--out", str(out), "--processes", count, "--precision", "fp32",
                "--json"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(done.stdout.splitlines()) == 1 and json.loads(done.stdout)["processes"] == int(count)
        curves[count] = json.loads((tmp_path / f"rilq{count}.rilq.json").read_text())
        assert (out / "lowbit.json").is_file()
    assert curves["2"]["step"] == curves["1"]["step"] == [0, 3]
    for key in ("train", "val"):
        assert curves["2"][key][1:] == pytest.approx(curves["1"][key][1:], rel=1e-4), key
    assert curves["2"]["val"][0] == curves["1"]["val"][0]


def test_to_device_moves_every_tensor_in_a_nested_value():
    from lowbit.device import to_device

    value = {"a": (torch.ones(1), [torch.zeros(2), 3]), "b": None}
    moved = to_device(value, torch.device("cpu"))
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list) and moved["a"][1][1] == 3
    assert torch.equal(moved["a"][1][0], torch.zeros(2)) and moved["b"] is None
