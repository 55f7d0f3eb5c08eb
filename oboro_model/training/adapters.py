"""Adapter kinds beyond plain LoRA (LoHa, LoKr, DoRA) through `peft`, exported in the key formats
ComfyUI's core weight adapters (comfy/weight_adapter/{lora,loha,lokr}.py) apply to our MODEL, so
LoraLoaderModelOnly gives the training-time velocity.

    kind   peft                         file keys (diffusion_model.<module path>.*)
    lora   LoraConfig                   lora_down.weight, lora_up.weight, alpha      (lora.py)
    loha   LoHaConfig                   hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, alpha
    lokr   LoKrConfig                   lokr_w1 | lokr_w1_a+b, lokr_w2 | lokr_w2_a+b (scale folded in)
    dora   LoraConfig(use_dora=True)    lora_down/up, alpha, dora_scale [out, 1]

Scales. peft multiplies every delta by alpha / r. Core LoHa divides the stored alpha by
hada_w1_b.shape[0], so alpha = scaling * that. Core LoKr divides by the rank of whichever factor is
decomposed and uses 1 when neither is (peft keeps w2 whole when r >= half its side), so the scale
is folded into w1 and no alpha is written: core's factor is then 1 in every case.

DoRA. peft: W' = m * (W + s BA) / ||W + s BA|| (norm of each output row, of the adapted weight).
Core (weight_decompose, a dora_scale whose first dim is out_features): W' = dora_scale * (W + s BA)
/ (||W|| + eps), the norm of the weight it patches, not of the adapted one. We export
dora_scale = m * ||W|| / ||W + s BA||, computed against the base the adapter was trained on: core
then reproduces peft exactly at strength 1 (other strengths interpolate W .. W', as core does for
every DoRA file). On a different base (another checkpoint, other LoRAs applied first) the folded
magnitude is that base's row norms off, as any DoRA is when moved. `dropout` is peft's input
dropout for lora / dora and LyCORIS' rank dropout for loha / lokr; all act in training only.
DoRA on an fp8 frozen base (plain fp8_e4m3fn / fp8_e5m2, or scaled fp8): peft's DoRA reads the base
weight itself (its row norms, W + sBA), which torch cannot do in fp8 (no fp8 type promotion), and it
would miss a scaled layer's factor; add_adapter dequantises each targeted fp8 layer to bf16 (times
its scale) first. Only the targeted layers widen; the others keep fp8.
Imports no ComfyUI.
"""
from __future__ import annotations

from typing import Optional

import torch

from .lora import (ADAPTER, COMFY_PREFIX, Targets, _unwrap, add_lora, inject_seeded, lora_metadata, lora_state_dict,
                   resolve_targets)
from ..atomic import save_safetensors

ADAPTERS = ("lora", "loha", "lokr", "dora")
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
DORA_BASE_DTYPE = torch.bfloat16  # what an fp8 base layer is dequantised to for DoRA


def widen_fp8_targets(model: torch.nn.Module, targets: Targets) -> list[str]:
    """Dequantise the fp8 weights (times a scaled layer's `weight_scale`) of the Linear layers
    `targets` selects to DORA_BASE_DTYPE, in place, frozen; returns their paths."""
    base, done = _unwrap(model), []
    for name in resolve_targets(base, targets):
        m = base.get_submodule(name)
        if m.weight.dtype not in FP8:
            continue
        with torch.no_grad():
            w = m.weight.float()
            scale = getattr(m, "weight_scale", None)
            if scale is not None:
                w = w * scale.to(device=w.device, dtype=torch.float32)
                m.weight_scale = None
            m.weight = torch.nn.Parameter(w.to(DORA_BASE_DTYPE), requires_grad=False)
        done.append(name)
    return done


def adapter_kind(model: torch.nn.Module) -> str:
    return (getattr(_unwrap(model), "oboro_lora", None) or {}).get("adapter", "lora")


def add_adapter(model: torch.nn.Module, kind: str = "lora", rank: int = 16, alpha: Optional[float] = None,
                dropout: float = 0.0, targets: Targets = "attn", seed: Optional[int] = None) -> torch.nn.Module:
    """Inject an adapter of `kind` in place (base frozen); as lora.add_lora, whose seeding and
    `model.oboro_lora` record (plus "adapter": kind) it shares. Every kind starts as a no-op."""
    if kind not in ADAPTERS:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {ADAPTERS}")
    if kind == "lora":
        add_lora(model, rank, alpha, dropout, targets, seed=seed)
        _unwrap(model).oboro_lora["adapter"] = kind
        return model
    from peft import LoHaConfig, LoKrConfig, LoraConfig
    if kind == "dora":  # peft's DoRA needs the base weight in a type torch can compute with
        widen_fp8_targets(model, targets)

    def config(modules, alpha):
        if kind == "dora":
            return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, bias="none",
                              use_dora=True)
        make = LoHaConfig if kind == "loha" else LoKrConfig
        return make(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=modules)
    return inject_seeded(model, config, rank, alpha, dropout, targets, seed, kind, adapter=kind)


def _layers(model: torch.nn.Module, attr: str) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in _unwrap(model).named_modules()
            if hasattr(m, "get_base_layer") and ADAPTER in getattr(m, attr, {})}


def _cpu(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t.detach().to("cpu", dtype or t.dtype).contiguous().clone()


def adapter_state_dict(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The trained adapter in the key format of its kind that core ComfyUI applies (see above)."""
    kind = adapter_kind(model)
    if kind == "lora":
        return lora_state_dict(model, dtype)
    sd: dict[str, torch.Tensor] = {}
    if kind == "loha":
        layers = _layers(model, "hada_w1_a")
        for name, m in layers.items():
            key, w = COMFY_PREFIX + name, {s: getattr(m, s)[ADAPTER] for s in
                                           ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
            sd.update({f"{key}.{s}": _cpu(v, dtype) for s, v in w.items()})
            sd[f"{key}.alpha"] = torch.tensor(float(m.scaling[ADAPTER]) * w["hada_w1_b"].shape[0])
    elif kind == "lokr":
        layers = {**_layers(model, "lokr_w1"), **_layers(model, "lokr_w1_a")}
        for name, m in layers.items():
            key, s = COMFY_PREFIX + name, float(m.scaling[ADAPTER])
            with torch.no_grad():
                if ADAPTER in m.lokr_w1:
                    sd[f"{key}.lokr_w1"] = _cpu(m.lokr_w1[ADAPTER] * s, dtype)
                else:
                    sd[f"{key}.lokr_w1_a"] = _cpu(m.lokr_w1_a[ADAPTER] * s, dtype)
                    sd[f"{key}.lokr_w1_b"] = _cpu(m.lokr_w1_b[ADAPTER], dtype)
            if ADAPTER in m.lokr_t2:
                raise ValueError(f"{name}: LoKr Tucker factors (conv layers) are not exported")
            if ADAPTER in m.lokr_w2:
                sd[f"{key}.lokr_w2"] = _cpu(m.lokr_w2[ADAPTER], dtype)
            else:
                sd[f"{key}.lokr_w2_a"] = _cpu(m.lokr_w2_a[ADAPTER], dtype)
                sd[f"{key}.lokr_w2_b"] = _cpu(m.lokr_w2_b[ADAPTER], dtype)
    else:  # dora
        sd = lora_state_dict(model, dtype)
        layers = _layers(model, "lora_magnitude_vector")
        for name, m in layers.items():
            with torch.no_grad():
                base = m.get_base_layer()
                w = base.weight.double()
                if getattr(base, "weight_scale", None) is not None:  # a scaled-fp8 frozen base
                    w = w * base.weight_scale.double()
                delta = m.lora_B[ADAPTER].weight.double() @ m.lora_A[ADAPTER].weight.double()
                adapted = w + float(m.scaling[ADAPTER]) * delta
                mag = m.lora_magnitude_vector[ADAPTER].weight.double()
                folded = mag * w.norm(dim=1) / adapted.norm(dim=1)
            sd[f"{COMFY_PREFIX}{name}.dora_scale"] = _cpu(folded.float()[:, None], dtype)
    if not layers:
        raise ValueError(f"the model has no {kind} layers (call add_adapter first)")
    return sd


def save_adapter(path, model: torch.nn.Module, metadata: Optional[dict] = None,
                 dtype: Optional[torch.dtype] = None):
    """Atomic safetensors of adapter_state_dict(model) with lora.save_lora's header (the
    `oboro_lora` record says the kind)."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(lora_metadata(model))
    return save_safetensors(path, adapter_state_dict(model, dtype), meta)
