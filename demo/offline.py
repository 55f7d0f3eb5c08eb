"""The offline demo (`scripts/oboro-demo`; `make run` when the real model files are missing): oboro
learning from a small procedural dataset on 2 CPU cores in a few minutes, through the shipped
workflows run by oboro-run (runner/cli.py, in this process):

1. data: demo/data.py writes 225 captioned 64x64 images with masks (3 shapes x 6 colours
   x 3 backgrounds x 5 positions, minus 3 held-out (shape, colour) pairs), plus 135 augmentation images
   of every shape in 3 colours never prompted (orange, purple, brown);
2. models: a from-scratch pixel-space MMH-DiT and a tiny frozen random T5 (real T5 tokenizer), in
   <out>/models/{diffusion_models,text_encoders,vae};
3. train: example_workflows/oboro_full_finetune.json (OboroCacheLatents with the pixel_space VAE, then
   OboroFullTrainer + OboroTrainingOptions), with --set overrides;
4. generate: example_workflows/oboro_txt2img.json on held-out prompts, plus a few training captions as a
   control, two seeds each;
5. report: the PNGs, contact_sheet.png, loss.png and report.json, with pixel-level scores of
   whether each image shows the prompt's colour, background, position and shape.

Recipe (bench/demo_recipe.py, README "Offline demo"): the images are cached and generated at 16x16 with
patch 2 (64 image tokens of 12 values; 48-value tokens at 32x32 patch 4 fit as blobs), logit-normal
timestep sampling, 1300 steps (1200 instead of 800: seen-caption shapes ~83 % -> ~98 %, held-out
composition ~46 % -> ~62 %, two training seeds each; 1300 is what fits in the 5-minute budget), and heads 4/4/8/8 rather than 2/4/4/8 (held-out composition ~62 %
-> ~76 %; bench/ablation_heads.py: uniform heads compose best, so the demo's heads grow gently), and
the extra-colour augmentation (each prompted colour still lacks one shape, but most colours in the data
come in every shape: held-out composition 77.8 % -> 81.1 % over three training seeds, lower held-out
validation loss in each); the scorer judges 16 px renders perfectly.
`--size 32` is the earlier recipe; at 64x64 the same model needs 256 tokens, about 4.5x the time per
step, and its samples stay noise in this time; it is also the fallback while OboroCacheLatents refuses
the smaller size.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..oboro_model import MMHDiT, OboroConfig, save_checkpoint
from . import data as dd

REPO = Path(__file__).resolve().parents[1]
INIT, TRAINED, T5_FILE = "oboro-demo-init.safetensors", "oboro-demo", "oboro-demo-t5.safetensors"
T5_CONFIG = dict(vocab_size=32128, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                 feed_forward_proj="gated-gelu")
SETUPS = {  # training/generation size -> model, batch size, peak LR, timestep sampling, augmentation colours
    # (README "Offline demo")
    16: dict(model=dict(patch_size=2, hidden_size=128, depth=4, heads=(4, 4, 8, 8), mlp_hidden=256, adaln_dim=128),
             batch_size=32, lr=3e-3, t_sampling="logit_normal", extra_colours=3),
    32: dict(model=dict(patch_size=4, hidden_size=128, depth=4, heads=(2, 4, 4, 8), mlp_hidden=256, adaln_dim=128),
             batch_size=32, lr=3e-3, t_sampling="uniform"),
    64: dict(model=dict(patch_size=4, hidden_size=64, depth=4, heads=(1, 2, 2, 4), mlp_hidden=128, adaln_dim=64),
             batch_size=16, lr=3e-3, t_sampling="uniform"),
}
CONTROL = (("circle", "red", "white", "center"), ("square", "blue", "black", "left"),
           ("triangle", "yellow", "gray", "right"))
ALLOWED_ENV = "OBORO_ALLOWED_ROOTS"  # nodes/paths.py: where absolute write paths may point
OWNED = ("dataset", "models", "cache", "train", "samples", "contact_sheet.png", "loss.png", "training_previews.png",
         "report.json")
LOSS_LINE = re.compile(r"step (\d+)/(\d+)\s+loss (\S+)")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="oboro-demo", description="Offline demo: train a tiny oboro model on a "
                                "procedural dataset and generate held-out caption combinations (CPU, minutes).")
    p.add_argument("--out", default=str(REPO / "out" / "demo"), help="output folder (default: out/demo)")
    p.add_argument("--steps", type=int, default=1300, help="training steps (default: %(default)s)")
    p.add_argument("--size", type=int, choices=sorted(SETUPS), default=16, help="train/generate size in px")
    p.add_argument("--seeds", type=int, default=2, help="images per prompt (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: the faster of 1 and 2, "
                   "measured; 2 threads run several times slower than 1 when other work shares the cores)")
    p.add_argument("--gpu", action="store_true", help="let ComfyUI use a GPU (default: CPU, as the demo is sized for)")
    return p.parse_args(argv)


def held_out_prompts() -> list[tuple]:
    """3 prompts per held-out pair: every background once, positions rotating."""
    out, positions = [], list(dd.POSITIONS)
    for i, (shape, colour) in enumerate(dd.HELD_OUT):
        out += [(shape, colour, bg, positions[(3 * i + j) % len(positions)]) for j, bg in enumerate(dd.BACKGROUNDS)]
    return out


def pick_threads(requested: int, cfg: OboroConfig, batch: int, size: int) -> tuple[int, dict]:
    if requested:
        torch.set_num_threads(requested)
        return requested, {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores < 2:
        torch.set_num_threads(1)
        return 1, {}
    net, times = MMHDiT(cfg), {}
    x, t, txt = torch.randn(batch, 3, size, size), torch.rand(batch), torch.randn(batch, 15, cfg.text_dim)
    for n in (1, 2):
        torch.set_num_threads(n)
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            net(x, t, txt).square().mean().backward()
            best = min(best, time.perf_counter() - t0)
            if n > 1 and best > 2 * times[1]:  # clearly slower (busy cores): stop probing
                break
        times[n] = round(best, 3)
    n = min(times, key=times.get)
    torch.set_num_threads(n)
    return n, times


def cache_min_size(gpu: bool) -> int:
    """The smallest `size` OboroCacheLatents accepts (ComfyUI loaded here, as oboro-run will)."""
    from ..runner import embedded
    from ..runner.convert import input_specs, local_node_defs
    embedded.start(cpu=not (gpu and torch.cuda.is_available()))
    info = local_node_defs(["OboroCacheLatents"]).get("OboroCacheLatents", {})
    return int(input_specs(info).get("size", ("INT", {}))[1].get("min", 0))


def write_models(root: Path, cfg: OboroConfig, seed: int = 0) -> dict:
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel
    for kind in ("diffusion_models", "text_encoders", "vae"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    net = MMHDiT(cfg).initialize_weights(generator=torch.Generator().manual_seed(seed))
    save_checkpoint(root / "diffusion_models" / INIT, net)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(**T5_CONFIG)).eval()
    save_file({k: v.contiguous().clone() for k, v in t5.state_dict().items()}, str(root / "text_encoders" / T5_FILE))
    return {"config": cfg.to_dict(), "parameters": sum(p.numel() for p in net.parameters()),
            "init": f"models/diffusion_models/{INIT}", "trained": f"models/diffusion_models/{TRAINED}.safetensors",
            "text_encoder": {"file": f"models/text_encoders/{T5_FILE}", **T5_CONFIG,
                             "parameters": sum(p.numel() for p in t5.parameters()), "weights": "random, frozen"},
            "vae": "pixel_space (ComfyUI built-in)"}


class LossLog(logging.Handler):
    """The training node's progress lines (logger "oboro", about one a second): kept, and echoed
    every 15 s; warnings pass through to stderr."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.points, self.said = [], 0.0

    def emit(self, record):
        msg = record.getMessage()
        m = LOSS_LINE.search(msg) if record.name == "oboro" else None
        if m:
            self.points.append((int(m[1]), float(m[3])))
            if time.monotonic() - self.said > 15 or m[1] == m[2]:
                self.said = time.monotonic()
                print(f"oboro demo: {msg}", file=sys.stderr, flush=True)
        elif record.levelno >= logging.WARNING:
            print(f"{record.levelname} {msg}", file=sys.stderr, flush=True)


def oboro_run(args: list[str]) -> int:
    from ..runner import cli
    with contextlib.redirect_stdout(sys.stderr):  # oboro-run prints saved paths on stdout
        return cli.main(args)


def runs(folder: Path) -> list[dict]:
    lines = (folder / "runs.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train(out: Path, dataset_dir: str, setup: dict, steps: int, size: int, device: list, previews: list) -> LossLog:
    trainer = {"output_name": TRAINED, "steps": steps, "lr": setup["lr"], "save_dtype": "fp32",
               "preview_prompts": "\n".join(previews), "preview_every": max(1, steps // 3)}
    options = {"batch_size": setup["batch_size"], "warmup": min(30, steps // 10), "schedule": "cosine",
               "t_sampling": setup["t_sampling"], "precision": "fp32", "gradient_checkpointing": "false",
               "caption_dropout": 0.1, "checkpoint_every": 0, "keep_last": 1,
               "overwrite": "true",  # the demo owns its --out: a re-run replaces its own model
               "preview_cfg": 3.0, "preview_steps": 20}
    sets = {"OboroModelLoader.model_name": INIT, "OboroT5Loader.t5_name": T5_FILE, "VAELoader.vae_name": "pixel_space",
            "OboroCacheLatents.dataset_dir": dataset_dir, "OboroCacheLatents.policy": "fixed",
            "OboroCacheLatents.size": size, "OboroCacheLatents.max_tokens": 64,
            "OboroCacheLatents.cache_name": str((out / "cache").resolve()),
            **{f"OboroFullTrainer.{k}": v for k, v in trainer.items()},
            **{f"OboroTrainingOptions.{k}": v for k, v in options.items()}}
    log, handler = logging.getLogger("oboro"), LossLog()
    saved = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    allowed = os.environ.get(ALLOWED_ENV)  # the cache lives in the demo's --out: allow it (nodes/paths.py)
    os.environ[ALLOWED_ENV] = os.pathsep.join(filter(None, (allowed, str(out.resolve()))))
    try:
        rc = oboro_run([str(REPO / "example_workflows" / "oboro_full_finetune.json"), "--models", str(out / "models"),
                        "--out", str(out / "train"), *device, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        if allowed is None:
            os.environ.pop(ALLOWED_ENV, None)
        else:
            os.environ[ALLOWED_ENV] = allowed
    if rc != 0:
        raise RuntimeError(f"the training workflow failed (oboro-run exit {rc}); see the messages above")
    found = [f for r in runs(out / "train") for f in r["outputs"]]
    for f in [f for f in found if "full_loss" in f][-1:]:
        shutil.copyfile(out / "train" / f, out / "loss.png")
    rows = sorted(f for f in found if "full_previews" in f)  # one file per preview step
    every = max(1, steps // 3)
    at = [s for s in range(every, steps + 1, every)] + ([steps] if steps % every else [])
    if rows:  # the node saves one image per preview step: stacked here, labelled
        tile, label, head = 80, 70, 30
        sheet = Image.new("RGB", (label + tile * len(previews), head + tile * len(rows)), "white")
        draw = ImageDraw.Draw(sheet)
        for j, p in enumerate(previews):  # "a green triangle on a white background, left"
            what, _, where = p.removeprefix("a ").partition(" on a ")
            draw.text((label + j * tile + 2, 2), f"{what}\n{where.replace(' background', '')}", fill="black", font=font(10))
        for i, f in enumerate(rows):
            img = Image.open(out / "train" / f).convert("RGB")
            sheet.paste(img.resize((tile * len(previews), tile), Image.Resampling.NEAREST), (label, head + i * tile))
            draw.text((4, head + i * tile + tile // 2 - 7), f"step {at[i] if i < len(at) else '?'}", fill="black",
                      font=font(12))
        sheet.save(out / "training_previews.png")
    return handler


def generate(out: Path, prompts: list[tuple], size: int, seeds: int, device: list) -> list[dict]:
    rows = out / "samples" / "prompts.jsonl"
    rows.parent.mkdir(parents=True, exist_ok=True)
    rows.write_text("".join(json.dumps({"Positive Prompt.text": dd.caption(*c), "Save Image.filename_prefix":
                                        f"{split}/{dd.stem(*c)}"}) + "\n" for split, c in prompts), encoding="utf-8")
    rc = oboro_run([str(REPO / "example_workflows" / "oboro_txt2img.json"), "--models", str(out / "models"),
                    "--out", str(out / "samples"), "--batch", str(rows), "--seeds", f"0:{seeds}", *device,
                    "--set", f"OboroModelLoader.model_name={TRAINED}.safetensors", "--set", f"OboroT5Loader.t5_name={T5_FILE}",
                    "--set", "VAELoader.vae_name=pixel_space", "--set", f"EmptyOboroLatentImage.width={size}",
                    "--set", f"EmptyOboroLatentImage.height={size}", "--set", "EmptyOboroLatentImage.channels=3 (pixel space)",
                    "--set", "OboroSampler.steps=20", "--set", "OboroSampler.cfg=3.0"])
    if rc != 0:
        raise RuntimeError(f"the txt2img workflow failed (oboro-run exit {rc}); see the messages above")
    combos = {dd.caption(*c): (split, c) for split, c in prompts}
    images = []
    for r in runs(out / "samples"):
        split, combo = combos[r["overrides"]["Positive Prompt.text"]]
        file = f"samples/{r['outputs'][0]}"
        images.append({"prompt": dd.caption(*combo), "split": split, "seed": r["seed"], "file": file,
                       **dd.score_image(Image.open(out / file), *combo)})
    return images


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def contact_sheet(out: Path, images: list[dict], seeds: int, lines: list[str], per_row: int = 3) -> None:
    """Cells of [reference render | one image per seed], the caption above, below each image its
    colour / position / shape verdicts (green = as prompted, red = not); held-out cells first."""
    tile, gap, pad, f, small = 80, 4, 12, font(13), font(11)
    cell_w, cell_h = (1 + seeds) * (tile + gap) - gap, 18 + tile + 16
    prompts = list(dict.fromkeys((im["split"], im["prompt"]) for im in images))
    sections = [(s, [p for sp, p in prompts if sp == s]) for s in dict.fromkeys(sp for sp, _ in prompts)]
    W = pad + per_row * (cell_w + 2 * pad)
    H = pad + 18 * len(lines) + sum(24 + math.ceil(len(ps) / per_row) * (cell_h + pad) for _, ps in sections)
    sheet = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for i, line in enumerate(lines):
        draw.text((pad, y), line, fill="black" if i == 0 else "dimgray", font=f if i == 0 else small)
        y += 18
    refs = {dd.caption(*c): f"dataset/{'heldout/' if split == 'heldout' else ''}images/{dd.stem(*c)}.png"
            for split in ("train", "heldout") for c in dd.combinations(split)}
    for split, ps in sections:
        draw.text((pad, y + 4), "held-out (shape, colour) pairs, never in training" if split == "heldout"
                  else "control: captions seen in training", fill="navy", font=f)
        y += 24
        for k, prompt in enumerate(ps):
            x0, y0 = pad + (k % per_row) * (cell_w + 2 * pad), y + (k // per_row) * (cell_h + pad)
            draw.text((x0, y0), prompt, fill="black", font=small)
            tiles = [Image.open(out / refs[prompt])] + [Image.open(out / im["file"]) for im in images
                                                         if im["prompt"] == prompt][:seeds]
            for j, img in enumerate(tiles):
                x = x0 + j * (tile + gap)
                sheet.paste(img.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x, y0 + 18))
            for j, im in enumerate(im for im in images if im["prompt"] == prompt):
                x = x0 + (1 + j) * (tile + gap)
                for n, key in enumerate(("colour", "position", "shape")):
                    draw.text((x + n * 27, y0 + 18 + tile + 2), key[:3], font=small,
                              fill="green" if im[f"{key}_ok"] else "red")
        y += math.ceil(len(ps) / per_row) * (cell_h + pad)
    sheet.save(out / "contact_sheet.png")


def loss_summary(points: list) -> dict:
    """From the logged (step, loss) points: step 1's loss, the last, and means over a few at each end."""
    losses = [v for _, v in points if math.isfinite(v)]
    if not losses:
        return {"curve_file": "loss.png", "points": 0}
    k = max(1, min(10, len(losses) // 4))
    return {"first": losses[0], "last": losses[-1], "min": min(losses), "first_mean": sum(losses[:k]) / k,
            "last_mean": sum(losses[-k:]) / k, "mean_of": k, "points": len(losses), "curve_file": "loss.png",
            "curve": [[s, round(v, 5)] for s, v in points]}


def main(argv=None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(opts)
    except RuntimeError as e:
        print(f"oboro demo: error: {e}", file=sys.stderr)
        return 1


def run(opts) -> int:
    t_start, out, seconds = time.monotonic(), Path(opts.out).resolve(), {}
    out.mkdir(parents=True, exist_ok=True)
    for name in OWNED:  # only what an earlier demo run left here
        p = out / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    device = [] if opts.gpu else ["--cpu"]

    def lap(name, t0):
        seconds[name] = round(time.monotonic() - t0, 1)
        print(f"oboro demo: {name} done in {seconds[name]}s", file=sys.stderr, flush=True)
        return time.monotonic()

    t0 = time.monotonic()
    smallest = cache_min_size(opts.gpu)
    if opts.size < smallest:
        print(f"oboro demo: WARNING: OboroCacheLatents accepts size >= {smallest} only, so the demo trains at "
              f"64x64 instead of {opts.size}x{opts.size}: about 4.5x slower per step, and its samples stay mostly "
              "noise in this time (lower the node's size minimum to 32 for the intended demo)", file=sys.stderr)
        opts.size = 64
    setup = SETUPS[opts.size]
    cfg = OboroConfig(in_channels=3, text_dim=T5_CONFIG["d_model"], **setup["model"])
    threads, probe = pick_threads(opts.threads, cfg, setup["batch_size"], opts.size)
    print(f"oboro demo: {threads} torch thread(s) {probe or ''}".rstrip(), file=sys.stderr)
    t0 = lap("setup", t0)
    data = dd.write_dataset(out / "dataset", extra_colours=setup.get("extra_colours", 0))
    t0 = lap("data", t0)
    model = write_models(out / "models", cfg)
    t0 = lap("models", t0)
    held = held_out_prompts()
    train_captions = set(data["train_captions"])
    if train_captions & {dd.caption(*c) for c in held}:
        raise RuntimeError("a held-out prompt is a training caption")
    log = train(out, data["dataset_dir"], setup, opts.steps, opts.size, device, [dd.caption(*c) for c in held[::3]])
    t0 = lap("train", t0)
    images = generate(out, [("heldout", c) for c in held] + [("control", c) for c in CONTROL], opts.size,
                      opts.seeds, device)
    t0 = lap("generate", t0)
    loss = loss_summary(log.points)
    scores = {split: dd.summarize([im for im in images if im["split"] == split]) for split in ("heldout", "control")}
    refs = [dd.score_image(Image.open(out / "dataset" / "heldout" / "images" / f"{dd.stem(*c)}.png").resize(
        (opts.size, opts.size), Image.Resampling.LANCZOS), *c) for c in held]
    scores["references"] = dd.summarize(refs)  # the scorer on true renders of the held-out prompts
    lo, h, c = (loss.get("first", math.nan), loss.get("last_mean", math.nan)), scores["heldout"], scores["control"]
    contact_sheet(out, images, opts.seeds, [
        f"oboro offline demo: a {model['parameters'] / 1e6:.1f}M-parameter MMH-DiT trained from scratch for "
        f"{opts.steps} steps on {data['train']} captioned images ({opts.size}x{opts.size} px, CPU)",
        f"loss {lo[0]:.2f} at step 1 -> {lo[1]:.3f} at the end (loss.png); as prompted (chance 17 / 20 / 33 %): "
        f"colour / position / shape",
        f"held-out prompts {h['colour']:.0%} / {h['position']:.0%} / {h['shape']:.0%}; seen captions "
        f"{c['colour']:.0%} / {c['position']:.0%} / {c['shape']:.0%}",
        f"each cell: reference render (not trained on when held out), then seeds 0..{opts.seeds - 1}; "
        "col / pos / sha under an image: green = as prompted, red = not"])
    seconds["evaluate"] = round(time.monotonic() - t0, 1)
    seconds["total"] = round(time.monotonic() - t_start, 1)
    files = [n for n in ("contact_sheet.png", "loss.png", "training_previews.png") if (out / n).exists()]
    report = {
        "held_out_pairs": [list(p) for p in dd.HELD_OUT], "held_out_prompts": [dd.caption(*c) for c in held],
        "control_prompts": [dd.caption(*c) for c in CONTROL], "train_prompts_count": len(train_captions),
        "dataset": {"dir": "dataset", "train_images": data["train"], "augmentation_images": data["augmented"],
                    "augmentation_colours": list(dd.EXTRA_COLOURS)[:setup.get("extra_colours", 0)], "image_size": data["size"],
                    "masks": "dataset/masks", "index": "dataset/index.jsonl"},
        "files": files + [im["file"] for im in images] + ["report.json"], "seconds": seconds,
        "loss": loss, "steps": opts.steps, "batch_size": setup["batch_size"], "lr": setup["lr"],
        "resolution": opts.size, "t_sampling": setup["t_sampling"], "threads": threads, "thread_probe_seconds_per_step": probe, "model": model,
        "sampler": {"steps": 20, "cfg": 3.0, "solver": "euler", "seeds": list(range(opts.seeds))},
        "scores": scores, "images": images}
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"oboro demo: loss {lo[0]:.3f} -> {lo[1]:.3f}; held-out prompts: colour {h['colour']:.0%}, position "
          f"{h['position']:.0%}, shape {h['shape']:.0%} as prompted (chance 17/20/33%); {seconds['total']:.0f}s in all",
          file=sys.stderr)
    print(f"oboro demo: contact sheet {out / 'contact_sheet.png'}")
    print(f"oboro demo: report {out / 'report.json'}")
    return 0
