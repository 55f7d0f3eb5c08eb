"""The training loop: seeded data order, I-CFM loss, accumulation, AMP, clipping, spike guard, EMA
and resumable checkpoints, in plain PyTorch. One process by default; `dist` (see distributed.py)
plugs in data-parallel training: each rank takes its slice of every global batch.

Reproducibility is by construction: the data order comes from `data_gen` and every random draw
of a step (t, x0, caption dropout, eps) from `noise_gen`, both saved in checkpoints; all of a
step's randomness is drawn up front for its batch_size * grad_accum samples, so accumulating
2 x B equals one batch of 2B. Only parameters with requires_grad are trained and saved, so a
LoRA-wrapped model trains the same way.

With `dist` of world size W, batch_size is per rank: every rank draws the same global
batch_size * W * grad_accum samples and randomness, and trains on its slice of each global
micro-batch, so W ranks equal one process with batch_size * W (up to float summation order).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .batching import DataOrder, collate
from .loss import PRECISIONS, T_SAMPLING, caption_dropout_mask, drop_captions, icfm_loss, sample_t
from .optim import EMA, LRSchedule, build_optimizer, build_scheduler, is_schedule_free
from .spike_guard import SpikeGuard
from .validation import Validation
from .weighting import pixel_weights, sample_weights
from .state import (capture, checkpoint_path, latest_checkpoint, prune_checkpoints, read_state, remove_stale_temps,
                    restore, write_state)

logger = logging.getLogger(__name__)


class LocalProcess:
    """The Trainer's hooks for data-parallel training, as a single process (distributed.py has the
    accelerate implementation): rank/world size, wrapping, backward, gradient sync, loss averaging."""
    rank, world_size, is_main = 0, 1, True

    def prepare(self, model, optimizer):
        """-> (model to call forward on, optimizer to step); parameters stay those of `model`."""
        return model, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, model):
        """Context for micro-batches whose gradients need not be synchronised yet."""
        return contextlib.nullcontext()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average over ranks (the loss the spike guard and the log see must agree on all ranks)."""
        return value

    def barrier(self) -> None:
        pass


class StopTraining(Exception):
    """Raise from the callback to end training cleanly: a checkpoint is saved and train() returns."""


@dataclass
class TrainConfig:
    steps: int = 1000                  # total optimiser updates (the LR schedule spans these)
    batch_size: int = 4                # per micro-batch
    grad_accum: int = 1                # micro-batches per update
    lr: float = 1e-4
    weight_decay: float = 0.01
    optimizer: str = "adamw"           # adamw | schedulefree | adamw8bit | prodigy (lr = 1)
    warmup: int = 0
    schedule: str = "constant"         # constant | cosine | linear | step
    min_lr_ratio: float = 0.0
    step_size: int = 1000              # "step" schedule: decay every step_size updates...
    step_gamma: float = 0.5            # ...by this factor
    clip_grad_norm: Optional[float] = 1.0  # None or 0: no clipping
    precision: str = "no"              # no | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    gradient_checkpointing: bool = False
    ema_decay: Optional[float] = None  # e.g. 0.999; None or 0: no EMA
    ema_start: int = 0                 # the EMA follows the weights exactly up to this step, averages after
    caption_dropout: float = 0.1       # p of training a sample unconditionally (for CFG)
    mask_dropout: float = 0.0          # items with "mask_labels" (mask control): p of dropping the mask
    masked_loss: bool = False          # weigh the loss by the items' loss masks (cache built with masks)
    t_sampling: str = "uniform"        # uniform | logit_normal | shifted
    t_mean: float = 0.0                # logit_normal: sigmoid(N(t_mean, t_std))
    t_std: float = 1.0
    t_shift: float = 1.0               # shifted: uniform sigma = 1 - t warped by this flow shift
    sigma: float = 0.0                 # I-CFM path noise; 0 = rectified flow
    spike_guard: bool = True
    spike_k: float = 6.0
    spike_warmup: int = 20
    spike_factor: float = 0.5
    seed: int = 0
    checkpoint_every: int = 0          # 0: only at the end and on interrupt
    keep_last: int = 3                 # <= 0 keeps all
    output_dir: Optional[str] = None   # None: never write checkpoints
    validation_split: float = 0.0      # fraction of the cache held out for validation (front ends split)
    validation_every: int = 0          # score the validation set every N steps (0: at the end only)
    validation_timesteps: int = 8      # the fixed t grid (k + 1/2) / K per held-out item
    validation_seed: int = 0           # the held-out items and their fixed noise

    def __post_init__(self):
        for f in dataclasses.fields(self):  # every number finite, named as given (TOML keys, node inputs)
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} is {v}; give a finite number")
        if self.lr < 0 or self.weight_decay < 0 or (self.clip_grad_norm or 0) < 0 or self.t_std <= 0 \
                or self.t_shift <= 0 or self.sigma < 0:
            raise ValueError(f"lr {self.lr}, weight_decay {self.weight_decay}, clip_grad_norm "
                             f"{self.clip_grad_norm} and sigma {self.sigma} must be >= 0, t_std {self.t_std} and t_shift "
                             f"{self.t_shift} > 0")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"steps, batch_size, grad_accum must be >= 1: {self.steps}, {self.batch_size}, {self.grad_accum}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {sorted(PRECISIONS)}")
        if self.t_sampling not in T_SAMPLING:
            raise ValueError(f"unknown t sampling {self.t_sampling!r}; choose one of {T_SAMPLING}")
        if self.ema_decay and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (0: off), got {self.ema_decay}")
        if not 0.0 <= self.validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {self.validation_split}")
        for name in ("caption_dropout", "mask_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class Trainer:
    """Train `model` (an MMHDiT or anything with its forward) on a map-style `dataset` of
    {"latent": [C,H,W], "text": [L,D], "text_mask": [L]}; items that also hold "mask_labels" [h,w]
    (mask control, oboro_model/mask_control.py) get them batched as forward(..., mask_labels=,
    mask_keep=) with each sample's mask dropped with p = mask_dropout. optimizer/scheduler/guard default to
    the ones `config` describes; a supplied scheduler must apply guard.lr_scale itself.
    `empty_text` [Le, D] (+ `empty_mask`) is the empty-prompt embedding used for caption dropout.
    A dataset with `bucket_of(i)` (LatentCache) is batched so that every step is one bucket.
    `validation` (a held-out dataset, or a validation.Validation) is scored as train() goes."""

    def __init__(self, model: torch.nn.Module, dataset, config: TrainConfig, optimizer=None, scheduler=None,
                 guard: Optional[SpikeGuard] = None, empty_text: Optional[torch.Tensor] = None,
                 empty_mask: Optional[torch.Tensor] = None, dist: Optional[LocalProcess] = None,
                 validation=None):
        c = self.config = config
        self.dist = dist or LocalProcess()
        self.model, self.dataset, self.empty_text, self.empty_mask = model, dataset, empty_text, empty_mask
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no parameters with requires_grad=True")
        self.device = self.params[0][1].device
        self.input_dtype = next(model.parameters()).dtype
        for m in model.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = c.gradient_checkpointing
        self.optimizer = optimizer or build_optimizer((p for _, p in self.params), c.optimizer, c.lr,
                                                      c.weight_decay, warmup_steps=c.warmup)
        self.guard = guard if guard is not None else (
            SpikeGuard(c.spike_k, c.spike_warmup, c.spike_factor) if c.spike_guard else None)
        self.schedule_free = is_schedule_free(self.optimizer)
        if self.schedule_free and c.schedule != "constant":
            raise ValueError("ScheduleFree replaces the LR schedule: use schedule='constant' (warm-up is its own)")
        self.schedule = LRSchedule(c.steps, 0 if self.schedule_free else c.warmup, c.schedule, c.min_lr_ratio,
                                   c.step_size, c.step_gamma)
        self.scheduler = scheduler or build_scheduler(
            self.optimizer, self.schedule, (lambda: self.guard.lr_scale) if self.guard is not None else None)
        # The scheduler (built above) drives the bare optimizer; forward/step go through the wrappers.
        self.forward_model, self.optimizer = self.dist.prepare(model, self.optimizer)
        self.ema = EMA(self.params, c.ema_decay) if c.ema_decay else None
        # validation.Validation (or a dataset to build one): scored in train(), draws no training RNG
        if validation is not None and not hasattr(validation, "score"):
            validation = Validation(validation, c.validation_every, c.validation_timesteps, c.validation_seed)
        self.validation = validation
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.precision == "fp16")
        self.data_gen = torch.Generator().manual_seed(c.seed)
        self.noise_gen = torch.Generator().manual_seed(c.seed + 0x5EED)
        make_order = getattr(dataset, "data_order", None)  # a weighted mixture (datasets.py) brings its own
        self.data_order = make_order(self.data_gen) if make_order is not None else DataOrder(dataset, self.data_gen)
        self.step = 0
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self._saved_step: Optional[int] = None
        self._committing = False
        if c.output_dir and self.dist.is_main:
            remove_stale_temps(c.output_dir)

    # ---- data ---------------------------------------------------------------------------------------
    # The data order (batching.py) lives in `data_order`; order / epoch / pos are its saved state.
    order = property(lambda self: self.data_order.order, lambda self, v: setattr(self.data_order, "order", v))
    epoch = property(lambda self: self.data_order.epoch, lambda self, v: setattr(self.data_order, "epoch", v))
    pos = property(lambda self: self.data_order.pos, lambda self, v: setattr(self.data_order, "pos", v))

    def _next_indices(self, n: int) -> list[int]:
        """The next n dataset indices: one step, never mixing aspect buckets (see batching.py)."""
        return self.data_order.take(n)

    def _next_clean(self, n: int) -> list[int]:
        """_next_indices, passing over batches that hold an item the spike guard quarantined (data
        order stays seeded, so this resumes exactly; without quarantined items it is a no-op)."""
        bad = set(self.guard.quarantined) if self.guard is not None else set()
        idx = self._next_indices(n)
        for _ in range(4 * max(1, len(self.dataset) // max(1, n) + 1) * 8):
            if not bad or not any(str(i) in bad for i in idx):
                return idx
            idx = self._next_indices(n)
        names = ", ".join(sorted(set(self.guard.quarantined.values())))
        raise RuntimeError(f"every batch holds an item the spike guard set aside ({names}); fix or remove those "
                           "items from the dataset")

    def _snapshot(self):
        return self.order, self.epoch, self.pos, self.data_gen.get_state(), self.noise_gen.get_state()

    def _rollback(self, snap) -> None:
        self.order, self.epoch, self.pos, data, noise = snap
        self.data_gen.set_state(data)
        self.noise_gen.set_state(noise)

    # ---- one update -----------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimiser update over batch_size * grad_accum samples; returns the mean loss.
        An exception before the update rolls data/RNG back, so the step can be redone exactly."""
        c, B, dev = self.config, self.config.batch_size, self.device
        W, amp = self.dist.world_size, PRECISIONS[c.precision]
        n = B * c.grad_accum * W  # the global batch; this rank trains on `sel` of it
        if self.schedule_free:
            self.optimizer.train()
        self.model.train()
        snap = self._snapshot()
        try:
            idx = self._next_clean(n)
            sel = None
            if W > 1:  # global micro-batch i is samples [i*B*W, (i+1)*B*W); rank r takes B of them
                r = self.dist.rank
                sel = torch.tensor([i * B * W + r * B + j for i in range(c.grad_accum) for j in range(B)])
                idx = [idx[k] for k in sel.tolist()]
            items = [self.dataset[i] for i in idx]
            self._batch_items = {str(i): it.get("file", f"item {i}") for i, it in zip(idx, items)}
            shape, g = items[0]["latent"].shape, self.noise_gen
            t = sample_t(n, g, c.t_sampling, c.t_mean, c.t_std, c.t_shift)
            x0 = torch.randn((n, *shape), generator=g)
            drop = caption_dropout_mask(n, c.caption_dropout, g)
            eps = torch.randn((n, *shape), generator=g) if c.sigma else None
            masked = "mask_labels" in items[0]
            keep = torch.rand(n, generator=g) >= c.mask_dropout if masked and c.mask_dropout else None
            if sel is not None:
                t, x0, drop = t[sel], x0[sel], drop[sel]
                eps = None if eps is None else eps[sel]
                keep = None if keep is None else keep[sel]
            self.optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=dev)
            for i in range(c.grad_accum):
                sl = slice(i * B, (i + 1) * B)
                x1, text, mask = collate(items[sl])
                text, mask = drop_captions(text, mask, drop[sl], self.empty_text, self.empty_mask)
                cast = dict(device=dev, dtype=self.input_dtype)
                model = self.forward_model
                if masked:
                    labels = torch.stack([it["mask_labels"] for it in items[sl]]).to(dev)
                    model = functools.partial(model, mask_labels=labels,
                                              mask_keep=None if keep is None else keep[sl].to(dev))
                pw, sw = pixel_weights(items[sl], c.masked_loss), sample_weights(items[sl])
                last = i == c.grad_accum - 1
                with contextlib.nullcontext() if last else self.dist.no_sync(self.forward_model):
                    with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                        loss = icfm_loss(model, x1.to(**cast), text.to(**cast), mask.to(dev),
                                         t[sl].to(dev), x0[sl].to(**cast), c.sigma,
                                         None if eps is None else eps[sl].to(**cast), pixel_weight=pw,
                                         sample_weight=sw)
                    loss = loss / c.grad_accum
                    self.dist.backward(self.scaler.scale(loss))
                total += loss.detach()
            value = self.dist.mean(total).item()
        except BaseException:
            self._rollback(snap)
            self.optimizer.zero_grad(set_to_none=True)
            raise
        return self._update(value)

    def _update(self, loss: float) -> float:
        """Guard, unscale, clip, step, EMA, schedule. Non-finite losses/gradients never step."""
        c, step, params = self.config, self.step + 1, [p for _, p in self.params]
        self.last_lr = lr = self.optimizer.param_groups[0]["lr"]
        self._committing = True
        if self.guard is not None:
            skip = self.guard.check(step, loss, lr, getattr(self, "_batch_items", None))
        elif (skip := not math.isfinite(loss)):
            logger.warning("non-finite loss %s at step %d: update skipped", loss, step)
        if not skip:
            self.scaler.unscale_(self.optimizer)
            grads = [p.grad for p in params if p.grad is not None]
            norm = (torch.nn.utils.clip_grad_norm_(params, c.clip_grad_norm) if c.clip_grad_norm
                    else torch.nn.utils.get_total_norm(grads))
            if not self.scaler.is_enabled() and not bool(torch.isfinite(norm)):
                skip = True  # fp16 leaves inf grads to the GradScaler, which skips and lowers its scale
                if self.guard is not None:
                    self.guard.reject(step, loss, f"non-finite gradient norm {float(norm)}", lr,
                                      getattr(self, "_batch_items", None))
                else:
                    logger.warning("non-finite gradient norm at step %d: update skipped", step)
            if not skip:
                self.scaler.step(self.optimizer)
                if self.ema is not None:
                    if step <= c.ema_start:
                        self.ema.reset(self.params)
                    else:
                        self.ema.update(self.params)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step = step
        self._committing = False
        return loss

    # ---- loop and checkpoints -------------------------------------------------------------------
    def train(self, callback: Optional[Callable[[int, float, float, float], None]] = None,
              until: Optional[int] = None) -> list[float]:
        """Run to `config.steps` (or stop at step `until`); returns this call's losses. A validation
        set is scored after the updates it is due at (validation.py), before that step's checkpoint.
        callback(step, loss, lr, it_per_s) runs after each update; if it raises (or on Ctrl-C) a
        resumable checkpoint is saved first. StopTraining from it ends the run normally."""
        c, end, losses = self.config, min(until or self.config.steps, self.config.steps), []
        try:
            while self.step < end:
                t0 = time.perf_counter()
                loss = self.train_step()
                rate = 1.0 / max(time.perf_counter() - t0, 1e-9)
                losses.append(loss)
                if self.validation is not None and self.validation.due(self.step, end):
                    self.validation.run(self)
                if c.output_dir and c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save()
                if callback is not None:
                    try:
                        callback(self.step, loss, self.last_lr, rate)
                    except StopTraining:
                        logger.info("training stopped by the callback at step %d", self.step)
                        break
                    except BaseException:
                        self._save_on_interrupt()
                        raise
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise
        if c.output_dir and self._saved_step != self.step:
            self.save()
        return losses

    def _save_on_interrupt(self) -> None:
        if not self.config.output_dir:
            logger.warning("training interrupted at step %d; no output_dir, so no checkpoint", self.step)
            return
        if self._committing:
            logger.warning("interrupted inside the optimiser update of step %d: this state may not resume "
                           "exactly", self.step + 1)
        if self._saved_step != self.step:
            logger.warning("training interrupted at step %d: saved %s", self.step, self.save(sync=False))

    def save(self, path=None, sync: bool = True) -> Path:
        """Write the full training state (atomic) and prune to the newest keep_last. Only the main
        rank writes (ranks hold the same state); with `sync` every rank waits until it is written."""
        if path is None:
            if not self.config.output_dir:
                raise ValueError("save() needs a path or config.output_dir")
            path = checkpoint_path(self.config.output_dir, self.step)
        path = Path(path)
        if self.dist.is_main:
            tensors, meta = capture(self)
            path = write_state(path, tensors, meta)
            if self.config.output_dir and path.parent == Path(self.config.output_dir):
                prune_checkpoints(self.config.output_dir, self.config.keep_last)
            logger.info("saved training state at step %d to %s", self.step, path)
        if sync:
            self.dist.barrier()
        self._saved_step = self.step
        return path

    def resume(self, path_or_dir) -> Path:
        """Restore everything from a checkpoint file, or the newest one in a directory."""
        path = latest_checkpoint(path_or_dir)
        tensors, meta = read_state(path)
        restore(self, tensors, meta, str(path))
        self._saved_step = self.step
        logger.info("resumed from %s at step %d", path, self.step)
        return path
