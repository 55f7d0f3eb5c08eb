"""Which files a latent-cache build may delete: only those its own records name.

A cache folder may sit next to anything (a user's absolute cache path, a folder reused by mistake),
so a build never deletes by pattern. It deletes (1) shards the previous manifest listed that the
new one no longer uses, and (2) shards (and their temp files) an earlier build of this folder wrote
but never got into a manifest (killed, or failed midway): every shard name is appended to the
journal `build.journal` BEFORE its file is written, and the journal is removed once a manifest
covers the build. A non-empty folder that holds neither a cache manifest nor a journal is not a
cache; building into it is refused rather than overwriting its manifest.json. The folder lock's
marker file (folder_lock.LOCK_NAME, left by every build) does not make a folder non-empty.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from ..folder_lock import LOCK_NAME

JOURNAL = "build.journal"


def check_cache_folder(folder: Path, manifest: Optional[dict], manifest_name: str) -> None:
    """Refuse a folder that is neither new/empty, nor an oboro cache, nor an interrupted build."""
    if not folder.is_dir() or manifest is not None or (folder / JOURNAL).is_file():
        return
    if any(p.name != LOCK_NAME for p in folder.iterdir()):
        present = "a " + manifest_name + " of another format" if (folder / manifest_name).exists() else "other files"
        raise ValueError(f"{folder}: not an oboro latent cache (it holds {present}) and not empty; refusing to "
                         "write into it. Pick a new cache name, or empty that folder.")


def note_shard(folder: Path, name: str) -> None:
    """Record `name` before writing it, so a killed build's file can be recognised as ours later."""
    with open(folder / JOURNAL, "a", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())


def journal_names(folder: Path) -> set[str]:
    try:
        return {n for n in (folder / JOURNAL).read_text(encoding="utf-8").splitlines() if n and "/" not in n
                and "\\" not in n and n not in (".", "..")}
    except OSError:
        return set()


def remove_unused(folder: Path, old_manifest: Optional[dict], journal: set[str], used: Iterable[str],
                  own_files: Iterable[str]) -> list[str]:
    """After the new manifest is in place: delete what the old manifest or the journal named and the
    new manifest does not use, and the temp files a killed write of any of those or of own_files
    (manifest, empty prompt) left (oboro_model/atomic.py names them .<name>.<random>.tmp), then the
    journal. Returns the deleted names."""
    used = set(used)
    ours = {it.get("shard") for it in (old_manifest or {}).get("items", []) if isinstance(it, dict)}
    ours = {n for n in ours | journal if isinstance(n, str) and n and Path(n).name == n}
    temps = tuple(f".{n}." for n in ours | set(own_files))
    gone = []
    for name in sorted(ours - used) + sorted(p.name for p in folder.iterdir()
                                             if p.name.endswith(".tmp") and p.name.startswith(temps)):
        p = folder / name
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(name)
    (folder / JOURNAL).unlink(missing_ok=True)
    return gone
