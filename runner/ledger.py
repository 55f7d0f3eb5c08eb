"""Who a job is, and what `--resume` may skip: the rule that keeps oboro-run from silently skipping.

A job's identity is what decides its output: the API prompt it runs (the workflow with its --set,
batch row and seed applied), hashed canonically without the cosmetic `_meta` titles. Its id is
`sha256(prompt)[:16]`, recorded as `id` on the job's runs.jsonl line next to `workflow` (the same
hash of the workflow before any override). Two spellings of one override (`6.cfg`,
`OboroSampler.cfg`) give one id; any change to the workflow, an override or the seed gives another.
The job number is not part of it, so reordering or extending a batch file resumes correctly.

`--resume` skips a job only when the ledger of that `--out` records its id as finished without
error AND every file that line lists is still there. A line without an id (written before ids
existed), a line a crash cut short, a failed job or a job whose image was deleted: run again.
Jobs of another workflow or batch recorded in the same folder never match, so a batch resumed into
a folder written by another workflow RUNS all its jobs (it does not refuse); the other lines and
files stay as they are and are counted in a note on stderr. The same id twice in one batch is two
jobs: each needs its own done line.

The slug of a job is a short, file-name-safe form of its positive prompt, so `--out` can be read
without opening runs.jsonl; output names are `NNNNN-s<seed>-<slug>-<save prefix><ext>` for both
backends (output.file_names).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

LEDGER = "runs.jsonl"
SLUG_CHARS = 32
TEXT_INPUTS = ("text", "prompt", "positive", "text_g", "string")


def canonical(prompt: dict) -> str:
    """The prompt as JSON with sorted keys, without `_meta` (titles do not change what runs)."""
    bare = {nid: {k: v for k, v in node.items() if k != "_meta"} for nid, node in prompt.items()}
    return json.dumps(bare, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def digest(prompt: dict) -> str:
    return hashlib.sha256(canonical(prompt).encode("utf-8")).hexdigest()[:16]


def positive_text(prompt: dict) -> str:
    """The text behind a sampler's `positive` input, else a node titled "...positive...", else the
    first text input of the graph; "" when the graph has no prompt text."""
    def text_of(node):
        inputs = (node or {}).get("inputs") or {}
        for name in TEXT_INPUTS:
            if isinstance(inputs.get(name), str) and inputs[name].strip():
                return inputs[name]
        return None

    order = sorted(prompt, key=lambda x: (len(x), x))
    for nid in order:
        link = (prompt[nid].get("inputs") or {}).get("positive")
        if isinstance(link, list) and link and isinstance(link[0], str):
            found = text_of(prompt.get(link[0]))
            if found:
                return found
    titled = [nid for nid in order if "positive" in str((prompt[nid].get("_meta") or {}).get("title", "")).lower()]
    for nid in titled + order:
        found = text_of(prompt[nid])
        if found:
            return found
    return ""


def slug(text: str, limit: int = SLUG_CHARS) -> str:
    """"A red fox, in snow!" -> "a-red-fox-in-snow" (ASCII letters and digits, accents dropped:
    "Crème" -> "creme"; cut at a word). A prompt with no such letters gives ""."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    out = ""
    for w in words:
        nxt = f"{out}-{w}" if out else w
        if len(nxt) > limit:
            return out or w[:limit]
        out = nxt
    return out


def job_stem(index: int, seed, text: str) -> str:
    """The output name of a job's files, without extension: `00003-s42-a-red-fox`."""
    parts = [f"{index:05d}"]
    if seed is not None:
        parts.append(f"s{seed}")
    s = slug(text)
    if s:
        parts.append(s)
    return "-".join(parts)


SHARD_LEDGERS = "runs.shard-*.jsonl"  # shards.py: one per running --shard, merged into LEDGER


def read(out) -> list[dict]:
    """The complete JSON lines of `out`'s ledger and of its shards' ledgers not merged yet (a line
    cut by a crash is left out)."""
    records = []
    for log in [Path(out) / LEDGER, *sorted(Path(out).glob(SHARD_LEDGERS))]:
        if not log.is_file():
            continue
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict):
                records.append(r)
    return records


def done_ids(out) -> Counter:
    """How many finished, error-free runs of each job id `out` records whose files all exist."""
    done = Counter()
    for r in read(out):
        outputs = r.get("outputs") or []
        if isinstance(r.get("id"), str) and "error" not in r and all((Path(out) / o).is_file() for o in outputs):
            done[r["id"]] += 1
    return done


def skip_done(jobs: list, out) -> list:
    """The jobs `out`'s ledger does not record as done (see the module docstring), with a note on
    stderr: how many were skipped, and how many recorded jobs belong to something else."""
    done = done_ids(out)
    mine = Counter(j.id for j in jobs)
    left, used = [], Counter()
    for j in jobs:
        if used[j.id] < done[j.id]:
            used[j.id] += 1
        else:
            left.append(j)
    log = Path(out) / LEDGER
    print(f"oboro-run: --resume: {len(jobs) - len(left)} of {len(jobs)} job(s) already done in {log}",
          file=sys.stderr)
    other = sum(n for i, n in done.items() if i not in mine)
    if other:
        print(f"oboro-run: --resume: {log} also records {other} finished job(s) of another workflow or other "
              "overrides; they do not count as this batch's jobs and are left as they are", file=sys.stderr)
    return left
