"""The ONE training run every front end calls (OboroLoRATrainer / OboroFullTrainer and their older
node faces, OboroTrainMaskAdapter, scripts/oboro-train in one process or under `accelerate
launch`): a front end builds a RunSpec and a network and calls run(spec, net, hooks). Everything
after the network exists happens here, once: open and check the caches, pick the state folder by
the run's identity (identity.py), hold its write lock, build the trainer, loop with the hooks
(progress, previews, interrupt), export (export.py), and the loss curve and sample grid beside the
states (report.py). So the same cache and settings give the same files whichever front end runs it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..data import LatentCache
from ..folder_lock import folder_lock
from ..provenance import run_datasets
from . import identity as ident
from .datasets import has_loss_masks, open_training_data
from .export import ExportSpec, export
from .job import Job
from .state import latest_checkpoint, list_checkpoints
from .trainer import LocalProcess, StopTraining, Trainer, TrainConfig

logger = logging.getLogger(__name__)
LORA_TARGETS = ("attn", "mlp", "all")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to train instead of all weights ([lora] in CONFIG.toml, the LoRA trainer's inputs)."""
    rank: int = 16
    alpha: Optional[float] = None      # None: rank (scale 1)
    dropout: float = 0.0
    targets: Union[str, tuple] = "attn"  # attn | mlp | all | module paths or suffixes
    base_dtype: str = "stored"         # the frozen base's storage dtype (frozen_base.STORAGE_DTYPES)
    adapter: str = "lora"              # lora | loha | lokr | dora (adapters.py)

    def __post_init__(self):
        if not 1 <= self.rank <= 4096:
            raise ValueError(f"rank is {self.rank}; give a whole number from 1 to 4096")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha is {self.alpha}; give a finite number > 0")
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout is {self.dropout}; give a number in [0, 1)")


@dataclass(frozen=True)
class RunSpec:
    """What defines a run, front-end neutral. `config.output_dir` is ignored: the state folder is
    `state_dir` or, for resume="latest" when it holds another run, its next free sibling."""
    config: TrainConfig
    state_dir: str
    sources: tuple                     # DataSource, ...: the first is the main cache
    adapter: Optional[LoraSpec] = None  # None: every trainable parameter of `net` (full / mask adapter)
    validation_cache: Optional[str] = None
    resume: str = "latest"             # "" fresh (refused over another run's states) | latest | a state path
    export: Optional[ExportSpec] = None
    samples: int = 4                   # sample grid of this many cached captions at the end (0: none)
    what: str = "training"             # the front end, in messages


class RunInterrupted(Exception):
    """The run was stopped by its front end; its state is saved and `resume="latest"` continues it."""

    def __init__(self, step: int, steps: int, state_dir: Path):
        self.step, self.steps, self.state_dir = step, steps, state_dir
        super().__init__(f"saved at step {step} of {steps} in {state_dir}; queue again (resume latest) to continue")


@dataclass
class RunHooks:
    open_cache: Optional[Callable[[str, str], LatentCache]] = None  # (path, what) -> cache; default: manifest
    wrap_data: Optional[Callable] = None       # dataset -> dataset (mask adapter: MaskedLatents)
    on_step: Optional[Callable] = None         # (trainer, step, loss, lr, it_per_s) after every update
    should_stop: Callable[[], bool] = lambda: False
    say: Callable[[str], None] = field(default=lambda text: logger.info("%s", text))  # the user's messages
    empty: Optional[tuple] = None              # (text, mask) for dropped captions; default: the cache's
    dist: Optional[LocalProcess] = None
    tracker: Optional[Callable] = None         # (state_dir, config) -> tracking.Tracker


@dataclass
class RunResult:
    summary: dict
    history: dict
    state_dir: Path
    reused: bool = False                       # a finished, unchanged run: its files returned, nothing written
    note: str = ""                             # what the user should know (a fresh folder, a reused file)


def open_cache(path, transform="manifest", what: str = "training") -> LatentCache:
    """The latent cache at `path` (an OboroCacheLatents / build_cache folder) with its recorded
    latent transform applied (transform="manifest"), or a caller's callable."""
    cache = LatentCache(path, transform=transform)
    if len(cache) == 0:
        raise ValueError(f"{what}: the latent cache {cache.folder} is empty")
    return cache


def check_cache_fits(cache: LatentCache, config, what: str = "training") -> None:
    """Clear error when the cache was encoded with another VAE / T5 than the model expects."""
    it = cache.items[0]
    channels = int(it["latent_shape"][0])
    first = cache[0]
    if channels != config.in_channels or first["text"].shape[-1] != config.text_dim:
        raise ValueError(f"{what}: the cache {cache.folder} holds {channels}-channel latents and "
                         f"{first['text'].shape[-1]}-wide text states; this model takes {config.in_channels} and "
                         f"{config.text_dim} (same VAE and T5 as the model?)")


def add_seeded_lora(model: torch.nn.Module, spec: LoraSpec, seed: int) -> torch.nn.Module:
    """Inject `spec` with its random init drawn from `seed` (the global RNG is left as it was), so
    every front end starts a LoRA run from the same weights."""
    from .adapters import add_adapter
    return add_adapter(model, spec.adapter, spec.rank, spec.alpha, spec.dropout, spec.targets, seed=seed)


def build_trainer(model: torch.nn.Module, cache, config: TrainConfig, lora: Optional[LoraSpec] = None,
                  empty: Optional[tuple] = None, dist: Optional[LocalProcess] = None,
                  validation_cache=None) -> Trainer:
    """A Trainer over `cache` (LatentCache, or a dataset wrapping one): `lora` injected first
    (seeded by config.seed), caption dropout onto `empty` = (text, mask) or, by default, the
    cache's stored empty prompt (none stored: no tokens). Validation (validation.py) on
    `validation_cache`, or on config.validation_split of `cache` held out (not trained on)."""
    if lora is not None:
        add_seeded_lora(model, lora, config.seed)
    if empty is None:
        src = getattr(cache, "cache", cache)  # MaskedLatents wraps a LatentCache
        empty = (getattr(src, "empty_text", None), getattr(src, "empty_mask", None))
        if empty[0] is None and config.caption_dropout > 0:
            logger.warning("the cache stores no empty-prompt encoding (written by an older version): dropped "
                           "captions become no tokens. Rebuild it with OboroCacheLatents to store T5(\"\").")
    val = validation_cache
    if config.validation_split > 0:
        if val is not None:
            raise ValueError("give either validation_split (a fraction of the training cache) or a validation "
                             "cache, not both")
        from .validation import split_holdout
        cache, val = split_holdout(cache, config.validation_split, config.validation_seed)
        logger.info("validation: %d of %d items held out (validation_seed %d)", len(val), len(val) + len(cache),
                    config.validation_seed)
    return Trainer(model, cache, config, empty_text=empty[0], empty_mask=empty[1], dist=dist, validation=val)


def _model_config(net):
    return getattr(net, "config", None) or net.base.config  # MMHDiT, or a MaskControlDiT over one


def open_data(spec: RunSpec, net, hooks: RunHooks):
    """(training dataset, validation cache or None) of `spec`, each cache checked against `net`."""
    def opened(path, what):
        cache = hooks.open_cache(path, what) if hooks.open_cache else open_cache(path, what=what)
        check_cache_fits(cache, _model_config(net), what)
        return cache

    data = open_training_data(list(spec.sources), lambda p: opened(p, spec.what))
    if spec.config.masked_loss and not has_loss_masks(data):
        raise ValueError(f"{spec.what}: masked_loss is on but no cache of this run stores loss masks; rebuild "
                         "the cache with OboroCacheLatents' mask_dir (or alpha_mask)")
    if hooks.wrap_data is not None:
        data = hooks.wrap_data(data)
    val = opened(spec.validation_cache, spec.what + " validation cache") if spec.validation_cache else None
    return data, val


def no_op_warnings(spec: RunSpec, trainer: Trainer) -> list[str]:
    """Settings that silently do nothing or harm: said in the UI and the summary, not only logged."""
    c, out = spec.config, []
    if c.optimizer == "prodigy" and c.lr < 0.1:
        out.append(f"optimizer prodigy with lr {c.lr:g}: prodigy finds its own step size and expects lr = 1 "
                   "(this lr scales it down, so it learns almost nothing)")
    if c.validation_split > 0 and len(trainer.dataset) < c.batch_size:
        out.append(f"validation_split {c.validation_split:g} leaves {len(trainer.dataset)} training items, less than "
                   f"one batch of {c.batch_size}")
    if c.masked_loss:
        n = min(64, len(trainer.dataset))  # a look at the first items, not a pass over the cache
        masks = [trainer.dataset[i].get("loss_mask") for i in range(n)]
        if masks and all(m is None or not bool((m > 0).any()) for m in masks):
            out.append(f"masked_loss is on but the loss masks of the first {n} items are all empty (or the images "
                       "fully transparent): their loss is 0 and nothing is learned from them")
    if c.caption_dropout >= 1.0:
        out.append("caption_dropout 1: every caption is dropped, so the prompt will have no effect")
    return out


def pick_folder(spec: RunSpec, identity: dict) -> tuple[Path, Optional[Path], str]:
    """(state folder, state file to resume or None, note for the user) by the run rules above."""
    state_dir, r = Path(spec.state_dir), (spec.resume or "").strip()
    if not r:
        if list_checkpoints(state_dir):
            raise ValueError(f"{spec.what}: {state_dir} already holds training states of an earlier run; set "
                             "resume_from to 'latest' ([output] resume = true) to continue it, or pick another "
                             "output name")
        return state_dir, None, ""
    if r != "latest":
        p = Path(r)
        state = latest_checkpoint(p if p.is_absolute() else state_dir.parent / p)
        diff = ident.differences(identity, ident.read_run(state.parent) or {})
        if diff:
            raise ValueError(f"{spec.what}: resume_from {r!r} is another run (it differs in: {'; '.join(diff)}); "
                             "clear resume_from to start fresh, or use 'latest'")
        return state.parent, state, ""
    others = []
    for folder in ident.candidate_folders(state_dir):
        if not list_checkpoints(folder) and ident.read_run(folder) is None:
            continue
        recorded = ident.read_run(folder)
        if ident.same_run(recorded, identity):
            states = list_checkpoints(folder)
            return folder, states[-1] if states else None, ""
        others.append((folder, ident.differences(identity, recorded) if recorded else
                       ["its identity (written by an older version)"]))
    if not others:
        return state_dir, None, ""
    fresh = ident.next_free_folder(state_dir)
    folder, diff = others[0]
    return fresh, None, (f"{folder.name} holds another run (it differs in: {'; '.join(diff)}); started a fresh run "
                         f"in {fresh.name} — nothing of the other run was resumed or changed")


def run(spec: RunSpec, net: torch.nn.Module, hooks: Optional[RunHooks] = None) -> RunResult:
    """Train `net` (an MMHDiT, or a MaskControlDiT over one) as `spec` says. Raises RunInterrupted
    when hooks.should_stop() turns true (state saved)."""
    hooks = hooks or RunHooks()
    dist = hooks.dist or LocalProcess()
    data, val = open_data(spec, net, hooks)
    base = ident.weights_digest(net.state_dict())
    adapter = dataclasses.asdict(spec.adapter) if spec.adapter else {"kind": spec.export.kind if spec.export else "full"}
    identity = ident.run_identity(spec.config, data, base, adapter, val)
    folder, resume_file, note = pick_folder(spec, identity)
    if note:
        hooks.say(note)
    lock = folder_lock(folder, spec.what) if dist.is_main else contextlib.nullcontext()
    with lock:
        recorded = ident.read_run(folder)
        done = (recorded or {}).get("finished")
        if done and done.get("step", 0) >= spec.config.steps and all(Path(p).is_file() for p in done["files"].values()):
            text = f"already trained: {done['files']['path']} (step {done['step']}, same data, base and settings); " \
                   "nothing written"
            hooks.say(text)
            from .job import load_history
            history = load_history(resume_file, done["step"]) if resume_file else {}
            return RunResult({**done["files"], "step": done["step"], "state_dir": str(folder), "reused": True},
                             history, folder, reused=True, note=text)
        config = dataclasses.replace(spec.config, output_dir=str(folder))
        trainer = build_trainer(net, data, config, spec.adapter, empty=hooks.empty, dist=dist, validation_cache=val)
        job = Job(folder, resume_file, spec.what, is_main=dist.is_main)
        job.start(trainer)
        if resume_file is not None:
            hooks.say(f"resuming {folder.name} from step {trainer.step} -> {spec.config.steps}")
        if hooks.tracker is not None:
            job.tracker = trainer.tracker = hooks.tracker(folder, config)  # hooks may log images to it
        warnings = no_op_warnings(spec, trainer)
        for w in warnings:
            logger.warning("%s: %s", spec.what, w)
            hooks.say("warning: " + w)
        if dist.is_main:
            ident.write_run(folder, identity)
        try:
            _loop(trainer, job, hooks)
        finally:
            job.save()
        files = {}
        if spec.export is not None and dist.is_main:
            files = export(trainer, spec.export, identity, len(trainer.dataset), datasets=run_datasets(data, val))
            ident.write_run(folder, identity, finished={"step": trainer.step, "files": files})
        dist.barrier()
        if dist.is_main:
            from .report import write_report
            write_report(trainer, job.history, folder, spec.samples, f"{spec.what}: {Path(spec.state_dir).name}")
        extra = {"data": data.describe()} if hasattr(data, "describe") else {}
        summary = job.summary(trainer, items=len(trainer.dataset), **files, **extra, **({"note": note} if note else {}),
                              **({"warnings": warnings} if warnings else {}))
        job.close()
        return RunResult(summary, job.history, folder, note=note)


def _loop(trainer: Trainer, job: Job, hooks: RunHooks) -> None:
    steps, every = trainer.config.steps, trainer.config.checkpoint_every
    stopped = {}

    def callback(step, loss, lr, rate):
        job.record(trainer, step, loss, lr)
        if every and step % every == 0:
            job.save()
        if hooks.on_step is not None:
            hooks.on_step(trainer, step, loss, lr, rate)
        if hooks.should_stop():
            stopped["at"] = step
            raise StopTraining

    try:
        trainer.train(callback)
    except KeyboardInterrupt:
        stopped["at"] = trainer.step
    if "at" in stopped and trainer.step < steps:
        job.save()
        job.close()
        raise RunInterrupted(trainer.step, steps, job.state_dir)

