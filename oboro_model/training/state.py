"""Resumable training state: one safetensors file per checkpoint, `step_XXXXXXXX.safetensors`.

Tensors (trainable weights, EMA, optimiser moments, RNG and data-order state) are safetensors
entries; everything else (step, data position, optimiser hyper-parameters, scheduler, guard, grad
scaler, python/numpy RNG, the TrainConfig) is JSON in the file header. No pickle anywhere, so a
training state from elsewhere can be inspected and loaded without running code. Writes are atomic
(temp file, fsync, os.replace): a crash leaves the previous checkpoint, never half a new one.
Resuming restores every piece, so N steps + resume + N steps is bitwise equal to 2N steps.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..atomic import save_safetensors

logger = logging.getLogger(__name__)

META_KEY = "oboro_train_state"
FORMAT = 1
NAME_RE = re.compile(r"^step_(\d{8,})\.safetensors$")
# atomic_write's temp files for states: `.step_XXXXXXXX.safetensors.<random>.tmp`
TEMP_RE = re.compile(r"^\.step_\d{8,}\.safetensors\.[A-Za-z0-9_]+\.tmp$")


def checkpoint_path(output_dir, step: int) -> Path:
    return Path(output_dir) / f"step_{step:08d}.safetensors"


def list_checkpoints(output_dir) -> list[Path]:
    """Finished checkpoints in `output_dir`, oldest first (temp files never match)."""
    d = Path(output_dir)
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := NAME_RE.match(p.name))] if d.is_dir() else []
    return [p for _, p in sorted(found)]


def latest_checkpoint(path_or_dir) -> Path:
    p = Path(path_or_dir)
    if p.is_file():
        return p
    found = list_checkpoints(p)
    if not found:
        raise FileNotFoundError(f"{p}: no training checkpoint (step_*.safetensors) to resume from")
    return found[-1]


def remove_stale_temps(output_dir) -> list[Path]:
    """Delete state temp files a killed process left (a full fine-tune's can be gigabytes). Call it
    when a run starts, before any save of its own: only a process killed mid-write leaves one."""
    d = Path(output_dir)
    gone = [p for p in d.iterdir() if TEMP_RE.match(p.name) and p.is_file()] if d.is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted state write", p)
    return gone


def prune_checkpoints(output_dir, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (keep_last <= 0 keeps everything)."""
    found = list_checkpoints(output_dir)
    old = found[:-keep_last] if keep_last > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return old


def write_state(path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    seen, out = set(), {}
    for k, v in tensors.items():  # safetensors refuses shared storage: copy the (rare) aliases
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return save_safetensors(path, out, {META_KEY: json.dumps(meta, default=str)})


def read_state(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        header = f.metadata() or {}
        if META_KEY not in header:
            raise ValueError(f"{path}: not an oboro training state (no {META_KEY!r} header)")
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(header[META_KEY])


def _split(prefix: str, sd: dict, tensors: dict) -> dict:
    """Move the tensors of a nested state dict into `tensors` (flat, dotted keys); return the rest."""
    rest = {}
    for k, v in sd.items():
        key = f"{prefix}.{k}"
        if isinstance(v, torch.Tensor):
            tensors[key] = v
        elif isinstance(v, dict):
            rest[str(k)] = _split(key, v, tensors)
        else:
            rest[str(k)] = v
    return rest


def _join(prefix: str, rest: dict, tensors: dict) -> dict:
    out = {k: (_join(f"{prefix}.{k}", v, tensors) if isinstance(v, dict) else v) for k, v in rest.items()}
    head = prefix + "."
    for key, t in tensors.items():
        if key.startswith(head) and "." not in key[len(head):]:
            out[key[len(head):]] = t
    return out


def capture(tr) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything a Trainer needs to continue exactly, as (tensors, JSON-able meta)."""
    tensors = {f"model.{n}": p for n, p in tr.params}
    if tr.ema is not None:
        tensors.update({f"ema.{n}": v for n, v in tr.ema.state_dict().items()})
    opt = tr.optimizer.state_dict()
    opt_state = _split("optim", {str(i): s for i, s in opt["state"].items()}, tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = tr.data_gen.get_state()
    tensors["rng.noise"] = tr.noise_gen.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    tensors["data.order"] = tr.order
    meta = {
        "format": FORMAT, "step": tr.step, "data": {"epoch": tr.epoch, "pos": tr.pos},
        "optim": {"state": opt_state, "param_groups": opt["param_groups"]},
        "scheduler": tr.scheduler.state_dict(),
        "guard": tr.guard.state_dict() if tr.guard is not None else None,
        "ema_updates": tr.ema.updates if tr.ema is not None else None,
        "validation": tr.validation.state_dict() if getattr(tr, "validation", None) is not None else None,
        "scaler": tr.scaler.state_dict(),
        "python_random": random.getstate(),
        "config": dataclasses.asdict(tr.config),
    }
    try:
        import numpy as np
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy_random"] = [name, int(pos), int(has_gauss), float(gauss)]
    except ImportError:
        pass
    return tensors, meta


@torch.no_grad()
def restore(tr, tensors: dict[str, torch.Tensor], meta: dict, source: str = "<state>") -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{source}: training-state format {meta.get('format')!r}, expected {FORMAT}")
    names = {n for n, _ in tr.params}
    saved = {k[len("model."):] for k in tensors if k.startswith("model.")}
    if names != saved:
        raise ValueError(f"{source}: trainable parameters differ from this model's: missing "
                         f"{sorted(names - saved)[:10]}, unexpected {sorted(saved - names)[:10]}")
    for n, p in tr.params:
        if tuple(p.shape) != tuple(tensors[f"model.{n}"].shape):
            raise ValueError(f"{source}: {n} has shape {tuple(tensors[f'model.{n}'].shape)}, model {tuple(p.shape)}")
        p.copy_(tensors[f"model.{n}"])
    now = json.loads(json.dumps(dataclasses.asdict(tr.config), default=str))
    changed = sorted(k for k, v in meta["config"].items() if now.get(k, v) != v and k not in ("steps", "output_dir"))
    if changed:
        logger.warning("%s: resuming with changed settings %s; the run will not match an uninterrupted one, and "
                       "what lives in optimiser/scheduler state (lr, weight decay, warm-up) keeps its saved value",
                       source, changed)
    if tr.ema is not None:
        ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        tr.ema.load_state_dict(ema, meta["ema_updates"] or 0)
    state = _join("optim", meta["optim"]["state"], tensors)
    tr.optimizer.load_state_dict({"state": {int(i): s for i, s in state.items()},
                                  "param_groups": meta["optim"]["param_groups"]})
    tr.scheduler.load_state_dict(meta["scheduler"])
    if tr.guard is not None and meta["guard"] is not None:
        tr.guard.load_state_dict(meta["guard"])
    tr.scaler.load_state_dict(meta["scaler"])
    if getattr(tr, "validation", None) is not None:
        tr.validation.load_state_dict(meta.get("validation"))
    torch.set_rng_state(tensors["rng.torch"])
    tr.data_gen.set_state(tensors["rng.data"])
    tr.noise_gen.set_state(tensors["rng.noise"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = meta["python_random"]
    random.setstate((v, tuple(state), gauss))
    if "numpy_random" in meta:
        import numpy as np
        name, pos, has_gauss, g = meta["numpy_random"]
        np.random.set_state((name, tensors["rng.numpy"].numpy().astype("uint32"), pos, has_gauss, g))
    tr.order = tensors["data.order"].clone()
    tr.epoch, tr.pos, tr.step = meta["data"]["epoch"], meta["data"]["pos"], meta["step"]
