"""Provenance of training data and of the models trained on it (docs/provenance.md, "Datasets and
models"): the dataset digest a latent cache records, recomputable from the image folder alone, and
the `oboro_provenance` metadata every export carries.

Per item: item_digest = sha256 of the canonical JSON (sorted keys, no spaces, UTF-8, non-ASCII kept)
of {"image_sha256", "caption_sha256", "licence", "consent", "source", "author"} (the last four a
string or null). Dataset: dataset_digest = sha256 of the items' hex digests, sorted, joined by "\\n"
(an order-independent Merkle root; duplicates count). The cache writes
    "dataset": {"digest": <hex>, "items": N, "licences": {<licence or "none">: count}}
into its manifest; dataset_digest_of_folder recomputes the digest from the image folder the same way
(the same scan: captions with quality tags, exclusions, licence files).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Optional

FIELDS = ("licence", "consent", "source", "author")
NO_LICENCE = "none"
FORMAT = 1
ROLES = ("train", "reg", "validation")
METADATA_KEY = "oboro_provenance"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def item_digest(image_sha256: str, caption_sha256: str, licence: Optional[str] = None,
                consent: Optional[str] = None, source: Optional[str] = None, author: Optional[str] = None) -> str:
    """One dataset item's digest (hex). The fields are as a cache manifest item records them."""
    return hashlib.sha256(canonical_json({"image_sha256": image_sha256, "caption_sha256": caption_sha256,
                                          "licence": licence, "consent": consent, "source": source,
                                          "author": author})).hexdigest()


def dataset_digest(item_digests: Iterable[str]) -> str:
    """The order-independent root of a dataset's item digests (hex)."""
    return hashlib.sha256("\n".join(sorted(item_digests)).encode("ascii")).hexdigest()


def digest_of_item(item: Mapping) -> str:
    """item_digest of a manifest item / dataset source ({image_sha256, caption or caption_sha256,
    and the provenance fields it has})."""
    cap = item.get("caption_sha256") or sha256_text(item["caption"])
    return item_digest(item["image_sha256"], cap, *(item.get(f) for f in FIELDS))


def dataset_record(items: Iterable[Mapping]) -> dict:
    """{"digest", "items", "licences"} of items (manifest items or dataset sources)."""
    items = list(items)
    licences = Counter(it.get("licence") or NO_LICENCE for it in items)
    return {"digest": dataset_digest(digest_of_item(it) for it in items), "items": len(items),
            "licences": dict(sorted(licences.items()))}


def folder_items(folder, score_column: Optional[str] = None, exclude: Optional[set] = None) -> list[dict]:
    """The items OboroCacheLatents / build_cache would cache from `folder` (the same scan), as
    {"file", "image_sha256", "caption_sha256", licence, consent, source, author}."""
    from .data.sources import scan
    entries, _ = scan(folder, score_column or None, exclude)
    return [{"file": e.file, "image_sha256": e.sha256, "caption_sha256": sha256_text(e.caption),
             **{f: e.provenance.get(f) for f in FIELDS}} for e in entries]


def dataset_record_of_folder(folder, score_column: Optional[str] = None, exclude: Optional[set] = None) -> dict:
    """The manifest's "dataset" record, recomputed from the image folder."""
    return dataset_record(folder_items(folder, score_column, exclude))


def dataset_digest_of_folder(folder, score_column: Optional[str] = None, exclude: Optional[set] = None) -> str:
    """The dataset digest a cache built from `folder` records (same score_column / exclusion list as
    that build: they decide which images and captions are in it). Images the build could not load
    after the scan (changed meanwhile) are the only possible difference."""
    return dataset_record_of_folder(folder, score_column, exclude)["digest"]


def unlicensed(items: Iterable[Mapping]) -> list[str]:
    """Files of the items without a licence."""
    return [it["file"] for it in items if not it.get("licence")]


def licence_error(where, files: list[str], total: int, shown: int = 10) -> str:
    names = ", ".join(files[:shown]) + (f", ... ({len(files) - shown} more)" if len(files) > shown else "")
    return (f"{where}: require_licence is on but {len(files)} of {total} images have no licence: {names}. Give "
            "each a `licence` in metadata.jsonl / metadata.csv, or put a LICENSE (or licence.txt / license.txt) "
            "file whose first line is the licence into their folder or a folder above; nothing was written")


def cache_dataset(cache) -> dict:
    """A LatentCache's (or a wrapper's) dataset record for export: the manifest's, or for a cache
    written before records existed {"digest": None, "items": len, "licences": {}} (nothing known)."""
    src = getattr(cache, "cache", cache)
    rec = getattr(src, "dataset_record", None)
    if isinstance(rec, Mapping) and rec.get("digest"):
        return {"digest": rec["digest"], "items": int(rec.get("items", len(src))),
                "licences": dict(rec.get("licences") or {})}
    return {"digest": None, "items": len(src), "licences": {}}


def run_datasets(data, validation=None) -> list[dict]:
    """[{"role", "digest", "items", "licences"}] of a run's caches: every source of `data` (a cache,
    a MixedData, or a wrapper of either; a source with reg=True is "reg") and the validation cache."""
    inner = getattr(data, "cache", None)
    data = inner if inner is not None and hasattr(inner, "caches") else data
    caches, sources = getattr(data, "caches", None), getattr(data, "sources", None)
    pairs = list(zip(caches, sources)) if caches is not None else [(data, None)]
    out = [{"role": "reg" if getattr(s, "reg", False) else "train", **cache_dataset(c)} for c, s in pairs]
    if validation is not None:
        out.append({"role": "validation", **cache_dataset(validation)})
    return out


def pack_version() -> Optional[str]:
    """`version` of this pack's pyproject.toml ([project] table; read without tomllib, which Python
    3.10 lacks), or None when the file is not there."""
    try:
        text = PYPROJECT.read_text(encoding="utf-8")
    except OSError:
        return None
    project = re.search(r"^\[project\][ \t]*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    m = re.search(r"""^version\s*=\s*["']([^"']+)["']""", project.group(1) if project else "", re.M)
    return m.group(1) if m else None


def export_metadata(kind: str, base_digest: Optional[str], datasets: Iterable[Mapping],
                    settings_digest: Optional[str]) -> str:
    """The `oboro_provenance` value (JSON text) of an exported model."""
    return json.dumps({"format": FORMAT, "kind": kind, "base_digest": base_digest,
                       "datasets": [dict(d) for d in datasets], "settings_digest": settings_digest,
                       "pack_version": pack_version()})
