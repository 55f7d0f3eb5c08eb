"""Training data for oboro (paper section IV-A): captioned image folders, resolution policies and
aspect buckets, and the latent cache the Trainer reads. Pure PIL / numpy / torch; no ComfyUI."""
from .buckets import AREA_TOLERANCE, area_buckets, bucket_groups, nearest_bucket
from .cache import (LatentCache, ScaleShift, build_cache, default_latent_transform, item_hash, latent_transform,
                    read_manifest)
from .dataset import POLICIES, BucketBatchSampler, OboroDataset, crop_box
from .sources import QUALITY_TAGS, quality_tag, scan, to_rgb

__all__ = ["AREA_TOLERANCE", "area_buckets", "bucket_groups", "nearest_bucket", "LatentCache", "ScaleShift",
           "build_cache", "default_latent_transform", "item_hash", "latent_transform",
           "read_manifest", "POLICIES", "BucketBatchSampler", "OboroDataset", "crop_box", "QUALITY_TAGS",
           "quality_tag", "scan", "to_rgb"]
