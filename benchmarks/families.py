"""Which step works on which architecture family today: a tiny random model of each family transformers ships
(LLaMA, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3, OLMo 2, Qwen3-MoE, Mixtral) through every registered
step (the composition test's high-precision configs; rotate/QUAD followed by RTN, embeddings/act/RILQ after it),
then save -> ``lowbit.load`` -> ``AutoModelForCausalLM.from_pretrained`` -> generate.

    python benchmarks/families.py [--out families.md]

Each cell: ``✓ e`` (relative logit error against the float model e, both loaders bit-identical to the quantized
model in memory), ``refused: ...`` (lowbit's one-line reason) or ``FAIL: ...`` (anything else). A family with
fused MoE expert tensors (before lowbit unfuses them) shows their share of the weights. The CI
test, on smaller configs, is tests/test_families.py, which writes the README's matrix.
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
from lowbit.errors import LowbitError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import FAMILIES, ByteTokenizer, tiny_model  # noqa: E402
from test_composition import STEPS  # noqa: E402
from test_families import recipe_for  # noqa: E402

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


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
    lines = ["| family | fused expert weights | " + " | ".join(STEPS) + " |", "|---" * (len(STEPS) + 2) + "|"]
    for family in args.families:
        model = tiny_model(family, **BASE)
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
