"""Per-sample and per-pixel loss weights of a micro-batch: a source's loss weight (regularization
sets, datasets.py) and, with masked_loss, the item's loss mask (a latent-resolution map stored in
the cache by OboroCacheLatents from a mask folder or the image's alpha; oboro_model/data/masks.py).
None when nothing weighs, so unweighted runs compute exactly what they always did."""
from __future__ import annotations

from typing import Optional

import torch


def sample_weights(items: list[dict]) -> Optional[torch.Tensor]:
    """[B] loss weights, or None when every item weighs 1."""
    w = [float(it.get("loss_weight", 1.0)) for it in items]
    return None if all(v == 1.0 for v in w) else torch.tensor(w)


def pixel_weights(items: list[dict], masked_loss: bool) -> Optional[torch.Tensor]:
    """[B, 1, h, w] loss masks (items without one weigh 1 everywhere), or None when masked_loss is
    off or no item of the batch has a mask."""
    if not masked_loss or not any(it.get("loss_mask") is not None for it in items):
        return None
    h, w = items[0]["latent"].shape[-2:]
    out = torch.ones(len(items), 1, h, w)
    for b, it in enumerate(items):
        m = it.get("loss_mask")
        if m is not None:
            if tuple(m.shape[-2:]) != (h, w):
                raise ValueError(f"{it.get('file', 'item')}: loss mask {tuple(m.shape)} does not match its latent "
                                 f"{tuple(it['latent'].shape)}; rebuild the cache")
            out[b, 0] = m.float()
    return out
