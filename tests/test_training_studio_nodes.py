"""The studio training options through the real front ends, on a cache OboroCacheLatents wrote
through ComfyUI's executor (tests/test_training_nodes.py's tiny pixel-space set-up): OboroTrainFull
with a held-out validation split, EMA, shifted t sampling and TensorBoard; scripts/oboro-train with a
validation cache, EMA and TensorBoard from CONFIG.toml. The engine's own checks are in
tests/test_training_studio.py."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from oboro.oboro_model.training import read_state
from test_training_nodes import REPO, graph, saved, setup, summary  # noqa: F401  (setup: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    ev.Reload()
    return ev


def test_full_node_validation_ema_and_tensorboard(comfy, setup):
    name = "studio_full"
    g = graph(setup, "OboroTrainFull", sample=False, output_name=name, steps=4, checkpoint_every=0, keep_last=1,
              preview_every=2, t_sampling="shifted", t_shift=3.0, ema_decay=0.9, validation_split=0.25,
              validation_every=2, validation_timesteps=2, log_with="tensorboard")
    res = comfy.run(g)
    s = summary(res)
    assert (s["step"], s["items"]) == (4, 3)  # one of the four images held out
    assert s["best_step"] in (2, 4) and s["best_val_loss"] == pytest.approx(min(
        v for v in json.loads((comfy.output / "oboro_training" / name / "loss_log.json").read_text())["val_loss"]))
    state_dir = comfy.output / "oboro_training" / name
    log = json.loads((state_dir / "loss_log.json").read_text())
    assert log["val_step"] == [2, 4] and len(log["step"]) == 4

    # the export (and the MODEL output loaded from it) holds the EMA weights, not the last ones
    tensors, meta = read_state(state_dir / "step_00000004.safetensors")
    out = load_file(s["path"])
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    assert ema and all(torch.equal(out[k], v) for k, v in ema.items())
    assert any(not torch.equal(out[k], tensors[f"model.{k}"]) for k in ema)
    best, best_meta = read_state(state_dir / "best.safetensors")
    out_best = load_file(s["best_path"])
    assert s["best_path"].endswith(f"{name}_best.safetensors") and best_meta["step"] == s["best_step"]
    assert all(torch.equal(out_best[k[4:]], v) for k, v in best.items() if k.startswith("ema."))

    ev = events(state_dir / "logs" / name)
    assert [e.step for e in ev.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in ev.Scalars("val/loss")] == pytest.approx(log["val_loss"], rel=1e-6)
    assert [e.step for e in ev.Images("previews")] == [2, 4]
    assert len(saved(comfy, res, "curve")) == 1


def test_cli_validation_cache_ema_and_tensorboard(comfy, setup, tmp_path):
    """scripts/oboro-train on the node-written cache, with that cache also as [data] validation_cache_dir."""
    g = {k: v for k, v in graph(setup, sample=False).items() if k in ("te", "vae", "cache")}
    report = json.loads(comfy.run(g)["outputs"]["cache"]["text"][0])
    model = comfy.models / "diffusion_models" / setup.model
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'''model = "{model}"
[data]
path = "{report['cache_dir']}"
validation_cache_dir = "{report['cache_dir']}"
[training]
steps = 4
batch_size = 2
lr = 1e-3
caption_dropout = 0.1
ema_decay = 0.9
ema_start = 1
validation_every = 2
validation_timesteps = 2
t_sampling = "logit_normal"
t_mean = -0.5
[lora]
rank = 4
targets = "all"
[output]
dir = "run"
log_every = 1
log_with = "tensorboard"
''')
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "oboro-train"), str(cfg)], cwd=tmp_path,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "validation at step 2: loss" in out and "validation at step 4: loss" in out
    run = tmp_path / "run"
    # one export rule for every front end: <name> holds the EMA weights when EMA is on, plus _best
    assert {p.name for p in run.glob("lora*.safetensors")} == {"lora.safetensors", "lora_best.safetensors"}
    assert (run / "loss_curve.png").is_file() and (run / "samples.png").is_file()
    log = json.loads((run / "loss_log.json").read_text())
    assert log["val_step"] == [2, 4]
    ev = events(run / "logs" / "run")
    assert [e.step for e in ev.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in ev.Scalars("train/loss")] == pytest.approx(log["loss"], rel=1e-6)
    assert [(e.step, e.value) for e in ev.Scalars("val/loss")] == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in zip(log["val_step"], log["val_loss"])]
