"""A training run's bookkeeping inside run.run(): the loss log kept next to the states (resumed
with them), tracker records, and the summary every front end reports. Pure Python / JSON."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write
from .state import list_checkpoints

logger = logging.getLogger(__name__)
LOSS_LOG = "loss_log.json"


def new_history() -> dict:
    return {"step": [], "loss": [], "lr": [], "spikes": [], "resumed_at": [], "val_step": [], "val_loss": []}


def load_history(state_file: Optional[Path], upto: int) -> dict:
    """The loss log next to a resumed state, cut to the steps that state has seen."""
    h = new_history()
    if state_file is None:
        return h
    try:
        old = json.loads((Path(state_file).parent / LOSS_LOG).read_text(encoding="utf-8"))
        keep = [i for i, s in enumerate(old["step"]) if s <= upto]
        h.update({k: [old[k][i] for i in keep] for k in ("step", "loss", "lr")})
        h["spikes"] = [s for s in old.get("spikes", []) if s <= upto]
        h["resumed_at"] = [s for s in old.get("resumed_at", []) if s <= upto]
        val = [(s, v) for s, v in zip(old.get("val_step", []), old.get("val_loss", [])) if s <= upto]
        h["val_step"], h["val_loss"] = [s for s, _ in val], [v for _, v in val]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        logger.info("oboro training: no usable %s next to %s; the loss curve starts at step %d", LOSS_LOG,
                    state_file, upto)
    if upto:
        h["resumed_at"].append(upto)
    return h


def save_history(state_dir: Path, history: dict) -> None:
    text = json.dumps(history, allow_nan=True)
    atomic_write(Path(state_dir) / LOSS_LOG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), fsync=False)


class Job:
    """One run's bookkeeping: `Job(state_dir, resume)` (the state file run.pick_folder chose, or
    None); `start(trainer)` resumes and loads the loss log;
    `record(...)` after every update; `save()` writes the loss log (main process only);
    `summary()` is what the front ends report. With a `tracker` (tracking.Tracker) every record
    is also logged there: loss, lr, spikes, validation."""

    def __init__(self, state_dir, resume: Optional[Path] = None, what: str = "training", is_main: bool = True,
                 tracker=None):
        self.state_dir, self.what, self.is_main, self.tracker = Path(state_dir), what, is_main, tracker
        self.resume = resume
        self.history, self.start_step, self.t0, self._spikes = new_history(), 0, time.time(), 0

    def start(self, trainer) -> None:
        if self.resume is not None:
            trainer.resume(self.resume)
        self.start_step = trainer.step
        self.history = load_history(self.resume, trainer.step)
        self._spikes = trainer.guard.spikes if trainer.guard is not None else 0

    def record(self, trainer, step: int, loss: float, lr: float) -> None:
        """Append one update to the loss log; a spike the guard caught (or a non-finite loss) is marked."""
        h = self.history
        spikes = trainer.guard.spikes if trainer.guard is not None else self._spikes + (not math.isfinite(loss))
        for key, v in (("step", step), ("loss", loss), ("lr", lr)):
            h[key].append(v)
        values = {"train/loss": loss, "train/lr": lr}
        if spikes > self._spikes:
            h["spikes"].append(step)
            values["train/spike"] = loss
        self._spikes = spikes
        val = getattr(trainer, "validation", None)
        if val is not None and val.last_step == step:
            h["val_step"].append(step)
            h["val_loss"].append(val.last_loss)
            values.update({"val/loss": val.last_loss, "val/best": val.best_loss})
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in values.items() if math.isfinite(v)}, step)

    def save(self) -> None:
        if self.is_main:
            save_history(self.state_dir, self.history)

    def summary(self, trainer, **extra) -> dict:
        states = list_checkpoints(self.state_dir)
        h = self.history
        val = getattr(trainer, "validation", None)
        if val is not None:
            extra = {"val_loss": h["val_loss"][-1] if h["val_loss"] else None,
                     "best_val_loss": val.state_dict()["best_loss"], "best_step": val.best_step, **extra}
        return {"state_dir": str(self.state_dir), "last_state": str(states[-1]) if states else None,
                "start_step": self.start_step, "step": trainer.step, "spikes": len(h["spikes"]),
                "final_loss": h["loss"][-1] if h["loss"] else None, **extra,
                "seconds": round(time.time() - self.t0, 1)}

    def close(self) -> None:
        """Flush and close the tracker (after the last record and images)."""
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
