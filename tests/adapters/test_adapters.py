"""Adapters on packed layers: LoRA and LoRMA maths, attach/freeze/remove, forward order, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import lowbit
from lowbit import LowbitError, QLinear
from lowbit import adapters as ad
from lowbit.adapters.lorma import shifted_product
from lowbit.formats import get_format
from lowbit.formats.packing import unpack
from lowbit.quantizers.rtn import rtn_quantize
from lowbit.state import state_of

IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 0, 33]])


def _layer(out_f=48, in_f=32, bias=True) -> QLinear:
    w = torch.randn(out_f, in_f)
    return QLinear(rtn_quantize(w, get_format("int", 4, False), "group", 16), torch.randn(out_f) if bias else None)


def _perturb(module, scale=0.1):
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def _with(layer: QLinear, adapter, name="a"):
    layer.adapters = torch.nn.ModuleDict({name: adapter}) if "adapters" not in layer._modules else layer.adapters
    layer.adapters[name] = adapter
    return layer


def test_lora_starts_at_the_base_and_adds_s_B_A_x():
    layer = _layer()
    x = torch.randn(5, 32)
    base = layer(x)
    lora = ad.LoRA(ad.LoRAConfig(rank=4, alpha=8), 32, 48)
    _with(layer, lora)
    assert torch.equal(layer(x), base)  # B = 0
    _perturb(lora)
    expected = base + 2.0 * x @ (lora.B @ lora.A).t()
    assert torch.allclose(layer(x), expected, atol=1e-5)
    rs = ad.LoRA(ad.LoRAConfig(rank=4, alpha=8, rslora=True), 32, 48)
    assert rs.scale == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize("mode", ["pre", "post"])
@pytest.mark.parametrize("variant", ["rri", "shift"])
def test_lorma_is_the_identity_at_init_and_matches_the_dense_formula(mode, variant):
    layer = _layer(bias=True)
    x = torch.randn(5, 32)
    base = layer(x)
    lorma = ad.LoRMA(ad.LoRMAConfig(rank=3, alpha=5, mode=mode, variant=variant), 32, 48)
    _with(layer, lorma)
    assert torch.allclose(layer(x), base, atol=1e-5)  # both inflations start at T = I
    assert torch.allclose(lorma.transform_matrix(), torch.eye(lorma.width), atol=1e-6)
    _perturb(lorma)
    # dense reference built from the paper's equations (methods.md §6.2)
    s, A, B = lorma.scale, lorma.A.detach(), lorma.B.detach()
    if variant == "rri":
        T = torch.eye(lorma.width) + s * B @ A
    else:
        M = B @ A
        k = M.shape[0]
        cols = (torch.arange(k)[None, :] - torch.arange(k)[:, None]) % k  # π(M)[i, j] = M[i, (j - i) mod k]
        T = s * M.gather(1, cols)
    W = layer.qweight.dequantize()
    W_eff = T @ W if mode == "pre" else W @ T
    expected = x @ W_eff.t() + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-4)
    assert torch.allclose(layer.merged_weight(), W_eff, atol=1e-5)


def test_shifted_product_equals_the_dense_permuted_product():
    k, r = 37, 5
    A, B, v = torch.randn(r, k), torch.randn(k, r), torch.randn(4, k)
    M = B @ A
    cols = (torch.arange(k)[None, :] - torch.arange(k)[:, None]) % k
    dense = v @ M.gather(1, cols).t()
    assert torch.allclose(shifted_product(v, A, B), dense, atol=1e-4)


class _Shapes(TorchDispatchMode):
    """Records the element count of every tensor an op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numels: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numels.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("variant", ["rri", "shift"])
@pytest.mark.parametrize("mode", ["pre", "post"])
def test_lorma_never_materializes_a_dense_transform_or_adapted_weight(variant, mode):
    """With k = 512 and 3 tokens, a k×k transform (262,144 elements) or the adapted weight would be the largest
    tensor by far; forward + backward only make tensors of at most r·k per token (and the base's own transient
    dequantized weight, which is out×in = 512×256 and excluded by counting only adapter ops)."""
    k_out, k_in, r, tokens = 512, 256, 4, 3
    layer = _layer(out_f=k_out, in_f=k_in, bias=False)
    lorma = ad.LoRMA(ad.LoRMAConfig(rank=r, mode=mode, variant=variant), k_in, k_out)
    _with(layer, lorma)
    _perturb(lorma)
    x = torch.randn(tokens, k_in, requires_grad=True)
    width = lorma.width
    with _Shapes() as rec:
        y = lorma(torch.randn(tokens, width, requires_grad=True))
        y.square().sum().backward()
    biggest = max(n for _, n in rec.numels)
    assert biggest <= tokens * r * width  # the FFT form's (tokens, r, k) correlations at most
    assert biggest < width * width // 10  # never anything close to a k×k matrix
    # the full layer: nothing larger than the base weight (out×in), which the base kernel dequantizes transiently
    with _Shapes() as rec:
        layer(x).square().sum().backward()
    assert max(n for _, n in rec.numels) <= k_out * k_in


def test_attach_freeze_train_only_adapters_and_remove():
    model = lowbit.quantize(tiny_model("llama"), "rtn-w4g64")
    names = ad.attach(model, ad.LoRAConfig(rank=4))
    assert len(names) == 14
    ad.attach(model, ad.LoRMAConfig(rank=4, targets=("*.mlp.down_proj",)), name="mul")
    params = ad.freeze(model)
    assert {p for p in model.parameters() if p.requires_grad} == set(params)
    assert len(params) == 2 * 14 + 2 * 2
    before = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())  # packed base untouched
    assert any(p.abs().sum() > 0 for p in ad.parameters(model) if p.shape[0] != 4)  # B moved off zero
    assert ad.remove(model, "mul") == 2
    assert ad.remove(model) == 14 and not ad.adapted_layers(model)


def test_bad_input_is_refused_before_any_layer_changes():
    model = lowbit.quantize(tiny_model("llama"), "rtn-w4g64")
    with pytest.raises(LowbitError, match="matches no quantized layer"):
        ad.attach(model, ad.LoRAConfig(rank=4, targets=("*.nope",)))
    with pytest.raises(LowbitError, match="rank 64 is not below"):
        ad.attach(model, ad.LoRAConfig(rank=64))
    assert not ad.adapted_layers(model)
    ad.attach(model, ad.LoRMAConfig(rank=2))
    with pytest.raises(LowbitError, match="one per side"):
        ad.attach(model, ad.LoRMAConfig(rank=2), name="second")
    with pytest.raises(LowbitError, match="already has an adapter named"):
        ad.attach(model, ad.LoRAConfig(rank=2))  # name "default" is taken by the LoRMA
    with pytest.raises(LowbitError, match="quantize it first"):
        ad.attach(tiny_model("llama"), ad.LoRAConfig(rank=2))
    with pytest.raises(LowbitError, match="variant"):
        ad.LoRMAConfig(variant="spin")
    with pytest.raises(LowbitError, match="rank"):
        ad.LoRAConfig(rank=0)


def test_adapters_survive_save_and_load_bit_for_bit(tmp_path):
    model = lowbit.quantize(tiny_model("llama"), "rtn-w4g64")
    ad.attach(model, ad.LoRAConfig(rank=4, dropout=0.1))
    ad.attach(model, ad.LoRMAConfig(rank=3, variant="shift", targets=("*.o_proj",)), name="mul")
    _perturb(model)
    ad.freeze(model)
    _perturb(model)
    model.eval()
    path = lowbit.save(model, tmp_path / "ckpt")
    loaded, _ = lowbit.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    entry = state_of(loaded).manifest["adapters"]
    assert entry["default"]["config"]["step"] == "lora" and len(entry["default"]["layers"]) == 14
    assert entry["mul"]["config"]["variant"] == "shift" and len(entry["mul"]["layers"]) == 2
    assert len(ad.freeze(loaded)) == 2 * 14 + 2 * 2  # ready to train on


def test_gradient_reaches_the_input_without_saving_a_float_weight():
    layer = _layer(out_f=64, in_f=32, bias=False)
    x = torch.randn(3, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    assert (64, 32) not in saved  # the backward dequantizes again instead of keeping W
    y.sum().backward()
    assert torch.allclose(x.grad, layer.qweight.dequantize().sum(0).expand(3, 32), atol=1e-5)


def test_bits_summary_counts_adapter_bytes_beside_the_packed_weights():
    from lowbit.summary import bits_summary

    model = lowbit.quantize(tiny_model("llama"), "rtn-w4g64")
    before = bits_summary(model)
    assert before["adapter_bytes"] == 0
    assert before["bits_per_weight_with_adapters"] == before["bits_per_weight"]
    ad.attach(model, ad.LoRAConfig(rank=4))
    after = bits_summary(model)
    lora = sum(p.numel() * 4 for p in ad.parameters(model))  # fp32
    assert after["adapter_bytes"] == lora > 0 and after["bits_per_weight"] == before["bits_per_weight"]
    assert after["bits_per_weight_with_adapters"] == pytest.approx(
        before["bits_per_weight"] + lora * 8 / before["quantized_weights"])


def test_adapters_stored_in_bf16_count_half_the_bytes_and_train_again_in_fp32(tmp_path):
    from lowbit.summary import bits_summary

    model = lowbit.quantize(tiny_model("llama"), "rtn-w4g64")
    ad.attach(model, ad.LoRAConfig(rank=4))
    _perturb(model)  # B = 0 at attach: give the adapters values that rounding can change
    fp32 = bits_summary(model)["adapter_bytes"]
    with torch.no_grad():
        before = model(IDS).logits
    assert ad.store_adapters(model, "bfloat16") == fp32 // 4
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ad.parameters(model))
    assert bits_summary(model)["adapter_bytes"] == fp32 // 2
    with torch.no_grad():
        after = model(IDS).logits
    assert 0 < float((after - before).norm() / before.norm()) < 5e-2  # rounded (bf16 math too), not lost
    lowbit.save(model, tmp_path / "ck")
    loaded, _ = lowbit.load(tmp_path / "ck")
    assert all(p.dtype == torch.bfloat16 for p in ad.parameters(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, after)
    params = ad.freeze(loaded)  # training continues from an fp32 copy of the stored values
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    with pytest.raises(LowbitError, match="adapter_dtype must be one of"):
        ad.store_adapters(loaded, "float16")


def _codes(a) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed integer codes ``(A (r, in), B (out, r))`` of a LoRA stored as int8 or packed int4."""
    if a.code_bits == 8:
        return a.A.float(), a.B.float()
    return (unpack(a.A, 4, a.in_features).float() - 8, (unpack(a.B, 4, a.out_features).float() - 8).t())


@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_lora_stored_as_codes_counts_its_bytes_round_trips_and_trains_again_in_fp32(tmp_path, storage):
    from lowbit.summary import bits_summary

    bits = int(storage[3:])
    qmax = 2 ** (bits - 1) - 1
    model = lowbit.quantize(tiny_model("llama"), "rtn-w4g64")
    ad.attach(model, ad.LoRAConfig(rank=4))
    _perturb(model)
    weights = sum(p.numel() for p in ad.parameters(model))
    floats = {n: t.detach().clone() for n, t in model.state_dict().items() if ".adapters." in n}
    with torch.no_grad():
        before = model(IDS).logits
    assert ad.store_adapters(model, storage) == weights
    loras = [a for layer in ad.adapted_layers(model).values() for a in layer.adapters.values()]
    scales = sum(a.rank_scale.numel() for a in loras)
    assert scales == sum(a.config.rank for a in loras)  # one per rank component
    code_bytes = weights if bits == 8 else sum(  # two codes per byte, rows padded to whole bytes
        a.config.rank * (math.ceil(a.in_features / 2) + math.ceil(a.out_features / 2)) for a in loras)
    assert bits_summary(model)["adapter_bytes"] == code_bytes + 4 * scales
    for a in loras:
        assert a.code_bits == bits and a.A.dtype == {8: torch.int8, 4: torch.uint8}[bits] and not a.A.requires_grad
        qa, qb = _codes(a)
        assert qa.abs().amax(dim=1).eq(qmax).all() and qb.abs().amax(dim=0).eq(qmax).all()  # absmax grids
    for owner in {n.rsplit(".", 1)[0] for n in floats}:
        a = model.get_submodule(owner)
        A0, B0 = floats[owner + ".A"], floats[owner + ".B"]
        step_a = A0.abs().amax(dim=1, keepdim=True) / qmax  # each factor on its own grid, within half a step
        step_b = B0.abs().amax(dim=0, keepdim=True) / qmax
        qa, qb = _codes(a)
        A_hat, B_hat = qa * step_a, qb * step_b
        assert ((A_hat - A0).abs() <= step_a / 2 * (1 + 1e-6)).all()
        assert ((B_hat - B0).abs() <= step_b / 2 * (1 + 1e-6)).all()
        A, B = a.factors()  # one scale per rank component: the product of the two steps
        assert A.shape == A0.shape and B.shape == B0.shape
        assert torch.allclose(B @ A, B_hat @ A_hat, rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        after = model(IDS).logits
    assert 0 < float((after - before).norm() / before.norm()) < {8: 2e-2, 4: 0.6}[bits]  # rounded, not lost
    ad.store_adapters(model, "bfloat16")  # already stored as codes: they stay
    assert all(a.code_bits == bits for a in loras)
    lowbit.save(model, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "lowbit.json").read_text())
    assert manifest["adapters"]["default"]["storage"] == storage
    loaded, _ = lowbit.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, after)
    assert bits_summary(loaded)["adapter_bytes"] == code_bytes + 4 * scales
    params = ad.freeze(loaded)  # the stored values, as fp32 parameters that train
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, after, rtol=0, atol=1e-5)
    assert not any("rank_scale" in n for n, _ in loaded.named_buffers())


def test_int4_lora_packs_odd_widths_and_its_meta_skeleton_has_the_stored_shapes():
    lora = ad.LoRA(ad.LoRAConfig(rank=3), 7, 5)
    with torch.no_grad():
        lora.B.normal_()
    merged = lora.merge(torch.zeros(5, 7))
    lora.store_codes(4)
    assert lora.A.shape == (3, 4) and lora.B.shape == (3, 3)  # ceil(7 / 2), ceil(5 / 2) bytes per component
    assert torch.allclose(lora.merge(torch.zeros(5, 7)), merged, atol=0.2 * float(merged.abs().max()))
    with torch.device("meta"):
        skeleton = ad.LoRA(ad.LoRAConfig(rank=3), 7, 5)
        skeleton.store_codes(4)
    assert {n: (t.shape, t.dtype) for n, t in skeleton.state_dict().items()} == \
        {n: (t.shape, t.dtype) for n, t in lora.state_dict().items()}
    with pytest.raises(LowbitError, match="LoRA codes are 8 or 4 bits, got 2"):
        ad.LoRA(ad.LoRAConfig(rank=3), 7, 5).store_codes(2)


@pytest.mark.parametrize("bits", [8, 4])
def test_coded_lora_dequantizes_once_and_again_only_when_its_tensors_change(bits):
    """A decode step runs every adapter once per token: the fp32 factors of frozen codes are kept, not unpacked
    each time, and recomputed when a code or scale tensor is written in place or replaced."""
    lora = ad.LoRA(ad.LoRAConfig(rank=3), 7, 5)
    with torch.no_grad():
        lora.B.normal_()
    lora.store_codes(bits)
    first = lora.factors()
    assert all(a is b for a, b in zip(lora.factors(), first, strict=True))  # kept
    assert all(torch.equal(a, b) for a, b in zip(first, lora._dequantize(bits), strict=True))
    assert set(lora.state_dict()) == {"A", "B", "rank_scale"}  # the kept values are not state
    with torch.no_grad():
        lora.rank_scale.mul_(2)  # written in place (load_state_dict copies so)
    assert torch.equal(lora.factors()[0], 2 * first[0])
    lora.rank_scale = lora.rank_scale / 2  # replaced
    assert torch.equal(lora.factors()[0], first[0])
    lora.rank_scale = lora.rank_scale.clone()
    with torch.inference_mode():  # kept under inference mode (evaluation), then differentiated through (training)
        y0 = lora(torch.ones(2, 7))
    x = torch.ones(2, 7, requires_grad=True)
    lora(x).sum().backward()
    assert x.grad is not None and torch.equal(lora(x).detach(), y0)
    with torch.inference_mode():  # a scale replaced under inference mode has no version counter: never kept
        lora.rank_scale = lora.rank_scale.clone()
    assert torch.equal(lora.factors()[0], first[0]) and lora.factors()[0] is not lora.factors()[0]
    compiled = torch.compile(lora, fullgraph=True)  # torch.compile traces the unpacking itself: no graph break
    assert torch.allclose(compiled(torch.ones(2, 7)), y0)
    lora.unpack()  # back to fp32 parameters: nothing kept is used any more
    assert "_dequantized" not in lora.__dict__ and torch.equal(lora.A, first[0])


@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_integer_storage_is_for_lora_and_refused_for_lorma_before_anything_changes(storage):
    model = lowbit.quantize(tiny_model("llama"), "rtn-w4g64")
    ad.attach(model, ad.LoRAConfig(rank=4))
    ad.attach(model, ad.LoRMAConfig(rank=3, targets=("*.mlp.*",)), name="mul")
    with pytest.raises(LowbitError, match=f"adapter_dtype {storage} stores LoRA adapters; lorma keeps bfloat16"):
        ad.store_adapters(model, storage)
    assert all(p.dtype == torch.float32 for p in ad.parameters(model))  # nothing was converted


def test_a_manifest_with_an_unknown_adapter_storage_is_refused(tmp_path):
    model = lowbit.quantize(tiny_model("llama"), "rtn-w4g64")
    with pytest.raises(LowbitError, match="storage 'int2'; this lowbit reads float, int8 and int4"):
        ad.attach_from_manifest(model, {"default": {"config": ad.LoRAConfig(rank=2).to_dict(),
                                                    "layers": ["model.layers.0.mlp.up_proj"], "storage": "int2"}})
