"""Latent cache: VAE latents and T5 hidden states of a dataset, encoded once, reused while valid.

Layout of a cache folder:
  manifest.json            {"format": "oboro-latent-cache", "version": 1, "settings": {...},
                            "items": [{"file", "sha256", "image_sha256", "caption", "bucket",
                                       "shard", "key", "latent_shape", "text_len", "caption_sha256"
                                       [, "licence", "consent", "source", "author"]}, ...],
                            "skipped": [...], "dataset": {"digest", "items", "licences"}}
  shard_00000.safetensors  latent_<key> [C,h,w], text_<key> [L,D], text_mask_<key> [L]
                           (+ lossmask_<key> [h,w] for items with a loss mask, masks.py)
  empty_prompt.safetensors text [Le,D], text_mask [Le]: the text encoder's "" (caption dropout)
The manifest also records (outside `settings`, so item hashes do not depend on them):
  "latent_transform": {"format": name, "scale": s, "shift": f}: what turns a stored latent into
      the model's input, (latent - shift) * scale (ComfyUI's latent_format.process_in);
  "empty_prompt": "empty_prompt.safetensors";
  "dataset_dir": the image folder it was built from (a kohya `N_name` there means N repeats);
  "dataset": the dataset's provenance record (oboro_model/provenance.py, docs/provenance.md): its
      order-independent digest over the items' image sha256, caption sha256 and licence / consent /
      source / author (each item records those its data gives), the item count and the count per
      licence ("none": no licence). `require_licence` refuses, writing nothing, a dataset with an
      unlicensed image.
An item with a loss mask (data/masks.py) has "loss_mask" (the mask's sha256, or "alpha"), which
enters its hash; items without one hash exactly as before.
Every front end (training nodes, scripts/oboro-train) reads a cache through LatentCache and so
applies the same transform and the same empty prompt. Caches written before these fields (no
"latent_transform"): transform="manifest" falls back to oboro's rule by channel count
(default_latent_transform: 3 channels = pixel space, identity; otherwise FLUX's scale/shift) and
says so in the log; without "empty_prompt", caption dropout drops to no tokens unless the front
end supplies T5("") (the nodes do when a clip is connected).
An item's `sha256` hashes its image bytes' sha256, its caption (quality tag included) and the
encode settings (dataset policy/size/area/crop/seed, its bucket, plus the caller's VAE name and
hash, T5 name and hash, max_tokens). A rebuild re-encodes only items whose hash is not in the old
manifest; the rest keep their shard, or are copied into new shards when fewer than half of an
old shard's items are still used. New shards get unused numbers, every file is written to a
temporary name then os.replace'd (oboro_model/atomic.py), the manifest last, and shards no longer
used are deleted after it: an interrupted build leaves the previous cache intact. Only files the
old manifest or this folder's build journal name are ever deleted (cache_files.py). One build per
folder at a time: a build holds the folder's lock (folder_lock.py) from reading the old manifest to
deleting unused shards, so a second build of the same folder (another prompt, process or server)
fails at once with FolderBusy, naming the folder and the holder, and changes nothing. Latents are
stored exactly as the encoder returned them (for a ComfyUI VAE: raw VAE.encode output, before latent_format.process_in).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import safe_open

from ..atomic import atomic_write, save_safetensors
from ..folder_lock import folder_lock
from ..provenance import dataset_record, licence_error, unlicensed
from .cache_check import check_items, shard_error
from .cache_files import check_cache_folder, journal_names, note_shard, remove_unused

logger = logging.getLogger(__name__)
FORMAT, VERSION = "oboro-latent-cache", 1
MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
SHARD_RE = re.compile(r"^shard_(\d{5,})\.safetensors$")
# ComfyUI's latent_formats.Flux (what an oboro model with a 16-channel VAE uses); tests check they agree.
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159


def latent_transform(name: str, scale: float = 1.0, shift: float = 0.0) -> dict:
    """The manifest's record of a latent format: model input = (latent - shift) * scale."""
    return {"format": str(name), "scale": float(scale), "shift": float(shift)}


def default_latent_transform(channels: int) -> dict:
    """oboro's latent format by channel count (as its ComfyUI model picks it): the fallback for
    caches that do not record one."""
    return latent_transform("identity") if channels == 3 else latent_transform("Flux", FLUX_SCALE, FLUX_SHIFT)


class ScaleShift:
    """A recorded latent transform as a callable (picklable, for DataLoader workers)."""

    def __init__(self, spec: dict):
        self.spec, self.scale, self.shift = dict(spec), float(spec["scale"]), float(spec["shift"])

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0 and self.shift == 0.0:
            return latent
        return (latent - self.shift) * self.scale

    def __repr__(self) -> str:
        return f"ScaleShift({self.spec})"


def item_hash(image_sha256: str, caption: str, settings: dict) -> str:
    blob = json.dumps({"image": image_sha256, "caption": caption, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_manifest(folder) -> Optional[dict]:
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT and m.get("version") == VERSION else None


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, "utf-8"))


def _squeeze(t: torch.Tensor, dims: int) -> torch.Tensor:
    t = t.detach().cpu()
    while t.dim() > dims and t.shape[0] == 1:
        t = t[0]
    if t.dim() != dims:
        raise ValueError(f"expected a {dims}-d tensor per item, got shape {tuple(t.shape)}")
    return t.contiguous()


class LatentCache(torch.utils.data.Dataset):
    """A cache folder as the Trainer's map-style dataset: {"latent": [C,h,w], "text": [L,D],
    "text_mask": [L], "caption": str, "file": str}; the one reader of the format, for every front
    end. `transform`: None reads latents as stored; "manifest" applies the recorded latent
    transform (or the documented fallback for old caches); a callable is applied as given.
    `empty_text` / `empty_mask`: the stored encoding of "" (None in old caches). Shards are
    memory-mapped lazily."""

    def __init__(self, folder, transform: Union[None, str, Callable[[torch.Tensor], torch.Tensor]] = None):
        self.folder = Path(folder)
        m = read_manifest(self.folder)
        if m is None:
            raise FileNotFoundError(f"{self.folder}: no oboro latent cache here ({MANIFEST} missing or not "
                                    f"format {FORMAT} v{VERSION}); build one with build_cache / OboroCacheLatents")
        check_items(self.folder / MANIFEST, m.get("items"))
        self.settings, self.items, self.skipped = m.get("settings", {}), m["items"], m.get("skipped", [])
        self.latent_transform: Optional[dict] = m.get("latent_transform")
        self.dataset_dir: Optional[str] = m.get("dataset_dir")  # the image folder (its N_name = repeats)
        self.dataset_record: Optional[dict] = m.get("dataset")  # provenance.py; None: an older cache
        self._handles: dict = {}
        if transform == "manifest":
            transform = ScaleShift(self.resolved_transform())
        elif isinstance(transform, str):
            raise ValueError(f"transform must be None, 'manifest' or a callable, got {transform!r}")
        self.transform = transform
        self.empty_text = self.empty_mask = None
        if m.get("empty_prompt"):
            path = self.folder / m["empty_prompt"]
            try:
                with safe_open(str(path), framework="pt") as f:
                    self.empty_text, self.empty_mask = f.get_tensor("text"), f.get_tensor("text_mask")
            except Exception as e:  # noqa: BLE001 - name the file and what is wrong with it
                raise ValueError(f"{path}: the cache's empty-prompt encoding is unreadable ({type(e).__name__}: "
                                 f"{e}); rebuild the cache with OboroCacheLatents") from e

    def resolved_transform(self) -> dict:
        """The recorded latent transform, or (old cache) oboro's rule for its channel count."""
        if self.latent_transform is not None:
            return self.latent_transform
        channels = int(self.items[0]["latent_shape"][0]) if self.items else 3
        spec = default_latent_transform(channels)
        logger.warning("%s: the cache does not record its latent transform (written before it did); assuming "
                       "%s for %d-channel latents. Rebuild it with OboroCacheLatents to record it.",
                       self.folder, spec, channels)
        return spec

    def __getstate__(self):  # DataLoader workers reopen shards themselves
        return {**self.__dict__, "_handles": {}}

    def _shard(self, name: str):
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name]

    def __len__(self) -> int:
        return len(self.items)

    def bucket_of(self, i: int) -> tuple[int, int]:
        return tuple(self.items[i]["bucket"])

    def __getitem__(self, i: int) -> dict:
        it, name = self.items[i], "latent_" + str(self.items[i]["key"])
        try:
            f, k = self._shard(it["shard"]), it["key"]
            latent = f.get_tensor(name)
            text, mask = f.get_tensor(name := f"text_{k}"), f.get_tensor(name := f"text_mask_{k}")
        except Exception as e:  # noqa: BLE001 - safetensors' own errors name no file
            raise shard_error(self.folder, i, it, name, e) from None
        out = {"latent": self.transform(latent) if self.transform else latent, "text": text,
               "text_mask": mask, "caption": it["caption"], "file": it["file"]}
        if it.get("loss_mask"):  # masks.py: [h, w] loss weights at latent resolution
            try:
                out["loss_mask"] = f.get_tensor(name := f"lossmask_{k}")
            except Exception as e:  # noqa: BLE001
                raise shard_error(self.folder, i, it, name, e) from None
        return out


class _ShardWriter:
    def __init__(self, folder: Path, first: int, shard_size: int):
        self.folder, self.next, self.size, self.pending, self.names = folder, first, max(1, shard_size), {}, []

    def add(self, key: str, latent, text, mask, loss_mask=None) -> str:
        self.pending.update({f"latent_{key}": latent, f"text_{key}": text, f"text_mask_{key}": mask})
        if loss_mask is not None:
            self.pending[f"lossmask_{key}"] = loss_mask
        name = f"shard_{self.next:05d}.safetensors"
        if sum(k.startswith("latent_") for k in self.pending) >= self.size:
            self.flush()
        return name

    def flush(self) -> None:
        if self.pending:
            tensors, name = self.pending, f"shard_{self.next:05d}.safetensors"
            note_shard(self.folder, name)
            save_safetensors(self.folder / name, tensors, {"format": FORMAT})
            self.names.append(name)
            self.pending, self.next = {}, self.next + 1


def _valid_old_items(folder: Path, manifest: Optional[dict]) -> tuple[dict, dict]:
    """({hash: old item} for items whose tensors are really in their shard, {shard: items in it})."""
    keys, out = {}, {}
    for it in (manifest or {}).get("items", []):
        shard = it.get("shard", "")
        if shard not in keys:
            try:
                with safe_open(str(folder / shard), framework="pt") as f:
                    keys[shard] = set(f.keys())
            except Exception:  # noqa: BLE001 - a missing or damaged shard only means re-encoding
                keys[shard] = set()
        k = it.get("key")
        need = {f"latent_{k}", f"text_{k}", f"text_mask_{k}"} | ({f"lossmask_{k}"} if it.get("loss_mask") else set())
        if need <= keys[shard]:
            out.setdefault(it["sha256"], it)
    return out, {shard: sum(n.startswith("latent_") for n in k) for shard, k in keys.items()}


def _item_loss_mask(item: dict, size) -> Optional[torch.Tensor]:
    """An encoded item's loss mask (masks.LossMasked: [1, H, W] pixels) on the latent grid, or None."""
    if item.get("loss_mask") is None:
        return None
    from .masks import to_latent_grid
    return to_latent_grid(item["loss_mask"], tuple(size))


def _write_empty_prompt(folder: Path, encode_text: Callable, previous: Optional[dict], settings: dict) -> None:
    """Store encode_text("") unless the previous build stored it with the same encoder settings."""
    if previous and previous.get("empty_prompt") == EMPTY_PROMPT and previous.get("settings") == settings:
        try:
            with safe_open(str(folder / EMPTY_PROMPT), framework="pt") as f:
                if {"text", "text_mask"} <= set(f.keys()):
                    return
        except Exception:  # noqa: BLE001 - missing or damaged: encode it again
            pass
    hidden, masks = encode_text([""])
    empty = _squeeze(hidden[0], 2)
    mask = _squeeze(masks[0], 1) if masks is not None else torch.ones(empty.shape[0], dtype=torch.long)
    save_safetensors(folder / EMPTY_PROMPT, {"text": empty, "text_mask": mask}, {"format": FORMAT})


def build_cache(dataset, folder, encode_image: Callable, encode_text: Callable, settings: dict,
                shard_size: int = 256, batch_size: int = 8,
                progress: Optional[Callable[[int, int], None]] = None,
                transform: Optional[dict] = None, what: Optional[str] = None,
                require_licence: bool = False) -> dict:
    """Encode `dataset` (an OboroDataset, or anything with source(i), settings(), __getitem__)
    into `folder`. encode_image(pixels [B,3,H,W] in [0,1]) -> latents [B,C,h,w];
    encode_text(list of captions) -> (hidden states, masks), each a [B,...] tensor or a list of
    per-caption [L,D] / [L] tensors (a leading 1 is squeezed); it also encodes "" once, stored as
    the empty prompt. `settings` (JSON-serialisable) name the encoders. `transform`
    (latent_transform(...)) records the latent format the latents are meant for (default: oboro's
    rule for their channel count). `what` names this build in the folder lock (who holds it, for
    the error a concurrent build gets). `require_licence`: refuse (ValueError naming the first
    unlicensed files and their count), before touching the folder, when any item has no licence.
    Returns {"encoded", "reused", "skipped": [{file, reason}], "items", "folder", "dataset"}.
    Raises folder_lock.FolderBusy, changing nothing, while another build holds the folder."""
    folder = Path(folder)
    if require_licence:
        check_licences(dataset)
    check_cache_folder(folder, read_manifest(folder), MANIFEST)  # before the lock adds its marker file
    root = getattr(dataset, "root", None)
    with folder_lock(folder, what or f"latent cache build{f' of {root}' if root else ''}"):
        # read (and check) again under the lock: another build may have finished in between
        prev = read_manifest(folder)
        check_cache_folder(folder, prev, MANIFEST)
        return _build(dataset, folder, prev, encode_image, encode_text, settings, shard_size, batch_size,
                      progress, transform)


def _build(dataset, folder: Path, prev: Optional[dict], encode_image, encode_text, settings, shard_size,
           batch_size, progress, transform) -> dict:
    """build_cache's body, run while holding the folder's lock."""
    base = {**dataset.settings(), **settings}
    old, totals = _valid_old_items(folder, prev)
    existing = [int(m.group(1)) for p in folder.iterdir() if (m := SHARD_RE.match(p.name))]
    writer = _ShardWriter(folder, max(existing, default=-1) + 1, shard_size)
    skipped = list(getattr(dataset, "report", []))
    plan, todo = [], {}  # plan: (index, source, hash); todo: hash -> index of its first item
    for i in range(len(dataset)):
        src = dataset.source(i)
        extra = {"loss_mask": src["loss_mask"]} if src.get("loss_mask") else {}  # masks.py; absent: hash as before
        h = item_hash(src["image_sha256"], src["caption"], {**base, "bucket": src["bucket"], **extra})
        plan.append((i, src, h))
        if h not in old:
            todo.setdefault(h, i)
    done: dict = {}  # hash -> (shard, key, latent_shape, text_len)
    by_bucket: dict = {}
    for h, i in todo.items():
        by_bucket.setdefault(tuple(plan[i][1]["bucket"]), []).append((i, h))
    n_done, failed = 0, set()
    for group in by_bucket.values():
        for s in range(0, len(group), batch_size):
            batch, got = group[s:s + batch_size], []
            for i, h in batch:
                try:
                    got.append((i, h, dataset[i]))
                except Exception as e:  # noqa: BLE001 - e.g. the file changed or vanished since the scan
                    skipped.append({"file": plan[i][1]["file"], "reason": f"failed to load: {type(e).__name__}: {e}"})
                    failed.add(h)
            if got:
                latents = encode_image(torch.stack([g[2]["pixels"] for g in got]))
                hidden, masks = encode_text([g[2]["caption"] for g in got])
                for j, (i, h, _) in enumerate(got):
                    lat, txt = _squeeze(latents[j], 3), _squeeze(hidden[j], 2)
                    mask = _squeeze(masks[j], 1) if masks is not None else torch.ones(txt.shape[0], dtype=torch.long)
                    lm = _item_loss_mask(got[j][2], lat.shape[-2:])
                    done[h] = (writer.add(str(i), lat, txt, mask, lm), str(i), list(lat.shape), txt.shape[0])
            n_done += len(batch)
            if progress:
                progress(n_done, len(todo))
    # old shards that would be mostly dead weight: copy their live items into the new shards
    live: dict = {}
    for _, _, h in plan:
        if h in old:
            live.setdefault(old[h]["shard"], set()).add(h)
    items, encoded = [], len(done)
    for i, src, h in plan:
        if h in failed:
            continue
        if h in old and h not in done:
            o = old[h]
            if len(live[o["shard"]]) * 2 < totals[o["shard"]]:
                with safe_open(str(folder / o["shard"]), framework="pt") as f:
                    t = [f.get_tensor(f"{p}_{o['key']}") for p in ("latent", "text", "text_mask")]
                    t.append(f.get_tensor(f"lossmask_{o['key']}") if o.get("loss_mask") else None)
                done[h] = (writer.add(str(i), *t), str(i), o["latent_shape"], o["text_len"])
            else:
                done[h] = (o["shard"], o["key"], o["latent_shape"], o["text_len"])
        shard, key, shape, text_len = done[h]
        items.append({**src, "sha256": h, "shard": shard, "key": key, "latent_shape": shape, "text_len": text_len})
    writer.flush()
    _write_empty_prompt(folder, encode_text, prev, base)
    if transform is None:
        transform = default_latent_transform(int(items[0]["latent_shape"][0]) if items else 3)
    record = dataset_record(items)
    manifest = {"format": FORMAT, "version": VERSION, "settings": base, "latent_transform": dict(transform),
                "empty_prompt": EMPTY_PROMPT, "items": items, "skipped": skipped, "dataset": record}
    if getattr(dataset, "root", None):
        manifest["dataset_dir"] = str(dataset.root)
    _write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    remove_unused(folder, prev, journal_names(folder), {it["shard"] for it in items}, (MANIFEST, EMPTY_PROMPT))
    return {"encoded": encoded, "reused": len(items) - encoded, "skipped": skipped, "items": len(items),
            "folder": str(folder), "dataset": record}


def check_licences(dataset) -> None:
    """require_licence: raise, naming the first unlicensed files and their count, if any item of
    `dataset` (its source(i)) has no licence."""
    sources = [dataset.source(i) for i in range(len(dataset))]
    missing = unlicensed(sources)
    if missing:
        raise ValueError(licence_error(getattr(dataset, "root", None) or "dataset", missing, len(sources)))
