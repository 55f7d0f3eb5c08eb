"""What every training front end (OboroTrainLoRA / OboroTrainFull / OboroTrainMaskAdapter and
scripts/oboro-train, in one process or under `accelerate launch`) shares, so that the same cache
and settings give the same weights whichever one runs: opening the cache (the one reader, with
its recorded latent transform and empty prompt), checking it fits the model, the seeded LoRA
injection, and building the Trainer."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..data import LatentCache
from .trainer import LocalProcess, Trainer, TrainConfig

logger = logging.getLogger(__name__)
LORA_TARGETS = ("attn", "mlp", "all")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to train instead of all weights ([lora] in CONFIG.toml, the LoRA node's inputs)."""
    rank: int = 16
    alpha: Optional[float] = None      # None: rank (scale 1)
    dropout: float = 0.0
    targets: Union[str, tuple] = "attn"  # attn | mlp | all | module paths or suffixes
    base_dtype: str = "stored"         # the frozen base's storage dtype (frozen_base.STORAGE_DTYPES)
    adapter: str = "lora"              # lora | loha | lokr | dora (adapters.py)


def open_cache(path, transform="manifest", what: str = "training") -> LatentCache:
    """The latent cache at `path` (an OboroCacheLatents / build_cache folder) with its recorded
    latent transform applied (transform="manifest"), or a caller's callable."""
    cache = LatentCache(path, transform=transform)
    if len(cache) == 0:
        raise ValueError(f"{what}: the latent cache {cache.folder} is empty")
    return cache


def check_cache_fits(cache: LatentCache, config, what: str = "training") -> None:
    """Clear error when the cache was encoded with another VAE / T5 than the model expects."""
    it = cache.items[0]
    channels = int(it["latent_shape"][0])
    first = cache[0]
    if channels != config.in_channels or first["text"].shape[-1] != config.text_dim:
        raise ValueError(f"{what}: the cache {cache.folder} holds {channels}-channel latents and "
                         f"{first['text'].shape[-1]}-wide text states; this model takes {config.in_channels} and "
                         f"{config.text_dim} (same VAE and T5 as the model?)")


def add_seeded_lora(model: torch.nn.Module, spec: LoraSpec, seed: int) -> torch.nn.Module:
    """Inject `spec` with its random init drawn from `seed` (the global RNG is left as it was), so
    every front end starts a LoRA run from the same weights."""
    from .adapters import add_adapter
    return add_adapter(model, spec.adapter, spec.rank, spec.alpha, spec.dropout, spec.targets, seed=seed)


def build_trainer(model: torch.nn.Module, cache, config: TrainConfig, lora: Optional[LoraSpec] = None,
                  empty: Optional[tuple] = None, dist: Optional[LocalProcess] = None,
                  validation_cache=None) -> Trainer:
    """A Trainer over `cache` (LatentCache, or a dataset wrapping one): `lora` injected first
    (seeded by config.seed), caption dropout onto `empty` = (text, mask) or, by default, the
    cache's stored empty prompt (none stored: no tokens). Validation (validation.py) on
    `validation_cache`, or on config.validation_split of `cache` held out (not trained on)."""
    if lora is not None:
        add_seeded_lora(model, lora, config.seed)
    if empty is None:
        src = getattr(cache, "cache", cache)  # MaskedLatents wraps a LatentCache
        empty = (getattr(src, "empty_text", None), getattr(src, "empty_mask", None))
        if empty[0] is None and config.caption_dropout > 0:
            logger.warning("the cache stores no empty-prompt encoding (written by an older version): dropped "
                           "captions become no tokens. Rebuild it with OboroCacheLatents to store T5(\"\").")
    val = validation_cache
    if config.validation_split > 0:
        if val is not None:
            raise ValueError("give either validation_split (a fraction of the training cache) or a validation "
                             "cache, not both")
        from .validation import split_holdout
        cache, val = split_holdout(cache, config.validation_split, config.validation_seed)
        logger.info("validation: %d of %d items held out (validation_seed %d)", len(val), len(val) + len(cache),
                    config.validation_seed)
    return Trainer(model, cache, config, empty_text=empty[0], empty_mask=empty[1], dist=dist, validation=val)

