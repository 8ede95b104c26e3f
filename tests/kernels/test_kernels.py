"""Kernel dispatch and the C++ CPU decode kernel against the dequantize + F.linear reference."""

from __future__ import annotations

import pytest
import torch
from tolerances import FP32_ATOL, FP32_RTOL, INT_GEMM_RTOL, KERNEL_ATOL_PER_SQRT_K, LOWP_ATOL, LOWP_RTOL

from lowbit import kernels
from lowbit.formats import get_format
from lowbit.kernels import qmatmul_reference
from lowbit.quantizers.rtn import rtn_quantize

OUT, IN = 24, 40  # tiny; g=16 leaves a short last group of 8


def _qweight(family="int", bits=4, symmetric=False, granularity="group", group_size=16):
    return rtn_quantize(torch.randn(OUT, IN), get_format(family, bits, symmetric), granularity, group_size)


@pytest.fixture
def auto(monkeypatch):
    """Automatic kernel choice with fresh counters."""
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    kernels.reset_counts()
    yield
    kernels.reset_counts()


@pytest.fixture
def exact(monkeypatch):
    """The fastest kernels that keep activations in fp32 (no int8 decode rounding, no bf16 GEMM)."""
    monkeypatch.setenv("LOWBIT_KERNEL", "exact")
    kernels.reset_counts()
    yield
    kernels.reset_counts()


def _simd_gemv() -> bool:
    """Whether the fp32 GEMV of a float head applies here: the AVX-512 build of the extension (elsewhere F.linear)."""
    from lowbit.kernels.cpu import extension

    return extension() is not None and bool(extension().simd())


def test_cpu_gemv_kernel_matches_reference_on_single_rows(exact):
    """Every code width and format family, ragged groups included, against the reference."""
    cases = [*[("int", b, False, "group", 16) for b in (1, 2, 5, 6, 7, 8)],
        ("int", 4, False, "group", 16),  # asymmetric, groups 16, 16, 8 (ragged)
        ("int", 3, False, "group", 16),  # 3 bits: the eight-codes-per-three-bytes bitstream layout
        ("int", 4, True, "channel", IN),  # symmetric per-channel: no zeros, offset 8
        ("nf", 4, False, "group", 16),  # codebook level table
        ("fp4", 4, False, "group", 16),
        ("fp8", 8, False, "channel", IN),  # 8 bits: codes are bytes, 256-entry table
    ]
    for i, case in enumerate(cases, start=1):
        qw = _qweight(*case)
        x = torch.randn(1, IN)
        y = kernels.qmatmul(x, qw)
        assert kernels.calls["cpu-gemv"] == i and kernels.calls["reference"] == 0, case
        assert y.shape == (1, OUT) and y.dtype == torch.float32
        torch.testing.assert_close(y, qmatmul_reference(x, qw), atol=FP32_ATOL, rtol=FP32_RTOL, msg=str(case))
    # Other single-row shapes and dtypes: (in,), (1, 1, in), bf16.
    ref = qmatmul_reference(x, qw)
    for shape in [(IN,), (1, 1, IN)]:
        y = kernels.qmatmul(x.reshape(shape), qw)
        torch.testing.assert_close(y, ref.reshape(*shape[:-1], OUT), atol=FP32_ATOL, rtol=FP32_RTOL)
    x16 = x.to(torch.bfloat16)
    y16 = kernels.qmatmul(x16, qw)
    assert y16.dtype == torch.bfloat16
    ref16 = qmatmul_reference(x16, qw).float()
    torch.testing.assert_close(y16.float(), ref16, atol=LOWP_ATOL, rtol=LOWP_RTOL)
    assert kernels.calls["cpu-gemv"] == len(cases) + 3 and kernels.calls["reference"] == 0
    assert kernels.kernel_summary() == f"cpu-gemv:{len(cases) + 3}"


def test_under_autocast_multi_row_inputs_multiply_in_the_autocast_dtype_as_linear_does(auto):
    qw = _qweight()
    x = torch.randn(6, IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.qmatmul(x, qw)  # the differentiable path (RILQ and the trainer)
        expected = torch.nn.functional.linear(x, qw.dequantize())  # nn.Linear's autocast: bf16 in, bf16 out
        with torch.no_grad():
            y_eval = kernels.qmatmul(x, qw)
    assert y.dtype == y_eval.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(y, expected) and torch.equal(y_eval, expected)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    y32 = kernels.qmatmul(x, qw)  # outside autocast, differentiable: fp32, as before
    assert y32.dtype == torch.float32 and torch.equal(y32, torch.nn.functional.linear(x, qw.dequantize()))
    with kernels.force("exact"):  # inference under exact: fp32 too (auto would take the bf16 tiles)
        y32 = kernels.qmatmul(x.detach(), qw)
    assert y32.dtype == torch.float32 and torch.equal(y32, torch.nn.functional.linear(x.detach(), qw.dequantize()))


@pytest.mark.parametrize("shape", [(2, IN), (3, 5, IN), (4, 1, IN)])
def test_multi_row_inputs_run_fp32_tiles_when_exact(exact, shape):
    """Several rows under ``exact``: the fp32 tiles hold the reference's weights bit for bit, and a weight that fits
    one tile is one GEMM, so the product is the reference's exactly."""
    qw = _qweight()
    x = torch.randn(*shape)
    y = kernels.qmatmul(x, qw)
    assert kernels.calls == {"cpu-tiled-f32": 1}
    assert y.shape == (*shape[:-1], OUT)
    assert torch.equal(y, torch.nn.functional.linear(x, qw.dequantize()))


def test_reference_is_dequantize_then_linear():
    qw = _qweight("nf", 3)
    x = torch.randn(3, IN, dtype=torch.float64)
    y = qmatmul_reference(x, qw)
    assert y.dtype == torch.float64  # returned in x's dtype, computed in fp32
    assert torch.equal(y, (x.float() @ qw.dequantize().T).double())


def test_force_reference_pins_reference_for_single_rows(auto):
    qw = _qweight()
    x = torch.randn(1, IN)
    with kernels.force("reference"):
        y = kernels.qmatmul(x, qw)
        with kernels.force("auto"):  # nesting: the innermost choice wins, then the outer one comes back
            assert kernels._choice() == "auto"
        assert kernels._choice() == "reference"
        kernels.qmatmul(x, qw)
    assert kernels._choice() == "auto"
    assert kernels.calls == {"reference": 2}
    assert kernels.kernel_summary() == "reference:2"
    assert torch.equal(y, qmatmul_reference(x, qw))


def test_env_variable_pins_reference(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    kernels.reset_counts()
    assert kernels.kernel_summary() == "none"
    kernels.qmatmul(torch.randn(1, IN), _qweight())
    assert kernels.calls == {"reference": 1}
    kernels.reset_counts()


def test_unknown_kernel_names_raise(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "cuda")
    with pytest.raises(ValueError, match="auto, exact, reference, triton"):
        kernels.qmatmul(torch.randn(2, IN), _qweight())
    with pytest.raises(ValueError, match="auto, exact, reference, triton"):
        with kernels.force("cuda"):
            pass
    monkeypatch.delenv("LOWBIT_KERNEL")
    assert kernels._choice() == "auto"


def test_forced_triton_without_interpreter_falls_back_to_reference_on_cpu(auto, monkeypatch):
    """Auto never sends CPU tensors to Triton; forcing it on CPU needs TRITON_INTERPRET=1, else the reference runs."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with kernels.force("triton"):
        kernels.qmatmul(torch.randn(2, IN), _qweight())
    assert kernels.calls == {"reference": 1}


def test_cpu_gemv_support_rules():
    from lowbit.kernels.cpu import supports

    qw = _qweight()
    assert supports(torch.randn(1, IN), qw)
    assert supports(torch.randn(IN), qw)
    assert not supports(torch.randn(2, IN), qw)
    assert not supports(torch.randn(1, IN, requires_grad=True), qw)
    with torch.no_grad():
        assert supports(torch.randn(1, IN, requires_grad=True), qw)
    assert not supports(torch.randn(1, IN, device="meta"), qw)


def test_prepare_reports_what_decode_will_run(auto):
    assert kernels.prepare() == "cpu-gemv"
    with kernels.force("reference"):
        assert kernels.prepare() == "reference"


@pytest.mark.parametrize("budget", [1.5, 2.5])
def test_cpu_gemv_matches_reference_on_mixed_codebook_rows(exact, budget):
    """LowRA rows of every width 1-4 in one weight (ragged last block of 8), scattered back through perm."""
    from lowbit.qmixed import MixedCodebookWeight
    from lowbit.quantizers.lowra import LowRAConfig, encode_layer, fit_layer
    from lowbit.quantizers.precision import assign_widths

    w = torch.randn(OUT, IN) * torch.linspace(0.1, 3, OUT).unsqueeze(1)  # rows of unequal size get unequal widths
    config = LowRAConfig(budget=budget, block_size=16)
    fit = fit_layer(w, config)
    qw = encode_layer(w, fit, assign_widths(fit.errors, torch.full((OUT,), IN), config.widths, budget),
                      config.widths, 16)
    assert isinstance(qw, MixedCodebookWeight) and len(qw.rows) >= 3, qw.rows
    x = torch.randn(1, IN)
    y = kernels.qmatmul(x, qw)
    assert kernels.calls == {"cpu-gemv": 1}
    torch.testing.assert_close(y, qmatmul_reference(x, qw), atol=FP32_ATOL, rtol=FP32_RTOL)
    batch = torch.randn(2, 3, IN)  # a small batch: the same GEMV once per row
    torch.testing.assert_close(kernels.qmatmul(batch, qw), qmatmul_reference(batch, qw), atol=FP32_ATOL,
                               rtol=FP32_RTOL)
    assert kernels.calls["cpu-gemv-rows"] == 1
    assert kernels.qmatmul(torch.randn(17, IN), qw).shape == (17, OUT) and kernels.calls["cpu-tiled-f32"] == 1


@pytest.mark.parametrize("out_f,in_f,group_size", [(7, 72, 24), (33, 200, 8), (16, 1000, 64), (5, 136, 128)])
@pytest.mark.parametrize("family,bits", [("int", 1), ("int", 2), ("int", 3), ("int", 4), ("int", 8), ("nf", 3),
                                         ("nf", 4), ("fp4", 4)])
def test_cpu_gemv_on_shapes_off_the_16_lane_tiles(exact, out_f, in_f, group_size, family, bits):
    """The vector path works on 16 codes at a time: groups of 8/24, ragged last groups, rows ending mid-tile and
    per-channel scales all against the reference (the last row's tail reads stay inside the codes tensor)."""
    w = torch.randn(out_f, in_f)
    for granularity, g in (("group", group_size), ("channel", in_f)):
        qw = rtn_quantize(w, get_format(family, bits, False), granularity, g)
        x = torch.randn(in_f)
        torch.testing.assert_close(kernels.qmatmul(x, qw), qmatmul_reference(x, qw),
                                   atol=KERNEL_ATOL_PER_SQRT_K * in_f**0.5, rtol=FP32_RTOL)
    assert kernels.calls["reference"] == 0


# ---- the fp32 GEMV for a packed model's float head --------------------------------------------------------

@pytest.mark.parametrize("out_f,in_f", [(13, 37), (64, 576), (5, 16), (130, 200)])
def test_float_gemv_matches_f_linear_off_the_tiles(auto, out_f, in_f):
    """Rows not a multiple of the 4-row tile, columns not a multiple of 16 lanes; with and without a bias."""
    from lowbit.kernels.cpu import float_supports

    w, x, bias = torch.randn(out_f, in_f), torch.randn(1, 1, in_f), torch.randn(out_f)
    assert float_supports(x, w) == _simd_gemv()  # without AVX-512: F.linear, counted nowhere
    for b in (None, bias):
        y = kernels.linear(x, w, b)
        assert y.shape == (1, 1, out_f) and y.dtype == torch.float32
        atol = KERNEL_ATOL_PER_SQRT_K * in_f ** 0.5
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), atol=atol, rtol=FP32_RTOL)
    assert kernels.calls == ({"cpu-gemv-f32": 2} if _simd_gemv() else {})


def test_float_gemv_applies_only_to_a_decode_step(auto):
    from lowbit.kernels.cpu import float_supports

    w = torch.randn(8, 32)
    assert not float_supports(torch.randn(2, 32), w)  # prefill / batch: F.linear
    assert not float_supports(torch.randn(1, 32).bfloat16(), w)
    assert not float_supports(torch.randn(1, 32), w.bfloat16())
    assert not float_supports(torch.randn(1, 32), w.t())  # not contiguous
    assert not float_supports(torch.randn(1, 32, requires_grad=True), w)
    assert not float_supports(torch.randn(1, 32), w.requires_grad_())
    with torch.no_grad():
        assert float_supports(torch.randn(1, 32), w) == _simd_gemv()
    with kernels.force("reference"):
        kernels.linear(torch.randn(1, 32), w.detach())
    assert kernels.calls["cpu-gemv-f32"] == 0


@pytest.mark.parametrize("shape", [(2, 37), (3, 5, 576), (17, 200)])
def test_float_head_batches_run_onednn_in_fp32(auto, shape):
    """More than one row (batches, prefill, evaluation) without autograd: oneDNN's fp32 GEMM, equal to F.linear up
    to summation order; with autograd, F.linear (and its gradient)."""
    from lowbit.kernels.cpu import onednn_supports

    w, bias, x = torch.randn(130, shape[-1]), torch.randn(130), torch.randn(*shape)
    if not onednn_supports(x, w):
        pytest.skip("torch was built without oneDNN")
    for b in (None, bias):
        y = kernels.linear(x, w, b)
        assert y.shape == (*shape[:-1], 130) and y.dtype == torch.float32
        atol = KERNEL_ATOL_PER_SQRT_K * shape[-1] ** 0.5
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), atol=atol, rtol=FP32_RTOL)
    assert kernels.calls == {"cpu-onednn-f32": 2}
    assert not onednn_supports(x, w.t().contiguous().t())  # a weight that is not contiguous
    assert not onednn_supports(torch.randn(1, shape[-1]), w)  # one row: the GEMV
    assert not onednn_supports(x.bfloat16(), w)
    x.requires_grad_()
    kernels.linear(x, w, bias).sum().backward()
    assert kernels.calls == {"cpu-onednn-f32": 2} and x.grad is not None


def test_gemv_head_keeps_parameters_tying_and_logits(auto):
    """use_gemv_head switches the class only: same Parameter objects (still tied), same state-dict keys, greedy
    decode identical, and the decode steps went through the fp32 GEMV."""
    from conftest import tiny_model

    from lowbit.nn import GEMVLinear, use_gemv_head

    model = tiny_model("llama", tie_word_embeddings=True)
    ids = torch.randint(0, 256, (1, 6))
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = model(ids).logits
        before = model.generate(ids, **kwargs)
    keys, weight = list(model.state_dict()), model.lm_head.weight
    assert use_gemv_head(model) and not use_gemv_head(model)
    assert type(model.lm_head) is GEMVLinear and model.lm_head.weight is weight
    assert model.lm_head.weight is model.model.embed_tokens.weight and list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, atol=FP32_ATOL, rtol=FP32_RTOL)  # 6 rows: oneDNN
        assert kernels.calls["cpu-gemv-f32"] == 0
        assert torch.equal(model.generate(ids, **kwargs), before)
    # one row each: the prompt's last position, then 4 single tokens (F.linear without AVX-512)
    assert kernels.calls["cpu-gemv-f32"] == (5 if _simd_gemv() else 0)


def test_a_gemv_head_can_still_be_quantized():
    """A loaded checkpoint's float head is a GEMVLinear; recipes that target it still find it."""
    from conftest import tiny_model

    import lowbit
    from lowbit import QLinear, Recipe, RTNConfig
    from lowbit.nn import use_gemv_head

    model = tiny_model("llama")
    assert use_gemv_head(model)
    lowbit.quantize(model, Recipe([RTNConfig(targets=("@decoder", "lm_head"))]))
    assert isinstance(model.lm_head, QLinear)


@pytest.mark.parametrize("granularity, group_size, in_f", [("group", 16, 40), ("group", 64, 576), ("channel", 40, 40)])
def test_group_scaled_qmatmul_matches_autograd_of_the_scaled_dense_weight(granularity, group_size, in_f):
    torch.manual_seed(0)
    w = torch.randn(24, in_f)
    qw = rtn_quantize(w, get_format("int", 2, symmetric=False), granularity=granularity, group_size=group_size)
    g = (1 + 0.1 * torch.randn(qw.scales.shape)).requires_grad_(True)
    x = torch.randn(3, 5, in_f, requires_grad=True)
    y = kernels.qmatmul_group_scaled(x, qw, g)
    dy = torch.randn_like(y)
    dx, dg = torch.autograd.grad(y, (x, g), dy)
    # reference: autograd through the dense weight g ⊙ Q(W) (group columns repeated, the last group shorter)
    g_ref = g.detach().clone().requires_grad_(True)
    cols = torch.arange(in_f) // qw.group_size
    w_ref = qw.dequantize() * g_ref[:, cols]
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ w_ref.T
    dx_ref, dg_ref = torch.autograd.grad(y_ref, (x_ref, g_ref), dy)
    torch.testing.assert_close(y, y_ref, atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(dx, dx_ref, atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(dg, dg_ref, atol=FP32_ATOL, rtol=FP32_RTOL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = kernels.qmatmul_group_scaled(x, qw, g)
    assert y16.dtype == torch.bfloat16
    assert ((y16.float() - y_ref).norm() / y_ref.norm()).item() < LOWP_RTOL  # bf16 rounding of x and W only
    with pytest.raises(ValueError, match="must match the packed row-wise scales"):
        kernels.qmatmul_group_scaled(x, qw, g[:, :1] if g.shape[1] > 1 else g[:1])


def _mixed_weight(out_f: int = 12, in_f: int = 40, block_size: int = 16):
    """A LowRA weight whose rows have widths 1-4 out of order (stored rows permuted), random codes and levels."""
    from lowbit.qmixed import MixedCodebookWeight

    torch.manual_seed(1)
    widths = torch.tensor([3, 1, 4, 2] * (out_f // 4))
    codes = (torch.rand(out_f, in_f) * (2 ** widths[:, None])).to(torch.uint8)
    books = {b: torch.sort(torch.randn(out_f, 2**b).clamp(-1, 1), dim=1).values for b in (1, 2, 3, 4)}
    absmax = torch.rand(out_f, -(-in_f // block_size)).half().float() + 0.5
    return MixedCodebookWeight.from_rows(codes, widths, books, absmax, block_size)


@pytest.mark.parametrize("rows", [2, 3, 5, 16])
@pytest.mark.parametrize("in_f", [37, 200])
def test_a_small_batch_of_mixed_codebook_rows_runs_one_gemv_call(exact, rows, in_f):
    """A few rows of a LowRA weight run one GEMV call over all of them (on AVX2 tiles of 2-4 rows share each
    decoded code, a last single row runs alone): equal to the reference and to one call per row, ragged columns
    (37: a last block of 5, a tail short of 8 codes) included."""
    qw = _mixed_weight(12, in_f, 8)
    x = torch.randn(rows, in_f)
    y = kernels.qmatmul(x, qw)
    assert kernels.calls == {"cpu-gemv-rows": 1}
    torch.testing.assert_close(y, qmatmul_reference(x, qw), atol=FP32_ATOL, rtol=FP32_RTOL)
    one_by_one = torch.cat([kernels.qmatmul(row[None], qw) for row in x])
    torch.testing.assert_close(y, one_by_one, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_group_scaled_qmatmul_on_lowra_weights_trains_the_block_absmax():
    """LowRA's block absmax are row-wise scales too: the multiplier is one per row and block (original row
    order), its gradient matches autograd through the dense weight, and folding it into the stored (permuted)
    absmax gives the same weight."""
    from lowbit import LowbitError

    qw = _mixed_weight()
    assert qw.scale_layout == ("absmax", 16) and qw.scale_groups == 3
    assert not torch.equal(qw.perm, torch.arange(12, dtype=torch.int32))  # rows really are stored permuted
    g = (1 + 0.1 * torch.randn(12, 3)).requires_grad_(True)
    x = torch.randn(2, 3, 40, requires_grad=True)
    y = kernels.qmatmul_group_scaled(x, qw, g)
    dy = torch.randn_like(y)
    dx, dg = torch.autograd.grad(y, (x, g), dy)
    g_ref, x_ref = g.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    w_ref = qw.dequantize() * g_ref[:, torch.arange(40) // 16]
    y_ref = x_ref @ w_ref.T
    dx_ref, dg_ref = torch.autograd.grad(y_ref, (x_ref, g_ref), dy)
    torch.testing.assert_close(y, y_ref, atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(dx, dx_ref, atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(dg, dg_ref, atol=FP32_ATOL, rtol=FP32_RTOL)
    folded = dict(qw.tensors(), absmax=qw.fold_multiplier(g.detach()))
    refolded = type(qw).from_tensors(qw.meta(), folded)
    torch.testing.assert_close(refolded.dequantize(), w_ref.detach(), atol=2e-3, rtol=2e-3)  # fp16 absmax only
    with pytest.raises(LowbitError, match="cannot fold trained scales"):
        qw.fold_multiplier(torch.ones(12, 2))


# ---- int8 activations in decode (VNNI) and the tiled bf16 GEMM (prefill, batches, training) ---------------------

def _int8_error_bound(x: torch.Tensor, qw) -> torch.Tensor:
    """``(out,)``: the most the int8 rounding of each activation group can move each output,
    ``Σ_g s_ng · (max|x_g| / 254) · Σ_{k∈g} |q_nk − z_ng|`` (csrc/qgemv.cpp), plus fp32 slack."""
    from lowbit.qtensor import padded_groups

    g = qw.group_size
    q = padded_groups(qw.unpacked_codes().float(), g)  # (out, groups, g), padding codes are 0
    z = qw.zeros.float() if qw.zeros is not None else torch.full_like(qw.scales.float(), qw.format.offset)
    valid = padded_groups(torch.ones(1, qw.in_features), g)  # (1, groups, g): 0 on the padding
    spread = ((q - z.unsqueeze(-1)).abs() * valid).sum(-1)  # (out, groups)
    xmax = padded_groups(x.reshape(1, -1).abs(), g).amax(-1)  # (1, groups)
    return (qw.scales.float() * xmax / 254 * spread).sum(-1) + KERNEL_ATOL_PER_SQRT_K * qw.in_features ** 0.5


@pytest.mark.parametrize("out_f,in_f,group_size", [(24, 40, 16), (7, 200, 8), (33, 1000, 64), (5, 576, 128),
                                                      (6, 1096, 256)])
@pytest.mark.parametrize("bits,symmetric", [(1, False), (2, False), (2, True), (4, False), (4, True), (8, False)])
def test_int8_activation_gemv_is_within_its_rounding_bound(auto, out_f, in_f, group_size, bits, symmetric):
    """Under ``auto`` a decode row of integer codes runs the int8-activation kernel (AVX512-VNNI, or AVX2 for
    codes of up to 4 bits) where its groups hold whole 4-byte lanes (group_size a multiple of 32 / bits); its error
    against the exact reference stays inside the bound the int8 rounding of the activations allows, for group and
    per-channel scales, ragged groups and row tails — through both of its loops: a lane table per chunk (64 bytes
    with VNNI, 32 with AVX2), and one scale per chunk where a group spans whole chunks (int4 g128 / g256, int8 g64+,
    int2 g256)."""
    from lowbit.kernels.cpu import extension, int8_applies

    if not extension().int8_x_applies(4, 128, False):
        pytest.skip("this CPU build has neither AVX512-VNNI nor AVX2")
    vnni = bool(extension().vnni_applies(4, 128, False))
    w = torch.randn(out_f, in_f)
    for granularity, g in (("group", group_size), ("channel", in_f)):
        qw = rtn_quantize(w, get_format("int", bits, symmetric), granularity, g)
        x = torch.randn(1, in_f) * torch.linspace(0.1, 3, in_f)  # groups of unequal range
        kernels.reset_counts()
        y = kernels.qmatmul(x, qw)
        applies = g % (32 // bits) == 0 and (bits != 8 or vnni)  # AVX2: 8-bit codes would saturate vpmaddubsw
        assert int8_applies(qw) == applies
        assert kernels.calls == {"cpu-gemv-i8" if applies else "cpu-gemv": 1}
        error = (y - qmatmul_reference(x, qw)).abs().reshape(-1)
        assert (error <= _int8_error_bound(x, qw)).all(), (granularity, error.max())
        if applies:  # it did round: the exact kernel differs, by less than the bound as well
            with kernels.force("exact"):
                assert not torch.equal(kernels.qmatmul(x, qw), y)


def test_int8_activation_gemv_of_an_empty_row_is_zero(auto):
    """K = 0 (no chunk to peel off the row loop) goes to the plain loop: zeros, not a read before the codes."""
    from lowbit.kernels.cpu import extension

    for bits, group_size in ((4, 128), (2, 64)):
        codes, scales = torch.zeros(3, 0, dtype=torch.uint8), torch.zeros(3, 0, dtype=torch.float16)
        y = extension().qgemv(torch.zeros(0), codes, scales, None, None, bits, group_size, 0, True)
        assert torch.equal(y, torch.zeros(3))


def test_int8_activation_gemv_skips_codebooks_and_three_bits(auto):
    from lowbit.kernels.cpu import int8_applies

    for family, bits in (("nf", 4), ("fp4", 4), ("int", 3)):
        qw = _qweight(family, bits)
        assert not int8_applies(qw)
        kernels.qmatmul(torch.randn(1, IN), qw)
    assert kernels.calls == {"cpu-gemv": 3}


@pytest.mark.parametrize("shape,group_size", [(shape, g) for shape in [(2, 40), (4, 1, 576), (3, 5, 200), (16, 1000),
                                                                       (5, 2100)]
                                              for g in (32, 128, 256) if g <= shape[-1]])  # 128, 256: four chunks
@pytest.mark.parametrize("bits,symmetric", [(1, False), (2, False), (4, False), (4, True), (8, False)])
def test_small_batches_round_each_row_like_the_decode_kernel(auto, shape, bits, symmetric, group_size):
    """Up to 16 rows of integer codes under ``auto`` (batched decode) run the int8-activation kernel (with VNNI the
    weight read once per four rows; with AVX2 the one-row kernel per row); every row stays inside its own int8
    rounding bound, as a single row would."""
    from lowbit.kernels.cpu import extension, many_rows_i8_applies, tiled_supports

    if not extension().int8_x_applies(bits, group_size, False):
        pytest.skip("this CPU build has no int8 GEMV for these codes (AVX512-VNNI; AVX2 up to 4 bits)")
    qw = rtn_quantize(torch.randn(37, shape[-1]), get_format("int", bits, symmetric), "group", group_size)
    x = torch.randn(*shape) * torch.linspace(0.1, 3, shape[-1])
    y = kernels.qmatmul(x, qw)
    assert kernels.calls == {"cpu-gemm-i8": 1} and y.shape == (*shape[:-1], 37)
    ref = qmatmul_reference(x, qw)
    for row, (yr, rr) in enumerate(zip(y.reshape(-1, 37), ref.reshape(-1, 37), strict=True)):
        bound = _int8_error_bound(x.reshape(-1, shape[-1])[row], qw)
        assert ((yr - rr).abs() <= bound).all(), row
    more = torch.randn(17, shape[-1])  # more rows than a small batch: the bf16 tiles (AVX512-BF16), the AVX2 int8
    kernels.reset_counts()  # tile GEMM (each row still within its bound), or fp32 tiles
    y = kernels.qmatmul(more, qw)
    if tiled_supports(more, qw):
        assert kernels.calls == {"cpu-tiled-bf16": 1}
    elif many_rows_i8_applies(qw):
        assert kernels.calls == {"cpu-gemm-i8": 1}
        for yr, rr, xr in zip(y, qmatmul_reference(more, qw), more, strict=True):
            assert ((yr - rr).abs() <= _int8_error_bound(xr, qw)).all()
    else:
        assert kernels.calls == {"cpu-tiled-f32": 1}


@pytest.mark.parametrize("bits,symmetric,granularity", [(1, False, "group"), (2, False, "group"), (4, False, "group"),
                                                        (4, True, "group"), (2, False, "tensor")])
def test_the_avx2_tile_gemm_equals_the_decode_kernel_row_by_row(auto, bits, symmetric, granularity):
    """csrc/gemm_i8.cpp (AVX2 builds: qgemm_i8 from 4 rows, prefill and evaluation under ``auto``) rounds each row
    as the int8 decode GEMV rounds one row: equal to that GEMV run row by row up to fp32 summation order, on shapes
    that are not multiples of its 16-column and 4-row tiles, its 4-code units, its 8-unit blocks or the group."""
    from lowbit.kernels.cpu import extension, many_rows_i8_applies

    ext = extension()
    if not ext.gemm_i8_tiles_built():
        pytest.skip("this CPU build has no AVX2 int8 tile GEMM (AVX-512 builds use bf16 tiles or VNNI)")
    bits_fmt, ran = get_format("int", bits, symmetric), 0
    for out_f, in_f, group_size, rows in ((37, 200, 32, 5), (16, 37, 32, 4), (5, 1000, 128, 17), (50, 64, 64, 33),
                                          (3, 8, 32, 6)):
        group_size = in_f if granularity == "tensor" else group_size
        qw = rtn_quantize(torch.randn(out_f, in_f), bits_fmt, granularity, group_size)
        if not ext.int8_x_applies(bits, qw.group_size, False):
            continue
        assert many_rows_i8_applies(qw)
        ran += 1
        x = torch.randn(rows, in_f) * torch.linspace(0.1, 3, in_f)
        args = (qw.codes, qw.scales, qw.zeros, bits, qw.group_size, qw.format.offset)
        tiles = ext.qgemm_i8_tiles(x, *args)
        one_by_one = torch.stack([ext.qgemv(r.contiguous(), qw.codes, qw.scales, qw.zeros, None, bits, qw.group_size,
                                            qw.format.offset, True) for r in x])
        atol = KERNEL_ATOL_PER_SQRT_K * in_f ** 0.5
        torch.testing.assert_close(tiles, one_by_one, atol=atol, rtol=FP32_RTOL)
        torch.testing.assert_close(ext.qgemm_i8(x, *args), tiles, atol=0, rtol=0)  # 4+ rows: the tile GEMM
        kernels.reset_counts()
        y = kernels.qmatmul(torch.cat([x] * 4), qw)  # 4 x rows > 16: the dispatcher's many-row path
        assert kernels.calls == {"cpu-gemm-i8": 1}
        torch.testing.assert_close(y, torch.cat([tiles] * 4), atol=atol, rtol=FP32_RTOL)
    assert ran >= 1


def test_small_batch_fast_path_runs_the_kernel_the_dispatcher_picks(auto):
    """``qmatmul``'s bound small-batch call (the weight's cached plan) gives exactly what the dispatcher's
    ``qmatmul_cpu_rows_i8`` gives, strided rows included; inside a bf16 autocast region rows never take it."""
    from lowbit.kernels.cpu import extension, qmatmul_cpu_rows_i8

    if not extension().int8_x_applies(4, 128, False):
        pytest.skip("this CPU build has no int8 GEMV (AVX512-VNNI or AVX2)")
    qw = rtn_quantize(torch.randn(37, 256), get_format("int", 4, False), "group", 128)
    x = torch.randn(6, 2, 256)[:, 1]  # rows 512 floats apart
    y = kernels.qmatmul(x, qw)
    assert kernels.calls == {"cpu-gemm-i8": 1}
    assert torch.equal(y, qmatmul_cpu_rows_i8(x.contiguous(), qw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels.qmatmul(x, qw)
    assert kernels.calls["cpu-gemm-i8"] == 1


@pytest.mark.parametrize("shape", [(17, 40), (3, 6, 40), (17, 200), (64, 1000)])
@pytest.mark.parametrize("family,bits", [("int", 2), ("int", 3), ("int", 4), ("int", 6), ("nf", 4), ("int", 8)])
def test_tiled_bf16_gemm_matches_the_bf16_reference(auto, monkeypatch, shape, family, bits):
    """More rows than a small batch under ``auto`` (prefill) run the tiled bf16 GEMM: the weight dequantized one tile of
    rows at a time (tiles forced small here, so several tiles and a short last one run), multiplied in bf16.
    Against ``F.linear`` of the bf16-rounded input and weight it differs by summation order and the bf16 output."""
    from lowbit.kernels import cpu

    if not cpu.tiled_supports(torch.randn(2, 8), _qweight()):
        pytest.skip("this CPU build has no AVX512-BF16")
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 16 * shape[-1] + 8)  # 16 rows a tile
    out_f = 37
    qw = rtn_quantize(torch.randn(out_f, shape[-1]), get_format(family, bits, False), "group", 8)
    x = torch.randn(*shape)
    y = kernels.qmatmul(x, qw)
    assert kernels.calls == {"cpu-tiled-bf16": 1} and y.dtype == torch.float32 and y.shape == (*shape[:-1], out_f)
    expected = torch.nn.functional.linear(x.bfloat16().float(), qw.dequantize().bfloat16().float())
    torch.testing.assert_close(y, expected, atol=LOWP_ATOL, rtol=LOWP_RTOL)
    kernels.reset_counts()
    with kernels.force("exact"):  # the exact choice keeps fp32: fp32 tiles, the reference's weights
        torch.testing.assert_close(kernels.qmatmul(x, qw), qmatmul_reference(x, qw), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert kernels.calls == {"cpu-tiled-f32": 1}


@pytest.mark.parametrize("out_f,in_f,block_size", [(12, 40, 16), (36, 200, 8), (20, 1000, 64)])
@pytest.mark.parametrize("tile_rows", [7, 1 << 10])
def test_tiled_bf16_gemm_on_lowra_rows_matches_the_bf16_reference(auto, monkeypatch, out_f, in_f, block_size,
                                                                   tile_rows):
    """LowRA's mixed rows (widths 1-4 out of order, ragged last block) in bf16 tiles of stored rows, a tile spanning
    width segments (tiles of 7 rows: each segment split across tiles, a short last one; or one tile), the columns
    scattered back to the original row order; prefill and, under bf16 autocast, forward and input gradient."""
    from lowbit.kernels import cpu

    qw = _mixed_weight(out_f, in_f, block_size)
    if not cpu.tiled_supports(torch.randn(2, 8), qw):
        pytest.skip("this CPU build has no AVX512-BF16")
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", tile_rows * in_f)
    kernels.qmatmul(torch.randn(cpu.MIXED_GEMV_ROWS, in_f), qw)  # a couple of rows: the decode GEMV per row
    assert kernels.calls == {"cpu-gemv-rows": 1}
    kernels.reset_counts()
    w = qw.dequantize().bfloat16().float()
    x = torch.randn(3, 6, in_f)
    y = kernels.qmatmul(x, qw)  # 18 rows
    assert kernels.calls == {"cpu-tiled-bf16": 1} and y.dtype == torch.float32 and y.shape == (3, 6, out_f)
    torch.testing.assert_close(y, torch.nn.functional.linear(x.bfloat16().float(), w), atol=LOWP_ATOL,
                               rtol=LOWP_RTOL)
    kernels.reset_counts()
    xg = torch.randn(5, in_f, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = kernels.qmatmul(xg, qw)
    dy = torch.randn_like(y16)
    (dx,) = torch.autograd.grad(y16, xg, dy)
    assert kernels.calls == {"cpu-tiled-bf16": 2} and y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), xg.detach().bfloat16().float() @ w.T, atol=5 * LOWP_ATOL, rtol=LOWP_RTOL)
    torch.testing.assert_close(dx, dy.float() @ w, atol=5 * LOWP_ATOL, rtol=LOWP_RTOL)


@pytest.mark.parametrize("shape", [(17, 40), (3, 6, 200), (64, 1000)])
@pytest.mark.parametrize("family,bits", [("int", 1), ("int", 2), ("int", 3), ("int", 4), ("int", 5), ("nf", 4),
                                         ("fp4", 4), ("int", 8)])
@pytest.mark.parametrize("granularity", ["group", "channel"])
def test_fp32_tiles_hold_the_reference_weights(exact, monkeypatch, shape, family, bits, granularity):
    """fp32 tiles (every build; tiles forced to 16 rows, so several run and the last is short): each tile is exactly
    the reference's dequantized rows, so the forward and the input gradient equal the reference's up to fp32
    summation order (the vector decode on 8 / 16 codes a step, 5 bits on the scalar one, rows off every width)."""
    from lowbit.kernels import cpu

    in_f = shape[-1]
    qw = rtn_quantize(torch.randn(37, in_f), get_format(family, bits, False), granularity,
                      8 if granularity == "group" else in_f)
    assert cpu.tiled_supports(torch.randn(2, in_f), qw, torch.float32)
    tiles = list(cpu._dequantized_tiles(qw, torch.float32))
    assert torch.equal(tiles[0][2], qw.dequantize()[tiles[0][0]:tiles[0][1]])
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 16 * in_f + 8)  # 16 rows a tile: 37 rows in 16 + 16 + 5
    w = qw.dequantize()
    assert torch.equal(torch.cat([t.clone() for _, _, t in cpu._dequantized_tiles(qw, torch.float32)]), w)
    x = torch.randn(*shape, requires_grad=True)
    y = kernels.qmatmul(x, qw)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert kernels.calls == {"cpu-tiled-f32": 2} and y.shape == (*shape[:-1], 37)
    atol = KERNEL_ATOL_PER_SQRT_K * in_f ** 0.5
    torch.testing.assert_close(y, torch.nn.functional.linear(x.detach(), w), atol=atol, rtol=FP32_RTOL)
    torch.testing.assert_close(dx, dy @ w, atol=KERNEL_ATOL_PER_SQRT_K * 37 ** 0.5, rtol=FP32_RTOL)


@pytest.mark.parametrize("tile_rows", [7, 1 << 10])
def test_fp32_tiles_on_lowra_rows_match_the_reference(exact, monkeypatch, tile_rows):
    """LowRA's mixed rows in fp32 tiles of stored rows (segments split across tiles of 7 rows, or one tile), the
    columns scattered back to the original order: forward (more rows than the per-row GEMV takes) and input
    gradient against the dense reference."""
    from lowbit.kernels import cpu

    out_f, in_f = 36, 200
    qw = _mixed_weight(out_f, in_f, 8)
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", tile_rows * in_f)
    w = qw.dequantize()
    x = torch.randn(3, 7, in_f, requires_grad=True)
    y = kernels.qmatmul(x, qw)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert kernels.calls == {"cpu-tiled-f32": 2}
    atol = KERNEL_ATOL_PER_SQRT_K * in_f ** 0.5
    torch.testing.assert_close(y, torch.nn.functional.linear(x.detach(), w), atol=atol, rtol=FP32_RTOL)
    torch.testing.assert_close(dx, dy @ w, atol=KERNEL_ATOL_PER_SQRT_K * out_f ** 0.5, rtol=FP32_RTOL)


def test_training_multiplies_in_bf16_tiles_only_under_bf16_autocast(auto):
    """A differentiable forward outside autocast stays fp32: fp32 tiles forward and backward, the reference's weights
    bit for bit (one tile: the reference's products exactly); inside bf16 autocast the forward and the input gradient
    both run in bf16 tiles, close to autograd through the dense weight."""
    from lowbit.kernels.cpu import tiled_supports

    qw = _qweight("int", 4)
    x = torch.randn(6, IN, requires_grad=True)
    y = kernels.qmatmul(x, qw)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert kernels.calls == {"cpu-tiled-f32": 2} and torch.equal(y, torch.nn.functional.linear(x, qw.dequantize()))
    assert torch.equal(dx, dy @ qw.dequantize())
    kernels.reset_counts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = kernels.qmatmul(x, qw)
    assert y16.dtype == torch.bfloat16
    dy = torch.randn_like(y16)
    (dx,) = torch.autograd.grad(y16, x, dy)
    tiled = tiled_supports(x, qw)  # AVX512-BF16; elsewhere the bf16 reference (its backward is not counted)
    assert kernels.calls == ({"cpu-tiled-bf16": 2} if tiled else {"reference": 1})
    w = qw.dequantize()
    torch.testing.assert_close(y16.float(), (x.detach() @ w.T), atol=5 * LOWP_ATOL, rtol=LOWP_RTOL)
    torch.testing.assert_close(dx, (dy.float() @ w), atol=5 * LOWP_ATOL, rtol=LOWP_RTOL)


def test_a_packed_model_decodes_under_auto_close_to_exact(auto):
    """End to end on a tiny LLaMA (rtn int4 g32): the 12-token prompt runs the small-batch int8 kernel, each decoded
    token the int8 GEMV; the logits stay within the bf16 tolerance of the exact kernels' and greedy decoding runs."""
    from conftest import tiny_model

    import lowbit
    from lowbit import Recipe, RTNConfig
    from lowbit.kernels.cpu import int8_applies

    model = tiny_model("llama")
    lowbit.quantize(model, Recipe([RTNConfig(group_size=32)]))
    ids = torch.randint(0, 256, (1, 12))
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        fast = model(ids).logits
        out = model.generate(ids, **kwargs)
        with kernels.force("exact"):
            exact = model(ids).logits
    if int8_applies(model.model.layers[0].mlp.down_proj.qweight):  # VNNI or AVX2: 12-row prompt, then rows
        assert kernels.calls["cpu-gemm-i8"] > 0 and kernels.calls["cpu-gemv-i8"] > 0
    else:  # fp32 activations: the same kernels as exact's
        assert kernels.calls["cpu-gemm-i8"] == kernels.calls["cpu-gemv-i8"] == 0 and kernels.calls["cpu-gemv"] > 0
    assert out.shape == (1, 16)
    assert ((fast - exact).norm() / exact.norm()).item() < LOWP_RTOL


@pytest.mark.parametrize("shape", [(37, 520, 9), (5, 136, 1), (130, 264, 17)])  # (out, in, rows): no tile multiples
@pytest.mark.parametrize("bits,symmetric", [(1, False), (2, True), (4, True), (4, False), (8, True)])
@pytest.mark.parametrize("granularity,group_size", [("group", 8), ("group", 24), ("group", 128), ("channel", 128),
                                                    ("tensor", 128)])
@pytest.mark.parametrize("act_bits", [8, 4])
def test_integer_gemm_of_quantized_activations_matches_the_simulated_path(auto, shape, bits, symmetric, granularity,
                                                                         group_size, act_bits):
    from lowbit.formats.act import ActQuantConfig, fake_quantize, quantize_per_token
    from lowbit.kernels.cpu import extension

    out_f, in_f, rows = shape
    qw = rtn_quantize(torch.randn(out_f, in_f), get_format("int", bits, symmetric), granularity, group_size)
    act = ActQuantConfig(bits=act_bits, clip_ratio=0.9)
    x = 3 * torch.randn(rows, in_f)
    simulated = qmatmul_reference(fake_quantize(x, act), qw)
    y = kernels.qmatmul_act(x, qw, act)
    ext = extension()
    applies = ext is not None and (bool(ext.vnni_applies(bits, qw.group_size, False))  # AVX512-VNNI, any rows
                                   or (ext.gemm_i8_tiles_built()  # AVX2: csrc/gemm_i8.cpp's tiles, any rows
                                       and bool(ext.int8_x_applies(bits, qw.group_size, False))))
    assert kernels.calls["cpu-int-gemm"] == int(applies)
    if ext is not None:
        codes, scale = ext.act_codes(x, act_bits, 0.9)
        expected = quantize_per_token(x, act)
        assert torch.equal(codes, expected.codes) and torch.equal(scale, expected.scale)  # the same rounding
    assert (y - simulated).abs().max() <= INT_GEMM_RTOL * simulated.abs().max()  # else: the simulated path itself


def test_integer_gemm_is_left_to_the_simulated_path_for_training_and_asymmetric_activations(auto):
    from lowbit.formats.act import ActQuantConfig, fake_quantize

    qw = _qweight(bits=4, symmetric=True, group_size=16)
    x = torch.randn(3, IN, requires_grad=True)
    act = ActQuantConfig(bits=8)
    kernels.qmatmul_act(x, qw, act).sum().backward()  # straight-through: the gradient of the simulated path
    x2 = x.detach().clone().requires_grad_()
    qmatmul_reference(fake_quantize(x2, act), qw).sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=FP32_RTOL, atol=FP32_ATOL)
    with torch.no_grad():
        kernels.qmatmul_act(x, qw, ActQuantConfig(bits=8, symmetric=False))
    assert kernels.calls["cpu-int-gemm"] == 0


def test_scoring_never_rounds_activations_to_int8(auto):
    """Perplexity windows and task scoring run under ``fp32_activations``: under ``auto`` no int8-activation kernel
    runs there (small batches, AVX2's many rows), so a score measures the weights; the same forward outside scoring
    does round where the format allows."""
    from conftest import tiny_model

    import lowbit
    from lowbit import Recipe, RTNConfig
    from lowbit.eval.perplexity import window_nll
    from lowbit.eval.tasks import pair_logliks
    from lowbit.kernels.cpu import int8_applies

    model = tiny_model("llama")
    lowbit.quantize(model, Recipe([RTNConfig(group_size=32)]))
    ids = torch.randint(0, 256, (1, 40))
    nll = window_nll(model, ids)
    pair_logliks(model, [([1, 2, 3], [4, 5]), ([1, 2], [7])])  # a few rows: the small-batch size
    assert kernels.calls["cpu-tiled-f32"] + kernels.calls["cpu-tiled-bf16"] > 0
    assert not [name for name in kernels.calls if name.endswith("-i8")], kernels.calls
    with kernels.force("exact"):
        assert window_nll(model, ids) == pytest.approx(nll, rel=1e-5)
    kernels.reset_counts()
    with torch.no_grad():
        model(ids)
    if int8_applies(model.model.layers[0].mlp.down_proj.qweight):  # VNNI (16 rows or fewer) or AVX2 (any number)
        assert kernels.calls["cpu-gemm-i8"] + kernels.calls["cpu-tiled-bf16"] > 0
