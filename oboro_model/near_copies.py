"""Near-copy check (issue 24 §4): for each generated image, the nearest training images of a dataset
folder, by the dedup embedding (data/dedup.py: the pHash-DCT "hash" embedding, or CLIP vision when
the caller passes one) and cosine distance. Only reads.

Default thresholds (a generated image at or below them is flagged as a near copy): NEAR_COPY_HASH
for the hash embedding, NEAR_COPY_CLIP for CLIP vision. They are looser than dedup's (which only
merges JPEG re-encodes, 10 % crops and small brightness shifts) because a copy that came through
the model is changed more than a re-encode. Measured in tests/test_image_provenance.py (tiny random
model, pixel space, 64² shapes): an img2img of a training image at denoise 0.2 lands 0.006 from it,
the nearest other training image 0.14, an unrelated image 0.17 from its nearest. Real models and
higher denoise move further: a flag is a prompt to look at the contact sheet, not a verdict, and
no flag is not proof of no copying (a copy cropped or re-coloured by the model can lie beyond).
CLIP's default is not yet measured on a real CLIP model here (dedup's CLIP_EPS 0.05 loosened)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .data import dedup

NEAR_COPY_HASH = 0.08
NEAR_COPY_CLIP = 0.08
TOP_K = 3


def default_threshold(clip: bool) -> float:
    return NEAR_COPY_CLIP if clip else NEAR_COPY_HASH


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def check(dataset_root, images: Sequence[Image.Image], embed: Callable[[Image.Image], np.ndarray] = dedup.hash_embedding,
          threshold: Optional[float] = None, top_k: int = TOP_K, clip: bool = False,
          progress: Optional[Callable[[int, int], None]] = None,
          stop: Optional[Callable[[], None]] = None) -> dict:
    """{"dataset_dir", "embedding", "threshold", "images": [{"image", "near_copy", "nearest":
    [{"file", "distance"}]}], "flagged", "skipped"} for `images` against every image under
    dataset_root (dedup.list_images: recursive, hidden files ignored)."""
    root = Path(dataset_root)
    files = dedup.list_images(root)
    if not files:
        raise ValueError(f"{root}: no training images found")
    thr = default_threshold(clip) if threshold is None or threshold <= 0 else float(threshold)
    emb = dedup.embed_folder(root, files, embed, progress=progress, check=stop)
    if not emb.files:
        raise ValueError(f"{root}: none of the {len(files)} images could be read")
    train = _unit(emb.vectors)
    out = []
    for i, img in enumerate(images):
        d = 1.0 - train @ _unit(np.asarray(embed(img.convert("RGB")), np.float32).reshape(-1))
        order = np.argsort(d, kind="stable")[:top_k]
        nearest = [{"file": emb.files[j], "distance": round(float(max(d[j], 0.0)), 5)} for j in order]
        out.append({"image": i, "near_copy": nearest[0]["distance"] <= thr, "nearest": nearest})
    return {"dataset_dir": str(root), "embedding": "clip_vision" if clip else "hash", "threshold": thr,
            "training_images": len(emb.files), "images": out, "flagged": sum(r["near_copy"] for r in out),
            "skipped": emb.skipped}


def contact_sheet(dataset_root, images: Sequence[Image.Image], report: dict, thumb: int = 128,
                  max_rows: int = 16) -> Image.Image:
    """One row per generated image (framed red when flagged, grey otherwise), then its nearest
    training images left to right, each captioned with its cosine distance."""
    rows = report["images"][:max_rows]
    cols = 1 + max((len(r["nearest"]) for r in rows), default=0)
    pad, frame, label = 10, 3, 14
    sheet = Image.new("RGB", (cols * (thumb + pad) + pad, max(1, len(rows)) * (thumb + pad + label) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)

    def cell(img, x, y, colour, text):
        sheet.paste(colour, (x - frame, y - frame, x + thumb + frame, y + thumb + frame))
        sheet.paste((25, 25, 25), (x, y, x + thumb, y + thumb))
        if img is not None:
            img = img.convert("RGB").copy()
            img.thumbnail((thumb, thumb))
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        draw.text((x, y + thumb + 2), text, fill=(230, 230, 230))

    for r, row in enumerate(rows):
        y = pad + r * (thumb + pad + label)
        flagged = row["near_copy"]
        cell(images[row["image"]], pad, y, (220, 50, 50) if flagged else (120, 120, 120),
             f"#{row['image']} {'NEAR COPY' if flagged else 'ok'}")
        for c, near in enumerate(row["nearest"], 1):
            try:
                img = dedup.load_image(Path(dataset_root) / near["file"])
            except Exception:  # noqa: BLE001 - a file gone since embedding: a dark cell
                img = None
            close = near["distance"] <= report["threshold"]
            cell(img, pad + c * (thumb + pad), y, (220, 50, 50) if close else (60, 60, 60), f"{near['distance']:.4f}")
    return sheet
