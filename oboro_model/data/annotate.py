"""Captions and aesthetic scores for a dataset (paper section IV-A), with local `transformers`
models only: every load is `local_files_only`, never `trust_remote_code`, so nothing is
downloaded or executed from a model folder.

- Florence-2 (transformers' native Florence2ForConditionalGeneration) from a folder holding what
  `save_pretrained` writes for the model and its processor: config.json, *.safetensors,
  processor/tokenizer files.
- Aesthetic Predictor v2.5: a SigLIP vision tower (SiglipVisionModel folder: config.json +
  *.safetensors, optional preprocessor_config.json) and its scoring head, an MLP
  (hidden -> 1024 -> 128 -> 64 -> 16 -> 1, no activations, dropout only in training) on the
  L2-normalised pooled embedding, from `aesthetic_predictor_v2_5.safetensors` (keys
  scoring_head.{0,2,4,6,8}.{weight,bias}) or the published `.pth` (read with weights_only=True).
Also the two writers: sidecar captions and the score column of metadata.jsonl.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from ..atomic import atomic_write

TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
HEAD_FILES = ("aesthetic_predictor_v2_5.safetensors", "aesthetic_predictor_v2_5.pth")
HEAD_WIDTHS = (1024, 128, 64, 16, 1)
METADATA = "metadata.jsonl"


def _check_folder(folder: Path, what: str) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {folder} has no config.json (expected a transformers model folder, as "
                                "save_pretrained writes it)")
    return folder


class Captioner:
    """Florence-2: one image -> one caption for a task of TASKS."""

    def __init__(self, folder, device="cpu", dtype=torch.float32):
        from transformers import AutoProcessor, Florence2ForConditionalGeneration
        folder = _check_folder(folder, "Florence-2")
        if "auto_map" in json.loads((folder / "config.json").read_text(encoding="utf-8")):
            raise ValueError(f"Florence-2: {folder}/config.json has an auto_map, i.e. the model needs remote "
                             "code, which is never run; use a transformers-native conversion (model_type florence2 without "
                             "auto_map, e.g. florence-community/Florence-2-large)")
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.model = Florence2ForConditionalGeneration.from_pretrained(
            folder, local_files_only=True, dtype=dtype).to(device).eval()
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, img: Image.Image, task: str, max_new_tokens: int = 256, num_beams: int = 3) -> str:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        inputs = self.processor(text=task, images=img, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, max_new_tokens=int(max_new_tokens), num_beams=int(num_beams),
                                  do_sample=False)
        text = self.processor.batch_decode(out, skip_special_tokens=True)[0]
        return " ".join(text.split())


def _head(hidden: int) -> torch.nn.Sequential:
    layers, width = [], hidden
    for i, w in enumerate(HEAD_WIDTHS):
        layers.append(torch.nn.Linear(width, w))
        if i < len(HEAD_WIDTHS) - 1:
            layers.append(torch.nn.Dropout(0.0))  # keeps the published state-dict indices 0, 2, 4, 6, 8
        width = w
    return torch.nn.Sequential(*layers)


def read_head(folder: Path) -> dict:
    for name in HEAD_FILES:
        path = folder / name
        if path.is_file():
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                sd = load_file(str(path))
            else:
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
            return {k.removeprefix("layers.").removeprefix("scoring_head."): v for k, v in sd.items()}
    raise FileNotFoundError(f"aesthetic head: none of {', '.join(HEAD_FILES)} in {folder}")


class AestheticScorer:
    """SigLIP vision tower + v2.5 head: images -> scores (about 1..10)."""

    def __init__(self, folder, device="cpu", dtype=torch.float32):
        from transformers import SiglipImageProcessor, SiglipVisionModel
        folder = Path(folder)
        tower = folder / "siglip" if (folder / "siglip" / "config.json").is_file() else folder
        _check_folder(tower, "SigLIP vision tower")
        self.tower = SiglipVisionModel.from_pretrained(tower, local_files_only=True, dtype=dtype).to(device).eval()
        size = self.tower.config.image_size
        self.processor = (SiglipImageProcessor.from_pretrained(tower, local_files_only=True)
                          if (tower / "preprocessor_config.json").is_file()
                          else SiglipImageProcessor(size={"height": size, "width": size}))
        hidden = self.tower.config.hidden_size
        self.head = _head(hidden)
        sd = read_head(folder)
        want = self.head.state_dict()
        bad = [f"{k}: expected {tuple(v.shape)}, got {tuple(sd[k].shape) if k in sd else 'missing'}"
               for k, v in want.items() if k not in sd or sd[k].shape != v.shape]
        if bad:
            raise ValueError(f"aesthetic head in {folder} does not fit a SigLIP of hidden size {hidden}: "
                             + "; ".join(bad[:4]))
        self.head.load_state_dict({k: sd[k] for k in want})
        self.head.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> list[float]:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        pooled = self.tower(pixel_values=pixels).pooler_output
        pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return [float(s) for s in self.head(pooled).float().reshape(-1).cpu()]


def write_caption(image: Path, text: str, prefix: str = "", suffix: str = "",
                  overwrite: bool = False) -> Optional[Path]:
    """Write `<stem>.txt` beside `image` (prefix, caption, suffix joined with ', '). Returns the
    path, or None when a caption exists and `overwrite` is off."""
    path = Path(image).with_suffix(".txt")
    if path.exists() and not overwrite:
        return None
    caption = ", ".join(p.strip() for p in (prefix, text, suffix) if p and p.strip())
    atomic_write(path, lambda tmp: Path(tmp).write_text(caption + "\n", encoding="utf-8"), fsync=False)
    return path


def write_scores(root, scores: dict[str, float], column: str, overwrite: bool = False) -> dict:
    """Put `column` into the metadata.jsonl row of each image (relative path -> score). A row
    already in some metadata.jsonl under root (file_name relative to that file's folder) is
    updated in place, other images get a new row {"file_name", column} in root/metadata.jsonl.
    A row that already has the column keeps it unless `overwrite`. Returns {"written", "kept"}."""
    root = Path(root)
    csvs = sorted(p.relative_to(root).as_posix() for p in root.rglob("metadata.csv"))
    if csvs:
        raise ValueError(f"{root}: {', '.join(csvs)} exists; scores go to metadata.jsonl, and a metadata.csv in the "
                         "same folder would hide them. Convert it to metadata.jsonl first")
    todo, written, kept = dict(scores), 0, 0
    # Sub-folders' files first: root/metadata.jsonl, last, takes every image no row named.
    files = sorted(p for p in root.rglob(METADATA) if p != root / METADATA) + [root / METADATA]
    for meta in files:
        rows = []
        if meta.is_file():
            for n, line in enumerate(meta.read_text(encoding="utf-8-sig").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{meta}, line {n}: not JSON ({e}); fix or remove it before scoring") from e
        changed = False
        for row in rows:
            if not isinstance(row, dict):
                continue
            target = os.path.normpath(meta.parent / str(row.get("file_name", "")))
            rel = os.path.relpath(target, root).replace(os.sep, "/")
            if rel in todo:
                score = todo.pop(rel)
                if column in row and not overwrite:
                    kept += 1
                    continue
                row[column], changed, written = round(score, 4), True, written + 1
        if meta == root / METADATA:
            for rel in sorted(todo):
                rows.append({"file_name": rel, column: round(todo[rel], 4)})
                changed, written = True, written + 1
            todo.clear()
        if changed:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            atomic_write(meta, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), fsync=False)
    return {"written": written, "kept": kept}
