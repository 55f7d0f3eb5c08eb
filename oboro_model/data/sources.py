"""Finding a dataset's images and captions on disk, checking every image once, converting any PIL
mode to RGB, and the paper's quality tags. Problems become report entries, never exceptions."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILE_COLUMNS = ("file_name", "file", "image")
TEXT_COLUMNS = ("text", "caption")
# Provenance (docs/provenance.md): metadata columns recorded per image, and the per-folder licence
# files whose first non-empty line is the licence of every image in that folder and below that has
# none of its own (the nearest folder's file wins; in one folder, the first of these names).
PROVENANCE_FIELDS = ("licence", "consent", "source", "author")
COLUMN_ALIASES = {"licence": ("licence", "license")}  # a `licence` column wins over `license`
LICENCE_FILES = ("LICENSE", "licence.txt", "license.txt")

# The paper's quality tags (section IV-A). Lower bounds are inclusive, upper bounds exclusive:
# score >= 6.0 excellent; 5.2 <= score < 6.0 good; 4.0 <= score < 5.2 average; score < 4.0 dropped.
QUALITY_TAGS = ((6.0, "excellent score"), (5.2, "good score"), (4.0, "average score"))


def quality_tag(score: float) -> Optional[str]:
    """The tag for an aesthetic score, or None when the image is to be dropped (score < 4)."""
    for low, tag in QUALITY_TAGS:
        if score >= low:
            return tag
    return None


def with_tag(caption: str, tag: Optional[str]) -> str:
    return caption if not tag else f"{caption}, {tag}" if caption else tag


@dataclass
class Entry:
    path: Path                 # absolute path of the image
    file: str                  # path relative to the dataset root, '/'-separated
    caption: str               # final caption, quality tag included
    size: tuple[int, int]      # (w, h) after EXIF orientation
    sha256: str                # of the image file's bytes
    score: Optional[float] = None
    provenance: dict = field(default_factory=dict)  # PROVENANCE_FIELDS -> str or None


def provenance_value(raw) -> Optional[str]:
    """A metadata cell as a provenance field: a string stripped (empty: None), null/missing None,
    anything else (true, 3, a list) its compact JSON text ("true", "3")."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw.strip() or None
    return json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def row_provenance(row: dict) -> dict:
    """The provenance fields a metadata row gives (each None when absent or empty)."""
    out = {}
    for name in PROVENANCE_FIELDS:
        out[name] = next((v for c in COLUMN_ALIASES.get(name, (name,))
                          if (v := provenance_value(row.get(c))) is not None), None)
    return out


def folder_licence(d: Path, report: list, root: Path) -> Optional[str]:
    """The first non-empty line of `d`'s licence file (LICENCE_FILES, first found), or None."""
    for name in LICENCE_FILES:
        p = d / name
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        try:
            text = p.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            report.append({"file": rel, "reason": f"unreadable licence file: {e}"})
            return None
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), None)
        if line is None:
            report.append({"file": rel, "reason": "empty licence file (ignored)"})
        return line
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on white; 16-bit and 32-bit integer
    greyscale (I;16*, I) is scaled from 0..65535; float (F) from 0..1 when it fits, else clipped."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        elif img.mode.startswith("I;16") or np.max(a, initial=0) > 255:
            a = a / 257.0
        a = np.nan_to_num(a).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def open_image(data: bytes) -> Image.Image:
    """Decode fully (so truncation shows now), apply EXIF orientation, convert to RGB."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def _read_rows(meta: Path, name: str) -> tuple[list[dict], list[dict]]:
    rows, problems = [], []
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        return [], [{"file": name, "reason": f"unreadable metadata: {e}"}]
    if meta.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text))), problems
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
                rows.append(row)
            except ValueError as e:
                problems.append({"file": f"{name}:{n}", "reason": f"bad metadata line: {e}"})
    return rows, problems


def read_metadata(root: Path, dirs: list[Path], score_column: Optional[str],
                  provenance: bool = False) -> tuple[dict, list[dict]]:
    """{relative image path: (text or None, raw score or None)} from every metadata.jsonl /
    metadata.csv; `file_name` is relative to the metadata file's folder (Hugging Face imagefolder).
    With `provenance`, each value has a third element: the row's provenance fields (row_provenance)."""
    out, report = {}, []
    for d in dirs:
        for name in METADATA_FILES:
            meta = d / name
            if not meta.is_file():
                continue
            rel_meta = meta.relative_to(root).as_posix()
            rows, problems = _read_rows(meta, rel_meta)
            report += problems
            for row in rows:
                fcol = next((c for c in FILE_COLUMNS if row.get(c)), None)
                if fcol is None:
                    report.append({"file": rel_meta, "reason": f"row without a {FILE_COLUMNS[0]} column: {row}"})
                    continue
                target = Path(os.path.normpath(d / str(row[fcol])))
                if not target.is_relative_to(root):
                    report.append({"file": rel_meta, "reason": f"{row[fcol]} is outside the dataset folder"})
                    continue
                text = next((row[c] for c in TEXT_COLUMNS if row.get(c) is not None), None)
                score = row.get(score_column) if score_column else None
                value = (None if text is None else str(text), score)
                out[target.relative_to(root).as_posix()] = value + (row_provenance(row),) if provenance else value
    return out, report


def parse_score(raw) -> Optional[float]:
    try:
        score = float(raw)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(score) else score


def scan(root: str | Path, score_column: Optional[str] = None,
         exclude: Optional[set[str]] = None) -> tuple[list[Entry], list[dict]]:
    """Every image under root (recursive; hidden files and folders are ignored), sorted by path,
    with its caption: a metadata row's text if there is one, else the sidecar `<stem>.txt`.
    `exclude`: relative paths to skip (an exclusion list, see exclusions.py). Each entry's
    `provenance` holds licence / consent / source / author from its metadata row, the licence
    falling back to the nearest folder licence file (LICENCE_FILES) at or below root.
    Returns (entries, report); the report lists each skipped file with the reason."""
    root = Path(os.path.normpath(Path(root).absolute()))
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    files, dirs = [], []
    for d, subdirs, names in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
        dirs.append(Path(d))
        files += [Path(d) / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTS]
    meta, report = read_metadata(root, dirs, score_column, provenance=True)
    licences = {d: lic for d in dirs if (lic := folder_licence(d, report, root)) is not None}
    found = {p.relative_to(root).as_posix(): p for p in files}
    report += [{"file": rel, "reason": "listed in metadata but the file does not exist"}
               for rel in sorted(set(meta) - set(found))]
    entries = []
    for rel in sorted(found):
        path, skip = found[rel], lambda reason: report.append({"file": rel, "reason": reason})
        if exclude and rel in exclude:
            skip("excluded by the exclusion list (a near-duplicate)")
            continue
        text, raw_score, prov = meta.get(rel, (None, None, None))
        sidecar = path.with_suffix(".txt")
        if text is None and sidecar.is_file():
            try:
                text = sidecar.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as e:
                skip(f"caption file unreadable: {e}")
                continue
        if text is None:
            skip("missing caption (no metadata row, no .txt file)")
            continue
        text = text.strip()
        if not text:
            skip("empty caption")
            continue
        score = None
        if score_column:
            score = parse_score(raw_score)
            if score is None:
                skip(f"no numeric '{score_column}' score")
                continue
            if quality_tag(score) is None:
                skip(f"dropped by score: {score:g} < {QUALITY_TAGS[-1][0]:g}")
                continue
        try:
            data = path.read_bytes()
            if not data:
                skip("empty file (0 bytes)")
                continue
            size = open_image(data).size
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file, not a crash
            skip(f"unreadable image: {type(e).__name__}: {e}")
            continue
        caption = with_tag(text, quality_tag(score) if score is not None else None)
        prov = dict(prov or dict.fromkeys(PROVENANCE_FIELDS))
        if prov["licence"] is None:
            d = path.parent
            while prov["licence"] is None and d.is_relative_to(root):
                prov["licence"] = licences.get(d)
                d = d.parent
        entries.append(Entry(path, rel, caption, size, hashlib.sha256(data).hexdigest(), score, prov))
    return entries, report
