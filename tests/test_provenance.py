"""Provenance (docs/provenance.md, "Datasets and models"; issue #24 §1-§2), through ComfyUI's executor
on test_training_nodes' tiny pixel-space set-up: OboroCacheLatents records each image's caption hash
and licence / consent / source / author (metadata.jsonl columns, LICENSE / licence.txt folder
defaults) and a dataset digest that dataset_digest_of_folder recomputes from the folder and that
follows every image; require_licence refuses an unlicensed image, naming it, writing nothing; a LoRA
from OboroLoRATrainer and one from scripts/oboro-train carry `oboro_provenance` with that digest and
the licence counts, and core LoraLoaderModelOnly loads both."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from oboro.oboro_model import provenance as prov
from oboro.runner.embedded import GraphError
from test_one_run import SETTINGS, new_face
from test_training_nodes import REPO, SUB, graph, sampler_nodes, setup, summary  # noqa: F401  (setup: fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
LICENCES = {"CC-BY-4.0": 2, "CC0-1.0": 1, "MIT": 1, "studio-internal": 1}
LR = 1e-2  # large enough that a 4-step LoRA visibly changes the samples


def write_dataset(root):
    """5 images: img0/img1 licensed by metadata.jsonl rows (img1 through the `license` spelling), img2/img3
    by the root's LICENSE, sub/img4 by sub/licence.txt."""
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, rel in enumerate(["img0.png", "img1.png", "img2.png", "img3.png", "sub/img4.png"]):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / rel)
        if i >= 2:
            (root / rel).with_suffix(".txt").write_text(["", "", "green noise", "white text", "a studio shot"][i])
    (root / "LICENSE").write_text("\n  CC-BY-4.0  \n\nAttribution 4.0 International ...\n")
    (root / "sub" / "licence.txt").write_text("studio-internal\n")
    rows = [{"file_name": "img0.png", "text": "a red square", "licence": "CC0-1.0", "consent": True,
             "source": "shoot 2024-03", "author": "Ann Example"},
            {"file_name": "img1.png", "text": "a blue circle", "license": "MIT", "author": ""}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def cache_graph(setup, dataset_dir, cache_name, **over):
    g = {k: v for k, v in graph(setup, sample=False).items() if k in ("te", "vae", "cache")}
    g["cache"]["inputs"].update(dataset_dir=str(dataset_dir), cache_name=cache_name, **over)
    return g


def manifest(cache_dir):
    return json.loads((cache_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def licensed(comfy, setup, tmp_path_factory):
    """The dataset, cached by the node with require_licence on (every image has a licence)."""
    root = write_dataset(tmp_path_factory.mktemp("prov") / "set")
    report = json.loads(comfy.run(cache_graph(setup, root, "prov_set", require_licence=True))
                        ["outputs"]["cache"]["text"][0])
    return root, comfy.output / "oboro_cache" / "prov_set", report


def provenance_of(path):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return json.loads(meta["oboro_provenance"]), json.loads(meta["oboro_training"])


def test_cache_records_licences_and_a_digest_the_folder_reproduces(comfy, setup, licensed, tmp_path):
    root, cache_dir, report = licensed
    m = manifest(cache_dir)
    items = {it["file"]: it for it in m["items"]}
    assert set(items) == {"img0.png", "img1.png", "img2.png", "img3.png", "sub/img4.png"}
    assert {f: it.get("licence") for f, it in items.items()} == {
        "img0.png": "CC0-1.0", "img1.png": "MIT", "img2.png": "CC-BY-4.0", "img3.png": "CC-BY-4.0",
        "sub/img4.png": "studio-internal"}
    img0 = items["img0.png"]
    assert (img0["consent"], img0["source"], img0["author"]) == ("true", "shoot 2024-03", "Ann Example")
    assert not {"consent", "source", "author"} & set(items["img1.png"])  # absent = none ("" is none)
    for f, it in items.items():
        assert it["image_sha256"] == hashlib.sha256((root / f).read_bytes()).hexdigest()
        assert it["caption_sha256"] == hashlib.sha256(it["caption"].encode()).hexdigest()
    rec = m["dataset"]
    assert rec["items"] == 5 and rec["licences"] == LICENCES and report["dataset"] == rec
    # the documented format, by hand: canonical JSON per item, sorted hex digests joined by "\n"
    by_hand = [hashlib.sha256(json.dumps({"image_sha256": it["image_sha256"], "caption_sha256": it["caption_sha256"],
                                          **{k: it.get(k) for k in ("licence", "consent", "source", "author")}},
                                         sort_keys=True, separators=(",", ":")).encode()).hexdigest()
               for it in m["items"]]
    assert rec["digest"] == hashlib.sha256("\n".join(sorted(by_hand)).encode()).hexdigest()
    assert prov.dataset_digest_of_folder(root) == rec["digest"]
    assert prov.dataset_record_of_folder(root) == rec

    # one training image changed: another digest, again the folder's; the licences are the same
    changed = tmp_path / "set"
    shutil.copytree(root, changed)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(changed / "img2.png")
    again = json.loads(comfy.run(cache_graph(setup, changed, "prov_changed"))["outputs"]["cache"]["text"][0])
    new = manifest(comfy.output / "oboro_cache" / "prov_changed")["dataset"]
    assert again["dataset"] == new and new["licences"] == LICENCES and new["items"] == 5
    assert new["digest"] != rec["digest"] and new["digest"] == prov.dataset_digest_of_folder(changed)
    # a licence alone changes it too (it is part of what the digest covers)
    (changed / "sub" / "licence.txt").write_text("CC-BY-NC-4.0\n")
    assert prov.dataset_digest_of_folder(changed) not in (new["digest"], rec["digest"])


def test_require_licence_refuses_an_unlicensed_image_and_writes_nothing(comfy, setup, tmp_path):
    root = tmp_path / "partly"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (50 * i, 0, 0)).save(root / f"p{i}.png")
    rows = [{"file_name": f"p{i}.png", "text": f"red {i}", "licence": "CC0-1.0"} for i in range(3)]
    rows.append({"file_name": "p3.png", "text": "red 3"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(GraphError, match=r"1 of 4 images have no licence: p3\.png\b"):
        comfy.run(cache_graph(setup, root, "prov_refused", require_licence=True))
    assert not (comfy.output / "oboro_cache" / "prov_refused").exists()
    # off (the default): cached, the missing licence counted as "none"
    report = json.loads(comfy.run(cache_graph(setup, root, "prov_refused"))["outputs"]["cache"]["text"][0])
    assert report["dataset"]["licences"] == {"CC0-1.0": 3, "none": 1}


def test_lora_from_the_node_and_the_cli_carry_provenance_and_core_loads_them(comfy, setup, licensed, tmp_path):
    root, cache_dir, _ = licensed
    rec = manifest(cache_dir)["dataset"]
    g = new_face(setup, "prov_lora", lr=LR)
    g["cache"]["inputs"].update(dataset_dir=str(root), cache_name="prov_set")
    node = summary(comfy.run(g))
    model = comfy.models / "diffusion_models" / SUB / "tiny_px.safetensors"
    training = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in {**SETTINGS, "lr": LR}.items())
    (tmp_path / "run.toml").write_text(f'model = "{model}"\n[data]\npath = "{cache_dir}"\n[training]\n{training}\n'
                                       'checkpoint_every = 2\n[lora]\nrank = 4\nalpha = 8.0\ntargets = "all"\n'
                                       '[output]\ndir = "run"\nname = "prov_cli"\n')
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "oboro-train"), str(tmp_path / "run.toml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    cli = tmp_path / "run" / "prov_cli.safetensors"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for path in (node["path"], node["best_path"], cli):
        p, t = provenance_of(path)
        assert p == {"format": 1, "kind": "lora", "base_digest": t["base_digest"],
                     "datasets": [{"role": "train", "digest": rec["digest"], "items": 5, "licences": LICENCES}],
                     "settings_digest": t["settings_digest"], "pack_version": version}, path
    assert provenance_of(cli)[0]["base_digest"] == provenance_of(node["path"])[0]["base_digest"]

    # core LoraLoaderModelOnly loads both (metadata only, no new tensors): the same samples, not the base's
    shutil.copy(cli, comfy.models / "loras" / "prov_cli.safetensors")
    g = {k: v for k, v in graph(setup, sample=False).items() if k in ("m", "te")}
    for suffix, name in (("_node", "prov_lora.safetensors"), ("_cli", "prov_cli.safetensors")):
        g[f"lora{suffix}"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["m", 0], "lora_name": name, "strength_model": 1.0}}
        g.update(sampler_nodes([f"lora{suffix}", 0], suffix))
    g.update(sampler_nodes(["m", 0], "_base"))
    res = comfy.run(g)
    via_node, via_cli, base = (comfy.latent(res, f"save{s}") for s in ("_node", "_cli", "_base"))
    assert (via_node - base).abs().max() > 1e-4 and (via_node - via_cli).abs().max() <= 1e-5


def test_run_datasets_roles_and_old_caches(tmp_path):
    """A MixedData of a training cache and a regularization cache written before provenance records
    (digest null, licences unknown), plus a validation cache."""
    from test_latent_cache import FakeEncoders, build
    from oboro.oboro_model.data import LatentCache, OboroDataset
    from oboro.oboro_model.training.datasets import DataSource, MixedData
    root = write_dataset(tmp_path / "set")
    for name in ("train", "reg", "val"):
        build(OboroDataset(root, policy="fixed", size=32), tmp_path / name, FakeEncoders())
    old = manifest(tmp_path / "reg")
    del old["dataset"]
    (tmp_path / "reg" / "manifest.json").write_text(json.dumps(old))
    data = MixedData([LatentCache(tmp_path / "train"), LatentCache(tmp_path / "reg")],
                     [DataSource(str(tmp_path / "train")), DataSource(str(tmp_path / "reg"), reg=True)])
    digest = prov.dataset_digest_of_folder(root)
    assert prov.run_datasets(data, LatentCache(tmp_path / "val")) == [
        {"role": "train", "digest": digest, "items": 5, "licences": LICENCES},
        {"role": "reg", "digest": None, "items": 5, "licences": {}},
        {"role": "validation", "digest": digest, "items": 5, "licences": LICENCES}]
    assert prov.run_datasets(LatentCache(tmp_path / "train")) == [
        {"role": "train", "digest": digest, "items": 5, "licences": LICENCES}]
