"""Optional inputs of OboroTrainLoRA / OboroTrainFull added after `overwrite` (saved workflows map
widget values by position, so new inputs only ever go at the end): adapter kind, extra weighted
caches and a regularization cache, masked loss. The engine reads them (oboro_model/training)."""
from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..oboro_model.training.adapters import ADAPTERS
from ..oboro_model.training.datasets import DataSource, has_loss_masks, open_training_data, parse_source_lines


def after_overwrite(kind: str) -> list:
    lora = [
        io.Combo.Input("adapter", options=list(ADAPTERS), default="lora", optional=True,
                       tooltip="lora; loha (Hadamard product of two low-rank pairs); lokr (Kronecker product); "
                               "dora (LoRA + per-row magnitude). All load with core LoraLoaderModelOnly."),
    ] if kind == "lora" else []
    return lora + [
        io.String.Input("extra_caches", default="", multiline=True, optional=True,
                        tooltip="More latent caches to train on, one per line: 'path [weight [repeats]]' (path "
                                "absolute or under output/oboro_cache). A source's share of the steps is "
                                "weight x repeats x items; repeats default to N of a folder named N_name."),
        io.String.Input("reg_cache", default="", optional=True,
                        tooltip="Regularization (prior-preservation) cache: drawn as often as all training "
                                "data together (kohya), its loss multiplied by reg_weight. Empty: none."),
        io.Float.Input("reg_weight", default=1.0, min=0.0, max=100.0, step=0.01, optional=True,
                       tooltip="Loss weight of regularization samples (kohya prior_loss_weight)."),
        io.Boolean.Input("masked_loss", default=False, optional=True,
                         tooltip="Weigh the loss by the loss masks stored in the cache (OboroCacheLatents mask_dir "
                                 "or alpha_mask): masked-out regions teach nothing."),
    ]


def _cache_path(p: str) -> str:
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else Path(folder_paths.get_output_directory()) / "oboro_cache" / path)


def training_data(cache, cache_dir: str, inputs: dict, open_cache, node: str):
    """The run's dataset: `cache` (the opened cache_dir) alone, or a MixedData with extra_caches and
    reg_cache (each opened by `open_cache(path)`, which checks it fits the model)."""
    sources = [DataSource(cache_dir)] + [DataSource(_cache_path(s.path), s.weight, s.repeats)
                                         for s in parse_source_lines(inputs.get("extra_caches") or "", node)]
    if (inputs.get("reg_cache") or "").strip():
        sources.append(DataSource(_cache_path(inputs["reg_cache"].strip()),
                                  loss_weight=float(inputs.get("reg_weight", 1.0)), reg=True))
    data = open_training_data(sources, lambda p: cache if p == cache_dir else open_cache(p))
    if inputs.get("masked_loss") and not has_loss_masks(data):
        raise ValueError(f"{node}: masked_loss is on but no cache of this run stores loss masks; rebuild the cache "
                         "with OboroCacheLatents' mask_dir (or alpha_mask)")
    return data
