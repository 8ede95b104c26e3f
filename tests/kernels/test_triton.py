"""The Triton kernels (lowbit/kernels/triton_gpu.py) against the dequantize + F.linear reference, on CPU in
Triton's interpreter (TRITON_INTERPRET=1). Small shapes that are not multiples of the tile sizes; ``blocks=(16,
16, 16)`` forces several tiles along M, N and K so the masking and the K loop are exercised with few elements.

The kernel module builds its interpreted kernel explicitly (not from the environment at import time), so the
variable is only set per test (monkeypatch) and does not leak into other test modules.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from tolerances import FP32_ATOL, FP32_RTOL, LOWP_ATOL, LOWP_RTOL

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]' or '.[test]')")

from lowbit.formats import get_format  # noqa: E402
from lowbit.kernels import qmatmul_reference  # noqa: E402
from lowbit.kernels.triton_gpu import available, qmatmul_triton, supports  # noqa: E402
from lowbit.quantizers.rtn import rtn_quantize  # noqa: E402

OUT, IN = 40, 72  # N = 2.5 tiles of 16, K = 4.5 tiles of 16
TILES = (16, 16, 16)  # (BLOCK_M, BLOCK_N, BLOCK_K): the smallest tl.dot accepts


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _close(y, ref, lowp=False):
    atol, rtol = (LOWP_ATOL, LOWP_RTOL) if lowp else (FP32_ATOL, FP32_RTOL)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y.float(), ref.float(), atol=atol, rtol=rtol)


def _check_shapes(qw, k):
    """M = 1 (decode), M = 19 (prefill: two M tiles, the second ragged) with small tiles, then leading dims
    (2, 3, k) with the default tiles."""
    for shape, blocks in [((1, k), TILES), ((19, k), TILES), ((2, 3, k), None)]:
        x = torch.randn(*shape)
        assert supports(x, qw)
        _close(qmatmul_triton(x, qw, blocks=blocks), qmatmul_reference(x, qw))


UNIFORM = [  # (family, bits, symmetric, granularity, group_size)
    ("int", 1, False, "group", 8),
    ("int", 2, False, "group", 16),  # groups of 16 = BLOCK_K: one scale per K tile, scaled after the dot
    ("int", 3, False, "group", 24),  # codes straddle bytes; 24 is not a multiple of 16: per-element scales
    ("int", 3, False, "group", 16),
    ("int", 4, False, "group", 16),  # 72 = 4 x 16 + 8: ragged last group
    ("int", 4, False, "channel", IN),
    ("int", 5, False, "group", 32),
    ("int", 6, False, "tensor", IN),  # one shared scale row
    ("int", 7, False, "group", 16),
    ("int", 8, False, "group", 16),
    ("int", 2, True, "channel", IN),
    ("int", 3, True, "group", 16),
    ("int", 4, True, "group", 32),
    ("int", 8, True, "tensor", IN),
    ("nf", 4, False, "group", 16),
    ("nf", 3, False, "group", 24),
    ("nf", 2, False, "channel", IN),
    ("fp4", 4, False, "group", 32),
    ("fp8", 8, False, "channel", IN),
]


@pytest.mark.parametrize("case", UNIFORM, ids=lambda c: f"{get_format(*c[:3]).name}-{c[3]}{c[4]}")
def test_uniform_formats_match_reference(case):
    family, bits, symmetric, granularity, group = case
    qw = rtn_quantize(torch.randn(OUT, IN), get_format(family, bits, symmetric), granularity, group)
    _check_shapes(qw, IN)


def _lowra_weight(budget, out=OUT, k=IN, block=16):
    from lowbit.qmixed import MixedCodebookWeight
    from lowbit.quantizers.lowra import LowRAConfig, encode_layer, fit_layer
    from lowbit.quantizers.precision import assign_widths

    w = torch.randn(out, k) * torch.linspace(0.1, 3, out).unsqueeze(1)  # unequal rows get unequal widths
    config = LowRAConfig(budget=budget, block_size=block)
    fit = fit_layer(w, config)
    qw = encode_layer(w, fit, assign_widths(fit.errors, torch.full((out,), k), config.widths, budget),
                      config.widths, block)
    assert isinstance(qw, MixedCodebookWeight)
    return qw


def test_mixed_codebook_rows_of_every_width_match_reference():
    """LowRA rows of widths 1-4 (one launch per width), block absmax of 16 with a ragged last block of 8 (and of
    24: per-element scales), outputs scattered back through perm."""
    widths = set()
    for budget, block in [(1.5, 16), (2.5, 16), (2.0, 24)]:
        qw = _lowra_weight(budget, block=block)
        assert len(qw.rows) >= 3, qw.rows
        assert not torch.equal(qw.perm.long(), torch.arange(OUT))  # the permutation really matters
        widths |= set(qw.rows)
        _check_shapes(qw, IN)
    assert widths == {1, 2, 3, 4}


def test_low_precision_and_other_activation_dtypes():
    """fp16/bf16 activations come back in their dtype (dot in that dtype on GPU); fp64 is computed in fp32."""
    weights = [rtn_quantize(torch.randn(OUT, IN), get_format("int", 4), "group", 16),
               rtn_quantize(torch.randn(OUT, IN), get_format("nf", 4), "group", 24),
               _lowra_weight(2.5)]
    for qw in weights:
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(5, IN).to(dtype)
            _close(qmatmul_triton(x, qw, blocks=TILES), qmatmul_reference(x, qw), lowp=True)
        x = torch.randn(3, IN, dtype=torch.float64)
        _close(qmatmul_triton(x, qw), qmatmul_reference(x, qw))
    assert qmatmul_triton(torch.randn(0, IN), weights[0]).shape == (0, OUT)


def test_lowra_tiny_llama_logits_match_reference():
    """Every layer of a LowRA-quantized tiny llama (real mixed weights, x of shape (1, T, in)) through the
    dispatcher with Triton forced (LOWBIT_KERNEL=triton does the same)."""
    import lowbit
    from lowbit import kernels

    model = tiny_model("llama")
    lowbit.quantize(model, "lowra-b2.0")
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        with kernels.force("reference"):
            ref = model(ids).logits
        kernels.reset_counts()
        with kernels.force("triton"):
            got = model(ids).logits
    assert kernels.calls == {"triton": 14}  # all 14 decoder Linears of the 2-layer model
    kernels.reset_counts()
    _close(got, ref)


def test_support_rules(monkeypatch):
    qw = rtn_quantize(torch.randn(OUT, IN), get_format("int", 4), "group", 16)
    assert available()
    assert supports(torch.randn(1, IN), qw)
    assert supports(torch.randn(2, 3, IN), _lowra_weight(2.0))
    assert not supports(torch.randn(1, IN, requires_grad=True), qw)  # no backward: the reference handles it
    with torch.no_grad():
        assert supports(torch.randn(1, IN, requires_grad=True), qw)
    assert not supports(torch.randn(1, IN, device="meta"), qw)  # weight and x on different devices
    assert not supports(torch.randint(0, 3, (1, IN)), qw)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not supports(torch.randn(1, IN), qw)  # CPU without the interpreter: not this kernel


def test_tuning_keeps_the_fastest_tile_shape_per_key_and_times_it_once():
    from lowbit.kernels import triton_gpu

    candidates = triton_gpu._candidates(1, 128, 8)
    assert candidates[0] == triton_gpu._blocks(1, 128, 8) and len(candidates) <= 7
    assert all(128 % k == 0 for _, _, k in candidates)  # one scale per K tile
    assert all(k in (32, 64) for _, _, k in triton_gpu._candidates(19, 64, 4)[1:])
    clock, runs = [0.0], []
    cost = {b: 1.0 + i for i, b in enumerate(candidates)}
    fastest = candidates[3]
    cost[fastest] = 0.5

    def run(blocks):
        runs.append(blocks)
        clock[0] += cost[blocks]

    key = ("test", 1)
    try:
        assert triton_gpu.tune(key, candidates, run, lambda: clock[0]) == fastest
        assert len(runs) == 4 * len(candidates)  # one compile call + 3 timed, each
        assert triton_gpu.tune(key, candidates, run, lambda: clock[0]) == fastest and len(runs) == 4 * len(candidates)
    finally:
        triton_gpu._TUNED.pop(key, None)
