"""Optional inputs of OboroTrainLoRA / OboroTrainFull added after `overwrite` (saved workflows map
widget values by position, so new inputs only ever go at the end): adapter kind, extra weighted
caches and a regularization cache, masked loss. The engine reads them (oboro_model/training)."""
from __future__ import annotations

from comfy_api.latest import io

from ..oboro_model.training.adapters import ADAPTERS


def after_overwrite(kind: str) -> list:
    lora = [
        io.Combo.Input("adapter", options=list(ADAPTERS), default="lora", optional=True,
                       tooltip="lora; loha (Hadamard product of two low-rank pairs); lokr (Kronecker product); "
                               "dora (LoRA + per-row magnitude). All load with core LoraLoaderModelOnly."),
    ] if kind == "lora" else []
    return lora
