"""Template thumbnails (`scripts/oboro-thumbnails`): example_workflows/<name>.jpg, the picture
ComfyUI's template browser shows for <name>.json (the frontend asks for `.jpg`), made from a real
run of that very workflow: the UI file converted with the live node definitions and executed by
ComfyUI's own executor in this process, with the offline demo's tiny models (demo/offline.py) and
only what makes it CPU-sized changed (model names, 32x32, steps). Nothing is drawn by hand:

- txt2img: 4 captions of the demo, seed 0, one run each, tiled;
- demo_txt2img: that template exactly as shipped (it is made for the demo's files): its 4 images;
- txt2img_lora: two demo captions without | with the LoRA (strength 0 | 1) of a short LoRA training
  run (the lora_training thumbnail's, or one made here), at the demo's own size;
- img2img: two demo training images, each re-prompted to another colour (input | result);
- mask_text: two held-out masks of the mask evaluation (demo/mask_eval.py), with their captions
  (mask | result); the adapter comes from `--mask-adapter` or a short oboro-mask-eval run;
- lora_training / full_finetune: a short real training run from the trained demo model; its
  preview row (3 prompts) above its loss curve, both images the node itself returned;
- dataset_prep: its dedup half (no Florence-2 / SigLIP weights offline) on four demo images plus
  the four near-duplicate edits of each (demo/near_dups.py): the node's contact sheet. Needs no
  demo model.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from . import data as dd
from . import offline as demo

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "example_workflows"
NAMES = ("oboro_txt2img", "oboro_img2img", "oboro_mask_text", "oboro_lora_training", "oboro_full_finetune",
         "oboro_dataset_prep", "oboro_demo_txt2img", "oboro_txt2img_lora")
LORA_TRAINING = "thumbnail_oboro_lora_training"  # output_name of the lora_training thumbnail run
SIZE, TILE = 32, 128  # generation size of the demo; thumbnail tile (nearest-neighbour upscale)
MASK_PALETTE = ((0, 0, 0), (230, 80, 80), (80, 200, 80), (80, 120, 230))  # the workflow's default palette


def parse_args(argv):
    p = argparse.ArgumentParser(prog="oboro-thumbnails", description="Regenerate example_workflows/*.jpg from "
                                "real runs of each template with the offline demo's models (CPU, minutes).")
    p.add_argument("--demo", default=str(REPO / "out" / "demo"), help="oboro-demo output folder to reuse; made "
                   "there when missing (default: out/demo)")
    p.add_argument("--mask-adapter", default="", help="mask adapter for oboro_mask_text (e.g. out/mask_eval/"
                   "mask_adapter.safetensors); default: a short oboro-mask-eval run (--adapter-steps) on the demo")
    p.add_argument("--adapter-steps", type=int, default=400, help="adapter steps of that short run")
    p.add_argument("--work", default=str(REPO / "out" / "thumbnails"),
                   help="scratch folder (its output/ is emptied first; default: out/thumbnails)")
    p.add_argument("--only", nargs="*", choices=NAMES, default=list(NAMES), help="templates to redo")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"oboro thumbnails: {msg}", file=sys.stderr, flush=True)


class Runner:
    """Runs a template as the frontend would submit it, with per-node input overrides."""

    def __init__(self, demo_dir: Path, work: Path):
        from ..runner import embedded
        import folder_paths
        models = demo_dir / "models"
        # the demo's dataset and this scratch folder are read by the templates' nodes (nodes/paths.py)
        os.environ["OBORO_READ_ROOTS"] = os.pathsep.join(
            filter(None, (os.environ.get("OBORO_READ_ROOTS"), str(demo_dir.resolve()), str(work.resolve()))))
        # ... and the training templates' caches are written there (an absolute cache_name)
        os.environ["OBORO_ALLOWED_ROOTS"] = os.pathsep.join(
            filter(None, (os.environ.get("OBORO_ALLOWED_ROOTS"), str(work.resolve()))))
        self.out = work / "output"
        for d in (self.out, work / "input", work / "models" / "diffusion_models", work / "models" / "loras",
                  work / "models" / "oboro_mask_adapters"):
            d.mkdir(parents=True, exist_ok=True)
        embedded.start(cpu=True, output_dir=str(self.out), model_dirs={
            k: str(models / k) for k in ("diffusion_models", "text_encoders", "vae")})
        folder_paths.set_input_directory(str(work / "input"))
        # Trained files go to the scratch folder (first in the list), never into the demo's models.
        for kind in ("diffusion_models", "loras", "oboro_mask_adapters"):
            folder_paths.add_model_folder_path(kind, str(work / "models" / kind), is_default=True)
        self.embedded, self.work = embedded, work

    def run(self, name: str, changes: dict) -> dict:
        """changes: {class_type or node title: {input: value}}; every key must name exactly one node."""
        from ..runner import convert
        api = convert.to_api(convert.load(TEMPLATES / f"{name}.json"), convert.local_node_defs())
        for key, inputs in changes.items():
            hits = [n for n in api.values() if key in (n["class_type"], n.get("_meta", {}).get("title"))]
            if len(hits) != 1:
                raise KeyError(f"{name}: {key!r} names {len(hits)} nodes")
            hits[0]["inputs"].update(inputs)
        return self.embedded.run(api)

    def images(self, result: dict) -> list[Image.Image]:
        """Every image the run's SaveImage nodes wrote, in node order."""
        out = []
        for node in sorted(result["outputs"], key=int):
            for info in result["outputs"][node].get("images", []):
                out.append(Image.open(self.out / info["subfolder"] / info["filename"]).convert("RGB"))
        return out


def demo_models() -> dict:
    return {"OboroModelLoader": {"model_name": f"{demo.TRAINED}.safetensors"},
            "OboroT5Loader": {"t5_name": demo.T5_FILE}, "VAELoader": {"vae_name": "pixel_space"}}


def sampling(prompt: str) -> dict:
    return {"Positive Prompt": {"text": prompt}, "OboroSampler": {"steps": 20, "cfg": 3.0, "seed": 0}}


def empty_latent() -> dict:
    return {"EmptyOboroLatentImage": {"width": SIZE, "height": SIZE, "channels": "3 (pixel space)"}}


def up(im: Image.Image, w: int = TILE, h: int = TILE) -> Image.Image:
    return im.resize((w, h), Image.Resampling.NEAREST)


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    sheet = Image.new("RGB", (TILE * len(rows[0]), TILE * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            sheet.paste(up(im), (j * TILE, i * TILE))
    return sheet


def txt2img(r: Runner) -> Image.Image:
    combos = [("circle", "red", "white", "center"), ("square", "blue", "black", "left"),
              ("triangle", "yellow", "gray", "right"), ("circle", "cyan", "black", "top")]
    ims = [r.images(r.run("oboro_txt2img", {**demo_models(), **empty_latent(), **sampling(dd.caption(*c))}))[0]
           for c in combos]
    return grid([ims[:2], ims[2:]])


def demo_txt2img(r: Runner) -> Image.Image:
    ims = r.images(r.run("oboro_demo_txt2img", {}))
    return grid([ims[:2], ims[2:4]])


def txt2img_lora(r: Runner, demo_dir: Path) -> Image.Image:
    loras = sorted((r.work / "models" / "loras").glob(f"{LORA_TRAINING}*.safetensors"), key=lambda p: p.stat().st_mtime)
    if not loras:
        log("oboro_txt2img_lora: training its LoRA with the lora_training template first")
        training(r, "oboro_lora_training", demo_dir)
        loras = sorted((r.work / "models" / "loras").glob(f"{LORA_TRAINING}*.safetensors"),
                       key=lambda p: p.stat().st_mtime)
    rows, size = [], demo.parse_args([]).size  # the size the demo trains at (as its template)
    for combo in (("circle", "red", "white", "center"), ("square", "blue", "black", "left")):
        rows.append([r.images(r.run("oboro_txt2img_lora", {
            **demo_models(), **sampling(dd.caption(*combo)),
            "EmptyOboroLatentImage": {"width": size, "height": size, "channels": "3 (pixel space)"},
            "LoraLoaderModelOnly": {"lora_name": loras[-1].name, "strength_model": strength}}))[0]
            for strength in (0.0, 1.0)])
    return grid(rows)


def img2img(r: Runner, demo_dir: Path) -> Image.Image:
    rows = []
    for src, colour in ((("circle", "red", "white", "center"), "blue"), (("square", "cyan", "black", "left"), "red")):
        name = f"{dd.stem(*src)}.png"
        shutil.copyfile(demo_dir / "dataset" / "images" / name, r.work / "input" / name)
        prompt = dd.caption(src[0], colour, *src[2:])
        res = r.run("oboro_img2img", {**demo_models(), **sampling(prompt), "LoadImage": {"image": name},
                                      "ImageScale": {"width": SIZE, "height": SIZE},
                                      "OboroSampler": {"steps": 20, "cfg": 3.0, "seed": 0, "denoise": 0.75}})
        rows.append([Image.open(r.work / "input" / name).convert("RGB"), r.images(res)[0]])
    return grid(rows)


def mask_adapter(opts, demo_dir: Path, work: Path) -> Path:
    if opts.mask_adapter:
        return Path(opts.mask_adapter).resolve()
    from . import mask_eval
    out = work / "mask_eval"
    log(f"training a mask adapter ({opts.adapter_steps} steps) with oboro-mask-eval in {out}")
    rc = mask_eval.main(["--demo", str(demo_dir), "--out", str(out), "--adapter-steps", str(opts.adapter_steps),
                         "--seeds", "1", "--threads", str(opts.threads)])
    if rc != 0:
        raise RuntimeError(f"oboro-mask-eval failed (exit {rc})")
    return out / "mask_adapter.safetensors"


def mask_text(r: Runner, adapter: Path) -> Image.Image:
    from .mask_eval import case_labels, eval_cases
    target = r.work / "models" / "oboro_mask_adapters" / "thumbnail_adapter.safetensors"
    shutil.copyfile(adapter, target)
    rows = []
    for case in [c for c in eval_cases()][::5][:2]:
        labels = case_labels(case, SIZE).numpy()
        mask = Image.fromarray(np.asarray(MASK_PALETTE, dtype=np.uint8)[labels])
        name = f"mask_{case['shape']}_{case['colour']}.png"
        mask.save(r.work / "input" / name)
        res = r.run("oboro_mask_text", {**demo_models(), **empty_latent(), **sampling(case["prompt"]),
                                        "Mask (label map)": {"image": name},
                                        "OboroMaskAdapterLoader": {"adapter_name": target.name}})
        rows.append([mask, r.images(res)[0]])
    return grid(rows)


def training(r: Runner, name: str, demo_dir: Path) -> Image.Image:
    kind = "OboroLoRATrainer" if "lora" in name else "OboroFullTrainer"
    previews = [dd.caption(*c) for c in demo.held_out_prompts()[::3]]
    train = {"output_name": f"thumbnail_{name}", "steps": 20, "lr": 1e-3 if "lora" in name else 1e-4,
             "preview_prompts": "\n".join(previews), "preview_every": 20}
    options = {"batch_size": 8, "warmup": 0, "precision": "fp32", "gradient_checkpointing": False,
               "checkpoint_every": 0, "preview_steps": 20, "preview_cfg": 3.0}
    # The demo's dataset and cache settings (demo/offline.py), cached in the scratch folder: the demo's
    # own cache stays as oboro-mask-eval expects it.
    cache = {"dataset_dir": str(demo_dir / "dataset" / "images"), "policy": "fixed", "size": SIZE, "max_tokens": 64,
             "cache_name": str(r.work / "cache")}
    res = r.run(name, {**demo_models(), "OboroCacheLatents": cache, kind: train, "OboroTrainingOptions": options})
    loss, preview = r.images(res)  # SaveImage "Loss curve" (node 6), "Previews" (node 7)
    w = TILE * 3
    top = up(preview, w, w * preview.height // preview.width)
    bottom = loss.resize((w, w * loss.height // loss.width), Image.Resampling.LANCZOS)
    sheet = Image.new("RGB", (w, top.height + bottom.height), "white")
    sheet.paste(top, (0, 0))
    sheet.paste(bottom, (0, top.height))
    return sheet


def dataset_prep(r: Runner) -> Image.Image:
    from ..runner import convert
    from .near_dups import EDITS
    images = Path(dd.write_dataset(r.work / "demo_data")["dataset_dir"])
    data = r.work / "dataset_prep"
    shutil.rmtree(data, ignore_errors=True)
    (data / "copies").mkdir(parents=True)
    for combo in [("circle", "red", "white", "center"), ("square", "blue", "black", "left"),
                  ("triangle", "yellow", "gray", "right"), ("circle", "cyan", "black", "top")]:
        src = Image.open(images / f"{dd.stem(*combo)}.png").convert("RGB")
        src.save(data / f"{dd.stem(*combo)}.png")
        for edit in EDITS:
            edit(src).save(data / "copies" / f"{dd.stem(*combo)}_{edit.__name__}.png")
    api = convert.to_api(convert.load(TEMPLATES / "oboro_dataset_prep.json"), convert.local_node_defs())
    api = {k: v for k, v in api.items() if v["class_type"] in ("OboroDedupDataset", "SaveImage")}
    next(v for v in api.values() if v["class_type"] == "OboroDedupDataset")["inputs"].update(
        dataset_dir=str(data), report_name="thumbnail")
    sheet, = r.images(r.embedded.run(api))
    return sheet


def run(opts) -> int:
    import torch
    torch.set_num_threads(max(1, opts.threads))
    t0, work = time.monotonic(), Path(opts.work).resolve()
    demo_dir = Path(opts.demo).resolve()
    needs_demo = set(opts.only) - {"oboro_dataset_prep"}
    if needs_demo and not (demo_dir / "models" / "diffusion_models" / f"{demo.TRAINED}.safetensors").is_file():
        log(f"no demo in {demo_dir}: running the offline demo there first")
        if demo.run(demo.parse_args(["--out", str(demo_dir), "--threads", str(opts.threads)])) != 0:
            return 1
    adapter = mask_adapter(opts, demo_dir, work) if "oboro_mask_text" in opts.only else None
    shutil.rmtree(work / "output", ignore_errors=True)
    r = Runner(demo_dir, work)
    makers = {"oboro_txt2img": lambda: txt2img(r), "oboro_img2img": lambda: img2img(r, demo_dir),
              "oboro_mask_text": lambda: mask_text(r, adapter),
              "oboro_lora_training": lambda: training(r, "oboro_lora_training", demo_dir),
              "oboro_full_finetune": lambda: training(r, "oboro_full_finetune", demo_dir),
              "oboro_dataset_prep": lambda: dataset_prep(r), "oboro_demo_txt2img": lambda: demo_txt2img(r),
              "oboro_txt2img_lora": lambda: txt2img_lora(r, demo_dir)}
    for name in opts.only:
        log(f"{name}: running the template")
        path = TEMPLATES / f"{name}.jpg"
        makers[name]().save(path, quality=90)
        log(f"wrote {path}")
    log(f"done in {time.monotonic() - t0:.0f}s")
    return 0


def main(argv=None) -> int:
    return run(parse_args(sys.argv[1:] if argv is None else argv))
