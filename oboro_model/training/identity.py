"""What a training run IS, so that nothing is resumed, reused or skipped unless it is the same run.

A run's identity is a dict of digests: the training data (each cache's items by content, with its
weight/repeats/loss weight), the validation data, the base weights, the adapter, and every setting
that changes the result. It is written as `run.json` in the run's state folder. `resume_from =
"latest"` resumes (or, when finished, returns) only a folder whose identity matches; any other run
under the same output name is left alone and a fresh run starts in the next free folder
(`<name>_00001_`, ...). `differences()` names what differs, for the message the user sees.

Settings that may change on resume without making it another run: `steps` (continue further),
checkpoint/keep/validation cadence, and the output folder itself.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch

from ..atomic import atomic_write

RUN_FILE = "run.json"
RESUMABLE = ("steps", "output_dir", "checkpoint_every", "keep_last", "validation_every")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """Names aside: shape, dtype and up to 4096 evenly strided values (not a full hash: a full one
    reads every byte of a multi-GB base each run; any fine-tune changes the sampled values)."""
    flat = t.detach().reshape(-1)
    sample = flat[::max(1, flat.numel() // 4096)][:4096].float().cpu().numpy().tobytes()
    return f"{tuple(t.shape)}{t.dtype}" + hashlib.sha256(sample).hexdigest()[:32]


def weights_digest(state_dict: Mapping[str, torch.Tensor], scales: Optional[Mapping] = None) -> str:
    h = hashlib.sha256()
    for name, t in sorted(state_dict.items()):
        if t is not None and t.numel():
            h.update(f"{name}:{tensor_digest(t)};".encode())
    for name, t in sorted((scales or {}).items()):
        h.update(f"scale {name}:{tensor_digest(t)};".encode())
    return h.hexdigest()


def cache_digest(cache) -> str:
    """Order-independent digest of a latent cache's content: its items' hashes (image bytes +
    caption + encoding settings), their licence records (a changed licence is another run, so an
    export never carries stale provenance) and the latent transform it is read with."""
    src = getattr(cache, "cache", cache)
    items = sorted(json.dumps([it.get(k) for k in ("sha256", "loss_mask", "licence", "consent", "source", "author")])
                   for it in src.items)
    return _sha({"items": items, "transform": getattr(src, "latent_transform", None)})


def data_digest(data) -> list:
    """Every source of a run's dataset (a cache, a MixedData, or a wrapper of either)."""
    caches, sources = getattr(data, "caches", None), getattr(data, "sources", None)
    if caches is None:
        return [{"cache": cache_digest(data)}]
    return [{"cache": cache_digest(c), **dataclasses.asdict(s), "path": None} for c, s in zip(caches, sources)]


def run_identity(config, data, base: str, adapter, validation=None, extra: Optional[dict] = None) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE}
    return {"data": _sha(data_digest(data)),
            "validation": None if validation is None else _sha(data_digest(validation)),
            "base": base, "adapter": adapter, "settings": _sha(settings), "settings_values": settings,
            **(extra or {})}


def differences(a: Mapping, b: Mapping) -> list[str]:
    """What makes run `a` another run than `b`, in words."""
    out = []
    for key, what in (("data", "the training data"), ("validation", "the validation data"),
                      ("base", "the base model"), ("adapter", "the adapter")):
        if a.get(key) != b.get(key):
            out.append(what)
    sa, sb = a.get("settings_values") or {}, b.get("settings_values") or {}
    changed = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
    if changed:
        out.append("settings " + ", ".join(f"{k} {sb.get(k)!r} -> {sa.get(k)!r}" for k in changed))
    for key in sorted(set(a) | set(b)):
        if key not in ("data", "validation", "base", "adapter", "settings", "settings_values", "finished") \
                and a.get(key) != b.get(key):
            out.append(key)
    return out


def same_run(a: Optional[Mapping], b: Mapping) -> bool:
    return a is not None and not differences(a, b)


def read_run(folder) -> Optional[dict]:
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_run(folder, identity: Mapping, finished: Optional[dict] = None) -> None:
    body = dict(identity)
    if finished is not None:
        body["finished"] = finished
    text = json.dumps(body, indent=1, default=str)
    atomic_write(Path(folder) / RUN_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), fsync=False)


def candidate_folders(state_dir: Path) -> Iterable[Path]:
    """`state_dir` and its numbered siblings `<name>_00001_`, ... that exist, in order."""
    yield state_dir
    n = 1
    while (p := state_dir.with_name(f"{state_dir.name}_{n:05d}_")).exists():
        yield p
        n += 1


def next_free_folder(state_dir: Path) -> Path:
    *_, last = candidate_folders(state_dir)
    if last == state_dir and not state_dir.exists():
        return state_dir
    n = 1 if last == state_dir else int(last.name.rsplit("_", 2)[-2]) + 1
    return state_dir.with_name(f"{state_dir.name}_{n:05d}_")
