"""Pictures of the training nodes: the loss-curve IMAGE and previews sampled from the model being
trained with oboro's own ODE sampler (samplers.ode.sample), decoded live and at the end."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..samplers.ode import prepare_noise, sample
from .text_encoder import encode_text

log = logging.getLogger("oboro")


# ---- saving -------------------------------------------------------------------------------------
# ---- images -------------------------------------------------------------------------------------
def black_image(size: int = 64) -> torch.Tensor:
    return torch.zeros(1, size, size, 3)


def loss_curve_image(history: dict, title: str) -> torch.Tensor:
    """IMAGE [1, 450, 800, 3] of the core's loss curve (oboro_model/training/report.py)."""
    from ..oboro_model.training.report import loss_curve
    return torch.from_numpy(loss_curve(history, title)).float().div_(255.0)[None]


# ---- previews -----------------------------------------------------------------------------------
def encode_plain(clip, text: str, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [L, D] fp32, mask [L]) on the CPU, as plain (not inference-mode) tensors."""
    conds, _ = encode_text(clip, text, max_tokens)
    cond, extra = conds[0]
    with torch.inference_mode(False):
        return cond[0].float().cpu().clone(), extra["attention_mask"][0].cpu().clone()


class Previews:
    """Renders `prompts` (seed preview_seed + i each, the noise OboroSampler draws for that seed)
    with the model being trained, CFG against the empty prompt; keeps latents on the CPU."""

    def __init__(self, clip, prompts: list[str], latent_shape, steps: int, cfg: float, seed: int,
                 max_tokens: int = 256):
        self.steps, self.cfg, self.rows, self.row_steps = steps, cfg, [], []
        conds = [encode_plain(clip, p, max_tokens) for p in prompts]
        L = max(t.shape[0] for t, _ in conds)
        self.text = torch.stack([torch.cat([t, t.new_zeros(L - t.shape[0], t.shape[1])]) for t, _ in conds])
        self.mask = torch.stack([torch.cat([m.long(), m.new_zeros(L - m.shape[0]).long()]) for _, m in conds])
        self.negative = encode_plain(clip, "", max_tokens)
        with torch.inference_mode(False):
            zeros = torch.zeros(1, *latent_shape)
            self.noise = torch.cat([prepare_noise(zeros, seed + i) for i in range(len(prompts))])

    @torch.no_grad()
    def render(self, model: torch.nn.Module, step: int, device, amp: Optional[torch.dtype] = None) -> None:
        was_training = model.training
        model.eval()
        try:
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                neg = tuple(t[None].to(device) for t in self.negative)
                x = sample(model, self.noise.to(device), (self.text.to(device), self.mask.to(device)), neg,
                           steps=self.steps, cfg=self.cfg)
            self.rows.append(x.float().cpu())
            self.row_steps.append(step)
        finally:
            model.train(was_training)

    def decode(self, lat: torch.Tensor, latent_format, vae=None) -> Optional[torch.Tensor]:
        """IMAGE [N, H, W, 3] of one row's latents; None for a latent model without a VAE."""
        if vae is not None:
            img = vae.decode(latent_format.process_out(lat)).float().cpu()
            return img.reshape(-1, *img.shape[-3:])
        if lat.shape[1] == 3:  # pixel space: the pixel_space VAE's decode is (x + 1) / 2
            return ((latent_format.process_out(lat) + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
        return None

    def images(self, latent_format, vae=None) -> Optional[torch.Tensor]:
        """IMAGE [rows, H, W * prompts, 3]: one row per preview step, prompts side by side."""
        rows = [self.decode(lat, latent_format, vae) for lat in self.rows]
        if not rows or rows[0] is None:
            return None
        return torch.stack([torch.cat(list(img), dim=1) for img in rows])
