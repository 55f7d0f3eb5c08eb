"""The I-CFM training objective (Tong et al. 2023) and the randomness it consumes.

    x0 ~ N(0, I),  x1 = data latent,  t ~ p(t),  x_t = t*x1 + (1-t)*x0 + sigma*eps,  u = x1 - x0
    loss = mean_b  mean_{c,h,w} (model(x_t, t, text) - u)^2

The path itself comes from `samplers.icfm`, the single definition the ODE samplers integrate, so
training and sampling can never disagree on the convention (t = 1 is data). Everything random is
drawn from an explicit generator by the caller, which keeps training resumable bit for bit.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...samplers.icfm import icfm_sample
from ...samplers.ode import flow_shift

PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes

T_SAMPLING = ("uniform", "logit_normal", "shifted")


def sample_t(n: int, generator: Optional[torch.Generator] = None, kind: str = "uniform",
             mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """[n] times in [0, 1). "logit_normal" (SD3) is sigmoid(N(mean, std)): it puts more steps at
    mid-path, where the velocity is hardest to predict; mean < 0 leans toward noise. "shifted" is
    uniform noise level sigma = 1 - t warped by the SD3 / ComfyUI flow shift (the sampler's `shift`,
    samplers.ode.flow_shift): shift > 1 trains more near noise, as high resolutions need. Every kind
    draws n numbers, so switching kinds never shifts the rest of the random stream's layout."""
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    if kind == "shifted":
        if not shift > 0:
            raise ValueError(f"t sampling 'shifted' needs shift > 0, got {shift}")
        return 1.0 - flow_shift(torch.rand(n, generator=generator), shift)
    raise ValueError(f"unknown t sampling {kind!r}; choose one of {T_SAMPLING}")


def caption_dropout_mask(n: int, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[n] bool, True = drop that caption. Always draws n numbers so the random stream does not
    depend on p (changing p mid-run does not shift every later draw)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout probability must be in [0, 1], got {p}")
    return torch.rand(n, generator=generator) < p


def drop_captions(text: torch.Tensor, text_mask: torch.Tensor, drop: torch.Tensor,
                  empty_text: Optional[torch.Tensor] = None, empty_mask: Optional[torch.Tensor] = None):
    """Replace the captions selected by `drop` with the empty prompt, so the model also learns the
    unconditional velocity classifier-free guidance needs.

    Without `empty_text` the empty prompt is zero-length: every text token is masked out and the
    model attends only to its BOS token (identical to passing L = 0 text). With `empty_text`
    [Le, D] (e.g. T5's encoding of "", what ComfyUI feeds as the negative prompt) those rows get
    that embedding instead, right-padded to the common length."""
    drop = drop.to(text.device)
    mask = text_mask.to(device=text.device, dtype=torch.bool)
    if not bool(drop.any()):
        return text, mask
    if empty_text is None:
        return text.masked_fill(drop[:, None, None], 0.0), mask & ~drop[:, None]
    Le = empty_text.shape[0]
    em = torch.ones(Le, dtype=torch.bool) if empty_mask is None else empty_mask.bool()
    L = max(text.shape[1], Le)
    text = torch.nn.functional.pad(text, (0, 0, 0, L - text.shape[1]))
    mask = torch.nn.functional.pad(mask, (0, L - mask.shape[1]))
    et = torch.zeros(L, text.shape[2], dtype=text.dtype, device=text.device)
    et[:Le] = empty_text.to(device=text.device, dtype=text.dtype)
    emf = torch.zeros(L, dtype=torch.bool, device=text.device)
    emf[:Le] = em.to(text.device)
    return torch.where(drop[:, None, None], et, text), torch.where(drop[:, None], emf, mask)


def icfm_loss(model, x1: torch.Tensor, text: torch.Tensor, text_mask: Optional[torch.Tensor],
              t: torch.Tensor, x0: torch.Tensor, sigma: float = 0.0, eps: Optional[torch.Tensor] = None,
              reduction: str = "mean", pixel_weight: Optional[torch.Tensor] = None,
              sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between the model's velocity at (x_t, t) and u = x1 - x0; per sample ([B]) with
    reduction="none". The error is taken in fp32 even under autocast: bf16 squared errors lose the
    small differences late training depends on. `pixel_weight` [B, 1, h, w] (masked loss) weighs
    each position's squared error before the mean (kohya: not renormalised, so a half-masked image
    contributes about half); `sample_weight` [B] weighs each sample's loss (regularization)."""
    if sigma and eps is None:
        raise ValueError("sigma > 0 needs eps (draw it from the trainer's generator for reproducibility)")
    xt, u = icfm_sample(x0, x1, t, sigma=sigma, eps=eps)
    pred = model(xt, t, text, text_mask)
    err = (pred.float() - u.float()).pow(2)
    if pixel_weight is not None:
        err = err * pixel_weight.to(err.device, torch.float32)
    per_sample = err.flatten(1).mean(1)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.to(per_sample.device, torch.float32)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"unknown reduction {reduction!r}")
