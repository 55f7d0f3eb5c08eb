"""The exclusion list: images a dataset reader must skip (OboroDedupDataset writes it, the latent
cache honours it). Kept apart from dedup.py so reading a dataset never imports scikit-learn.

File format (UTF-8 text), one image per line, relative to the dataset folder, '/'-separated:
  # oboro exclusion list v1
  # dataset: /abs/path/of/the/dataset
  sub/photo_copy.jpg
Blank lines and lines starting with '#' are ignored. Paths are never absolute and never climb out
of the dataset folder; such lines are refused with the file and line named.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Iterable

HEADER = "# oboro exclusion list v1"


def read_exclusions(path) -> set[str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"exclusion list {path}: unreadable: {e}") from e
    out = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rel = PurePosixPath(line.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"exclusion list {path}, line {n}: {line!r} must be a path relative to the "
                             f"dataset folder (expected e.g. 'sub/image.png')")
        out.add(rel.as_posix())
    return out


def write_exclusions(path, files: Iterable[str], dataset_dir: str, note: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER, f"# dataset: {dataset_dir}"] + ([f"# {note}"] if note else []) + sorted(files)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
