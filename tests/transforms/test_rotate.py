"""The rotate step (QuaRot / QUAD) keeps the float model's function; the W4A4 path quantizes activations."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from tolerances import INT_GEMM_MODEL_MAX, INT_GEMM_MODEL_MEAN

import lowbit
from lowbit import kernels
from lowbit.errors import LowbitError
from lowbit.nn.input_transform import InputSpec, TransformedLinear
from lowbit.nn.qlinear import QLinear
from lowbit.quantizers import ActivationsConfig, GPTQConfig, RTNConfig
from lowbit.recipe import Recipe
from lowbit.state import state_of
from lowbit.transforms.quad import ResidualNorm, projection
from lowbit.transforms.rotate import RotateConfig, rotate_model

W4 = {"bits": 4, "granularity": "channel", "symmetric": True}


def _model(**overrides):
    """Tiny LLaMA (hidden 96 = 12·8, ffn 192 = 12·16) with non-trivial norm gains and a tied head."""
    m = tiny_model("llama", hidden_size=96, intermediate_size=192, num_attention_heads=6, num_key_value_heads=2,
                   tie_word_embeddings=True, **overrides)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("outliers,rotation,online", [(0, "hadamard", True), (0, "random", False),
                                                      (16, "hadamard", True), (8, "none", True)])
def test_rotated_float_model_keeps_logits(outliers, rotation, online):
    m = _model()
    ids = torch.randint(0, 256, (2, 24))
    ref = m(ids).logits
    rotate_model(m, RotateConfig(outliers=outliers, rotation=rotation, online=online),
                 windows=torch.randint(0, 256, (4, 32)))
    assert _rel(m(ids).logits, ref) < 1e-4
    assert m.get_input_embeddings().weight.shape[1] == 96 + outliers
    assert not m.config.tie_word_embeddings
    assert isinstance(m.model.layers[0].mlp.down_proj, TransformedLinear) == online
    if outliers:
        assert isinstance(m.model.norm, ResidualNorm) and m.model.norm.d == 96
        assert m.model.layers[1].self_attn.q_proj.spec.outliers == outliers


def test_projection_is_a_right_inverse_and_takes_the_top_directions():
    basis = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0]
    gram = basis @ torch.diag(torch.arange(1, 13, dtype=torch.float64)) @ basis.T
    q = projection(gram, 3)
    assert q.shape == (12, 15)
    assert torch.allclose(q @ q.T, torch.eye(12, dtype=torch.float64), atol=1e-10)
    # the outlier columns are the top-3 eigenvectors (eigenvalues 12, 11, 10), largest first
    assert torch.allclose((q[:, :3].T @ basis[:, [11, 10, 9]]).abs(), torch.eye(3, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(q[:, 3:] @ q[:, :3], torch.zeros(12, 3, dtype=torch.float64), atol=1e-10)


def test_residual_norm_divides_by_the_original_width():
    x = torch.randn(3, 10)
    expected = x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) / 8 + 1e-6)
    assert torch.allclose(ResidualNorm(8, 1e-6)(x), expected)


def _quantized(steps):
    calib = lowbit.Calibration(windows=torch.randint(0, 256, (4, 32)))
    return lowbit.quantize(_model(), Recipe(steps), calib=calib)


def test_w4a4_matmul_inputs_take_at_most_16_values_per_token(monkeypatch):
    m = _quantized([RotateConfig(outliers=16), GPTQConfig(**W4), ActivationsConfig(writer_bits=8)])
    seen = []
    real = kernels.qmatmul  # what the simulated path of qmatmul_act calls with the fake-quantized input
    monkeypatch.setattr(kernels, "qmatmul", lambda x, w: seen.append((w.shape, x.detach())) or real(x, w))
    with kernels.force("reference"):
        m(torch.randint(0, 256, (1, 20)))
    assert len(seen) == 14  # 7 quantized Linears x 2 blocks
    for shape, x in seen:
        per_token = max(len(torch.unique(row)) for row in x.reshape(-1, x.shape[-1]))
        writer = shape[0] == 112  # o_proj / down_proj write the 96 + 16 wide residual
        assert per_token <= (256 if writer else 16)
        if not writer:
            assert x.shape[-1] == 96  # the 16 outlier coordinates bypass the quantized GEMM
    layer = m.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QLinear) and layer.outlier.shape == (96, 16) and layer.spec.act.bits == 4


def test_activation_only_on_a_float_model_wraps_linears():
    m = _model()
    ids = torch.randint(0, 256, (1, 12))
    ref = m(ids).logits
    lowbit.quantize(m, Recipe([ActivationsConfig(bits=8, clip_ratio=1.0)]))
    assert isinstance(m.model.layers[0].mlp.up_proj, TransformedLinear)
    assert 0 < _rel(m(ids).logits, ref) < 0.05  # int8 activations: close but not identical


def test_quad_checkpoint_round_trip(tmp_path):
    m = _quantized([RotateConfig(outliers=16), RTNConfig(**W4), ActivationsConfig()])
    ids = torch.randint(0, 256, (1, 16))
    ref = m(ids).logits
    lowbit.save(m, tmp_path / "ck")
    loaded, _ = lowbit.load(tmp_path / "ck")
    assert torch.equal(loaded(ids).logits, ref)
    summary = state_of(loaded).manifest["summary"]
    outliers = [mod.outlier for mod in loaded.modules() if isinstance(mod, QLinear) and mod.outlier is not None]
    assert len(outliers) == 10  # q, k, v, gate, up in 2 blocks
    assert summary["outlier_bytes"] == sum(o.numel() * o.element_size() for o in outliers)
    assert summary["bits_per_weight"] > 4  # the float outlier columns count


def test_saving_a_rotated_float_model_is_refused(tmp_path):
    m = _model()
    rotate_model(m, RotateConfig())
    with pytest.raises(LowbitError, match="weight quantizer"):
        lowbit.save(m, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_unsupported_width_names_it_and_the_fallback():
    m = tiny_model("llama", hidden_size=92, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(LowbitError, match=r"92.*rotation=\"random\""):
        rotate_model(m, RotateConfig(online=False))
    m = tiny_model("llama", hidden_size=92, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    ids = torch.randint(0, 256, (1, 12))
    ref = m(ids).logits
    rotate_model(m, RotateConfig(rotation="random", online=False))  # the fallback works at any width
    assert _rel(m(ids).logits, ref) < 1e-4


def test_rotate_must_come_first():
    m = _model()
    lowbit.quantize(m, Recipe([RTNConfig(**W4)]))
    with pytest.raises(LowbitError, match="first"):
        rotate_model(m, RotateConfig())


def test_input_spec_round_trips_through_a_dict():
    spec = InputSpec(hadamard=True, outliers=4, act=lowbit.quantizers.ActQuantConfig(bits=8))
    assert InputSpec.from_dict(spec.to_dict()) == spec


def test_quad_checkpoint_loads_through_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    m = _quantized([RotateConfig(outliers=16), RTNConfig(**W4), ActivationsConfig(writer_bits=8)])
    ids = torch.randint(0, 256, (1, 16))
    ref = m(ids).logits
    lowbit.save(m, tmp_path / "ck")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert torch.equal(hf(ids).logits, ref)


def test_quad_peft_trains_outlier_columns_and_channel_scales_and_saves_them_folded(tmp_path):
    from lowbit.adapters import train_outliers
    from lowbit.train import TrainConfig, train
    from lowbit.train.data import TrainData

    m = _quantized([RotateConfig(outliers=16), RTNConfig(**W4), ActivationsConfig()])
    bits = lowbit.summary.bits_summary(m)["bits_per_weight"]
    layer = m.model.layers[0].mlp.up_proj
    before = layer.outlier.detach().clone()
    codes, scales = layer.codes.clone(), layer.scales.clone()
    for p in m.parameters():
        p.requires_grad_(False)
    outliers = 2 * 16 * (96 + 32 + 32 + 192 + 192)  # q, k, v, gate, up rows x r, 2 blocks
    rows = 2 * (96 + 32 + 32 + 112 + 192 + 192 + 112)  # every packed weight's rows (writers: 96 + 16 wide)
    assert train_outliers(m) == outliers + rows
    ids = torch.randint(0, 256, (8, 32))
    result = train(m, TrainData(ids, ids.clone(), "random"), TrainConfig(steps=3, batch=2, lr=1e-2), progress=False)
    assert result.steps == 3
    assert not torch.equal(layer.outlier, before) and torch.equal(layer.codes, codes)
    assert not torch.equal(layer.channel_scale, torch.ones_like(layer.channel_scale))
    assert torch.equal(layer.scales, scales)  # trained beside the packed scales, folded only when saved
    lowbit.save(m, tmp_path / "ck")
    loaded, _ = lowbit.load(tmp_path / "ck")
    lq = loaded.model.layers[0].mlp.up_proj
    assert lq.channel_scale is None and lq.outlier.dtype == torch.float16
    assert torch.equal(lq.scales, (scales.float() * layer.channel_scale.detach()[:, None]).half())
    assert state_of(loaded).manifest["summary"]["bits_per_weight"] == pytest.approx(bits)  # nothing added
    with torch.no_grad():  # the trained model with its scales folded and outliers in fp16 by hand = the checkpoint
        for q in m.modules():
            if isinstance(q, QLinear):
                q.scales = (q.scales.float() * q.channel_scale[:, None]).half()
                q.channel_scale = None
                q.outlier = None if q.outlier is None else torch.nn.Parameter(q.outlier.half())
        assert torch.equal(loaded(ids[:1]).logits, m(ids[:1]).logits)


def test_quad_peft_composes_with_lora_adapters():
    from lowbit import adapters as ad
    from lowbit.adapters import train_outliers

    m = _quantized([RotateConfig(outliers=16), RTNConfig(**W4), ActivationsConfig(writer_bits=8)])
    ad.attach(m, ad.LoRAConfig(rank=4))
    ad.freeze(m)
    train_outliers(m)
    trainable = {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"A", "B", "outlier", "channel_scale"}
    m(torch.randint(0, 256, (2, 16))).logits.float().pow(2).mean().backward()
    layer = m.model.layers[0].self_attn.q_proj
    lora_b = layer.adapters["default"].B  # B starts at 0, so only B (not A) gets a gradient on the first step
    assert all(g is not None and g.abs().sum() > 0 for g in (layer.outlier.grad, layer.channel_scale.grad, lora_b.grad))


def test_channel_scales_fold_into_the_merged_weight():
    from lowbit.adapters import train_outliers

    m = _quantized([RotateConfig(outliers=16), RTNConfig(**W4), ActivationsConfig()])
    train_outliers(m)
    layer = m.model.layers[1].self_attn.o_proj
    before = layer.merged_weight()
    with torch.no_grad():
        layer.channel_scale.copy_(torch.linspace(0.5, 1.5, layer.out_features))
    assert torch.allclose(layer.merged_weight(), before * torch.linspace(0.5, 1.5, layer.out_features)[:, None],
                          atol=1e-6)


def test_cli_finetune_trains_outliers_of_a_quad_checkpoint(tmp_path, hf_folder):
    from test_cli import invoke, one_error_line, one_json_object

    model, tok = lowbit.load_model(hf_folder)
    recipe = Recipe([RotateConfig(outliers=8, samples=4, seq_len=64), RTNConfig(**W4), ActivationsConfig()])
    lowbit.quantize(model, recipe, calib=lowbit.Calibration(tokenizer=tok))
    ck = lowbit.save(model, tmp_path / "quad", tokenizer=tok)
    out = one_json_object(invoke("finetune", ck, "--out", tmp_path / "ft", "--adapter", "none", "--train-outliers",
                                 "--steps", "2", "--seq-len", "32", "--json"))
    rows = 2 * (64 + 32 + 32 + 72 + 128 + 128 + 72)  # one channel scale per packed row (writers: 64 + 8 wide)
    assert out["outlier_weights"] == 2 * 8 * (64 + 32 + 32 + 128 + 128) + rows and out["steps"] == 2
    tuned, _ = lowbit.load(tmp_path / "ft")
    q = "model.layers.0.self_attn.q_proj.outlier"
    assert not torch.equal(tuned.state_dict()[q], model.state_dict()[q])
    assert "trains nothing" in one_error_line(invoke("finetune", ck, "--out", tmp_path / "x", "--adapter", "none"))


def test_norms_that_are_not_what_the_table_says_are_refused():
    m = tiny_model("llama")
    m.model.layers[0].input_layernorm.weight.data += 1.0  # fine: any gain folds
    rotate_model(copy.deepcopy(m), RotateConfig())
    norm = m.model.layers[0].post_attention_layernorm
    norm.forward = lambda x: x * norm.weight  # not x / rms(x): nothing to fold into
    with pytest.raises(LowbitError, match="computes something else"):
        rotate_model(m, RotateConfig())


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "olmo2"])
@pytest.mark.parametrize("outliers", [0, 8])
def test_post_norm_families_rotate_exactly(arch, outliers):
    """Their post-norms' gains act on the stream elementwise: the writers stay unrotated and each post-norm's output
    is rotated online, so QuaRot and QUAD keep the function."""
    from lowbit.transforms.quad import RotatedPostNorm

    m = tiny_model(arch, hidden_size=96, intermediate_size=192, num_attention_heads=6, num_key_value_heads=2)
    ids = torch.randint(0, 256, (1, 16))
    ref = m(ids).logits
    rotate_model(m, RotateConfig(outliers=outliers), windows=torch.randint(0, 256, (2, 16)))
    posts = [x for x in m.modules() if isinstance(x, RotatedPostNorm)]
    assert len(posts) == 2 * m.config.num_hidden_layers and len({p.rotation.data_ptr() for p in posts}) == 1
    assert _rel(m(ids).logits, ref) < 1e-4


def test_a_step_the_table_says_a_family_cannot_take_names_family_step_and_reason(monkeypatch):
    import dataclasses

    from lowbit import architectures

    llama = architectures.BY_MODEL_TYPE["llama"]
    monkeypatch.setitem(architectures.BY_MODEL_TYPE, "llama",
                        dataclasses.replace(llama, refusals={"rotate": "its norms are not what they seem"}))
    with pytest.raises(LowbitError, match=r"^the rotate step cannot run on llama: its norms are not what they seem; "
                                          r"drop it from the recipe$"):
        rotate_model(tiny_model("llama"), RotateConfig())


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma"])  # gemma: its (1 + γ) norms fold as well
def test_other_llama_style_models_rotate_exactly(arch):
    m = tiny_model(arch, hidden_size=96, intermediate_size=192, num_attention_heads=6, num_key_value_heads=2)
    ids = torch.randint(0, 256, (1, 16))
    ref = m(ids).logits
    rotate_model(m, RotateConfig(outliers=8), windows=torch.randint(0, 256, (2, 16)))
    assert _rel(m(ids).logits, ref) < 1e-4


def test_w4a8_layers_run_the_integer_gemm_and_match_the_simulated_path(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "auto")
    m = _quantized([RotateConfig(outliers=16), GPTQConfig(**W4), ActivationsConfig(bits=8)])
    ids = torch.randint(0, 256, (2, 21))
    with kernels.force("reference"):
        simulated = m(ids).logits
    kernels.reset_counts()
    with torch.no_grad():
        real = m(ids).logits
        one_row = m(ids[:1, :1]).logits  # a decode step goes through the same integer GEMM
    qweight = m.model.layers[0].self_attn.q_proj.qweight
    if not kernels.cpu.act_gemm_applies(torch.zeros(1, qweight.in_features), qweight):
        pytest.skip("no AVX512-VNNI or AVX2 build of the kernel here")
    assert kernels.calls["cpu-int-gemm"] == 28  # 7 quantized Linears x 2 blocks x 2 calls
    scale = simulated.abs().max()
    assert (real - simulated).abs().max() <= INT_GEMM_MODEL_MAX * scale  # a rare code flips; see tolerances
    assert (real - simulated).abs().mean() <= INT_GEMM_MODEL_MEAN * scale
    assert (one_row - simulated[:1, :1]).abs().max() <= INT_GEMM_MODEL_MAX * scale
