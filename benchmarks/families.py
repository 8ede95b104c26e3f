"""Which step works on which architecture family today: a tiny random model of each family transformers ships
(LLaMA, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3, OLMo 2, Qwen3-MoE, Mixtral) through every registered
step (the composition test's high-precision configs; rotate/QUAD followed by RTN, embeddings/act/RILQ after it),
then save -> ``lowbit.load`` -> ``AutoModelForCausalLM.from_pretrained`` -> generate.

    python benchmarks/families.py [--out families.md]

Each cell: ``✓ e`` (relative logit error against the float model e, both loaders bit-identical to the quantized
model in memory), ``refused: ...`` (lowbit's one-line reason) or ``FAIL: ...`` (anything else). A family whose
fused MoE expert tensors stay in float is marked. This is the reconnaissance for the coverage matrix of issue 20,
not the CI test itself.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import transformers as tf

import lowbit
from lowbit import Recipe
from lowbit.errors import LowbitError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import ByteTokenizer  # noqa: E402
from test_composition import STEPS  # noqa: E402

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 64}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 16}),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 16}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def recipe_for(step: str) -> Recipe:
    cfg = STEPS[step]
    if step in ("rotate", "quad"):
        steps = [cfg, STEPS["rtn"]]
    elif step in ("embeddings", "act", "rilq"):
        steps = [STEPS["rtn"], cfg]
    else:
        steps = [cfg]
    return Recipe(steps, name=step)


def cell(model: torch.nn.Module, step: str, ids: torch.Tensor, ref: torch.Tensor) -> str:
    m = copy.deepcopy(model)
    try:
        lowbit.quantize(m, recipe_for(step), calib=lowbit.Calibration(tokenizer=ByteTokenizer(), n=4, seq_len=32))
        with torch.no_grad():
            out = m(ids).logits
        err = ((out - ref).norm() / ref.norm()).item()
        folder = Path(tempfile.mkdtemp())
        try:
            lowbit.save(m, folder / "ck")
            ours, _ = lowbit.load(folder / "ck")
            theirs = tf.AutoModelForCausalLM.from_pretrained(folder / "ck")
            with torch.no_grad():
                same = torch.equal(ours(ids).logits, out) and torch.equal(theirs(ids).logits, out)
            theirs.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
        finally:
            shutil.rmtree(folder)
        return f"✓ {err:.3f}" if same else f"FAIL: loaders differ (err {err:.3f})"
    except LowbitError as e:
        return "refused: " + str(e).split(";")[0][:90]
    except Exception as e:  # noqa: BLE001 - every other failure is a finding
        return f"FAIL: {type(e).__name__}: {str(e)[:80]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    tf.logging.set_verbosity_error()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    lines = ["| family | fused experts in float | " + " | ".join(STEPS) + " |", "|---" * (len(STEPS) + 2) + "|"]
    for family in args.families:
        config_cls, model_cls, extra = FAMILIES[family]
        torch.manual_seed(0)
        model = model_cls(config_cls(**{**BASE, **extra})).eval()
        with torch.no_grad():
            ref = model(ids).logits
        experts = sum(p.numel() for p in model.parameters() if p.dim() == 3)
        total = sum(p.numel() for p in model.parameters())
        row = [cell(model, step, ids, ref) for step in STEPS]
        lines.append(f"| {family} | {f'{100 * experts / total:.0f} % of weights' if experts else '-'} | "
                     + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
