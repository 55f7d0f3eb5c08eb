"""The one temporary weight swap: put other weights (EMA, ScheduleFree's averaged sequence, the
best-by-validation state) into the trained parameters for a `with` body, and restore the trained
values bit for bit after, so previews, validation and export never disturb training."""
from __future__ import annotations

import contextlib
from typing import Iterable, Mapping, Optional

import torch


@contextlib.contextmanager
def swapped(params: Iterable, tensors: Optional[Mapping[str, torch.Tensor]] = None, optimizer=None):
    """`tensors` {name: value} (or, with `optimizer`, ScheduleFree's eval weights) in `params`."""
    params = list(params)
    with torch.no_grad():
        backup = {n: p.detach().clone() for n, p in params}
        if optimizer is not None:
            optimizer.eval()
        else:
            for n, p in params:
                p.copy_(tensors[n].to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            if optimizer is not None:
                optimizer.train()
            for n, p in params:
                p.copy_(backup[n])


def exported_weights(trainer):
    """The weights a run exports (and previews and scores): the EMA when the trainer keeps one,
    ScheduleFree's averaged sequence, else the trained ones."""
    if trainer.ema is not None:
        return swapped(trainer.params, trainer.ema.shadow)
    if trainer.schedule_free:
        return swapped(trainer.params, optimizer=trainer.optimizer)
    return contextlib.nullcontext()
