"""One run for every front end (oboro_model/training/run.py), from the user's side on a cache that
OboroCacheLatents wrote through ComfyUI's executor (tests/test_training_nodes.py's tiny pixel-space
set-up): the new trainer + options nodes, the old all-in-one node and scripts/oboro-train give the
same exported files (names, values within 1e-6, metadata keys) with EMA and validation on; a
re-queued finished run writes nothing; new data or a new base under the same name starts fresh
beside the old run, saying so; the mask-adapter trainer refuses a cache that does not fit."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from oboro.runner.embedded import GraphError
from test_training_nodes import REPO, SUB, graph, setup, summary  # noqa: F401  (setup: the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-6
SETTINGS = dict(steps=4, batch_size=2, lr=1e-3, warmup=0, schedule="constant", seed=0, caption_dropout=0.1,
                ema_decay=0.9, validation_split=0.25, validation_every=2)
OPTIONS = dict(batch_size=2, warmup=0, schedule="constant", optimizer="adamw", grad_accum=1, clip_grad_norm=1.0,
               precision="fp32", gradient_checkpointing=False, caption_dropout=0.1, t_sampling="uniform",
               spike_guard=True, checkpoint_every=2, keep_last=2, alpha=8.0, dropout=0.0, targets="all",
               preview_steps=2, preview_cfg=3.0, preview_seed=1, overwrite=False, ema_decay=0.9, ema_start=0,
               log_with="none", t_mean=0.0, t_std=1.0, t_shift=1.0)
DATA = dict(extra_caches="", reg_cache="", reg_weight=1.0, masked_loss=False, validation_split=0.25,
            validation_cache_dir="", validation_every=2, validation_timesteps=8, validation_seed=0)


def new_face(setup, name, **over):
    g = {k: v for k, v in graph(setup, sample=False).items() if k in ("m", "te", "vae", "cache")}
    g["opts"] = {"class_type": "OboroTrainingOptions", "inputs": dict(OPTIONS)}
    g["data"] = {"class_type": "OboroTrainingData", "inputs": dict(DATA)}
    g["train"] = {"class_type": "OboroLoRATrainer", "inputs": {
        "model": ["m", 0], "cache_dir": ["cache", 0], "output_name": name, "steps": 4, "lr": 1e-3, "seed": 0,
        "rank": 4, "adapter": "lora", "resume_from": "latest", "options": ["opts", 0], "data": ["data", 0], **over}}
    return g


def tensors_and_meta(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def worst(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_new_face_old_face_and_cli_export_the_same_files(comfy, setup, tmp_path):
    new = summary(comfy.run(new_face(setup, "one_new")))
    old_g = graph(setup, sample=False, output_name="one_old", rank=4, alpha=8.0, targets="all", preview_every=0,
                  checkpoint_every=2, **SETTINGS)
    old = summary(comfy.run(old_g))
    assert new["step"] == old["step"] == 4 and new["best_path"] and old["best_path"]
    cache = json.loads(comfy.run({k: v for k, v in graph(setup, sample=False).items()
                                  if k in ("te", "vae", "cache")})["outputs"]["cache"]["text"][0])["cache_dir"]
    model = comfy.models / "diffusion_models" / SUB / "tiny_px.safetensors"
    training = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in SETTINGS.items())
    (tmp_path / "run.toml").write_text(f'model = "{model}"\n[data]\npath = "{cache}"\n[training]\n{training}\n'
                                       'checkpoint_every = 2\n[lora]\nrank = 4\nalpha = 8.0\ntargets = "all"\n'
                                       '[output]\ndir = "run"\nname = "one_cli"\n')
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "oboro-train"), str(tmp_path / "run.toml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"oboro-train: wrote {tmp_path / 'run' / 'one_cli.safetensors'}" in proc.stdout
    assert (tmp_path / "run" / "loss_curve.png").is_file() and (tmp_path / "run" / "samples.png").is_file()
    for key, cli_name in (("path", "one_cli.safetensors"), ("best_path", "one_cli_best.safetensors")):
        n, n_meta = tensors_and_meta(new[key])
        o, o_meta = tensors_and_meta(old[key])
        c, c_meta = tensors_and_meta(tmp_path / "run" / cli_name)
        assert worst(n, o) <= TOL and worst(n, c) <= TOL
        assert set(n_meta) == set(o_meta) == set(c_meta)
        info = [json.loads(m["oboro_training"]) for m in (n_meta, o_meta, c_meta)]
        assert len({(i["data_digest"], i["base_digest"], i["settings_digest"], i["step"]) for i in info}) == 1

    # the CLI re-run on a finished, unchanged config writes nothing and names the file
    again = subprocess.run([sys.executable, str(REPO / "scripts" / "oboro-train"), str(tmp_path / "run.toml")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert again.returncode == 0 and "already trained, nothing written" in again.stdout
    assert sorted(p.name for p in (tmp_path / "run").glob("one_cli*.safetensors")) == [
        "one_cli.safetensors", "one_cli_best.safetensors"]

    # --comfyui: the export goes into that ComfyUI's models/loras, next to what is there, and says where
    comfy_dir = tmp_path / "ComfyUI"
    (comfy_dir / "models" / "loras").mkdir(parents=True)
    (comfy_dir / "models" / "loras" / "one_cli.safetensors").write_bytes(b"someone else's LoRA")
    cfg = (tmp_path / "run.toml").read_text().replace('dir = "run"', 'dir = "run2"')
    (tmp_path / "run2.toml").write_text(cfg)
    to_comfy = subprocess.run([sys.executable, str(REPO / "scripts" / "oboro-train"), str(tmp_path / "run2.toml"),
                               "--comfyui", str(comfy_dir)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert to_comfy.returncode == 0, (to_comfy.stdout + to_comfy.stderr)[-3000:]
    written = comfy_dir / "models" / "loras" / "one_cli_00001_.safetensors"
    assert f"oboro-train: wrote {written}" in to_comfy.stdout
    assert (comfy_dir / "models" / "loras" / "one_cli.safetensors").read_bytes() == b"someone else's LoRA"
    assert worst(load_file(str(written)), load_file(str(tmp_path / "run" / "one_cli.safetensors"))) <= TOL


def test_requeue_new_data_and_new_base_never_resume_silently(comfy, setup, tmp_path):
    loras = comfy.models / "loras"
    first = summary(comfy.run(new_face(setup, "one_rq", steps=2)))
    assert first["path"].endswith("one_rq.safetensors")
    # the same run queued again (a cadence change only, so ComfyUI executes it): nothing written
    g = new_face(setup, "one_rq", steps=2)
    g["opts"]["inputs"]["keep_last"] = 3
    again = summary(comfy.run(g))
    assert again["reused"] and again["path"] == first["path"]
    assert sorted(p.name for p in loras.glob("one_rq*.safetensors")) == ["one_rq.safetensors",
                                                                        "one_rq_best.safetensors"]
    # new data under the same name and resume latest: a fresh run in the next folder, said in the summary
    other = tmp_path / "other"
    other.mkdir()
    from PIL import Image
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(other / f"o{i}.png")
        (other / f"o{i}.txt").write_text(f"red {i}")
    g = new_face(setup, "one_rq", steps=2)
    g["cache"]["inputs"].update(dataset_dir=str(other), cache_name="one_rq_other")
    fresh = summary(comfy.run(g))
    assert fresh["start_step"] == 0 and fresh["step"] == 2
    assert fresh["state_dir"].endswith("one_rq_00001_") and "the training data" in fresh["note"]
    assert fresh["path"].endswith("one_rq_00001_.safetensors")
    assert worst(load_file(fresh["path"]), load_file(first["path"])) > 1e-7
    # a different base (a LoRA merged into the MODEL) under the same name: fresh again, the base named
    g = new_face(setup, "one_rq", steps=2)
    g["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["m", 0], "lora_name": "one_rq.safetensors",
                                                                 "strength_model": 1.0}}
    g["train"]["inputs"]["model"] = ["lora", 0]
    based = summary(comfy.run(g))
    assert based["start_step"] == 0 and "the base model" in based["note"]
    assert based["state_dir"].endswith("one_rq_00002_")


def test_values_out_of_range_or_not_finite_are_refused_by_name(comfy, setup):
    for name, value in (("ema_decay", float("nan")), ("alpha", float("inf")), ("t_mean", float("nan"))):
        g = new_face(setup, "one_bad")
        g["opts"]["inputs"][name] = value
        del g["cache"]  # an output node of its own: ComfyUI would run it and skip only the invalid trainer
        g["train"]["inputs"]["cache_dir"] = "not_needed"
        with pytest.raises(GraphError, match=name):
            comfy.run(g)


def test_mask_adapter_trainer_refuses_a_cache_that_does_not_fit(comfy, setup, tmp_path):
    from oboro.oboro_model import MMHDiT, preset, save_checkpoint
    save_checkpoint(comfy.models / "diffusion_models" / SUB / "tiny16.safetensors",  # T5 states 64 wide, not 32
                    MMHDiT(preset("tiny", in_channels=3, text_dim=64)))
    from PIL import Image
    for i in range(4):  # label masks, so the cache check is what refuses
        Image.new("L", (32, 32), i % 2).save(tmp_path / f"img{i}.png")
    g = {k: v for k, v in graph(setup, sample=False).items() if k in ("te", "vae", "cache")}
    g["m16"] = {"class_type": "OboroModelLoader", "inputs": {"model_name": f"{SUB}/tiny16.safetensors",
                                                             "weight_dtype": "fp32"}}
    g["mask"] = {"class_type": "OboroTrainMaskAdapter", "inputs": {
        "model": ["m16", 0], "cache_dir": ["cache", 0], "mask_dir": str(tmp_path), "output_name": "one_mask",
        "steps": 1, "batch_size": 1, "lr": 1e-4, "rank": 2, "image_rank": 0, "seed": 0, "num_labels": 2,
        "condition_dropout": 0.1, "precision": "fp32"}}
    with pytest.raises(GraphError, match="32-wide text states"):
        comfy.run(g)


def test_no_op_settings_are_said_in_the_ui_and_the_summary(comfy, setup):
    pytest.importorskip("prodigyopt")
    g = new_face(setup, "one_noop", steps=1)
    g["opts"]["inputs"].update(optimizer="prodigy")  # with lr 1e-3: prodigy expects lr = 1
    s = summary(comfy.run(g))
    assert any("prodigy" in w and "lr = 1" in w for w in s["warnings"]), s


def test_a_state_folder_held_by_another_process_is_refused_by_name(comfy, setup, tmp_path):
    """Two writers of one run: the second gets the holder's pid and changes nothing."""
    import os
    import subprocess
    state = comfy.output / "oboro_training" / "one_locked"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; os.makedirs(sys.argv[1], exist_ok=True); "
        "fd = os.open(os.path.join(sys.argv[1], '.oboro.lock'), os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"what\": \"the other server\", \"pid\": %d}' % os.getpid()); "
        "print('held', flush=True); time.sleep(120)"), str(state)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GraphError, match=f"being written by the other server.*pid {holder.pid}"):
            comfy.run(new_face(setup, "one_locked", steps=1))
        assert sorted(p.name for p in state.iterdir()) == [".oboro.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert os.path.isdir(state)


def test_an_export_of_non_finite_weights_is_refused_and_writes_nothing(tmp_path):
    """The export path's last check: NaN weights never reach a file; the error names the tensor."""
    import torch
    from oboro.oboro_model.training import TrainConfig, Trainer
    from oboro.oboro_model.training.export import ExportSpec, export
    from tiny import tiny_dit

    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"latent": torch.zeros(16, 4, 4), "text": torch.zeros(3, 32), "text_mask": torch.ones(3)}

    net = tiny_dit()
    tr = Trainer(net, One(), TrainConfig(steps=1, batch_size=1))
    with torch.no_grad():
        tr.params[0][1].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"{tr.params[0][0]} holds NaN"):
        export(tr, ExportSpec(str(tmp_path), "bad", "full"), {}, 1)
    assert list(tmp_path.iterdir()) == []
