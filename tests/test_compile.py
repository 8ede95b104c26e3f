"""The compiled decode step (lowbit.nn.compile): same greedy tokens as eager on a packed tiny model, with the
packed layers as opaque kernel calls."""

from __future__ import annotations

import torch
from conftest import tiny_model

import lowbit
from lowbit import Recipe, RTNConfig, kernels
from lowbit.nn import compile as compiled_step


def test_compiled_decode_matches_eager_greedy_tokens():
    model = tiny_model("llama")
    lowbit.quantize(model, Recipe([RTNConfig(group_size=32)]))
    ids = torch.randint(0, 256, (1, 6))
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        eager = model.generate(ids, **kwargs)
        compiled_step.compile_decode(model)
        plans = [m.__dict__.get("decode_plan") for m in model.modules() if isinstance(m, lowbit.QLinear)]
        assert plans and all(p is not None for p in plans)  # every packed layer decodes through lowbit::qgemv
        assert model.generation_config.cache_implementation == "static"
        kernels.reset_counts()
        out = model.generate(ids, **kwargs)
    assert torch.equal(out, eager)
    # the prompt pass (6 rows) ran the counted Python op; the 3 decode steps ran the uncounted C++ op
    assert kernels.calls["cpu-gemv"] == 0 and sum(kernels.calls.values()) == len(plans)
