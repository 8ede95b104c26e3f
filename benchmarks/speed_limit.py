"""Decode and prefill of lowbit's packed formats beside llama.cpp's Q4_0/Q8_0 files and transformers' FP32: the
same model, the same token ids, the same thread count, one run.

    bash benchmarks/llamacpp_env.sh              # once: llama-cpp-python built from source
    python benchmarks/speed_limit.py [--model smollm2-135m | random:llama-1b] [--repeats 3] [--threads 2]
                                     [--recipes rtn-w4g128,rtn-w2g64] [--decode-tokens 64] [--prefill-tokens 512]
                                     [--work DIR] [--out F.json]

Files (``--work``; ones already there are reused): ``f16.gguf`` (the float model through lowbit's GGUF export),
``llamacpp-q4_0.gguf`` / ``llamacpp-q8_0.gguf`` (llama.cpp's ``llama_model_quantize`` of it, ``pure``, token
embedding F16: every decoder matrix in that type, the tied table/head F16), ``llamacpp-q4_0-mix.gguf`` (its
default Q4_0 mixture: the embedding table quantized too) and one lowbit checkpoint per recipe. Every measurement
runs in a fresh process; the engines take turns (round robin) ``--repeats`` times; each reports the median
[min–max]. Per measurement: load, one prefill of ``--prefill-tokens`` ids of WikiText-2 valid (last position's
logits only in lowbit/transformers; llama.cpp's ``eval``), a warm-up, then greedy decode of ``--decode-tokens``
after a 5-token prompt (lowbit and transformers: ``generate``; llama.cpp: ``sample`` + ``eval``, its Python
binding). ``--compile`` adds rows whose decode runs through ``lowbit.nn.compile.compile_decode`` (static cache,
``torch.compile``; its compile time is left out). ``--native`` adds rows whose decode runs through
``lowbit.native`` (one C++ call per token; the prompt through the model's forward). The memory bandwidth (a large
copy, :func:`lowbit.bench.memory_bandwidth_gbs`) is measured before each round and after the last; every row gets
its weight bytes read per decoded token (lowbit: :func:`lowbit.bench.weight_bytes_per_token` of the loaded model;
llama.cpp: the GGUF file's tensor bytes, one row of an untied token table) and the share of the roofline
(highest bandwidth / bytes per token) its median decode reached. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from child import emit, parser, run_json, work_dir
from llamacpp_side_by_side import FLOAT_GGUF, LLAMACPP_PY, QUANTIZE, spread

from lowbit.bench import memory_bandwidth_gbs

PROMPT = "The history of the city"

IDS = """
import json, sys
import lowbit
from lowbit.bench import prompt_ids
_, tok = lowbit.load_model(sys.argv[1]) if not sys.argv[1].startswith("random:") else (None, None)
if tok is None:
    from lowbit.models import builtin_tokenizer
    tok = builtin_tokenizer()
n = int(sys.argv[2])
print(json.dumps({"prompt": tok(sys.argv[3]).input_ids, "prefill": prompt_ids(tok, n)[0].tolist()}))
"""

LOWBIT = """
import json, sys, time, torch
import lowbit
from lowbit.io import MANIFEST
from pathlib import Path
source, ids, threads, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
compiled, native = sys.argv[5:] == ["compile"], sys.argv[5:] == ["native"]
torch.set_num_threads(threads)
model, tok = lowbit.load(source) if (Path(source) / MANIFEST).is_file() else lowbit.load_model(source)
prompt, prefill = torch.tensor([ids["prompt"]]), torch.tensor([ids["prefill"]])
kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
with torch.inference_mode():
    model(prefill[:, :16], logits_to_keep=1)
    t = time.perf_counter()
    model(prefill, logits_to_keep=1)  # prefill stays eager
    pre = prefill.shape[1] / (time.perf_counter() - t)
    if compiled:
        from lowbit.nn.compile import compile_decode
        compile_decode(model)
    warm = new if compiled else 8  # a compiled step compiles on the warm-up of the same length
    if native:
        from lowbit.native import native_decoder, native_reason
        step = native_decoder(model, prompt.shape[1] + new)
        assert step is not None, native_reason(model, prompt.shape[1] + new)
        generate = lambda n: step.generate(prompt, n)
    else:
        generate = lambda n: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
    generate(warm)
    t = time.perf_counter()
    out = generate(new)
    decode = (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t)
from lowbit.bench import weight_bytes_per_token
half_head = native and step.head_dtype in (torch.float16, torch.bfloat16)
print(json.dumps({"decode": decode, "prefill": pre, "bytes_per_token": weight_bytes_per_token(model, half_head)}))
"""

LLAMACPP = """
import json, sys, time, llama_cpp
path, ids, threads, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=1024,
                      verbose=False)
def decode(n):
    llm.reset(); llm.eval(ids["prompt"])
    t = time.perf_counter()
    for _ in range(n):
        llm.eval([llm.sample(temp=0.0)])
    return n / (time.perf_counter() - t)
decode(8)
rate = decode(new)
llm.reset(); llm.eval(ids["prefill"][:16]); llm.reset()
t = time.perf_counter(); llm.eval(ids["prefill"]); pre = len(ids["prefill"]) / (time.perf_counter() - t)
print(json.dumps({"decode": rate, "prefill": pre}))
"""


def gguf_bytes_per_token(path: Path) -> int:
    """Weight bytes one llama.cpp decode step reads from the GGUF file ``path``: every tensor once, but one row of
    the token table unless it is also the output head (no ``output.weight``)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    table = tensors.get("token_embd.weight")
    if table is not None and "output.weight" in tensors:
        rows = int(table.shape[-1])  # GGUF shapes are innermost-first: (hidden, vocab)
        total -= int(table.n_bytes) * (rows - 1) // rows
    return total


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default="rtn-w4g128,rtn-w2g64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--compile", action="store_true", help="also lowbit's compiled decode step, FP32's too")
    p.add_argument("--native", action="store_true", help="also lowbit's native decode step (packed checkpoints)")
    a = p.parse_args()
    work = work_dir(a.work, "lowbit-speed-")
    py = sys.executable
    engines: dict[str, tuple] = {"transformers fp32": (py, LOWBIT, a.model)}
    if a.compile:
        engines["transformers fp32, compiled"] = (py, LOWBIT, a.model, "compile")
    for recipe in filter(None, a.recipes.split(",")):
        ck = work / f"lowbit-{recipe}"
        if not (ck / "lowbit.json").is_file():
            run_json([Path(py).with_name("lowbit"), "quantize", a.model, "--recipe", recipe, "--out", ck,
                      "--windows", "0", "--force", "--json"])
        engines[f"lowbit {recipe}"] = (py, LOWBIT, str(ck))
        if a.compile:
            engines[f"lowbit {recipe}, compiled"] = (py, LOWBIT, str(ck), "compile")
        if a.native:
            engines[f"lowbit {recipe}, native"] = (py, LOWBIT, str(ck), "native")
    if LLAMACPP_PY.exists():
        f16 = work / "f16.gguf"
        if not f16.is_file():
            run_json([py, "-c", FLOAT_GGUF, a.model, str(f16)])
        for name, ftype, pure in (("q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", "pure"),
                                  ("q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", "pure"),
                                  ("q4_0-mix", "LLAMA_FTYPE_MOSTLY_Q4_0", "mix")):
            out = work / f"llamacpp-{name}.gguf"
            if not out.is_file():
                run_json([LLAMACPP_PY, "-c", QUANTIZE, str(f16), str(out), pure, ftype])
            engines[f"llama.cpp {name}"] = (str(LLAMACPP_PY), LLAMACPP, str(out))
    else:
        print("no llama.cpp environment (bash benchmarks/llamacpp_env.sh): measuring lowbit and FP32 only",
              file=sys.stderr)
    ids = json.dumps(run_json([py, "-c", IDS, a.model, str(a.prefill_tokens), PROMPT]))
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    bandwidths: list[float] = []
    for r in range(a.repeats):
        bandwidths.append(round(memory_bandwidth_gbs(), 1))
        for name, (python, code, source, *flag) in engines.items():
            print(f"run {r + 1}/{a.repeats}: {name}", file=sys.stderr, flush=True)
            runs[name].append(run_json([python, "-c", code, source, ids, str(a.threads), str(a.decode_tokens),
                                        *flag]))
    bandwidths.append(round(memory_bandwidth_gbs(), 1))
    rows = {name: {"decode_tok_s": spread([m["decode"] for m in ms]),
                   "prefill_tok_s": spread([m["prefill"] for m in ms])} for name, ms in runs.items()}
    for name, row in rows.items():
        source = engines[name][2]
        row["bytes_per_token"] = (runs[name][0]["bytes_per_token"] if "bytes_per_token" in runs[name][0]
                                  else gguf_bytes_per_token(Path(source)))
        row["roofline_pct"] = round(100 * row["decode_tok_s"]["median"] * row["bytes_per_token"] /
                                    (max(bandwidths) * 1e9), 1)
    fp32 = rows["transformers fp32"]
    q4 = rows.get("llama.cpp q4_0")
    for row in rows.values():
        for key in ("decode_tok_s", "prefill_tok_s"):
            row[key.replace("tok_s", "vs_fp32")] = round(row[key]["median"] / fp32[key]["median"], 3)
            if q4:
                row[key.replace("tok_s", "vs_llamacpp_q4_0")] = round(row[key]["median"] / q4[key]["median"], 3)
    emit({"model": a.model, "threads": a.threads, "repeats": a.repeats, "decode_tokens": a.decode_tokens,
          "prefill_tokens": a.prefill_tokens, "bandwidth_gbs": bandwidths, "rows": rows, "work": str(work)}, a.out)


if __name__ == "__main__":
    main()
