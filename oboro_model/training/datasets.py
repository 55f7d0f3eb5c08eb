"""Several latent caches in one run: each with a sampling weight, a repeat count and a loss weight,
plus regularization (prior-preservation) caches, drawn by a seeded order that keeps every step in
one aspect bucket and resumes exactly.

Repeats follow kohya's folder convention: an item's repeats are its source's repeats (given, or the
N of a cache folder named `N_name`, or of the image folder the cache was built from) times the N of
its first sub-folder if that is named `N_name` (kohya's `train_dir/10_style/*.png`, cached as one
folder). Default 1.

Shares. A source s with weight w_s and items i of repeats r_i has mass w_s * sum_i r_i; every step
comes from one source and one bucket, and over an epoch each source gets steps in proportion to its
mass, its items in proportion to their repeats. Weight 1 everywhere is plain concatenation (every
item equally often); weight 2 doubles a source's share, 0.5 halves it. A regularization source's
weight defaults to the training sources' total mass over its own (kohya: as many regularization
images as training images per epoch, so half the steps are regularization steps); its loss is
multiplied by its loss weight (kohya's prior_loss_weight).

The order (MixtureOrder): an epoch takes, of each source, floor(w) whole passes plus the first
frac(w) of one more (rounded up with probability equal to the remainder); a pass permutes every
bucket's items, each listed r_i times, cut into runs of one step (the last topped up from the start
of the same permutation); the epoch shuffles all runs. Every draw comes from the Trainer's
`data_gen`, and the order, position and epoch are the same three fields a plain DataOrder saves,
so training/state.py resumes it unchanged. One source with all repeats 1 is not wrapped at all
(open_training_data returns the cache itself): such runs keep their old order bit for bit.
"""
from __future__ import annotations

import bisect
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from .batching import DataOrder

logger = logging.getLogger(__name__)
REPEATS_RE = re.compile(r"^(\d+)_(.+)$")
SOURCE_KEYS = ("path", "weight", "repeats", "loss_weight", "reg")
# Bounds of a source's numbers: a weight or loss weight is a finite number in 0..MAX_WEIGHT (an
# extra_caches line's weight must also be > 0: the line adds the source to draw from it), repeats
# a whole number in 1..MAX_REPEATS. Larger values only ever came from typos (1e9, inf) and failed
# deep inside the run (OverflowError, MemoryError building the epoch order).
MAX_WEIGHT = 1e4
MAX_REPEATS = 10_000


def repeats_in_name(name: str) -> Optional[int]:
    """kohya's `N_name` folder convention: N (>= 1), or None."""
    m = REPEATS_RE.match(name or "")
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else None


@dataclass(frozen=True)
class DataSource:
    """One cache of a run ([[data]] in CONFIG.toml; the nodes' cache_dir, extra_caches, reg_cache)."""
    path: str
    weight: Optional[float] = None   # None: 1 (regularization: balanced against the training sources)
    repeats: Optional[int] = None    # None: from the folder name (N_name), else 1
    loss_weight: float = 1.0
    reg: bool = False

    def __post_init__(self):
        where = f"data source {self.path}"
        if self.weight is not None and (err := weight_error(self.weight, "weight")):
            raise ValueError(f"{where}: {err}")
        if self.repeats is not None and (err := repeats_error(self.repeats)):
            raise ValueError(f"{where}: {err}")
        if err := weight_error(self.loss_weight, "loss_weight"):
            raise ValueError(f"{where}: {err}")


def weight_error(w, name: str = "weight", positive: bool = False) -> Optional[str]:
    """Why `w` is no valid source weight (a finite number in 0..MAX_WEIGHT, > 0 if `positive`)."""
    ok = isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and \
        (w > 0 if positive else w >= 0) and w <= MAX_WEIGHT
    return None if ok else (f"{name} must be a finite number, {'0 <' if positive else '0 <='} {name} "
                            f"<= {MAX_WEIGHT:g}, got {w!r} (2 doubles a share, 0.5 halves it)")


def repeats_error(r) -> Optional[str]:
    """Why `r` is no valid repeat count (a whole number in 1..MAX_REPEATS)."""
    ok = isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r == int(r) and \
        1 <= r <= MAX_REPEATS
    return None if ok else f"repeats must be a whole number in 1..{MAX_REPEATS}, got {r!r}"


def parse_source_lines(text: str, what: str = "extra_caches") -> list[DataSource]:
    """Lines "path [weight [repeats]]" (a path may hold spaces: trailing numbers are the options;
    blank lines and lines starting with # are skipped)."""
    out = []
    for n, line in enumerate((text or "").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts, nums = line.split(), []
        while len(parts) > 1 and len(nums) < 2 and _number(parts[-1]) is not None:
            nums.insert(0, _number(parts.pop()))
        err = weight_error(nums[0], positive=True) if nums else None
        err = err or (repeats_error(nums[1]) if len(nums) == 2 else None)
        if err:
            raise ValueError(f"{what} line {n} ({line[:200]!r}): {err}. A line is \"path [weight [repeats]]\".")
        out.append(DataSource(" ".join(parts), nums[0] if nums else None, int(nums[1]) if len(nums) == 2 else None))
    return out


def _number(s: str) -> Optional[float]:
    try:
        return float(s)
    except ValueError:
        return None


def parse_data_config(data: Union[Mapping, Sequence[Mapping]]) -> list[DataSource]:
    """CONFIG.toml's [data] table (one cache) or [[data]] array (several) as sources."""
    tables = [data] if isinstance(data, Mapping) else list(data)
    if not tables:
        raise ValueError("[[data]]: no entries")
    out = []
    for i, t in enumerate(tables):
        where = "[data]" if isinstance(data, Mapping) else f"[[data]] #{i + 1}"
        unknown = sorted(set(t) - set(SOURCE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; allowed: {list(SOURCE_KEYS)}")
        if "path" not in t:
            raise ValueError(f"{where}: needs `path` (a latent cache folder written by OboroCacheLatents)")
        if t.get("repeats") is not None and (err := repeats_error(t["repeats"])):
            raise ValueError(f"{where}: {err}")
        out.append(DataSource(str(t["path"]), None if t.get("weight") is None else float(t["weight"]),
                              None if t.get("repeats") is None else int(t["repeats"]),
                              float(t.get("loss_weight", 1.0)), bool(t.get("reg", False))))
    if all(s.reg for s in out):
        raise ValueError("[[data]]: every entry is a regularization set (reg = true); add the training data")
    return out


def source_repeats(src: DataSource, cache) -> int:
    """Given repeats, else N of the cache folder `N_name`, else of the image folder it was built from."""
    if src.repeats is not None:
        return int(src.repeats)
    folder = Path(getattr(cache, "folder", src.path))
    return repeats_in_name(folder.name) or repeats_in_name(Path(getattr(cache, "dataset_dir", "") or "").name) or 1


def item_repeats(cache) -> list[int]:
    """Per item: N of its first sub-folder named `N_name` (kohya's layout), else 1."""
    out = []
    for it in getattr(cache, "items", [{}] * len(cache)):
        parts = str(it.get("file", "")).split("/")
        out.append((repeats_in_name(parts[0]) or 1) if len(parts) > 1 else 1)
    return out


class MixedData(torch.utils.data.Dataset):
    """Several caches as one map-style dataset for the Trainer: global index = offset of its cache +
    local index; items carry "loss_weight" (their source's). `data_order` gives the weighted order."""

    def __init__(self, caches: Sequence, sources: Sequence[DataSource]):
        if len(caches) != len(sources) or not caches:
            raise ValueError(f"{len(caches)} caches for {len(sources)} sources")
        self.caches, self.sources = list(caches), list(sources)
        self.offsets = [0]
        for c in self.caches:
            self.offsets.append(self.offsets[-1] + len(c))
        self.repeats = []
        for src, c in zip(self.sources, self.caches):
            r = source_repeats(src, c)
            self.repeats.append([r * k for k in item_repeats(c)])
        mass = [sum(r) for r in self.repeats]
        train = sum((1.0 if s.weight is None else s.weight) * m for s, m in zip(self.sources, mass) if not s.reg)
        n_reg = sum(s.reg for s in self.sources)
        self.weights = [s.weight if s.weight is not None else (train / n_reg / m if s.reg else 1.0)
                        for s, m in zip(self.sources, mass)]
        if not train > 0:
            raise ValueError("every training source has weight 0: nothing to draw")
        main = next(c for c, s in zip(self.caches, self.sources) if not s.reg)
        self.empty_text, self.empty_mask = getattr(main, "empty_text", None), getattr(main, "empty_mask", None)

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(source number, index in that cache) of global index i."""
        s = bisect.bisect_right(self.offsets, i) - 1
        return s, i - self.offsets[s]

    def __getitem__(self, i: int) -> dict:
        s, j = self.locate(i)
        return {**self.caches[s][j], "loss_weight": float(self.sources[s].loss_weight)}

    def bucket_of(self, i: int):
        s, j = self.locate(i)
        c = self.caches[s]
        return tuple(c.bucket_of(j)) if hasattr(c, "bucket_of") else ()

    def shares(self) -> list[float]:
        """Expected fraction of samples from each source (ignoring the top-up of short runs)."""
        mass = [w * sum(r) for w, r in zip(self.weights, self.repeats)]
        return [m / sum(mass) for m in mass]

    def describe(self) -> list[dict]:
        return [{"path": str(getattr(c, "folder", s.path)), "items": len(c), "reg": s.reg,
                 "repeats": sorted(set(r)), "weight": round(w, 6), "loss_weight": s.loss_weight,
                 "share": round(sh, 4)}
                for s, c, r, w, sh in zip(self.sources, self.caches, self.repeats, self.weights, self.shares())]

    def data_order(self, generator: torch.Generator) -> "MixtureOrder":
        return MixtureOrder(self, generator)


class MixtureOrder(DataOrder):
    """DataOrder whose epochs weigh the sources of a MixedData (see the module docstring)."""

    def __init__(self, data: MixedData, generator: torch.Generator):
        super().__init__(data, generator)
        self.weights = list(data.weights)
        self.source_groups = []  # per source: per bucket, its global indices each listed r_i times
        for s, cache in enumerate(data.caches):
            groups: dict = {}
            for j in range(len(cache)):
                i = data.offsets[s] + j
                groups.setdefault(data.bucket_of(i), []).extend([i] * data.repeats[s][j])
            self.source_groups.append([torch.tensor(groups[k]) for k in sorted(groups)])

    def _pass(self, groups: list[torch.Tensor], n: int) -> list[torch.Tensor]:
        runs = []
        for idx in groups:
            perm = idx[torch.randperm(len(idx), generator=self.generator)]
            if len(perm) % n:
                perm = torch.cat([perm, perm.repeat(n)[:n - len(perm) % n]])
            runs += list(perm.split(n))
        return runs

    def new_epoch(self, n: int) -> torch.Tensor:
        runs: list[torch.Tensor] = []
        for groups, w in zip(self.source_groups, self.weights):
            whole, frac = int(w), w - int(w)
            for _ in range(whole):
                runs += self._pass(groups, n)
            if frac > 0:
                part = self._pass(groups, n)
                k = frac * len(part)
                k = int(k) + int(bool(torch.rand((), generator=self.generator) < k - int(k)))
                runs += part[:k]
        if not runs:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([runs[i] for i in torch.randperm(len(runs), generator=self.generator).tolist()])


def open_training_data(sources: Sequence[DataSource], open_one: Callable[[str], object]):
    """The run's dataset: the cache itself for one plain source, else a MixedData (logged)."""
    caches = [open_one(s.path) for s in sources]
    if len(sources) == 1 and not sources[0].reg and sources[0].loss_weight == 1.0 and \
            source_repeats(sources[0], caches[0]) == 1 and set(item_repeats(caches[0])) <= {1}:
        return caches[0]
    data = MixedData(caches, sources)
    for d in data.describe():
        logger.info("data: %s", d)
    return data


def has_loss_masks(data) -> bool:
    caches = getattr(data, "caches", [data])
    return any(it.get("loss_mask") for c in caches for it in getattr(c, "items", []))
