"""Where oboro-run's results go: finished files into --out by atomic rename (never a partial
file under its final name), one complete runs.jsonl line per job, and progress on stderr.

File names come from the job, not from ComfyUI's counter (which restarts per job embedded and keeps
counting on a server): `<subfolder>/NNNNN-s<seed>-<prompt slug>-<save prefix><ext>`, the save
node's filename_prefix without ComfyUI's `_00001_` counter, and `-<k>` (zero-padded, in save order)
when one save node writes several files, so both backends name the same job's files alike.

A job whose PNGs carry OboroSaveImage's provenance record (oboro_model/image_provenance.py: model,
T5, VAE and LoRA digests with their datasets and licences) has it on its runs.jsonl line as
`provenance`, read back from the files themselves (so both backends record the same)."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path, PurePosixPath

COUNTER = re.compile(r"_\d{5,}_$")  # ComfyUI's savers: f"{prefix}_{counter:05}_.{ext}"


def output_items(outputs: dict) -> list[dict]:
    """The files a job saved (type "output"), from ComfyUI's per-node ui results."""
    items, seen = [], set()
    for node_id, ui in (outputs or {}).items():
        for values in (ui or {}).values():
            for v in values if isinstance(values, list) else ():
                if isinstance(v, dict) and "filename" in v and v.get("type", "output") == "output":
                    key = (v.get("subfolder") or "", v["filename"])
                    if key not in seen:
                        seen.add(key)
                        items.append({"filename": key[1], "subfolder": key[0], "type": "output", "node": node_id})
    return items


def _relative(subfolder: str, filename: str) -> Path:
    rel = PurePosixPath(subfolder.replace("\\", "/")) / filename
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"refusing output path outside --out: {rel}")
    return Path(*rel.parts)


def file_names(stem: str, files) -> list[tuple[str, str]]:
    """(subfolder, name) in --out for a job's saved files [(src, subfolder, ComfyUI's filename)]."""
    parts = []
    for _, subfolder, filename in files:
        p = PurePosixPath(filename)
        parts.append((subfolder, COUNTER.sub("", p.stem), p.suffix))
    groups = Counter((sub, prefix) for sub, prefix, _ in parts)
    seen, names = Counter(), []
    for sub, prefix, ext in parts:
        n = groups[(sub, prefix)]
        k = f"-{seen[(sub, prefix)]:0{len(str(n - 1))}d}" if n > 1 else ""
        seen[(sub, prefix)] += 1
        names.append((sub, "-".join(filter(None, (stem, prefix))) + k + ext))
    return names


def provenance_of(out: Path, saved: list[str]):
    """The provenance record OboroSaveImage put in a job's PNGs (image_provenance.py): the record
    when they all carry the same one, {file: record} when they differ, None when none has one."""
    from ..oboro_model.image_provenance import read_image_record
    found = {s: r for s in saved if s.lower().endswith(".png") and (r := read_image_record(out / s)) is not None}
    records = list(found.values())
    if not records:
        return None
    return records[0] if all(r == records[0] for r in records) else found


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


class Output:
    """The --out folder. Work happens in a hidden temp folder inside it (same file system, so
    moving a finished file in is an atomic rename); it is removed on exit, whatever happened."""

    def __init__(self, path, ledger: str = "runs.jsonl", prefix: str = ".oboro-run-"):
        self.dir, self.log, self.prefix = Path(path), Path(path) / ledger, prefix  # a shard: its own (shards.py)
        self.saved: list[str] = []
        self.jobs = self.failed = 0
        self._lock = threading.Lock()

    @staticmethod
    def remove_stale(path, prefixes=(".oboro-run-", ".oboro-shard-")) -> list[Path]:
        """Remove the temp folders of runs that were killed (only call while holding the lock that
        keeps every other user of those `prefixes` out: --out's, or a shard's own)."""
        stale = [p for pre in prefixes for p in Path(path).glob(pre + "*") if p.is_dir()] \
            if Path(path).is_dir() else []
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        if stale:
            print(f"oboro-run: removed {len(stale)} temp folder(s) left in {path} by killed runs: "
                  f"{', '.join(p.name for p in stale)}", file=sys.stderr)
        return stale

    def __enter__(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.dir))
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def staging(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.tmp))

    @staticmethod
    def clear(folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def _unrecorded_copy(self, path: Path, job) -> bool:
        """Whether `path` is this job's own image from a run killed between moving it in and writing
        its ledger line (PNG prompt chunk = the job's prompt, and no ledger line lists the file): the
        rerun replaces it instead of adding `-1`, so --resume never leaves two images of one job."""
        from . import ledger
        try:
            from PIL import Image
            with Image.open(path) as im:
                prompt = json.loads(im.text["prompt"])
        except Exception:  # noqa: BLE001  (not a PNG of ours, no prompt chunk...: keep it)
            return False
        rel = path.relative_to(self.dir).as_posix()
        return ledger.digest(prompt) == job.id and not any(rel in (r.get("outputs") or [])
                                                           for r in ledger.read(self.dir))

    def commit(self, job, files, seconds: float, error: str | None = None, **extra) -> list[str]:
        """Move a job's finished files (src, subfolder, filename) into --out as
        under the names file_names gives and append its runs.jsonl line."""
        with self._lock:
            saved = []
            for (src, _, _), (subfolder, name) in zip(files, file_names(job.stem, files)):
                dest = self.dir / _relative(subfolder, name)
                stem, n = dest, 0
                while dest.exists() and not self._unrecorded_copy(dest, job):
                    n += 1
                    dest = stem.with_name(f"{stem.stem}-{n}{stem.suffix}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
                saved.append(dest.relative_to(self.dir).as_posix())
            record = {"job": job.index, "id": job.id, "workflow": job.workflow, "row": job.row,
                      "overrides": job.overrides, "seed": job.seed, "outputs": saved, "seconds": round(seconds, 3),
                      **extra}
            prov = provenance_of(self.dir, saved)
            if prov:
                record["provenance"] = prov
            if error is not None:
                record["error"] = error.strip()
            log = self.log
            cut = log.is_file() and log.stat().st_size > 0 and _last_byte(log) != b"\n"
            with open(log, "a", encoding="utf-8") as f:  # after a line a crash cut short: a new line
                f.write(("\n" if cut else "") + json.dumps(record, default=str) + "\n")  # one complete line per write
                f.flush()
                os.fsync(f.fileno())
            self.saved += [str(self.dir / s) for s in saved]
            self.jobs += 1
            self.failed += error is not None
            return saved


class Progress:
    """One line per event on stderr (a live step counter when stderr is a terminal)."""

    def __init__(self, total: int, batch: int | None = None):
        """`batch`: the whole batch's size when this process runs a slice of it (--shard): lines
        are numbered by job number in the batch, [k/batch]."""
        self.total, self.batch, self.t0 = total, batch or total, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.job = self.prompt = None
        self.started: dict[int, float] = {}
        self._lock = threading.Lock()

    def say(self, job, msg: str, end="\n"):
        prefix = "\r\033[K" if self.tty else ""
        with self._lock:  # one write per line: workers of several servers print at once
            sys.stderr.write(f"{prefix}[{job.index + 1}/{self.batch}] {msg}{end}")
            sys.stderr.flush()

    def begin(self, job, prompt, where: str = ""):
        self.job, self.prompt = job, prompt
        self.started[job.index] = time.monotonic()
        self.say(job, "start" + (f" seed {job.seed}" if job.seed is not None else "") + where)

    def event(self, event: str, data: dict):
        """ComfyUI's executor events (what the browser gets over the websocket)."""
        if event == "executing" and self.job is not None and isinstance(data, dict) and data.get("node"):
            nid = data["node"]
            self.say(self.job, f"node {nid} {self.prompt.get(nid, {}).get('class_type', '')}")

    def step(self, value, total, job=None):
        job = job or self.job
        if job is None or not total:
            return
        if self.tty:
            self.say(job, f"step {value}/{total}", end="" if value < total else "\n")
        elif value == total or value % max(1, total // 4) == 0:
            self.say(job, f"step {value}/{total}")

    def finished(self, job, saved, where: str = ""):
        took = time.monotonic() - self.started.get(job.index, self.t0)
        self.say(job, f"done in {took:.1f}s{where}: " + (", ".join(saved) or "no files saved"))

    def failed(self, job, message: str):
        self.say(job, f"FAILED: {message.strip()}")

    def done(self, failed: int, out: Output):
        print(f"oboro-run: {self.total - failed}/{self.total} job(s) done in {time.monotonic() - self.t0:.1f}s, "
              f"{len(out.saved)} file(s) in {out.dir} (log: {out.log})", file=sys.stderr, flush=True)
