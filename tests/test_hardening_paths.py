"""Issue 13, cases 1-2, through ComfyUI's executor: a graph cannot make our nodes write or delete
outside ComfyUI's folders (plus OBORO_ALLOWED_ROOTS), a cache build deletes only what its own
manifest or build journal listed, and training never replaces an existing model unless told to."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from oboro.oboro_model import save_checkpoint
from oboro.runner.embedded import GraphError
from tiny import save_t5, tiny_dit, tiny_t5

SUB = "hardening"
pytestmark = pytest.mark.usefixtures("one_thread")


def tree_hash(root: Path) -> dict:
    """{relative path: sha256 or 'dir' or 'link -> target'} of everything under root."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(d) / n
            rel = str(p.relative_to(root))
            out[rel] = (f"link -> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir()
                        else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def write_images(root: Path, n=3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"picture {i}")
    return root


def victim_folder(root: Path) -> Path:
    """A folder elsewhere that looks like a cache someone else owns."""
    root.mkdir(parents=True)
    (root / "manifest.json").write_text('{"mine": true}')
    save_file({"x": torch.ones(2)}, str(root / "shard_00000.safetensors"))
    (root / "work.safetensors.tmp").write_bytes(b"half written")
    return root


@pytest.fixture(scope="module")
def t5(comfy):
    (comfy.models / "text_encoders" / SUB).mkdir(exist_ok=True)
    save_t5(comfy.models / "text_encoders" / SUB / "t5.safetensors", tiny_t5())
    return f"{SUB}/t5.safetensors"


def cache_graph(dataset, t5, cache_name):
    return {"vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
            "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": t5}},
            "cache": {"class_type": "OboroCacheLatents", "inputs": {
                "dataset_dir": str(dataset), "vae": ["vae", 0], "clip": ["te", 0], "policy": "fixed", "size": 32,
                "area": 64 * 64, "max_tokens": 8, "cache_name": cache_name}}}


def test_cache_name_outside_the_output_folder_changes_nothing(comfy, t5, tmp_path):
    data = write_images(tmp_path / "ds")
    victim = victim_folder(tmp_path / "elsewhere" / "cache")
    (comfy.output / "oboro_cache").mkdir(exist_ok=True)
    link = comfy.output / "oboro_cache" / "sneaky_link"
    link.symlink_to(victim, target_is_directory=True)
    before, out_before = tree_hash(tmp_path), tree_hash(comfy.output / "oboro_cache")
    for name, message in ((str(victim), "absolute paths must lie inside"), (str(tmp_path / "new_dir"), "absolute"),
                          ("../../escape", "leaves"), ("sneaky_link", "leaves"), ("sneaky_link/sub", "leaves")):
        with pytest.raises(GraphError, match=message):
            comfy.run(cache_graph(data, t5, name))
    assert tree_hash(tmp_path) == before and tree_hash(comfy.output / "oboro_cache") == out_before
    link.unlink()


def test_allowed_roots_open_an_absolute_cache_folder(comfy, t5, tmp_path, monkeypatch):
    data = write_images(tmp_path / "ds")
    monkeypatch.setenv("OBORO_ALLOWED_ROOTS", str(tmp_path / "shared"))
    report = json.loads(comfy.run(cache_graph(data, t5, str(tmp_path / "shared" / "c1")))["outputs"]["cache"]["text"][0])
    assert report["cache_dir"] == str((tmp_path / "shared" / "c1").resolve()) and report["encoded"] == 3
    victim = victim_folder(tmp_path / "shared" / "not_a_cache")  # allowed root, but someone else's folder
    before = tree_hash(victim)
    with pytest.raises(GraphError, match="not an oboro latent cache"):
        comfy.run(cache_graph(data, t5, str(victim)))
    assert tree_hash(victim) == before


def test_rebuild_deletes_only_what_its_manifest_or_journal_listed(tmp_path):
    from oboro.oboro_model.data import OboroDataset, build_cache
    from oboro.oboro_model.data.cache_files import JOURNAL
    data, folder = write_images(tmp_path / "ds", 4), tmp_path / "cache"

    def build():
        return build_cache(OboroDataset(data, policy="fixed", size=32), folder,
                           lambda px: F.avg_pool2d(px, 8), lambda caps: ([torch.ones(2, 4) for _ in caps], None), {},
                           shard_size=1)
    build()
    listed = {it["shard"] for it in json.loads((folder / "manifest.json").read_text())["items"]}
    assert listed == {f"shard_0000{i}.safetensors" for i in range(4)} and not (folder / JOURNAL).exists()
    save_file({"x": torch.ones(1)}, str(folder / "shard_00077.safetensors"))  # somebody else's files
    (folder / "notes.safetensors.tmp").write_text("keep me")
    # a killed build's temp file of a journal-listed shard (oboro_model/atomic.py's naming)
    (folder / ".shard_00009.safetensors.k3x9q1.tmp").write_text("a killed build's temp file")
    save_file({"x": torch.ones(1)}, str(folder / "shard_00008.safetensors"))  # ours: in the journal
    (folder / JOURNAL).write_text("shard_00008.safetensors\nshard_00009.safetensors\n../outside\n")
    (tmp_path / "outside").write_text("never touched")
    for i in range(4):
        (data / f"img{i}.txt").write_text(f"new caption {i}")
    r = build()
    assert r["encoded"] == 4
    names = {p.name for p in folder.iterdir()}
    assert {"shard_00077.safetensors", "notes.safetensors.tmp"} <= names  # not ours: kept
    assert not names & {"shard_00008.safetensors", ".shard_00009.safetensors.k3x9q1.tmp", JOURNAL}  # ours: cleaned
    assert not names & listed  # the old manifest's shards, all unused now
    assert (tmp_path / "outside").read_text() == "never touched"


# ---- training never replaces a model silently ------------------------------------------------------
@pytest.fixture(scope="module")
def train_world(comfy, tmp_path_factory):
    from oboro.oboro_model.data import OboroDataset, build_cache
    root = tmp_path_factory.mktemp("hard_train")
    (comfy.models / "diffusion_models" / SUB).mkdir(exist_ok=True)
    save_checkpoint(comfy.models / "diffusion_models" / SUB / "base.safetensors", tiny_dit())
    build_cache(OboroDataset(write_images(root / "ds", 2), policy="fixed", size=32), root / "cache",
                lambda px: F.avg_pool2d(px, 8).repeat(1, 6, 1, 1)[:, :16],
                lambda caps: ([torch.ones(3, 32) for _ in caps], None), {})
    return root


def train_graph(train_world, node, output_name, **over):
    inputs = {"model": ["m", 0], "cache_dir": str(train_world / "cache"), "output_name": output_name, "steps": 1,
              "batch_size": 1, "lr": 1e-4, "warmup": 0, "schedule": "constant", "optimizer": "adamw", "grad_accum": 1,
              "clip_grad_norm": 1.0, "precision": "fp32", "gradient_checkpointing": False, "caption_dropout": 0.0,
              "t_sampling": "uniform", "spike_guard": False, "seed": 0, "checkpoint_every": 0, "keep_last": 1,
              "preview_every": 0}
    inputs.update({"rank": 2, "alpha": 2.0, "dropout": 0.0, "targets": "attn"} if node == "OboroTrainLoRA"
                  else {"save_dtype": "bf16"})
    inputs.update(over)
    return {"m": {"class_type": "OboroModelLoader", "inputs": {"model_name": f"{SUB}/base.safetensors",
                                                              "weight_dtype": "fp32"}},
            "train": {"class_type": node, "inputs": inputs}}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_finetune_named_like_its_base_keeps_the_base(comfy, train_world):
    base = comfy.models / "diffusion_models" / SUB / "base.safetensors"
    before = sha(base)
    res = comfy.run(train_graph(train_world, "OboroTrainFull", f"{SUB}/base"))
    path = Path(json.loads(res["outputs"]["train"]["text"][0])["path"])
    assert sha(base) == before  # the base model, byte-identical
    assert path == (base.parent / "base_00001_.safetensors").resolve() and path.is_file()
    assert {v.dtype for v in load_file(str(path)).values()} == {torch.bfloat16}


def test_lora_keeps_an_existing_lora_unless_overwrite(comfy, train_world):
    mine = comfy.models / "loras" / "downloaded.safetensors"
    save_file({"diffusion_model.x.lora_down.weight": torch.ones(1, 1)}, str(mine))
    (comfy.models / "loras" / "downloaded_00001_.safetensors").write_bytes(b"taken too")
    before = sha(mine)
    res = comfy.run(train_graph(train_world, "OboroTrainLoRA", "downloaded"))
    path = Path(json.loads(res["outputs"]["train"]["text"][0])["path"])
    assert sha(mine) == before and path.name == "downloaded_00002_.safetensors"
    assert any(k.endswith("lora_up.weight") for k in load_file(str(path)))
    mine2 = comfy.models / "loras" / "replace_me.safetensors"
    mine2.write_bytes(b"old")
    res = comfy.run(train_graph(train_world, "OboroTrainLoRA", "replace_me", overwrite=True))
    assert Path(json.loads(res["outputs"]["train"]["text"][0])["path"]) == mine2.resolve()
    assert any(k.endswith("lora_up.weight") for k in load_file(str(mine2)))


@pytest.mark.parametrize("name", ["/tmp/evil_model", "../../evil", "../diffusion_models/x"])
def test_training_output_name_cannot_leave_its_folder(comfy, train_world, name):
    with pytest.raises(GraphError, match="output_name"):
        comfy.run(train_graph(train_world, "OboroTrainLoRA", name))
