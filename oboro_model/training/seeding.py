"""Training draws from the global torch RNG too (dropout, peft's LoRA init); in a long-lived server
that RNG holds whatever earlier jobs left in it, so a run would depend on them. `seeded_rng` runs
a block on the global RNG seeded from the run's seed and gives the caller's RNG state back after
(a resumed run then restores the saved RNG state inside the block, as before)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def seeded_rng(seed: int, device=None):
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield
