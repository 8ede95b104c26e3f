"""Every numeric tolerance the tests use, with where it comes from."""

# fp32 kernels vs the dequantize+F.linear reference: summation order differs only.
FP32_ATOL = 1e-5
FP32_RTOL = 1e-5
# CPU kernel vs reference on long rows: the kernel factors the zero point out (s·(Σ q·x − z·Σ x)), so its fp32
# rounding grows with those partial sums (~sqrt(K)), not with the result. Measured worst 3.9e-5 absolute at
# K=1000 (int1 per-channel, randn inputs; sqrt(K)·1.25e-6); this allows about 3x that. The fp32 GEMV of the float
# head (16-lane partial sums, then a tree) differs from F.linear by summation order only: the same bound holds.
KERNEL_ATOL_PER_SQRT_K = 4e-6

# ---- formats, qtensor, nn, kernels, recipe, RTN unit tests ------------------------------------------------
# NF tables vs methods.md §2.2, which prints them rounded to 6 d.p. (rounding error <= 5e-7; measured max
# 3.3e-7).
NF_TABLE_ATOL = 1e-6
# Relative slack on "error <= s/2" bounds: fp32 rounding of w/s and of (q - z) * s at |q| <= 255 is about
# 255 * 2^-24 relative to s (1.5e-5); 1e-4 leaves margin without hiding a wrong rounding rule (off by 0.5 s).
ROUNDING_SLACK = 1e-4
# bf16/fp16 outputs vs an fp32 reference on the same rounded inputs: the output and the bias add are each
# rounded once to bf16 (2^-8 relative each), so about 7.8e-3 relative; style.md's bf16 figure is 1e-2.
LOWP_ATOL = 1e-2
LOWP_RTOL = 1e-2
# lowbit's attention with bf16 products vs the fp64 attention of the same bf16 inputs: the probabilities are rounded
# to bf16 (2^-9 relative each) before P V; measured 2.1e-4 to 1.2e-3 of the largest output (randn·2 inputs, lengths
# 2-2,048, tests/test_attention.py's shapes); the bound leaves ~4× margin, far below a wrong pairing (order 1).
BF16_ATTENTION_REL = 5e-3
# RTN weight error ordering, int asym g64 on randn(64, 256): measured relative Frobenius errors over seeds 0-4
# are 2 bits 0.454-0.459, 4 bits 0.0905-0.0914, 8 bits 0.00532-0.00539, so err4/err8 ~ 17 (= 255/15) and
# err2/err4 ~ 5.0; the bounds below are about half of those ratios.
RTN_BITS_ERROR_RATIO_4_OVER_8 = 8.0
RTN_BITS_ERROR_RATIO_2_OVER_4 = 3.0
# Logits of tiny_llama after rtn-w8g64 vs float: relative error measured 0.0058-0.0061 over 3 input seeds.
RTN_W8_LOGITS_REL = 1e-2

# GPTQ vs RTN held-out output error on correlated synthetic inputs (tests/quantizers/test_gptq.py): measured
# ratios 0.91-0.94 without act-order and 0.49-0.50 with it (2026-11-24); the bound only asserts a clear win.
GPTQ_OVER_RTN = 0.97

# ---- coverage matrix (tests/test_families.py) ----------------------------------------------------------------
# Relative logit error of each step's 8-bit (LowRA: 4-bit budget) tiny config against the float model, on every
# family's SMALL random model. Worst family measured (2026-12-03; gemma2/gemma3 for most steps, whose random
# models have larger activations): rtn 0.0095, gptq 0.0129, lowra 0.102, lowra-gptq 0.177, loftq 0.0074,
# embeddings 0.0127, act 0.096, rotate 0.0105, quad 0.0106 (rotate/QUAD then RTN), rilq 0.0095; blockwise (its GPTQ
# start with trained scales) is held to GPTQ's bound. Each bound is
# about twice that, so a step that computed a different function on one family (errors of order 1) fails.
FAMILY_STEP_REL_ERROR = {"rtn": 0.02, "gptq": 0.026, "lowra": 0.2, "lowra-gptq": 0.35, "loftq": 0.015,
                         "embeddings": 0.025, "act": 0.19, "rotate": 0.021, "quad": 0.021, "rilq": 0.02,
                         "blockwise": 0.026}

# ---- the integer GEMM of activation-quantized layers (csrc/int_gemm.cpp) ---------------------------------------
# Its int32 sums are exact; only the scales' fp32 products differ from the simulated path (fake-quantized x times
# the dequantized W): measured worst 5.7e-7 of max|y| over bits 1/2/4/8, every granularity, K up to 1472. Through
# a whole model a last-bit difference of one layer's output can move a later token's activation code across a
# rounding boundary (one step of s_a): tiny_llama W4A8 logits measured max 7.6e-4 of 1.9 (mean 3.2e-6).
INT_GEMM_RTOL = 1e-5
INT_GEMM_MODEL_MAX = 5e-3  # max |real - simulated| relative to max |simulated| logit, whole model
INT_GEMM_MODEL_MEAN = 1e-4  # mean |real - simulated| relative to max |simulated| logit, whole model
