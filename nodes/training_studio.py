"""The studio options of OboroTrainLoRA / OboroTrainFull (validation, EMA, trackers, t-sampling
knobs), as optional node inputs appended after `overwrite` (saved workflows map widget values by
position, so they only ever go at the end) and their mapping onto the engine: each input has the
name of its TrainConfig field / CONFIG.toml key (validation_cache_dir is `[data]`, log_with
`[output]` in the TOML). The logic lives in oboro_model/training (validation.py, tracking.py)."""
from __future__ import annotations

import contextlib
from pathlib import Path

from comfy_api.latest import io

from ..oboro_model.training.tracking import TRACKERS, Tracker

# TrainConfig fields the nodes set from the inputs below (with these defaults when absent)
CONFIG_DEFAULTS = {"ema_decay": 0.0, "ema_start": 0, "t_mean": 0.0, "t_std": 1.0, "t_shift": 1.0,
                   "validation_split": 0.0, "validation_every": 0, "validation_timesteps": 8, "validation_seed": 0}


def inputs() -> list:
    return [
        io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.99999, step=0.0001, round=0.00001, optional=True,
                       tooltip="EMA of the trained weights (e.g. 0.999; 0: off). On: previews, validation and the "
                               "saved file use the EMA weights."),
        io.Int.Input("ema_start", default=0, min=0, max=10_000_000, optional=True,
                     tooltip="The EMA follows the weights exactly up to this step and averages after it."),
        io.Float.Input("validation_split", default=0.0, min=0.0, max=0.9, step=0.01, optional=True,
                       tooltip="Fraction of the cache held out (not trained on) and scored as validation loss; "
                               "which items is fixed by validation_seed. 0: off (or use validation_cache_dir)."),
        io.String.Input("validation_cache_dir", default="", optional=True,
                        tooltip="A second latent cache scored as validation loss (instead of validation_split)."),
        io.Int.Input("validation_every", default=0, min=0, max=10_000_000, optional=True,
                     tooltip="Score the validation set every N steps and at the end (0: at the end only). The best "
                             "state is also saved as <output_name>_best."),
        io.Int.Input("validation_timesteps", default=8, min=1, max=1000, optional=True,
                     tooltip="Validation scores each held-out item at these many fixed t, (k + 0.5) / K."),
        io.Int.Input("validation_seed", default=0, min=0, max=2**31 - 1, control_after_generate=False, optional=True,
                     tooltip="Fixes the held-out items and the validation noise (same seed: comparable runs)."),
        io.Combo.Input("log_with", options=list(TRACKERS), default="none", optional=True,
                       tooltip="Also log losses, LR, validation, spikes and previews to TensorBoard or W&B (pip "
                               "install wandb), under output/oboro_training/<output_name>/logs."),
        io.Float.Input("t_mean", default=0.0, min=-10.0, max=10.0, step=0.01, optional=True,
                       tooltip="t_sampling logit_normal: mean of N(mean, std) before the sigmoid (< 0: nearer noise)."),
        io.Float.Input("t_std", default=1.0, min=0.01, max=10.0, step=0.01, optional=True,
                       tooltip="t_sampling logit_normal: std of N(mean, std)."),
        io.Float.Input("t_shift", default=1.0, min=0.01, max=100.0, step=0.01, optional=True,
                       tooltip="t_sampling shifted: the flow shift of the noise level (> 1: more steps near noise; "
                               "OboroSampler's shift)."),
    ]


def config_kwargs(values: dict) -> dict:
    """TrainConfig keyword arguments from the node's inputs (absent ones: the defaults above)."""
    out = {k: values.get(k, d) for k, d in CONFIG_DEFAULTS.items()}
    out["ema_decay"] = out["ema_decay"] or None
    return out


def validation_cache(values: dict, open_cache, node: str):
    """The validation_cache_dir's cache (opened as the training cache is), or None."""
    path = (values.get("validation_cache_dir") or "").strip()
    return open_cache(path) if path else None


def tracker(values: dict, state_dir: Path, run_name: str, config) -> Tracker:
    import dataclasses
    return Tracker(values.get("log_with") or "none", Path(state_dir) / "logs", run_name, dataclasses.asdict(config))


def export_weights(trainer):
    """Context: the weights to save, the EMA ones when on (restored afterwards)."""
    return trainer.ema.applied(trainer.params) if trainer.ema is not None else contextlib.nullcontext()


def log_previews(job, images, steps) -> None:
    """Each preview row to the tracker at the step it was rendered."""
    if job.tracker is not None and images is not None:
        for row, step in zip(images, steps):
            job.tracker.log_images("previews", row[None], step)
