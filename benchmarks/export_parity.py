"""Does a served export compute what lowbit's checkpoint computes? Perplexity of a lowbit checkpoint (lowbit's
evaluator) beside that of its compressed-tensors export loaded by transformers in a process that never imports
lowbit, on the same WikiText-2 test windows.

    python benchmarks/export_parity.py CHECKPOINT [--windows 16] [--work DIR] [--out results.json]

Steps, each in its own process: (1) lowbit loads the checkpoint, writes the export and the token windows its
evaluator reads (safetensors) and reports its perplexity; (2) transformers (with compressed-tensors) loads the
export in fp32 and computes ``exp(mean over windows of each window's mean next-token NLL)`` on those windows —
lowbit's protocol, written out here since lowbit is not imported. Prints one JSON object.
"""

from __future__ import annotations

import sys

from child import emit, parser, run_json, work_dir

EXPORT = """
import json, sys, time, torch
from safetensors.torch import save_file
import lowbit
from lowbit.eval.perplexity import _tokenized, perplexity
from lowbit.export_ct import export_compressed_tensors
ckpt, work, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, tok = lowbit.load(ckpt)
t = time.perf_counter()
details = export_compressed_tensors(model, work + "/ct", tokenizer=tok, force=True)
seconds = time.perf_counter() - t
ids = _tokenized(tok, "test")
save_file({"windows": ids[: n * 2048].reshape(n, 2048).contiguous()}, work + "/windows.safetensors")
ppl = perplexity(model, tok, windows=n).ppl
print(json.dumps({"lowbit_ppl": ppl, "export_seconds": seconds, **details}))
"""

TRANSFORMERS = """
import json, math, sys, torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
folder, windows = sys.argv[1], load_file(sys.argv[2])["windows"]
groups = json.load(open(folder + "/config.json"))["quantization_config"]["config_groups"].values()
extra = {} if all(g["weights"]["symmetric"] for g in groups) else \\
    {"quantization_config": CompressedTensorsConfig(dequantize=True)}  # see tests/test_export_ct.py
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
assert not any(m == "lowbit" or m.startswith("lowbit.") for m in sys.modules)
nlls = []
with torch.inference_mode():
    for w in windows:
        logits = model(w.unsqueeze(0)).logits[0, :-1].float()
        nlls.append(F.cross_entropy(logits, w[1:]).item())
print(json.dumps({"transformers_ppl": math.exp(sum(nlls) / len(nlls)), "loader": "transformers dequantize=True"
                  if extra else "transformers compressed"}))
"""


def run(code: str, *args: str) -> dict:
    return run_json([sys.executable, "-c", code, *args])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("checkpoint")
    a = p.parse_args()
    work = work_dir(a.work, "lowbit-export-")
    ours = run(EXPORT, a.checkpoint, str(work), str(a.windows))
    theirs = run(TRANSFORMERS, str(work / "ct"), str(work / "windows.safetensors"))
    size = sum(f.stat().st_size for f in (work / "ct").glob("*.safetensors"))
    result = {"checkpoint": a.checkpoint, "windows": a.windows, "export": "compressed-tensors", "lowbit": ours,
              "transformers": theirs, "export_weights_mb": round(size / 2**20, 1),
              "relative_difference": abs(theirs["transformers_ppl"] / ours["lowbit_ppl"] - 1)}
    emit(result, a.out)


if __name__ == "__main__":
    main()
