"""Training engine (oboro_model.training): I-CFM loss, schedules, spike guard, exact resume."""
from __future__ import annotations

import logging
import math
import sys

import pytest
import torch

from oboro.oboro_model import MMHDiT, preset
from oboro.oboro_model.training import (LRSchedule, SpikeGuard, StopTraining, TrainConfig, Trainer, build_optimizer,
                                        caption_dropout_mask, collate, drop_captions, icfm_loss, list_checkpoints,
                                        read_state, sample_t, write_state)

CFG = preset("tiny", in_channels=3)


pytestmark = pytest.mark.usefixtures("one_thread")


class Synthetic(torch.utils.data.Dataset):
    """16 samples of 4 fixed 3x8x8 patterns; the caption (3..6 tokens) says which pattern.
    `poison` turns every latent huge or NaN, to feed the spike guard a bad batch."""

    def __init__(self, n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(4, 3, 8, 8, generator=g)
        self.words = torch.randn(4, 6, 32, generator=g)
        self.n, self.poison = n, None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        k, L = i % 4, 3 + i % 4
        latent = self.patterns[k].clone()
        if self.poison == "huge":
            latent = latent * 1e4
        elif self.poison == "nan":
            latent = torch.full_like(latent, float("nan"))
        return {"latent": latent, "text": self.words[k, :L], "text_mask": torch.ones(L)}


def make_model(seed=0):
    return MMHDiT(CFG).initialize_weights(torch.Generator().manual_seed(seed))


def make_trainer(model_seed=0, dataset=None, **kw):
    kw = {"steps": 6, "batch_size": 4, "lr": 1e-3, "caption_dropout": 0.0, **kw}
    return Trainer(make_model(model_seed), dataset or Synthetic(), TrainConfig(**kw))


def trained_state(tr):
    out = {f"w.{n}": p.detach().clone() for n, p in tr.params}
    for i, s in tr.optimizer.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v.clone() for k, v in s.items()})
    if tr.ema is not None:
        out.update({f"ema.{k}": v.clone() for k, v in tr.ema.state_dict().items()})
    return out


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"


# ---- loss -----------------------------------------------------------------------------------------
def test_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    x0, x1, eps = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([0.25, 0.8])
    text, mask = torch.randn(2, 4, 32, generator=g), torch.ones(2, 4, dtype=torch.bool)
    seen = {}

    def stub(xt, tt, txt, m):  # a "model" whose output we know: 2 * x_t
        seen.update(xt=xt, t=tt, text=txt)
        return 2 * xt

    loss = icfm_loss(stub, x1, text, mask, t, x0, sigma=0.1, eps=eps)
    tb = t.view(2, 1, 1, 1)
    xt = tb * x1 + (1 - tb) * x0 + 0.1 * eps
    per = [((2 * xt[i] - (x1[i] - x0[i])) ** 2).mean() for i in range(2)]
    assert torch.allclose(seen["xt"], xt) and seen["t"] is t and seen["text"] is text
    assert torch.allclose(loss, (per[0] + per[1]) / 2)
    assert torch.allclose(icfm_loss(stub, x1, text, mask, t, x0, 0.1, eps, reduction="none"), torch.stack(per))
    # the real model too, sigma = 0
    model = make_model()
    xt0 = tb * x1 + (1 - tb) * x0
    want = ((model(xt0, t, text, mask) - (x1 - x0)) ** 2).mean()
    assert torch.allclose(icfm_loss(model, x1, text, mask, t, x0), want, atol=1e-6)
    with pytest.raises(ValueError, match="eps"):
        icfm_loss(stub, x1, text, mask, t, x0, sigma=0.1)


def test_t_sampling():
    g = torch.Generator().manual_seed(0)
    t = sample_t(4000, g, "logit_normal", 0.0, 1.0)
    assert t.shape == (4000,) and bool(((t > 0) & (t < 1)).all())
    assert abs(t.median().item() - 0.5) < 0.05
    assert sample_t(4000, g, "logit_normal", -1.0, 1.0).median() < 0.35
    u = sample_t(4000, g)
    assert bool(((u >= 0) & (u < 1)).all()) and abs(u.mean().item() - 0.5) < 0.05
    with pytest.raises(ValueError):
        sample_t(3, g, "beta")


def test_caption_dropout():
    g = torch.Generator().manual_seed(0)
    text, mask = torch.randn(8, 5, 32, generator=g), torch.ones(8, 5, dtype=torch.bool)
    mask[0, 3:] = False
    t1, m1 = drop_captions(text, mask, caption_dropout_mask(8, 1.0, g))
    assert not m1.any() and not t1.any()                       # p = 1: every caption empty
    t0, m0 = drop_captions(text, mask, caption_dropout_mask(8, 0.0, g))
    assert torch.equal(t0, text) and torch.equal(m0, mask)    # p = 0: none
    empty = torch.randn(7, 32, generator=g)                   # a supplied empty-prompt embedding
    drop = torch.tensor([True, False] * 4)
    te, me = drop_captions(text, mask, drop, empty)
    assert te.shape == (8, 7, 32) and torch.equal(te[0], empty) and bool(me[0].all())
    assert torch.equal(te[1, :5], text[1]) and torch.equal(me[1], torch.tensor([True] * 5 + [False] * 2))
    # the zero-length prompt is what the model sees with every text token masked
    model, x, tt = make_model(), torch.randn(2, 3, 8, 8, generator=g), torch.tensor([0.3, 0.6])
    masked = model(x, tt, t1[:2], m1[:2])
    assert torch.allclose(masked, model(x, tt, torch.zeros(2, 0, 32), torch.zeros(2, 0)), atol=1e-5)


def test_collate_pads_right():
    ds = Synthetic()
    latent, text, mask = collate([ds[0], ds[3]])
    assert latent.shape == (2, 3, 8, 8) and text.shape == (2, 6, 32)
    assert mask.tolist() == [[True] * 3 + [False] * 3, [True] * 6] and not text[0, 3:].any()


# ---- optimisers and LR ----------------------------------------------------------------------------
def test_lr_schedules_and_warmup_then_cosine_in_trainer():
    s = LRSchedule(total=10, warmup=2, kind="cosine", min_ratio=0.1)
    assert [s(0), s(1), s(2)] == [0.5, 1.0, 1.0] and s(10) == pytest.approx(0.1) and s(50) == pytest.approx(0.1)
    assert s(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert LRSchedule(10, 0, "linear")(5) == 0.5
    assert [LRSchedule(10, 1, "step", step_size=3, gamma=0.5)(i) for i in (1, 3, 4, 7)] == [1.0, 1.0, 0.5, 0.25]
    assert LRSchedule(10, 3, "constant")(9) == 1.0
    lrs = []
    make_trainer(steps=10, warmup=2, schedule="cosine", spike_guard=False).train(lambda st, lo, lr, r: lrs.append(lr))
    want = [1e-3 * (0.5 if i == 0 else 0.5 * (1 + math.cos(math.pi * max(0, i - 2) / 8))) for i in range(10)]
    assert lrs == pytest.approx(want, rel=1e-12)


def test_optional_optimizers_explain_missing_packages(monkeypatch):
    p = [torch.nn.Parameter(torch.zeros(2))]
    for name, pkg in (("schedulefree", "schedulefree"), ("adamw8bit", "bitsandbytes")):
        monkeypatch.setitem(sys.modules, pkg, None)  # makes `import pkg` raise ImportError
        with pytest.raises(ImportError, match=f"pip install {pkg}"):
            build_optimizer(p, name)
    opt = build_optimizer(p, "adamw", lr=0.1, weight_decay=0.05)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8 and opt.defaults["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(p, "lion")


# ---- exact resume ---------------------------------------------------------------------------------
RESUME_KW = dict(steps=6, batch_size=2, grad_accum=2, warmup=2, schedule="cosine", caption_dropout=0.5,
                 ema_decay=0.9, t_sampling="logit_normal", sigma=0.01, spike_warmup=2, seed=3)


def test_resume_is_bitwise_exact(tmp_path):
    straight = make_trainer(**RESUME_KW)
    straight.train()
    want = trained_state(straight)

    first = make_trainer(output_dir=str(tmp_path / "a"), **RESUME_KW)
    first.train(until=3)
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["step_00000003.safetensors"]
    second = make_trainer(model_seed=99, output_dir=str(tmp_path / "a"), **RESUME_KW)  # other init: overwritten
    second.resume(tmp_path / "a")
    assert second.step == 3
    second.train()
    assert_bitwise(trained_state(second), want)
    assert second.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
    assert second.guard.state_dict() == straight.guard.state_dict()


def test_interrupt_from_callback_saves_and_resumes_exactly(tmp_path):
    straight = make_trainer(**RESUME_KW)
    straight.train()

    def stop_at_3(step, loss, lr, rate):
        assert math.isfinite(loss) and lr > 0 and rate > 0
        if step == 3:
            raise RuntimeError("user cancelled")

    out = str(tmp_path / "b")
    with pytest.raises(RuntimeError, match="cancelled"):
        make_trainer(output_dir=out, **RESUME_KW).train(stop_at_3)
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003.safetensors"]
    resumed = make_trainer(model_seed=7, output_dir=out, **RESUME_KW)
    resumed.resume(out)
    resumed.train()
    assert_bitwise(trained_state(resumed), trained_state(straight))
    # StopTraining ends cleanly (saved, no exception)
    tr = make_trainer(output_dir=str(tmp_path / "c"), **RESUME_KW)
    tr.train(lambda step, *a: (_ for _ in ()).throw(StopTraining()) if step == 2 else None)
    assert tr.step == 2 and [p.name for p in list_checkpoints(tmp_path / "c")] == ["step_00000002.safetensors"]


def test_ctrl_c_mid_step_rolls_back_and_resumes_exactly(tmp_path):
    straight = make_trainer(**RESUME_KW)
    straight.train()
    out = str(tmp_path / "d")
    tr = make_trainer(output_dir=out, **RESUME_KW)
    calls = []

    def ctrl_c(module, args):  # the 2nd micro-batch of step 4: data and noise for it already drawn
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt

    tr.model.register_forward_pre_hook(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    assert tr.step == 3 and [p.name for p in list_checkpoints(out)] == ["step_00000003.safetensors"]
    resumed = make_trainer(output_dir=out, **RESUME_KW)
    resumed.resume(out)
    resumed.train()
    assert_bitwise(trained_state(resumed), trained_state(straight))


# ---- spike guard ----------------------------------------------------------------------------------
def test_spike_guard_skips_update_and_cuts_lr(caplog):
    ds = Synthetic()
    tr = make_trainer(dataset=ds, steps=20, spike_warmup=3, spike_factor=0.5, ema_decay=0.9)
    for _ in range(4):
        tr.train_step()
    for i, poison in enumerate(("huge", "nan"), start=1):
        before, lr = trained_state(tr), tr.optimizer.param_groups[0]["lr"]
        ds.poison = poison
        with caplog.at_level(logging.WARNING):
            loss = tr.train_step()
        ds.poison = None
        assert (loss > 1e6) if poison == "huge" else math.isnan(loss)
        assert_bitwise(trained_state(tr), before)               # no update reached weights, moments, EMA
        assert tr.guard.spikes == i and tr.guard.lr_scale == 0.5 ** i
        assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.5, rel=1e-12)
        assert f"loss spike at step {4 + i}" in caplog.text and "threshold" in caplog.text
    before = trained_state(tr)
    assert math.isfinite(tr.train_step())
    after = trained_state(tr)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("w."))
    g = SpikeGuard(k=3, warmup=2)
    g.load_state_dict(tr.guard.state_dict())
    assert g.state_dict() == tr.guard.state_dict()


def test_nan_never_reaches_weights_without_guard():
    ds = Synthetic()
    tr = make_trainer(dataset=ds, spike_guard=False)
    tr.train_step()
    before = trained_state(tr)
    ds.poison = "nan"
    assert math.isnan(tr.train_step())
    assert_bitwise(trained_state(tr), before)


# ---- checkpoint files -----------------------------------------------------------------------------
def test_keep_last_k_and_atomic_writes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    tr = make_trainer(steps=8, batch_size=2, checkpoint_every=2, keep_last=2, output_dir=str(out))
    tr.train()
    assert sorted(p.name for p in out.iterdir()) == ["step_00000006.safetensors", "step_00000008.safetensors"]
    tensors, meta = read_state(out / "step_00000008.safetensors")
    assert meta["step"] == 8 and set(k for k in tensors if k.startswith("model.")) == {f"model.{n}" for n, _ in tr.params}

    def broken(tensors, path, metadata=None):  # dies half-way through writing
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    import oboro.oboro_model.atomic as atomic_mod  # every atomic safetensors write goes through it
    monkeypatch.setattr(atomic_mod, "save_file", broken)
    old = (out / "step_00000008.safetensors").read_bytes()
    with pytest.raises(OSError, match="disk full"):
        write_state(out / "step_00000008.safetensors", {"x": torch.zeros(2)}, {"format": 1})
    assert sorted(p.name for p in out.iterdir()) == ["step_00000006.safetensors", "step_00000008.safetensors"]
    assert (out / "step_00000008.safetensors").read_bytes() == old


def test_frozen_params_are_neither_trained_nor_saved(tmp_path):
    model = make_model()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("final_layer."))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tr = Trainer(model, Synthetic(), TrainConfig(steps=2, batch_size=4, lr=1e-2, output_dir=str(tmp_path)))
    tr.train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    tensors, _ = read_state(list_checkpoints(tmp_path)[-1])
    assert {k for k in tensors if k.startswith("model.")} == {f"model.{n}" for n, _ in tr.params}
    assert all(n.startswith("final_layer.") for n, _ in tr.params)


# ---- accumulation, precision, learning ------------------------------------------------------------
def test_grad_accum_equals_big_batch():
    def run(batch_size, grad_accum):
        model = make_model()
        opt = torch.optim.SGD([p for p in model.parameters()], lr=0.5)
        cfg = TrainConfig(steps=2, batch_size=batch_size, grad_accum=grad_accum, clip_grad_norm=None,
                          caption_dropout=0.5, spike_guard=False, seed=5)
        tr = Trainer(model, Synthetic(), cfg, optimizer=opt)
        return tr.train(), {n: p.detach().clone() for n, p in tr.params}

    (la, wa), (lb, wb) = run(2, 2), run(4, 1)
    assert la == pytest.approx(lb, rel=1e-5)
    assert all(torch.allclose(wa[n], wb[n], atol=1e-6) for n in wa)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU rms_norm under autocast
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps(precision):
    tr = make_trainer(steps=2, precision=precision, gradient_checkpointing=True)
    assert tr.model.gradient_checkpointing
    losses = tr.train()
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for _, p in tr.params)


def test_loss_goes_down():
    torch.manual_seed(0)
    tr = make_trainer(steps=60, batch_size=8, lr=3e-3, warmup=5, caption_dropout=0.1, weight_decay=0.0)
    losses = tr.train()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.85 * first, (first, last)  # ~0.72 over seeds 0-2 (from ~2.0 = E|x1 - x0|^2)
    assert tr.guard.spikes == 0
