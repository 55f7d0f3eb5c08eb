"""A LoRA's frozen base kept in its storage dtype (bf16, fp16, fp8, scaled fp8), as kohya's
`--fp8_base` and other trainers do, instead of an fp32 copy of the whole model.

Only the adapter trains, so the base's Linear weights need no gradient, no optimiser state and no
fp32 master copy: each layer casts its weight to the compute dtype (autocast's, else the input's)
for its own matmul and drops the cast right after. Casting up is exact, so a bf16 or fp8 base
trained at fp32 gives the same numbers as the fp32 copy did, with a quarter or an eighth of the
weight memory. Norm gains, biases and other small parameters stay fp32.

    net = frozen_base_model(config, state_dict)        # Linear weights as stored, the rest fp32
    add_lora(net, ...)                                  # peft wraps CastLinear like nn.Linear
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import check_state_dict
from ..config import OboroConfig
from ..model import MMHDiT

STORAGE_DTYPES = {"stored": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                  "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _cast(w: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    w = w.to(dtype)
    return w if scale is None else w * scale.to(device=w.device, dtype=dtype)


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen, narrowly stored W: backward re-casts W instead of keeping the
    wide copy alive (F.linear would save it for grad_x: a whole wide model over a forward pass)."""

    @staticmethod
    def forward(ctx, x, w, scale, b):
        ctx.save_for_backward(w, scale)
        return F.linear(x, _cast(w, scale, x.dtype), b)

    @staticmethod
    def backward(ctx, grad):
        w, scale = ctx.saved_tensors
        return grad @ _cast(w, scale, grad.dtype), None, None, None


class CastLinear(nn.Linear):
    """nn.Linear whose weight may be stored in a narrower dtype than it computes in (the
    autocast dtype, else the input's); `weight_scale` (a plain attribute, not state) dequantises
    scaled-fp8 weights. Trainable weights take the plain path."""
    weight_scale: Optional[torch.Tensor] = None
    compute_dtype = torch.float32  # peft creates adapters in this dtype (its hook for quantised bases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        w, scale, b = self.weight, self.weight_scale, self.bias
        if w.dtype == dt and scale is None:
            return F.linear(x, w, b)
        if w.requires_grad or (b is not None and b.requires_grad):
            return F.linear(x, _cast(w, scale, dt), b)
        with torch.autocast(dev, enabled=False):  # the cast above is autocast's, done by hand
            return _FrozenLinear.apply(x.to(dt), w, scale, None if b is None else b.to(dt))


class StorageOps:
    """`operations` for MMHDiT: torch.nn with CastLinear (the model's own injection seam)."""
    Linear = CastLinear
    RMSNorm = nn.RMSNorm
    LayerNorm = nn.LayerNorm


def linear_weight_keys(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def frozen_base_model(config: OboroConfig, sd: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
                      scales: Optional[Mapping[str, torch.Tensor]] = None, name: str = "state dict") -> MMHDiT:
    """An MMHDiT (StorageOps) holding `sd` without an fp32 copy: Linear weights in `dtype`
    (None: as given, aliased when already that dtype), every other tensor fp32. `scales` maps a
    Linear weight key to its scaled-fp8 factor. Train it as a LoRA base only: AdamW cannot
    update narrow weights, so nothing but the adapter may require grad."""
    with torch.device("meta"):
        net = MMHDiT(config, operations=StorageOps)
    check_state_dict(net, sd, name)
    keep = linear_weight_keys(net)
    out = {}
    for k, v in sd.items():
        if k not in keep:
            v = v.float()
        elif dtype is not None and v.dtype != dtype:
            if scales and k in scales:  # re-quantising a scaled weight: dequantise first
                v = v.float() * scales[k].float()
            v = v.to(dtype)
        out[k] = v
    net.load_state_dict(out, strict=True, assign=True)
    for k, s in (scales or {}).items():
        if dtype is None or sd[k].dtype == dtype:
            net.get_submodule(k.rsplit(".", 1)[0]).weight_scale = s.float()
    return net


def storage_dtype(name: str) -> Optional[torch.dtype]:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"base_dtype {name!r}: choose one of {sorted(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[name]


def linear_dtype(model: nn.Module) -> torch.dtype:
    """The storage dtype of the model's block Linear weights (what a LoRA base keeps)."""
    return next(m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear))
