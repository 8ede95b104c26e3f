"""The device check of issue 24: the whole pipeline on one GPU, in one prepared command (< 10 minutes on a GPU).

1. kernels: the registry's qmatmul (Triton on CUDA) against the dequantize reference on random shapes, tile
   remainders included (int4/int3/int2 groups, NF4, LowRA's mixed 1-4-bit rows), decode (M = 1) and prefill;
2. quantize on the device: gptq-w4g128 and lowra-gptq-b2.0 of SmolLM2 (``--device``), perplexity on 16 windows
   against the CPU figures in BENCHMARKS.md (within 0.5%);
3. speed: greedy decode (128 tokens, batch 1) and a 512-token prefill of rtn-w4g128 against transformers' bf16
   model on the same device;
4. 50 fine-tuning steps (LoRA r16 over rtn-w4g128) on the device;
5. peak GPU memory of the in-process parts (the subprocesses' own peaks are in their JSON).

Each part records its result or its error and the files are rewritten after every part, so a timeout keeps what
finished. Writes ``OUT/gpu_pipeline_check.json`` and ``.md``. On a machine without a GPU, ``--device cpu
--model TINY_HF_FOLDER --windows 1 --steps 2`` runs the same code paths (how it was tested here).

    python benchmarks/gpu_pipeline_check.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

# CPU figures (16 windows) the GPU must reproduce within 0.5% (BENCHMARKS.md "Perplexity ladder").
CPU_PPL = {"gptq-w4g128": 24.58, "lowra-gptq-b2.0": 53.06}
SHAPES = [(1, 576, 1536), (1, 1000, 333), (19, 576, 576), (64, 1536, 576), (7, 1000, 333)]  # (M, K, N)


def run_cli(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "lowbit", *args, "--json"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return json.loads(done.stdout)


def kernels(device: torch.device) -> dict:
    from lowbit.formats import get_format
    from lowbit.kernels import kernel_summary, qmatmul, qmatmul_reference, reset_counts
    from lowbit.qmixed import MixedCodebookWeight
    from lowbit.quantizers.lowra import LowRAConfig, encode_layer, fit_layer
    from lowbit.quantizers.precision import assign_widths
    from lowbit.quantizers.rtn import rtn_quantize

    def lowra(n, k):
        w = torch.randn(n, k) * torch.linspace(0.1, 3, n).unsqueeze(1)
        config = LowRAConfig(budget=2.0, block_size=16)
        fit = fit_layer(w, config)
        qw = encode_layer(w, fit, assign_widths(fit.errors, torch.full((n,), k), config.widths, 2.0),
                          config.widths, 16)
        assert isinstance(qw, MixedCodebookWeight)
        return qw

    makers = {"int4-g128": lambda n, k: rtn_quantize(torch.randn(n, k), get_format("int", 4, False), "group", 128),
              "int3-g128": lambda n, k: rtn_quantize(torch.randn(n, k), get_format("int", 3, False), "group", 128),
              "int2-g64": lambda n, k: rtn_quantize(torch.randn(n, k), get_format("int", 2, False), "group", 64),
              "nf4-g64": lambda n, k: rtn_quantize(torch.randn(n, k), get_format("nf", 4, False), "group", 64),
              "lowra-mixed": lowra}
    rows, worst = [], 0.0
    torch.manual_seed(0)
    for name, make in makers.items():
        for m, k, n in SHAPES:
            qw = make(n, k).to(device)
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k, device=device, dtype=dtype)
                reset_counts()
                y = qmatmul(x, qw)
                ran = kernel_summary()
                ref = qmatmul_reference(x.float(), qw)
                err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                bound = 1e-5 if dtype == torch.float32 else 1e-2
                worst = max(worst, err / bound)
                rows.append({"format": name, "m": m, "k": k, "n": n, "dtype": str(dtype).split(".")[-1],
                             "kernel": ran, "max_rel_err": err, "ok": err <= bound})
    return {"cases": len(rows), "failed": [r for r in rows if not r["ok"]], "worst_over_bound": worst,
            "kernels": sorted({r["kernel"] for r in rows})}


def quantize_on_device(model: str, device: str, windows: str, work: Path) -> dict:
    out = {}
    for recipe, cpu in CPU_PPL.items():
        r = run_cli("quantize", model, "--recipe", recipe, "--device", device, "--windows", windows, "--out",
                   str(work / recipe), "--force")
        row = {"ppl": r["ppl"], "seconds": r["quantize_seconds"], "peak_rss_mb": r["quantize_peak_rss_mb"]}
        if model == "smollm2-135m" and windows == "16":
            row.update(cpu_ppl=cpu, rel_diff=abs(r["ppl"] - cpu) / cpu, ok=abs(r["ppl"] - cpu) / cpu <= 0.005)
        out[recipe] = row
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _speeds(model, ids: torch.Tensor, device: torch.device, new_tokens: int) -> dict:
    prompt = ids[:, :8]
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up, kernel compilation
    _sync(device)
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    _sync(device)
    decode = new_tokens / (time.perf_counter() - start)
    model(ids[:, :16], logits_to_keep=1)
    best = float("inf")
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return {"decode_tok_s": decode, "prefill_tok_s": ids.shape[1] / best}


def speed(model: str, device: torch.device, work: Path, new_tokens: int, prefill: int) -> dict:
    import lowbit

    ck = work / "rtn-w4g128"
    bits = run_cli("quantize", model, "--recipe", "rtn-w4g128", "--windows", "0", "--out", str(ck),
                   "--force")["bits_per_weight"]
    packed, _ = lowbit.load(ck)
    ids = torch.tensor([list(range(10, 10 + prefill))], device=device) % packed.config.vocab_size
    packed_row = _speeds(packed.to(device), ids, device, new_tokens)
    del packed
    base, _ = lowbit.load_model(model)
    float_row = _speeds(base.to(device=device, dtype=torch.bfloat16), ids, device, new_tokens)
    return {"lowbit rtn-w4g128": packed_row, "transformers bf16": float_row, "bits_per_weight": bits,
            "decode_ratio": packed_row["decode_tok_s"] / float_row["decode_tok_s"],
            "prefill_ratio": packed_row["prefill_tok_s"] / float_row["prefill_tok_s"]}


def finetune(device: str, work: Path, steps: int) -> dict:
    r = run_cli("finetune", str(work / "rtn-w4g128"), "--out", str(work / "tuned"), "--steps", str(steps),
               "--device", device, "--force")
    return {k: r[k] for k in ("first_loss", "final_loss", "steps", "tokens_per_second", "peak_rss_mb")}


def markdown(report: dict) -> str:
    lines = [f"# lowbit GPU pipeline check: {report['gpu']}", ""]
    for part, value in report["parts"].items():
        lines.append(f"## {part}\n\n```json\n{json.dumps(value, indent=1)[:4000]}\n```\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", default="16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    a = parser.parse_args()
    device = torch.device(a.device)
    a.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU run)"
    report = {"gpu": gpu, "device": str(device), "torch": torch.__version__, "parts": {}}
    work = Path(tempfile.mkdtemp(prefix="lowbit-gpu-check-"))
    parts = {"kernels": lambda: kernels(device),
             "quantize": lambda: quantize_on_device(a.model, a.device, a.windows, work),
             "speed": lambda: speed(a.model, device, work, a.new_tokens, a.prefill),
             "finetune": lambda: finetune(a.device, work, a.steps)}
    for name, part in parts.items():
        start = time.perf_counter()
        try:
            report["parts"][name] = part()
        except Exception as e:  # record and go on: the other parts still tell something
            report["parts"][name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        report["parts"][name]["seconds"] = time.perf_counter() - start
        if device.type == "cuda":
            report["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        (a.out / "gpu_pipeline_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (a.out / "gpu_pipeline_check.md").write_text(markdown(report))
        print(f"{name}: {'error' if 'error' in report['parts'][name] else 'done'} "
              f"({report['parts'][name]['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
