"""Mask-control evaluation on the offline demo (`scripts/oboro-mask-eval`): does a mask adapter make
the tiny demo model draw its shape where a held-out mask says, with and without the text prompt?

1. base: the demo's dataset and trained model (demo/offline.py's `run`, unchanged, in <out>/demo),
   or an existing demo output folder (`--demo DIR`) to skip those ~2 minutes;
2. adapter: on the training engine as OboroTrainMaskAdapter trains it (Trainer over MaskedLatents,
   outside ComfyUI): MaskControlDiT (decoupled) over the frozen demo model, text and mask dropout
   p = 0.1 each (a dropped text is no text tokens; `--dropped-text empty_prompt`: T5("")), on the
   demo's latent cache (its 225 training images, 32x32 pixel space, with their cached T5 states)
   and dataset/masks/ (labels 0 bg, 1 circle, 2 square, 3 triangle; nearest-
   resized 64 -> 32 as the node does); `--shift N` rolls each image and its mask together by up to
   N px (the demo has 5 positions only); `--image-rank` adds the image-stream LoRA; saved with
   save_mask_adapter to <out>/mask_adapter.safetensors. Defaults (3000 steps, batch 32, lr 4e-3
   warm-up + cosine, mask rank 16, image rank 32, shift 6) are what met the goal here (README);
   ~26 min on one CPU core;
3. generate: held-out masks, i.e. the 3 held-out (shape, colour) pairs (never in any training
   image) at 4 shape centres that are none of the demo's 5 positions, drawn at 32x32; each mask
   with its caption ("a green triangle on a black background" + nearest position word) and with
   the empty prompt T5("") (mask only; read as no tokens by a "no_tokens" adapter, as in ComfyUI),
   `--seeds` seeds each (8; the figure shows 4); Euler, 20 steps by default; with text:
   CFG on the text (negative = empty prompt, same mask: OboroApplyMaskControl's default); mask
   only: `--mask-cfg` guidance against no text and no mask (default 2; 1 = none; in ComfyUI:
   empty positive and negative prompts, mask_on_negative off);
4. score: foreground = pixels farther than 60 (RGB) from the background colour (demo_data's
   rule); the background is the nearest demo background to the image's border median, so the
   mask-only images, which name none, are judged the same way; IoU with the mask's foreground
   (label > 0) at the generation resolution;
5. report.json and mask_eval.png (rows: mask | prompt | results with text | results mask only).

T5: the held-out prompts are not in the cache, so they are encoded with the demo's T5 through
nodes/text_encoder.py (ComfyUI's CLIP wrapper, the encoder the cache was built with; checked
against a cached caption).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import data as dd
from ..oboro_model import load_checkpoint
from ..oboro_model.data import LatentCache
from ..oboro_model.mask_control import (DROPPED_TEXT, MaskAdapterConfig, MaskControlDiT, MaskedLatents,
                                        save_mask_adapter)
from ..oboro_model.training import TrainConfig, Trainer
from ..samplers.ode import prepare_noise, solve, time_grid
from . import offline as demo

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.85
SHEET_SEEDS = 4  # seeds per condition drawn in mask_eval.png (all count in the means)
# shape centres (x, y) as fractions: none is one of the demo's 5 positions
NEW_CENTRES = ((0.36, 0.36), (0.64, 0.38), (0.38, 0.64), (0.62, 0.62))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="oboro-mask-eval", description="Train a mask adapter on the offline demo and "
                                "score generated shapes against held-out masks (IoU), with and without text.")
    p.add_argument("--out", default=str(REPO / "out" / "mask_eval"), help="output folder (default: out/mask_eval)")
    p.add_argument("--demo", default="", help="an existing oboro-demo output folder to reuse (else one is made "
                   "in <out>/demo)")
    p.add_argument("--steps", type=int, default=800, help="demo base-model training steps, when no --demo")
    p.add_argument("--adapter-steps", type=int, default=3000, help="mask adapter training steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shift", type=int, default=6, help="adapter training: random shifts of image + mask by up to "
                   "this many pixels, keeping the shape inside (the demo has 5 positions only)")
    p.add_argument("--lr", type=float, default=4e-3, help="adapter AdamW lr (default %(default)s)")
    p.add_argument("--rank", type=int, default=16, help="mask-stream LoRA rank (default %(default)s)")
    p.add_argument("--image-rank", type=int, default=32, help="image-stream LoRA rank (0: image stream frozen; "
                   "default %(default)s)")
    p.add_argument("--dropped-text", choices=sorted(DROPPED_TEXT), default="no_tokens",
                   help="what a dropped text is in adapter training: no text tokens (default; then the empty "
                        "prompt T5(\"\") is read as that at sampling) or T5(\"\") as given")
    p.add_argument("--static-t", type=float, default=None, help="static path modulated at this t (default: none)")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0, help="text guidance (with-text runs)")
    p.add_argument("--mask-cfg", type=float, default=2.0, help="mask-only runs: guidance against no text and no "
                   "mask (1 = none; default %(default)s)")
    p.add_argument("--seeds", type=int, default=8, help="images per mask and condition (default %(default)s; the "
                   f"figure shows the first {SHEET_SEEDS})")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: the demo's probe)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"oboro mask-eval: {msg}", file=sys.stderr, flush=True)


def position_word(centre) -> str:
    return min(dd.POSITIONS, key=lambda p: math.dist(centre, dd.POSITIONS[p]))


def eval_cases() -> list[dict]:
    """12 held-out masks: the held-out (shape, colour) pairs x NEW_CENTRES, backgrounds rotating."""
    bgs, out = list(dd.BACKGROUNDS), []
    for i, (shape, colour) in enumerate(dd.HELD_OUT):
        for j, centre in enumerate(NEW_CENTRES):
            bg = bgs[(i + j) % len(bgs)]
            out.append({"shape": shape, "colour": colour, "background": bg, "centre": list(centre),
                        "prompt": dd.caption(shape, colour, bg, position_word(centre))})
    return out


def case_labels(case: dict, size: int) -> torch.Tensor:
    inside = np.asarray(dd.shape_mask(case["shape"], tuple(case["centre"]), size)) > 127
    return torch.from_numpy(inside.astype(np.int64) * (dd.SHAPES.index(case["shape"]) + 1))


def ensure_demo(opts, out: Path) -> tuple[Path, float]:
    t0 = time.monotonic()
    if opts.demo:
        d = Path(opts.demo).resolve()
        need = [d / "models" / "diffusion_models" / f"{demo.TRAINED}.safetensors", d / "cache" / "manifest.json",
                d / "dataset" / "masks", d / "models" / "text_encoders" / demo.T5_FILE]
        if missing := [str(p) for p in need if not p.exists()]:
            raise RuntimeError(f"--demo {d} is not a complete oboro-demo output: missing {missing}")
        log(f"reusing the demo output {d}")
        return d, 0.0
    d = out / "demo"
    log(f"running the offline demo ({opts.steps} steps) in {d}")
    # 32x32: the base its README figures and shift / mask sizes were tuned on (the demo's default is 16)
    rc = demo.run(demo.parse_args(["--out", str(d), "--steps", str(opts.steps), "--threads", str(opts.threads),
                                   "--size", "32"]))
    if rc != 0:
        raise RuntimeError(f"the offline demo failed (exit {rc})")
    return d, round(time.monotonic() - t0, 1)


class T5:
    def __init__(self, path: Path):
        from ..runner import embedded
        embedded.start(cpu=True)
        from ..nodes.text_encoder import encode_text, load_t5
        self.clip, self.encode_text = load_t5(path), encode_text

    def __call__(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        conds, _ = self.encode_text(self.clip, text, 64)
        return conds[0][0].float().cpu(), conds[0][1]["attention_mask"].bool().cpu()


def shift_pair(x: torch.Tensor, lab: torch.Tensor, max_shift: int, gen: torch.Generator):
    """Roll an image [C, H, W] and its mask [H, W] by the same random (dy, dx), |d| <= max_shift,
    chosen so the labelled region (+ 1 px of anti-aliasing) stays inside: what wraps round is plain
    background, so the pair stays a true render of the shape at its new place."""
    H, W = lab.shape
    ys, xs = torch.nonzero(lab > 0, as_tuple=True)
    lo = [-max_shift, -max_shift]
    hi = [max_shift, max_shift]
    if len(ys):
        lo = [max(-max_shift, min(0, 1 - int(ys.min()))), max(-max_shift, min(0, 1 - int(xs.min())))]
        hi = [min(max_shift, max(0, H - 2 - int(ys.max()))), min(max_shift, max(0, W - 2 - int(xs.max())))]
    d = tuple(int(torch.randint(a, b + 1, (1,), generator=gen)) for a, b in zip(lo, hi))
    return torch.roll(x, d, (-2, -1)), torch.roll(lab, d, (-2, -1))


class ShiftedMasks(MaskedLatents):
    """The demo's cached images + masks, each item shifted at random (`shift_pair`) when max_shift
    > 0: the demo draws shapes at 5 positions only, a mask adapter must follow any layout."""

    def __init__(self, cache, masks, max_shift: int, seed: int = 0):
        super().__init__(cache, masks)
        self.max_shift, self.gen = max_shift, torch.Generator().manual_seed(seed)

    def __getitem__(self, i):
        item = super().__getitem__(i)
        if self.max_shift:
            item["latent"], item["mask_labels"] = shift_pair(item["latent"], item["mask_labels"], self.max_shift,
                                                             self.gen)
        return item


def train_adapter(base, cache: LatentCache, mask_root: Path, opts, empty: tuple) -> tuple[MaskControlDiT, list]:
    """On the training engine, as OboroTrainMaskAdapter trains (Trainer over MaskedLatents); a
    dropped text is no tokens, or T5("") (`empty`) with --dropped-text empty_prompt."""
    size = tuple(cache.items[0]["bucket"])
    masks = [torch.from_numpy(np.asarray(Image.open(mask_root / Path(it["file"]).with_suffix(".png"))
                                         .resize(size, Image.Resampling.NEAREST)).astype(np.int64))
             for it in cache.items]
    cfg = MaskAdapterConfig(num_labels=len(dd.SHAPES) + 1, rank=opts.rank, vae_scale=1, image_rank=opts.image_rank,
                            static_t=opts.static_t, dropped_text=opts.dropped_text)
    torch.manual_seed(0)
    mcd = MaskControlDiT(base, cfg)
    tcfg = TrainConfig(steps=opts.adapter_steps, batch_size=opts.batch_size, lr=opts.lr, weight_decay=0.0,
                       warmup=max(1, min(30, opts.adapter_steps // 10)), schedule="cosine",
                       caption_dropout=cfg.text_dropout, mask_dropout=cfg.mask_dropout, seed=0)
    empty = (None, None) if cfg.dropped_text == "no_tokens" else (empty[0][0], empty[1][0])
    trainer = Trainer(mcd, ShiftedMasks(cache, masks, opts.shift), tcfg, empty_text=empty[0], empty_mask=empty[1])
    losses, said = [], [time.monotonic()]

    def callback(step, loss, lr, rate):
        losses.append(round(loss, 5))
        if time.monotonic() - said[0] > 15 or step == opts.adapter_steps:
            said[0] = time.monotonic()
            log(f"adapter step {step}/{opts.adapter_steps} loss {np.mean(losses[-20:]):.4f} ({rate:.2f} it/s)")

    trainer.train(callback)
    return mcd.eval(), losses


@torch.no_grad()
def generate(mcd: MaskControlDiT, cases: list[dict], text_conds: list, empty: tuple, size: int, opts,
             with_text: bool) -> torch.Tensor:
    """[N * seeds, 3, H, W] in [-1, 1]; sample k = case k // seeds, seed k % seeds. empty: T5("")."""
    seeds, D = opts.seeds, mcd.base.config.text_dim
    labels = torch.stack([case_labels(c, size) for c in cases for _ in range(seeds)])
    B = labels.shape[0]
    empty = (empty[0].expand(B, -1, -1), empty[1].expand(B, -1))
    if with_text:
        L = max(t.shape[1] for t, _ in text_conds)
        text, tmask = torch.zeros(B, L, D), torch.zeros(B, L, dtype=torch.bool)
        for k in range(B):
            t, m = text_conds[k // seeds]
            text[k, :t.shape[1]], tmask[k, :t.shape[1]] = t[0], m[0]
        pos = mcd.precompute_static(text, tmask, labels, B, (size, size))
        neg, scale = mcd.precompute_static(*empty, labels, B, (size, size)), opts.cfg
    else:
        pos = mcd.precompute_static(*empty, labels, B, (size, size))
        neg, scale = mcd.precompute_static(*empty, labels, B, (size, size),
                                           mask_keep=torch.zeros(B, dtype=torch.bool)), opts.mask_cfg
    noise = torch.cat([prepare_noise(torch.zeros(1, 3, size, size), k % seeds) for k in range(B)])

    def velocity(x, t):
        tt = torch.full((B,), float(t))
        u = mcd(x, tt, None, static_cache=pos)
        if scale == 1.0:
            return u
        u_neg = mcd(x, tt, None, static_cache=neg)
        return u_neg + scale * (u - u_neg)

    return solve(velocity, noise, time_grid(opts.sample_steps), "euler", open_end=True)


def to_image(x: torch.Tensor) -> Image.Image:
    a = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(a, "RGB")


def mask_iou(image: Image.Image, target: np.ndarray) -> dict:
    a = np.asarray(image.convert("RGB")).astype(np.float64)
    size = a.shape[0]
    b = max(1, size // 16)
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3), a[:, -b:].reshape(-1, 3)])
    bg = min(dd.BACKGROUNDS, key=lambda k: float(np.linalg.norm(np.median(border, 0) - dd.BACKGROUNDS[k])))
    fg = np.linalg.norm(a - np.asarray(dd.BACKGROUNDS[bg], dtype=np.float64), axis=-1) > 60
    union = float((fg | target).sum())
    return {"iou": round(float((fg & target).sum()) / union if union else 0.0, 4), "background": bg,
            "foreground_pixels": int(fg.sum()), "mask_pixels": int(target.sum())}


def sheet(out: Path, cases, images: dict, results: dict, seeds: int, title: list[str]) -> None:
    shown = min(seeds, SHEET_SEEDS)
    tile, gap, pad, ptxt = 80, 4, 10, 190
    f, small = demo.font(12), demo.font(11)
    W = max(820, pad + tile + gap + ptxt + 2 * (shown * (tile + gap) + 12) + pad)
    head = 18 * len(title) + 20
    H = head + len(cases) * (tile + 18 + gap) + pad
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    for i, line in enumerate(title):
        d.text((pad, pad + 18 * i), line, fill="black" if i == 0 else "dimgray", font=f if i == 0 else small)
    x_text = pad + tile + gap
    x_cols = {"text": x_text + ptxt, "no_text": x_text + ptxt + shown * (tile + gap) + 12}
    y = head - 4
    d.text((pad, y - 12), "mask", fill="navy", font=small)
    d.text((x_text, y - 12), "prompt", fill="navy", font=small)
    d.text((x_cols["text"], y - 12), "with text (IoU)", fill="navy", font=small)
    d.text((x_cols["no_text"], y - 12), "mask only, empty text (IoU)", fill="navy", font=small)
    for ci, c in enumerate(cases):
        y0 = head + ci * (tile + 18 + gap)
        m = Image.fromarray((case_labels(c, 32).numpy() > 0).astype(np.uint8) * 255, "L")
        img.paste(m.resize((tile, tile), Image.Resampling.NEAREST).convert("RGB"), (pad, y0))
        words, lines = c["prompt"].split(), [""]
        for w in words:
            lines[-1] = f"{lines[-1]} {w}".strip() if len(lines[-1]) + len(w) < 28 else lines[-1]
            if not lines[-1].endswith(w):
                lines.append(w)
        d.text((x_text, y0 + 4), "\n".join(lines), fill="black", font=small)
        for key, x0 in x_cols.items():
            for s in range(shown):
                k = ci * seeds + s
                img.paste(images[key][k].resize((tile, tile), Image.Resampling.NEAREST), (x0 + s * (tile + gap), y0))
                iou = results[key][k]["iou"]
                d.text((x0 + s * (tile + gap) + 2, y0 + tile + 2), f"{iou:.2f}", font=small,
                       fill="green" if iou >= GOAL else "red")
    img.save(out / "mask_eval.png")


def main(argv=None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(opts)
    except RuntimeError as e:
        print(f"oboro mask-eval: error: {e}", file=sys.stderr)
        return 1


def run(opts) -> int:
    t_start, out, seconds = time.monotonic(), Path(opts.out).resolve(), {}
    out.mkdir(parents=True, exist_ok=True)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    d, seconds["demo"] = ensure_demo(opts, out)
    torch.manual_seed(0)

    t0 = time.monotonic()
    base = load_checkpoint(d / "models" / "diffusion_models" / f"{demo.TRAINED}.safetensors").float()
    cache = LatentCache(d / "cache")
    size = int(cache.items[0]["bucket"][0])
    t5 = T5(d / "models" / "text_encoders" / demo.T5_FILE)
    ref, (emb, _) = cache[0], t5(cache.items[0]["caption"])
    t5_check = float((emb[0] - ref["text"].float()).abs().max()) if emb.shape[1] == ref["text"].shape[0] else math.inf
    if not t5_check < 1e-3:
        raise RuntimeError(f"the T5 here does not reproduce the cache's text states (max diff {t5_check})")
    seconds["load"] = round(time.monotonic() - t0, 1)

    t0 = time.monotonic()
    log(f"training the mask adapter: {opts.adapter_steps} steps, batch {opts.batch_size}, lr {opts.lr}, "
        f"{torch.get_num_threads()} thread(s)")
    empty = t5("")
    mcd, losses = train_adapter(base, cache, d / "dataset" / "masks", opts, empty)
    save_mask_adapter(out / "mask_adapter.safetensors", mcd)
    seconds["adapter_train"] = round(time.monotonic() - t0, 1)

    t0 = time.monotonic()
    cases = eval_cases()
    text_conds = [t5(c["prompt"]) for c in cases]
    images, results = {}, {}
    (out / "samples").mkdir(exist_ok=True)
    for key, with_text in (("text", True), ("no_text", False)):
        xs = generate(mcd, cases, text_conds, empty, size, opts, with_text)
        images[key] = [to_image(x) for x in xs]
        results[key] = []
        for k, im in enumerate(images[key]):
            c, seed = cases[k // opts.seeds], k % opts.seeds
            file = f"samples/{key}_{c['colour']}_{c['shape']}_{k // opts.seeds:02d}_s{seed}.png"
            im.save(out / file)
            results[key].append({"prompt": c["prompt"] if with_text else "", "case": k // opts.seeds, "seed": seed,
                                 "file": file, **mask_iou(im, case_labels(c, size).numpy() > 0)})
    seconds["generate"] = round(time.monotonic() - t0, 1)

    def mean(key):
        return round(float(np.mean([r["iou"] for r in results[key]])), 4)

    def frac(key):
        return round(float(np.mean([r["iou"] >= GOAL for r in results[key]])), 4)

    iou = {"with_text": mean("text"), "without_text": mean("no_text")}
    refs = [mask_iou(dd.render(c["shape"], c["colour"], c["background"], tuple(c["centre"]), size)[0],
                     case_labels(c, size).numpy() > 0)["iou"] for c in cases]  # the ceiling: true renders
    title = [f"oboro mask control on the demo model, {size}x{size}: held-out (shape, colour) pairs at unseen positions",
             f"adapter: {opts.adapter_steps} steps, mask rank {opts.rank}, image rank {opts.image_rank}, static t "
             f"{opts.static_t}, shift {opts.shift}, lr {opts.lr}",
             f"mean IoU(generated shape, mask): with text {iou['with_text']:.3f}, mask only {iou['without_text']:.3f} "
             f"(goal {GOAL}; true renders of these masks: {np.mean(refs):.3f}); green >= goal",
             f"sampler: euler {opts.sample_steps} steps, text cfg {opts.cfg}, mask-only cfg {opts.mask_cfg}; "
             f"seeds 0..{opts.seeds - 1} (means over all; {min(opts.seeds, SHEET_SEEDS)} shown); a dropped "
             f"text in training: {opts.dropped_text}"]
    sheet(out, cases, images, results, opts.seeds, title)
    seconds["total"] = round(time.monotonic() - t_start, 1)
    k = max(1, min(20, len(losses) // 4))
    report = {
        "goal": GOAL, "mean_iou": iou, "meets_goal": {k2: v >= GOAL for k2, v in iou.items()},
        "fraction_at_goal": {"with_text": frac("text"), "without_text": frac("no_text")},
        "cases": cases, "per_sample": {"with_text": results["text"], "without_text": results["no_text"]},
        "scorer_on_true_renders": {"mean_iou": round(float(np.mean(refs)), 4)},
        "demo": str(d), "resolution": size, "seconds": seconds, "threads": torch.get_num_threads(),
        "adapter": {"path": "mask_adapter.safetensors", "training": "the training engine (Trainer over "
                    "MaskedLatents, as OboroTrainMaskAdapter) outside ComfyUI", "shift": opts.shift, "config": mcd.cfg.to_dict()
                    if hasattr(mcd.cfg, "to_dict") else json.loads(mcd.cfg.to_json()), "steps": opts.adapter_steps,
                    "batch_size": opts.batch_size, "lr": opts.lr, "schedule": "linear warmup + cosine",
                    "trainable_parameters": sum(p.numel() for p in mcd.trainable_parameters()),
                    "loss_first_mean": round(float(np.mean(losses[:k])), 5),
                    "loss_last_mean": round(float(np.mean(losses[-k:])), 5), "loss": losses},
        "sampler": {"solver": "euler", "steps": opts.sample_steps, "cfg_text": opts.cfg, "cfg_mask_only": opts.mask_cfg,
                    "seeds": list(range(opts.seeds))},
        "t5_check_max_abs_diff": t5_check,
        "files": ["report.json", "mask_eval.png", "mask_adapter.safetensors"]
                 + [r["file"] for key in results for r in results[key]]}
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    log(f"mean IoU with text {iou['with_text']:.3f}, mask only {iou['without_text']:.3f} (goal {GOAL}); "
        f"{seconds['total']:.0f}s in all")
    print(f"oboro mask-eval: figure {out / 'mask_eval.png'}")
    print(f"oboro mask-eval: report {out / 'report.json'}")
    return 0
