"""Compare offline-demo recipes cheaply, in process (bench/demo_task.py), before confirming one through
the real demo (scripts/oboro-demo, which trains through the shipped workflow). Prints one JSON line per
(recipe, sampler) with train seconds, held-out and seen-caption scores (demo_data.score_image).

    .venv/bin/python bench/demo_recipe.py --steps 800 --size 32 --patch 4 --t-sampling logit_normal \
        --sampler euler:20:3.0 --sampler heun:10:3.0
"""
import argparse
import contextlib
import json
import time

import torch

from demo_task import MMHDiT, Task, Trainer, TrainConfig, model_config

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--size", type=int, default=32)
p.add_argument("--patch", type=int, default=4)
p.add_argument("--hidden", type=int, default=128)
p.add_argument("--depth", type=int, default=4)
p.add_argument("--heads", default="2,4,4,8")
p.add_argument("--mlp", type=int, default=256)
p.add_argument("--steps", type=int, default=800)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--warmup", type=int, default=30)
p.add_argument("--t-sampling", default="uniform")
p.add_argument("--t-mean", type=float, default=0.0, help="logit_normal: sigmoid(N(t_mean, t_std)); t = 1 is data")
p.add_argument("--t-std", type=float, default=1.0)
p.add_argument("--caption-dropout", type=float, default=0.1)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--sampler", action="append", default=[], help="solver:steps:cfg[:shift] (repeatable)")
p.add_argument("--seen-count", type=int, default=15, help="seen training captions scored (evenly spaced)")
p.add_argument("--ema", type=float, default=0.0, help="EMA decay (0: off); samples and val use the EMA weights")
p.add_argument("--ema-start", type=int, default=0)
p.add_argument("--t5-layers", type=int, default=None, help="the demo T5's depth (default: runner/demo.T5_CONFIG)")
p.add_argument("--t5-context-free", action="store_true", help="zero the T5's attention outputs (no token mixing)")
p.add_argument("--omit", default="", help="caption augmentation: also train each image under a caption without "
               "these words (comma-separated: colour, shape)")
p.add_argument("--extra-colours", type=int, default=0, help="augmentation: train every shape in this many extra colours")
p.add_argument("--tag", default="")
a = p.parse_args()
torch.set_num_threads(a.threads)
task = Task(a.size, a.t5_layers, a.t5_context_free, tuple(filter(None, a.omit.split(","))), a.extra_colours)
cfg = model_config(dict(patch_size=a.patch, hidden_size=a.hidden, depth=a.depth,
                        heads=tuple(int(h) for h in a.heads.split(",")), mlp_hidden=a.mlp, adaln_dim=a.hidden))
net = MMHDiT(cfg).initialize_weights(generator=torch.Generator().manual_seed(a.seed))
tc = TrainConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, warmup=min(a.warmup, a.steps // 10), schedule="cosine",
                 precision="no", caption_dropout=a.caption_dropout, t_sampling=a.t_sampling, t_mean=a.t_mean, t_std=a.t_std, seed=a.seed,
                 ema_decay=a.ema or None, ema_start=a.ema_start)
trainer = Trainer(net, task.train + task.extra, tc, empty_text=task.empty_text, empty_mask=task.empty_mask)
t0 = time.perf_counter()
losses = trainer.train()
train_s = time.perf_counter() - t0
scoring = contextlib.ExitStack()
if trainer.ema is not None:  # score what training would export: the EMA weights
    scoring.enter_context(trainer.ema.applied(trainer.params))
with scoring:
    seen = task.train[::max(1, len(task.train) // a.seen_count)][:a.seen_count]
    base = {"tag": a.tag, **{k: v for k, v in vars(a).items() if k not in ("sampler", "tag")},
            "params": sum(q.numel() for q in net.parameters()), "train_s": round(train_s, 1),
            "loss_end": round(sum(losses[-20:]) / 20, 4), "val": round(task.val_loss(net), 4)}
    for spec in a.sampler or ["euler:20:3.0"]:
        solver, steps, g, *shift = spec.split(":")
        t0 = time.perf_counter()
        kw = dict(steps=int(steps), cfg=float(g), solver=solver, shift=float(shift[0]) if shift else 1.0)
        h, s = task.scores(net, task.held, **kw), task.scores(net, seen, **kw)
        print(json.dumps({**base, "sampler": spec, "gen_s": round(time.perf_counter() - t0, 1),
                          "held": {k: h[k] for k in ("colour", "background", "position", "shape", "all")},
                          "seen": {k: s[k] for k in ("colour", "background", "position", "shape", "all")}}), flush=True)
