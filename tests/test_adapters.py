"""Adapter kinds (LoRA, LoHa, LoKr, DoRA through peft; oboro_model/training/adapters.py): the file
we save is applied by core LoraLoaderModelOnly to the oboro MODEL and gives the velocity of the
training-time peft model (fp32, <= 1e-5). Once with every adapter weight random (so a wrong scale or
axis anywhere shows), once per kind trained by OboroTrainLoRA through ComfyUI's executor, compared
with the peft model rebuilt from that run's training state."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from oboro.oboro_model import save_checkpoint
from oboro.oboro_model.training.adapters import ADAPTERS, add_adapter, adapter_state_dict, save_adapter
from oboro.oboro_model.training.state import list_checkpoints
from test_lora_training import base_model, comfy_denoised, inputs, load_via_nodes, velocity

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def comfy_velocity(base_name: str, lora_name: str, x, sigma, ctx, mask) -> torch.Tensor:
    import comfy.model_management as mm
    patcher = load_via_nodes(base_name, lora_name)
    try:
        denoised = comfy_denoised(patcher, x, sigma, ctx, mask)
    finally:
        mm.unload_all_models()
    return (denoised - x) / sigma[:, None, None, None]


@pytest.mark.parametrize("kind", ADAPTERS)
def test_random_adapter_applied_by_core_matches_peft(comfy, kind):
    base = base_model(seed=3)
    save_checkpoint(comfy.models / "diffusion_models" / "adapter_base.safetensors", base)
    model = add_adapter(copy.deepcopy(base), kind, rank=4, alpha=2.0, targets="all", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:  # every factor non-zero; DoRA's magnitude off the base norm
                p.copy_(p + 0.05 * torch.randn(p.shape, generator=g) if "magnitude" in n
                        else 0.3 * torch.randn(p.shape, generator=g))
    path = save_adapter(comfy.models / "loras" / f"random_{kind}.safetensors", model)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["oboro_lora"])["adapter"] == kind
    x, sigma, ctx, mask = inputs()
    want = velocity(model, x, sigma, ctx, mask)
    assert (want - velocity(base, x, sigma, ctx, mask)).abs().max() > 1e-3  # the adapter matters
    got = comfy_velocity("adapter_base.safetensors", path.name, x, sigma, ctx, mask)
    assert (got - want).abs().max() <= TOL


def test_adapter_keys_per_kind():
    """The key names core's loaders look for (comfy/weight_adapter), one module per kind."""
    suffixes = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
                "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
                "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}}
    for kind in ADAPTERS:
        sd = adapter_state_dict(add_adapter(base_model(), kind, rank=4, targets=["blocks.0.attn.qkv"]))
        got = {k.removeprefix("diffusion_model.blocks.0.attn.qkv.") for k in sd}
        if kind == "lokr":
            assert {"lokr_w1", "lokr_w2"} <= got or {"lokr_w1", "lokr_w2_a", "lokr_w2_b"} <= got, got
        else:
            assert got == suffixes[kind], (kind, got)
    with pytest.raises(ValueError, match="unknown adapter kind 'oft'"):
        add_adapter(base_model(), "oft")


# ---- trained by the node through ComfyUI's executor -------------------------------------------------
@pytest.fixture(scope="module")
def node_cache(comfy, tmp_path_factory):
    """A tiny 16-channel base (fp32) and a two-image latent cache written by OboroCacheLatents."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file
    from tiny import random_flux_vae_state_dict, save_t5, tiny_t5
    sub = "adapters"
    for kind in ("diffusion_models", "text_encoders", "vae"):
        (comfy.models / kind / sub).mkdir(exist_ok=True)
    base = base_model(seed=4)
    save_checkpoint(comfy.models / "diffusion_models" / sub / "base.safetensors", base)
    save_t5(comfy.models / "text_encoders" / sub / "t5.safetensors", tiny_t5())
    save_file(random_flux_vae_state_dict(), str(comfy.models / "vae" / sub / "ae.safetensors"))
    data = tmp_path_factory.mktemp("adapter_ds")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(["a red square", "a blue circle"][i])
    graph = {"te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": f"{sub}/t5.safetensors"}},
             "vae": {"class_type": "VAELoader", "inputs": {"vae_name": f"{sub}/ae.safetensors"}},
             "cache": {"class_type": "OboroCacheLatents", "inputs": {
                 "dataset_dir": str(data), "vae": ["vae", 0], "clip": ["te", 0], "policy": "fixed", "size": 64,
                 "area": 64 * 64, "max_tokens": 8, "cache_name": sub}}}
    report = json.loads(comfy.run(graph)["outputs"]["cache"]["text"][0])
    return base, report["cache_dir"], sub


@pytest.mark.parametrize("kind", ADAPTERS)
def test_node_trained_adapter_loads_in_core_and_matches(comfy, node_cache, kind):
    base, cache_dir, sub = node_cache
    name = f"adapter_{kind}"
    train = {"model": ["m", 0], "cache_dir": cache_dir, "output_name": name, "steps": 2, "batch_size": 2,
             "lr": 1e-2, "warmup": 0, "schedule": "constant", "optimizer": "adamw", "grad_accum": 1,
             "clip_grad_norm": 0.0, "precision": "fp32", "gradient_checkpointing": False, "caption_dropout": 0.0,
             "t_sampling": "uniform", "spike_guard": False, "seed": 1, "checkpoint_every": 0, "keep_last": 1,
             "rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": "all", "overwrite": True, "adapter": kind}
    graph = {"m": {"class_type": "OboroModelLoader", "inputs": {"model_name": f"{sub}/base.safetensors",
                                                                "weight_dtype": "fp32"}},
             "train": {"class_type": "OboroTrainLoRA", "inputs": train}}
    summary = json.loads(comfy.run(graph)["outputs"]["train"]["text"][0])
    assert summary["step"] == 2
    # the training-time peft model: the base, the same adapter, the run's final training state
    state = load_file(str(list_checkpoints(comfy.output / "oboro_training" / name)[-1]))
    model = add_adapter(copy.deepcopy(base), kind, rank=4, alpha=8.0, targets="all")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trained) == {k.removeprefix("model.") for k in state if k.startswith("model.")}
    with torch.no_grad():
        for n, p in trained.items():
            p.copy_(state[f"model.{n}"])
    x, sigma, ctx, mask = inputs()
    want = velocity(model, x, sigma, ctx, mask)
    assert (want - velocity(base, x, sigma, ctx, mask)).abs().max() > 1e-4  # two steps moved it
    got = comfy_velocity(f"{sub}/base.safetensors", f"{name}.safetensors", x, sigma, ctx, mask)
    assert (got - want).abs().max() <= TOL
