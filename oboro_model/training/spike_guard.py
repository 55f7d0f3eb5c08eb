"""Loss-spike guard: one bad batch (corrupt latent, fp overflow) must not wreck a long run.

It tracks a moving mean and variance of accepted losses: exact running ones (Welford) for the first
1/(1-beta) losses, exponential ones after, so early estimates are not biased toward 0. A step is a
spike when its loss is NaN/Inf, or, once `warmup` losses have been seen, above mean + k * std,
with std at least rel_floor * mean (batch losses of a plateaued run can be nearly equal; a 1%
blip is not a spike). The trainer then
skips the optimiser update (grads are zeroed, so nothing non-finite reaches the weights) and the
guard multiplies its `lr_scale` by `factor`; the LR scheduler multiplies the schedule by that scale,
so the cut persists and, being plain state here, resumes exactly. Spikes never enter the
statistics, so a burst of them cannot drag the threshold up.

A corrupt item that returns every epoch is not an optimisation problem, and cutting the LR for it
again and again would stall the run. So the trainer tells the guard which items (dataset index ->
name) a spiking step held; an item in `repeat` spiking steps is quarantined: named in the log, the
LR is not cut for that spike, and the trainer draws no more batches holding it (Trainer._next_clean).
Counts and the quarantine are guard state, so they resume exactly too.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

logger = logging.getLogger(__name__)


class SpikeGuard:
    def __init__(self, k: float = 6.0, warmup: int = 20, factor: float = 0.5, beta: float = 0.98,
                 rel_floor: float = 0.1, repeat: int = 2):
        if k <= 0 or warmup < 0 or not 0.0 < factor <= 1.0 or not 0.0 < beta < 1.0 or rel_floor < 0:
            raise ValueError(f"bad spike guard settings: k={k} warmup={warmup} factor={factor} beta={beta} "
                             f"rel_floor={rel_floor}")
        self.k, self.warmup, self.factor, self.beta, self.rel_floor = k, warmup, factor, beta, rel_floor
        self.mean: Optional[float] = None
        self.var = 0.0
        self.count = 0        # accepted losses seen
        self.spikes = 0       # spikes caught
        self.lr_scale = 1.0   # product of all LR cuts so far
        self.repeat = max(1, int(repeat))
        self.item_spikes: dict[str, int] = {}  # dataset index (str) -> spiking steps it was in
        self.quarantined: dict[str, str] = {}  # dataset index (str) -> name, set aside for the run

    def threshold(self) -> float:
        """Largest loss accepted now (inf during warm-up)."""
        if self.mean is None or self.count < self.warmup:
            return math.inf
        return self.mean + self.k * max(math.sqrt(self.var), self.rel_floor * abs(self.mean))

    def check(self, step: int, loss: float, lr: Optional[float] = None, items: Optional[dict] = None) -> bool:
        """True if `loss` is a spike (then counted, LR cut and logged); else it joins the stats.
        `lr` (the LR used this step) only makes the log line say where the LR goes; `items`
        ({dataset index: name} of the step's samples) lets repeat offenders be quarantined."""
        loss = float(loss)
        thr = self.threshold()
        if math.isfinite(loss) and loss <= thr:
            self._accept(loss)
            return False
        self.reject(step, loss, f"loss {loss:.6g}, threshold {thr:.6g}", lr, items)
        return True

    def reject(self, step: int, loss: float, reason: str, lr: Optional[float] = None,
               items: Optional[dict] = None) -> None:
        """Count a spike found by the caller (e.g. a non-finite gradient norm with a finite loss)."""
        self.spikes += 1
        counts = {str(i): self.item_spikes.get(str(i), 0) + 1 for i in (items or {})}
        self.item_spikes.update(counts)
        top = max(counts.values(), default=0)
        if top >= self.repeat:  # the same item(s) again: set them aside instead of cutting the LR
            new = {i: str(items.get(i, items.get(int(i), i))) for i, n in counts.items() if n == top}
            self.quarantined.update(new)
            logger.warning("loss spike at step %d (%s): update skipped; %s spiked in %d steps: set aside for the "
                           "rest of the run (LR not cut); %d item(s) quarantined: %s", step, reason,
                           ", ".join(new.values()), top, len(self.quarantined), ", ".join(self.quarantined.values()))
            return
        self.lr_scale *= self.factor
        new_lr = "" if lr is None else f", LR {lr:.4g} -> ~{lr * self.factor:.4g}"
        logger.warning("loss spike at step %d (%s): update skipped, LR scale now %.4g%s; %d spike(s) so far",
                       step, reason, self.lr_scale, new_lr, self.spikes)

    def _accept(self, loss: float) -> None:
        w = max(1.0 - self.beta, 1.0 / (self.count + 1))  # 1/n: Welford's exact mean/var; then EMA
        delta = loss - (self.mean if self.mean is not None else loss)
        self.mean = (self.mean if self.mean is not None else loss) + w * delta
        self.var = (1 - w) * (self.var + w * delta * delta)
        self.count += 1

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("k", "warmup", "factor", "beta", "rel_floor", "mean", "var", "count",
                                               "spikes", "lr_scale", "repeat", "item_spikes", "quarantined")}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            if not hasattr(self, k):
                raise KeyError(f"unknown spike guard state {k!r}")
            setattr(self, k, v)
