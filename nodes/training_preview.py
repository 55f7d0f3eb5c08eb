"""Helpers of the training nodes (nodes/training.py; a run's files, resume point and loss log are
the core's oboro_model/training/job.py): saving a cast checkpoint, the loss-curve IMAGE, and
preview images sampled from the model being trained with oboro's own ODE sampler (samplers.ode.sample), decoded after training."""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
import torch

from ..samplers.ode import prepare_noise, sample
from .text_encoder import encode_text

log = logging.getLogger("oboro")


# ---- saving -------------------------------------------------------------------------------------
class CastForSaving:
    """What save_checkpoint needs of a model (config, state_dict), with the weights cast."""

    def __init__(self, net, dtype):
        self.config, self.net, self.dtype = net.config, net, dtype

    def state_dict(self):
        return {k: v.detach().to("cpu", self.dtype) for k, v in self.net.state_dict().items()}


# ---- images -------------------------------------------------------------------------------------
def black_image(size: int = 64) -> torch.Tensor:
    return torch.zeros(1, size, size, 3)


def loss_curve_image(history: dict, title: str) -> torch.Tensor:
    """IMAGE [1, 450, 800, 3]: raw loss, its bias-corrected EMA, spikes the guard caught (red x),
    resume points (dashed) and the validation loss with its best point (orange). matplotlib's object API on an Agg canvas: no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps, losses = history["step"], history["loss"]
    finite = [(s, v) for s, v in zip(steps, losses) if v is not None and math.isfinite(v)]
    if finite:
        xs, ys = zip(*finite)
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, linewidth=0.8, label="loss")
        beta, avg, ema = 0.95 if len(ys) > 50 else 0.8, 0.0, []
        for i, v in enumerate(ys):
            avg = beta * avg + (1 - beta) * v
            ema.append(avg / (1 - beta ** (i + 1)))
        ax.plot(xs, ema, color="tab:blue", linewidth=1.8, label=f"EMA ({beta})")
        top = max(ys)
        spikes = [(s, v if v is not None and math.isfinite(v) else top) for s, v in zip(steps, losses)
                  if s in set(history["spikes"])]
        if spikes:
            sx, sy = zip(*spikes)
            ax.scatter(sx, [min(v, top) for v in sy], marker="x", color="tab:red", zorder=3,
                       label=f"spike caught ({len(spikes)})")
        val = [(s, v) for s, v in zip(history.get("val_step", []), history.get("val_loss", []))
               if v is not None and math.isfinite(v)]
        if val:
            vx, vy = zip(*val)
            ax.plot(vx, vy, color="tab:orange", marker="o", markersize=3, linewidth=1.5, label="validation")
            b = min(range(len(vy)), key=vy.__getitem__)
            ax.scatter([vx[b]], [vy[b]], marker="*", s=120, color="tab:orange", edgecolor="black", zorder=4,
                       label=f"best validation (step {vx[b]})")
        for i, s in enumerate(history["resumed_at"]):
            ax.axvline(s, color="gray", linestyle="--", linewidth=0.8, label="resumed" if i == 0 else None)
        ax.legend(loc="upper right")
    else:
        ax.text(0.5, 0.5, "no training steps recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("I-CFM loss (MSE)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).float().div_(255.0)[None]


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

    def images(self, latent_format, vae=None) -> Optional[torch.Tensor]:
        """IMAGE [rows, H, W * prompts, 3]: one row per preview step, prompts side by side."""
        if not self.rows:
            return None
        out = []
        for lat in self.rows:
            if vae is not None:
                img = vae.decode(latent_format.process_out(lat)).float().cpu()
                img = img.reshape(-1, *img.shape[-3:])
            elif lat.shape[1] == 3:  # pixel space: the pixel_space VAE's decode is (x + 1) / 2
                img = ((latent_format.process_out(lat) + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
            else:
                return None
            out.append(torch.cat(list(img), dim=1))
        return torch.stack(out)
