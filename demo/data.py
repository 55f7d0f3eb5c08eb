"""The offline demo's procedural dataset: coloured shapes on plain backgrounds, each image with a
caption and a semantic mask, plus the scores that tell whether generated images show what their
prompt asks for. Pure PIL / numpy, deterministic (no randomness at all); no ComfyUI, no torch.

Layout written by `write_dataset(root)`:
  root/images/<stem>.png + <stem>.txt   training images (RGB) and captions: the dataset folder
                                        OboroCacheLatents / OboroDataset read
  root/masks/<stem>.png                 semantic masks (palette PNG: 0 background, 1 circle,
                                        2 square, 3 triangle), outside images/ so the dataset scan
                                        never sees them
  root/heldout/images|masks/<stem>.png  renders of the held-out combinations (never trained on):
                                        references for the contact sheet and the scores
  root/index.jsonl                      one row per image: file, mask, caption, shape, colour,
                                        background, position, split ("train" or "heldout")
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")           # mask labels 1, 2, 3
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
           "yellow": (235, 205, 30), "magenta": (200, 40, 190), "cyan": (40, 200, 215)}
# Augmentation (write_dataset's extra_colours; never prompted, never scored): colours drawn in every
# shape, so that the training set no longer says a colour word predicts a shape.
EXTRA_COLOURS = {"orange": (245, 130, 20), "purple": (110, 40, 160), "brown": (125, 75, 35)}
PAINTS = {**COLOURS, **EXTRA_COLOURS}              # every colour render() can draw
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}                  # shape centre as a fraction of (x, y)
RADIUS = 0.25                                       # half the shape's extent, fraction of the side
# (shape, colour) pairs never shown in training: each shape and each colour still appears in
# training with other partners, so generating these tests composition, not recall.
HELD_OUT = (("triangle", "green"), ("square", "yellow"), ("circle", "magenta"))
MASK_PALETTE = [0, 0, 0, 230, 80, 80, 80, 200, 80, 80, 120, 230]  # label colours for viewing
SUPERSAMPLE = 4


def caption(shape: str, colour: str, background: str, position: str, omit: str = "") -> str:
    """`omit` "colour" or "shape" leaves that word out ("a circle on ...", "a red shape on ...")."""
    what = {"": f"{colour} {shape}", "colour": shape, "shape": f"{colour} shape"}[omit]
    return f"a {what} on a {background} background, {position}"


def stem(shape: str, colour: str, background: str, position: str) -> str:
    return f"{colour}_{shape}_{background}_{position}"


def combinations(split: str = "train", extra_colours: int = 0) -> list[tuple[str, str, str, str]]:
    """(shape, colour, background, position) of one split, in a fixed order; "train" with
    extra_colours > 0 also has every shape in the first extra_colours of EXTRA_COLOURS."""
    held = set(HELD_OUT)
    colours = list(COLOURS) + (list(EXTRA_COLOURS)[:extra_colours] if split == "train" else [])
    return [(s, c, b, p) for s in SHAPES for c in colours for b in BACKGROUNDS for p in POSITIONS
            if ((s, c) in held) == (split == "heldout")]


def shape_mask(shape: str, position: str | tuple[float, float], size: int = 64, supersample: int = 1) -> Image.Image:
    """'L' image, 255 inside the shape, drawn at size * supersample; `position` is a name of
    POSITIONS or the centre (x, y) as fractions of the side."""
    n = size * supersample
    cx, cy = (v * n for v in (POSITIONS[position] if isinstance(position, str) else position))
    r = RADIUS * n
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        s = r * 0.9  # about the circle's area
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    return img


def render(shape: str, colour: str, background: str, position: str, size: int = 64) -> tuple[Image.Image, Image.Image]:
    """(RGB image with anti-aliased edges, palette mask with labels 0 background / 1.. shape)."""
    n = size * SUPERSAMPLE
    img = Image.new("RGB", (n, n), BACKGROUNDS[background])
    img.paste(Image.new("RGB", (n, n), PAINTS[colour]), mask=shape_mask(shape, position, size, SUPERSAMPLE))
    img = img.resize((size, size), Image.Resampling.BOX)
    inside = np.asarray(shape_mask(shape, position, size)) > 127
    mask = Image.fromarray((inside * (SHAPES.index(shape) + 1)).astype(np.uint8), "P")
    mask.putpalette(MASK_PALETTE)
    return img, mask


def write_dataset(root, size: int = 64, extra_colours: int = 0) -> dict:
    """Write both splits under root (see the module docstring); returns a summary. extra_colours:
    the augmentation of EXTRA_COLOURS (45 more training images per colour)."""
    root = Path(root)
    rows = []
    for split, img_dir, mask_dir in (("train", root / "images", root / "masks"),
                                     ("heldout", root / "heldout" / "images", root / "heldout" / "masks")):
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for combo in combinations(split, extra_colours):
            name = stem(*combo)
            img, mask = render(*combo, size=size)
            img.save(img_dir / f"{name}.png")
            mask.save(mask_dir / f"{name}.png")
            text = caption(*combo)
            if split == "train":  # held-out renders get no caption file: nothing could train on them
                (img_dir / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
            rows.append({"file": (img_dir / f"{name}.png").relative_to(root).as_posix(),
                         "mask": (mask_dir / f"{name}.png").relative_to(root).as_posix(), "caption": text,
                         **dict(zip(("shape", "colour", "background", "position"), combo)), "split": split})
    with open(root / "index.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    train = [r for r in rows if r["split"] == "train"]
    return {"root": str(root), "dataset_dir": str(root / "images"), "size": size, "train": len(train),
            "augmented": sum(r["colour"] in EXTRA_COLOURS for r in train), "heldout": len(rows) - len(train),
            "train_captions": [r["caption"] for r in train]}


# ---- scoring generated images -------------------------------------------------------------------
def _nearest(rgb: np.ndarray, palette: dict) -> tuple[str, float]:
    dists = {k: float(np.linalg.norm(rgb - np.asarray(v, dtype=np.float64))) for k, v in palette.items()}
    best = min(dists, key=dists.get)
    return best, dists[best]


def _centroid(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([xs.mean(), ys.mean()]) + 0.5  # pixel centres, in pixels


def _coverage(shape: str, centre: tuple[float, float], size: int) -> np.ndarray:
    """Fraction of each pixel the shape covers (drawn 4x larger, box-filtered)."""
    big = shape_mask(shape, centre, size, SUPERSAMPLE)
    return np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float64) / 255.0


def score_image(image, shape: str, colour: str, background: str, position: str) -> dict:
    """Whether an RGB image (PIL or HxWx3 uint8) shows its prompt, judged from pixels alone.
    Foreground = pixels farther than 60 (RGB distance) from the prompt's background colour; with
    less than a third of the shape's area of them, nothing was drawn and colour, position and shape
    all count as wrong. Otherwise:
    - colour: the median foreground colour, nearest of the 6 shape colours;
    - position: the foreground centroid, nearest of the 5 positions;
    - shape: the template (circle, square, triangle) centred on the foreground's centroid that
      overlaps the foreground best (IoU), so a misplaced shape is still judged on its form;
    - background: the median of the outer border (1/16 of the side), nearest of the 3 backgrounds.
    Chance levels: colour 1/6, position 1/5, shape 1/3, background 1/3."""
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float64)
    size = a.shape[0]
    b = max(1, size // 16)
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3), a[:, -b:].reshape(-1, 3)])
    got_bg, _ = _nearest(np.median(border, axis=0), BACKGROUNDS)
    fg = np.linalg.norm(a - np.asarray(BACKGROUNDS[background], dtype=np.float64), axis=-1) > 60
    area = float((np.asarray(shape_mask(shape, position, size)) > 127).sum())
    out = {"background": got_bg, "background_ok": got_bg == background, "foreground_fraction": round(fg.sum() / area, 3),
           "colour": None, "median_colour": None, "position": None, "shape": None, "shape_iou": 0.0}
    if fg.sum() >= area / 3:
        median = np.median(a[fg], axis=0)
        out["colour"], _ = _nearest(median, COLOURS)
        out["median_colour"] = [round(float(v), 1) for v in median]
        c = _centroid(fg)
        out["position"] = min(POSITIONS, key=lambda p: float(np.linalg.norm(c / size - np.asarray(POSITIONS[p]))))
        ious, f = {}, fg.astype(np.float64)
        for s in SHAPES:
            m = _coverage(s, (0.5, 0.5), size)
            cx, cy = c / size - (_centroid(m > 0.5) / size - 0.5)  # centre the template's centroid on c
            m = _coverage(s, (cx, cy), size)
            ious[s] = float(np.minimum(m, f).sum() / max(1.0, np.maximum(m, f).sum()))  # soft IoU
        out["shape"] = max(ious, key=ious.get)
        out["shape_iou"] = round(ious[shape], 3)
    for key, want in (("colour", colour), ("position", position), ("shape", shape)):
        out[f"{key}_ok"] = out[key] == want
    return out


def summarize(scores: list[dict]) -> dict:
    """Fractions of images whose colour / background / position / shape match the prompt."""
    n = max(1, len(scores))
    out = {k: round(sum(bool(s[f"{k}_ok"]) for s in scores) / n, 3) for k in ("colour", "background", "position", "shape")}
    out["all"] = round(sum(all(s[f"{k}_ok"] for k in ("colour", "background", "position", "shape")) for s in scores) / n, 3)
    out["mean_shape_iou"] = round(sum(s["shape_iou"] for s in scores) / n, 3)
    out["images"] = len(scores)
    out["chance"] = {"colour": round(1 / len(COLOURS), 3), "background": round(1 / len(BACKGROUNDS), 3),
                     "position": round(1 / len(POSITIONS), 3), "shape": round(1 / len(SHAPES), 3)}
    return out
