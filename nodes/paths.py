"""Where a graph may make our nodes write: ComfyUI's own folders, plus an explicit allow-list.

A ComfyUI server is often shared, and anything a submitted graph can do, every user of that
server can do. So a path a node takes from a graph for WRITING (a cache, a training-state folder,
a model, a LoRA, an adapter) is confined the way core SaveImage confines its prefix:
  - a plain name (or sub/path) lands under the node's own folder (output/oboro_cache,
    output/oboro_training, models/<kind>), never above it;
  - an absolute path is accepted only inside one of the folders ComfyUI already serves for that
    kind (the output folder, or models/<kind> including those added by extra_model_paths.yaml) or
    one listed in the environment variable OBORO_ALLOWED_ROOTS (os.pathsep-separated, set by
    whoever starts the server). Symlinks are resolved before the check.
Reading (a dataset folder, a training state to resume from) is not confined; see README
"Safety on a shared server".
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Optional

import folder_paths

ALLOWED_ENV = "OBORO_ALLOWED_ROOTS"


def allowed_roots(kind: Optional[str] = None) -> list[Path]:
    """The folders absolute write paths may lie in: ComfyUI's output folder (kind None) or every
    registered folder of model kind `kind`, plus OBORO_ALLOWED_ROOTS."""
    roots = [folder_paths.get_output_directory()] if kind is None else list(folder_paths.get_folder_paths(kind))
    roots += [r for r in os.environ.get(ALLOWED_ENV, "").split(os.pathsep) if r.strip()]
    return [Path(r).resolve() for r in roots]


def _within(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def confine(root, name: str, what: str, kind: Optional[str] = None, absolute_ok: bool = True) -> Path:
    """`name` under `root` (a plain name or sub/path; '..' may not climb out), or, when absolute and
    `absolute_ok`, inside allowed_roots(kind). `what` names the input in the error message."""
    if not (name or "").strip():
        raise ValueError(f"{what} is empty")
    root = Path(root).resolve()
    if os.path.isabs(name):
        path, roots = Path(name).resolve(), allowed_roots(kind)
        if absolute_ok and _within(path, roots) and path not in roots:
            return path
        raise ValueError(f"{what} {name!r}: absolute paths must lie inside "
                         f"{', '.join(str(r) for r in roots)} (this server's folders; the admin can add more "
                         f"with the environment variable {ALLOWED_ENV}); or use a plain name, which goes to {root}"
                         if absolute_ok else f"{what} {name!r} must be a plain name (or sub/path) inside {root}")
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ValueError(f"{what} {name!r} leaves {root}; use a plain name (or sub/path) inside it")
    return path


def free_target(path: Path, overwrite: bool) -> Path:
    """`path`, or when it exists and `overwrite` is off, the next free `<stem>_NNNNN_<suffix>` beside
    it (the numbering of core savers), so an existing model is never replaced silently."""
    path = Path(path)
    if overwrite or not path.exists():
        return path
    pat = re.compile(re.escape(path.stem) + r"_(\d{5,})_" + re.escape(path.suffix) + "$")
    taken = [int(m.group(1)) for p in path.parent.iterdir() if (m := pat.match(p.name))]
    n = max(taken, default=0) + 1
    while (cand := path.with_name(f"{path.stem}_{n:05d}_{path.suffix}")).exists():
        n += 1
    return cand
