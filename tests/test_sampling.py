"""The float model's own text: the categorical draw, the bf16 weights while it samples."""

from __future__ import annotations

import torch
from conftest import ByteTokenizer, tiny_model

from lowbit.sampling import CategoricalDraw, bf16_linear_weights, generated_windows


def test_the_draw_follows_the_softmax_and_never_picks_a_banned_token():
    scores = torch.tensor([2.0, 0.5, -1.0, 3.0, 1.0, -30.0])  # id 3 is the likeliest and banned
    probs = torch.softmax(scores, -1)
    probs[3] = 0
    probs /= probs.sum()
    rows = 40_000
    draw = CategoricalDraw(torch.Generator().manual_seed(0), banned=[3])
    out = draw(torch.zeros(rows, 1, dtype=torch.long), scores.expand(rows, -1).clone())
    assert out.shape == (rows, 6) and out.dtype == scores.dtype
    assert ((out == 0).sum(-1) == 1).all() and (torch.isinf(out).sum(-1) == 5).all()  # one finite entry a row
    counts = torch.bincount(out.argmax(-1), minlength=6).double()
    assert counts[3] == 0
    se = (probs * (1 - probs) / rows).sqrt()
    assert ((counts / rows - probs).abs() <= 5 * se + 1e-12).all(), (counts / rows, probs)


def test_the_draw_is_seeded():
    scores = torch.randn(64, 50)
    a = CategoricalDraw(torch.Generator().manual_seed(7), [])(None, scores.clone()).argmax(-1)
    b = CategoricalDraw(torch.Generator().manual_seed(7), [])(None, scores.clone()).argmax(-1)
    c = CategoricalDraw(torch.Generator().manual_seed(8), [])(None, scores.clone()).argmax(-1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bf16_weights_give_autocasts_products_and_are_put_back():
    model = tiny_model("llama").eval()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    ids = torch.randint(0, 256, (2, 12))
    before = {name: p for name, p in model.named_parameters()}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(ids).logits
        with bf16_linear_weights(model):
            assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
            assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32  # only Linear weights
            swapped = model(ids).logits
    assert torch.equal(reference, swapped)
    assert all(p is before[name] for name, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.float32
    with bf16_linear_weights(model, enabled=False):
        assert model.lm_head.weight.dtype == torch.float32


def test_generated_text_runs_every_sequence_to_its_full_length():
    model = tiny_model("llama")
    tok = ByteTokenizer()
    def favour_the_end(module, args, logits):  # the end-of-text token the model's favourite: never drawn still
        logits[..., tok.eos_token_id] += 50.0
        return logits

    handle = model.lm_head.register_forward_hook(favour_the_end)
    flat = generated_windows(model, tok, n=2, seq_len=48, seed=0, tokens_per_sequence=23, batch=3).reshape(-1)
    handle.remove()
    starts = flat[::24]
    assert (starts == tok.eos_token_id).all()  # every 24th id is a sequence's start token
    sampled = torch.cat([flat[i + 1:i + 24] for i in range(0, len(flat), 24)])
    assert len(sampled) == 96 - len(starts) and not (sampled == tok.eos_token_id).any()
