"""Studio training options in the engine (oboro_model.training): validation loss (deterministic,
draws no training randomness, catches over-fitting, keeps the best state), EMA with a start step
against a hand-computed average, TensorBoard event files read back, the t-sampling distributions
and the Prodigy optimiser. The node and CLI front ends: tests/test_training_studio_nodes.py."""
from __future__ import annotations

import math

import pytest
import torch

from oboro.oboro_model import MMHDiT, preset
from oboro.oboro_model.training import TrainConfig, Trainer, read_state, sample_t
from oboro.oboro_model.training.job import Job
from oboro.oboro_model.training.tracking import Tracker
from oboro.oboro_model.training.validation import BEST, Validation, best_weights, split_holdout

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = preset("tiny", in_channels=3)


class Rand(torch.utils.data.Dataset):
    """n random 3x8x8 latents with random 4-token captions (nothing to generalise from)."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.lat, self.txt = torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 4, 32, generator=g)

    def __len__(self):
        return len(self.lat)

    def __getitem__(self, i):
        return {"latent": self.lat[i], "text": self.txt[i], "text_mask": torch.ones(4)}


def trainer(train=None, val=None, seed=0, **kw):
    kw = {"steps": 4, "batch_size": 2, "lr": 3e-3, "caption_dropout": 0.2, "weight_decay": 0.0, **kw}
    m = MMHDiT(CFG).initialize_weights(torch.Generator().manual_seed(seed))
    return Trainer(m, train if train is not None else Rand(4, 1), TrainConfig(**kw), validation=val)


def weights(tr):
    return {n: p.detach().clone() for n, p in tr.params}


# ---- validation -------------------------------------------------------------------------------------
def test_validation_is_deterministic_and_catches_overfitting():
    """Two items memorised for 60 steps: the training items' score falls, the held-out ones' rises;
    a second run gives the same validation curve, and re-scoring the same weights the same number."""
    train, held = Rand(2, 1), Rand(2, 2)
    curves = []
    for _ in range(2):
        tr = trainer(train, held, steps=60, caption_dropout=0.0, validation_every=10, validation_timesteps=4,
                     spike_guard=False)
        on_train, seen = Validation(train, timesteps=4), []

        def cb(step, loss, lr, rate):
            if tr.validation.last_step == step:
                seen.append((step, tr.validation.last_loss, on_train.score(tr.model)))

        tr.train(cb)
        curves.append(seen)
        assert tr.validation.score(tr.model, 3) == pytest.approx(tr.validation.last_loss, rel=1e-6)
    a, b = curves
    assert [s for s, _, _ in a] == [10, 20, 30, 40, 50, 60]
    assert all(math.isclose(x[1], y[1], rel_tol=1e-6) for x, y in zip(a, b)), (a, b)
    (_, val0, fit0), (_, val1, fit1) = a[0], a[-1]
    assert fit1 < 0.9 * fit0, a          # training loss on the seen items falls (~1.82 -> 1.49)...
    assert val1 > 1.05 * val0, a         # ...while the held-out loss rises (~2.09 -> 2.33): over-fitting
    assert tr.validation.best_step == 10 and tr.validation.best_loss == pytest.approx(val0)


def test_validation_on_or_off_trains_bit_identical_weights(tmp_path):
    """Validation (EMA on, so the EMA swap path runs; best state written) changes nothing trained."""
    kw = dict(steps=6, ema_decay=0.9, t_sampling="logit_normal")
    off = trainer(**kw)
    off.train()
    on = trainer(val=Rand(3, 5), validation_every=2, validation_timesteps=3, output_dir=str(tmp_path), **kw)
    on.train()
    w_off, w_on = weights(off), weights(on)
    assert all(torch.equal(w_off[k], w_on[k]) for k in w_off)
    assert all(torch.equal(off.ema.shadow[k], on.ema.shadow[k]) for k in w_off)
    assert torch.equal(off.noise_gen.get_state(), on.noise_gen.get_state())
    assert on.validation.best_step in (2, 4, 6) and (tmp_path / BEST).is_file()
    tensors, meta = read_state(tmp_path / BEST)
    assert meta["step"] == on.validation.best_step
    assert meta["validation"]["best_loss"] == pytest.approx(on.validation.best_loss)
    with best_weights(on) as step:  # the best state's EMA weights in the model, then the trained ones back
        assert step == on.validation.best_step
        assert all(torch.equal(p, tensors[f"ema.{n}"]) for n, p in on.params)
    assert all(torch.equal(w_on[n], p) for n, p in on.params)


def test_best_validation_survives_resume(tmp_path):
    """The best loss/step are part of the training state: a resumed run keeps comparing against them."""
    a = trainer(val=Rand(2, 5), steps=4, validation_every=2, validation_timesteps=2, output_dir=str(tmp_path))
    a.train(until=2)
    b = trainer(val=Rand(2, 5), steps=4, validation_every=2, validation_timesteps=2, output_dir=str(tmp_path))
    b.resume(tmp_path)
    assert (b.validation.best_step, b.validation.best_loss) == (2, a.validation.best_loss)
    b.train()
    a.train()
    assert (b.validation.best_step, b.validation.best_loss) == (a.validation.best_step, a.validation.best_loss)


def test_split_and_validation_cache_together_are_refused():
    from oboro.oboro_model.training.run import build_trainer
    m = MMHDiT(CFG).initialize_weights(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="not both"):
        build_trainer(m, Rand(4, 0), TrainConfig(steps=1, validation_split=0.25), empty=(None, None),
                      validation_cache=Rand(2, 1))


def test_holdout_split_is_seeded_and_disjoint():
    data = Rand(10, 0)
    tr1, va1 = split_holdout(data, 0.2, seed=3)
    tr2, va2 = split_holdout(data, 0.2, seed=3)
    assert va1.indices == va2.indices and len(va1) == 2 and len(tr1) == 8
    assert sorted(tr1.indices + va1.indices) == list(range(10))
    with pytest.raises(ValueError, match="nothing to train on"):
        split_holdout(Rand(2, 0), 0.9)


# ---- EMA --------------------------------------------------------------------------------------------
def test_ema_matches_hand_computed_average():
    """ema_start = 2: the EMA equals the weights after steps 1-2, then averages with the ramped decay
    d_n = min(decay, (1 + n) / (10 + n)) over updates n = 0, 1, ...; EMA.applied restores exactly."""
    tr = trainer(steps=5, ema_decay=0.6, ema_start=2, caption_dropout=0.0)
    after = []
    tr.train(lambda step, loss, lr, rate: after.append(weights(tr)))
    for name in after[0]:
        avg = after[1][name].clone()  # step 2: reset to the weights
        for n, w in enumerate(after[2:]):
            d = min(0.6, (1 + n) / (10 + n))
            avg = d * avg + (1 - d) * w[name]
        torch.testing.assert_close(tr.ema.shadow[name], avg, atol=1e-6, rtol=1e-5)
    assert tr.ema.updates == 3
    assert not all(torch.equal(tr.ema.shadow[n], after[-1][n]) for n in after[0])
    with tr.ema.applied(tr.params):
        assert all(torch.equal(p, tr.ema.shadow[n]) for n, p in tr.params)
    assert all(torch.equal(p, after[-1][n]) for n, p in tr.params)


# ---- trackers ---------------------------------------------------------------------------------------
def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tr = trainer(val=Rand(2, 7), steps=4, validation_every=2, validation_timesteps=2)
    job = Job(tmp_path / "run", None, "test")
    job.start(tr)
    job.tracker = Tracker("tensorboard", tmp_path / "run" / "logs", "run", {"lr": 3e-3, "steps": 4})
    tr.train(lambda step, loss, lr, rate: job.record(tr, step, loss, lr))
    job.tracker.log_images("previews", torch.rand(1, 8, 16, 3), 4)
    job.close()
    ev = EventAccumulator(str(tmp_path / "run" / "logs" / "run"), size_guidance={"scalars": 0, "images": 0})
    ev.Reload()
    tags = ev.Tags()
    loss = ev.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx(job.history["loss"], rel=1e-6)
    assert [e.value for e in ev.Scalars("train/lr")] == pytest.approx(job.history["lr"], rel=1e-6)
    assert [(e.step, e.value) for e in ev.Scalars("val/loss")] == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in zip(job.history["val_step"], job.history["val_loss"])]
    assert job.history["val_step"] == [2, 4]
    assert "previews" in tags["images"] and ev.Images("previews")[0].width == 16


def test_unknown_or_missing_tracker_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="log_with"):
        Tracker("mlflow", tmp_path, "run")
    Tracker("none", tmp_path / "nothing", "run").log({"x": 1.0}, 1)
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install wandb"):
            Tracker("wandb", tmp_path, "run")
    assert not (tmp_path / "nothing").exists()


# ---- t sampling and Prodigy -------------------------------------------------------------------------
def test_t_sampling_distributions_are_as_configured():
    g = torch.Generator().manual_seed(0)
    n = 40_000
    t = sample_t(n, g, "logit_normal", 0.7, 0.5)
    z = torch.log(t / (1 - t))  # logit(t) ~ N(0.7, 0.5)
    assert z.mean().item() == pytest.approx(0.7, abs=0.02) and z.std().item() == pytest.approx(0.5, abs=0.02)
    t = sample_t(n, g, "shifted", shift=3.0)
    sigma = 1 - t  # sigma = 3u / (1 + 2u), u uniform: P(sigma <= s) = s / (3 - 2s)
    for s in (0.25, 0.5, 0.75, 0.9):
        assert (sigma <= s).float().mean().item() == pytest.approx(s / (3 - 2 * s), abs=0.01)
    assert sample_t(n, g, "shifted", shift=1.0).mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="shift"):
        sample_t(3, g, "shifted", shift=0.0)
    with pytest.raises(ValueError, match="t sampling"):
        TrainConfig(t_sampling="cosmap")


def test_prodigy_trains():
    """Prodigy grows its step size d from 1e-6 (~2e-3 by step 50 here), then the loss falls (1.92 -> 1.72)."""
    data = Rand(2, 1)
    tr = trainer(data, steps=60, optimizer="prodigy", lr=1.0, caption_dropout=0.0, spike_guard=False)
    score = Validation(data, timesteps=4)
    before = score.score(tr.model)
    tr.train()
    assert type(tr.optimizer).__name__ == "Prodigy"
    assert tr.optimizer.param_groups[0]["d"] > 1e-4
    assert score.score(tr.model) < 0.95 * before
