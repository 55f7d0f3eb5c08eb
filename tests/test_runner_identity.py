"""Issues 26 and 27 for scripts/oboro-run, driven as a user meets them (the real CLI in
subprocesses, the tiny models, the embedded ComfyUI):

- --resume never silently skips: into a folder written by another prompt it runs the new jobs,
  and it skips a job only when runs.jsonl records that job's identity (the same job given as the
  UI workflow or its API twin is one job);
- one writer per --out: a second oboro-run on a busy folder exits 2 naming the folder and the
  holder and writes nothing; a killed run's temp folder is removed by the next --resume;
- --check refuses a fractional seed, a NaN cfg, link slots given as a string or -1, and a solver
  that is not in the list, naming job, input, value and what is allowed;
- PNGs carry the job's workflow and prompt as ComfyUI's SaveImage writes them, under names with
  job number, seed and prompt slug, and runs.jsonl has one line per job.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "scripts" / "oboro-run"
UI = REPO / "example_workflows" / "oboro_txt2img.json"
API = REPO / "workflows" / "api" / "oboro_txt2img.api.json"
CPU = [] if os.environ.get("OBORO_TEST_GPU") == "1" else ["--cpu"]
FAST = ["--set", "OboroSampler.steps=1", "--set", "EmptyOboroLatentImage.width=32",
        "--set", "EmptyOboroLatentImage.height=32"]


def oboro_run(*args, timeout=300):
    return subprocess.run([sys.executable, str(RUN), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def ledger(out: Path) -> list[dict]:
    """The complete lines of runs.jsonl (a line cut by a kill is left out)."""
    lines = []
    for line in (out / "runs.jsonl").read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return lines


def pngs(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.png"))


def test_resume_into_another_prompts_folder_runs_the_new_jobs(comfy, model_root, tmp_path):
    out = tmp_path / "out"
    fox = ["--set", "Positive Prompt.text=A red fox, in snow!"]
    bird = ["--set", "Positive Prompt.text=a blue bird"]
    r = oboro_run(UI, "--models", model_root, "--seeds", "0:2", *fox, *FAST, "--out", out, *CPU)
    assert r.returncode == 0, r.stderr
    assert pngs(out) == ["00000-s0-a-red-fox-in-snow-oboro.png", "00001-s1-a-red-fox-in-snow-oboro.png"]

    r = oboro_run(UI, "--models", model_root, "--seeds", "0:2", *bird, *FAST, "--out", out, "--resume", *CPU)
    assert r.returncode == 0, r.stderr
    assert "--resume: 0 of 2 job(s) already done" in r.stderr  # same job numbers and seeds, other prompt
    assert "also records 2 finished job(s) of another workflow or other overrides" in r.stderr
    assert pngs(out) == ["00000-s0-a-blue-bird-oboro.png", "00000-s0-a-red-fox-in-snow-oboro.png",
                         "00001-s1-a-blue-bird-oboro.png", "00001-s1-a-red-fox-in-snow-oboro.png"]
    log = ledger(out)
    assert len(log) == 4 and len({j["id"] for j in log}) == 4 and len({j["workflow"] for j in log}) == 1
    assert [(j["job"], j["seed"], j["outputs"]) for j in log[2:]] == [(0, 0, ["00000-s0-a-blue-bird-oboro.png"]),
                                                                      (1, 1, ["00001-s1-a-blue-bird-oboro.png"])]

    # the API twin of the UI workflow with the same overrides runs the same prompt: the same jobs
    r = oboro_run(API, "--models", model_root, "--seeds", "0:2", *bird, *FAST, "--out", out, "--resume", *CPU)
    assert r.returncode == 0, r.stderr
    assert "--resume: 2 of 2 job(s) already done" in r.stderr and len(ledger(out)) == 4 and len(pngs(out)) == 4

    # the PNG reloads in ComfyUI as the job that made it: SaveImage's `prompt` and `workflow` chunks
    from oboro.runner import convert
    text = Image.open(out / "00001-s1-a-blue-bird-oboro.png").text
    prompt, workflow = json.loads(text["prompt"]), json.loads(text["workflow"])
    assert prompt["3"]["inputs"]["text"] == "a blue bird" and prompt["6"]["inputs"]["seed"] == 1
    assert prompt["6"]["inputs"]["steps"] == 1 and prompt["5"]["inputs"]["width"] == 32
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert nodes[3]["widgets_values"][0] == "a blue bird" and nodes[6]["widgets_values"][:3] == [1, "fixed", 1]
    assert convert.to_api(workflow, convert.local_node_defs()) == prompt


def wait_for(what, timeout=240):
    t0 = time.monotonic()
    while not what():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_one_writer_per_out_and_a_killed_run_is_resumed(model_root, tmp_path):
    out = tmp_path / "out"
    fox = ["--set", "Positive Prompt.text=a red fox"]
    err = open(tmp_path / "first.stderr", "w")
    first = subprocess.Popen([sys.executable, str(RUN), UI, "--models", model_root, "--seeds", "0:500", *fox,
                              *FAST, "--out", out, *CPU], stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
    try:
        wait_for(lambda: first.poll() is not None or ((out / "runs.jsonl").is_file() and ledger(out)))
        assert first.poll() is None, (tmp_path / "first.stderr").read_text()

        second = oboro_run(UI, "--models", model_root, "--seeds", "0:2", "--set", "Positive Prompt.text=intruder",
                           *FAST, "--out", out, *CPU)
        assert second.returncode == 2, second.stderr
        assert f"--out {out}: {out} is being written by oboro-run oboro_txt2img.json (500 job(s)) " in second.stderr
        assert f"pid {first.pid}," in second.stderr and "nothing was changed there" in second.stderr
        assert second.stdout == "" and "loading ComfyUI" not in second.stderr  # refused before start-up
        first.send_signal(signal.SIGKILL)  # a run killed mid-batch: its temp folder stays behind
        first.wait(60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(60)
        err.close()
    stale = sorted(p.name for p in out.glob(".oboro-run-*"))
    done = ledger(out)
    assert stale and done and not any("intruder" in json.dumps(j) for j in done)
    assert not any("intruder" in p.name for p in out.rglob("*"))

    n = len(done)
    r = oboro_run(UI, "--models", model_root, "--seeds", f"0:{n + 1}", *fox, *FAST, "--out", out, "--resume", *CPU)
    assert r.returncode == 0, r.stderr  # the kill released the lock (the OS drops the flock)
    assert f"removed 1 temp folder(s) left in {out} by killed runs: {stale[0]}" in r.stderr
    assert f"--resume: {n} of {n + 1} job(s) already done" in r.stderr
    assert not list(out.glob(".oboro-run-*"))
    log = ledger(out)
    assert len(log) == n + 1 and len({j["id"] for j in log}) == n + 1  # one line per job
    assert log[-1]["job"] == n and log[-1]["seed"] == n and "error" not in log[-1]
    assert all((out / f).is_file() for j in log for f in j["outputs"])


def test_check_refuses_bad_values_naming_job_input_value_and_range(model_root, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"OboroSampler.seed": 1.5}\n{"6.cfg": NaN}\n{"OboroSampler.model": ["1", "0"]}\n'
                    '{"OboroSampler.model": ["1", -1]}\n{"Positive Prompt.text": "fine"}\n')
    out = tmp_path / "out"
    r = oboro_run(UI, "--models", model_root, "--batch", rows, "--set", "OboroSampler.solver=bogus", "--check",
                  "--out", out, *CPU)
    assert r.returncode == 2, r.stderr
    err = r.stderr
    assert "job 0 (batch row 1, seed 1.5): node 6 (OboroSampler) input seed: 1.5 is not an integer " \
           "(INT, allowed 0..18446744073709551615)" in err
    assert "job 1 (batch row 2, seed 42): node 6 (OboroSampler) input cfg: nan is not a finite number " \
           "(FLOAT, allowed 0.0..100.0)" in err
    assert "job 2 (batch row 3, seed 42): node 6 (OboroSampler) input model: link ['1', '0']: output slot '0' " \
           "is not an integer; node 1 (OboroModelLoader) has output slot 0" in err
    assert "job 3 (batch row 4, seed 42): node 6 (OboroSampler) input model: link ['1', -1]: output slot -1 " \
           "does not exist; node 1 (OboroModelLoader) has output slot 0" in err
    # every job has the bad solver: named once; ComfyUI's own validator does not check V3 combos
    assert "\noboro-run: error: node 6 (OboroSampler) input solver: value 'bogus' not in " \
           "['euler', 'heun', 'midpoint', 'rk4']" in err
    assert "5 problem(s); nothing was run" in err and "job 4" not in err
    assert not out.exists()
