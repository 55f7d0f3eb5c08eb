"""Data-parallel training: `accelerate launch` of scripts/oboro-train with 2 CPU processes (gloo DDP)
equals one process with the same global batch on a 2-bucket cache; the TOML config, the latent cache
loader, and bucket-per-step batching with exact resume. (tests/test_train_equivalence.py does the same
on a cache the OboroCacheLatents node wrote, against the training nodes.)"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oboro.oboro_model import MMHDiT, load_checkpoint, preset, save_checkpoint
from oboro.oboro_model.training.cli import build_model, load_cached_dataset, lora_spec, train_config
from oboro.oboro_model.training.lora import lora_state_dict
from oboro.oboro_model.training.run import build_trainer
from oboro.oboro_model.training.state import list_checkpoints
from oboro.oboro_model.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CFG = preset("tiny", in_channels=3)
K = 3  # optimiser steps


pytestmark = pytest.mark.usefixtures("one_thread")


class Encoders:
    """Deterministic stand-ins for a VAE (8x average pooling) and T5 (3..6 tokens by caption)."""

    @staticmethod
    def image(pixels):
        return torch.nn.functional.avg_pool2d(pixels, 8) * 2 - 1

    @staticmethod
    def text(captions):
        hidden = [torch.sin(torch.arange((3 + len(c) % 4) * 32, dtype=torch.float32) * (1 + len(c))).view(-1, 32)
                  for c in captions]
        return hidden, [torch.ones(h.shape[0], dtype=torch.long) for h in hidden]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-bucket latent cache (12 images, 80x48 and 64x64, written by build_cache) and a base
    checkpoint."""
    import numpy as np
    from PIL import Image
    from oboro.oboro_model.data import OboroDataset, build_cache
    d = tmp_path_factory.mktemp("ddp")
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    (d / "images").mkdir()
    for i in range(12):
        h, w = (48, 80) if i % 2 else (64, 64)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / "images" / f"{i:02d}.png")
        (d / "images" / f"{i:02d}.txt").write_text("word " * (1 + i))
    ds = OboroDataset(d / "images", policy="stage2_area", area=64 * 64, max_aspect=2.0, multiple=16)
    build_cache(ds, d / "cache", Encoders.image, Encoders.text, {"vae": "pool8", "t5": "sin"})
    model = MMHDiT(CFG)  # "pretrained": random everywhere, so the (DiT-zero-init) gates pass LoRA gradients
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05, generator=g)
    save_checkpoint(d / "base.safetensors", model)
    return d


def write_config(d: Path, name: str, training: dict, lora: dict | None = None) -> Path:
    def val(v):
        return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else repr(v)

    lines = ['model = "base.safetensors"', "[data]", 'path = "cache"', "[training]"]
    lines += [f"{k} = {val(v)}" for k, v in training.items()]
    if lora:
        lines += ["[lora]"] + [f"{k} = {val(v)}" for k, v in lora.items()]
    lines += ["[output]", f'dir = "{name}"', "log_every = 1"]
    path = d / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ddp(config: Path, processes: int = 2) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(REPO / "scripts" / "oboro-train"), str(config)]
    proc = subprocess.run(cmd, cwd=config.parent, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def reference(d: Path, training: dict, lora: dict | None = None) -> Trainer:
    """The same run in this process, one rank, with batch_size * 2: what DDP must reproduce."""
    tc = train_config({"training": {**training, "batch_size": 2 * training["batch_size"]}, "_base_dir": str(d)}, None)
    torch.manual_seed(tc.seed)
    model = build_model("base.safetensors", d, lora.get("base_dtype") if lora else None)
    tr = build_trainer(model, load_cached_dataset(d / "cache"), tc, lora_spec(lora) if lora else None)
    tr.train()
    return tr


@pytest.mark.parametrize("kind", ["full", "lora", "lora_bf16_base"])
def test_two_process_ddp_equals_one_process_global_batch(run_dir, kind):
    """lora_bf16_base: the frozen base kept in bf16 ([lora] base_dtype) is broadcast and trained
    on the same way."""
    training = dict(steps=K, batch_size=2, grad_accum=2 if kind == "full" else 1, lr=1e-3, caption_dropout=0.3,
                    spike_warmup=1, seed=4)
    lora = dict(rank=4, alpha=8.0, dropout=0.0, targets="all") if kind != "full" else None
    if kind == "lora_bf16_base":
        lora["base_dtype"] = "bf16"
    log = launch_ddp(write_config(run_dir, kind, training, lora))
    assert "2 process(es) x batch 2" in log and f"step {K}/{K}" in log

    ref = reference(run_dir, training, lora)
    out = run_dir / kind
    assert [p.name for p in list_checkpoints(out)] == [f"step_{K:08d}.safetensors"]
    if kind == "full":
        got, want = load_file(str(out / "model.safetensors")), ref.model.state_dict()
        moved = load_checkpoint(run_dir / "base.safetensors").state_dict()
    else:
        got, want = load_file(str(out / "lora.safetensors")), lora_state_dict(ref.model)
        moved = {k: torch.zeros_like(v) for k, v in want.items() if ".lora_up." in k}  # B starts at 0
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= 1e-5, worst
    assert max((got[k] - moved[k]).abs().max().item() for k in moved) > 1e-4  # training did something


def test_config_and_cache_loader(run_dir, tmp_path):
    ds = load_cached_dataset(run_dir / "cache")
    assert len(ds) == 12 and ds.empty_text is not None and ds.latent_transform["format"] == "identity"
    assert {ds.bucket_of(i) for i in range(12)} == {(80, 48), (64, 64)}
    item = ds[11]
    assert item["latent"].shape == (3, 6, 10) and item["text"].shape[1] == 32
    with pytest.raises(FileNotFoundError, match="not a latent cache folder"):
        load_cached_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"\[training\]: unknown keys \['stepz'\]"):
        train_config({"training": {"stepz": 3}, "_base_dir": "."}, None)
    assert isinstance(build_model({"preset": "tiny", "config": {"in_channels": 3}, "seed": 1}), MMHDiT)
    with pytest.raises(ValueError, match="either checkpoint or preset"):
        build_model({"preset": "tiny", "checkpoint": "x.safetensors"})


def test_steps_never_mix_buckets_and_resume_exactly(run_dir, tmp_path):
    """Every step (all its micro-batches and ranks) is one bucket; the order is seeded and a resumed
    run continues with the same batches."""
    from oboro.oboro_model.training import TrainConfig
    ds = load_cached_dataset(run_dir / "cache")
    torch.manual_seed(0)
    tr = Trainer(MMHDiT(CFG), ds, TrainConfig(steps=4, batch_size=2, grad_accum=2, spike_guard=False))
    steps = [tr._next_indices(4) for _ in range(9)]
    assert all(len({ds.bucket_of(i) for i in s}) == 1 for s in steps), steps
    assert set(sum(steps, [])) == set(range(12))
    again = Trainer(MMHDiT(CFG), ds, TrainConfig(steps=4, batch_size=2, grad_accum=2, spike_guard=False))
    assert [again._next_indices(4) for _ in range(9)] == steps
    a = Trainer(MMHDiT(CFG), ds, TrainConfig(steps=4, batch_size=2, grad_accum=2, output_dir=str(tmp_path)))
    a.train(until=2)
    b = Trainer(MMHDiT(CFG), ds, TrainConfig(steps=4, batch_size=2, grad_accum=2))
    b.resume(tmp_path)
    assert [b._next_indices(4) for _ in range(3)] == [a._next_indices(4) for _ in range(3)]
