import torch
import pytest

from oboro.oboro_model import MMHDiT, preset
from oboro.oboro_model.rope import apply_rope, rope_freqs


def randomized(cfg, seed=0):
    torch.manual_seed(seed)
    m = MMHDiT(cfg)
    for p in m.parameters():  # no zero-init gates: every path must contribute
        torch.nn.init.normal_(p, std=0.1)
    return m.eval()


def test_rope_matches_comfyui_flux_embednd():
    from comfy.ldm.flux.layers import EmbedND
    from comfy.ldm.flux.math import apply_rope as comfy_apply_rope
    dims, theta = (8, 12, 12), 10000.0
    ids = torch.stack([torch.arange(20.0), torch.randint(0, 7, (20,)).float(), torch.randint(0, 9, (20,)).float()], -1)
    q, k = torch.randn(2, 20, 3, 32), torch.randn(2, 20, 3, 32)
    ours_q, ours_k = apply_rope(q, k, rope_freqs(ids, dims, theta))
    pe = EmbedND(dim=32, theta=theta, axes_dim=list(dims))(ids[None])  # [1, 1, L, D/2, 2, 2]
    ref_q, ref_k = comfy_apply_rope(q.transpose(1, 2), k.transpose(1, 2), pe)
    torch.testing.assert_close(ours_q, ref_q.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_k, ref_k.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_output_shape_and_finite():
    m = randomized(preset("tiny", in_channels=16))
    out = m(torch.randn(2, 16, 8, 12), torch.rand(2), torch.randn(2, 5, 32), torch.ones(2, 5))
    assert out.shape == (2, 16, 8, 12) and torch.isfinite(out).all()


def test_batched_padded_prompts_equal_one_by_one():
    m = randomized(preset("tiny", in_channels=16))
    x, t = torch.randn(3, 16, 6, 10), torch.rand(3)
    lens = [2, 7, 4]
    text = torch.randn(3, 7, 32)
    mask = torch.zeros(3, 7)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    batched = m(x, t, text, mask)
    for i, n in enumerate(lens):
        single = m(x[i:i + 1], t[i:i + 1], text[i:i + 1, :n], torch.ones(1, n))
        torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=1e-5)


def test_padding_changes_output_if_unmasked():
    """Guards the test above: without the mask, padding tokens do change the result."""
    m = randomized(preset("tiny", in_channels=16))
    x, t, text = torch.randn(1, 16, 4, 4), torch.rand(1), torch.randn(1, 5, 32)
    masked = m(x, t, text, torch.tensor([[1, 1, 0, 0, 0]]))
    unmasked = m(x, t, text, None)
    assert (masked - unmasked).abs().max() > 1e-3


def test_empty_prompt_is_valid():
    m = randomized(preset("tiny", in_channels=16))
    out = m(torch.randn(1, 16, 4, 4), torch.rand(1), torch.zeros(1, 0, 32), torch.zeros(1, 0))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("hw", [(2, 2), (4, 14), (10, 6)])
def test_any_size_multiple_of_patch(hw):
    m = randomized(preset("tiny", in_channels=3))
    assert m(torch.randn(1, 3, *hw), torch.rand(1), torch.randn(1, 3, 32)).shape == (1, 3, *hw)


def test_size_not_multiple_of_patch_is_clear_error():
    m = randomized(preset("tiny", in_channels=3))
    with pytest.raises(ValueError, match="multiples of patch_size 2, got 5x4"):
        m(torch.randn(1, 3, 5, 4), torch.rand(1), torch.randn(1, 3, 32))


def test_gradient_checkpointing_same_values_and_grads():
    m = randomized(preset("tiny", in_channels=3)).train()
    args = (torch.randn(2, 3, 4, 4), torch.rand(2), torch.randn(2, 3, 32), torch.ones(2, 3))
    out_a = m(*args)
    grads_a = torch.autograd.grad(out_a.square().mean(), list(m.parameters()))
    m.gradient_checkpointing = True
    out_b = m(*args)
    grads_b = torch.autograd.grad(out_b.square().mean(), list(m.parameters()))
    torch.testing.assert_close(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b)


def test_text_and_time_both_matter():
    m = randomized(preset("tiny", in_channels=3))
    x, text = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 32)
    base = m(x, torch.tensor([0.3]), text)
    assert (base - m(x, torch.tensor([0.7]), text)).abs().max() > 1e-4
    assert (base - m(x, torch.tensor([0.3]), torch.randn(1, 3, 32))).abs().max() > 1e-4


def test_initialize_weights_zero_output():
    """DiT-style init: zeroed output layer, so an untrained model predicts zero velocity."""
    m = MMHDiT(preset("tiny", in_channels=3)).initialize_weights()
    out = m(torch.randn(1, 3, 4, 4), torch.rand(1), torch.randn(1, 3, 32))
    assert out.abs().max() == 0
