"""Masked loss: loss masks from a mask folder (OboroTrainMaskAdapter's layout) or an image's alpha,
cropped like the image and stored in the latent cache by OboroCacheLatents (through ComfyUI's
executor); with masked_loss the masked-out region gets no gradient and teaches nothing; and
scripts/oboro-train trains on that node-written cache with masked loss, a [[data]] regularization
entry and a LoHa adapter."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from oboro.oboro_model import MMHDiT, preset, save_checkpoint
from oboro.oboro_model.data import LatentCache
from oboro.oboro_model.training import TrainConfig, Trainer, icfm_loss
from test_lora_training import base_model
from tiny import random_flux_vae_state_dict, save_t5, tiny_t5

REPO = Path(__file__).resolve().parents[1]
SUB = "masked"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_masked_out_region_gets_no_gradient():
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 4, 6, 8, generator=g)
    pred = torch.randn(2, 4, 6, 8, generator=g, requires_grad=True)
    weight = torch.ones(2, 1, 6, 8)
    weight[:, :, :, :3] = 0.0  # the left three latent columns are masked out
    weight[1, :, 4:, 3:] = 0.5
    loss = icfm_loss(lambda xt, t, text, mask: pred, x1, torch.zeros(2, 1, 8), None, torch.rand(2, generator=g),
                     x0, pixel_weight=weight)
    loss.backward()
    assert pred.grad[:, :, :, :3].abs().max() == 0
    assert pred.grad[:, :, :, 3:].abs().min() > 0
    u = x1 - x0  # and the value is the weighted mean, not renormalised (kohya)
    want = ((pred.detach() - u).pow(2) * weight).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=0)


class Masked(torch.utils.data.Dataset):
    """4 items of 3x8x8 latents whose loss masks are `zero_cols` zero columns from the left, 1 after."""

    def __init__(self, zero_cols: int):
        g = torch.Generator().manual_seed(0)
        self.latents = torch.randn(4, 3, 8, 8, generator=g)
        self.text = torch.randn(4, 3, 32, generator=g)
        self.mask = torch.ones(8, 8)
        self.mask[:, :zero_cols] = 0.0

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"latent": self.latents[i].clone(), "text": self.text[i], "text_mask": torch.ones(3),
                "loss_mask": self.mask}


def test_trainer_applies_the_items_masks():
    """Everything masked out: zero loss and no update (weight decay 0). Half masked: a smaller loss
    than unmasked at the same first step. masked_loss off: masks are ignored."""
    def train(zero_cols, masked):
        model = MMHDiT(preset("tiny", in_channels=3)).initialize_weights(torch.Generator().manual_seed(0))
        for p in model.parameters():  # not DiT-zero: the prediction depends on the weights from step 1
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(p.numel()))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        tr = Trainer(model, Masked(zero_cols), TrainConfig(steps=2, batch_size=2, lr=1e-2, weight_decay=0.0,
                                                           masked_loss=masked, spike_guard=False,
                                                           caption_dropout=0.0))
        losses = tr.train()
        return losses, any(not torch.equal(before[n], p) for n, p in tr.params)

    assert train(8, True) == ([0.0, 0.0], False)
    (half, _), (plain, moved) = train(4, True), train(8, False)
    assert moved and plain[0] > 0 and 0 < half[0] < plain[0]


def test_editing_a_mask_reencodes_only_its_item(tmp_path):
    from oboro.oboro_model.data import OboroDataset
    from oboro.oboro_model.data.masks import LossMasked
    from test_latent_cache import FakeEncoders, build, write_images
    data, masks, enc = write_images(tmp_path / "ds", n=4, sizes=[(64, 64)] * 4), tmp_path / "masks", FakeEncoders()
    masks.mkdir()
    assert build(OboroDataset(data, policy="fixed", size=64), tmp_path / "c", enc)["encoded"] == 4
    for i in (0, 1):
        Image.fromarray(np.full((64, 64), 255 * i, np.uint8), "L").save(masks / f"img{i}.png")
    ds = LossMasked(OboroDataset(data, policy="fixed", size=64), masks)
    r = build(ds, tmp_path / "c", enc)  # two items gained a mask: only they are encoded again
    assert (r["encoded"], r["reused"]) == (2, 2)
    Image.fromarray(np.full((64, 64), 128, np.uint8), "L").save(masks / "img1.png")
    r = build(LossMasked(OboroDataset(data, policy="fixed", size=64), masks), tmp_path / "c", enc)
    assert (r["encoded"], r["reused"]) == (1, 3)
    cache = LatentCache(tmp_path / "c")
    got = {cache[i]["file"]: cache[i].get("loss_mask") for i in range(4)}
    assert got["img0.png"].max() == 0 and torch.allclose(got["img1.png"], torch.full((8, 8), 128 / 255))
    assert got["img2.png"] is None and got["img3.png"] is None


# ---- a node-written cache with masks, and scripts/oboro-train on it --------------------------------
@pytest.fixture(scope="module")
def masked_cache(comfy, tmp_path_factory):
    """Images in a kohya-named folder 2_masked: img0 96x64 with a mask file black for x < 32 (the
    centre 64x64 crop keeps x 16..80: its left 16 pixels, two latent columns, are masked out); img1
    RGBA, transparent top half; img2 without any mask."""
    for kind in ("diffusion_models", "text_encoders", "vae"):
        (comfy.models / kind / SUB).mkdir(exist_ok=True)
    save_checkpoint(comfy.models / "diffusion_models" / SUB / "base.safetensors", base_model(seed=6))
    save_t5(comfy.models / "text_encoders" / SUB / "t5.safetensors", tiny_t5())
    save_file(random_flux_vae_state_dict(), str(comfy.models / "vae" / SUB / "ae.safetensors"))
    root = tmp_path_factory.mktemp("masked_ds")
    data, masks = root / "2_masked", root / "masks"
    data.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(data / "img0.png")
    m = np.full((64, 96), 255, np.uint8)
    m[:, :32] = 0
    Image.fromarray(m, "L").save(masks / "img0.png")
    rgba = rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:32, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(data / "img1.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / "img2.png")
    for i in range(3):
        (data / f"img{i}.txt").write_text(f"picture {i}")
    graph = {"te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": f"{SUB}/t5.safetensors"}},
             "vae": {"class_type": "VAELoader", "inputs": {"vae_name": f"{SUB}/ae.safetensors"}},
             "cache": {"class_type": "OboroCacheLatents", "inputs": {
                 "dataset_dir": str(data), "vae": ["vae", 0], "clip": ["te", 0], "policy": "fixed", "size": 64,
                 "area": 64 * 64, "max_tokens": 8, "cache_name": SUB, "mask_dir": str(masks), "alpha_mask": True}}}
    report = json.loads(comfy.run(graph)["outputs"]["cache"]["text"][0])
    return SimpleNamespace(report=report, cache=Path(report["cache_dir"]), base=comfy.models / "diffusion_models" / SUB
                           / "base.safetensors", work=tmp_path_factory.mktemp("masked_run"))


def test_node_written_cache_carries_the_masks(masked_cache):
    assert masked_cache.report["loss_masks"] == {"mask_file": 1, "alpha": 1, "none": 1}
    cache = LatentCache(masked_cache.cache)
    items = {Path(cache[i]["file"]).name: cache[i] for i in range(len(cache))}
    assert "loss_mask" not in items["img2.png"]
    m0, m1 = items["img0.png"]["loss_mask"], items["img1.png"]["loss_mask"]
    assert m0.shape == m1.shape == items["img0.png"]["latent"].shape[-2:] == (8, 8)
    assert m0[:, :2].max() < 0.01 and m0[:, 3:].min() > 0.99  # the mask was cropped like its image
    assert m1[:4].max() == 0 and m1[4:].min() == 1  # the alpha channel's transparent top half
    assert Path(cache.dataset_dir).name == "2_masked"


def test_cli_trains_masked_with_reg_and_loha_on_the_node_cache(masked_cache):
    cfg = masked_cache.work / "run.toml"
    base = masked_cache.base
    cfg.write_text("\n".join([
        f'model = "{base}"',
        "[[data]]", f'path = "{masked_cache.cache}"',
        "[[data]]", f'path = "{masked_cache.cache}"', "reg = true", "loss_weight = 0.5",
        "[training]", "steps = 2", "batch_size = 1", "lr = 1e-3", "masked_loss = true", "caption_dropout = 0.0",
        "spike_guard = false", "warmup = 0",
        "[lora]", "rank = 2", 'adapter = "loha"', 'targets = "attn"',
        "[output]", 'dir = "cli_masked"', "log_every = 1"]) + "\n")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "oboro-train"), str(cfg)], cwd=cfg.parent,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "step 2/2" in log and "'repeats': [2]" in log and "'share': 0.5" in log, log[-3000:]
    sd = load_file(str(masked_cache.work / "cli_masked" / "lora.safetensors"))
    assert sd and all(k.split(".")[-1] in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha") for k in sd)


def test_node_trains_masked_with_extra_and_reg_caches(comfy, masked_cache):
    """OboroTrainLoRA's extra_caches / reg_cache / reg_weight / masked_loss inputs through the executor:
    the summary lists the three sources with the shares datasets.py gives them."""
    train = {"model": ["m", 0], "cache_dir": str(masked_cache.cache), "output_name": "masked_node", "steps": 2,
             "batch_size": 1, "lr": 1e-3, "warmup": 0, "schedule": "constant", "optimizer": "adamw",
             "grad_accum": 1, "clip_grad_norm": 1.0, "precision": "fp32", "gradient_checkpointing": False,
             "caption_dropout": 0.0, "t_sampling": "uniform", "spike_guard": False, "seed": 0,
             "checkpoint_every": 0, "keep_last": 1, "rank": 2, "alpha": 2.0, "dropout": 0.0, "targets": "attn",
             "overwrite": True, "adapter": "dora", "extra_caches": f"{masked_cache.cache} 0.5 2",
             "reg_cache": str(masked_cache.cache), "reg_weight": 0.5, "masked_loss": True}
    graph = {"m": {"class_type": "OboroModelLoader", "inputs": {"model_name": f"{SUB}/base.safetensors",
                                                                "weight_dtype": "fp32"}},
             "train": {"class_type": "OboroTrainLoRA", "inputs": train}}
    s = json.loads(comfy.run(graph)["outputs"]["train"]["text"][0])
    assert s["step"] == 2
    # main: repeats 2 (image folder 2_masked) x 3 items = 6; extra: 0.5 x 2 x 3 = 3; reg: 9 -> 1/3, 1/6, 1/2
    assert [(d["repeats"], d["reg"], d["share"]) for d in s["data"]] == [([2], False, 0.3333), ([2], False, 0.1667),
                                                                         ([2], True, 0.5)]
