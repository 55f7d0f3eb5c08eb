"""Image-caption datasets with the paper's resolution recipe (section IV-A) and bucketed batching.

Policies:
  stage1_256   short side -> `size` (256), then a random `size` x `size` crop.
  stage2_area  aspect buckets of about `area` pixels (512 x 512), aspect <= `max_aspect` (1.3),
               sides multiples of `multiple` (64); each image goes to the bucket of closest
               aspect, is resized to cover it and cropped (centre by default).
  fixed        every image resized to cover `size` = (w, h) (or size x size) and cropped (centre).
Crops are seeded: item i in epoch e always gets the same crop for the same seed, so latent caches
stay valid across runs; `set_epoch` gives new random crops for on-the-fly training.
"""
from __future__ import annotations

import hashlib
import math
import random
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from .buckets import AREA_TOLERANCE, area_buckets, bucket_groups, nearest_bucket
from .sources import Entry, open_image, scan

POLICIES = ("stage1_256", "stage2_area", "fixed")
CROPS = ("random", "center")
DEFAULT_CROP = {"stage1_256": "random", "stage2_area": "center", "fixed": "center"}


def crop_box(src: tuple[int, int], target: tuple[int, int], mode: str, rng: random.Random) -> tuple[int, int, int, int]:
    """The largest box of the target's aspect inside src (resize-to-cover then crop, in source
    pixels), placed at random or centred."""
    (w, h), (tw, th) = src, target
    if w * th > h * tw:  # source is wider than the target: full height
        bw, bh = min(w, max(1, round(h * tw / th))), h
    else:
        bw, bh = w, min(h, max(1, round(w * th / tw)))
    if mode == "random":
        x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
    else:
        x, y = (w - bw) // 2, (h - bh) // 2
    return x, y, x + bw, y + bh


class OboroDataset(torch.utils.data.Dataset):
    """A folder of images with captions -> {"pixels": [3,H,W] float in [0,1], "caption": str,
    "file": str, "bucket": (w, h)}. Captions come from metadata.jsonl / metadata.csv rows
    (file_name + text, optional score column) or a sidecar `<stem>.txt`; every image is decoded
    once at construction and anything unusable is listed in `self.report` ({file, reason})
    instead of failing later. With `score_column`, captions get the paper's quality tag
    (see sources.QUALITY_TAGS) and images scoring below 4 are dropped (and reported). `exclude`:
    relative paths skipped and reported (an exclusion list from OboroDedupDataset)."""

    def __init__(self, root, policy: str = "stage1_256", size: Union[int, tuple[int, int]] = 256,
                 area: int = 512 * 512, max_aspect: float = 1.3, multiple: int = 64,
                 score_column: Optional[str] = None, seed: int = 0, crop: Optional[str] = None,
                 area_tolerance: float = AREA_TOLERANCE, exclude: Optional[set[str]] = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
        crop = crop or DEFAULT_CROP[policy]
        if crop not in CROPS:
            raise ValueError(f"unknown crop {crop!r}; choose one of {CROPS}")
        self.root, self.policy, self.crop, self.seed, self.epoch = str(root), policy, crop, int(seed), 0
        self.score_column = score_column or None
        if policy == "stage2_area":
            self.buckets = area_buckets(area, max_aspect, multiple, area_tolerance)
            self._settings = {"area": int(area), "max_aspect": float(max_aspect), "multiple": int(multiple),
                              "area_tolerance": float(area_tolerance)}
        else:
            w, h = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
            if w <= 0 or h <= 0:
                raise ValueError(f"size must be positive, got {size}")
            self.buckets = [(w, h)]
            self._settings = {"size": [w, h]}
        self.entries: list[Entry]
        self.entries, self.report = scan(root, self.score_column, exclude)
        self.bucket_ids = [self.bucket_index(e.size) for e in self.entries]

    def bucket_index(self, size: tuple[int, int]) -> int:
        return 0 if len(self.buckets) == 1 else self.buckets.index(nearest_bucket(*size, self.buckets))

    def settings(self) -> dict:
        """Everything besides the image, its caption and its bucket that decides an item's pixels."""
        return {"policy": self.policy, **self._settings, "crop": self.crop, "seed": self.seed,
                "score_column": self.score_column}

    def source(self, i: int) -> dict:
        """What identifies item i's content without decoding it (used by the latent cache), plus its
        caption's sha256 and the provenance fields its data gives (licence, consent, source, author;
        absent when not given), which the cache records (oboro_model/provenance.py)."""
        e = self.entries[i]
        return {"file": e.file, "image_sha256": e.sha256, "caption": e.caption, "bucket": list(self.bucket_of(i)),
                "caption_sha256": hashlib.sha256(e.caption.encode("utf-8")).hexdigest(),
                **{k: v for k, v in e.provenance.items() if v is not None}}

    def set_epoch(self, epoch: int) -> None:
        """Random crops are drawn from (seed, epoch, file); caches use epoch 0."""
        self.epoch = int(epoch)

    def bucket_of(self, i: int) -> tuple[int, int]:
        return self.buckets[self.bucket_ids[i]]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        tw, th = bucket = self.bucket_of(i)
        with open(e.path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != e.sha256:  # keeps cache hashes honest
            raise RuntimeError(f"{e.file} changed since the dataset was scanned; scan it again")
        img = open_image(data)
        rng = random.Random(f"{self.seed}/{self.epoch}/{e.file}")
        img = img.resize((tw, th), Image.Resampling.LANCZOS, box=crop_box(img.size, bucket, self.crop, rng))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return {"pixels": pixels, "caption": e.caption, "file": e.file, "bucket": bucket}


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices that all share one bucket (so they stack), for any dataset with
    `bucket_of(i)` (OboroDataset, LatentCache). Each epoch shuffles every bucket's indices and the
    order of the batches with random.Random(f"{seed}/{epoch}"): the same seed and epoch give the
    same batches. The epoch advances by one after each complete pass; `set_epoch` sets it.
    Without drop_last, a bucket's last batch may be smaller. (For a DataLoader; the Trainer draws
    whole steps from one bucket itself, see oboro_model/training/batching.py.)"""

    def __init__(self, dataset, batch_size: int, seed: int = 0, drop_last: bool = False, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.drop_last, self.shuffle, self.epoch = batch_size, seed, drop_last, shuffle, 0
        self.groups = bucket_groups(dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self, epoch: int) -> list[list[int]]:
        rng, out = random.Random(f"{self.seed}/{epoch}"), []
        for group in self.groups:
            idx = list(group)
            if self.shuffle:
                rng.shuffle(idx)
            for s in range(0, len(idx), self.batch_size):
                if len(idx) - s >= self.batch_size or not self.drop_last:
                    out.append(idx[s:s + self.batch_size])
        if self.shuffle:
            rng.shuffle(out)
        return out

    def __iter__(self):
        epoch = self.epoch
        yield from self.batches(epoch)
        self.epoch = epoch + 1

    def __len__(self) -> int:
        r = (lambda n: n // self.batch_size) if self.drop_last else (lambda n: math.ceil(n / self.batch_size))
        return sum(r(len(v)) for v in self.groups)
