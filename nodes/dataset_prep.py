"""Preparing a studio's own images the paper's way (section IV-A), in the graph:
OboroDedupDataset (near-duplicates -> an exclusion list OboroCacheLatents honours),
OboroCaptionDataset (Florence-2 -> sidecar .txt) and OboroScoreDataset (Aesthetic Predictor
v2.5 -> metadata.jsonl, which OboroCacheLatents' score_column turns into quality tags).

None of them deletes, moves or renames a user file. Dedup only reads the dataset and writes its
report under output/oboro_dedup/, into a new folder each run (an existing report_name gets the next
free `_00001_` name, so no report is replaced). Caption and score write sidecar files INTO the
dataset folder, so that folder must lie inside ComfyUI's input folder, its output folder or
OBORO_ALLOWED_ROOTS (the write rule of nodes/paths.py); an existing caption or score is kept
unless `overwrite`. Every folder they write is held with folder_lock while they write it (one
writer at a time, across prompts, processes and servers). Their read inputs (dataset_dir,
exclude_list) follow paths.confine_read: a plain name is in ComfyUI's input folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..oboro_model.data import dedup
from ..oboro_model.data.annotate import TASKS, AestheticScorer, Captioner, write_caption, write_scores
from ..oboro_model.data.exclusions import read_exclusions, write_exclusions
from ..oboro_model.data.sources import read_metadata, parse_score
from ..oboro_model.folder_lock import LOCK_NAME, folder_lock
from .paths import ALLOWED_ENV, allowed_roots, confine, confine_read, free_target, no_nul

log = logging.getLogger("oboro")
DEDUP_ROOT = "oboro_dedup"
FLORENCE, AESTHETIC = "florence2", "aesthetic"
SCORE_COLUMN = "aesthetic_score"
for _kind in (FLORENCE, AESTHETIC):
    folder_paths.add_model_folder_path(_kind, os.path.join(folder_paths.models_dir, _kind))


def is_model_folder(path: Path) -> bool:
    """A transformers folder (config.json), or for scores the tower in a siglip/ sub-folder."""
    return (path / "config.json").is_file() or (path / "siglip" / "config.json").is_file()


def model_folders(kind: str) -> list[str]:
    """Model folders in any registered folder of `kind` (models/<kind>/<name>/)."""
    names = set()
    for base in folder_paths.get_folder_paths(kind):
        if os.path.isdir(base):
            names |= {d for d in os.listdir(base) if is_model_folder(Path(base) / d)}
    return sorted(names)


def model_folder(kind: str, name: str) -> Path:
    for base in folder_paths.get_folder_paths(kind):
        path = Path(base) / name
        if name and not os.path.isabs(name) and ".." not in Path(name).parts and is_model_folder(path):
            return path
    raise FileNotFoundError(f"{kind} model {name!r} not found: put the model folder (config.json, *.safetensors, "
                            f"processor files) in one of {folder_paths.get_folder_paths(kind)}")


def readable_dataset(path: str) -> Path:
    """A dataset folder to read, by the one read rule (paths.confine_read)."""
    return confine_read(path, "dataset_dir", expect="dir")


def writable_dataset(path: str) -> Path:
    """A dataset folder our nodes may write sidecar files into: a plain name under ComfyUI's input
    folder, or an absolute path inside the input folder, the output folder or OBORO_ALLOWED_ROOTS."""
    inp = Path(folder_paths.get_input_directory()).resolve()
    no_nul(path, "dataset_dir")
    if not os.path.isabs(path or ""):
        folder = confine(inp, path, "dataset_dir")
    else:
        folder, roots = Path(path).resolve(), [inp] + allowed_roots()
        if not any(folder.is_relative_to(r) and folder != r for r in roots):
            raise ValueError(f"dataset_dir {path!r}: captions and scores are written into the dataset folder, so it "
                             f"must lie inside {', '.join(str(r) for r in roots)} (the admin can add folders with "
                             f"the environment variable {ALLOWED_ENV})")
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset_dir {path!r}: not a folder ({folder})")
    return folder


def folder_state(path: str, extra=()) -> str:
    """Changes when any file under `path` changes (size, mtime): the node then runs again. A path
    the read rule refuses is not looked at (execute then says why)."""
    h = hashlib.sha256(repr(extra).encode())
    try:
        path = str(readable_dataset(path))
    except (ValueError, OSError) as e:
        return f"unusable:{type(e).__name__}:{path!r}"
    for d, subdirs, names in os.walk(path):
        subdirs.sort()
        for n in sorted(names):
            if n == LOCK_NAME:  # rewritten by every caption/score run, whether or not files changed
                continue
            try:
                st = os.stat(os.path.join(d, n))
                h.update(f"{d}/{n}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                pass
    return h.hexdigest()


def excluded(exclude_list: str) -> set[str]:
    if not (exclude_list or "").strip():
        return set()
    return read_exclusions(confine_read(exclude_list, "exclude_list", expect="file"))


def new_report_folder(report_name: str) -> Path:
    """output/oboro_dedup/<report_name>, or when that exists the next free `<name>_NNNNN_` beside it
    (paths.free_target, as for trained models): created here, atomically (mkdir fails if another
    run took the name first), so a report is never replaced nor shared by two runs."""
    path = confine(Path(folder_paths.get_output_directory()) / DEDUP_ROOT, report_name, "report_name")
    while True:
        target = free_target(path, overwrite=False)
        try:
            target.mkdir(parents=True)
            return target
        except FileExistsError:
            continue


def device_dtype():
    device = mm.get_torch_device()
    return device, (torch.float16 if device.type == "cuda" else torch.float32)


class OboroDedupDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroDedupDataset",
            display_name="oboro Find Near-Duplicates",
            category="oboro/dataset",
            description="Finds near-duplicate images in a dataset folder (the paper's iterative partitioned DBSCAN on "
                        "image embeddings) and writes an exclusion list that OboroCacheLatents skips. Never deletes "
                        "or moves a file.",
            inputs=[
                io.String.Input("dataset_dir", tooltip="Folder of images (searched recursively). Only read. A name in "
                                                       "ComfyUI's input folder, or an absolute path inside the input, "
                                                       "output or models folders or OBORO_READ_ROOTS."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip=f"Cosine distance below which two images are duplicates. 0: automatic "
                                       f"({dedup.HASH_EPS} for the built-in hash embedding, {dedup.CLIP_EPS} with a "
                                       f"CLIP vision model)."),
                io.Combo.Input("keep", options=list(dedup.KEEP), default="largest",
                               tooltip="Which image of a duplicate group stays: the most pixels (then the larger "
                                       "file), the highest score (score_column of metadata), or the first by path."),
                io.String.Input("report_name", default="default",
                                tooltip="Report folder: output/oboro_dedup/<name>/ (exclude.txt, report.json); if it "
                                        "exists, the next free <name>_00001_ (no report is replaced)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Image embeddings from this model (core Load CLIP Vision). Not connected: "
                                            "the built-in perceptual-hash embedding (no model files)."),
                io.String.Input("score_column", default=SCORE_COLUMN, optional=True,
                                tooltip="metadata.jsonl/csv column read when keep is 'highest score'."),
                io.Int.Input("partition_size", default=dedup.PARTITION_SIZE, min=2, max=100000, optional=True,
                             tooltip="Images per DBSCAN call (memory grows with its square)."),
            ],
            outputs=[io.String.Output("dataset", display_name="dataset_dir"),
                     io.String.Output("exclude_list", display_name="exclude_list"),
                     io.String.Output("report", display_name="report"),
                     io.Image.Output("contact_sheet", display_name="contact_sheet")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, dataset_dir="", report_name="", **kwargs):
        return folder_state(dataset_dir, report_name)

    @classmethod
    def execute(cls, dataset_dir, threshold, keep, report_name, clip_vision=None, score_column=SCORE_COLUMN,
                partition_size=dedup.PARTITION_SIZE) -> io.NodeOutput:
        root = readable_dataset(dataset_dir)
        confine(Path(folder_paths.get_output_directory()) / DEDUP_ROOT, report_name, "report_name")  # refuse early
        files = dedup.list_images(root)
        if not files:
            raise ValueError(f"{root}: no images found")
        pbar = comfy.utils.ProgressBar(len(files) + 1)
        embed = dedup.hash_embedding if clip_vision is None else clip_embedding(clip_vision)
        emb = dedup.embed_folder(root, files, embed, progress=lambda d, t: pbar.update_absolute(d, len(files) + 1),
                                 check=mm.throw_exception_if_processing_interrupted)
        eps = threshold or (dedup.HASH_EPS if clip_vision is None else dedup.CLIP_EPS)
        scores = None
        if keep == "highest score":
            meta, _ = read_metadata(root, [Path(d) for d, _, _ in os.walk(root)], score_column)
            scores = {f: parse_score(s) for f, (_, s) in meta.items()}
        rank = dedup.rank_for(keep, emb, root, scores)
        groups, rounds = dedup.iterative_dbscan(emb.vectors, eps, rank, partition_size,
                                                check=mm.throw_exception_if_processing_interrupted)
        pbar.update_absolute(len(files) + 1, len(files) + 1)
        dup_groups = [[emb.files[i] for i in g] for g in groups if len(g) > 1]
        drop = [f for g in dup_groups for f in g[1:]]
        out_dir = new_report_folder(report_name)
        with folder_lock(out_dir, f"OboroDedupDataset report of {root}"):
            exclude = write_exclusions(out_dir / "exclude.txt", drop, str(root),
                                       f"{len(drop)} near-duplicates of {len(files)} images; threshold {eps:g}")
            report = {"dataset_dir": str(root), "images": len(files), "embedded": len(emb.files),
                      "embedding": "hash" if clip_vision is None else "clip_vision", "threshold": eps, "keep": keep,
                      "rounds": rounds, "groups": len(dup_groups), "excluded": len(drop), "report_dir": str(out_dir),
                      "exclude_list": str(exclude), "skipped": emb.skipped,
                      "duplicate_groups": [{"keep": g[0], "duplicates": g[1:]} for g in dup_groups]}
            (out_dir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        sheet = dedup.contact_sheet(root, dup_groups)
        image = torch.from_numpy(np.asarray(sheet, np.float32) / 255.0)[None]
        log.info("OboroDedupDataset: %s: %d duplicate groups, %d images excluded (%s)", root, len(dup_groups),
                 len(drop), exclude)
        summary = {k: v for k, v in report.items() if k != "duplicate_groups"}
        summary["duplicate_groups"] = report["duplicate_groups"][:50]
        text = json.dumps(summary, indent=1, ensure_ascii=False)
        return io.NodeOutput(str(root), str(exclude), text, image, ui={"text": (text,)})


def clip_embedding(clip_vision):
    """A core CLIP_VISION object's projected image embedding (image_embeds) of one image."""
    @torch.inference_mode()
    def embed(img):
        pixels = torch.from_numpy(np.asarray(img, np.float32) / 255.0)[None]
        return clip_vision.encode_image(pixels, crop=True)["image_embeds"][0].float().cpu().numpy()
    return embed


class OboroCaptionDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroCaptionDataset",
            display_name="oboro Caption Dataset (Florence-2)",
            category="oboro/dataset",
            description="Writes a sidecar <image>.txt caption for every image of a dataset folder with Florence-2 "
                        f"from models/{FLORENCE}/<name>/. Existing captions are kept unless overwrite is on.",
            inputs=[
                io.String.Input("dataset_dir", tooltip="Folder of images inside ComfyUI's input folder, output "
                                                       "folder or OBORO_ALLOWED_ROOTS (captions are written there)."),
                io.Combo.Input("model", options=model_folders(FLORENCE),
                               tooltip=f"A Florence-2 folder in models/{FLORENCE}/ (transformers save_pretrained "
                                       "layout: config.json, *.safetensors, processor and tokenizer files)."),
                io.Combo.Input("task", options=list(TASKS), default="<DETAILED_CAPTION>",
                               tooltip="Caption length: <CAPTION> (a sentence), <DETAILED_CAPTION>, "
                                       "<MORE_DETAILED_CAPTION> (a paragraph)."),
                io.String.Input("prefix", default="", tooltip="Put before each caption (e.g. a style token)."),
                io.String.Input("suffix", default="", tooltip="Put after each caption."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace existing .txt captions."),
                io.Int.Input("max_new_tokens", default=256, min=1, max=4096, optional=True,
                             tooltip="Longest caption Florence-2 may write, in tokens."),
                io.Int.Input("num_beams", default=3, min=1, max=16, optional=True,
                             tooltip="Beam search width: more beams, steadier captions, slower (1: greedy)."),
                io.String.Input("exclude_list", default="", optional=True,
                                tooltip="Skip these images (OboroDedupDataset's exclude_list)."),
            ],
            outputs=[io.String.Output("dataset", display_name="dataset_dir"),
                     io.String.Output("report", display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, dataset_dir="", **kwargs):
        return folder_state(dataset_dir)

    @classmethod
    def execute(cls, dataset_dir, model, task, prefix, suffix, overwrite, max_new_tokens=256, num_beams=3,
                exclude_list="") -> io.NodeOutput:
        root = writable_dataset(dataset_dir)
        skip = excluded(exclude_list)
        with folder_lock(root, "OboroCaptionDataset (writes <image>.txt captions)"):
            files = [f for f in dedup.list_images(root) if f not in skip]
            todo = [f for f in files if overwrite or not (root / f).with_suffix(".txt").exists()]
            report = {"dataset_dir": str(root), "images": len(files), "excluded": len(skip), "task": task,
                      "kept_existing": len(files) - len(todo), "written": 0, "empty": [], "skipped": []}
            if todo:
                device, dtype = device_dtype()
                captioner = Captioner(model_folder(FLORENCE, model), device, dtype)
                pbar = comfy.utils.ProgressBar(len(todo))
                for i, rel in enumerate(todo):
                    mm.throw_exception_if_processing_interrupted()
                    try:
                        img = dedup.load_image(root / rel)
                    except Exception as e:  # noqa: BLE001 - a bad file is a report entry
                        report["skipped"].append({"file": rel,
                                                  "reason": f"unreadable image: {type(e).__name__}: {e}"})
                        img = None
                    if img is not None:
                        text = captioner(img, task, max_new_tokens, num_beams)
                        if not text:
                            report["empty"].append(rel)
                        elif write_caption(root / rel, text, prefix, suffix, overwrite):
                            report["written"] += 1
                    pbar.update_absolute(i + 1, len(todo))
                del captioner
                mm.soft_empty_cache()
        log.info("OboroCaptionDataset: %s: %d captions written, %d kept, %d skipped", root, report["written"],
                 report["kept_existing"], len(report["skipped"]))
        text = json.dumps(report, indent=1, ensure_ascii=False)
        return io.NodeOutput(str(root), text, ui={"text": (text,)})


class OboroScoreDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroScoreDataset",
            display_name="oboro Score Dataset (Aesthetic v2.5)",
            category="oboro/dataset",
            description="Scores every image of a dataset folder with Aesthetic Predictor v2.5 (SigLIP + its head, "
                        f"from models/{AESTHETIC}/<name>/) into metadata.jsonl; OboroCacheLatents' score_column "
                        "turns the scores into the paper's quality tags and drops images below 4.",
            inputs=[
                io.String.Input("dataset_dir", tooltip="Folder of images inside ComfyUI's input folder, output "
                                                       "folder or OBORO_ALLOWED_ROOTS (metadata.jsonl is written "
                                                       "there)."),
                io.Combo.Input("model", options=model_folders(AESTHETIC),
                               tooltip=f"A folder in models/{AESTHETIC}/: the SigLIP vision model (config.json, "
                                       "*.safetensors, optional preprocessor_config.json; or in a siglip/ "
                                       "sub-folder) and aesthetic_predictor_v2_5.safetensors or .pth."),
                io.String.Input("score_column", default=SCORE_COLUMN, tooltip="metadata.jsonl column to write."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace existing scores in that column."),
                io.Int.Input("batch_size", default=8, min=1, max=256, optional=True,
                             tooltip="Images scored at once; lower it if memory runs out."),
                io.String.Input("exclude_list", default="", optional=True,
                                tooltip="Skip these images (OboroDedupDataset's exclude_list)."),
            ],
            outputs=[io.String.Output("dataset", display_name="dataset_dir"),
                     io.String.Output("report", display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, dataset_dir="", **kwargs):
        return folder_state(dataset_dir)

    @classmethod
    def execute(cls, dataset_dir, model, score_column, overwrite, batch_size=8, exclude_list="") -> io.NodeOutput:
        root = writable_dataset(dataset_dir)
        column = (score_column or "").strip()
        if not column or column in ("file_name", "text", "caption"):
            raise ValueError(f"score_column {score_column!r}: name a column of its own, e.g. {SCORE_COLUMN!r}")
        skip = excluded(exclude_list)
        with folder_lock(root, "OboroScoreDataset (writes metadata.jsonl)"):
            files = [f for f in dedup.list_images(root) if f not in skip]
            meta, _ = read_metadata(root, [Path(d) for d, _, _ in os.walk(root)], column)
            todo = [f for f in files if overwrite or meta.get(f, (None, None))[1] is None]
            report = {"dataset_dir": str(root), "images": len(files), "excluded": len(skip), "score_column": column,
                      "kept_existing": len(files) - len(todo), "written": 0, "skipped": [], "scores": {}}
            scores = {}
            if todo:
                device, dtype = device_dtype()
                scorer = AestheticScorer(model_folder(AESTHETIC, model), device, dtype)
                pbar = comfy.utils.ProgressBar(len(todo))
                for start in range(0, len(todo), batch_size):
                    mm.throw_exception_if_processing_interrupted()
                    names, imgs = [], []
                    for rel in todo[start:start + batch_size]:
                        try:
                            imgs.append(dedup.load_image(root / rel))
                            names.append(rel)
                        except Exception as e:  # noqa: BLE001
                            report["skipped"].append({"file": rel,
                                                      "reason": f"unreadable image: {type(e).__name__}: {e}"})
                    if imgs:
                        scores.update(zip(names, scorer(imgs)))
                    pbar.update_absolute(min(start + batch_size, len(todo)), len(todo))
                del scorer
                mm.soft_empty_cache()
                report.update(write_scores(root, scores, column, overwrite))
        report["scores"] = {k: round(v, 3) for k, v in list(scores.items())[:200]}
        log.info("OboroScoreDataset: %s: %d scores written", root, report["written"])
        text = json.dumps(report, indent=1, ensure_ascii=False)
        return io.NodeOutput(str(root), text, ui={"text": (text,)})
