"""Optimisers, the learning-rate schedule and an EMA of the trained weights.

The schedule is a pure function of the step (`LRSchedule`, a frozen dataclass) driven by
LambdaLR, so restoring LambdaLR's `last_epoch` restores the exact LR: nothing about the schedule
lives in mutable state. Optional back-ends (ScheduleFree, bitsandbytes) are imported only when
asked for, with an error that says what to install.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

OPTIMIZERS = ("adamw", "schedulefree", "adamw8bit", "prodigy")
SCHEDULES = ("constant", "cosine", "linear", "step")


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str = "adamw", lr: float = 1e-4,
                    weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8,
                    warmup_steps: int = 0) -> torch.optim.Optimizer:
    """AdamW, ScheduleFree AdamW (`schedulefree`; it does its own warm-up, hence warmup_steps),
    8-bit AdamW (`bitsandbytes`, quarter-size optimiser state; needs a GPU) or Prodigy (`prodigyopt`:
    it estimates the step size itself, so `lr` is a multiplier of that estimate; use lr = 1)."""
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters (every parameter has requires_grad=False)")
    kw = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, **kw)
    if name == "schedulefree":
        try:
            import schedulefree
        except ImportError:
            raise ImportError("optimizer 'schedulefree' needs the schedulefree package: "
                              "pip install schedulefree") from None
        return schedulefree.AdamWScheduleFree(params, warmup_steps=warmup_steps, **kw)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("optimizer 'adamw8bit' needs the bitsandbytes package (CUDA): "
                              "pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, **kw)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ImportError("optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt") from None
        # Prodigy's default warm-up safeguard and bias correction as kohya / ai-toolkit recommend them
        return Prodigy(params, use_bias_correction=True, safeguard_warmup=warmup_steps > 0, **kw)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """ScheduleFree optimisers keep two weight sequences and must be told train()/eval()."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


@dataclass(frozen=True)
class LRSchedule:
    """LR multiplier at a step: linear warm-up to 1 over `warmup` steps ((s+1)/warmup, so step 0
    already learns), then constant, cosine or linear decay to `min_ratio` at `total`, or step
    decay by `gamma` every `step_size` steps (never below min_ratio)."""
    total: int
    warmup: int = 0
    kind: str = "constant"
    min_ratio: float = 0.0
    step_size: int = 1000
    gamma: float = 0.5

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown LR schedule {self.kind!r}; choose one of {SCHEDULES}")
        if self.warmup < 0 or self.total < 1 or self.step_size < 1:
            raise ValueError(f"bad LR schedule: total={self.total} warmup={self.warmup} step_size={self.step_size}")

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        s, m = step - self.warmup, self.min_ratio
        p = min(1.0, s / max(1, self.total - self.warmup))
        if self.kind == "cosine":
            return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
        if self.kind == "linear":
            return m + (1 - m) * (1 - p)
        if self.kind == "step":
            return max(m, self.gamma ** (s // self.step_size))
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Callable[[int], float],
                    scale: Optional[Callable[[], float]] = None) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR of schedule(step) * scale(); `scale` is read at every scheduler.step(), which is
    how the spike guard's LR cut is applied on top of the schedule without owning any of it."""
    if scale is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) * scale())


class EMA:
    """fp32 exponential moving average of the trained parameters (what usually gets exported).
    The decay ramps as min(decay, (1+n)/(10+n)) over updates n, so early EMAs are not dominated by
    the random init; it is a function of the update count alone, so resume stays exact."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.shadow = {n: p.detach().float().clone() for n, p in named_params}

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for n, p in named_params:
            self.shadow[n].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor], updates: int) -> None:
        missing = sorted(set(self.shadow) - set(sd))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:5]}")
        for n, v in self.shadow.items():
            v.copy_(sd[n])
        self.updates = updates

    def applied(self, named_params: Iterable[tuple[str, torch.nn.Parameter]]):
        """The averaged weights in the model for a `with` body, the trained ones restored after."""
        from .swap import swapped
        return swapped(named_params, self.shadow)

    @torch.no_grad()
    def reset(self, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        """Follow the weights exactly (before `ema_start`): the average starts from them later."""
        for n, p in named_params:
            self.shadow[n].copy_(p.detach().float())
