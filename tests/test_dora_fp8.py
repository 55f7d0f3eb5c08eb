"""DoRA on an fp8 frozen base (issue #26 §5): plain fp8_e4m3fn / fp8_e5m2 used to fail inside peft
with "Promotion for Float8 Types is not supported". add_adapter now dequantises the targeted fp8
layers to bf16 (exact: every fp8 value is a bf16 value) and trains as on an fp32 copy of them."""
from __future__ import annotations

import pytest
import torch

from oboro.oboro_model.training.adapters import add_adapter, adapter_state_dict
from oboro.oboro_model.training.frozen_base import frozen_base_model, linear_weight_keys
from tiny import tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")


def run(model):
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, generator=g)
    text = torch.randn(2, 5, model.config.text_dim, generator=g)
    model.zero_grad()
    out = model(x, t, text)
    out.square().mean().backward()
    return out.detach(), [p.grad for p in model.parameters() if p.requires_grad]


def pair(stored, scales=None):
    """`stored` as a frozen base and as an fp32 copy of its (dequantised) values, same random DoRA."""
    deq = {k: v.float() * scales[k] if scales and k in scales else v.float() for k, v in stored.items()}
    narrow = frozen_base_model(tiny_dit().config, stored, scales=scales)
    wide = frozen_base_model(tiny_dit().config, deq)
    for m in (narrow, wide):
        add_adapter(m, "dora", 4, 4.0, targets="attn", seed=1)
    g = torch.Generator().manual_seed(0)
    for p_n, p_w in zip(narrow.parameters(), wide.parameters()):
        if p_n.requires_grad:
            p_n.data.add_(torch.randn(p_n.shape, generator=g) * 0.02)
            p_w.data.copy_(p_n.data)
    return narrow, wide


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_dora_trains_on_a_plain_fp8_base_like_on_an_fp32_copy(dtype):
    ref = tiny_dit(seed=2)
    linear = linear_weight_keys(ref)
    stored = {k: v.to(dtype) if k in linear else v for k, v in ref.state_dict().items()}
    narrow, wide = pair(stored)
    qkv = narrow.blocks[0].attn.qkv.get_base_layer()
    assert qkv.weight.dtype == torch.bfloat16 and not qkv.weight.requires_grad  # targeted: widened
    assert narrow.blocks[0].mlp.w1.weight.dtype == dtype  # not targeted: still fp8
    (o1, g1), (o2, g2) = run(narrow), run(wide)
    assert torch.isfinite(o1).all() and all(torch.isfinite(g).all() for g in g1)
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-4)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    e1, e2 = adapter_state_dict(narrow), adapter_state_dict(wide)
    assert e1.keys() == e2.keys() and any(k.endswith(".dora_scale") for k in e1)
    for k in e1:
        torch.testing.assert_close(e1[k], e2[k], atol=1e-5, rtol=1e-4)


def test_dora_on_a_scaled_fp8_base_applies_the_scale_once():
    ref = tiny_dit(seed=3)
    sd, scales, linear = {}, {}, linear_weight_keys(ref)
    for k, v in ref.state_dict().items():
        if k in linear:
            s = v.abs().max() / 448.0
            sd[k], scales[k] = (v / s).to(torch.float8_e4m3fn), s
        else:
            sd[k] = v
    narrow, wide = pair(sd, scales)
    assert narrow.blocks[1].attn.qkv.get_base_layer().weight_scale is None
    assert narrow.blocks[1].mlp.w1.weight_scale is not None
    (o1, g1), (o2, g2) = run(narrow), run(wide)
    # bf16 holds fp8 * scale to 8 bits of mantissa: close, not equal
    torch.testing.assert_close(o1, o2, atol=2e-2, rtol=2e-2)
    e1, e2 = adapter_state_dict(narrow), adapter_state_dict(wide)
    for k in e1:
        torch.testing.assert_close(e1[k], e2[k], atol=2e-2, rtol=2e-2)
