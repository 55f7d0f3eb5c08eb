"""`oboro-run --shard I/N`: the I-th of N slices of a batch, so an array job (Slurm, Kubernetes
Indexed Jobs, a render-farm manager) can fan one batch out over many processes and hosts.

The slice is a pure function of the job number (job k belongs to shard k mod N), and job numbers
come from the batch itself (rows x seeds), so every process computes the same slices without
talking to the others, and output names (NNNNN-...) never clash across shards. Interleaving
rather than cutting in blocks keeps shards even when a batch file groups slow jobs together.

Shards share one --out: each holds --out's lock shared (a plain run on that folder waits its turn,
exit 2) and its own lock `.oboro-shard-I-of-N.lock` (the same shard twice is exit 2), works in its
own temp folders `.oboro-shard-I-of-N-*` and writes its own ledger `runs.shard-I-of-N.jsonl`: no
two processes ever append to one file, which network file systems do not make safe. A shard that
finishes merges its ledger into runs.jsonl under `.oboro-ledger.lock`; `--merge-ledger` merges
those of shards that were killed. Merging skips lines runs.jsonl already has, so it can be rerun
after a crash at any point. --resume reads runs.jsonl and every unmerged shard ledger.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from . import ledger
from .convert import WorkflowError

MERGE_LOCK = ".oboro-ledger.lock"
SHARD_LEDGER = re.compile(r"runs\.shard-(\d+)-of-(\d+)\.jsonl$")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @property
    def name(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    @property
    def ledger(self) -> str:
        return f"runs.{self.name}.jsonl"

    @property
    def lock(self) -> str:
        return f".oboro-{self.name}.lock"

    @property
    def prefix(self) -> str:
        return f".oboro-{self.name}-"

    def owns(self, job_index: int) -> bool:
        return job_index % self.count == self.index


def parse(text: str) -> Shard:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise WorkflowError(f"--shard {text!r}: expected I/N with 0 <= I < N (e.g. 0/4 for the first of 4; "
                            "Slurm: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return Shard(int(m[1]), int(m[2]))


def select(jobs: list, shard: Shard) -> list:
    return [j for j in jobs if shard.owns(j.index)]


@contextlib.contextmanager
def merge_lock(out):
    """Waits (merges are short); the lock is released when the process dies."""
    fd = os.open(Path(out) / MERGE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _running(out: Path, name: str) -> bool:
    """Whether the shard whose lock file is `name` holds it now."""
    path = out / name
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def merge(out, mine: Shard | None = None) -> tuple[int, list[str]]:
    """Append the shard ledgers' lines to runs.jsonl (those it lacks) and remove them: only `mine`
    (a shard at its end), or every shard ledger whose shard is not running (--merge-ledger).
    Returns (lines added, names of the ledgers left because their shard is still running)."""
    out = Path(out)
    added, busy = 0, []
    with merge_lock(out):
        main = out / ledger.LEDGER
        have = set(main.read_text(encoding="utf-8").splitlines()) if main.is_file() else set()
        for path in sorted(out.glob(ledger.SHARD_LEDGERS)):
            m = SHARD_LEDGER.match(path.name)
            if not m or (mine is not None and path.name != mine.ledger):
                continue
            if mine is None and _running(out, Shard(int(m[1]), int(m[2])).lock):
                busy.append(path.name)
                continue
            lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip() and x not in have]
            lines = [x for x in lines if _complete(x)]  # a line a crash cut short is dropped, as read() does
            if lines:
                cut = main.is_file() and main.stat().st_size > 0 and not main.read_bytes().endswith(b"\n")
                with open(main, "a", encoding="utf-8") as f:
                    f.write(("\n" if cut else "") + "\n".join(lines) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                have.update(lines)
                added += len(lines)
            path.unlink()
    return added, busy


def _complete(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def merge_command(out) -> int:
    """`oboro-run --merge-ledger --out DIR`: exit 0, or 2 when a plain run holds the folder."""
    from .cli import claim
    if not Path(out).is_dir():
        raise WorkflowError(f"--out {out}: no such folder; nothing to merge")
    with claim(out, "oboro-run --merge-ledger", shared=True):
        added, busy = merge(out)
    print(f"oboro-run: --merge-ledger: {added} line(s) added to {Path(out) / ledger.LEDGER}"
          + (f"; {len(busy)} shard(s) still running, their ledgers left: {', '.join(busy)}" if busy else ""),
          file=sys.stderr)
    return 0
