#!/usr/bin/env bash
# Device check for issue 22, run only on a machine with a CUDA GPU (never in CI): does vLLM serve lowbit's
# compressed-tensors export, and at what decode speed? Needs vLLM importable there (the device machines reach no
# network: carry a wheelhouse or skip). Writes one JSON line to $OUT/gpu_check.json (or stdout).
#   bash benchmarks/gpu_check.sh CT_EXPORT_DIR
set -euo pipefail
export_dir=${1:?usage: gpu_check.sh CT_EXPORT_DIR (from lowbit export --to compressed-tensors)}
out=${OUT:-.}/gpu_check.json
python - "$export_dir" "$out" <<'PY'
import json, sys, time
folder, out = sys.argv[1], sys.argv[2]
result = {"export": folder}
try:
    import torch
    result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    from vllm import LLM, SamplingParams
except Exception as e:  # no GPU or no vLLM: say which, do not fail the caller
    result.update(served=False, reason=f"{type(e).__name__}: {e}")
else:
    try:
        llm = LLM(model=folder, dtype="float16", max_model_len=2048, enforce_eager=False)
        params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
        llm.generate(["Warm up."], params)
        t = time.perf_counter()
        outs = llm.generate(["The history of the printing press"] * 8, params)
        dt = time.perf_counter() - t
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        result.update(served=True, batch=8, tokens=tokens, tok_s=tokens / dt, text=outs[0].outputs[0].text[:200])
    except Exception as e:
        result.update(served=False, reason=f"{type(e).__name__}: {str(e)[:500]}")
print(json.dumps(result))
open(out, "w").write(json.dumps(result) + "\n")
PY
