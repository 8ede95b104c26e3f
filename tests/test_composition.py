"""Every ordered pair of registered recipe steps, on a tiny model: either the pair is one lowbit refuses with a
clear error (the expected set below, each with its reason), or the result computes the float model's function
within the error of its own steps, and saves and loads to the same logits.

This is what keeps a transform and a quantizer composing: a quantizer that packed a rotated layer without its
online Hadamard (the old ``[rotate, lowra-*]`` / ``[rotate, loftq]`` paths) is off by the whole signal, not by
its rounding error.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import ByteTokenizer, tiny_model

import lowbit
from lowbit import registry
from lowbit.compensate import LoftQConfig, RILQConfig
from lowbit.errors import LowbitError
from lowbit.nn.input_transform import TransformedLinear
from lowbit.quantizers import ActivationsConfig, BlockwiseConfig, EmbeddingsConfig, GPTQConfig, RTNConfig
from lowbit.quantizers.lowra import LowRAConfig
from lowbit.quantizers.lowra_gptq import LowRAGPTQConfig
from lowbit.transforms.rotate import RotateConfig

# One test config per registered step (QUAD is the rotate step with outlier columns): high precision, so a wrong
# function stands out from rounding.
STEPS = {
    "rtn": RTNConfig(bits=8, group_size=32),
    "gptq": GPTQConfig(bits=8, group_size=32),
    "lowra": LowRAConfig(budget=4.0, block_size=32, iters=3),
    "lowra-gptq": LowRAGPTQConfig(budget=4.0, block_size=32, iters=3),
    "loftq": LoftQConfig(quantizer={"step": "rtn", "bits": 8, "group_size": 32}, rank=4),
    "blockwise": BlockwiseConfig(quantizer={"step": "gptq", "bits": 8, "group_size": 32}, epochs=1),
    "embeddings": EmbeddingsConfig(),
    "act": ActivationsConfig(bits=8),
    "rotate": RotateConfig(),
    "quad": RotateConfig(outliers=8, samples=4, seq_len=32),
    # the teacher term alone: on a random model, next-token loss on real text pulls away from the float function
    "rilq": RILQConfig(rank=4, samples=4, seq_len=32, val_ratio=0.25, max_steps=2, eval_every=2, micro_batch=2,
                       lambda_gt=0.0, lambda_model=1.0),
}
QUANTIZERS = ("rtn", "gptq", "lowra", "lowra-gptq", "loftq", "blockwise")
TRANSFORMS = ("rotate", "quad")

# Pairs lowbit refuses, and why. Everything else must work.
REFUSED = {
    # a weight quantizer (or LoftQ) needs float Linears: after another quantizer there are none
    **{(a, b): "no float Linear left" for a in QUANTIZERS for b in QUANTIZERS},
    # rotation folds norms into float weights: it must come first
    **{(a, b): "rotate runs on the float model" for a in STEPS for b in TRANSFORMS if a != "rilq"},
    # RILQ trains adapters on packed decoder layers: a recipe needs a quantizer before it
    **{("rilq", b): "RILQ needs packed layers" for b in STEPS},
    **{(a, "rilq"): "RILQ needs packed layers" for a in ("embeddings", "act", *TRANSFORMS)},
    ("embeddings", "embeddings"): "embeddings quantized twice",
}
# A smaller model than conftest's default: 100 pairs, each a whole recipe and a save/load round trip.
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
TEXT = " ".join(f"the {w} of a city is a place where people live and work" for w in range(400))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def calibration():
    return lowbit.Calibration(tokenizer=ByteTokenizer(), n=4, seq_len=32, text=TEXT)


def apply(model, names: tuple[str, ...]):
    torch.manual_seed(0)
    lowbit.quantize(model, lowbit.Recipe([STEPS[n] for n in names]), calib=calibration())
    return model


def error(model, reference, ids) -> float:
    return float((logits(model, ids) - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def reference():
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    return ids, logits(tiny_model("llama", **SMALL), ids)


@pytest.fixture(scope="module")
def first(reference):
    """Each step run alone on the float model: ``name -> (model, its own error)``, or the LowbitError it raised
    (RILQ, for one, needs packed layers). A pair ``[a, b]`` starts from a copy of ``a``'s model: the recipe
    ``[a, b]`` applies ``b`` to exactly that (only RILQ prepares before the first step; its pairs run whole)."""
    ids, ref = reference
    out = {}
    for name in STEPS:
        try:
            model = apply(tiny_model("llama", **SMALL), (name,))
            out[name] = (model, error(model, ref, ids))
        except LowbitError as e:
            out[name] = e
    return out


def test_every_registered_step_is_covered():
    assert set(registry.known("step")) == {c.step for c in STEPS.values()}


@pytest.mark.parametrize("pair", list(itertools.product(STEPS, STEPS)), ids="+".join)
def test_pair(pair, reference, first, tmp_path):
    ids, ref = reference
    a, b = pair
    try:
        if isinstance(first[a], LowbitError):
            raise first[a]
        model = apply(tiny_model("llama", **SMALL), pair) if b == "rilq" else apply(copy.deepcopy(first[a][0]), (b,))
    except LowbitError as e:
        assert pair in REFUSED, f"{pair} was refused ({e}) but should compose"
        assert "\n" not in str(e) and len(str(e)) > 20
        return
    assert pair not in REFUSED, f"{pair} ran, but the test expects a refusal: {REFUSED[pair]}"
    own = first[a][1] + (0.0 if isinstance(first[b], LowbitError) else first[b][1])
    err = error(model, ref, ids)
    assert err <= 3 * own + 2e-3, f"{pair}: error {err:.4f} vs its steps' own {own:.4f}"
    if not any(isinstance(m, TransformedLinear) for m in model.modules()):
        lowbit.save(model, tmp_path / "ck")
        loaded, _ = lowbit.load(tmp_path / "ck")
        assert torch.equal(logits(loaded, ids), logits(model, ids))
