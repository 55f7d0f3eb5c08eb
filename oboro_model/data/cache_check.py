"""Readable failures for a damaged latent cache: a manifest item without the fields the reader
needs, or a shard that cannot be read, is reported with the file, the item and the key, not as a
bare KeyError or a safetensors error that names nothing."""
from __future__ import annotations

from pathlib import Path

ITEM_FIELDS = ("file", "caption", "bucket", "shard", "key")


class CacheError(ValueError):
    """A latent cache could not be read; the message names the file, item and key."""


def check_items(manifest_path: Path, items) -> None:
    if not isinstance(items, list):
        raise CacheError(f"{manifest_path}: 'items' must be a list, got {type(items).__name__}")
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise CacheError(f"{manifest_path}: item {i} is a {type(it).__name__}, expected an object")
        missing = [k for k in ITEM_FIELDS if k not in it]
        if missing:
            raise CacheError(f"{manifest_path}: item {i} ({it.get('file', '?')}) lacks field(s) {missing}; "
                             f"every item needs {list(ITEM_FIELDS)}. Rebuild the cache (OboroCacheLatents).")
        b = it["bucket"]
        if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(v, int) for v in b)):
            raise CacheError(f"{manifest_path}: item {i} ({it['file']}): bucket must be [width, height], got {b!r}")
        if not isinstance(it["shard"], str) or Path(it["shard"]).name != it["shard"]:
            raise CacheError(f"{manifest_path}: item {i} ({it['file']}): shard must be a file name in the cache "
                             f"folder, got {it['shard']!r}")


def shard_error(folder: Path, item_index: int, item: dict, key: str, err: Exception) -> CacheError:
    return CacheError(f"{Path(folder) / item['shard']}: cannot read {key!r} of item {item_index} ({item['file']}): "
                      f"{type(err).__name__}: {err}. The shard is damaged or truncated; rebuild the cache "
                      "(OboroCacheLatents re-encodes only what is missing).")
