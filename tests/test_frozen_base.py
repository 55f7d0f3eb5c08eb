"""A LoRA's frozen base in its storage dtype (oboro_model/training/frozen_base.py): the same numbers
as an fp32 copy of the same (rounded) weights, no wide copy of any weight kept for backward, scaled
fp8 dequantised per layer. The node and CLI side: tests/test_train_equivalence.py."""
from __future__ import annotations

import pytest
import torch

from oboro.oboro_model.training.cli import lora_spec
from oboro.oboro_model.training.frozen_base import frozen_base_model, linear_dtype, linear_weight_keys
from oboro.oboro_model.training.lora import add_lora
from tiny import tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_pair(dtype):
    """The same weights as `dtype` storage and as an fp32 copy of those stored values, with the same
    random LoRA (B non-zero so the adapter path counts)."""
    ref = tiny_dit(seed=2)
    linear = linear_weight_keys(ref)
    stored = {k: v.to(dtype) if k in linear else v for k, v in ref.state_dict().items()}
    narrow = frozen_base_model(ref.config, stored)
    wide = frozen_base_model(ref.config, {k: v.float() for k, v in stored.items()})
    for m in (narrow, wide):
        add_lora(m, 4, 4.0, targets="all", seed=1)
    g = torch.Generator().manual_seed(0)
    for p_n, p_w in zip(narrow.parameters(), wide.parameters()):
        if p_n.requires_grad:
            p_n.data.normal_(0, 0.02, generator=g)
            p_w.data.copy_(p_n.data)
    return narrow, wide


def step(model, amp: bool):
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, generator=g)
    text = torch.randn(2, 5, model.config.text_dim, generator=g)
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        out = model(x, t, text)
    out.float().square().mean().backward()
    return out.float(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_narrow_base_equals_an_fp32_copy_of_it(dtype):
    narrow, wide = lora_pair(dtype)
    assert linear_dtype(narrow) == dtype and linear_dtype(wide) == torch.float32
    assert all(p.dtype == torch.float32 for p in narrow.parameters() if p.requires_grad)
    for amp, tol in ((False, 1e-5), (True, 0.0)):  # fp32: up to matmul blocking; bf16: the same casts
        (o1, g1), (o2, g2) = step(narrow, amp), step(wide, amp)
        assert (o1 - o2).abs().max().item() <= tol * max(1.0, o2.abs().max().item())
        assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) <= tol


def test_backward_keeps_no_wide_copy_of_a_frozen_weight():
    """Autograd saves only the narrow weight itself (re-cast in backward); an fp32 copy per layer
    would be a whole fp32 model alive over the forward pass."""
    narrow, _ = lora_pair(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in narrow.parameters()}
    wide_weights = {tuple(m.weight.shape) for m in narrow.modules() if isinstance(m, torch.nn.Linear)
                    and not m.weight.requires_grad and m.weight.numel() > 1000}
    copies = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and t.dtype == torch.float32 and tuple(t.shape) in wide_weights:
            copies.append(tuple(t.shape))
        return t
    x, t = torch.randn(2, 16, 8, 8), torch.rand(2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        narrow(x, t, torch.randn(2, 5, narrow.config.text_dim)).sum()
    assert copies == []


def test_scaled_fp8_weights_are_dequantised_per_layer():
    ref = tiny_dit(seed=3)
    sd, scales, linear = {}, {}, linear_weight_keys(ref)
    for k, v in ref.state_dict().items():
        if k in linear:
            s = v.abs().max() / 448.0
            sd[k], scales[k] = (v / s).to(torch.float8_e4m3fn), s
        else:
            sd[k] = v
    fp8 = frozen_base_model(ref.config, sd, scales=scales)
    deq = frozen_base_model(ref.config, {k: v.float() * scales[k] if k in scales else v for k, v in sd.items()})
    x, t, text = torch.randn(1, 16, 8, 8), torch.rand(1), torch.randn(1, 4, ref.config.text_dim)
    with torch.no_grad():
        torch.testing.assert_close(fp8(x, t, text), deq(x, t, text), atol=1e-5, rtol=1e-5)
    # re-stored in bf16: dequantised first, the scale not applied twice
    bf = frozen_base_model(ref.config, sd, torch.bfloat16, scales=scales)
    with torch.no_grad():
        torch.testing.assert_close(bf(x, t, text), deq(x, t, text), atol=2e-2, rtol=2e-2)


def test_unknown_base_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="base_dtype 'int8'.*bf16"):
        lora_spec({"rank": 4, "base_dtype": "int8"})
