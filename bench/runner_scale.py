"""oboro-run throughput on this machine: embedded vs --ray with 1 and 2 actors, in one run.

Why: Ray pays for itself only when its actors run jobs in parallel faster than one process does;
what it adds to every job (task submit, the PNG bytes back to the driver, the atomic commit) is the
price on a single GPU. Each mode runs the same batch of the shipped txt2img workflow on the tiny
test models (tests/tiny.py; --models DIR for real ones) through the real CLI, and is timed from
its own progress lines:

  start-up   command start to the first finished job (ComfyUI import, Ray start, actors loading)
  jobs/s     steady state: (N - 1) jobs over first-to-last finished job
  job s      median of runs.jsonl `seconds` (embedded: execution; Ray: dispatch to commit, so the
             difference to embedded is the per-job overhead Ray adds at the same thread count)

On a shared machine the figures move with the neighbours' load: --repeat runs the three modes in
turn that many times and keeps each mode's best jobs/s and job s.

Threads: every process runs torch on --threads threads (default 1: OMP_NUM_THREADS, which Ray
passes on to its actors), so "ray-1-actor" vs "embedded" is Ray's own cost at equal compute and
"ray-2-actors" vs "embedded" is what a second actor buys. --kill adds a run with 2 actors where
the bench kills one (SIGKILL by PID, as tests/test_runner_farm.py) when it is handed its job after
the 3rd finished, on --kill-jobs jobs (long enough for Ray to bring the actor back): it prints the
retried jobs, ledger lines, distinct job ids, images, failures and seconds until the actor rejoined.

  .venv/bin/python bench/runner_scale.py [--jobs 24] [--steps 4] [--size 64] [--threads 1] [--repeat 2] [--kill]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "scripts" / "oboro-run"
WF = REPO / "example_workflows" / "oboro_txt2img.json"


def tiny_models(work: Path) -> Path:
    root = work / "models"
    if not (root / "vae" / "ae.safetensors").is_file():
        code = ("import sys; sys.path[:0] = [{s!r}, {t!r}]; import oboro_env; oboro_env.add_comfy_to_path(); "
                "from comfy.cli_args import args; args.cpu = True; oboro_env.import_oboro(); "
                "from pathlib import Path; from tiny import save_shipped_models; save_shipped_models(Path({r!r}))")
        subprocess.run([sys.executable, "-c", code.format(s=str(REPO / "scripts"), t=str(REPO / "tests"), r=str(root))],
                       check=True, cwd=REPO)
    return root


def run_mode(name: str, extra: list[str], a, models: Path, kill_after: int = 0, jobs: int = 0) -> dict:
    """kill_after: SIGKILL the Ray actor handed a job once that many jobs are done (by its PID, as
    tests/test_runner_farm.py does), and time until Ray has it back."""
    out, jobs = Path(a.work) / name, jobs or a.jobs
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(RUN), str(WF), "--models", str(models), "--seeds", f"0:{jobs}", "--cpu",
           "--set", f"OboroSampler.steps={a.steps}", "--set", f"EmptyOboroLatentImage.width={a.size}",
           "--set", f"EmptyOboroLatentImage.height={a.size}", "--out", str(out), *extra]
    t0, done = time.monotonic(), []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
    tail, killed, rejoined = [], None, None
    for line in proc.stderr:
        tail = (tail + [line])[-20:]
        if "] done in " in line:
            done.append(time.monotonic())
        m = re.search(r"\] start seed \d+ on ray pid (\d+)@", line)
        if kill_after and m and len(done) >= kill_after and killed is None:
            os.kill(int(m[1]), signal.SIGKILL)
            killed = time.monotonic()
        if killed and rejoined is None and "Ray actor restarted" in line:
            rejoined = time.monotonic()
    if proc.wait() != 0 or len(done) != jobs:
        sys.exit(f"{name} failed:\n{''.join(tail)}")
    log = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    row = {"mode": name, "startup_s": done[0] - t0, "jobs_per_s": (len(done) - 1) / (done[-1] - done[0]),
           "job_s": statistics.median(j["seconds"] for j in log), "wall_s": time.monotonic() - t0}
    if kill_after:
        row["fault"] = {"retried_jobs": sum(j.get("attempts", 1) > 1 for j in log),
                        "lines": len(log), "distinct_jobs": len({j["id"] for j in log}),
                        "images": len(list(out.glob("*.png"))), "failed": sum("error" in j for j in log),
                        "rejoin_s": None if rejoined is None else round(rejoined - killed, 1)}
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=24)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=64, help="image width and height (px)")
    p.add_argument("--models", help="model root (default: the tiny test models, made once in --work)")
    p.add_argument("--work", default="/tmp/oboro_runner_scale")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default %(default)s)")
    p.add_argument("--kill-jobs", type=int, default=80, help="jobs of the --kill run (default %(default)s)")
    p.add_argument("--kill", action="store_true", help="also: 2 actors, one killed mid-job after 3 jobs (fault row)")
    a = p.parse_args()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    models = Path(a.models) if a.models else tiny_models(Path(a.work))
    cpus, load0 = os.cpu_count() or 1, os.getloadavg()[0]
    modes = {"embedded": [], "ray-1-actor": ["--ray", "--cpus-per-worker", str(cpus)],
             "ray-2-actors": ["--ray", "--cpus-per-worker", str(cpus / 2)]}  # local Ray: all CPUs
    best = {}
    for _ in range(a.repeat):
        for name, extra in modes.items():
            r, b = run_mode(name, extra, a, models), best.get(name)
            best[name] = r if b is None else {**r, "jobs_per_s": max(r["jobs_per_s"], b["jobs_per_s"]),
                                              "job_s": min(r["job_s"], b["job_s"]),
                                              "startup_s": min(r["startup_s"], b["startup_s"])}
    rows = list(best.values())
    if a.kill:
        rows.append(run_mode("ray-2-kill-1", modes["ray-2-actors"], a, models, kill_after=3, jobs=a.kill_jobs))
    base = rows[0]
    print(f"{a.jobs} jobs, {a.steps} steps, {a.threads} thread(s) per process, {a.size}x{a.size} px, {cpus} CPU(s), best of {a.repeat}; load average "
          f"before {load0:.1f}, after {os.getloadavg()[0]:.1f} (other users of the machine skew every figure)")
    print(f"{'mode':14} {'start-up s':>10} {'jobs/s':>8} {'x embedded':>10} {'job s':>7} {'overhead ms':>11} {'wall s':>7}")
    for r in rows:
        overhead = (r["job_s"] - base["job_s"]) * 1000 if r is not base else 0.0
        print(f"{r['mode']:14} {r['startup_s']:10.1f} {r['jobs_per_s']:8.2f} {r['jobs_per_s'] / base['jobs_per_s']:10.2f} "
              f"{r['job_s']:7.3f} {overhead:11.0f} {r['wall_s']:7.1f}")
        if "fault" in r:
            print(f"  one actor killed mid-job: {r['fault']}")


if __name__ == "__main__":
    main()
