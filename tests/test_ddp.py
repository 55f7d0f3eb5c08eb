"""Data-parallel training: `accelerate launch` of scripts/oboro-train with 2 CPU processes (gloo DDP)
equals one process with the same global batch; the TOML config and the latent cache loader."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oboro.oboro_model import MMHDiT, load_checkpoint, preset, save_checkpoint
from oboro.oboro_model.training.distributed import build_model, load_cached_dataset, train_config
from oboro.oboro_model.training.lora import add_lora, lora_state_dict
from oboro.oboro_model.training.state import list_checkpoints
from oboro.oboro_model.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CFG = preset("tiny", in_channels=3)
K = 3  # optimiser steps


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A latent cache in two files (12 samples, captions of 3..6 tokens) and a base checkpoint."""
    d = tmp_path_factory.mktemp("ddp")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(12):
        L = 3 + i % 4
        sd[f"latent_{i}"] = torch.randn(3, 8, 8, generator=g)
        sd[f"text_{i}"] = torch.randn(L, 32, generator=g)
        sd[f"text_mask_{i}"] = torch.ones(L)
    (d / "cache").mkdir()
    save_file({k: v for k, v in sd.items() if int(k.rsplit("_", 1)[1]) < 7}, str(d / "cache" / "a.safetensors"))
    save_file({k: v for k, v in sd.items() if int(k.rsplit("_", 1)[1]) >= 7}, str(d / "cache" / "b.safetensors"))
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
    model = build_model("base.safetensors", d)
    if lora:
        add_lora(model, lora["rank"], lora["alpha"], lora.get("dropout", 0.0), lora["targets"])
    tr = Trainer(model, load_cached_dataset(d / "cache"), tc)
    tr.train()
    return tr


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_process_ddp_equals_one_process_global_batch(run_dir, kind):
    training = dict(steps=K, batch_size=2, grad_accum=2 if kind == "full" else 1, lr=1e-3, caption_dropout=0.3,
                    spike_warmup=1, seed=4)
    lora = dict(rank=4, alpha=8.0, dropout=0.0, targets="all") if kind == "lora" else None
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
    assert len(ds) == 12 and ds.empty_text is None
    item = ds[11]
    assert item["latent"].shape == (3, 8, 8) and item["text"].shape == (6, 32) and item["text_mask"].shape == (6,)
    assert len(load_cached_dataset(run_dir / "cache" / "b.safetensors")) == 5
    save_file({"latent_0": torch.zeros(3, 8, 8)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="latent_0 has no text_0"):
        load_cached_dataset(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"\[training\]: unknown keys \['stepz'\]"):
        train_config({"training": {"stepz": 3}, "_base_dir": "."}, None)
    assert isinstance(build_model({"preset": "tiny", "config": {"in_channels": 3}, "seed": 1}), MMHDiT)
    with pytest.raises(ValueError, match="either checkpoint or preset"):
        build_model({"preset": "tiny", "checkpoint": "x.safetensors"})
