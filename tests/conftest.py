"""Test set-up: this repo as package `oboro` (never on sys.path itself), ComfyUI importable,
and a session-wide embedded ComfyUI with temporary model folders for integration tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import oboro_env  # noqa: E402

oboro_env.add_comfy_to_path()
from comfy.cli_args import args  # noqa: E402  (must precede any comfy.model_management import)

args.cpu = os.environ.get("OBORO_TEST_GPU") != "1"
oboro_env.import_oboro()

from tiny import MODEL_KINDS, save_shipped_models  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def read_roots_for_tests(tmp_path_factory):
    """Graphs in tests read datasets and caches from pytest's temp folders, which a real server
    would not let them read (nodes/paths.py confine_read): allow the session's temp root, as an admin
    would with OBORO_READ_ROOTS. Servers started by tests inherit it. Tests of the refusal itself
    remove it (tests/test_read_confinement.py)."""
    old = os.environ.get("OBORO_READ_ROOTS")
    os.environ["OBORO_READ_ROOTS"] = os.pathsep.join(filter(None, (old, str(tmp_path_factory.getbasetemp()))))
    yield
    if old is None:
        os.environ.pop("OBORO_READ_ROOTS", None)
    else:
        os.environ["OBORO_READ_ROOTS"] = old


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread than on two contended ones (6x seen here)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI 0.3.75 loaded in this process with core nodes and our extension from custom_nodes."""
    from oboro.runner import embedded
    root = tmp_path_factory.mktemp("comfy")
    dirs = {k: root / "models" / k for k in MODEL_KINDS}
    for d in dirs.values():
        d.mkdir(parents=True)
    (root / "output").mkdir()
    embedded.start(cpu=args.cpu, output_dir=str(root / "output"), model_dirs={k: str(v) for k, v in dirs.items()})
    output = root / "output"

    def latent(result, node):
        """The tensor a core SaveLatent node `node` wrote in this run."""
        from safetensors.torch import load_file
        info = result["outputs"][node]["latents"][0]
        return load_file(str(output / info["subfolder"] / info["filename"]))["latent_tensor"]

    return SimpleNamespace(run=embedded.run, validate=embedded.validate, models=root / "models",
                           output=output, embedded=embedded, latent=latent)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory):
    """Tiny models under the shipped workflows' file names (see tests/tiny.py), as a model root."""
    return save_shipped_models(tmp_path_factory.mktemp("oboro_models"))


@pytest.fixture(scope="session")
def offline_demo(tmp_path_factory):
    """`make run` on a machine without model files, once per session: scripts/oboro-main lists the
    missing files, then runs the offline demo (demo/offline.py) into <out>/demo. test_demo.py checks
    the run; test_mask_eval.py trains a mask adapter on its base instead of training another."""
    from test_main_job import MAIN, REPO, make_bare_comfy
    tmp = tmp_path_factory.mktemp("offline_demo")
    out = tmp / "out"
    r = subprocess.run([sys.executable, str(MAIN), "--models", str(tmp / "models"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=REPO,
                       env={**os.environ, "COMFYUI_PATH": str(make_bare_comfy(tmp))})
    return SimpleNamespace(result=r, out=out, demo=out / "demo")
