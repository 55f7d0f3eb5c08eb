"""OboroTaylorCache against core EasyCache / LazyCache and the uncached run (the baseline), all on
the trained offline-demo model in one process.

12 prompts (the demo's 9 held-out + 3 seen) x 2 seeds, core KSampler euler 30 steps cfg 3, 32x32
pixel space. Per run: full model forwards (forwards of the last block, which runs only on a full
call), wall time per image / baseline's, PSNR and SSIM (scikit-image) of the final images against
the uncached ones. Also TorchCompileModel vs eager (time ratio, compile excluded). Writes a contact
sheet (rows: prompts; columns: uncached, then each run) to --sheet.

    .venv/bin/python bench/step_cache.py [--demo out/demo] [--sheet docs/step_cache.png]
"""
import sys
import time
from pathlib import Path

from demo_comfy import REPO, parser, start

p = parser(__doc__)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--sheet", default=str(REPO / "out" / "step_cache.png"))
p.add_argument("--no-compile", action="store_true")
p.add_argument("--only", default="", help="comma-separated name prefixes of the runs to do (the uncached one always runs)")
a = p.parse_args()
env = start(a)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # noqa: E402

N, comfy_nodes, demo, dd = env.nodes, env.comfy_nodes, env.demo, env.dd
base, clip, vae, neg, models = env.base, env.clip, env.vae, env.neg, env.models
control = [("circle", "red", "white", "center"), ("square", "blue", "black", "left"),
           ("triangle", "yellow", "gray", "right")]
prompts = demo.held_out_prompts() + control
conds = [N["OboroTextEncode"].execute(clip=clip, text=dd.caption(*c))[0] for c in prompts]


def taylor(order, warmup, max_forecasts, threshold):
    return ("OboroTaylorCache", (order, warmup, max_forecasts, threshold, 0.0, 1.0))


RUNS = {"uncached": None,
        "taylor fixed o2 w3 f2": taylor(2, 3, 2, 0.0),
        "taylor fixed o2 w3 f3": taylor(2, 3, 3, 0.0),
        "taylor fixed o1 w3 f2": taylor(1, 3, 2, 0.0),
        "taylor gated o2 w3 0.05": taylor(2, 3, 6, 0.05),
        "taylor gated o2 w3 0.10": taylor(2, 3, 6, 0.10),
        "taylor gated o2 w3 0.20": taylor(2, 3, 6, 0.20),
        "EasyCache 0.05": ("EasyCache", (0.05, 0.15, 0.95, False)),
        "EasyCache 0.10": ("EasyCache", (0.10, 0.15, 0.95, False)),
        "EasyCache 0.20 (default)": ("EasyCache", (0.2, 0.15, 0.95, False)),
        "EasyCache 0.30": ("EasyCache", (0.3, 0.15, 0.95, False)),
        "LazyCache 0.05": ("LazyCache", (0.05, 0.15, 0.95, False)),
        "LazyCache 0.10": ("LazyCache", (0.10, 0.15, 0.95, False)),
        "LazyCache 0.20 (default)": ("LazyCache", (0.2, 0.15, 0.95, False)),
        "LazyCache 0.30": ("LazyCache", (0.3, 0.15, 0.95, False))}
if not a.no_compile:
    RUNS["TorchCompileModel (inductor)"] = ("TorchCompileModel", ("inductor",))
if a.only:
    RUNS = {k: v for k, v in RUNS.items() if v is None or k.startswith(tuple(a.only.split(",")))}
last_block = base.model.diffusion_model.blocks[-1]


def sample(model):
    full = []
    hook = last_block.register_forward_pre_hook(lambda m, _: full.append(1))
    images = []
    try:
        for pos in conds:
            for seed in range(a.seeds):
                lat = {"samples": torch.zeros(1, 3, 32, 32)}
                s = comfy_nodes.common_ksampler(model, seed, a.steps, 3.0, "euler", "simple", pos, neg, lat)
                images.append(vae.decode(s[0]["samples"])[0].clamp(0, 1).numpy())
    finally:
        hook.remove()
    return images, len(full)


def warm(model):  # pays one-off costs (compilation, first-call allocations) outside the timing
    comfy_nodes.common_ksampler(model, 0, 2, 3.0, "euler", "simple", conds[0], neg,
                                {"samples": torch.zeros(1, 3, 32, 32)})


results = {}
for name, spec in RUNS.items():
    model = base if spec is None else N[spec[0]].execute(base, *spec[1])[0]
    warm(model)
    t0 = time.perf_counter()
    images, full = sample(model)
    results[name] = (images, full, (time.perf_counter() - t0) / len(images))

ref, ref_full, ref_time = results["uncached"]
rows = []
print(f"\n{len(prompts)} prompts x {a.seeds} seeds, core KSampler euler {a.steps} steps cfg 3, demo model {models}")
print("| run | full forwards | speed-up (forwards) | time vs uncached | PSNR dB | SSIM |\n|---|---|---|---|---|---|")
for name, (images, full, seconds) in results.items():
    psnr = np.mean([peak_signal_noise_ratio(r, i, data_range=1.0) if not np.array_equal(r, i) else 100.0
                    for r, i in zip(ref, images)])
    ssim = np.mean([structural_similarity(r, i, data_range=1.0, channel_axis=-1, win_size=7)
                    for r, i in zip(ref, images)])
    rows.append((name, full, ref_full / full, seconds / ref_time, psnr, ssim))
    print(f"| {name} | {full}/{ref_full} | {ref_full / full:.2f}x | {seconds / ref_time:.2f}x | {psnr:.1f} | {ssim:.3f} |")

names = list(results)
tile, n_show = 64, 6
sheet = Image.new("RGB", (tile * len(names), tile * n_show), "white")
for col, name in enumerate(names):
    for row in range(n_show):
        img = (results[name][0][row * a.seeds] * 255).round().astype(np.uint8)
        sheet.paste(Image.fromarray(img).resize((tile, tile), Image.Resampling.NEAREST), (col * tile, row * tile))
Path(a.sheet).parent.mkdir(parents=True, exist_ok=True)
sheet.save(a.sheet)
print("contact sheet (columns: " + ", ".join(names) + "):", a.sheet)

tay = [r for r in rows if r[0].startswith("taylor")]
if not tay:
    sys.exit(0)
good = [r for r in tay if r[4] >= 30.0]
best = max(good, key=lambda r: r[2]) if good else max(tay, key=lambda r: r[4])
core = [r for r in rows if r[0].startswith(("EasyCache", "LazyCache"))]
within = [r for r in core if r[1] <= best[1]]
q = (f"PSNR {max(r[4] for r in within):.1f} dB" if within else
     "none gets there (fewest: {} at {} forwards, PSNR {:.1f} dB)".format(*min(core, key=lambda r: r[1])[:2],
                                                                        min(core, key=lambda r: r[1])[4]))
print(f"taylor: full forwards {best[1]}/{ref_full} (speed-up {best[2]:.2f} x), PSNR {best[4]:.1f} dB; "
      f"best core cache at <= {best[1]} forwards: {q}   [{best[0]}]")
