"""One engine for every front end. A 2-bucket latent cache written by OboroCacheLatents through
ComfyUI's executor (tiny FLUX-architecture VAE, so the cache records a non-identity latent
transform, and a tiny T5, so it stores T5("") for caption dropout) trains to the same weights
(fp32, <= 1e-6) whichever front end runs it: OboroTrainFull / OboroTrainLoRA in ComfyUI,
scripts/oboro-train in one process, and `accelerate launch` with 2 CPU processes at the same global
batch. Resuming mid-run (the LoRA node, the DDP run) equals not stopping."""
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

from oboro.oboro_model import save_checkpoint
from oboro.oboro_model.data import LatentCache
from oboro.oboro_model.training.state import list_checkpoints
from test_ddp import launch_ddp
from tiny import random_flux_vae_state_dict, save_t5, tiny_dit, tiny_t5

REPO = Path(__file__).resolve().parents[1]
SUB = "equiv"
K = 4          # optimiser steps; resumed runs stop at K // 2 first
TOL = 1e-6
TRAINING = dict(batch_size=2, lr=1e-4, warmup=0, schedule="constant", optimizer="adamw", grad_accum=1,
                clip_grad_norm=1.0, gradient_checkpointing=False, caption_dropout=0.5, t_sampling="uniform",
                spike_guard=True, seed=3, checkpoint_every=2, keep_last=2)
LORA = dict(rank=4, alpha=8.0, dropout=0.0, targets="all")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(comfy, tmp_path_factory):
    """Tiny 16-channel DiT, T5 and FLUX-layout VAE in ComfyUI's folders; four images, two landscape
    and two portrait, cached by the node at area 256 x 320: buckets (320, 256) and (256, 320)."""
    for kind in ("diffusion_models", "text_encoders", "vae"):
        (comfy.models / kind / SUB).mkdir(exist_ok=True)
    base = comfy.models / "diffusion_models" / SUB / "base16.safetensors"
    save_checkpoint(base, tiny_dit(seed=1).train())
    save_t5(comfy.models / "text_encoders" / SUB / "t5.safetensors", tiny_t5())
    save_file(random_flux_vae_state_dict(), str(comfy.models / "vae" / SUB / "ae.safetensors"))
    data = tmp_path_factory.mktemp("equiv_ds")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(320, 256), (256, 320), (330, 260), (250, 330)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(["a red square", "a blue circle", "green noise", "white text"][i])
    graph = loaders()
    graph["cache"] = {"class_type": "OboroCacheLatents", "inputs": {
        "dataset_dir": str(data), "vae": ["vae", 0], "clip": ["te", 0], "policy": "stage2_area", "size": 256,
        "area": 256 * 320, "max_tokens": 16, "cache_name": SUB}}
    report = json.loads(comfy.run(graph)["outputs"]["cache"]["text"][0])
    cache = LatentCache(report["cache_dir"])
    assert sorted({cache.bucket_of(i) for i in range(len(cache))}) == [(256, 320), (320, 256)]
    return SimpleNamespace(base=base, cache=Path(report["cache_dir"]), work=tmp_path_factory.mktemp("equiv_runs"))


def loaders() -> dict:
    return {"m": {"class_type": "OboroModelLoader", "inputs": {"model_name": f"{SUB}/base16.safetensors",
                                                               "weight_dtype": "fp32"}},
            "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": f"{SUB}/t5.safetensors"}},
            "vae": {"class_type": "VAELoader", "inputs": {"vae_name": f"{SUB}/ae.safetensors"}}}


def run_node(comfy, setup, node: str, name: str, steps: int, resume: str = "") -> dict:
    train = {"model": ["m", 0], "cache_dir": str(setup.cache), "output_name": name, "steps": steps,
             "precision": "fp32", "resume_from": resume, **TRAINING}
    train.update(LORA if node == "OboroTrainLoRA" else {"save_dtype": "fp32"})
    g = {k: v for k, v in loaders().items() if k == "m"}
    g["train"] = {"class_type": node, "inputs": train}
    return json.loads(comfy.run(g)["outputs"]["train"]["text"][0])


def write_config(setup, name: str, steps: int, lora: bool) -> Path:
    def val(v):
        return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else repr(v)

    training = {**TRAINING, "steps": steps, "precision": "no"}
    lines = [f'model = "{setup.base}"', "[data]", f'path = "{setup.cache}"', "[training]"]
    lines += [f"{k} = {val(v)}" for k, v in training.items()]
    if lora:
        lines += ["[lora]"] + [f"{k} = {val(v)}" for k, v in LORA.items()]
    lines += ["[output]", f'dir = "{name}"', "log_every = 1"]
    path = setup.work / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(config: Path) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "oboro-train"), str(config)], cwd=config.parent,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def exported(log: str) -> str:
    """The file oboro-train says it wrote (the next free name, never an older export)."""
    return [line.split("wrote ", 1)[1].strip() for line in log.splitlines() if "oboro-train: wrote" in line][0]


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_cache_records_the_models_latent_format(comfy, setup):
    """What the node recorded is exactly what the oboro MODEL's ComfyUI latent_format.process_in does."""
    from oboro.oboro_model.data import ScaleShift
    from oboro.oboro_model.data.cache import FLUX_SCALE, FLUX_SHIFT
    import comfy.latent_formats as lf
    cache = LatentCache(setup.cache)
    assert cache.latent_transform == {"format": "Flux", "scale": FLUX_SCALE, "shift": FLUX_SHIFT}
    assert cache.empty_text is not None and cache.empty_text.shape[-1] == 32
    x = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(ScaleShift(cache.latent_transform)(x), lf.Flux().process_in(x), atol=0, rtol=0)
    torch.testing.assert_close(LatentCache(setup.cache, transform="manifest")[0]["latent"],
                               lf.Flux().process_in(cache[0]["latent"]), atol=0, rtol=0)


def test_full_node_cli_and_ddp_give_the_same_weights(comfy, setup):
    s = run_node(comfy, setup, "OboroTrainFull", "eq_full", K)
    assert (s["step"], s["items"]) == (K, 4)
    node = load_file(str(comfy.models / "diffusion_models" / "eq_full.safetensors"))

    log = run_cli(write_config(setup, "cli_full", K, lora=False))
    assert f"step {K}/{K}" in log
    cli = load_file(str(setup.work / "cli_full" / "model.safetensors"))
    assert worst(node, cli) <= TOL

    cfg = write_config(setup, "ddp_full", K // 2, lora=False)  # 2 ranks x batch 1, stopped half-way...
    cfg.write_text(cfg.read_text().replace("batch_size = 2", "batch_size = 1"))
    assert "2 process(es) x batch 1" in launch_ddp(cfg)
    cfg.write_text(cfg.read_text().replace(f"steps = {K // 2}", f"steps = {K}"))
    log = launch_ddp(cfg)  # ...and resumed from its state ([output] resume = true)
    assert f"step {K // 2} -> {K}" in log
    assert exported(log).endswith("model_00001_.safetensors")  # the half-way export is kept
    ddp = load_file(exported(log))
    assert worst(node, ddp) <= TOL
    base = load_file(str(setup.base))
    assert worst(node, {k: base[k] for k in node}) > 1e-5  # and training moved the weights


def test_lora_node_resumed_cli_and_ddp_give_the_same_weights(comfy, setup):
    s = run_node(comfy, setup, "OboroTrainLoRA", "eq_lora", K // 2)
    assert s["step"] == K // 2
    s = run_node(comfy, setup, "OboroTrainLoRA", "eq_lora", K, resume="latest")
    assert (s["start_step"], s["step"]) == (K // 2, K)
    # the half-way run saved eq_lora.safetensors; the resumed one never overwrites it (no overwrite input)
    assert s["path"].endswith("eq_lora_00001_.safetensors")
    node = load_file(s["path"])

    run_cli(write_config(setup, "cli_lora", K, lora=True))
    cli = load_file(str(setup.work / "cli_lora" / "lora.safetensors"))
    assert worst(node, cli) <= TOL
    assert [p.name for p in list_checkpoints(setup.work / "cli_lora")] == ["step_00000002.safetensors",
                                                                          f"step_{K:08d}.safetensors"]

    cfg = write_config(setup, "ddp_lora", K, lora=True)
    cfg.write_text(cfg.read_text().replace("batch_size = 2", "batch_size = 1"))
    launch_ddp(cfg)
    ddp = load_file(str(setup.work / "ddp_lora" / "lora.safetensors"))
    assert worst(node, ddp) <= TOL
    assert max(v.abs().max().item() for k, v in node.items() if "lora_up" in k) > 1e-6  # B moved from 0


def test_lora_on_a_bf16_model_keeps_the_base_bf16_and_matches_the_cli(comfy, setup):
    """OboroModelLoader's bf16 MODEL trains a LoRA on its frozen base as stored (no fp32 copy:
    frozen_base.py casts per layer, exactly, at fp32 compute); oboro-train on the same weights saved
    in bf16 (base_dtype "stored", the default) gives the same LoRA."""
    g = loaders()
    g["m"]["inputs"]["weight_dtype"] = "bf16"
    train = {"model": ["m", 0], "cache_dir": str(setup.cache), "output_name": "eq_lora_bf16", "steps": K // 2,
             "precision": "fp32", **TRAINING, **LORA}
    g = {"m": g["m"], "train": {"class_type": "OboroTrainLoRA", "inputs": train}}
    s = json.loads(comfy.run(g)["outputs"]["train"]["text"][0])
    assert s["base_dtype"] == "bfloat16"
    node = load_file(s["path"])

    bf16 = setup.work / "base16_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(setup.base)).items()}, str(bf16))
    cfg = write_config(setup, "cli_lora_bf16", K // 2, lora=True)
    cfg.write_text(cfg.read_text().replace(str(setup.base), str(bf16)))
    log = run_cli(cfg)
    assert "base bfloat16" in log  # the memory plan at start counts the bf16 base
    cli = load_file(str(setup.work / "cli_lora_bf16" / "lora.safetensors"))
    assert worst(node, cli) <= TOL
    assert max(v.abs().max().item() for k, v in node.items() if "lora_up" in k) > 1e-6  # B moved from 0
