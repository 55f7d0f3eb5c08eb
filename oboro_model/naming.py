"""Output names that never replace an existing model silently: the next free `<stem>_NNNNN_<suffix>`
(the numbering of ComfyUI's own savers), claimed atomically so two writers never pick the same."""
from __future__ import annotations

import os
import re
from pathlib import Path


def free_target(path, overwrite: bool) -> Path:
    """`path`, or when it exists and `overwrite` is off, the next free `<stem>_NNNNN_<suffix>` beside it."""
    path = Path(path)
    if overwrite or not path.exists():
        return path
    pat = re.compile(re.escape(path.stem) + r"_(\d{5,})_" + re.escape(path.suffix) + "$")
    taken = [int(m.group(1)) for p in path.parent.iterdir() if (m := pat.match(p.name))]
    n = max(taken, default=0) + 1
    while (cand := path.with_name(f"{path.stem}_{n:05d}_{path.suffix}")).exists():
        n += 1
    return cand


def claim_free_target(path, overwrite: bool) -> Path:
    """free_target, with the name claimed by creating it exclusively (an empty file that the atomic
    write then replaces), so a concurrent writer picking a name at the same moment gets the next."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        return path
    for _ in range(1000):
        cand = free_target(path, False)
        try:
            os.close(os.open(cand, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return cand
        except FileExistsError:
            continue
    raise RuntimeError(f"no free file name for {path}")
