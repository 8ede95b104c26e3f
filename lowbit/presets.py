"""Named recipes (``lowbit quantize --recipe NAME``). Each entry is the list of step configs it expands to.

Names join with ``+`` into one recipe whose steps run in order: ``gptq-w4g128+emb8`` is GPTQ on the decoder
layers, then the embedding table (and the tied head) in int8."""

from __future__ import annotations

from dataclasses import replace

from .compensate.loftq import LoftQConfig
from .compensate.rilq import RILQConfig
from .config import StepConfig
from .quantizers.activations import ActivationsConfig
from .quantizers.blockwise import BlockwiseConfig
from .quantizers.embeddings import EmbeddingsConfig
from .quantizers.gptq import GPTQConfig
from .quantizers.lowra import LowRAConfig
from .quantizers.lowra_gptq import LowRAGPTQConfig
from .quantizers.rtn import RTNConfig
from .transforms.rotate import RotateConfig

PRESETS: dict[str, list[StepConfig]] = {}

for _bits in (2, 3, 4, 8):
    for _g in (32, 64, 128, 256):
        PRESETS[f"rtn-w{_bits}g{_g}"] = [RTNConfig(bits=_bits, group_size=_g)]
    PRESETS[f"rtn-w{_bits}-channel"] = [RTNConfig(bits=_bits, granularity="channel")]
PRESETS["rtn-w4-sym-channel"] = [RTNConfig(bits=4, granularity="channel", symmetric=True)]
PRESETS["rtn-w8-sym-channel"] = [RTNConfig(bits=8, granularity="channel", symmetric=True)]
for _bits in (2, 3, 4):
    for _g in (64, 128):
        PRESETS[f"nf{_bits}-g{_g}"] = [RTNConfig(format="nf", bits=_bits, group_size=_g)]
for _g in (32, 64, 128):
    PRESETS[f"fp4-g{_g}"] = [RTNConfig(format="fp4", bits=4, group_size=_g)]
PRESETS["fp8-channel"] = [RTNConfig(format="fp8", bits=8, granularity="channel")]
PRESETS["fp8-g64"] = [RTNConfig(format="fp8", bits=8, group_size=64)]
for _bits, _g in ((4, 128), (4, 64), (3, 128), (3, 64), (2, 128), (2, 64)):
    PRESETS[f"gptq-w{_bits}g{_g}"] = [GPTQConfig(bits=_bits, group_size=_g)]
for _budget in ("1.15", "1.5", "2.0", "2.25", "2.5", "3.0"):
    PRESETS[f"lowra-b{_budget}"] = [LowRAConfig(budget=float(_budget))]
    PRESETS[f"lowra-gptq-b{_budget}"] = [LowRAGPTQConfig(budget=float(_budget))]

for _r in (4, 8, 16, 32, 64):
    PRESETS[f"loftq-w2g64-r{_r}"] = [LoftQConfig(rank=_r)]
PRESETS["loftq-nf2-g64-r16"] = [LoftQConfig(quantizer={"step": "rtn", "format": "nf", "bits": 2, "group_size": 64})]
for _r in (4, 8, 16, 32, 64):
    PRESETS[f"rilq{_r}"] = [RILQConfig(rank=_r)]  # Gaussian-init adapters after any quantizer: gptq-w2g64+rilq16
    # RTN w2g64 base; the adapters start from LoftQ's SVD of the residual (one alternation: the base stays RTN's)
    PRESETS[f"rtn-w2g64-rilq{_r}"] = [LoftQConfig(rank=_r), RILQConfig(rank=_r)]
PRESETS["gptq-w2g64-rilq16"] = [GPTQConfig(bits=2, group_size=64), RILQConfig(rank=16)]
PRESETS["lowra-gptq-b2.0-rilq16"] = [LowRAGPTQConfig(budget=2.0), RILQConfig(rank=16)]
# Weight-only incoherence (issue 23): QuaRot's rotation with no activation quantizer, before any weight quantizer
# (rotate+gptq-w4g128): randomized Hadamards fused into the residual readers/writers, online ones before o_proj and
# down_proj, so every Linear's input side is rotated. The LM head is untied (one more float table in the checkpoint).
PRESETS["rotate"] = [RotateConfig()]
PRESETS["emb8"] = [EmbeddingsConfig()]  # int8, one scale per row; composes: rtn-w2g64+emb8
PRESETS["emb4"] = [EmbeddingsConfig(bits=4, granularity="group", group_size=64, symmetric=False)]

# W4A4 (methods.md §3.6, §7): 4-bit per-channel symmetric weights, per-token int4 activations (clip 0.9)
_W4_CHANNEL = {"bits": 4, "granularity": "channel", "symmetric": True}
PRESETS["rtn-w4a4"] = [RTNConfig(**_W4_CHANNEL, scale_search="mse"), ActivationsConfig()]
PRESETS["quarot-rtn-w4a4"] = [RotateConfig(), RTNConfig(**_W4_CHANNEL, scale_search="mse"), ActivationsConfig()]
PRESETS["quarot-w4a4"] = [RotateConfig(), GPTQConfig(**_W4_CHANNEL), ActivationsConfig()]
PRESETS["quad-w4a4"] = [RotateConfig(outliers=64), GPTQConfig(**_W4_CHANNEL), ActivationsConfig()]
PRESETS["quad-w4a4a8"] = [RotateConfig(outliers=64), GPTQConfig(**_W4_CHANNEL), ActivationsConfig(writer_bits=8)]
PRESETS["quad-w4a8"] = [RotateConfig(outliers=64), GPTQConfig(**_W4_CHANNEL), ActivationsConfig(bits=8)]
PRESETS["rtn-w8a8"] = [RTNConfig(bits=8, granularity="channel", symmetric=True), ActivationsConfig(bits=8)]

# Block-wise reconstruction over GPTQ (issue 23): each block's codes and scales trained against the float block
for _bits, _g in ((4, 128), (3, 128), (2, 64)):
    PRESETS[f"blockwise-gptq-w{_bits}g{_g}"] = [BlockwiseConfig(quantizer={"step": "gptq", "bits": _bits,
                                                                          "group_size": _g})]

# RILQ's loss reduced to distillation: only the KL of the float model's next-token distributions (the teacher's
# logits), no cross-entropy on the calibration text nor hidden-state matching. Every trained issue-23 recipe uses it.
_DISTIL = dict(lambda_model=0.0, lambda_gt=0.0, lambda_kl=1.0)

# End-to-end refinement (issue 23): after any quantizer with row-wise scales (channel- or group-wise uniform:
# gptq-w4g128+refine-kl; LowRA's block absmax: lowra-gptq-b2.0+refine-kl), every group scale is trained to match
# the float model's next-token distributions (KL from the teacher's logits) on 320 windows of 256 tokens (32 held
# out), 100 steps of 4 windows, then folded into the packed fp16 scales: no bits added. lr 1e-3 (relative change
# of a scale per Adam step) is a first choice, not scanned. On SmolLM2: GPTQ w4g128 24.58 -> 22.30 (held-out KL
# 0.213 -> 0.118), LowRA-GPTQ b2.0 53.06 -> 38.27 (1.021 -> 0.709) (BENCHMARKS.md).
PRESETS["refine-kl"] = [RILQConfig(rank=0, scales="group", **_DISTIL, lr=1e-3, samples=320, val_ratio=0.1,
                                   max_steps=100, eval_every=20)]
# The same on mixed text: half the windows are text the float model samples itself, so neither the training nor
# its held-out choice sees WikiText-2 alone. On SmolLM2, against an untrained start's BoolQ, WikiText-2 alone lost
# 4.5 points at 4 bits and mixed text none (21.53 against 21.55-21.62 perplexity); over one 2-bit start mixed gained
# 8.5 and WikiText-2 alone 6.3 (39.59 against 38.47); at 3 bits mixed lost 7.3 where WikiText-2 alone lost 1.1.
# BoolQ moves ~7 points between runs of one recipe on this model, so this is thin evidence. best-w4 and best-w2 use
# it; best-w3 does not, nor best-w1.5 (not measured) (BENCHMARKS.md "Mixed text at 4 bits").
PRESETS["refine-kl-mixed"] = [replace(PRESETS["refine-kl"][0], data="mixed")]

# Quantization-aware training (issue 23) after any uniform-int quantizer (gptq-w2g64+qat-kl): the packed codes
# train through the straight-through estimator, with every group scale, on the same KL distillation as refine-kl
# (200 steps), then are packed again: no bits added. Memory: ~50 bytes per decoder weight while it trains (fp32
# latent codes, offsets, gradients, Adam's moments): 7.2 GB for SmolLM2. lr 5e-3 not scanned.
PRESETS["qat-kl"] = [RILQConfig(rank=0, codes=True, scales="group", **_DISTIL, lr=5e-3, samples=320, val_ratio=0.1,
                                max_steps=200, eval_every=40)]

# One recommended recipe per budget (issue 23). BEST says what each holds and costs; BENCHMARKS.md "Closer to the
# accuracy limit" has the measured figures.
BEST: dict[str, tuple[list[StepConfig], str]] = {
    "best-w4": (PRESETS["rotate"] + PRESETS["blockwise-gptq-w4g128"] + PRESETS["refine-kl-mixed"],
                "int4 g128 over Hadamard-rotated weights (QuaRot's rotation, no activation quantization; the head "
                "is untied: one more float table stored), GPTQ, block-wise trained group scales, then every group "
                "scale distilled from the float model's next-token distribution (on WikiText-2 valid and the "
                "model's own text); 4.20 bits/weight"),
    "best-w3": (PRESETS["rotate"] + PRESETS["blockwise-gptq-w3g128"] + PRESETS["refine-kl"],
                "int3 g128 over Hadamard-rotated weights (untied head), GPTQ, block-wise trained group scales, then "
                "every group scale distilled from the float model; 3.20 bits/weight"),
    # the refinement trains LowRA's block absmax as it trains uniform group scales: 53.06 -> 39.59 on mixed text
    # (38.27 on WikiText-2 alone; BENCHMARKS.md)
    "best-w2": (PRESETS["lowra-gptq-b2.0"] + PRESETS["refine-kl-mixed"],
                "LowRA mixed 1-4-bit codebooks (2.0 code bits) rounded by GPTQ, Fisher-weighted assignment, then "
                "every block scale distilled from the float model's next-token distribution (WikiText-2 valid and "
                "the model's own text); 2.37 bits/weight"),
    # The adapters are distilled (_DISTIL): RILQ's own loss reached 30.71 on WikiText-2 but cost ARC-Easy 6 points
    # against the untrained start; distillation 33.68, PIQA +3.7 and ARC-Easy +3.0 over RILQ's loss; over the
    # refined best-w2 33.46 (BENCHMARKS.md). Stored as int4 codes, rank-8 adapters cost 0.093 bits/weight instead
    # of bf16's 0.37 (rounding trained adapters: bf16 33.47, int8 33.471, int4 33.55); the bits saved widen the base
    # from 2.0 to 2.26 code bits, the widest LowRA budget whose checkpoint stays within 2.75 bits/weight with its
    # adapters on SmolLM2 (chosen by that arithmetic; LowRA's per-row codebooks cost less on wider rows, so larger
    # models land lower): 29.59 at 2.7437 (int8 over b2.18: 30.61). Rank 16 in bf16 gained nothing over rank 8
    # (33.61 against 33.46).
    # Its refinement stays on the recipe's text (WikiText-2 valid): with it the adapters met <= 30 (29.59) and lost
    # no zero-shot accuracy against the start (BoolQ +1.6); mixed text was not measured under adapters.
    "best-w2-lora": ([LowRAGPTQConfig(budget=2.26)] + PRESETS["refine-kl"]
                     + [RILQConfig(rank=8, adapter_dtype="int4", **_DISTIL)],
                     "LowRA mixed 1-4-bit codebooks at 2.26 code bits rounded by GPTQ, every block scale distilled "
                     "from the float model, then rank-8 LoRA adapters distilled from it, stored in int4; about "
                     "2.65 + 0.09 = 2.75 bits/weight"),
    # the same refinement at 1.5 code bits: 126.48 -> 68.45 (BENCHMARKS.md)
    "best-w1.5": (PRESETS["lowra-gptq-b1.5"] + PRESETS["refine-kl"],
                  "LowRA mixed 1/2-bit codebooks rounded by GPTQ, Fisher-weighted assignment, then every block "
                  "scale distilled from the float model; 1.84 bits/weight"),
}
for _name, (_steps, _) in BEST.items():
    PRESETS[_name] = _steps

DEFAULT_PRESET = "rtn-w4g128"
