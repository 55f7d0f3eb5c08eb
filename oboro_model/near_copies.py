"""Near-copy check (issue 24 §4): for each generated image, the nearest training images of a dataset
folder, by the dedup embedding (data/dedup.py: the pHash-DCT "hash" embedding, or CLIP vision when
the caller passes one) and cosine distance. Only reads.

Why the automatic rule is relative. One absolute distance cannot fit every dataset: how far apart
two *different* images lie depends on the data (the offline demo's 16 px flat shapes: a new colour
of a seen shape lands 0.025-0.26 from a training image, and two training images can be 0.003 apart;
the tests' 64 px random shapes are 0.12-0.9 apart), while a copy lands far closer to its source
than anything else does. So a generated image is flagged as a near copy of training image j when
its distance d to j is at most

    limit_j = min(CAP, max(FLOOR, RATIO * nn_j))

where nn_j is j's distance to its own nearest other training image: "much closer to j than any
other training image is" (RATIO); FLOOR because near-twins in the set (nn_j ~ 0) would otherwise
leave no room for even an exact copy at another size; CAP so that an outlier's wide neighbourhood
never reaches past the old absolute default. The report says which part fired ("floor" or
"relative"). A threshold given by the caller replaces all of this with one absolute distance.

Calibration (hash embedding; docs/provenance.md "Near copies" has the figures): each constant is
the geometric mean of the farthest copy measured and the nearest new image measured, so both sides
keep the same factor of margin. Copy: the tests' img2img of a training image at denoise 0.2, d
0.0062, d / nn_j 0.050. New: the offline demo's held-out generations, d >= 0.0249, d / nn_j >= 0.136.
FLOOR sqrt(0.0062 * 0.0249) = 0.012 (margin 2x), RATIO sqrt(0.050 * 0.136) = 0.08 (1.6x). On the
demo's 16 px images the hash embedding cannot do more: an img2img at denoise 0.1-0.2 through the
demo's own model moves 0.005-0.034 from its source, the range of the held-out images, and only
some of them are flagged. A flag is a prompt to look at the contact sheet, not a verdict; no flag
is not proof of no copying. With CLIP vision the same RATIO (a ratio of distances, free of the
embedding's scale) applies, but FLOOR stays at the old absolute default 0.08 (= CAP), so with CLIP
the rule is that absolute distance, as before; not measured on a real CLIP model here."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .data import dedup

NEAR_COPY_RATIO = 0.08   # RATIO; below 1/4, so that only the nearest training image can flag (check)
NEAR_COPY_HASH = 0.012   # FLOOR for the hash embedding
NEAR_COPY_CLIP = 0.08    # FLOOR with CLIP vision: dedup's CLIP_EPS 0.05 loosened, not measured
NEAR_COPY_CAP = 0.08     # CAP: the absolute default before the relative rule
TOP_K = 3


def default_rule(clip: bool) -> dict:
    """The automatic rule's constants for one embedding (module docstring)."""
    return {"kind": "relative", "ratio": NEAR_COPY_RATIO, "floor": NEAR_COPY_CLIP if clip else NEAR_COPY_HASH,
            "cap": NEAR_COPY_CAP}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _nn(train: np.ndarray, j: int) -> float:
    """nn_j, training image j's distance to its nearest other one (inf when it is alone). Computed
    only for the top_k of each generated image: a full N x N pass would cost minutes on a large set."""
    d = 1.0 - train @ train[j]
    d[j] = np.inf
    return float(max(d.min(), 0.0))


def _judge(d: float, nn: float, rule: dict) -> tuple[float, Optional[str]]:
    """(limit, the part of the rule that flags d, or None)."""
    if rule["kind"] == "threshold":
        return rule["threshold"], "threshold" if d <= rule["threshold"] else None
    limit = min(rule["cap"], max(rule["floor"], rule["ratio"] * nn))
    if d > limit:
        return limit, None
    return limit, "floor" if d <= rule["floor"] else "relative"


def check(dataset_root, images: Sequence[Image.Image], embed: Callable[[Image.Image], np.ndarray] = dedup.hash_embedding,
          threshold: Optional[float] = None, top_k: int = TOP_K, clip: bool = False,
          progress: Optional[Callable[[int, int], None]] = None,
          stop: Optional[Callable[[], None]] = None) -> dict:
    """{"dataset_dir", "embedding", "rule", "threshold", "training_images", "images": [{"image",
    "near_copy", "rule", "file", "distance", "train_nn", "ratio", "limit", "nearest": [{"file",
    "distance", "train_nn", "ratio", "limit", "near_copy"}]}], "flagged", "skipped"} for `images`
    against every image under dataset_root (dedup.list_images: recursive, hidden files ignored).
    An image's own file/distance/... are those of its nearest training image, the only one that can
    flag it (below); `threshold` is None under the automatic rule."""
    root = Path(dataset_root)
    files = dedup.list_images(root)
    if not files:
        raise ValueError(f"{root}: no training images found")
    explicit = threshold is not None and threshold > 0
    rule = {"kind": "threshold", "threshold": float(threshold)} if explicit else default_rule(clip)
    emb = dedup.embed_folder(root, files, embed, progress=progress, check=stop)
    if not emb.files:
        raise ValueError(f"{root}: none of the {len(files)} images could be read")
    train = _unit(emb.vectors)

    def entry(j, d):
        nn = _nn(train, j)
        limit, fired = _judge(d, nn, rule)
        ratio = d / nn if nn > 0 else (0.0 if d == 0 else float("inf"))
        return {"file": emb.files[j], "distance": round(d, 5),
                "train_nn": round(nn, 5) if np.isfinite(nn) else None,
                "ratio": round(ratio, 4) if np.isfinite(ratio) else None, "limit": round(limit, 5),
                "near_copy": fired is not None, "rule": fired}

    out = []
    for i, img in enumerate(images):
        if stop:
            stop()
        d = np.maximum(1.0 - train @ _unit(np.asarray(embed(img.convert("RGB")), np.float32).reshape(-1)), 0.0)
        nearest = [entry(j, float(d[j])) for j in np.argsort(d, kind="stable")[:top_k]]
        # Only the nearest training image can flag: any other j is at d_j >= d_0, and by the angle's
        # triangle inequality nn_j <= dist(j, nearest) <= 4 d_j, so RATIO * nn_j < d_j while RATIO < 1/4.
        out.append({"image": i, **nearest[0], "nearest": [{k: v for k, v in e.items() if k != "rule"} for e in nearest]})
    return {"dataset_dir": str(root), "embedding": "clip_vision" if clip else "hash", "rule": rule,
            "threshold": rule.get("threshold"), "training_images": len(emb.files), "images": out,
            "flagged": sum(r["near_copy"] for r in out), "skipped": emb.skipped}


def describe_rule(rule: dict) -> str:
    if rule["kind"] == "threshold":
        return f"threshold {rule['threshold']:g}"
    return (f"automatic: distance <= min({rule['cap']:g}, max({rule['floor']:g}, {rule['ratio']:g} x the training "
            "image's distance to its nearest other training image))")


def contact_sheet(dataset_root, images: Sequence[Image.Image], report: dict, thumb: int = 128,
                  max_rows: int = 16) -> Image.Image:
    """One row per generated image (framed red when flagged, grey otherwise), then its nearest
    training images left to right, each captioned with its cosine distance and, after "r", that
    distance over the training image's own nearest-neighbour distance."""
    rows = report["images"][:max_rows]
    cols = 1 + max((len(r["nearest"]) for r in rows), default=0)
    pad, frame, label = 10, 3, 14
    sheet = Image.new("RGB", (cols * (thumb + pad) + pad, max(1, len(rows)) * (thumb + pad + label) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)

    def cell(img, x, y, colour, text):
        sheet.paste(colour, (x - frame, y - frame, x + thumb + frame, y + thumb + frame))
        sheet.paste((25, 25, 25), (x, y, x + thumb, y + thumb))
        if img is not None:
            img = img.convert("RGB")
            scale = thumb / max(img.size)  # a 16 px generation is enlarged, pixels kept sharp
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        draw.text((x, y + thumb + 2), text, fill=(230, 230, 230))

    for r, row in enumerate(rows):
        y = pad + r * (thumb + pad + label)
        flagged = row["near_copy"]
        cell(images[row["image"]], pad, y, (220, 50, 50) if flagged else (120, 120, 120),
             f"#{row['image']} {'NEAR COPY (' + row['rule'] + ')' if flagged else 'ok'}")
        for c, near in enumerate(row["nearest"], 1):
            try:
                img = dedup.load_image(Path(dataset_root) / near["file"])
            except Exception:  # noqa: BLE001 - a file gone since embedding: a dark cell
                img = None
            ratio = "" if near["ratio"] is None else f" r{near['ratio']:.2f}"
            cell(img, pad + c * (thumb + pad), y, (220, 50, 50) if near["near_copy"] else (60, 60, 60),
                 f"{near['distance']:.4f}{ratio}")
    return sheet
