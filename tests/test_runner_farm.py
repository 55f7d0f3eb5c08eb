"""Issue 25: oboro-run at farm scale. `--ray` (local Ray, two actors, each a real embedded ComfyUI
on the tiny models) gives the embedded runner's images pixel for pixel, and an actor killed by PID
mid-batch costs nothing: its job is retried on the other actor and every job is in the ledger and
in --out exactly once. `--shard 0/2` and `1/2`, run as two processes on one --out, cover the batch
exactly once and equal the unsharded run. A job that fails by itself is not retried; --resume
after a kill between an image and its ledger line leaves one image; --merge-ledger takes a killed
shard's lines once. All runs are the real CLI in a subprocess."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "scripts" / "oboro-run"
WF = REPO / "example_workflows" / "oboro_txt2img.json"
CPU = [] if os.environ.get("OBORO_TEST_GPU") == "1" else ["--cpu"]
BATCH = ["--seeds", "0:12", "--set", "OboroSampler.steps=1", "--set", "EmptyOboroLatentImage.width=32",
         "--set", "EmptyOboroLatentImage.height=32"]
# Every run on one torch thread, as a 1-CPU Ray actor is: the same float sums, so equal pixels.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TWO_ACTORS = ["--cpus-per-worker", str((os.cpu_count() or 2) / 2)]  # local Ray gets every CPU: 2 actors

pytestmark = pytest.mark.xdist_group("farm")  # one worker: the runs share the reference run and the CPUs


def command(model_root, out, *extra):
    return [sys.executable, str(RUN), str(WF), "--models", str(model_root), *BATCH, "--out", str(out), *CPU,
            *map(str, extra)]


def ledger(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]


def pngs(out: Path) -> dict:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}


def hidden(out: Path) -> list[str]:
    """What --out holds besides the images and runs.jsonl (lock markers; no temp folder, no ledger left)."""
    return sorted(p.name for p in out.iterdir() if p.suffix != ".png" and p.name != "runs.jsonl")


@pytest.fixture(scope="module")
def reference(model_root, tmp_path_factory):
    """The batch run embedded, unsharded: what every farm run must reproduce."""
    out = tmp_path_factory.mktemp("farm") / "embedded"
    r = subprocess.run(command(model_root, out), capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return out


def assert_same_batch(out: Path, reference: Path):
    log, want = ledger(out), ledger(reference)
    assert sorted(j["job"] for j in log) == list(range(12)) and all("error" not in j for j in log)
    assert sorted(j["id"] for j in log) == sorted(j["id"] for j in want)  # each job exactly once
    assert {j["job"]: j["outputs"] for j in log} == {j["job"]: j["outputs"] for j in want}
    got, expected = pngs(out), pngs(reference)
    assert list(got) == list(expected) and len(got) == 12  # one image per job, none twice
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name


def test_ray_two_actors_equal_embedded_and_a_killed_actor_is_retried(model_root, reference, tmp_path):
    """The test kills an actor by its PID as soon as it is handed a job (after 3 jobs are done)."""
    out = tmp_path / "ray"
    proc = subprocess.Popen(command(model_root, out, "--ray", *TWO_ACTORS), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    lines, done, killed = [], 0, None
    try:
        for line in proc.stderr:
            lines.append(line)
            done += " done in " in line
            m = re.search(r"\] start seed \d+ on ray pid (\d+)@", line)
            if m and done >= 3 and killed is None:
                killed = int(m[1])
                os.kill(killed, signal.SIGKILL)
        stdout = proc.stdout.read()
        assert proc.wait() == 0, "".join(lines)
    finally:
        watchdog.cancel()
    err = "".join(lines)
    assert killed is not None, err
    assert "starting 2 Ray actor(s)" in err and "retrying on another actor" in err
    assert_same_batch(out, reference)
    log = ledger(out)
    retried = [j for j in log if j["attempts"] > 1]
    assert len(retried) == 1, err  # the killed actor's job, and only that one
    assert retried[0]["attempts"] == 2 and f"ray pid {killed}@" in retried[0]["retried"][0]
    assert "died mid-job" in retried[0]["retried"][0] and f"pid {killed}@" not in retried[0]["worker"]
    assert all(j["attempts"] == 1 and "retried" not in j for j in log if j is not retried[0])
    assert len({j["worker"] for j in log}) >= 2  # both actors worked
    assert hidden(out) == [".oboro.lock"]
    assert sorted(stdout.split()) == sorted(str(out / n) for n in pngs(out))


def test_ray_a_job_failing_by_itself_is_recorded_once_and_not_retried(model_root, tmp_path):
    """img2img on one actor, the middle batch row's image a corrupt file: ComfyUI fails that job
    while running it (validation passes: the file exists); it is recorded failed after one attempt,
    the rows around it run, exit 1."""
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"LoadImage.image": str(p)}) + "\n" for p in (good, bad, good)))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(RUN), str(REPO / "example_workflows" / "oboro_img2img.json"),
                        "--models", str(model_root), "--batch", str(rows), "--set", "OboroSampler.steps=1",
                        "--set", "ImageScale.width=32", "--set", "ImageScale.height=32", "--out", str(out), *CPU,
                        "--ray", "--cpus-per-worker", str(os.cpu_count() or 1)],
                       capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert r.returncode == 1, r.stderr
    log = sorted(ledger(out), key=lambda j: j["job"])
    assert [j["job"] for j in log] == [0, 1, 2] and [j["attempts"] for j in log] == [1, 1, 1]
    assert "LoadImage" in log[1]["error"] and "retried" not in log[1] and log[1]["outputs"] == []
    assert "error" not in log[0] and "error" not in log[2] and len(list(out.glob("*.png"))) == 2
    assert "retrying" not in r.stderr and "starting 1 Ray actor(s)" in r.stderr


def test_two_shards_as_two_processes_equal_the_unsharded_run(model_root, reference, tmp_path):
    out = tmp_path / "shared"
    procs = [subprocess.Popen(command(model_root, out, "--shard", f"{i}/2"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO) for i in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    log = ledger(out)  # both shard ledgers merged into runs.jsonl by the shards themselves
    assert_same_batch(out, reference)
    assert sorted(j["job"] for j in log if j["job"] % 2 == 0) == list(range(0, 12, 2))
    assert hidden(out) == [".oboro-ledger.lock", ".oboro-shard-0-of-2.lock", ".oboro-shard-1-of-2.lock",
                           ".oboro.lock"]
    assert sorted(results[0][0].split()) == sorted(str(out / f"{k:05d}-s{k}-a-beautiful-cherry-blossom-tree-oboro.png")
                                                   for k in range(0, 12, 2))


def test_resume_after_a_kill_between_the_image_and_its_line_leaves_one_image(model_root, reference, tmp_path):
    """A run killed after moving job 11's image in but before writing its runs.jsonl line: --resume
    runs job 11 again and replaces that unrecorded image (its own prompt) instead of adding a -1 copy."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    lines = (out / "runs.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    (out / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    r = subprocess.run(command(model_root, out, "--resume"), capture_output=True, text=True, timeout=300, env=ENV,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "11 of 12 job(s) already done" in r.stderr
    assert ledger(out)[-1]["outputs"] == last["outputs"] and ledger(out)[-1]["job"] == last["job"]
    assert_same_batch(out, reference)


def test_a_running_shard_keeps_its_twin_and_plain_runs_out(tmp_path):
    """While shard 0/2 holds --out (shared) and its own lock, the same shard again and a plain run
    on that folder exit 2 naming the holder, before ComfyUI loads, and change nothing."""
    from oboro.oboro_model.folder_lock import folder_lock
    out = tmp_path / "out"
    holder = "oboro-run wf.json (6 job(s), shard-0-of-2)"
    with folder_lock(out, holder, shared=True), folder_lock(out, holder, name=".oboro-shard-0-of-2.lock"):
        before = sorted(p.name for p in out.iterdir())
        for extra in (["--shard", "0/2"], []):
            r = subprocess.run([sys.executable, str(RUN), str(WF), "--out", str(out), "--comfyui", str(tmp_path / "none"),
                                *extra], capture_output=True, text=True, timeout=60, cwd=REPO)
            assert r.returncode == 2, r.stderr
            assert f"--out {out}: {out} is being written by {holder} (host" in r.stderr and "Traceback" not in r.stderr
        assert sorted(p.name for p in out.iterdir()) == before


def test_merge_ledger_takes_a_killed_shards_lines_once(tmp_path):
    """A shard killed before its own merge leaves runs.shard-I-of-N.jsonl; --merge-ledger adds its
    complete lines to runs.jsonl (not those already there, not a cut line) and removes it."""
    out = tmp_path / "out"
    out.mkdir()
    a, b, c = (json.dumps({"job": k, "id": f"id{k}", "outputs": []}) for k in range(3))
    (out / "runs.jsonl").write_text(a + "\n")
    (out / "runs.shard-1-of-2.jsonl").write_text(a + "\n" + b + "\n" + c[:9])
    r = subprocess.run([sys.executable, str(RUN), "--merge-ledger", "--out", str(out)], capture_output=True,
                       text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "1 line(s) added" in r.stderr
    assert (out / "runs.jsonl").read_text() == a + "\n" + b + "\n"
    assert not (out / "runs.shard-1-of-2.jsonl").exists()


def test_shard_slices_and_model_affinity_queue():
    """Pure functions: the slices partition any batch the same way in every process; an idle actor
    gets its loaded model's next job, else a model no other actor holds, and a retry goes first."""
    from types import SimpleNamespace
    from oboro.runner import shards
    from oboro.runner.convert import WorkflowError
    from oboro.runner.ray_backend import Queue
    jobs = [SimpleNamespace(index=k) for k in range(7)]
    slices = [shards.select(jobs, shards.parse(f"{i}/3")) for i in range(3)]
    assert sorted(j.index for s in slices for j in s) == list(range(7))
    assert [j.index for j in slices[1]] == [1, 4]
    for bad in ("3/3", "-1/2", "1", "a/b"):
        with pytest.raises(WorkflowError, match="expected I/N"):
            shards.parse(bad)
    models = {0: "A", 1: "B", 2: "A", 3: "C", 4: "B"}
    q = Queue([SimpleNamespace(index=k) for k in models], key=lambda j: models[j.index])
    assert q.take("B").index == 1                  # the actor holding B: B's next job
    assert q.take(None, held={"A", "B"}).index == 3  # a fresh actor: C, which nobody holds
    assert q.take(None, held={"A", "B"}).index == 0  # everything held: the next job
    q.put_back(SimpleNamespace(index=3))
    assert q.take("A").index == 2 and q.take("B").index == 4 and q.take("A").index == 3 and len(q) == 0
