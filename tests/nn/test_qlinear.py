"""QLinear: same output as F.linear on the dequantized weight, gradients to the input, frozen fp16 scales."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import FP32_ATOL, FP32_RTOL, LOWP_ATOL, LOWP_RTOL

from lowbit.formats import get_format
from lowbit.nn import QLinear
from lowbit.qtensor import QuantizedWeight
from lowbit.quantizers.rtn import rtn_quantize

CASES = [  # (family, bits, symmetric, granularity, group_size)
    ("int", 4, False, "group", 16),  # in=40: groups 16, 16, 8
    ("int", 3, False, "group", 32),
    ("int", 2, False, "channel", 40),
    ("int", 8, True, "tensor", 40),
    ("nf", 4, False, "group", 16),
    ("fp4", 4, False, "group", 8),
]


def _qlinear(family="int", bits=4, symmetric=False, granularity="group", group_size=16, bias=True):
    w = torch.randn(24, 40)
    qw = rtn_quantize(w, get_format(family, bits, symmetric), granularity, group_size)
    b = torch.randn(24) if bias else None
    return QLinear(qw, b), qw, b


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 40)])
def test_forward_matches_dequantized_linear(case, shape):
    m, qw, b = _qlinear(*case)
    x = torch.randn(*shape)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (*shape[:-1], 24) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, qw.dequantize(), b), atol=FP32_ATOL, rtol=FP32_RTOL)


def test_forward_without_bias():
    m, qw, _ = _qlinear(bias=False)
    assert m.bias is None
    x = torch.randn(3, 40)
    torch.testing.assert_close(m(x), x @ qw.dequantize().T, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_gradients_flow_to_input_only():
    m, qw, b = _qlinear()
    assert not any(p.requires_grad for p in m.parameters())
    assert all(not t.requires_grad for t in m.buffers())
    x = torch.randn(4, 40, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(4, 24)
    (m(x) * upstream).sum().backward()
    (F.linear(x_ref, qw.dequantize(), b) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(x.grad, upstream @ qw.dequantize(), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert m.bias.grad is None and m.scales.grad is None


def test_single_row_input_with_grad_gets_the_right_gradient():
    """The kernels have no backward of their own: qmatmul's autograd function runs any of them forward and
    dequantizes the weight again for ``dX = dY W`` (saving no float weight)."""
    m, qw, b = _qlinear()
    x = torch.randn(1, 40, requires_grad=True)
    m(x).sum().backward()
    torch.testing.assert_close(x.grad, qw.dequantize().sum(0, keepdim=True), atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()],
                         ids=["to-bf16", "half", "double"])
def test_dtype_casts_keep_scales_fp16_and_codes_unchanged(cast):
    m, qw, b = _qlinear()
    codes, scales, zeros = m.codes.clone(), m.scales.clone(), m.zeros.clone()
    out = cast(m)
    assert out is m
    assert m.scales.dtype == torch.float16 and torch.equal(m.scales, scales)
    assert m.codes.dtype == torch.uint8 and torch.equal(m.codes, codes)
    assert m.zeros.dtype == torch.uint8 and torch.equal(m.zeros, zeros)
    assert m.bias.dtype != torch.float32  # the float bias follows the cast
    assert torch.equal(m.weight, qw.dequantize())  # the packed weight itself is untouched
    x = torch.randn(3, 40).to(m.bias.dtype)
    y = m(x)
    assert y.dtype == x.dtype
    ref = F.linear(x.float(), qw.dequantize()) + b.to(x.dtype).float()
    torch.testing.assert_close(y.float(), ref, atol=LOWP_ATOL, rtol=LOWP_RTOL)


def test_state_dict_holds_packed_tensors_and_loads_into_empty_layout():
    m, qw, b = _qlinear()
    sd = m.state_dict()
    assert set(sd) == {"codes", "scales", "zeros", "bias"}
    assert sd["codes"].dtype == torch.uint8 and sd["codes"].shape == (24, 20)
    assert sd["scales"].dtype == torch.float16 and sd["scales"].shape == (24, 3)
    assert sd["zeros"].dtype == torch.uint8 and sd["zeros"].shape == (24, 3)
    fresh = QLinear(QuantizedWeight.empty(qw.meta()), torch.zeros(24))
    fresh.load_state_dict(sd)
    x = torch.randn(2, 40)
    assert torch.equal(fresh(x), m(x))


def test_state_dict_of_codebook_format_has_no_zeros():
    m, _, _ = _qlinear("nf", 4, bias=False)
    assert set(m.state_dict()) == {"codes", "scales"}


def test_qweight_views_module_buffers_and_repr():
    m, qw, _ = _qlinear()
    assert m.qweight.codes.data_ptr() == m.codes.data_ptr()
    assert m.qweight.meta() == qw.meta()
    assert (m.in_features, m.out_features) == (40, 24)
    assert torch.equal(m.weight, qw.dequantize())
    assert "int4 g16" in repr(m) and "bias=True" in repr(m)
