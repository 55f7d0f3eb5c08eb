"""Loss masks for masked training: a per-image weight map that goes through the same crop and
resize as its image and is stored in the latent cache at latent resolution.

Where a mask comes from (first that exists):
  1. `mask_dir`/<image path relative to the dataset folder>, or the same with suffix .png: the
     layout OboroTrainMaskAdapter reads. Mode P / I / I;16 (label maps): label > 0 -> 1, 0 -> 0.
     Any other mode (L, RGB, LA, ...): its greyscale value / 255 (white = learn, black = ignore).
     A mask of another size than its image is first resized to it (bilinear).
  2. with `alpha`: the image's own alpha channel / 255 (transparent = ignore).
  3. none: the item weighs 1 everywhere (its manifest entry has no "loss_mask").
The weight map is cropped with the image's crop box (same seed, epoch and file as the image's draw)
and resized to the bucket bilinearly, then build_cache averages it down to the latent grid (area).
An item's "loss_mask" in the manifest is the mask file's sha256 (or "alpha"); it enters the item
hash, so editing a mask re-encodes exactly that item.
"""
from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from .dataset import crop_box

LABEL_MODES = ("P", "I", "I;16", "I;16B", "I;16L")


def mask_weights(img: Image.Image) -> np.ndarray:
    """A mask image as float weights in [0, 1] (see the module docstring)."""
    if img.mode in LABEL_MODES:
        return (np.asarray(img) > 0).astype(np.float32)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def alpha_weights(img: Image.Image) -> Optional[np.ndarray]:
    """The alpha channel / 255, or None for an image without transparency."""
    if img.mode in ("P", "L", "RGB") and "transparency" not in img.info:
        return None
    if img.mode not in ("RGBA", "LA", "PA", "P", "L", "RGB", "RGBa", "La"):
        return None
    return np.asarray(img.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0


class LossMasked(torch.utils.data.Dataset):
    """An OboroDataset whose items also carry "loss_mask" [1, H, W] (pixel resolution, after the
    image's crop and resize) and whose source(i) names the mask ("loss_mask": sha256 or "alpha"),
    for build_cache. Everything else is the wrapped dataset's."""

    def __init__(self, dataset, mask_dir=None, alpha: bool = False):
        self.dataset, self.alpha = dataset, bool(alpha)
        self.mask_dir = Path(mask_dir) if mask_dir else None
        if self.mask_dir is not None and not self.mask_dir.is_dir():
            raise FileNotFoundError(f"mask folder not found: {self.mask_dir}")
        self._kind = [self._find(i) for i in range(len(dataset))]

    def __getattr__(self, name):  # root, report, buckets, settings(), bucket_of(), set_epoch() ...
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def mask_file(self, i: int) -> Optional[Path]:
        if self.mask_dir is None:
            return None
        rel = self.dataset.entries[i].file
        return next((p for p in (self.mask_dir / rel, (self.mask_dir / rel).with_suffix(".png")) if p.is_file()),
                    None)

    def _find(self, i: int) -> Optional[str]:
        p = self.mask_file(i)
        if p is not None:
            return hashlib.sha256(p.read_bytes()).hexdigest()
        if self.alpha:
            with Image.open(self.dataset.entries[i].path) as img:
                if alpha_weights(img) is not None:
                    return "alpha"
        return None

    def counts(self) -> dict:
        return {"mask_file": sum(k not in (None, "alpha") for k in self._kind),
                "alpha": sum(k == "alpha" for k in self._kind), "none": sum(k is None for k in self._kind)}

    def source(self, i: int) -> dict:
        src = dict(self.dataset.source(i))
        if self._kind[i] is not None:
            src["loss_mask"] = self._kind[i]
        return src

    def weights(self, i: int) -> Optional[torch.Tensor]:
        """[1, H, W] weights at the item's bucket size, cropped like the image; None: no mask."""
        kind, e, ds = self._kind[i], self.dataset.entries[i], self.dataset
        if kind is None:
            return None
        with open(e.path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            image = ImageOps.exif_transpose(im)
        if kind == "alpha":
            w = alpha_weights(image)
        else:
            with Image.open(self.mask_file(i)) as m:
                m.load()
                m = ImageOps.exif_transpose(m)
                w = mask_weights(m)
        wimg = Image.fromarray(w, "F")
        if wimg.size != image.size:
            wimg = wimg.resize(image.size, Image.Resampling.BILINEAR)
        bucket = tuple(ds.bucket_of(i))
        rng = random.Random(f"{ds.seed}/{ds.epoch}/{e.file}")  # the image's crop draw (dataset.py)
        box = crop_box(image.size, bucket, ds.crop, rng)
        wimg = wimg.resize(bucket, Image.Resampling.BILINEAR, box=box)
        return torch.from_numpy(np.asarray(wimg, dtype=np.float32).copy()).clamp_(0.0, 1.0)[None]

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        w = self.weights(i)
        if w is not None:
            item["loss_mask"] = w
        return item


def to_latent_grid(weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[1, H, W] pixel weights -> [h, w] by area averaging (what a latent position covers)."""
    return torch.nn.functional.interpolate(weights[None].float(), size=tuple(size), mode="area")[0, 0].contiguous()
