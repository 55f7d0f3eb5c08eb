"""3-axis rotary position embedding (text index, image row, image col).

Same maths and pair layout as ComfyUI's flux `EmbedND` + `apply_rope` (adjacent pairs rotated),
so a test can check one against the other; kept here so the core needs no ComfyUI.
"""
from __future__ import annotations

import torch


def rope_freqs(ids: torch.Tensor, dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """ids [L, n_axes] -> [L, sum(dims)//2, 2] holding (cos, sin) of each rotated pair."""
    angles = []
    for axis, d in enumerate(dims):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        angles.append(ids[:, axis].double()[:, None] * omega[None])
    a = torch.cat(angles, dim=-1)
    return torch.stack([a.cos(), a.sin()], dim=-1).float()


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    cos, sin = freqs[None, :, None, :, 0], freqs[None, :, None, :, 1]
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2).type_as(x)


def apply_rope(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor):
    """q, k [B, L, H, D]; freqs from `rope_freqs` for the same L."""
    return _rotate(q, freqs), _rotate(k, freqs)
