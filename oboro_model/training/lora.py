"""LoRA for the MMH-DiT through `peft`, exported in the key format ComfyUI's core LoRA loaders read.

    model = add_lora(MMHDiT(...), rank=16, alpha=16, dropout=0.0, targets="attn")  # in place, base frozen
    Trainer(model, dataset, config).train()           # trains (and checkpoints) only the LoRA weights
    save_lora("my_lora.safetensors", model)           # -> models/loras, use with LoraLoaderModelOnly

peft computes  y = W x + (alpha / rank) * B(A(dropout(x)))  and ComfyUI patches the weight as
W + strength * (alpha / rank) * up @ down  (comfy/weight_adapter/lora.py, rank = down.shape[0]);
with A = lora_down, B = lora_up and the exported `.alpha` equal to peft's scaling * rank the two
agree at strength 1 (dropout only acts in training). Keys are
`diffusion_model.<module path>.lora_down.weight` / `.lora_up.weight` / `.alpha`, the generic
format core `model_lora_keys_unet` maps onto every `diffusion_model.*.weight` of our MODEL.

Targets: "attn" (attention qkv and out projections), "mlp" (SwiGLU w1, w2, w3), "all" (both), or a
list of module paths / path suffixes (e.g. ["attn.qkv", "adaLN_modulation.1"]) that may also name
presets. Imports no ComfyUI.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import torch

from ..atomic import save_safetensors

TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.qkv", "attn.out"),
    "mlp": ("mlp.w1", "mlp.w2", "mlp.w3"),
}
TARGET_PRESETS["all"] = TARGET_PRESETS["attn"] + TARGET_PRESETS["mlp"]

ADAPTER = "default"
COMFY_PREFIX = "diffusion_model."
LORA_META_KEY = "oboro_lora"
BASE_CONFIG_KEY = "oboro_base_config"

Targets = Union[str, Iterable[str]]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _target_list(targets: Targets) -> list[str]:
    names = [targets] if isinstance(targets, str) else list(targets)
    if not names:
        raise ValueError("LoRA targets are empty")
    out: list[str] = []
    for t in names:
        out += TARGET_PRESETS.get(t, (t,))
    return out


def resolve_targets(model: torch.nn.Module, targets: Targets = "attn") -> list[str]:
    """Full paths of the nn.Linear modules `targets` selects (a preset, or paths/suffixes, which
    match a module whose path equals them or ends with "." + them). Every entry must match."""
    model = _unwrap(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n]
    found: list[str] = []
    for t in _target_list(targets):
        hit = [n for n in linears if n == t or n.endswith("." + t)]
        if not hit:
            raise ValueError(f"LoRA target {t!r} matches no Linear layer of the model; presets are "
                             f"{sorted(TARGET_PRESETS)}, or name module paths such as 'blocks.0.attn.qkv'")
        found += [n for n in hit if n not in found]
    return sorted(found, key=linears.index)


def add_lora(model: torch.nn.Module, rank: int = 16, alpha: Optional[float] = None, dropout: float = 0.0,
             targets: Targets = "attn", init: Union[bool, str] = True, seed: Optional[int] = None) -> torch.nn.Module:
    """Inject LoRA layers (peft `inject_adapter_in_model`) in place and freeze everything else;
    returns the same model. alpha defaults to rank (scale 1). peft's default init leaves B = 0, so
    the model is unchanged until trained. The settings are kept as `model.oboro_lora`. With `seed`,
    peft's random init of A draws from that seed (CPU and the model's CUDA devices, global RNG state
    restored after), not from whatever the global RNG holds: the same run seed is the same LoRA."""
    from peft import LoraConfig

    def config(modules, alpha):
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, bias="none",
                          init_lora_weights=init)
    return inject_seeded(model, config, rank, alpha, dropout, targets, seed, "LoRA")


def inject_seeded(model: torch.nn.Module, make_config, rank: int, alpha: Optional[float], dropout: float,
                  targets: Targets, seed: Optional[int], kind: str, **record) -> torch.nn.Module:
    """What every adapter kind shares: checked settings, resolved targets, peft's injection with its
    random init drawn from `seed` (global RNG restored after; None: from the global RNG), and the
    `model.oboro_lora` record (plus `record`). make_config(modules, alpha) -> the peft config."""
    from peft import inject_adapter_in_model
    if rank < 1:
        raise ValueError(f"{kind} rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{kind} dropout must be in [0, 1), got {dropout}")
    alpha = float(rank if alpha is None else alpha)
    base = _unwrap(model)
    if getattr(base, "peft_config", None):
        raise ValueError(f"the model already has a {kind} adapter; merge_lora() it or start from the base model")
    modules = resolve_targets(base, targets)
    config = make_config(modules, alpha)
    cuda = sorted({p.device.index or 0 for p in base.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter_in_model(config, base, adapter_name=ADAPTER)
    base.oboro_lora = {"rank": rank, "alpha": alpha, "dropout": dropout, **record,
                       "targets": targets if isinstance(targets, str) else list(targets), "modules": modules}
    return model


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{module path: peft LoraLayer} of the adapter, wrapper prefixes removed."""
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in _unwrap(model).named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def lora_state_dict(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The adapter in ComfyUI's generic LoRA format (CPU tensors; `dtype` casts up/down only)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (call add_lora first)")
    sd = {}
    for name, m in layers.items():
        down, up = m.lora_A[ADAPTER].weight.detach(), m.lora_B[ADAPTER].weight.detach()
        key = COMFY_PREFIX + name
        sd[f"{key}.lora_down.weight"] = down.to("cpu", dtype or down.dtype).contiguous().clone()
        sd[f"{key}.lora_up.weight"] = up.to("cpu", dtype or up.dtype).contiguous().clone()
        # ComfyUI scales by alpha / down.shape[0]; this alpha reproduces peft's scaling (also rsLoRA).
        sd[f"{key}.alpha"] = torch.tensor(float(m.scaling[ADAPTER]) * down.shape[0], dtype=torch.float32)
    return sd


def lora_metadata(model: torch.nn.Module) -> dict[str, str]:
    base = _unwrap(model)
    info = dict(getattr(base, "oboro_lora", None) or {})
    meta = {LORA_META_KEY: json.dumps(info, sort_keys=True)}
    if "rank" in info:  # the fields LoRA tools (kohya-style) display
        meta.update(ss_network_dim=str(info["rank"]), ss_network_alpha=str(info["alpha"]))
    config = getattr(base, "config", None)
    if hasattr(config, "to_json"):
        meta[BASE_CONFIG_KEY] = config.to_json()
    return meta


def save_lora(path, model: torch.nn.Module, metadata: Optional[Mapping[str, str]] = None,
              dtype: Optional[torch.dtype] = None) -> Path:
    """Write lora_state_dict(model) atomically (temp file + rename) as safetensors. The header holds
    `oboro_lora` (rank, alpha, dropout, targets, module paths as JSON), `oboro_base_config` (the
    base model's OboroConfig JSON) and the caller's `metadata`."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(lora_metadata(model))
    return save_safetensors(path, lora_state_dict(model, dtype), meta)


def load_lora(model: torch.nn.Module, path, dropout: Optional[float] = None) -> torch.nn.Module:
    """Inject the adapter a save_lora() file describes into the (base) model and load its weights,
    e.g. to continue training it or to merge it."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if LORA_META_KEY not in meta:
        raise ValueError(f"{path}: no {LORA_META_KEY!r} header; not a LoRA written by save_lora")
    info = json.loads(meta[LORA_META_KEY])
    if info.get("adapter", "lora") != "lora":
        raise ValueError(f"{path}: a {info['adapter']} adapter; load_lora reads plain LoRAs only")
    add_lora(model, info["rank"], info["alpha"], info["dropout"] if dropout is None else dropout, info["modules"])
    _unwrap(model).oboro_lora["targets"] = info["targets"]
    layers = lora_layers(model)
    with torch.no_grad():
        for name, m in layers.items():
            key = COMFY_PREFIX + name
            m.lora_A[ADAPTER].weight.copy_(sd[f"{key}.lora_down.weight"])
            m.lora_B[ADAPTER].weight.copy_(sd[f"{key}.lora_up.weight"])
    return model


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapter into the base weights (peft's merge) and put the plain Linear layers back,
    so the model has its original state-dict keys again (save_checkpoint works). In place."""
    base = _unwrap(model)
    for name, m in lora_layers(base).items():
        m.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent_name) if parent_name else base, child, m.get_base_layer())
    for attr in ("peft_config", "oboro_lora"):
        if hasattr(base, attr):
            delattr(base, attr)
    return model
