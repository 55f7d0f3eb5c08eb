"""The Trainer's data order: which dataset indices each optimiser step takes.

Every step draws its batch_size * grad_accum * world_size samples (and their noise) at once, so a
step must come from one aspect bucket: latents of different shapes do not stack. One bucket: a
fresh seeded permutation per epoch, and a step may span two epochs. Several buckets: an epoch is
a seeded shuffle of whole steps: each bucket's indices are permuted, cut into runs of one step,
the last run topped up from the start of the same permutation, and the runs shuffled. Both draw
only from the Trainer's `data_gen`, whose state (with the order and position) is in every
training state, so a resumed run continues with exactly the batches an uninterrupted one gets.
Data-parallel ranks draw the same order and each takes its slice of every step.
"""
from __future__ import annotations

import torch

from ..data.buckets import bucket_groups


def epoch_order(groups: list[list[int]], run: int, generator: torch.Generator) -> torch.Tensor:
    """One epoch's indices; with several groups, its length is a multiple of `run` and every run
    of `run` consecutive indices lies in one group."""
    if len(groups) < 2:
        n = sum(len(g) for g in groups)
        idx = torch.tensor(groups[0]) if groups else torch.zeros(0, dtype=torch.long)
        return idx[torch.randperm(n, generator=generator)]
    runs = []
    for idx in groups:
        perm = torch.tensor(idx)[torch.randperm(len(idx), generator=generator)]
        if len(perm) % run:
            perm = torch.cat([perm, perm.repeat(run)[:run - len(perm) % run]])
        runs += list(perm.split(run))
    return torch.cat([runs[i] for i in torch.randperm(len(runs), generator=generator).tolist()])


class DataOrder:
    """Seeded, resumable order over a dataset's buckets (see the module docstring). `order`,
    `pos` and `epoch` are saved and restored by training/state.py together with the generator."""

    def __init__(self, dataset, generator: torch.Generator):
        self.groups = bucket_groups(dataset)
        self.generator = generator
        self.order, self.epoch, self.pos = torch.zeros(0, dtype=torch.long), 0, 0

    def new_epoch(self, n: int) -> torch.Tensor:
        """The next epoch's indices (steps of n); datasets.MixtureOrder weighs several sources."""
        return epoch_order(self.groups, n, self.generator)

    def take(self, n: int) -> list[int]:
        """The next n indices (one step); with several buckets all from one bucket."""
        out: list[int] = []
        while len(out) < n:
            if self.pos >= len(self.order):
                self.order, self.pos = self.new_epoch(n), 0
                self.epoch += 1
            take = min(n - len(out), len(self.order) - self.pos)
            out += self.order[self.pos:self.pos + take].tolist()
            self.pos += take
        return out


def collate(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack latents; right-pad texts of different lengths with zeros and a False mask."""
    latent = torch.stack([it["latent"] for it in items])
    L = max(it["text"].shape[0] for it in items)
    text = torch.zeros(len(items), L, items[0]["text"].shape[1], dtype=items[0]["text"].dtype)
    mask = torch.zeros(len(items), L, dtype=torch.bool)
    for i, it in enumerate(items):
        n = it["text"].shape[0]
        text[i, :n] = it["text"]
        mask[i, :n] = it["text_mask"].bool() if it.get("text_mask") is not None else True
    return latent, text, mask
