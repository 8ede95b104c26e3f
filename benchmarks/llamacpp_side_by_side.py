"""lowbit's Q4_0 GGUF against llama.cpp's own Q4_0 of the same float model, in llama.cpp itself.

    bash benchmarks/llamacpp_env.sh                      # once: llama-cpp-python built from source
    python benchmarks/llamacpp_side_by_side.py [--model smollm2-135m] [--windows 16] [--repeats 5]
                                               [--work DIR] [--out F.json]

Files (``--work``; lowbit checkpoints already there are reused): ``f16.gguf`` (the float model, written by
lowbit's GGUF export); ``lowbit-q4_0.gguf`` (``lowbit quantize --recipe gptq-w4g128 --target gguf:q4_0``: GPTQ
into Q4_0 for every decoder Linear, the embedding table float, then ``lowbit export --to gguf``) and
``lowbit-q8_0.gguf`` (``rtn-w4g128 --target gguf:q8_0``); ``llamacpp-q4_0.gguf`` and ``llamacpp-q8_0.gguf``
(llama.cpp's ``llama_model_quantize`` of ``f16.gguf`` with ``pure`` and the token embedding kept F16: the same
tensor types as lowbit's files) and ``llamacpp-q4_0-mix.gguf`` (its default Q4_0 mixture, embedding table
quantized too); with llama.cpp's tools built (``bash benchmarks/llamacpp_tools.sh``) also
``llamacpp-q4_0-imatrix.gguf``: ``llama-imatrix`` over 16 chunks of 2048 tokens of WikiText-2 valid (the text
lowbit calibrates on), then ``llama-quantize --imatrix --pure`` to Q4_0.

Reported: perplexity of every file (transformers' GGUF loader into lowbit's evaluator, WikiText-2 test, first
``--windows`` windows of 2048) and its size; llama.cpp's prefill and decode tokens/s on the four quantized files
(2 threads, round robin, ``--repeats`` each: median and spread); where llama.cpp's greedy tokens on each lowbit
file first differ from lowbit's greedy tokens on its own checkpoint (three prompts, 16 tokens); lowbit's own
decode tokens/s on its checkpoints. Each step runs in its own process. Prints one JSON object.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from child import emit, parser, run_json, work_dir

HERE = Path(__file__).resolve().parent
LLAMACPP_PY = HERE / ".venv-llamacpp" / "bin" / "python"
TOOLS = HERE / ".llamacpp-tools" / "bin"  # bash benchmarks/llamacpp_tools.sh
IMATRIX, QUANTIZE_TOOL = TOOLS / "llama-imatrix", TOOLS / "llama-quantize"
PROMPTS = ["The history of the printing press", "Photosynthesis is the process by which",
           "The capital of France is"]

FLOAT_GGUF = """
import sys
import lowbit
from lowbit.export_gguf import export_gguf
model, tok = lowbit.load_model(sys.argv[1])
export_gguf(model, sys.argv[2], tokenizer=tok, force=True)
"""

QUANTIZE = """
import json, sys, llama_cpp
src, dst, pure = sys.argv[1], sys.argv[2], sys.argv[3] == "pure"
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, sys.argv[4])
params.pure = pure
if pure:  # the same tensor types as lowbit's file: every decoder matrix Q4_0, the embedding table F16
    params.token_embedding_type = llama_cpp.GGML_TYPE_F16
params.nthread = 2
code = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
print(json.dumps({"code": int(code)}))
"""

PPL = """
import json, sys, torch
from transformers import AutoModelForCausalLM
import lowbit
from lowbit.eval.perplexity import perplexity
path, source, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
folder, name = path.rsplit("/", 1)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
_, tok = lowbit.load_model(source)  # the source's tokenizer: the same windows for every file
print(json.dumps({"ppl": perplexity(model, tok, windows=n, progress=False).ppl}))
"""

LLAMACPP_SPEED = """
import json, sys, time, llama_cpp
paths, repeats, prompts = sys.argv[1].split(","), int(sys.argv[2]), json.loads(sys.argv[3])
models = {p: llama_cpp.Llama(model_path=p, n_threads=2, n_threads_batch=2, n_ctx=1024, verbose=False) for p in paths}
long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 24)
out = {p: {"prefill": [], "decode": []} for p in paths}
for _ in range(repeats):
    for p, llm in models.items():
        ids = llm.tokenize(long_prompt.encode(), add_bos=False)
        llm.reset(); t = time.perf_counter(); llm.eval(ids); prefill = time.perf_counter() - t
        out[p]["prefill"].append(len(ids) / prefill)
        llm.reset(); llm.eval(llm.tokenize(b"The history of", add_bos=False))
        t = time.perf_counter()
        for _ in range(64):
            tok = llm.sample(temp=0.0)
            llm.eval([tok])
        out[p]["decode"].append(64 / (time.perf_counter() - t))
greedy = {}
for p, llm in models.items():
    rows = []
    for text in prompts:
        ids = llm.tokenize(text.encode(), add_bos=False)
        llm.reset(); llm.eval(ids)
        gen = []
        for _ in range(16):
            tok = llm.sample(temp=0.0)
            gen.append(int(tok)); llm.eval([tok])
        rows.append({"prompt_ids": ids, "tokens": gen})
    greedy[p] = rows
print(json.dumps({"speed": out, "greedy": greedy}))
"""

LOWBIT_GREEDY = """
import json, sys, time, torch
import lowbit
model, tok = lowbit.load(sys.argv[1])
rows = json.loads(sys.argv[2])
out = []
with torch.inference_mode():
    for row in rows:
        ids = torch.tensor([row["prompt_ids"]])
        gen = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
        out.append([int(t) for t in gen])
    ids = torch.tensor([rows[0]["prompt_ids"]])
    model.generate(ids, max_new_tokens=2, do_sample=False)
    speeds = []
    for _ in range(int(sys.argv[3])):
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        speeds.append(64 / (time.perf_counter() - t))
print(json.dumps({"tokens": out, "decode_tok_s": speeds}))
"""


def run(python, code_or_args, *args: str) -> dict:
    """``python -c CODE ARGS`` (a string) or ``python ARGS`` (a list), in a fresh process."""
    return run_json([python, "-c", code_or_args, *args] if isinstance(code_or_args, str) else [python, *code_or_args])


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "n": len(values)}


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


KINDS = {  # name -> (lowbit recipe, --target, llama.cpp ftype)
    "q4_0": ("gptq-w4g128", "gguf:q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"),  # GPTQ's rounding into Q4_0's grid
    "q8_0": ("rtn-w4g128", "gguf:q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"),  # round-to-nearest, as llama.cpp does
}


def imatrix_q4_0(f16: Path, work: Path, windows: int = 16) -> Path:
    """llama.cpp's Q4_0 with an importance matrix (``llama-imatrix`` over ``windows`` chunks of 2048 tokens of
    WikiText-2 valid, lowbit's own calibration text; ``llama-quantize --pure``, token embedding F16)."""
    from lowbit.data import wikitext2_text

    text, imatrix, out = work / "wiki.valid.txt", work / "imatrix.gguf", work / "llamacpp-q4_0-imatrix.gguf"
    text.write_text(wikitext2_text("valid"))
    subprocess.run([str(IMATRIX), "-m", str(f16), "-f", str(text), "-o", str(imatrix), "-c", "2048", "--chunks",
                    str(windows), "-t", "2"], check=True, capture_output=True)
    subprocess.run([str(QUANTIZE_TOOL), "--imatrix", str(imatrix), "--pure", "--token-embedding-type", "f16",
                    str(f16), str(out), "Q4_0", "2"], check=True, capture_output=True)
    return out


def main() -> None:
    p = parser(__doc__)  # --work: lowbit checkpoints already there are reused
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    if not LLAMACPP_PY.exists():
        sys.exit("no llama.cpp environment: run bash benchmarks/llamacpp_env.sh first")
    work = work_dir(a.work, "lowbit-llamacpp-")
    py = sys.executable
    f16 = work / "f16.gguf"
    run(py, FLOAT_GGUF, a.model, str(f16))
    files, seconds, pairs = {"f16": f16}, {}, {}
    for kind, (recipe, target, ftype) in KINDS.items():
        ckpt, ours, theirs = work / f"lowbit-{kind}", work / f"lowbit-{kind}.gguf", work / f"llamacpp-{kind}.gguf"
        t = time.perf_counter()
        if not (ckpt / "lowbit.json").exists():
            run(py, ["-m", "lowbit", "quantize", a.model, "--recipe", recipe, "--target", target, "--windows", "0",
                     "--out", str(ckpt), "--force", "--json"])
        run(py, ["-m", "lowbit", "export", str(ckpt), "--to", "gguf", "--out", str(ours), "--force", "--json"])
        seconds[kind] = round(time.perf_counter() - t, 1)
        if run(LLAMACPP_PY, QUANTIZE, str(f16), str(theirs), "pure", ftype)["code"] != 0:
            sys.exit(f"llama_model_quantize failed for {theirs}")
        files[f"lowbit-{recipe.split('-')[0]}-{kind}"] = ours
        files[f"llama.cpp-{kind}-pure"] = theirs
        pairs[kind] = (ckpt, ours, theirs)
    if IMATRIX.exists():  # llama.cpp's best Q4_0: rounding weighted by activations of the same calibration text
        files["llama.cpp-q4_0-imatrix-pure"] = imatrix_q4_0(f16, work)
    mix = work / "llamacpp-q4_0-mix.gguf"
    if run(LLAMACPP_PY, QUANTIZE, str(f16), str(mix), "mix", KINDS["q4_0"][2])["code"] != 0:
        sys.exit(f"llama_model_quantize failed for {mix}")
    files["llama.cpp-q4_0-mix"] = mix
    rows = {name: {"file_mb": round(path.stat().st_size / 2**20, 2),
                   "ppl": run(py, PPL, str(path), a.model, str(a.windows))["ppl"]} for name, path in files.items()}
    timed = [path for _, ours, theirs in pairs.values() for path in (ours, theirs)]
    speed = run(LLAMACPP_PY, LLAMACPP_SPEED, ",".join(map(str, timed)), str(a.repeats), json.dumps(PROMPTS))
    by_path = {str(path): name for name, path in files.items()}
    for path in timed:
        rows[by_path[str(path)]]["llama.cpp_prefill_tok_s"] = spread(speed["speed"][str(path)]["prefill"])
        rows[by_path[str(path)]]["llama.cpp_decode_tok_s"] = spread(speed["speed"][str(path)]["decode"])
    agreement, ratios = {}, {}
    for kind, (ckpt, ours, theirs) in pairs.items():
        greedy_cpp = speed["greedy"][str(ours)]
        mine = run(py, LOWBIT_GREEDY, str(ckpt), json.dumps(greedy_cpp), str(a.repeats))
        agreement[kind] = [{"prompt": text, "first_difference": first_difference(c["tokens"], m),
                            "llama.cpp": c["tokens"], "lowbit": m}
                           for text, c, m in zip(PROMPTS, greedy_cpp, mine["tokens"], strict=True)]
        row = rows[by_path[str(ours)]]
        row["lowbit_decode_tok_s_on_its_checkpoint"] = spread(mine["decode_tok_s"])
        row["lowbit_quantize_and_export_s"] = seconds[kind]
        ratios[kind] = round(row["llama.cpp_decode_tok_s"]["median"] /
                             rows[by_path[str(theirs)]]["llama.cpp_decode_tok_s"]["median"], 3)
    emit({"model": a.model, "windows": a.windows, "rows": rows, "llama.cpp_decode_ratio_lowbit_file_vs_own": ratios,
          "greedy": agreement, "work": str(work)}, a.out)


if __name__ == "__main__":
    main()
