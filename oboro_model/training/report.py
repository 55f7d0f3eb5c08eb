"""What a run leaves beside its states for a person to look at, whichever front end ran it:
`loss_curve.png` (loss, its EMA, caught spikes, resume points, validation) and `samples.png`, a
grid sampled from the exported weights on the first cached captions (the cache's own T5 states,
so no text encoder is needed; CFG 5 against the cache's empty prompt, seed i per caption). A
pixel-space model's samples are images; a latent model's are shown as a latent preview (the first
three channels, normalised), since the core has no VAE: decode with ComfyUI for real images."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...samplers.ode import prepare_noise, sample
from .batching import collate
from .loss import PRECISIONS
from .swap import exported_weights

logger = logging.getLogger(__name__)
LOSS_PNG, SAMPLES_PNG = "loss_curve.png", "samples.png"


def loss_curve(history: dict, title: str) -> np.ndarray:
    """RGB uint8 [450, 800, 3]: raw loss, its bias-corrected EMA, spikes the guard caught (red x),
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
    return rgba[..., :3].copy()


@torch.no_grad()
def sample_grid(trainer, n: int, steps: int = 20, cfg: float = 5.0) -> np.ndarray:
    """RGB uint8 [H, n * W, 3]: the first n items' captions of the training data, sampled."""
    data = trainer.dataset
    items = [data[i] for i in range(min(n, len(data)))]
    shape = items[0]["latent"].shape
    items = [it for it in items if it["latent"].shape == shape]  # one bucket
    _, text, mask = collate(items)
    dev, model = trainer.device, trainer.model
    neg = None
    if trainer.empty_text is not None:
        e = trainer.empty_text[None].to(dev)
        em = (trainer.empty_mask[None] if trainer.empty_mask is not None else torch.ones(1, e.shape[1])).to(dev)
        neg = (e, em)
    noise = torch.cat([prepare_noise(torch.zeros(1, *shape), i) for i in range(len(items))]).to(dev)
    amp = PRECISIONS[trainer.config.precision]
    was = model.training
    model.eval()
    try:
        with exported_weights(trainer), torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            x = sample(model, noise.to(trainer.input_dtype), (text.to(dev, trainer.input_dtype), mask.to(dev)), neg,
                       steps=steps, cfg=cfg if neg is not None else 1.0)
    finally:
        model.train(was)
    x = x.float().cpu()[:, :3]
    if shape[0] == 3:
        img = ((x + 1) / 2).clamp(0, 1)
    else:
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        img = (x - lo) / (hi - lo).clamp_min(1e-6)
    grid = torch.cat(list(img.movedim(1, -1)), dim=1)
    return (grid.numpy() * 255).round().astype(np.uint8)


def write_report(trainer, history: dict, folder, samples: int, title: str) -> dict:
    """Write loss_curve.png (and samples.png with samples > 0) into `folder`; returns their paths."""
    folder, out = Path(folder), {}
    Image.fromarray(loss_curve(history, title)).save(folder / LOSS_PNG)
    out["loss_curve"] = str(folder / LOSS_PNG)
    if samples > 0 and hasattr(trainer.model, "config"):  # a mask adapter needs masks to sample
        try:
            Image.fromarray(sample_grid(trainer, samples)).save(folder / SAMPLES_PNG)
            out["samples"] = str(folder / SAMPLES_PNG)
        except Exception as e:  # a picture must never cost the user the trained model
            logger.warning("could not render the sample grid: %s", e)
    return out
