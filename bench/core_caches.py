"""Core ComfyUI caches on the trained offline-demo model: model calls saved by EasyCache and LazyCache
at their default settings, and what it costs in the picture, against the uncached run (the
baseline) measured in the same process.

Core KSampler (euler, simple, 20 steps, cfg 3, the demo's settings) on the demo's 9 held-out
prompts x 2 seeds, 32x32 pixel space. Model calls are counted as forwards of the
model's final layer (one per diffusion-model call). TorchCompileModel (inductor on whatever
device runs it) is timed after a warm-up sample that pays for compilation. "fully right" is demo_data.score_image's
colour + position + shape + background; "max |diff|" is against the uncached image, 0..1 pixels.

    .venv/bin/python bench/core_caches.py [--demo out/demo]   (run scripts/oboro-demo first)
"""
import time

from demo_comfy import parser, start

a = parser(__doc__).parse_args()
env = start(a)
import torch  # noqa: E402

N, comfy_nodes, demo, dd = env.nodes, env.comfy_nodes, env.demo, env.dd
base, clip, vae, neg, models = env.base, env.clip, env.vae, env.neg, env.models
prompts = demo.held_out_prompts()
CACHES = {"none (baseline)": None,
          "EasyCache (defaults: 0.2, 0.15-0.95)": ("EasyCache", 0.2, 0.15, 0.95, False),
          "LazyCache (defaults: 0.2, 0.15-0.95)": ("LazyCache", 0.2, 0.15, 0.95, False),
          "EasyCache 0.05": ("EasyCache", 0.05, 0.15, 0.95, False),
          "LazyCache 0.05": ("LazyCache", 0.05, 0.15, 0.95, False),
          "TorchCompileModel (inductor; compile excluded)": ("TorchCompileModel", "inductor")}


def sample(model):
    calls = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, _: calls.append(1) if type(m).__name__ == "FinalLayer" else None)
    out = []
    try:
        for combo in prompts:
            pos = N["OboroTextEncode"].execute(clip=clip, text=dd.caption(*combo))[0]
            for seed in range(a.seeds):
                lat = {"samples": torch.zeros(1, 3, 32, 32)}
                s = comfy_nodes.common_ksampler(model, seed, 20, 3.0, "euler", "simple", pos, neg, lat)[0]["samples"]
                out.append((combo, vae.decode(s)[0]))
    finally:
        hook.remove()
    return out, len(calls)


rows, ref = [], None
for name, spec in CACHES.items():
    if spec is None:
        model = base
    elif spec[0] == "TorchCompileModel":
        model = N[spec[0]].execute(base, *spec[1:])[0]
        comfy_nodes.common_ksampler(model, 0, 2, 3.0, "euler", "simple", neg, neg,
                                    {"samples": torch.zeros(1, 3, 32, 32)})  # compile outside the timing
    else:
        model = N[spec[0]].execute(base, *spec[1:])[0]
    t0 = time.perf_counter()
    images, calls = sample(model)
    seconds = (time.perf_counter() - t0) / len(images)
    ref = ref or (images, calls)
    right = sum(all(dd.score_image((img.numpy() * 255).round().astype("uint8"), *c)[f"{k}_ok"]
                    for k in ("colour", "position", "shape", "background")) for c, img in images)
    diff = max(float((img - r).abs().max()) for (_, img), (_, r) in zip(images, ref[0]))
    rows.append((name, calls, 1 - calls / ref[1], right / len(images), diff, seconds))

print(f"\n{len(prompts)} prompts x {a.seeds} seeds, core KSampler euler 20 steps cfg 3, demo model {models}")
print("| patch | model calls | saved vs baseline | fully right | max abs diff vs baseline | time vs baseline |\n"
      "|---|---|---|---|---|---|")
for name, calls, saved, right, diff, seconds in rows:
    print(f"| {name} | {calls} | {saved:.0%} | {right:.0%} | {diff:.3f} | {seconds / rows[0][5]:.2f}x |")
