"""lowbit's CPU attention (``csrc/attention.cpp``) against torch's CPU flash kernel, side by side in one process, and
what it changes in a packed model's prefill and perplexity.

    python benchmarks/attention.py [--threads 1,2] [--lengths 512,2048] [--rounds 15] [--checkpoint CK --windows 16]
                                   [--json OUT.json]

Kernel table: SmolLM2-135M's attention shape (9 query heads over 3 KV heads of 64) and a 1B LLaMA's (32 over 8,
64 wide) at each of ``--lengths`` tokens, fp32, inputs laid out as transformers makes them (transposed views). The
kernels alternate within every round, so a drifting VM moves all; printed: median milliseconds [min-max] over the
rounds and the ratio flash / lowbit, also for lowbit's bf16 products (the fp32 inputs rounded first, as the calibration
passes under bf16 autocast run it) where the CPU has AVX512-BF16. With ``--checkpoint``: the checkpoint's
512-token prefill (medians of ``--rounds`` forwards, the two attention implementations alternating) and its
WikiText-2 test perplexity over ``--windows`` windows under each. Run it alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = (("smollm2-135m", 9, 3, 64), ("llama-1b", 32, 8, 64))  # (name, heads, kv_heads, head_dim)


def _spread(times: list[float]) -> dict:
    ms = [t * 1e3 for t in times]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}


def kernel_table(threads: int, rounds: int, lengths: tuple[int, ...] = (512, 2048)) -> list[dict]:
    from lowbit.kernels.cpu import causal_attention, extension

    ext = extension()
    torch.set_num_threads(threads)
    rows = []
    for name, heads, kv_heads, dim in SHAPES:
        for length in lengths:
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, length, n, dim, generator=gen).transpose(1, 2)
                       for n in (heads, kv_heads, kv_heads))
            runs = {"flash": functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True,
                                               enable_gqa=True),
                    "lowbit": functools.partial(ext.causal_attention, q, k, v, dim ** -0.5)}
            if ext.bf16_attention_applies():  # fp32 inputs rounded to bf16 first, as under bf16 autocast
                runs["lowbit_bf16"] = functools.partial(causal_attention, q, k, v, dim ** -0.5, bf16=True)
            times = {key: [] for key in runs}
            for fn in runs.values():
                fn()  # warm-up
            for _ in range(rounds):
                for key, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
            row = {"shape": name, "tokens": length, "threads": threads, **{k: _spread(t) for k, t in times.items()}}
            row["ratio"] = row["flash"]["median_ms"] / row["lowbit"]["median_ms"]
            low = ""
            if "lowbit_bf16" in row:
                row["ratio_bf16"] = row["flash"]["median_ms"] / row["lowbit_bf16"]["median_ms"]
                b = row["lowbit_bf16"]
                low = (f"; bf16 products {b['median_ms']:7.2f} ms [{b['min_ms']:.2f}-{b['max_ms']:.2f}]: "
                       f"{row['ratio_bf16']:.2f}x")
            rows.append(row)
            flash, ours = row["flash"], row["lowbit"]
            print(f"{name:13s} {length:5d} tokens, {threads} thread(s): flash {flash['median_ms']:7.2f} ms "
                  f"[{flash['min_ms']:.2f}-{flash['max_ms']:.2f}], lowbit {ours['median_ms']:7.2f} ms "
                  f"[{ours['min_ms']:.2f}-{ours['max_ms']:.2f}]: {row['ratio']:.2f}x{low}", flush=True)
    return rows


def checkpoint_rows(path: str, rounds: int, windows: int) -> dict:
    import lowbit
    from lowbit.bench import prompt_ids
    from lowbit.eval.perplexity import perplexity
    from lowbit.nn.attention import NAME

    model, tok = lowbit.load(path)
    lowbit.kernels.prepare()
    ids = prompt_ids(tok, 512)
    times = {NAME: [], "sdpa": []}
    with torch.inference_mode():
        for _ in range(rounds + 1):
            for name in times:
                model.set_attn_implementation(name)
                start = time.perf_counter()
                model(ids, use_cache=False, logits_to_keep=1)
                times[name].append(time.perf_counter() - start)
    out = {"checkpoint": path, "prefill_tokens": 512,
           **{f"prefill_{k}": _spread(v[1:]) for k, v in times.items()}}  # (the first round warms up)
    out["prefill_ratio"] = out["prefill_sdpa"]["median_ms"] / out[f"prefill_{NAME}"]["median_ms"]
    print(f"{path}: 512-token prefill sdpa {out['prefill_sdpa']['median_ms']:.1f} ms, lowbit attention "
          f"{out[f'prefill_{NAME}']['median_ms']:.1f} ms: {out['prefill_ratio']:.2f}x", flush=True)
    if windows:
        for name in (NAME, "sdpa"):
            model.set_attn_implementation(name)
            out[f"ppl_{name}"] = perplexity(model, tok, windows=windows).ppl
        out["windows"] = windows
        print(f"perplexity ({windows} windows): lowbit attention {out[f'ppl_{NAME}']:.4f}, sdpa "
              f"{out['ppl_sdpa']:.4f}", flush=True)
    model.set_attn_implementation(NAME)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--windows", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    lengths = tuple(int(n) for n in args.lengths.split(","))
    result = {"kernels": [row for t in args.threads.split(",") for row in kernel_table(int(t), args.rounds, lengths)]}
    if args.checkpoint:
        torch.set_num_threads(max(int(t) for t in args.threads.split(",")))
        result["checkpoint"] = checkpoint_rows(args.checkpoint, args.rounds, args.windows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
