"""Validation loss: is the model still learning the data, or memorising the training set?

A held-out set (a seeded fraction of the cache, `split_holdout`, or a second cache) is scored every
`validation_every` steps with the I-CFM loss on a fixed grid of times t_k = (k + 1/2) / K and noise
drawn from per-item generators seeded by `validation_seed`: the same weights give the same number in
every run, so curves of different runs (other lr, rank, seed) are comparable, and the number moves
only when the weights do. Scoring draws from none of the training's random streams (data order,
noise, the global torch RNG) and restores every weight it swaps, so a run trains bit for bit the
same with validation on or off. Captions are never dropped here: the score is the conditional loss.

The best state by validation loss is kept as `best.safetensors` (a full, resumable training state
beside the step_*.safetensors ones, never pruned nor picked by resume_from='latest'); the front ends
export its weights as `<name>_best`. With EMA on, the EMA weights are scored (what gets exported).
(ScheduleFree without EMA: its averaged weights are scored, but the best state, like every state,
holds the training sequence, so `<name>_best` is that sequence at the best step.)
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from .batching import collate
from .loss import PRECISIONS, icfm_loss
from .swap import exported_weights, swapped

logger = logging.getLogger(__name__)
BEST = "best.safetensors"


class Subset(torch.utils.data.Dataset):
    """Items `indices` of `dataset`, keeping its aspect buckets (bucket_of) for the batcher."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.indices[i]]

    def bucket_of(self, i: int):
        return self.dataset.bucket_of(self.indices[i])


def split_holdout(dataset, fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """(train, validation): round(fraction * n) items (at least 1) held out, chosen by a permutation
    seeded by `seed` alone, so every run with that seed holds out the same items."""
    if hasattr(dataset, "data_order"):  # a weighted mixture of caches brings its own sampler
        raise ValueError("validation_split holds out part of a single cache; with several caches give a "
                         "validation cache (validation_cache_dir) instead")
    n = len(dataset)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_split must be in (0, 1), got {fraction}")
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(f"validation_split {fraction} of {n} items leaves nothing to train on; lower it or give "
                         "a separate validation cache")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(perm[:k])
    kept = sorted(perm[k:])
    return Subset(dataset, kept), Subset(dataset, held)


class Validation:
    """Scores `dataset` for a Trainer (see the module docstring). `history` is [(step, loss)] of this
    process's scores; best_loss / best_step survive resume (state.py stores state_dict())."""

    def __init__(self, dataset, every: int = 0, timesteps: int = 8, seed: int = 0):
        if len(dataset) == 0:
            raise ValueError("the validation set is empty")
        if timesteps < 1:
            raise ValueError(f"validation_timesteps must be >= 1, got {timesteps}")
        self.dataset, self.every, self.timesteps, self.seed = dataset, every, timesteps, seed
        self.t = (torch.arange(timesteps, dtype=torch.float32) + 0.5) / timesteps
        self.best_loss, self.best_step, self.last_step, self.last_loss = math.inf, None, None, None

    def due(self, step: int, end: int) -> bool:
        """every > 0: every N steps and at the end; every = 0: at the end only."""
        return step == end or (self.every > 0 and step % self.every == 0)

    def _noise(self, i: int, shape, sigma: float):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        x0 = torch.randn((self.timesteps, *shape), generator=g)
        return x0, (torch.randn((self.timesteps, *shape), generator=g) if sigma else None)

    @torch.no_grad()
    def score(self, model: torch.nn.Module, batch_size: int = 4, sigma: float = 0.0,
              amp: Optional[torch.dtype] = None) -> float:
        """Mean I-CFM loss over every held-out item x every grid time (fixed noise)."""
        p = next(model.parameters())
        dev, dtype = p.device, p.dtype
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            for i in range(len(self.dataset)):
                item = self.dataset[i]
                x0, eps = self._noise(i, item["latent"].shape, sigma)
                for lo in range(0, self.timesteps, max(1, batch_size)):
                    sl = slice(lo, min(self.timesteps, lo + max(1, batch_size)))
                    n = sl.stop - sl.start
                    x1, text, mask = collate([item] * n)
                    fwd = model
                    if "mask_labels" in item:
                        fwd = functools.partial(model, mask_labels=item["mask_labels"][None].expand(n, -1, -1).to(dev))
                    with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                        per = icfm_loss(fwd, x1.to(dev, dtype), text.to(dev, dtype), mask.to(dev),
                                        self.t[sl].to(dev), x0[sl].to(dev, dtype), sigma,
                                        None if eps is None else eps[sl].to(dev, dtype), reduction="none")
                    total += float(per.double().sum())
                    count += n
        finally:
            model.train(was_training)
        return total / count

    def run(self, trainer) -> float:
        """Score the trainer's current weights (EMA ones if it keeps an EMA; ScheduleFree's averaged
        sequence), record it, and on a new best write best.safetensors (main process)."""
        c = trainer.config
        with exported_weights(trainer):
            loss = self.score(trainer.model, c.batch_size, c.sigma, PRECISIONS[c.precision])
        self.last_step, self.last_loss = trainer.step, loss
        if math.isfinite(loss) and loss < self.best_loss:
            self.best_loss, self.best_step = loss, trainer.step
            if c.output_dir and trainer.dist.is_main:
                from .state import capture, write_state
                tensors, meta = capture(trainer)
                write_state(Path(c.output_dir) / BEST, tensors, meta)
        if trainer.dist.is_main:
            logger.info("validation at step %d: loss %.5f (best %.5f at step %s)", trainer.step, loss,
                        self.best_loss, self.best_step)
        return loss

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss if math.isfinite(self.best_loss) else None, "best_step": self.best_step}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            b = state.get("best_loss")
            self.best_loss, self.best_step = (math.inf if b is None else float(b)), state.get("best_step")


@contextlib.contextmanager
def best_weights(trainer):
    """The best-by-validation weights (the EMA ones with EMA on) from best.safetensors in the model
    for the `with` body; yields the step they are from, or None (and changes nothing) without one."""
    path = Path(trainer.config.output_dir or ".") / BEST
    if trainer.validation is None or not trainer.config.output_dir or not path.is_file():
        yield None
        return
    from .state import read_state
    tensors, meta = read_state(path)
    prefix = "ema." if trainer.ema is not None and any(k.startswith("ema.") for k in tensors) else "model."
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted({n for n, _ in trainer.params} - set(weights))
    if missing:
        raise ValueError(f"{path}: lacks {len(missing)} trained parameters of this run, e.g. {missing[:3]}")
    with swapped(trainer.params, weights):
        yield int(meta["step"])
