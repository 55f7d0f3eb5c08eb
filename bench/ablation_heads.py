"""Ablation: MMH's progressive head schedule vs uniform heads vs the reversed schedule, on the offline
demo's task and recipe (demo/offline.py SETUPS[16], without its extra-colour augmentation, at 1200 steps:
the recipe when the recorded runs were made), over several training seeds, with paired statistics.

Why: oboro's defining claim is a head count growing with depth (few wide heads early for global
layout, many narrow heads late for local detail) learning better from limited data. One training
seed cannot settle it (an earlier single-seed run flipped sign between seeds), so every arm trains
with the same seeds, and each seed is a pair: identical initial weights (heads only re-split the
same q/k/v/out projections; every linear/embedding tensor has the same shape and the same init),
the same batches in the same order and the same t / noise / caption-dropout draws. Only the split
of each block's attention into heads (and the RoPE split that follows the head dim) differs. The
one parameter difference: QK-norm's RMSNorm gain has head_dim entries (printed).

Arms (hidden 128, depth 4, patch 2 at 16x16 px):
  mmh       2/4/4/8 heads (head dims 64/32/32/16): a 4x growth, the demo's first schedule
  uniform   4/4/4/4 (head dim 32 everywhere: mmh's geometric mean and median)
  reversed  8/4/4/2 (many narrow heads early, few wide late): tests the global-to-local reasoning
  mild      4/4/8/8 (head dims 32/32/16/16): a 2x growth, the demo's schedule now

Measured per (seed, arm): held-out validation loss (I-CFM MSE on the 45 images of the 3 held-out
(shape, colour) pairs, t on a fixed grid of 8, one fixed noise draw shared by every run) at
--points evenly spaced steps (the learning curve), and held-out composition scores at the end (45
held-out prompts x 2 sampler seeds, euler 20 steps, CFG 3, scored by demo_data.score_image).
Results are appended to --results (JSON lines) as each run ends, so the script resumes and can be
stopped at any time; --report reads them, prints per-arm means, the paired mean differences
(--base, default mmh, minus each other arm) with 95 % t-intervals (scipy.stats.t) and the
verdicts (final val loss, held-out composition), and draws --plot.

    .venv/bin/python bench/ablation_heads.py --seeds 0-4 --points 6           # train (resumable)
    .venv/bin/python bench/ablation_heads.py --report --plot docs/ablation_heads.png
"""
import argparse
import json
import statistics
import time
from pathlib import Path

ARMS = {"mmh": (2, 4, 4, 8), "uniform": (4, 4, 4, 4), "reversed": (8, 4, 4, 2), "mild": (4, 4, 8, 8)}
REPO = Path(__file__).resolve().parents[1]

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--seeds", default="0-4", help="training seeds, e.g. 0-4 or 0,3 (default %(default)s)")
p.add_argument("--arms", default=",".join(ARMS))
p.add_argument("--base", default="mmh", choices=list(ARMS), help="--report: the arm every other is paired against")
p.add_argument("--steps", type=int, default=1200, help="training steps per run (the demo's 1200)")
p.add_argument("--points", type=int, default=4, help="validation-loss points along training")
p.add_argument("--gen-seeds", type=int, default=2, help="sampler seeds per held-out prompt")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--results", default=str(REPO / "out" / "ablation_heads.jsonl"))
p.add_argument("--report", action="store_true", help="only summarise --results")
p.add_argument("--plot", default="", help="with --report: write the figure here (PNG)")
a = p.parse_args()


def seed_list(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def train_runs() -> None:
    import torch
    from demo_task import MMHDiT, Task, Trainer, TrainConfig, model_config
    from oboro.demo.offline import SETUPS
    torch.set_num_threads(a.threads)
    setup = SETUPS[16]
    task = Task(16)
    done = set()
    path = Path(a.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        done = {(r["seed"], r["arm"], r["steps"]) for r in map(json.loads, path.read_text().splitlines()) if r}
    at = sorted({round(a.steps * (k + 1) / a.points) for k in range(a.points)})
    for seed in seed_list(a.seeds):
        for arm in a.arms.split(","):
            if (seed, arm, a.steps) in done:
                continue
            cfg = model_config({**setup["model"], "heads": ARMS[arm]})
            net = MMHDiT(cfg).initialize_weights(generator=torch.Generator().manual_seed(seed))
            tc = TrainConfig(steps=a.steps, batch_size=setup["batch_size"], lr=setup["lr"],
                             warmup=min(30, a.steps // 10), schedule="cosine", precision="no", caption_dropout=0.1,
                             t_sampling=setup["t_sampling"], seed=seed)
            trainer = Trainer(net, task.train, tc, empty_text=task.empty_text, empty_mask=task.empty_mask)
            t0, curve, losses = time.perf_counter(), [], []
            for step in at:
                losses += trainer.train(until=step)
                curve.append([step, round(task.val_loss(net), 5)])
            train_s = time.perf_counter() - t0
            held = task.scores(net, task.held, seeds=tuple(range(a.gen_seeds)))
            row = {"seed": seed, "arm": arm, "heads": list(ARMS[arm]), "steps": a.steps,
                   "params": sum(q.numel() for q in net.parameters()), "train_loss_end": round(statistics.fmean(losses[-20:]), 5),
                   "val_curve": curve, "held": {k: held[k] for k in ("colour", "background", "position", "shape", "all",
                                                                     "mean_shape_iou", "images")},
                   "train_s": round(train_s, 1)}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(f"seed {seed} {arm:8s} val {curve[-1][1]:.4f} held-out all {held['all']:.0%} shape {held['shape']:.0%} "
                  f"({train_s:.0f}s)", flush=True)


def ci95(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval of paired differences."""
    from scipy import stats
    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return m, float("nan"), float("nan")
    h = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return m, m - h, m + h


def verdict(lo: float, hi: float, n: int, base: str, other: str, better: str) -> str:
    """What the paired base - other interval says; for val loss, negative means base is better."""
    if n < 2:
        return "not enough seeds for an interval"
    base_first = (hi < 0) if better == "lower" else (lo > 0)
    other_first = (lo > 0) if better == "lower" else (hi < 0)
    if base_first:
        return f"{base} significantly better than {other} (95 % CI excludes 0)"
    if other_first:
        return f"{other} significantly better than {base} (95 % CI excludes 0)"
    return f"no significant difference between {base} and {other} (95 % CI includes 0)"


def report() -> None:
    rows = [json.loads(line) for line in Path(a.results).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["steps"] == a.steps]
    by = {(r["seed"], r["arm"]): r for r in rows}
    arms = [arm for arm in ARMS if any(k[1] == arm for k in by)]
    print(f"ablation_heads: {a.steps} steps, results {a.results}")
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        v = [r["val_curve"][-1][1] for r in rs]
        print(f"  {arm:8s} heads {'/'.join(map(str, rs[0]['heads']))}  params {rs[0]['params']:,}  seeds "
              f"{sorted(r['seed'] for r in rs)}  final val {statistics.fmean(v):.4f}  held-out all "
              f"{statistics.fmean(r['held']['all'] for r in rs):.1%}  shape {statistics.fmean(r['held']['shape'] for r in rs):.1%}")
    metrics = {"val": lambda r, i: r["val_curve"][i][1], "all": lambda r, i: r["held"]["all"],
               "shape": lambda r, i: r["held"]["shape"]}
    out = {}
    base = a.base
    for other in [x for x in arms if x != base]:
        seeds = sorted(s for s, arm in by if arm == base and (s, other) in by)
        if not seeds:
            continue
        print(f"\n{base} - {other}, paired over {len(seeds)} training seeds {seeds} (negative val = {base} better; "
              f"positive scores = {base} better):")
        steps = [s for s, _ in by[(seeds[0], base)]["val_curve"]]
        for i, st in enumerate(steps):
            m, lo, hi = ci95([metrics["val"](by[(s, base)], i) - metrics["val"](by[(s, other)], i) for s in seeds])
            out[(other, "val", st)] = (m, lo, hi)
            print(f"  val loss @ {st:4d}: {m:+.4f}  95% CI [{lo:+.4f}, {hi:+.4f}]")
        for k in ("all", "shape"):
            m, lo, hi = ci95([metrics[k](by[(s, base)], 0) - metrics[k](by[(s, other)], 0) for s in seeds])
            out[(other, k, None)] = (m, lo, hi)
            print(f"  held-out {k:5s}: {m:+.1%}  95% CI [{lo:+.1%}, {hi:+.1%}]")
        for what, key, better in (("final held-out val loss", (other, "val", steps[-1]), "lower"),
                                  ("held-out images fully right", (other, "all", None), "higher")):
            print(f"  verdict, {what}: {verdict(*out[key][1:], len(seeds), base, other, better)}")
    if a.plot:
        plot(rows, arms, out)


def plot(rows, arms, diffs) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 3.8))
    colours = {"mmh": "tab:blue", "uniform": "tab:orange", "reversed": "tab:green", "mild": "tab:purple"}
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        steps = [s for s, _ in rs[0]["val_curve"]]
        for r in rs:
            ax1.plot(steps, [v for _, v in r["val_curve"]], color=colours[arm], alpha=0.25, lw=1)
        mean = [statistics.fmean(r["val_curve"][i][1] for r in rs) for i in range(len(steps))]
        ax1.plot(steps, mean, color=colours[arm], lw=2, marker="o", label=f"{arm} {'/'.join(map(str, rs[0]['heads']))}")
    ax1.set(xlabel="training step", ylabel="held-out val loss (I-CFM MSE)", yscale="log",
            title=f"learning curves ({len({r['seed'] for r in rows})} seeds; thin: each seed)")
    ax1.legend()
    others = [x for x in arms if x != a.base]
    for j, other in enumerate(others):
        pts = sorted((st, v) for (o, k, st), v in diffs.items() if o == other and k == "val")
        xs = [st + (j - (len(others) - 1) / 2) * 0.08 * pts[0][0] for st, _ in pts]  # side by side
        ax2.errorbar(xs, [v[0] for _, v in pts], yerr=[[v[0] - v[1] for _, v in pts], [v[2] - v[0] for _, v in pts]],
                     fmt="o", capsize=3, color=colours[other], label=f"{a.base} - {other}")
    ax2.axhline(0, color="gray", lw=1)
    ax2.set(xlabel="training step", ylabel="paired val-loss difference", title=f"{a.base} minus other, mean and 95 % CI")
    ax2.legend()
    seeds = sorted({r["seed"] for r in rows})
    score = {(r["seed"], r["arm"]): r["held"]["all"] for r in rows}
    for seed in seeds:  # one line per training seed: the pairing
        ax3.plot(range(len(arms)), [score.get((seed, arm), float("nan")) for arm in arms], color="gray", alpha=0.4, lw=1)
    for i, arm in enumerate(arms):
        ys = [score[(s, arm)] for s in seeds if (s, arm) in score]
        ax3.scatter([i] * len(ys), ys, color=colours[arm], zorder=3)
        ax3.plot([i - 0.2, i + 0.2], [statistics.fmean(ys)] * 2, color=colours[arm], lw=3)
    ax3.set_xticks(range(len(arms)), arms)
    ax3.set(ylabel="held-out images fully right", title="composition (dots: seeds; bar: mean)")
    fig.tight_layout()
    fig.savefig(a.plot, dpi=110)
    print(f"plot: {a.plot}")


if a.report:
    report()
else:
    train_runs()
