"""Q4_0 GGUF files from lowbit against llama.cpp's own Q4_0 rounding, and the export's parity, on one model.

    python benchmarks/gguf_q4_0.py [--model smollm2-135m] [--windows 16] [--work DIR] [--out results.json]

Rows (each in its own process; perplexity is lowbit's evaluator, WikiText-2 test, first ``--windows`` windows
of 2048):

* ``lowbit-gptq-q4_0``: ``lowbit quantize --recipe gptq-w4g128 --target gguf:q4_0`` (GPTQ into Q4_0's grid,
  16 x 2048 WikiText-2 *valid* calibration windows), then ``lowbit export --to gguf``; the file read back by
  transformers' GGUF loader, beside lowbit's perplexity of its own checkpoint (the parity figure);
* ``lowbit-rtn-q4_0``: the same with round-to-nearest;
* ``llama.cpp-q4_0``: every decoder Linear of the same float model rounded by ggml's reference Q4_0 quantizer
  (``quantize_row_q4_0_ref``: ``d = max / -8`` per block of 32, as gguf-py implements it — what
  ``llama-quantize ... Q4_0`` does without an importance matrix), evaluated as dequantized weights.

Embeddings and head stay float (F16, the source's storage) in every row, so the rows differ only in how the
decoder Linears are rounded. Prints one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

from child import emit, parser, run_json, work_dir

READ_GGUF = """
import json, sys, torch
from transformers import AutoModelForCausalLM
import lowbit
from lowbit.eval.perplexity import perplexity
path, ckpt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
folder, name = path.rsplit("/", 1)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
_, tok = lowbit.load(ckpt)  # the checkpoint's tokenizer: the same windows as every other row
print(json.dumps({"gguf_ppl": perplexity(model, tok, windows=n).ppl}))
"""

LLAMA_CPP_Q4_0 = """
import json, sys, numpy as np, torch, gguf
import lowbit
from lowbit.eval.perplexity import perplexity
from lowbit.models import find_linears
model, tok = lowbit.load_model(sys.argv[1])
with torch.no_grad():
    for name, layer in find_linears(model):
        w = layer.weight.detach().float().numpy()
        q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
        layer.weight.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_0)))
print(json.dumps({"gguf_ppl": perplexity(model, tok, windows=int(sys.argv[2])).ppl}))
"""


def lowbit_row(model: str, recipe: str, work: Path, windows: int) -> dict:
    ckpt, path = work / f"{recipe}-q4_0", work / f"{recipe}-q4_0.gguf"
    q = run_json([sys.executable, "-m", "lowbit", "quantize", model, "--recipe", recipe, "--target", "gguf:q4_0",
             "--windows", str(windows), "--out", str(ckpt), "--force", "--json"])
    e = run_json([sys.executable, "-m", "lowbit", "export", str(ckpt), "--to", "gguf", "--out", str(path), "--force",
             "--json"])
    g = run_json([sys.executable, "-c", READ_GGUF, str(path), str(ckpt), str(windows)])
    return {"lowbit_ppl": q["ppl"], "fp_ppl": q["fp_ppl"], "gguf_ppl": g["gguf_ppl"],
            "parity": abs(g["gguf_ppl"] / q["ppl"] - 1), "file_mb": round(path.stat().st_size / 2**20, 2),
            "types": e["details"]["types"], "quantize_seconds": q["quantize_seconds"]}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="smollm2-135m")
    a = p.parse_args()
    work = work_dir(a.work, "lowbit-gguf-")
    rows = {"lowbit-gptq-q4_0": lowbit_row(a.model, "gptq-w4g128", work, a.windows),
            "lowbit-rtn-q4_0": lowbit_row(a.model, "rtn-w4g128", work, a.windows),
            "llama.cpp-q4_0": run_json([sys.executable, "-c", LLAMA_CPP_Q4_0, a.model, str(a.windows)])}
    result = {"model": a.model, "windows": a.windows, "rows": rows}
    emit(result, a.out)


if __name__ == "__main__":
    main()
