"""`oboro-run`: run a saved ComfyUI workflow headless, one job per batch row / seed.

Embedded by default (ComfyUI's own validator and PromptExecutor in this process, core nodes and
ours); `--server URL` (repeatable) sends the jobs to running ComfyUI servers instead (remote.py),
`--ray` to Ray actors that each keep an embedded ComfyUI (ray_backend.py); `--shard I/N` runs one of
N slices of the batch, for array jobs (shards.py).
Every job is checked before any runs (ours, then ComfyUI's own validator, also with --check):
problems exit with code 2, name each problem (and the job, row and seed when not every job has it)
and leave no files. One writer per --out: the batch holds the folder's lock
(oboro_model/folder_lock.py) from before it reads the ledger to its last line, so a second oboro-run
on that folder exits 2 naming the holder and changes nothing. Under the lock, temp folders of killed
runs (.oboro-run-*) are stale and removed. Images land in --out by atomic rename as
NNNNN-s<seed>-<prompt slug>.png with the workflow and prompt embedded; each job appends one line
to runs.jsonl. --resume skips only jobs whose identity that ledger records as done (ledger.py).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import ledger, shards
from .convert import WorkflowError, check, combo_options, input_specs, is_ui, load, needed, to_api, ui_with_values
from .output import Output, Progress

SEED_INPUTS = ("seed", "noise_seed")
EPILOG = """examples:
  oboro-run example_workflows/oboro_txt2img.json --out out/
  oboro-run example_workflows/oboro_txt2img.json --set "Positive Prompt.text=a red fox in snow" --seeds 0:8 --out out/
  oboro-run example_workflows/oboro_txt2img.json --batch prompts.csv --set OboroSampler.steps=30 --out out/
  oboro-run example_workflows/oboro_img2img.json --set LoadImage.image=/abs/path/photo.png --set 9.denoise=0.5
  oboro-run example_workflows/oboro_txt2img.json --seeds 0:100 --server http://gpu1:8188 --server http://gpu2:8188
  oboro-run example_workflows/oboro_txt2img.json --check --models /data/models
  oboro-run example_workflows/oboro_txt2img.json --seeds 0:1000 --ray --out out/          (local Ray: one actor per GPU)
  oboro-run example_workflows/oboro_txt2img.json --seeds 0:1000 --ray head:6379 --out /shared/out
  oboro-run example_workflows/oboro_txt2img.json --seeds 0:1000 --shard $SLURM_ARRAY_TASK_ID/8 --out /shared/out
  oboro-run --merge-ledger --out /shared/out      (the ledgers of shards that were killed)
NODE is a node id, or a node title or type when only one node has it. Values are JSON when they
parse (numbers, true/false) and strings otherwise. --batch rows map "NODE.input" to a value (CSV
header row / JSON lines); an empty CSV cell leaves that input as it is.
--ray and --shard: docs/runner.md ("Farm scale").
exit codes: 0 done, 1 some job failed while running, 2 invalid workflow/arguments (nothing run)."""


@dataclass
class Job:
    index: int
    prompt: dict
    overrides: dict = field(default_factory=dict)
    seed: int | None = None
    row: int | None = None  # batch row, 1-based
    workflow: str = ""      # ledger.digest of the workflow before overrides
    ui: dict | None = None  # the UI-format workflow showing this job's values (embedded in its PNGs)

    @property
    def id(self) -> str:
        return ledger.digest(self.prompt)

    @property
    def stem(self) -> str:
        return ledger.job_stem(self.index, self.seed, ledger.positive_text(self.prompt))

    def describe(self) -> str:
        where = [f"batch row {self.row}"] if self.row is not None else []
        return f"job {self.index}" + (f" ({', '.join(where + [f'seed {self.seed}'])})" if self.seed is not None
                                      or where else "")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="oboro-run", epilog=EPILOG, description="Run a saved ComfyUI workflow (UI or "
                                "API format) headless.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", nargs="?",
                   help="workflow .json, as saved by ComfyUI (UI format) or exported (API format)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.input=value",
                   help="override an input of every job (repeatable)")
    p.add_argument("--batch", metavar="ROWS", help="rows.csv or rows.jsonl: one job per row of overrides")
    p.add_argument("--seeds", metavar="A:B", help="one job per seed in range(A, B), set on every seed/noise_seed input")
    p.add_argument("--out", default="oboro-out", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--comfyui", metavar="PATH", help="ComfyUI to run (default: $COMFYUI_PATH or the repo's .comfyui)")
    p.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="extra model root with subfolders diffusion_models, text_encoders, vae, loras... (repeatable)")
    p.add_argument("--server", action="append", default=[], metavar="URL",
                   help="run on this ComfyUI server instead of in-process (repeatable: jobs are shared out)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray actors, each an embedded ComfyUI keeping its models loaded: a local Ray "
                        "without ADDRESS, else the cluster at ADDRESS (host:port, ray://host:10001, auto)")
    p.add_argument("--cpus-per-worker", type=float, default=1, metavar="N",
                   help="--ray on CPU (no GPU, or --cpu): CPUs per actor, which sets the actor count "
                        "(default: %(default)s); with GPUs there is one actor per GPU")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="--ray: times a job is retried on another actor after its actor died mid-job "
                        "(default: %(default)s); a job that fails by itself is never retried")
    p.add_argument("--shard", metavar="I/N", help="run only the I-th of N deterministic slices of the batch "
                   "(jobs k with k mod N == I); shards share --out and merge their ledgers into runs.jsonl")
    p.add_argument("--merge-ledger", action="store_true",
                   help="merge the ledgers of finished or killed shards in --out into runs.jsonl (no workflow)")
    p.add_argument("--resume", action="store_true",
                   help="skip jobs that --out's runs.jsonl records as done (the same prompt after --set, batch "
                        "row and seed, and its files still there), e.g. after the server died mid-batch")
    p.add_argument("--check", action="store_true", help="validate every job, run nothing")
    p.add_argument("--cpu", action="store_true", help="embedded: run on the CPU even if a GPU is present")
    p.add_argument("-v", "--verbose", action="store_true", help="show ComfyUI's own log messages")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(message)s", force=True)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the saved paths
        try:
            return run(opts, stdout)
        except WorkflowError as e:
            for problem in e.problems:
                print(f"oboro-run: error: {problem}", file=sys.stderr)
            print(f"oboro-run: {len(e.problems)} problem(s); nothing was run", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("oboro-run: interrupted", file=sys.stderr)
            return 130


def run(opts, stdout) -> int:
    check_out_dir(opts.out)  # before ComfyUI loads: a wrong --out should not cost a start-up
    if opts.merge_ledger and opts.workflow is None:
        return shards.merge_command(opts.out)
    check_flags(opts)
    shard = shards.parse(opts.shard) if opts.shard else None
    if not opts.check:
        probe_lock(opts.out, shard)
    doc = load(opts.workflow)
    sets = {k: v for k, v in (parse_set(s) for s in opts.sets)}
    rows = load_rows(opts.batch) if opts.batch else [{}]
    seeds = parse_seeds(opts.seeds) if opts.seeds else [None]
    if opts.server:
        from .remote import Farm
        for flag, given in (("--models", opts.models), ("--comfyui", opts.comfyui), ("--cpu", opts.cpu)):
            if given:
                print(f"oboro-run: warning: {flag} is ignored with --server (servers use their own)", file=sys.stderr)
        backend = Farm(opts.server)
    elif opts.ray:
        from .ray_backend import RayFarm
        backend = RayFarm(opts)
    else:
        from .local import Embedded
        backend = Embedded(opts)
    try:
        return run_jobs(opts, stdout, backend, doc, sets, rows, seeds, shard)
    finally:
        getattr(backend, "close", lambda: None)()  # Ray: the actors, and a local Ray we started


def run_jobs(opts, stdout, backend, doc, sets, rows, seeds, shard) -> int:
    if is_ui(doc):  # converted with the live node definitions
        defs = backend.node_defs({n.get("type") for n in doc["nodes"]})
        base = to_api(doc, defs)
    else:
        base = to_api(doc, {})
        defs = backend.node_defs({n.get("class_type") for n in base.values()})
    jobs, problems = make_jobs(base, defs, sets, rows, seeds, opts.batch is not None)
    validate(jobs, defs, backend, problems)
    if opts.check:
        print(f"oboro-run: ok: {len(jobs)} job(s) valid", file=sys.stderr)
        return 0
    batch = len(jobs)
    if shard:
        jobs = shards.select(jobs, shard)
    if is_ui(doc):
        for job in jobs:
            job.ui = ui_with_values(doc, job.prompt, defs)
    total = len(jobs)
    with claim(opts.out, what(opts, total, shard), shard=shard):
        Output.remove_stale(opts.out, (shard.prefix,)) if shard else Output.remove_stale(opts.out)
        if opts.resume:
            jobs = ledger.skip_done(jobs, opts.out)
        progress = Progress(total, batch)
        kind = {"ledger": shard.ledger, "prefix": shard.prefix} if shard else {}
        try:
            with Output(opts.out, **kind) as out:
                failed = backend.run(jobs, out, progress)
        finally:
            if shard:  # also after Ctrl-C or a failed job: what is done counts
                shards.merge(opts.out, shard)
    for path in out.saved:
        print(path, file=stdout)
    progress.done(failed, out)
    return 1 if failed else 0


def what(opts, total: int, shard=None) -> str:
    return f"oboro-run {Path(opts.workflow).name} ({total} job(s){f', {shard.name}' if shard else ''})"


def check_flags(opts) -> None:
    if opts.workflow is None and opts.ray and opts.ray.lower().endswith(".json"):
        opts.workflow, opts.ray = opts.ray, "local"  # `--ray wf.json`: argparse gave the workflow to --ray
    if opts.workflow is None:
        raise WorkflowError("the workflow .json is missing (only --merge-ledger runs without one)")
    if opts.merge_ledger:
        raise WorkflowError(f"--merge-ledger runs alone (oboro-run --merge-ledger --out DIR), not with the "
                            f"workflow {opts.workflow}: shards merge their own ledgers when they end")
    if opts.ray and opts.server:
        raise WorkflowError("--ray and --server: pick one backend")
    if opts.cpus_per_worker <= 0 or opts.retries < 0:
        raise WorkflowError(f"--cpus-per-worker {opts.cpus_per_worker} / --retries {opts.retries}: expected "
                            "a positive number of CPUs and retries >= 0")


@contextlib.contextmanager
def claim(out, what: str, shard=None, shared: bool = False, record: bool = True):
    """Hold --out's write lock (one writer per folder; shards share it and each holds its own too,
    shards.py); a held lock is a WorkflowError (exit 2)."""
    from ..oboro_model.folder_lock import FolderBusy, folder_lock
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(folder_lock(out, what, shared=shared or shard is not None, record=record))
            if shard is not None:
                stack.enter_context(folder_lock(out, what, name=shard.lock, record=record))
            yield
    except FolderBusy as e:
        raise WorkflowError(f"--out {out}: {e}; nothing was changed there") from None


def probe_lock(out, shard=None) -> None:
    """Fail fast, before ComfyUI loads, when another run holds --out (creates nothing)."""
    from ..oboro_model.folder_lock import LOCK_NAME
    if (Path(out) / LOCK_NAME).is_file() or (shard and (Path(out) / shard.lock).is_file()):
        with claim(out, "oboro-run (checking the folder is free)", shard, record=False):
            pass


def check_out_dir(out) -> None:
    """--out must be a folder or creatable as one (no part of it an existing file)."""
    p = Path(out)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise WorkflowError(f"--out {out}: {q} is a file, not a folder; pick a folder for the results")
            return


def parse_set(text: str):
    key, eq, value = text.partition("=")
    if not eq or "." not in key:
        raise WorkflowError(f"--set {text!r}: expected NODE.input=value")
    return key, value


def parse_seeds(text: str) -> list[int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise WorkflowError(f"--seeds {text!r}: expected A:B (integers, B exclusive)") from None
    if b <= a:
        raise WorkflowError(f"--seeds {text!r}: empty range")
    return list(range(a, b))


def load_rows(path) -> list[dict]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")  # Excel writes a byte-order mark
    except OSError as e:
        raise WorkflowError(f"--batch {p}: {e.strerror or e}") from None
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = []
        for r in reader:
            if r.get(None):  # DictReader puts the cells beyond the header under None
                raise WorkflowError(f"--batch {p} row {len(rows) + 1} (line {reader.line_num}): "
                                    f"{len(r[None])} more cell(s) than the {len(reader.fieldnames)} header "
                                    f"columns: {r[None]}")
            rows.append({k.strip(): v for k, v in r.items() if k and v not in ("", None)})
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise WorkflowError(f"--batch {p} line {i}: malformed JSON: {e.msg}") from None
                if not isinstance(row, dict):
                    raise WorkflowError(f"--batch {p} line {i}: expected an object of NODE.input -> value")
                rows.append(row)
    if not rows:
        raise WorkflowError(f"--batch {p}: no rows")
    return rows


def find_node(prompt: dict, ref: str) -> str:
    if ref in prompt:
        return ref
    for what, key in (("title", lambda n: (n.get("_meta") or {}).get("title")),
                      ("type", lambda n: n.get("class_type"))):
        hits = [nid for nid, n in prompt.items() if key(n) == ref]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise WorkflowError(f"'{ref}' is the {what} of nodes {', '.join(hits)}; use a node id")
    raise WorkflowError(f"no node with id, title or type '{ref}'")


def coerce(raw, spec):
    """A --set / CSV string as the input's type wants it; JSON rows are used as they are."""
    if not isinstance(raw, str):
        return raw
    typ, options = spec[0], combo_options(spec)
    if typ == "STRING" or (options is not None and all(isinstance(o, str) for o in options)):
        return raw
    if typ == "BOOLEAN" and raw.lower() in ("true", "false", "yes", "no", "1", "0"):
        return raw.lower() in ("true", "yes", "1")
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def apply(prompt: dict, defs, key: str, raw, where: str):
    ref, _, name = key.rpartition(".")
    if not ref or not name:
        raise WorkflowError(f"{where} {key!r}: expected NODE.input")
    try:
        nid = find_node(prompt, ref)
    except WorkflowError as e:
        raise WorkflowError(f"{where} {key}: {e}") from None
    node = prompt[nid]
    spec = input_specs(defs.get(node["class_type"], {})).get(name)
    if spec is None:
        raise WorkflowError(f"{where} {key}: node {nid} ({node['class_type']}) has no input '{name}'")
    value = coerce(raw, spec)
    if spec[0] == "INT" and isinstance(value, float) and value.is_integer():
        value = int(value)  # "30.0" from a spreadsheet is 30; 1.5 stays and is refused by check()
    node.setdefault("inputs", {})[name] = value
    return value


def seed_inputs(prompt):
    return [(nid, name) for nid, n in prompt.items() for name in SEED_INPUTS
            if name in (n.get("inputs") or {}) and not isinstance(n["inputs"][name], list)]


def make_jobs(base, defs, sets, rows, seeds, batch=False):
    """One job per row x seed, and every problem found applying the overrides."""
    jobs, problems, workflow = [], [], ledger.digest(base)
    for r, row in enumerate(rows, 1):
        for seed in seeds:
            prompt, overrides = copy.deepcopy(base), {}
            for key, raw, where in [(k, v, "--set") for k, v in sets.items()] + \
                                   [(k, v, f"--batch row {r}:") for k, v in row.items()]:
                try:
                    overrides[key] = apply(prompt, defs, key, raw, where)
                except WorkflowError as e:  # keep going: report every problem at once
                    problems += [p for p in e.problems if p not in problems]
            targets = seed_inputs(prompt)
            if seed is not None:
                if not targets and "--seeds: the workflow has no seed" not in str(problems):
                    problems.append("--seeds: the workflow has no seed or noise_seed input to set")
                for nid, name in targets:
                    prompt[nid]["inputs"][name] = seed
            elif targets:
                seed = prompt[targets[0][0]]["inputs"][targets[0][1]]
            jobs.append(Job(len(jobs), prompt, overrides, seed, r if batch else None, workflow))
    return jobs, problems


def validate(jobs, defs, backend, problems=()) -> None:
    """All problems at once: those every job has once, the others per job."""
    found = []
    for job in jobs:
        need = needed(job.prompt, defs)
        ours = check(job.prompt, defs, backend.folders, need, values=backend.remote)
        found.append(backend.problems(job.prompt, ours, need))
    problems = list(problems)
    for job, msgs in zip(jobs, found):
        for m in msgs:
            m = m if all(m in f for f in found) and len(jobs) > 1 else f"{job.describe()}: {m}"
            if m not in problems:
                problems.append(m)
    if problems:
        raise WorkflowError(problems)
