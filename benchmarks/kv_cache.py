"""KV-cache quantization: SmolLM2-135M, WikiText-2 test perplexity and KV-cache bytes at a long context.

    python benchmarks/kv_cache.py [--model smollm2-135m] [--data DIR] [--caches float,int8-norot,int8,int4-norot,int4]
                                  [--windows 16] [--context 8192] [--chunk 1024] [--threads 2]
                                  [--out benchmarks/results/kv_cache.json]

For each cache (``float``: transformers' own DynamicCache; ``intB``: lowbit.nn.kv_cache, B-bit asymmetric codes per
token and KV head with fp16 scale and zero point, keys Hadamard-rotated; ``intB-norot``: keys not rotated):

* perplexity: WikiText-2 test, windows of 2048, the first ``--windows``; each window's one forward attends to the
  quantized keys and values (``lowbit.perplexity(..., kv_cache=...)``);
* memory: the first ``--context`` tokens of WikiText-2 test prefilled through the decoder in chunks of ``--chunk``
  tokens (every chunk attends to the quantized store of the ones before it), then the bytes the cache stores
  (codes + scales + zero points), the same tokens in fp32 (the model's dtype) and bf16, the ratios, and the RSS
  the filled cache keeps (RSS after - before, cache alive) and the prefill's peak RSS over the start.

Prints one JSON object and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

OUT = Path("benchmarks/results/kv_cache.json")


def ppl_row(model, tok, name: str, windows: int) -> dict:
    import lowbit
    from lowbit.nn.kv_cache import parse_kv_cache

    start = time.perf_counter()
    r = lowbit.perplexity(model, tok, windows=windows, progress=False, kv_cache=parse_kv_cache(name))
    return {"ppl": r.ppl, "windows": r.windows, "seq_len": r.seq_len, "ppl_seconds": time.perf_counter() - start}


def prefill_row(model, ids, name: str, chunk: int) -> dict:
    """Prefill ``ids (1, T)`` through the decoder with a fresh cache of kind ``name``; its bytes and RSS."""
    import torch
    from transformers import DynamicCache

    from lowbit import memory
    from lowbit.nn.kv_cache import kv_cache_bytes, make_kv_cache, parse_kv_cache

    config = parse_kv_cache(name)
    memory.release_free_memory()
    before = memory.rss_mb()
    memory.reset_peak()
    cache = DynamicCache(config=model.config) if config is None else make_kv_cache(model, config)
    backbone = model.get_decoder()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, ids.shape[1], chunk):
            backbone(ids[:, i:i + chunk], past_key_values=cache, use_cache=True)
    seconds = time.perf_counter() - start
    peak = memory.peak_rss_mb()
    memory.release_free_memory()
    row = {"tokens": cache.get_seq_length(), **kv_cache_bytes(cache).to_dict(), "prefill_seconds": seconds,
           "rss_kept_mb": memory.rss_mb() - before, "prefill_peak_rss_over_start_mb": peak - before}
    del cache
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: $LOWBIT_DATA, ../shared/data)")
    ap.add_argument("--caches", default="float,int8-norot,int8,int4-norot,int4")
    ap.add_argument("--windows", type=int, default=16, help="first N test windows of 2048")
    ap.add_argument("--context", type=int, default=8192, help="tokens prefilled for the memory figures")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk, tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import lowbit
    from lowbit.data import use_data_dir, wikitext2_text

    use_data_dir(args.data)
    start = time.perf_counter()
    model, tok = lowbit.load_model(args.model)
    ids = tok(wikitext2_text("test"), return_tensors="pt").input_ids[:, :args.context]
    out: dict = {"model": args.model, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                 "context": int(ids.shape[1]), "max_position_embeddings": model.config.max_position_embeddings,
                 "chunk": args.chunk, "threads": args.threads, "caches": {}}
    for name in args.caches.split(","):
        row = ppl_row(model, tok, name, args.windows)
        row.update(prefill_row(model, ids, name, args.chunk))
        out["caches"][name] = row
        print(json.dumps({name: row}), flush=True)
    fp = out["caches"].get("float")
    for row in out["caches"].values():
        if fp:
            row["ppl_rel_to_float"] = row["ppl"] / fp["ppl"] - 1
            row["stored_over_float_cache"] = row["stored_bytes"] / fp["stored_bytes"]
    out["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
