"""Issue 13, cases 5-6 for scripts/oboro-run (the real CLI in a subprocess): --out naming a file, a
--batch CSV row with an extra cell, an Excel CSV with a byte-order mark, and --resume after a batch
was cut off: exit codes, messages, and which files exist afterwards."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "scripts" / "oboro-run"
WF = REPO / "example_workflows" / "oboro_txt2img.json"
CPU = [] if os.environ.get("OBORO_TEST_GPU") == "1" else ["--cpu"]
FAST = ["--set", "OboroSampler.steps=1", "--set", "EmptyOboroLatentImage.width=32",
        "--set", "EmptyOboroLatentImage.height=32"]


def oboro_run(*args, timeout=300):
    return subprocess.run([sys.executable, str(RUN), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_out_pointing_at_a_file_is_exit_2_before_comfyui_loads(tmp_path):
    target = tmp_path / "results.png"
    target.write_bytes(b"my picture")
    for out in (target, target / "sub"):
        r = oboro_run(WF, "--out", out, "--comfyui", tmp_path / "no_comfyui_here")
        # the --comfyui path does not exist: reaching ComfyUI's start-up would fail differently
        assert r.returncode == 2, r.stderr
        assert f"--out {out}: {target} is a file, not a folder" in r.stderr and "Traceback" not in r.stderr
    assert target.read_bytes() == b"my picture"


def test_csv_row_with_an_extra_cell_names_the_row(tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text('Positive Prompt.text,OboroSampler.cfg\n"a cat",4\n"a dog, sitting",5,oops\n')
    r = oboro_run(WF, "--batch", rows, "--out", tmp_path / "out", "--comfyui", tmp_path / "none")
    assert r.returncode == 2, r.stderr
    assert f"--batch {rows} row 2 (line 3): 1 more cell(s) than the 2 header columns: ['oops']" in r.stderr
    assert not (tmp_path / "out").exists()


def test_csv_with_a_byte_order_mark_works(model_root, tmp_path):
    rows = tmp_path / "excel.csv"
    rows.write_bytes("Positive Prompt.text,OboroSampler.cfg\r\na cat,4\r\n".encode("utf-8-sig"))
    r = oboro_run(WF, "--models", model_root, "--batch", rows, "--check", *CPU)
    assert r.returncode == 0, r.stderr
    assert "1 job(s) valid" in r.stderr


def test_resume_skips_the_jobs_runs_jsonl_records(model_root, tmp_path):
    out = tmp_path / "out"
    r = oboro_run(WF, "--models", model_root, "--seeds", "0:3", *FAST, "--out", out, *CPU)
    assert r.returncode == 0, r.stderr
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 3
    # the server died during job 2: its line was never written, its image never moved in
    last = json.loads(lines[2])
    (out / last["outputs"][0]).unlink()
    (out / "runs.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:17])  # plus a half-written line
    kept = {p: p.read_bytes() for p in out.rglob("*.png")}
    r = oboro_run(WF, "--models", model_root, "--seeds", "0:3", *FAST, "--out", out, "--resume", *CPU)
    assert r.returncode == 0, r.stderr
    assert "--resume: 2 of 3 job(s) already done" in r.stderr
    text = (out / "runs.jsonl").read_text()
    assert text.startswith("\n".join(lines[:2]) + "\n" + lines[2][:17] + "\n")  # the cut line stays on its own
    log = [json.loads(x) for x in text.splitlines() if x != lines[2][:17]]
    assert [j["job"] for j in log] == [0, 1, 2] and log[2]["seed"] == 2
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 3 and all(p.read_bytes() == b for p, b in kept.items())  # no duplicates, old ones untouched
    r = oboro_run(WF, "--models", model_root, "--seeds", "0:3", *FAST, "--out", out, "--resume", *CPU)
    assert r.returncode == 0 and "3 of 3 job(s) already done" in r.stderr and len(list(out.rglob("*.png"))) == 3
