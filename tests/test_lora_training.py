"""LoRA training (oboro_model.training.lora, peft) and what ComfyUI makes of the results: a LoRA we
train and save, applied by core LoraLoaderModelOnly, and a full fine-tune saved with
save_checkpoint, both give the training-time velocity through OboroModelLoader."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from oboro.oboro_model import MMHDiT, preset, save_checkpoint
from oboro.oboro_model.training.lora import (TARGET_PRESETS, add_lora, load_lora, lora_layers, lora_state_dict,
                                             merge_lora, resolve_targets, save_lora)
from oboro.oboro_model.training.state import list_checkpoints
from oboro.oboro_model.training.trainer import Trainer, TrainConfig

TEXT_DIM = 32
CFG = preset("tiny", in_channels=16, text_dim=TEXT_DIM)
DEPTH = CFG.depth


pytestmark = pytest.mark.usefixtures("one_thread")


class Synthetic(torch.utils.data.Dataset):
    """12 samples of 4 fixed 16x8x8 latents; the caption (3..6 tokens) says which."""

    def __init__(self, n=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(4, 16, 8, 8, generator=g)
        self.words = torch.randn(4, 6, TEXT_DIM, generator=g)
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        k, L = i % 4, 3 + i % 4
        return {"latent": self.latents[k].clone(), "text": self.words[k, :L], "text_mask": torch.ones(L)}


def base_model(seed=0):
    """Random (not DiT-zero) init, so every block, gate and LoRA target affects the output."""
    torch.manual_seed(seed)
    m = MMHDiT(CFG)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m


def inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    x, sigma = torch.randn(2, 16, 6, 8, generator=g), torch.tensor([0.8, 0.3])
    ctx = torch.randn(2, 5, TEXT_DIM, generator=g)
    return x, sigma, ctx, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


@torch.no_grad()
def velocity(model, x, sigma, ctx, mask):
    model.eval()
    return model(x, 1 - sigma, ctx, mask)


def comfy_denoised(patcher, x, sigma, ctx, mask):
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])  # applies the patcher's weight patches (the LoRA)
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=ctx, attention_mask=mask)


def load_via_nodes(name, lora=None):
    import nodes as comfy_nodes
    patcher = comfy_nodes.NODE_CLASS_MAPPINGS["OboroModelLoader"].execute(name, "fp32")[0]
    if lora is not None:
        patcher = comfy_nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]().load_lora_model_only(patcher, lora, 1.0)[0]
    return patcher


# ---- targets and format ---------------------------------------------------------------------------
def test_target_presets_pick_the_expected_modules():
    attn = [f"blocks.{i}.attn.{n}" for i in range(DEPTH) for n in ("qkv", "out")]
    mlp = [f"blocks.{i}.mlp.{n}" for i in range(DEPTH) for n in ("w1", "w2", "w3")]
    m = base_model()
    assert sorted(resolve_targets(m, "attn")) == sorted(attn)
    assert sorted(resolve_targets(m, "mlp")) == sorted(mlp)
    assert sorted(resolve_targets(m, "all")) == sorted(attn + mlp)
    assert TARGET_PRESETS["all"] == TARGET_PRESETS["attn"] + TARGET_PRESETS["mlp"]
    assert sorted(resolve_targets(m, ["attn.qkv", "blocks.1.mlp.w2", "adaLN_modulation.1"])) == sorted(
        [f"blocks.{i}.attn.qkv" for i in range(DEPTH)] + ["blocks.1.mlp.w2"]
        + [f"blocks.{i}.adaLN_modulation.1" for i in range(DEPTH)] + ["final_layer.adaLN_modulation.1"])
    with pytest.raises(ValueError, match="'attn.q' matches no Linear"):
        resolve_targets(m, ["attn.q"])

    x, sigma, ctx, mask = inputs()
    want = velocity(m, x, sigma, ctx, mask)
    add_lora(m, rank=4, alpha=2.0, targets=["mlp", "attn.out"])
    assert sorted(lora_layers(m)) == sorted(mlp + [f"blocks.{i}.attn.out" for i in range(DEPTH)])
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert len(trainable) == 2 * len(lora_layers(m))
    torch.testing.assert_close(velocity(m, x, sigma, ctx, mask), want)  # lora_B starts at 0: no change
    sd = lora_state_dict(m)
    key = "diffusion_model.blocks.2.mlp.w1"
    assert set(sd) == {f"diffusion_model.{n}.{s}" for n in lora_layers(m) for s in
                       ("lora_down.weight", "lora_up.weight", "alpha")}
    assert sd[f"{key}.lora_down.weight"].shape == (4, CFG.hidden_size)
    assert sd[f"{key}.lora_up.weight"].shape == (CFG.mlp_hidden, 4)
    assert sd[f"{key}.alpha"].ndim == 0 and sd[f"{key}.alpha"].item() == 2.0
    with pytest.raises(ValueError, match="already has a LoRA"):
        add_lora(m, rank=4)


# ---- LoRA trained here == LoRA applied by ComfyUI -------------------------------------------------
def test_trained_lora_through_core_loader_matches_peft_model(comfy, tmp_path):
    base = base_model()
    save_checkpoint(comfy.models / "diffusion_models" / "lora_base.safetensors", base)
    torch.manual_seed(1)
    model = add_lora(copy.deepcopy(base), rank=4, alpha=8.0, dropout=0.1, targets="all")  # scale alpha/rank = 2
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, caption_dropout=0.2, spike_guard=False)
    Trainer(model, Synthetic(), cfg).train()
    assert all(m.lora_B["default"].weight.abs().max() > 1e-3 for m in lora_layers(model).values())
    path = save_lora(comfy.models / "loras" / "oboro_trained_lora.safetensors", model, {"note": "test"})

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    info = json.loads(meta["oboro_lora"])
    assert (info["rank"], info["alpha"], info["dropout"], info["targets"]) == (4, 8.0, 0.1, "all")
    assert json.loads(meta["oboro_base_config"]) == json.loads(CFG.to_json()) and meta["note"] == "test"

    x, sigma, ctx, mask = inputs()
    u = velocity(model, x, sigma, ctx, mask)
    assert (u - velocity(base, x, sigma, ctx, mask)).abs().max() > 1e-2  # the LoRA matters

    patcher = load_via_nodes("lora_base.safetensors", "oboro_trained_lora.safetensors")
    assert set(patcher.patches) == {f"diffusion_model.{n}.weight" for n in lora_layers(model)}  # every key mapped
    try:
        denoised = comfy_denoised(patcher, x, sigma, ctx, mask)
    finally:
        import comfy.model_management as mm
        mm.unload_all_models()
    assert (denoised - (x + sigma[:, None, None, None] * u)).abs().max() <= 1e-5

    # peft's merge and a reload of the saved file give the same model
    merged = merge_lora(copy.deepcopy(model))
    assert not lora_layers(merged) and set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(velocity(merged, x, sigma, ctx, mask), u, atol=1e-5, rtol=0)
    reloaded = load_lora(copy.deepcopy(base), path)
    want, got = lora_state_dict(model), lora_state_dict(reloaded)  # the file round-trips bit for bit...
    assert set(want) == set(got) and [k for k in want if not torch.equal(want[k], got[k])] == []
    # ...while two separately built models' outputs agree to fp32 rounding only (summation order)
    torch.testing.assert_close(velocity(reloaded, x, sigma, ctx, mask), u, atol=1e-5, rtol=0)


def test_full_finetune_checkpoint_loads_in_comfy(comfy):
    base = base_model(seed=2)
    model = copy.deepcopy(base)
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, caption_dropout=0.2, spike_guard=False)
    tr = Trainer(model, Synthetic(), cfg)
    assert len(tr.params) == len(list(model.parameters()))
    tr.train()
    save_checkpoint(comfy.models / "diffusion_models" / "oboro_finetuned.safetensors", model)
    x, sigma, ctx, mask = inputs()
    u = velocity(model, x, sigma, ctx, mask)
    assert (u - velocity(base, x, sigma, ctx, mask)).abs().max() > 1e-2
    patcher = load_via_nodes("oboro_finetuned.safetensors")
    try:
        denoised = comfy_denoised(patcher, x, sigma, ctx, mask)
    finally:
        import comfy.model_management as mm
        mm.unload_all_models()
    assert (denoised - (x + sigma[:, None, None, None] * u)).abs().max() <= 1e-5


# ---- exact resume ---------------------------------------------------------------------------------
def test_lora_resume_is_bitwise_exact(tmp_path):
    kw = dict(steps=6, batch_size=2, grad_accum=2, lr=5e-3, warmup=2, schedule="cosine", caption_dropout=0.3,
              ema_decay=0.9, sigma=0.01, spike_warmup=2, seed=3)

    def make(out=None, seed=11):
        torch.manual_seed(seed)  # LoRA A init (and later dropout) come from the global RNG
        model = add_lora(base_model(), rank=4, alpha=4.0, dropout=0.2, targets=["attn.qkv", "mlp.w2"])
        return Trainer(model, Synthetic(), TrainConfig(output_dir=out, **kw))

    def state(tr):
        out = {f"w.{n}": p.detach().clone() for n, p in tr.params}
        for i, s in tr.optimizer.state_dict()["state"].items():
            out.update({f"opt.{i}.{k}": v.clone() for k, v in s.items()})
        out.update({f"ema.{k}": v.clone() for k, v in tr.ema.state_dict().items()})
        return out

    straight = make()
    straight.train()
    first = make(str(tmp_path))
    first.train(until=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.safetensors"]
    second = make(str(tmp_path), seed=999)  # other LoRA init and global RNG: resume restores both
    second.resume(tmp_path)
    second.train()
    want, got = state(straight), state(second)
    assert want.keys() == got.keys() and all(k.startswith(("w.", "opt.", "ema.")) for k in want)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert all(".lora_" in k for k in want if k.startswith("w."))
