"""Sampling the I-CFM ODE dx/dt = u(x, t) from noise (t = 0) to data (t = 1), in pure PyTorch.

The same solvers run standalone (`sample`, on an MMHDiT-like callable) and inside ComfyUI
(nodes/sampling.py wraps a ComfyUI denoiser as a velocity fn), so there is one implementation.

Time grid: ComfyUI counts sigma = 1 - t (1 = noise). The SD3 / ComfyUI flow shift warps sigma,
sigma' = shift * sigma / (1 + (shift - 1) * sigma); shift > 1 spends more steps near noise. Our
grid is uniform in the unwarped coordinate between the warped end points, so it starts exactly
at t0 = 1 - denoise for any shift (img2img keeps a fraction `denoise` of the path), and for
denoise = 1 it equals ComfyUI's "simple" schedule on a model with the same shift.

Noise: drawn on the CPU from a generator seeded with `seed`, the stream comfy.sample.prepare_noise
uses, so the same seed gives KSampler and us the same starting noise.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

Velocity = Callable[[torch.Tensor, float], torch.Tensor]       # v(x, t) with t a float in [0, 1]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]  # (step, total, x, denoised)
Cond = Union[torch.Tensor, Tuple[torch.Tensor, Optional[torch.Tensor]]]  # text or (text, mask)

__all__ = ["SOLVERS", "NFE", "OPEN_END", "flow_shift", "sigma_grid", "time_grid", "solve", "prepare_noise",
           "cfg_velocity", "sample"]


# --- solvers: one step from t to t1 = t + h, given k1 = v(x, t) (already computed for the callback) ---

def _euler(v, x, t, h, t1, k1):
    return x + h * k1


def _heun(v, x, t, h, t1, k1):
    k2 = v(x + h * k1, t1)
    return x + (h / 2) * (k1 + k2)


def _ralston2(v, x, t, h, t1, k1):
    """Ralston's 2nd-order method: heun's family with the second stage at 2/3 of the step."""
    k2 = v(x + (2 * h / 3) * k1, t + 2 * h / 3)
    return x + (h / 4) * (k1 + 3 * k2)


def _midpoint(v, x, t, h, t1, k1):
    k2 = v(x + (h / 2) * k1, t + h / 2)
    return x + h * k2


def _rk4(v, x, t, h, t1, k1):
    k2 = v(x + (h / 2) * k1, t + h / 2)
    k3 = v(x + (h / 2) * k2, t + h / 2)
    k4 = v(x + h * k3, t1)
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


def _ralston3(v, x, t, h, t1, k1):
    """Ralston's 3rd-order method, stages at 0, 1/2, 3/4 of the step."""
    k2 = v(x + (h / 2) * k1, t + h / 2)
    k3 = v(x + (3 * h / 4) * k2, t + 3 * h / 4)
    return x + (h / 9) * (2 * k1 + 3 * k2 + 4 * k3)


SOLVERS = {"euler": _euler, "heun": _heun, "midpoint": _midpoint, "rk4": _rk4}
NFE = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4}  # model evaluations per step (x2 with CFG)
# With open_end, a step ending at t = 1 must not evaluate v there. One step of local error
# O(h^(p+1)) keeps global order p, so heun (p=2) may end with a 2nd-order and rk4 (p=4) with a
# 3rd-order method whose stages lie inside the step: the convergence order is unchanged.
OPEN_END = {"heun": _ralston2, "rk4": _ralston3}


# --- time grid ---

def flow_shift(sigma, shift: float):
    """ComfyUI's time_snr_shift / SD3 shift, applied to sigma = 1 - t."""
    if shift == 1.0:
        return sigma
    return shift * sigma / (1 + (shift - 1) * sigma)


def _inverse_shift(sigma: float, shift: float) -> float:
    return sigma / (shift - (shift - 1) * sigma)


def sigma_grid(steps: int, shift: float = 1.0, denoise: float = 1.0) -> torch.Tensor:
    """steps + 1 decreasing sigmas (float64) from `denoise` to 0; see the module docstring."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be in [0, 1], got {denoise}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = torch.linspace(_inverse_shift(float(denoise), shift), 0.0, int(steps) + 1, dtype=torch.float64)
    sigmas = flow_shift(u, shift)
    sigmas[0], sigmas[-1] = float(denoise), 0.0  # exact end points despite rounding
    return sigmas


def time_grid(steps: int, shift: float = 1.0, denoise: float = 1.0) -> torch.Tensor:
    """steps + 1 increasing times (float64) from t0 = 1 - denoise to 1."""
    return 1.0 - sigma_grid(steps, shift, denoise)


# --- the ODE loop ---

def solve(velocity: Velocity, x: torch.Tensor, ts: Union[torch.Tensor, Sequence[float]], solver: str = "euler",
          callback: Optional[Callback] = None, open_end: bool = False) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) over the grid ts. Before each step, callback(step, total, x,
    denoised) gets the state and the predicted data sample denoised = x + (1 - t) * v(x, t) (what
    ComfyUI calls denoised / x0): for progress, previews and interruption (raise to stop).

    open_end=True never evaluates v at t = 1 (a ComfyUI denoiser carries no velocity at sigma = 0):
    steps ending there use OPEN_END's same-order replacements (euler, midpoint need none)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
    step_fn = SOLVERS[solver]
    ts = [float(t) for t in (ts.tolist() if isinstance(ts, torch.Tensor) else ts)]
    total = len(ts) - 1
    for i in range(total):
        t, t1 = ts[i], ts[i + 1]
        h = t1 - t
        if h == 0:
            continue
        k1 = velocity(x, t)
        if callback is not None:
            callback(i, total, x, x + (1.0 - t) * k1)
        fn = OPEN_END.get(solver, step_fn) if open_end and t1 >= 1.0 else step_fn
        x = fn(velocity, x, t, h, t1, k1)
    return x


# --- noise, guidance, sampling ---

def prepare_noise(latent: torch.Tensor, seed: int, batch_inds=None) -> torch.Tensor:
    """comfy.sample.prepare_noise without touching the global RNG: N(0, I) shaped like `latent`,
    drawn on the CPU; with batch_inds, sample i gets the batch_inds[i]-th draw of the stream."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    kw = dict(dtype=latent.dtype, layout=latent.layout, generator=g, device="cpu")
    if batch_inds is None:
        return torch.randn(latent.size(), **kw)
    unique, inverse = np.unique(batch_inds, return_inverse=True)
    draws = {}
    for i in range(unique[-1] + 1):
        n = torch.randn([1] + list(latent.size())[1:], **kw)
        if i in unique:
            draws[i] = n
    return torch.cat([draws[unique[j]] for j in inverse], dim=0)


def _split(cond: Cond, batch: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    text, mask = cond if isinstance(cond, (tuple, list)) else (cond, None)
    if mask is None:
        mask = torch.ones(text.shape[:2], dtype=torch.long, device=text.device)
    if text.shape[0] != batch:
        text, mask = text.expand(batch, *text.shape[1:]), mask.expand(batch, -1)
    return text.to(device), mask.to(device)


def _pad(text: torch.Tensor, mask: torch.Tensor, length: int):
    extra = length - text.shape[1]
    if extra == 0:
        return text, mask
    return (torch.cat([text, text.new_zeros(text.shape[0], extra, text.shape[2])], dim=1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1))


def cfg_velocity(model, x: torch.Tensor, t, positive: Cond, negative: Optional[Cond], cfg: float = 5.0,
                 batched: bool = True) -> torch.Tensor:
    """Classifier-free guidance on the velocity: u = u_neg + cfg * (u_pos - u_neg).

    model(x, t[B], text, mask) -> u. Conds are text [B|1, L, D] or (text, mask [B|1, L]). Batched,
    both prompts are zero-padded to a common length with mask 0 and run in one forward; masked keys
    are excluded from attention and padding moves no RoPE position, so it equals two forwards."""
    B = x.shape[0]
    tt = t.to(x) if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=x.dtype, device=x.device)
    tt = tt.expand(B) if tt.ndim == 0 else tt
    pos = _split(positive, B, x.device)
    if negative is None or cfg == 1.0:
        return model(x, tt, *pos)
    neg = _split(negative, B, x.device)
    if not batched:
        u_pos, u_neg = model(x, tt, *pos), model(x, tt, *neg)
    else:
        L = max(pos[0].shape[1], neg[0].shape[1])
        (tp, mp), (tn, mn) = _pad(*pos, L), _pad(*neg, L)
        out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([tp, tn.to(tp.dtype)]), torch.cat([mp, mn]))
        u_pos, u_neg = out.chunk(2)
    return u_neg + cfg * (u_pos - u_neg)


@torch.no_grad()
def sample(model, noise: torch.Tensor, positive: Cond, negative: Optional[Cond] = None, steps: int = 20,
           cfg: float = 5.0, solver: str = "euler", shift: float = 1.0, denoise: float = 1.0,
           latent: Optional[torch.Tensor] = None, callback: Optional[Callback] = None,
           open_end: bool = True) -> torch.Tensor:
    """Text-to-image (latent None) or img2img: start at t0 = 1 - denoise from
    x = t0 * latent + (1 - t0) * noise and integrate the guided velocity to t = 1.
    denoise = 0 returns `latent` unchanged (no model call). open_end (see `solve`) defaults to True,
    the scheme OboroSampler must use, so both give the same numbers for the same seed."""
    latent = torch.zeros_like(noise) if latent is None else latent
    if denoise == 0:
        return latent
    ts = time_grid(steps, shift, denoise)
    t0 = float(ts[0])
    x = t0 * latent + (1.0 - t0) * noise.to(latent)
    return solve(lambda x, t: cfg_velocity(model, x, t, positive, negative, cfg), x, ts, solver, callback, open_end)
