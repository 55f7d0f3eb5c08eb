"""One writer per folder: an OS file lock (fcntl.flock) on `<folder>/.oboro.lock`, held while a run
writes there and released by the OS when the process dies, so a crash never leaves a stale lock.

A second writer (another prompt, process, or server on the same filesystem) gets `FolderBusy`,
which names the folder and the holder (host, pid, start time, what), and nothing is changed. The
lock file itself stays (an empty marker plus the last holder's JSON); only the flock counts.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".oboro.lock"


class FolderBusy(RuntimeError):
    """Another writer holds the folder."""


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return "another process"
    return (f"{h.get('what', 'a run')} (host {h.get('host', '?')}, pid {h.get('pid', '?')}, "
            f"since {h.get('since', '?')})")


@contextlib.contextmanager
def folder_lock(folder, what: str, name: str = LOCK_NAME, shared: bool = False,
                record: bool = True) -> Iterator[Path]:
    """Hold `folder`'s write lock for the body (the folder is created if missing). Raises FolderBusy
    at once, changing nothing, when another writer holds it. Re-entrant within one process is NOT
    supported: take each folder's lock once, at the top of the run that writes it.
    `shared`: several cooperating writers at once (oboro-run's shards, each also holding its own
    `name`d lock), while a plain writer still gets FolderBusy. `record=False`: a probe that only
    checks the folder is free leaves the holder's record as it is."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(f"{folder} is being written by {_holder(path)}; wait for it to finish or pick "
                             "another name") from None
        if record:
            info = {"what": what, "host": socket.gethostname(), "pid": os.getpid(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        yield folder
    finally:
        os.close(fd)  # closing the descriptor releases the flock
