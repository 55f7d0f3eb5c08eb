"""Experiment trackers (TensorBoard, Weights & Biases) for every training front end, through
`accelerate.tracking`'s tracker classes: the same ones `Accelerator(log_with=...)` builds, used here
directly because the nodes run without an Accelerator. Only the main process writes. A run logs
under <state dir>/logs/<run name>: train/loss, train/lr, train/spike (the loss of each update the
spike guard set aside), val/loss, val/best and preview images. Nothing here touches the training's
random streams or weights."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)
TRACKERS = ("none", "tensorboard", "wandb")


class Tracker:
    """`kind` in TRACKERS; `none` (or not the main process) makes every call a no-op."""

    def __init__(self, kind: str, logging_dir, run_name: str, config: Optional[dict] = None, is_main: bool = True):
        if kind not in TRACKERS:
            raise ValueError(f"unknown log_with {kind!r}; choose one of {TRACKERS}")
        self.kind, self.tracker = kind, None
        self.logging_dir = Path(logging_dir)
        if kind == "none" or not is_main:
            return
        from accelerate import PartialState, tracking
        PartialState()  # accelerate's trackers log through its logger, which needs the (single-process) state
        if kind == "tensorboard":
            self.logging_dir.mkdir(parents=True, exist_ok=True)
            t = tracking.TensorBoardTracker(run_name, str(self.logging_dir))
        else:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ImportError("log_with='wandb' needs the wandb package: pip install wandb (and `wandb login`, "
                                  "or WANDB_MODE=offline)") from None
            self.logging_dir.mkdir(parents=True, exist_ok=True)
            t = tracking.WandBTracker(run_name, dir=str(self.logging_dir))
        t.main_process_only = False  # we already know we are the main process; no PartialState needed
        t.start()
        if config:
            try:
                t.store_init_configuration({k: v for k, v in config.items()
                                            if isinstance(v, (int, float, str, bool))})
            except Exception as e:  # hparams are a nicety; never fail a run over them
                logger.warning("tracker %s: could not store the run config: %s", kind, e)
        self.tracker = t
        logger.info("logging to %s (%s)", kind, getattr(t, "logging_dir", self.logging_dir))

    def log(self, values: dict, step: int) -> None:
        if self.tracker is not None and values:
            self.tracker.log(values, step=step)

    def log_images(self, name: str, images, step: int) -> None:
        """images: [N, H, W, 3] floats in [0, 1] (a ComfyUI IMAGE)."""
        if self.tracker is None or images is None:
            return
        import numpy as np
        arr = np.asarray(images.float().clamp(0, 1).cpu().numpy() if hasattr(images, "cpu") else images)
        if self.kind == "tensorboard":
            self.tracker.log_images({name: arr}, step=step, dataformats="NHWC")
        else:
            self.tracker.log_images({name: list(arr)}, step=step)

    def finish(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
