"""Per-token activation quantization: grid size per token, round-trip bounds, clipping, zero tokens, dtypes, the
straight-through gradient, the simulated integer GEMM (exact) and config validation."""

from __future__ import annotations

import pytest
import torch
from tolerances import ROUNDING_SLACK

from lowbit.errors import LowbitError
from lowbit.formats.act import (
    ActQuantConfig,
    QuantizedActivations,
    dequantize,
    fake_quantize,
    int_matmul,
    quantize_per_token,
)


def _max_distinct_per_token(t: torch.Tensor) -> int:
    rows = t.reshape(-1, t.shape[-1])
    return max(len(torch.unique(r)) for r in rows)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_levels_per_token(bits, symmetric):
    x = torch.randn(3, 5, 512) * torch.logspace(-3, 3, 5).reshape(1, 5, 1)
    cfg = ActQuantConfig(bits=bits, symmetric=symmetric)
    q = quantize_per_token(x, cfg)
    assert q.codes.dtype == torch.int8 and q.codes.shape == x.shape and q.scale.shape == (3, 5, 1)
    assert q.scale.dtype == torch.float32
    assert int(q.codes.min()) >= -(2 ** (bits - 1)) and int(q.codes.max()) <= 2 ** (bits - 1) - 1
    assert _max_distinct_per_token(q.codes) <= 2**bits
    assert _max_distinct_per_token(fake_quantize(x, cfg)) <= 2**bits
    assert (q.zero is None) == symmetric


@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_within_half_step(symmetric):
    x = torch.randn(64, 256)
    q = quantize_per_token(x, ActQuantConfig(bits=4, clip_ratio=1.0, symmetric=symmetric))
    err = (dequantize(q) - x).abs()
    assert (err <= q.scale / 2 * (1 + ROUNDING_SLACK)).all()
    if not symmetric:  # the grid covers [min, max] of each token (0 included)
        deq = dequantize(q)
        lo, hi = x.amin(-1, keepdim=True).clamp_max(0), x.amax(-1, keepdim=True).clamp_min(0)
        assert (deq >= lo - q.scale / 2).all() and (deq <= hi + q.scale / 2).all()


def test_symmetric_matches_quarot_rule():
    x = torch.randn(16, 64)
    q = quantize_per_token(x, ActQuantConfig(bits=4, clip_ratio=0.9))
    scale = 0.9 * x.abs().amax(-1, keepdim=True) / 7
    torch.testing.assert_close(q.scale, scale, rtol=0, atol=0)
    assert torch.equal(q.codes.long(), torch.round(x / scale).clamp(-8, 7).long())


def test_clip_ratio_clips_max_element():
    x = torch.randn(8, 128)
    i = x.abs().argmax(-1, keepdim=True)
    xmax = x.gather(-1, i)
    for symmetric in (True, False):
        fq = fake_quantize(x, ActQuantConfig(bits=8, clip_ratio=0.5, symmetric=symmetric))
        assert (fq.gather(-1, i).abs() < 0.52 * xmax.abs()).all()  # ~half the max: clipped, one step of slack
    # the positive end saturates at qmax, the negative end may use the extra level -(qmax + 1)
    q = quantize_per_token(torch.tensor([[-10.0, 10.0, 1.0]]), ActQuantConfig(bits=4, clip_ratio=0.5))
    assert q.codes.tolist() == [[-8, 7, 1]]


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_tokens(symmetric):
    x = torch.randn(4, 32)
    x[1] = 0
    cfg = ActQuantConfig(symmetric=symmetric)
    q = quantize_per_token(x, cfg)
    fq = fake_quantize(x, cfg)
    assert torch.isfinite(q.scale).all() and torch.isfinite(fq).all()
    assert torch.equal(fq[1], torch.zeros(32)) and torch.equal(dequantize(q)[1], torch.zeros(32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_and_shape_preserved(dtype):
    x = torch.randn(2, 3, 64).to(dtype)
    fq = fake_quantize(x, ActQuantConfig())
    assert fq.dtype == dtype and fq.shape == x.shape
    assert quantize_per_token(x, ActQuantConfig()).scale.dtype == torch.float32
    assert _max_distinct_per_token(fq) <= 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_straight_through_gradient(dtype):
    x = torch.randn(4, 64).to(dtype).requires_grad_()
    cfg = ActQuantConfig(bits=4)
    y = fake_quantize(x, cfg)
    assert torch.equal(y.detach(), fake_quantize(x.detach(), cfg))  # forward is exactly the quantized value
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _pow2(shape):
    return 2.0 ** torch.randint(-6, 3, shape).float()


@pytest.mark.parametrize("w_scale_shape", [(12, 1), (12,)])
def test_int_matmul_exact(w_scale_shape):
    a = torch.randint(-128, 128, (2, 5, 40), dtype=torch.int8)
    w = torch.randint(-8, 8, (12, 40), dtype=torch.int8)
    sa, sw = _pow2((2, 5, 1)), _pow2(w_scale_shape)
    y = int_matmul(a, sa, w, sw)
    assert y.dtype == torch.float32 and y.shape == (2, 5, 12)
    # power-of-two scales and |sums| < 2^24 make the fp32 reference exact
    ref = (a.float() * sa) @ (w.float() * sw.reshape(12, 1)).T
    assert torch.equal(y, ref)
    acc = [[[sum(int(a[b, t, i]) * int(w[j, i]) for i in range(40)) for j in range(12)] for t in range(5)]
           for b in range(2)]
    assert torch.equal(y, torch.tensor(acc, dtype=torch.float64).mul(sa.double()).mul(sw.reshape(1, 12)).float())


def test_int_matmul_asymmetric_and_large_sums():
    x, w = torch.randn(6, 96), torch.randint(-8, 8, (10, 96), dtype=torch.int8)
    sw = _pow2((10, 1))
    q = quantize_per_token(x, ActQuantConfig(bits=8, symmetric=False))
    ref = dequantize(q).double() @ (w.double() * sw.double()).T
    torch.testing.assert_close(int_matmul(q.codes, q.scale, w, sw, q.zero), ref.float(), rtol=1e-6, atol=1e-6)
    # sums past fp32's 2^24 stay exact in the integer accumulator
    big = int_matmul(torch.full((1, 2048), 127, dtype=torch.int8), torch.ones(1, 1),
                     torch.full((1, 2048), 127, dtype=torch.int8), torch.ones(1))
    assert int(big.double().item()) == 127 * 127 * 2048


@pytest.mark.parametrize("kwargs,field", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(bits=4.0), "bits"), (dict(bits=True), "bits"),
    (dict(clip_ratio=0.0), "clip_ratio"), (dict(clip_ratio=1.5), "clip_ratio"), (dict(clip_ratio="x"), "clip_ratio"),
    (dict(symmetric=1), "symmetric"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(LowbitError, match=field) as e:
        ActQuantConfig(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(e.value)


def test_config_dict_round_trip():
    cfg = ActQuantConfig(bits=8, clip_ratio=1.0, symmetric=False)
    assert ActQuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict() == {"version": 1, "bits": 8, "clip_ratio": 1.0, "symmetric": False}
    with pytest.raises(LowbitError, match="group_size"):
        ActQuantConfig.from_dict({"bits": 4, "group_size": 8})
    with pytest.raises(LowbitError, match="version"):
        ActQuantConfig.from_dict({"version": 2})
    assert isinstance(quantize_per_token(torch.randn(2, 8), cfg), QuantizedActivations)
