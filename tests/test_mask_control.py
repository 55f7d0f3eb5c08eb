"""Mask + text control (oboro_model.mask_control): cached static path == recomputed, the three
condition modes, strength, adapter files, mask resizing and label errors, frozen base training."""
from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

from oboro.oboro_model.mask_control import (MaskAdapterConfig, MaskControlDiT, MaskedLatents,
                                            labels_to_grid, load_mask_adapter, palette_to_labels,
                                            region_mask_to_labels, save_mask_adapter)
from oboro.samplers.ode import solve, time_grid
from tiny import tiny_dit

K, B, LAT, PIX = 5, 2, 8, 64  # labels, batch, latent side, pixel side (vae_scale 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def make(decoupled=True, seed=0, **kw):
    """Tiny random base; adapter weights random too (LoRA up is 0 at init), so every path counts."""
    m = MaskControlDiT(tiny_dit(seed, in_channels=4), MaskAdapterConfig(num_labels=K, decoupled=decoupled, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, LAT, LAT, generator=g)
    text = torch.randn(B, 5, 32, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.randint(0, K, (B, PIX, PIX), generator=g)
    return x, torch.tensor([0.3, 0.7]), text, text_mask, labels


@pytest.mark.parametrize("static_t,image_rank", [(None, 0), (0.5, 0), (None, 4)])
def test_cached_static_path_equals_recompute_each_step(static_t, image_rank):
    m = make(static_t=static_t, image_rank=image_rank)
    x, _, text, tm, labels = inputs()
    with torch.no_grad():
        cache = m.precompute_static(text, tm, labels, B, size=(LAT, LAT))
        ts = time_grid(3)
        cached = solve(lambda z, t: m(z, torch.full((B,), t), text, tm, labels, static_cache=cache), x, ts, "heun")
        fresh = solve(lambda z, t: m(z, torch.full((B,), t), text, tm, labels), x, ts, "heun")
    assert (cached - fresh).abs().max().item() <= 1e-5
    # a prompt given once ([1, L]) is expanded to the batch like the sampler's conds
    with torch.no_grad():
        c1 = m.precompute_static(text[:1], tm[:1], labels[:1], B, size=(LAT, LAT))
        u1 = m(x, torch.full((B,), 0.5), text[:1].expand(B, -1, -1), tm[:1].expand(B, -1), labels[:1], static_cache=c1)
        u2 = m(x, torch.full((B,), 0.5), text[:1], tm[:1], labels[:1].expand(B, -1, -1))
    assert (u1 - u2).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="rebuild"):
        m(x[:1], torch.tensor([0.5]), text[:1], tm[:1], labels[:1], static_cache=cache)


@pytest.mark.parametrize("decoupled", [True, False])
def test_mask_only_text_only_and_both_run(decoupled):
    m = make(decoupled)
    x, t, text, tm, labels = inputs()
    empty = torch.zeros(B, 0, 32)
    with torch.no_grad():
        outs = {"mask only": m(x, t, empty, None, labels),
                "mask only (masked prompt)": m(x, t, text, torch.zeros_like(tm), labels),
                "text only": m(x, t, text, tm, None),
                "both": m(x, t, text, tm, labels)}
    for name, u in outs.items():
        assert u.shape == x.shape and torch.isfinite(u).all(), name
    assert not torch.allclose(outs["both"], outs["text only"])
    assert not torch.allclose(outs["both"], outs["mask only"])


def test_holistic_without_mask_is_the_base_model_exactly():
    m = make(decoupled=False)
    x, t, text, tm, labels = inputs()
    with torch.no_grad():
        ref = m.base(x, t, text, tm)
        assert torch.equal(m(x, t, text, tm, None), ref)
        dropped = m(x, t, text, tm, labels, mask_keep=torch.zeros(B, dtype=torch.bool))
    assert (dropped - ref).abs().max().item() <= 1e-5
    # decoupled and holistic are different computations (the text pathway is static)
    m.decoupled = True
    with torch.no_grad():
        assert not torch.allclose(m(x, t, text, tm, None), ref)
    # an image-stream LoRA changes the image pathway even without a mask
    with torch.no_grad():
        assert not torch.allclose(make(decoupled=False, image_rank=4)(x, t, text, tm, None), ref)


@pytest.mark.parametrize("decoupled", [True, False])
def test_strength_zero_is_no_mask(decoupled):
    m = make(decoupled)
    x, t, text, tm, labels = inputs()
    with torch.no_grad():
        no_mask = m(x, t, text, tm, None)
        full = m(x, t, text, tm, labels)
        m.strength = 0.0
        off = m(x, t, text, tm, labels)
        m.strength = 0.5
        half = m(x, t, text, tm, labels)
    assert (off - no_mask).abs().max().item() <= 1e-5
    assert not torch.allclose(full, no_mask) and not torch.allclose(half, full)
    m.strength = -1.0
    with pytest.raises(ValueError, match="strength"):
        m(x, t, text, tm, labels)


@pytest.mark.parametrize("decoupled", [True, False])
def test_empty_prompt_is_read_as_no_tokens(decoupled):
    """A "no_tokens" adapter (trained with dropped text = no tokens) reads T5's empty prompt (EOS
    alone: one valid token) as no text, per row, so ComfyUI's empty prompt reaches the trained
    mask-only path; an "empty_prompt" adapter uses the encoded empty prompt as given."""
    m = make(decoupled)
    assert m.cfg.dropped_text == "no_tokens"
    x, t, text, tm, labels = inputs()
    eos = torch.zeros(B, 5, dtype=torch.bool)
    eos[:, 0] = True  # row = the empty prompt padded to the batch's text length
    mixed = torch.stack([eos[0], tm[1]])  # row 0 empty, row 1 a real prompt
    with torch.no_grad():
        none = m(x, t, text[:, :0], tm[:, :0], labels)
        assert (m(x, t, text, eos, labels) - none).abs().max().item() <= 1e-5
        assert (m(x, t, text[:, :1], None, labels) - none).abs().max().item() <= 1e-5  # unmasked, one token
        both = m(x, t, text, mixed, labels)
        assert (both[0] - none[0]).abs().max().item() <= 1e-5
        assert (both[1] - m(x, t, text, tm, labels)[1]).abs().max().item() <= 1e-5
        m.cfg = dataclasses.replace(m.cfg, dropped_text="empty_prompt")
        assert (m(x, t, text, eos, labels) - none).abs().max().item() > 1e-3


def test_adapter_config_dropped_text():
    assert MaskAdapterConfig.from_dict({"num_labels": 3}).dropped_text == "empty_prompt"  # files from before it
    assert MaskAdapterConfig(num_labels=3).dropped_text == "no_tokens"
    with pytest.raises(ValueError, match="dropped_text must be one of.*'nothing'"):
        MaskAdapterConfig(num_labels=3, dropped_text="nothing")


def test_adapter_save_load_round_trip(tmp_path):
    m = make(image_rank=4)
    x, t, text, tm, labels = inputs()
    path = save_mask_adapter(tmp_path / "sub" / "mask.safetensors", m)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    base = copy.deepcopy(m.base)
    loaded = load_mask_adapter(path, base).eval()
    assert loaded.cfg == m.cfg
    sd, got = m.adapter_state_dict(), loaded.adapter_state_dict()
    assert sd.keys() == got.keys() and all(torch.equal(sd[k], got[k]) for k in sd)  # the weights: exact
    with torch.no_grad():  # outputs of two separately built models: equal up to float rounding
        torch.testing.assert_close(loaded(x, t, text, tm, labels), m(x, t, text, tm, labels), atol=1e-6, rtol=1e-5)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("base.")]
        assert [k for k in f.keys() if k.startswith("image_adapters.")]
        assert "oboro_mask_adapter" in f.metadata() and "oboro_base_config" in f.metadata()
    from oboro.oboro_model import MMHDiT, preset
    other = MMHDiT(preset("tiny", in_channels=4, text_dim=32, hidden_size=32, heads=(1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"mask\.safetensors.*hidden_size: adapter 64 vs base 32"):
        load_mask_adapter(path, other)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_mask_adapter(tmp_path / "nope.safetensors", base)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_mask_adapter(junk, base)


def test_wrong_size_mask_is_resized_with_a_notice(caplog):
    m = make()
    x, t, text, tm, _ = inputs()
    odd = torch.randint(0, K, (B, 20, 28), generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.WARNING), torch.no_grad():
        u = m(x, t, text, tm, odd)
    assert "20x28" in caplog.text and "64x64" in caplog.text
    resized = F.interpolate(odd[:, None].float(), size=(PIX, PIX), mode="nearest")[:, 0].long()
    caplog.clear()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        assert torch.equal(u, m(x, t, text, tm, resized))
        m(x, t, text, tm, resized[:, ::8, ::8])  # latent-size labels are accepted silently too
    assert caplog.text == ""
    # pixel-space labels become area fractions on the latent grid
    frac = labels_to_grid(resized, K, (LAT, LAT), 8, B)
    assert frac.shape == (B, K, LAT, LAT) and torch.allclose(frac.sum(1), torch.ones(B, LAT, LAT))


def test_label_errors():
    m = make()
    x, t, text, tm, labels = inputs()
    with pytest.raises(ValueError, match=f"found max label {K + 2}"):
        m(x, t, text, tm, labels.clone().fill_(K + 2))
    with pytest.raises(ValueError, match="must be integers"):
        m(x, t, text, tm, labels.float())
    with pytest.raises(ValueError, match="precompute_static with a mask needs size"):
        m.precompute_static(text, tm, labels)
    with pytest.raises(ValueError, match="only 'onehot_patch'"):
        MaskAdapterConfig(mask_embed="vae")


def test_palette_and_region_masks():
    pal = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    rgb = torch.tensor([[[0, 0, 0], [255, 0, 0]], [[0, 255, 0], [255, 0, 0]]], dtype=torch.uint8)
    assert palette_to_labels(rgb, pal).tolist() == [[0, 1], [2, 1]]
    assert palette_to_labels(rgb.float() / 255, pal).tolist() == [[0, 1], [2, 1]]  # a ComfyUI IMAGE
    bad = rgb.clone()
    bad[0, 0] = torch.tensor([1, 2, 3])
    bad[1, 1] = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"1 colour\(s\) not in the palette \(2 pixels\): \(1, 2, 3\) x 2"):
        palette_to_labels(bad, pal)
    with pytest.raises(ValueError, match="twice"):
        palette_to_labels(rgb, pal + [(0, 0, 0)])
    region = torch.tensor([[0.0, 0.9], [0.2, 1.0]])
    assert region_mask_to_labels(region).tolist() == [[0, 1], [0, 1]]


@pytest.mark.parametrize("decoupled,image_rank", [(True, 0), (False, 0), (True, 4), (False, 4)])
def test_gradients_reach_only_the_adapter(decoupled, image_rank):
    m = make(decoupled, image_rank=image_rank).train()
    x, t, text, tm, labels = inputs()
    m(x, t, text, tm, labels).square().mean().backward()
    assert all(p.grad is None for p in m.base.parameters())
    trainable = dict((n, p) for n, p in m.named_parameters() if p.requires_grad)
    assert set(trainable.values()) == set(m.trainable_parameters())
    assert any(n.startswith("image_adapters.") for n in trainable) == (image_rank > 0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()), \
        [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    grads = [p.grad.clone() for p in trainable.values()]
    m.zero_grad()
    m.base.gradient_checkpointing = True
    m(x, t, text, tm, labels).square().mean().backward()
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, trainable.values()))


def test_optimizer_step_leaves_the_frozen_base_unchanged():
    m = make().train()
    before = {k: v.clone() for k, v in m.base.state_dict().items()}
    adapter = [p.detach().clone() for p in m.trainable_parameters()]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    x, t, text, tm, labels = inputs()
    m(x, t, text, tm * torch.tensor([[0], [1]]), labels, mask_keep=torch.tensor([True, False])).square().mean().backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in m.base.state_dict().items())
    assert any(not torch.equal(a, p) for a, p in zip(adapter, m.trainable_parameters()))


def test_condition_dropout_rates_on_the_engine():
    """p = 0.1 per modality, drawn independently: text by caption_dropout, mask by mask_dropout."""
    m, tr = engine(steps=3, batch_size=200, caption_dropout=0.1, mask_dropout=0.1)
    seen, forward = [], m.forward
    m.forward = lambda *a, **kw: seen.append((a[3].any(1), kw["mask_keep"])) or forward(*a, **kw)
    tr.train()
    text_kept, mask_kept = (torch.cat(v) for v in zip(*seen))
    assert len(mask_kept) == 600
    assert 0.05 < (~text_kept).float().mean() < 0.15 and 0.05 < (~mask_kept).float().mean() < 0.15
    assert 0.0 <= (~text_kept & ~mask_kept).float().mean() < 0.04  # independent: about 0.01 both


def masked_dataset(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = [{"latent": torch.randn(4, LAT, LAT, generator=g), "text": torch.randn(5, 32, generator=g),
              "text_mask": torch.ones(5, dtype=torch.bool)} for _ in range(n)]
    return MaskedLatents(items, [torch.randint(0, K, (PIX, PIX), generator=g) for _ in range(n)])


def engine(tmp=None, **kw):
    from oboro.oboro_model.training import TrainConfig, Trainer
    m = make(image_rank=2).train()
    cfg = dict(steps=4, batch_size=4, lr=1e-2, caption_dropout=0.3, mask_dropout=0.5, spike_guard=False,
               output_dir=None if tmp is None else str(tmp))
    return m, Trainer(m, masked_dataset(), TrainConfig(**{**cfg, **kw}))


def test_training_engine_batches_masks_with_dropout_and_resumes_exactly(tmp_path):
    """The engine (OboroTrainMaskAdapter's) feeds mask_labels / mask_keep, accumulates like a big
    batch, trains only the adapter and resumes bit for bit."""
    m, tr = engine()
    base_before = {k: v.clone() for k, v in m.base.state_dict().items()}
    seen, forward = [], m.forward

    def spy(*a, **kw):
        seen.append((kw["mask_labels"].shape, kw["mask_keep"].clone()))
        return forward(*a, **kw)

    m.forward = spy
    tr.train()
    assert all(shape == (4, PIX, PIX) for shape, _ in seen) and len(seen) == 4
    keep = torch.cat([k for _, k in seen])
    assert keep.any() and not keep.all()  # p = 0.5 over 16 draws
    assert all(torch.equal(base_before[k], v) for k, v in m.base.state_dict().items())
    want = m.adapter_state_dict()

    m2, acc = engine(batch_size=2, grad_accum=2)
    acc.train()
    assert all(torch.allclose(want[k], v, atol=1e-5) for k, v in m2.adapter_state_dict().items())

    m3, first = engine(tmp_path)
    first.train(until=2)
    m4, second = engine(tmp_path, seed=0)
    second.resume(tmp_path)
    second.train()
    assert all(torch.equal(want[k], v) for k, v in m4.adapter_state_dict().items())
    with pytest.raises(ValueError, match="3 masks for 6"):
        MaskedLatents(list(range(6)), [0, 1, 2])
