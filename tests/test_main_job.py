"""`make run` (scripts/oboro-main): the shipped txt2img workflow headless, or exactly which model
file goes in which ComfyUI folder when files are missing (then the offline demo, which
tests/test_demo.py runs end to end; here --no-demo stops after the list)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "scripts" / "oboro-main"
FAST = ["--set", "OboroSampler.steps=2", "--set", "EmptyOboroLatentImage.width=64",
        "--set", "EmptyOboroLatentImage.height=48"]


def oboro_main(*args, env=None):
    cpu = [] if os.environ.get("OBORO_TEST_GPU") == "1" else ["--cpu"]
    return subprocess.run([sys.executable, str(MAIN), *map(str, args), *cpu], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, **(env or {})})


def assert_missing_listed(stderr: str) -> None:
    for folder, name in (("diffusion_models", "oboro-base-v1-1b.safetensors"), ("text_encoders", "t5xxl_fp16.safetensors"),
                         ("vae", "ae.safetensors")):
        assert f"{name}" in stderr and f"/{folder}/" in stderr.split(name)[1].splitlines()[0]


def test_missing_models_are_listed_with_their_folders(tmp_path):
    empty = tmp_path / "models"
    r = oboro_main("--models", empty, "--out", tmp_path / "out", "--no-demo",
                   env={"COMFYUI_PATH": str(make_bare_comfy(tmp_path))})
    assert r.returncode == 2, r.stderr
    assert_missing_listed(r.stderr)
    assert "offline demo" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_download_offline_fails_clearly(tmp_path):
    r = oboro_main("--download", "--models", tmp_path / "models", "--out", tmp_path / "out",
                   env={"COMFYUI_PATH": str(make_bare_comfy(tmp_path)), "HF_HUB_OFFLINE": "1",
                        "OBORO_HF_REPO": "oboro/oboro-base-v1"})
    assert r.returncode != 0
    assert "could not download oboro-base-v1-1b.safetensors from huggingface.co/oboro/oboro-base-v1" in r.stderr
    assert "offline" in r.stderr


def test_runs_txt2img_and_prints_the_image(model_root, tmp_path):
    out = tmp_path / "out"
    r = oboro_main("--models", model_root, "--out", out, *FAST)
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("oboro: image(s) written:")]
    assert line, r.stdout
    image = Path(line[0].split("written:", 1)[1].strip())
    assert image.is_absolute() and image.parent == out.resolve()
    assert np.asarray(Image.open(image)).shape == (48, 64, 3)


def make_bare_comfy(tmp_path: Path) -> Path:
    """A ComfyUI whose own models/ folders are empty (the repo's .comfyui may hold real files),
    sharing the code of the bootstrapped one through symlinks."""
    import oboro_env
    src, dst = oboro_env.comfy_path(), tmp_path / "comfy"
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name not in ("models", "output", "input", "user", "temp"):
            (dst / entry.name).symlink_to(entry)
    (dst / "models").mkdir()
    return dst
