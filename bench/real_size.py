"""One measured training run of the real model against the memory planner (a script, not a test).

    .venv/bin/python bench/real_size.py                      # oboro-base-1b, LoRA r16 attn, 512², bf16,
                                                             # checkpointing on, batch 1, on CUDA if present
    .venv/bin/python bench/real_size.py --mode full --optimizer adamw8bit
    .venv/bin/python bench/real_size.py --preset tiny --resolution 128   # a quick check that it runs

Builds the model (random init: memory and speed do not depend on the weights), trains `--steps`
Trainer steps on synthetic latents / text states of the planned shape, and prints the plan
(oboro_model/training/memory.py) next to the measured peak and the seconds per step (the first
step, with its one-off allocations and kernel selection, is left out of the timing). Measured:
on CUDA, torch.cuda.max_memory_allocated over what was allocated before the model (the plan's
scope; `reserved` adds the caching allocator's slack, the CUDA context is in neither); on the CPU,
peak RSS over the RSS after imports (run with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave
RSS, as tests/test_memory_plan.py does). The full size on a CPU takes very long: use a small preset
there.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import oboro_env  # noqa: E402

oboro_env.import_oboro()
from oboro.oboro_model.config import PRESETS, preset  # noqa: E402
from oboro.oboro_model.model import MMHDiT  # noqa: E402
from oboro.oboro_model.training import Trainer, TrainConfig  # noqa: E402
from oboro.oboro_model.training.frozen_base import STORAGE_DTYPES, frozen_base_model  # noqa: E402
from oboro.oboro_model.training.memory import GiB, VAE_FACTOR, plan_memory  # noqa: E402
from oboro.oboro_model.training.run import LoraSpec, add_seeded_lora  # noqa: E402


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run(cfg, lora, args, dev, side: int, text: int, steps: int) -> list[float]:
    """Build the model on `dev` and time `steps` Trainer steps on synthetic data; -> seconds per step."""
    torch.manual_seed(0)
    narrow = lora is not None and args.base_dtype != "fp32"
    # A LoRA's frozen base is built in its storage dtype straight away (an fp32 init first would
    # be the peak), then held as the engine holds it (frozen_base.py).
    model = MMHDiT(cfg, device=dev, dtype=STORAGE_DTYPES[args.base_dtype] if narrow else None).initialize_weights()
    if narrow:
        model = frozen_base_model(cfg, model.state_dict())
    if lora is not None:
        add_seeded_lora(model, lora, 0)
    g = torch.Generator().manual_seed(0)
    items = [{"latent": torch.randn(cfg.in_channels, side, side, generator=g),
              "text": torch.randn(text, cfg.text_dim, generator=g),
              "text_mask": torch.ones(text, dtype=torch.bool)} for _ in range(args.batch)]
    tc = TrainConfig(steps=steps, batch_size=args.batch, optimizer=args.optimizer, precision=args.precision,
                     gradient_checkpointing=not args.no_checkpointing, spike_guard=False, caption_dropout=0.0)
    trainer = Trainer(model, items, tc)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="oboro-base-1b", choices=sorted(PRESETS))
    ap.add_argument("--mode", default="lora", choices=("lora", "full"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="attn", choices=("attn", "mlp", "all"))
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit", "schedulefree"))
    ap.add_argument("--precision", default="bf16", choices=("no", "bf16", "fp16"))
    ap.add_argument("--base-dtype", default="bf16", choices=("fp32", "bf16", "fp16", "fp8_e4m3fn"),
                    help="LoRA: storage dtype of the frozen base (the engine keeps the MODEL's own)")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--resolution", type=int, default=512, help="image side in pixels (latent = /8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="Trainer steps; the first is not timed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = preset(args.preset)
    lora = LoraSpec(args.rank, targets=args.targets) if args.mode == "lora" else None
    f = 1 if cfg.in_channels == 3 else VAE_FACTOR
    side = args.resolution // f
    ckpt = not args.no_checkpointing
    base_dtype = args.base_dtype if lora is not None else "fp32"
    plan = plan_memory(args.preset, lora, args.optimizer, args.precision, base_dtype, args.batch, args.resolution,
                       text_tokens=args.text_tokens, gradient_checkpointing=ckpt,
                       device="cuda" if dev.type == "cuda" else "cpu")
    print(plan.table(), flush=True)

    cuda = dev.type == "cuda"
    # Warm-up: a tiny model's step with the same settings loads kernels, thread pools and scratch
    # buffers once, so the baseline below leaves them out (they are not the run's tensors).
    run(preset("tiny", in_channels=cfg.in_channels), lora, args, dev, 8, 8, 1)
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = rss()
    times = run(cfg, lora, args, dev, side, args.text_tokens, args.steps)
    if cuda:
        measured = torch.cuda.max_memory_allocated(dev) - base
        reserved = torch.cuda.max_memory_reserved(dev)
        backend = (f"SDPA flash {torch.backends.cuda.flash_sdp_enabled()}, mem-efficient "
                   f"{torch.backends.cuda.mem_efficient_sdp_enabled()}; {torch.cuda.get_device_name(dev)}")
    else:
        measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        reserved = None
        backend = f"CPU, {torch.get_num_threads()} threads"
    timed = times[1:] or times
    result = {"preset": args.preset, "mode": args.mode, "base_dtype": base_dtype, "resolution": args.resolution, "batch": args.batch,
              "precision": args.precision, "checkpointing": ckpt, "optimizer": args.optimizer, "device": str(dev),
              "backend": backend, "plan_gib": round(plan.total / GiB, 3), "measured_gib": round(measured / GiB, 3),
              "reserved_gib": None if reserved is None else round(reserved / GiB, 3),
              "plan_over_measured": round(plan.total / max(measured, 1), 3),
              "seconds_per_step": round(sum(timed) / len(timed), 3), "first_step_s": round(times[0], 3)}
    print(f"measured peak {measured / 2 ** 20:.1f} MiB (plan {plan.total / 2 ** 20:.1f} MiB, plan / measured "
          f"{result['plan_over_measured']}); {result['seconds_per_step']} s/step over {len(timed)} step(s); {backend}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
