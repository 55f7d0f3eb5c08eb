"""I-CFM (independent conditional flow matching, Tong et al. 2023): the probability path and the
regression target used to train oboro, and the convention every sampler here integrates.

    x_t = t * x1 + (1 - t) * x0 + sigma * eps,    u_t = x1 - x0

with x0 ~ N(0, I) noise, x1 data, t in [0, 1] (t = 0 noise, t = 1 data). With sigma = 0 (oboro's
setting) this is rectified flow; the model learns E[u_t | x_t], an ODE velocity field in t.
Identical to torchcfm's ConditionalFlowMatcher(sigma).sample_xt / compute_conditional_flow.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["icfm_sample", "icfm_target", "icfm_path"]


def _pad_like(t: Union[torch.Tensor, float], x: torch.Tensor):
    """Per-sample t of shape [B] (or a scalar) broadcast over x's non-batch dims."""
    if not isinstance(t, torch.Tensor) or t.ndim == 0:
        return t
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def icfm_path(x0: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
    """The noiseless interpolant t * x1 + (1 - t) * x0 (the path's mean)."""
    t = _pad_like(t, x0)
    return t * x1 + (1 - t) * x0


def icfm_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The conditional velocity u = x1 - x0; independent of t and sigma."""
    return x1 - x0


def icfm_sample(x0: torch.Tensor, x1: torch.Tensor, t, sigma: float = 0.0,
                eps: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None):
    """Returns (x_t, u). `t` is a float or a [B] tensor. `eps` defaults to fresh N(0, I) noise, drawn
    only when sigma != 0 (so sigma = 0 consumes no randomness)."""
    xt = icfm_path(x0, x1, t)
    if sigma:
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                              device=generator.device if generator is not None else x0.device).to(x0.device)
        xt = xt + sigma * eps
    return xt, icfm_target(x0, x1)
