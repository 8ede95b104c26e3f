"""Decode speed against other CPU 4-bit libraries, side by side in one process (issue 4).

For SmolLM2-135M: greedy batch-1 decode tokens/s (128 new tokens after a short prompt, one warm-up run first) of
FP32, FP32 with every Linear on lowbit's fp32 GEMV (the kernel a packed model's float head uses: how much of the
packed models' lead is that GEMV alone), lowbit recipes, and — where installed — bitsandbytes NF4 (its CPU
path) and llama.cpp (llama-cpp-python, on the same GGUF file lowbit loads). None of those is a lowbit
dependency; install them for the comparison:

    pip install --no-deps bitsandbytes==0.50.2
    pip install --no-deps hqq==0.2.8.post1 einops termcolor
    pip install llama-cpp-python==0.3.36          # compiles llama.cpp: minutes
    python benchmarks/decode_compare.py --recipes rtn-w4g128,nf4-g64 --json-out benchmarks/results/decode_compare.json

Rows whose library is missing are reported as skipped with the install command, not silently dropped.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time

import torch

import lowbit
from lowbit.eval.speed import decode_speed
from lowbit.fileio import atomic_write
from lowbit.models import builtin_gguf_path, find_linears, set_module
from lowbit.nn import GEMVLinear


def bnb_nf4(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder Linears replaced by bitsandbytes ``Linear4bit`` (NF4, blocks of 64, fp32 compute)."""
    import bitsandbytes as bnb

    for name, lin in find_linears(model):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
        if lin.bias is not None:
            q.bias = lin.bias
        set_module(model, name, q.to("cpu"))
    return model


def hqq_linears(model: torch.nn.Module, bits: int = 4, group_size: int = 64) -> torch.nn.Module:
    """The decoder Linears replaced by HQQ's ``HQQLinear`` (calibration-free, fp32 compute, its default backend,
    which is the one that runs on CPU)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    for name, lin in find_linears(model):
        set_module(model, name, HQQLinear(lin, config, compute_dtype=torch.float32, device="cpu"))
    return model


def fp32_on_lowbit_gemv(model: torch.nn.Module) -> torch.nn.Module:
    """Every plain ``nn.Linear`` (decoder and head) switched to :class:`GEMVLinear`, parameters unchanged."""
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = GEMVLinear
    return model


def llama_cpp_decode(new_tokens: int, prompt: str, threads: int) -> float:
    """llama.cpp decode tokens/s on the same GGUF file (its own Q4_1 weights), greedy, after a warm-up."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(builtin_gguf_path("smollm2-135m")), n_ctx=512, n_threads=threads, verbose=False)
    llm(prompt, max_tokens=8, temperature=0.0)
    start = time.perf_counter()
    out = llm(prompt, max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return out["usage"]["completion_tokens"] / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="rtn-w4g128,nf4-g64")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--json-out", default="benchmarks/results/decode_compare.json")
    args = ap.parse_args()
    prompt = "The history of the city"

    fp_model, tok = lowbit.load_model("smollm2-135m")
    fp_model.eval()
    rows = {}

    def record(name, model, library):
        s = decode_speed(model, tok, new_tokens=args.decode_tokens, prompt=prompt)
        rows[name] = {"library": library, "decode_tok_s": s.tok_s, "kernel": s.kernel}
        print(f"{name}: {s.tok_s:.1f} tok/s ({s.kernel})", file=sys.stderr, flush=True)

    record("fp32", fp_model, "transformers")
    record("fp32, Linears on lowbit's fp32 GEMV", fp32_on_lowbit_gemv(copy.deepcopy(fp_model)), "lowbit kernel")
    for recipe in [r for r in args.recipes.split(",") if r]:
        record(f"lowbit {recipe}", lowbit.quantize(copy.deepcopy(fp_model), recipe), "lowbit")
    if importlib.util.find_spec("bitsandbytes"):
        record("bitsandbytes nf4 g64", bnb_nf4(copy.deepcopy(fp_model)), "bitsandbytes")
    else:
        rows["bitsandbytes nf4 g64"] = {"skipped": "pip install --no-deps bitsandbytes==0.50.2"}
    if importlib.util.find_spec("hqq"):
        record("hqq 4-bit g64", hqq_linears(copy.deepcopy(fp_model)), "hqq")
    else:
        rows["hqq 4-bit g64"] = {"skipped": "pip install --no-deps hqq==0.2.8.post1 einops termcolor"}
    if importlib.util.find_spec("llama_cpp"):
        for threads in (1, torch.get_num_threads()):
            rows[f"llama.cpp Q4_1 ({threads} thread{'s' if threads > 1 else ''})"] = {
                "library": "llama-cpp-python", "decode_tok_s": llama_cpp_decode(args.decode_tokens, prompt, threads)}
    else:
        rows["llama.cpp Q4_1"] = {"skipped": "pip install llama-cpp-python==0.3.36"}
    base = rows["fp32"]["decode_tok_s"]
    for row in rows.values():
        if "decode_tok_s" in row:
            row["decode_ratio"] = row["decode_tok_s"] / base

    print("| model | library | decode tok/s | ÷ FP32 | kernel |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        if "skipped" in r:
            print(f"| {name} | — | skipped (`{r['skipped']}`) | | |")
        else:
            print(f"| {name} | {r['library']} | {r['decode_tok_s']:.1f} | {r['decode_ratio']:.2f}× | "
                  f"{r.get('kernel', '')} |")
    atomic_write(args.json_out, json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
