"""The near-duplicate edits of issue 15 (a JPEG re-encode, a 10 % crop, a small brightness shift, a
resize), applied to demo images by the dedup tests, the dataset-prep thumbnail and
bench/dedup_scale.py."""
from __future__ import annotations

import io

from PIL import Image, ImageEnhance


def jpeg(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=70)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def crop10(img: Image.Image) -> Image.Image:
    """A centred crop removing 10 % of the area (2.6 % of each side)."""
    w, h = img.size
    dx, dy = round(w * (1 - 0.9 ** 0.5) / 2), round(h * (1 - 0.9 ** 0.5) / 2)
    return img.crop((dx, dy, w - dx, h - dy))


def brighter(img: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(1.08)


def smaller(img: Image.Image) -> Image.Image:
    return img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.Resampling.LANCZOS)


EDITS = (jpeg, crop10, brighter, smaller)
