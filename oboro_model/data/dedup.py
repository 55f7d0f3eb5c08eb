"""Near-duplicate removal, the paper's way (section IV-A): embed every image, run DBSCAN (cosine
metric, min_samples 1, so a cluster is everything linked by steps shorter than `eps`) on
partitions of the set, keep one representative per cluster and repeat on the representatives until
a round merges nothing. Memory stays O(partition_size²) per DBSCAN call instead of O(n²).

Nothing here deletes or moves a file: the result is a list of groups (the kept image first) from
which the caller writes an exclusion list (exclusions.py) that the latent cache honours.

The model-free embedding ("hash"): the perceptual-hash (pHash) pipeline without its last step,
binarisation: the image in YCbCr, box-downscaled to 32², luma made mean-free (so a brightness shift
barely moves it), the lowest 16 × 16 DCT coefficients of each channel. The binary pHash itself
(imagehash.phash) was measured on the 64² demo shapes and is unusable there: a JPEG re-encode flips
up to 22 of its 64 bits (flat images put most DCT coefficients near the median), and it ignores
colour, so a red and a blue circle get the same hash. Keeping the coefficients and the chroma fixes
both; see README "Preparing a studio dataset" for the measured margins.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from .sources import IMAGE_EXTS, open_image

KEEP = ("largest", "highest score", "first")
HASH_EPS = 0.035        # cosine distance for the hash embedding (README: measured margins)
CLIP_EPS = 0.05         # cosine distance for CLIP/SigLIP image embeddings (similarity 0.95)
HASH_SIDE, HASH_KEEP = 32, 16
PARTITION_SIZE = 2000
QUIET_ROUNDS = 3        # partitioned rounds in a row without a merge before giving up on more


def list_images(root) -> list[str]:
    """Every image under root (recursive, hidden files and folders ignored), relative and
    '/'-separated, sorted: the order sources.scan uses."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    out = []
    for d, subdirs, names in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
        out += [(Path(d) / n).relative_to(root).as_posix() for n in names
                if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTS]
    return sorted(out)


def load_image(path: Path) -> Image.Image:
    data = Path(path).read_bytes()
    if not data:
        raise ValueError("empty file (0 bytes)")
    return open_image(data)


def hash_embedding(img: Image.Image) -> np.ndarray:
    """[3 * 16 * 16] float32: low-frequency DCT of Y (mean-free), Cb, Cr at 32²."""
    from scipy.fft import dctn  # scipy comes with scikit-learn
    a = np.asarray(img.convert("YCbCr").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX), np.float32) / 255.0 - 0.5
    a[..., 0] -= a[..., 0].mean()
    coeffs = [dctn(a[..., c], norm="ortho")[:HASH_KEEP, :HASH_KEEP].ravel() for c in range(3)]
    # A tiny constant keeps flat images (all-zero coefficients) at distance 0 from each other.
    return np.concatenate(coeffs + [np.array([1e-3], np.float32)]).astype(np.float32)


@dataclass
class Embedded:
    files: list[str]                      # the images that decoded, in order
    vectors: np.ndarray                   # [len(files), D]
    sizes: list[tuple[int, int]]          # (w, h) of each
    skipped: list[dict] = field(default_factory=list)  # {file, reason}


def embed_folder(root, files: Sequence[str], embed: Callable[[Image.Image], np.ndarray] = hash_embedding,
                 progress: Optional[Callable[[int, int], None]] = None,
                 check: Optional[Callable[[], None]] = None) -> Embedded:
    """Embed every file; undecodable ones are reported, not raised (an error of `embed` itself
    is). `check` may raise to stop."""
    root, kept, vecs, sizes, skipped = Path(root), [], [], [], []
    for i, rel in enumerate(files):
        if check:
            check()
        try:
            img = load_image(root / rel)
        except Exception as e:  # noqa: BLE001 - a bad file is a report entry
            skipped.append({"file": rel, "reason": f"unreadable image: {type(e).__name__}: {e}"})
        else:  # a failing embedder is not the file's fault: that raises
            v = np.asarray(embed(img), np.float32).reshape(-1)
            if np.isfinite(v).all():
                kept.append(rel), vecs.append(v), sizes.append(img.size)
            else:
                skipped.append({"file": rel, "reason": "non-finite embedding"})
        if progress:
            progress(i + 1, len(files))
    dim = vecs[0].shape[0] if vecs else 0
    return Embedded(kept, np.stack(vecs) if vecs else np.zeros((0, dim), np.float32), sizes, skipped)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _dbscan(x: np.ndarray, eps: float) -> np.ndarray:
    from sklearn.cluster import DBSCAN
    if len(x) == 1:
        return np.zeros(1, dtype=int)
    return DBSCAN(eps=eps, min_samples=1, metric="cosine").fit_predict(x)


def _groups(labels: np.ndarray, index: np.ndarray) -> list[np.ndarray]:
    return [index[labels == lab] for lab in np.unique(labels)]


def dbscan_groups(vectors: np.ndarray, eps: float) -> list[list[int]]:
    """DBSCAN on the whole set at once (the reference the partitioned version is tested against)."""
    if len(vectors) == 0:
        return []
    labels = _dbscan(_normalise(vectors), eps)
    return sorted(sorted(int(i) for i in g) for g in _groups(labels, np.arange(len(vectors))))


def iterative_dbscan(vectors: np.ndarray, eps: float, rank: Optional[Sequence] = None,
                     partition_size: int = PARTITION_SIZE, seed: int = 0,
                     progress: Optional[Callable[[int], None]] = None,
                     check: Optional[Callable[[], None]] = None) -> tuple[list[list[int]], int]:
    """The paper's partitioned DBSCAN. Each round splits the current representatives into
    partitions of at most `partition_size` (sorted along a fresh random direction, so near
    points tend to share a partition and pairs split in one round meet in another), clusters each,
    and keeps each cluster's best member by `rank` (lower is better; default: index). It stops
    after a round over the whole remaining set (exact: no two of its clusters are within eps), or
    after QUIET_ROUNDS partitioned rounds in a row without a merge. Returns (groups, rounds); each
    group lists indices with its representative first, the rest in index order."""
    n = len(vectors)
    if n == 0:
        return [], 0
    x = _normalise(vectors)
    key = list(range(n)) if rank is None else list(rank)
    members = {i: [i] for i in range(n)}
    active = np.arange(n)
    rng = np.random.default_rng(seed)
    rounds = quiet = 0
    while True:
        rounds += 1
        whole = len(active) <= partition_size
        if whole:
            parts = [active]
        else:
            order = active[np.argsort(x[active] @ rng.standard_normal(x.shape[1]), kind="stable")]
            parts = np.array_split(order, math.ceil(len(active) / partition_size))
        merged, nxt = False, []
        for part in parts:
            if check:
                check()
            for grp in _groups(_dbscan(x[part], eps), part):
                rep = min((int(i) for i in grp), key=lambda i: (key[i], i))
                for other in (int(i) for i in grp):
                    if other != rep:
                        members[rep] += members.pop(other)
                        merged = True
                nxt.append(rep)
        active = np.array(sorted(nxt))
        if progress:
            progress(rounds)
        if whole:
            break
        quiet = 0 if merged else quiet + 1
        if quiet >= QUIET_ROUNDS:
            break
    groups = [[rep] + sorted(m for m in members[rep] if m != rep) for rep in sorted(members)]
    return sorted(groups, key=lambda g: min(g)), rounds


def rank_for(keep: str, emb: Embedded, root, scores: Optional[dict] = None) -> list:
    """Sort keys (lower is better) for choosing each cluster's representative."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    if keep == "first":
        return list(range(len(emb.files)))
    if keep == "largest":
        return [(-w * h, -(Path(root) / f).stat().st_size) for f, (w, h) in zip(emb.files, emb.sizes)]
    scores = scores or {}
    return [(-scores[f], 0) if scores.get(f) is not None else (math.inf, 0) for f in emb.files]


def contact_sheet(root, groups: list[list[str]], thumb: int = 96, max_groups: int = 12, max_per_group: int = 8,
                  total: Optional[int] = None) -> Image.Image:
    """One row per duplicate group (at most max_groups): the kept image framed green, its
    duplicates framed red. A plain grey strip when there are no duplicates."""
    rows = groups[:max_groups]
    cols = max([min(len(g), max_per_group) for g in rows], default=1)
    pad, frame = 10, 3
    sheet = Image.new("RGB", (cols * (thumb + pad) + pad, max(1, len(rows)) * (thumb + pad) + pad), (40, 40, 40))
    for r, group in enumerate(rows):
        for c, rel in enumerate(group[:max_per_group]):
            x, y = pad + c * (thumb + pad), pad + r * (thumb + pad)
            colour = (60, 200, 60) if c == 0 else (220, 50, 50)
            sheet.paste(colour, (x - frame, y - frame, x + thumb + frame, y + thumb + frame))
            sheet.paste((25, 25, 25), (x, y, x + thumb, y + thumb))
            try:
                img = load_image(Path(root) / rel)
                img.thumbnail((thumb, thumb))  # never enlarged: relative sizes stay visible
            except Exception:  # noqa: BLE001 - a file gone since embedding: leave the cell dark
                continue
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
    return sheet
