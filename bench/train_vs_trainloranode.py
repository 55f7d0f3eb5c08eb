"""LoRA training throughput and memory: our OboroTrainLoRA against ComfyUI's core TrainLoraNode, on CPU.

Why: core ComfyUI already ships a LoRA trainer (comfy_extras/nodes_train.py, `TrainLoraNode`). It
takes MODEL + LATENT + CONDITIONING and trains inside the sampling machinery: every step goes
through CFGGuider -> calc_cond_batch -> apply_model on a ModelPatcher whose weights are
re-materialised as W + up @ down by weight wrappers on every call. Ours trains a plain MMHDiT with
peft LoRA layers straight from the latent cache. If ours is not clearly faster (goal >= 1.3x
samples/s) and leaner (goal <= 0.8x peak RSS), our trainer buys nothing over core.

Same for both, in one run: the same weights (a small random oboro model, fp32, loaded by
OboroModelLoader in both graphs), the same data (N latents + caption states in one latent cache of
OboroCacheLatents' format, built here from synthetic tensors; ours reads it via cache_dir, core gets
it as one LATENT + one CONDITIONING per item from a bench-only node, the list form core's dataset
nodes produce), batch size, steps, lr, AdamW (betas 0.9/0.999, weight decay 0.01), fp32, LoRA rank
and alpha = 1 (scale 1/rank, core's fixed choice), gradient checkpointing on or off for both.
Not the same (core cannot be configured otherwise): core puts LoRA on EVERY Linear (embedders,
adaLN, final layer too) and trains full diffs of every bias and norm weight; ours trains
targets="all" (attention qkv/out + SwiGLU w1/w2/w3); ours runs with caption dropout 0, no grad
clipping and no spike guard, which core does not have. Both use SDPA attention by default
(--comfy-attention pytorch, what ComfyUI uses on GPUs); `default` gives core ComfyUI's CPU
default (sub-quadratic attention) while ours always uses SDPA.
Read the ratio with this in mind: core hands the batch's B captions to the guider as B conds and
calc_cond_batch runs EACH cond over the WHOLE batch, so a step of batch B costs core B*B model
samples (and trains each latent on the mean prediction over all B captions). The bench counts the
samples the model's forward really sees and prints the ratio per computed sample too; at
--batch 1 the two do the same work.

Each trainer runs in its own subprocess (embedded ComfyUI: OboroModelLoader -> trainer node), so
peak RSS (getrusage ru_maxrss of the child) is per trainer; RSS is also sampled every 5 ms to say in
which phase the peak falls. Step times come from ComfyUI's progress hook; samples/s = batch / median
time of the steps after the warm-up (the mean is printed too), so no loading or saving is timed.
One run each, sequentially, 1 torch thread by default: on a shared CPU the numbers are still noisy.

    .venv/bin/python bench/train_vs_trainloranode.py [--batch 2 --steps 10 --hidden 512 --depth 8 ...]
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import oboro_env  # noqa: E402

MARK = "BENCH_RESULT "
MODEL_FILE = "bench_train_dit.safetensors"

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--n", type=int, default=16, help="cached items (latent + caption)")
p.add_argument("--latent", type=int, default=32, help="latent H = W")
p.add_argument("--channels", type=int, default=16, help="16: FLUX latents; 3: pixel space")
p.add_argument("--hidden", type=int, default=512)
p.add_argument("--depth", type=int, default=8)
p.add_argument("--heads", default="4,8", help="head schedule (oboro_model.config.parse_heads)")
p.add_argument("--mlp", type=int, default=1536)
p.add_argument("--text-dim", type=int, default=256)
p.add_argument("--text-len", default="8,24", help="caption state lengths, min,max (varied per item)")
p.add_argument("--batch", type=int, default=2)
p.add_argument("--steps", type=int, default=10, help="optimiser steps, warm-up included")
p.add_argument("--warmup-steps", type=int, default=1, help="steps excluded from the timing")
p.add_argument("--rank", type=int, default=8)
p.add_argument("--lr", type=float, default=5e-4)
p.add_argument("--checkpointing", choices=["on", "off"], default="on", help="gradient checkpointing, both")
p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
               help="the MODEL's weight_dtype (OboroModelLoader) and both trainers' compute dtype (ours: precision, "
                    "keeping a LoRA's frozen base as the MODEL stores it; core: training_dtype); LoRAs fp32 in both")
p.add_argument("--threads", type=int, default=1,
               help="torch threads per trainer; 1 by default: on a shared CPU, 2 OpenMP threads stall each other")
p.add_argument("--comfy-attention", choices=["pytorch", "default"], default="pytorch",
               help="core's attention: SDPA (as on GPU) or ComfyUI's CPU default (sub-quadratic)")
p.add_argument("--malloc-mmap-threshold", type=int, default=0,
               help="bytes; >0 sets MALLOC_MMAP_THRESHOLD_ in both children: glibc then returns every large "
                    "freed tensor to the OS, so RSS follows live memory instead of the heap glibc keeps")
p.add_argument("--profile", action="store_true",
               help="also print each trainer's top torch ops (torch.profiler over the whole graph; distorts times and RSS)")
p.add_argument("--only", choices=["ours", "core"], help="run one trainer only")
p.add_argument("--order", choices=["ours-first", "core-first"], default="ours-first")
p.add_argument("--keep", action="store_true", help="keep the temporary folder")
p.add_argument("--child", choices=["ours", "core"], help=argparse.SUPPRESS)
p.add_argument("--root", help=argparse.SUPPRESS)
a = p.parse_args()
if not 1 <= a.warmup_steps < a.steps:
    sys.exit("need 1 <= --warmup-steps < --steps")


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ---------------------------------------------------------------------------------------------------
# child: one trainer in embedded ComfyUI
# ---------------------------------------------------------------------------------------------------
def child(kind: str, root: Path) -> None:
    oboro_env.add_comfy_to_path()
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = True
    comfy_args.use_pytorch_cross_attention = a.comfy_attention == "pytorch"
    import torch
    torch.set_num_threads(a.threads)
    oboro_env.import_oboro()
    from oboro.runner import embedded
    embedded.start(cpu=True, output_dir=str(root / "output"),
                   model_dirs={"diffusion_models": str(root / "models" / "diffusion_models"),
                               "loras": str(root / "models" / "loras")})
    import importlib
    import psutil
    import comfy.utils
    from comfy.ldm.modules.attention import optimized_attention
    from oboro.oboro_model.data import LatentCache

    class BenchCacheToTrainInputs:
        """The cache as core TrainLoraNode's inputs: raw latents (core applies process_latent_in
        itself, as our trainer applies latent_format.process_in) and per item a conditioning in
        OboroTextEncode's format [[hidden [1,L,D], {"attention_mask": [1,L]}]]."""
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"cache_dir": ("STRING", {"default": ""})}}
        RETURN_TYPES = ("LATENT", "CONDITIONING")
        OUTPUT_IS_LIST = (True, True)  # as core's dataset nodes give them: one LATENT (batch 1) and one
        FUNCTION = "load"              # CONDITIONING per item (a single LATENT hits an UnboundLocalError
        CATEGORY = "bench"             # on `multi_res` in TrainLoraNode of ComfyUI 0.3.75)

        def load(self, cache_dir):
            cache = LatentCache(cache_dir)
            items = [cache[i] for i in range(len(cache))]
            latents = [{"samples": it["latent"].float()[None]} for it in items]
            conds = [[[it["text"].float()[None], {"attention_mask": it["text_mask"].long()[None]}]] for it in items]
            return (latents, conds)

    importlib.import_module("nodes").NODE_CLASS_MAPPINGS["BenchCacheToTrainInputs"] = BenchCacheToTrainInputs

    # Count the samples the diffusion model's forward sees (top-level calls; checkpoint recomputes
    # only re-run blocks). Both trainers' models are the extension's MMHDiT (core: its subclass).
    mmh_classes = [m.MMHDiT for name, m in list(sys.modules.items())
                   if name.endswith("oboro_model.model") and hasattr(m, "MMHDiT")]
    seen = {"calls": 0, "samples": 0, "first_t": None}
    for cls in mmh_classes:
        def counted(self, x, *args, _orig=cls.forward, **kw):
            if seen["first_t"] is None:
                seen["first_t"] = time.perf_counter()
            seen["calls"] += 1
            seen["samples"] += x.shape[0]
            return _orig(self, x, *args, **kw)
        cls.forward = counted

    events = []  # (perf_counter, value, total, rss MiB, calls, samples) at each progress update
    proc = psutil.Process()

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        events.append((time.perf_counter(), value, total, proc.memory_info().rss / 2**20,
                       seen["calls"], seen["samples"]))
    comfy.utils.set_progress_bar_global_hook(hook)

    ckpt = a.checkpointing == "on"
    g = {"m": {"class_type": "OboroModelLoader", "inputs": {"model_name": MODEL_FILE, "weight_dtype": a.dtype}}}
    if kind == "ours":
        g["train"] = {"class_type": "OboroTrainLoRA", "inputs": {
            "model": ["m", 0], "cache_dir": str(root / "cache"), "output_name": "bench_ours", "steps": a.steps,
            "batch_size": a.batch, "lr": a.lr, "warmup": 0, "schedule": "constant", "optimizer": "adamw",
            "grad_accum": 1, "clip_grad_norm": 0.0, "precision": a.dtype, "gradient_checkpointing": ckpt,
            "caption_dropout": 0.0, "t_sampling": "uniform", "spike_guard": False, "seed": 0,
            "checkpoint_every": 0, "keep_last": 1, "rank": a.rank, "alpha": 1.0, "dropout": 0.0, "targets": "all"}}
    else:
        g["data"] = {"class_type": "BenchCacheToTrainInputs", "inputs": {"cache_dir": str(root / "cache")}}
        g["train"] = {"class_type": "TrainLoraNode", "inputs": {
            "model": ["m", 0], "latents": ["data", 0], "positive": ["data", 1], "batch_size": a.batch,
            "grad_accumulation_steps": 1, "steps": a.steps, "learning_rate": a.lr, "rank": a.rank,
            "optimizer": "AdamW", "loss_function": "MSE", "seed": 0, "training_dtype": a.dtype,
            "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": ckpt, "existing_lora": "[None]"}}
        g["save"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["train", 1], "prefix": "loras/bench_core",
                                                          "steps": ["train", 3]}}

    # Trainable parameters: peek at what each trainer builds (counted from its optimizer).
    import torch.optim
    trainable = {"n": 0, "tensors": 0}
    orig_adamw_init = torch.optim.AdamW.__init__

    def adamw_init(self, params, *args, **kw):
        params = list(params)
        flat = [q for grp in params for q in (grp["params"] if isinstance(grp, dict) else [grp])]
        trainable["n"] += sum(q.numel() for q in flat)
        trainable["tensors"] += len(flat)
        return orig_adamw_init(self, params, *args, **kw)
    torch.optim.AdamW.__init__ = adamw_init

    # RSS every 5 ms, to tell which phase the peak falls in (ru_maxrss only gives the peak).
    import threading
    trace, done = [], threading.Event()

    def sample_rss():
        while not done.is_set():
            trace.append((time.perf_counter(), proc.memory_info().rss / 2**20))
            time.sleep(0.005)
    sampler = threading.Thread(target=sample_rss, daemon=True)
    rss_start, t0 = maxrss_mib(), time.perf_counter()
    sampler.start()
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            embedded.run(g)
    else:
        embedded.run(g)
    t_end = time.perf_counter()
    done.set()
    sampler.join()
    wall = t_end - t0
    steps = [e for e in events if e[2] == a.steps and e[1] >= 1]
    by_step = {}
    for e in steps:
        by_step.setdefault(e[1], e)  # first report of each step
    if sorted(by_step) != list(range(1, a.steps + 1)):
        raise RuntimeError(f"{kind}: progress reported steps {sorted(by_step)}, expected 1..{a.steps}")
    first, end = by_step[a.warmup_steps], by_step[a.steps]
    start_t, calls0, samples0 = first[0], first[4], first[5]
    timed = a.steps - a.warmup_steps
    trace += [(e[0], e[3]) for e in events]
    bounds = {"load+setup": (t0, seen["first_t"]), "warm-up steps": (seen["first_t"], start_t),
              "timed steps": (start_t, end[0]), "after training (save, outputs)": (end[0], t_end)}
    phases = {k: max((r for t, r in trace if lo <= t <= hi), default=float("nan")) for k, (lo, hi) in bounds.items()}
    durations = [by_step[i][0] - by_step[i - 1][0] for i in range(a.warmup_steps + 1, a.steps + 1)]
    print(MARK + json.dumps({
        "phase_peak_rss_mib": phases, "step_s": durations,
        "kind": kind, "samples_per_s": a.batch / statistics.median(durations),
        "mean_samples_per_s": timed * a.batch / (end[0] - start_t),
        "peak_rss_mib": maxrss_mib(), "startup_peak_rss_mib": rss_start,
        "max_rss_at_step_ends_mib": max(e[3] for e in steps), "graph_wall_s": wall,
        "forward_calls_per_step": (end[4] - calls0) / timed, "forward_samples_per_step": (end[5] - samples0) / timed,
        "trainable_params": trainable["n"], "trainable_tensors": trainable["tensors"],
        "attention": getattr(optimized_attention, "__wrapped__", optimized_attention).__name__,
        "threads": torch.get_num_threads(),
        "profile": prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=34, max_shapes_column_width=56)
        if a.profile else None}), flush=True)


# ---------------------------------------------------------------------------------------------------
# parent: model + cache, then one child per trainer
# ---------------------------------------------------------------------------------------------------
class SyntheticItems:
    """What build_cache needs of a dataset. "pixels" are already latents (the encoder below is
    the identity): the bench measures training, not the VAE."""

    def __init__(self, n, channels, side, seed=0):
        import torch
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(n, channels, side, side, generator=g)
        words = "a photo of red blue green small large cat dog house tree under over the bright night sky".split()
        lo, hi = (int(v) for v in a.text_len.split(","))
        self.lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
        self.captions = [" ".join(words[(i * 7 + j) % len(words)] for j in range(L - 1)) + f" #{i}"
                         for i, L in enumerate(self.lengths)]
        self.side = side

    def settings(self):
        return {"policy": "bench"}

    def source(self, i):
        return {"file": f"item{i}", "image_sha256": f"{i:064x}", "caption": self.captions[i],
                "bucket": [self.side, self.side]}

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {"pixels": self.latents[i], "caption": self.captions[i]}


def prepare(root: Path) -> dict:
    import torch
    torch.manual_seed(0)
    oboro_env.import_oboro()
    from oboro.oboro_model import MMHDiT, OboroConfig, save_checkpoint
    from oboro.oboro_model.config import parse_heads
    from oboro.oboro_model.data import build_cache
    cfg = OboroConfig(in_channels=a.channels, patch_size=2, hidden_size=a.hidden, depth=a.depth,
                      heads=parse_heads(a.heads, a.depth), mlp_hidden=a.mlp, text_dim=a.text_dim,
                      adaln_dim=min(a.hidden, 1024))
    model = MMHDiT(cfg)
    with torch.no_grad():  # every parameter random (no zero-init gates): every path is exercised
        for q in model.parameters():
            q.normal_(0.0, 0.02)
    save_checkpoint(root / "models" / "diffusion_models" / MODEL_FILE, model)
    (root / "models" / "loras").mkdir(parents=True, exist_ok=True)
    (root / "output").mkdir(parents=True, exist_ok=True)
    items = SyntheticItems(a.n, a.channels, a.latent)
    gen = torch.Generator().manual_seed(1)

    def encode_text(captions):
        hidden = [torch.randn(len(c.split()), a.text_dim, generator=gen) for c in captions]  # a state per word
        return hidden, [torch.ones(h.shape[0], dtype=torch.long) for h in hidden]
    build_cache(items, root / "cache", lambda px: px, encode_text, {"vae": "identity", "t5": "random"})
    return {"params": sum(q.numel() for q in model.parameters()), "heads": list(cfg.heads),
            "lengths": items.lengths}


def run_child(kind: str, root: Path) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--root", str(root)]
    argv += [x for x in sys.argv[1:] if x != "--keep"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    if a.malloc_mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(MARK)]
    if r.returncode or not lines:
        sys.stderr.write(r.stdout[-4000:] + "\n" + r.stderr[-8000:])
        sys.exit(f"{kind} child failed (exit {r.returncode})")
    out = json.loads(lines[-1][len(MARK):])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def main():
    if a.child:
        child(a.child, Path(a.root))
        return
    import torch
    t_all = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="oboro_train_bench_"))
    order = ["ours", "core"] if a.order == "ours-first" else ["core", "ours"]
    try:
        info = prepare(root)
        res = {k: run_child(k, root) for k in order if a.only in (None, k)}
    finally:
        if a.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    tokens = 1 + (a.latent // 2) ** 2
    print(f"torch {torch.__version__}, {a.threads} threads, {a.dtype} CPU ({os.cpu_count()} cores visible; other "
          f"jobs may share them: timings are noisy); one run per trainer, each in its own process")
    print(f"model: hidden {a.hidden}, depth {a.depth}, heads {info['heads']}, mlp {a.mlp}, text_dim {a.text_dim}, "
          f"{info['params'] / 1e6:.2f}M params; data: {a.n} items, {a.channels}x{a.latent}x{a.latent} latents "
          f"({tokens - 1} image tokens + BOS), caption states {min(info['lengths'])}..{max(info['lengths'])} tokens")
    print(f"training: batch {a.batch}, {a.steps} steps ({a.warmup_steps} warm-up not timed), AdamW lr {a.lr}, "
          f"LoRA rank {a.rank} alpha 1, gradient checkpointing {a.checkpointing}, "
          f"core attention {res['core']['attention'] if 'core' in res else '-'}; glibc mmap threshold "
          f"{a.malloc_mmap_threshold or 'dynamic (default)'}")
    for k in order:
        if k not in res:
            continue
        r = res[k]
        name = "ours" if k == "ours" else "TrainLoraNode"
        print(f"{name}: {r['samples_per_s']:.2f} samples/s, peak RSS {r['peak_rss_mib']:.0f} MiB")
        print(f"  {name} detail: step times {' '.join(f'{v:.2f}' for v in r['step_s'])} s (median -> samples/s; "
              f"mean over them {r['mean_samples_per_s']:.2f} samples/s); model forward {r['forward_calls_per_step']:.1f} "
              f"calls/step over {r['forward_samples_per_step']:.1f} samples/step; trainable "
              f"{r['trainable_params']:,} params in {r['trainable_tensors']} tensors; RSS after ComfyUI start "
              f"{r['startup_peak_rss_mib']:.0f} MiB (peak - that = {r['peak_rss_mib'] - r['startup_peak_rss_mib']:.0f} "
              f"MiB); graph {r['graph_wall_s']:.1f} s, process {r['process_wall_s']:.1f} s")
        print(f"  {name} sampled RSS peak by phase: "
              + ", ".join(f"{ph} {v:.0f}" for ph, v in r["phase_peak_rss_mib"].items()) + " MiB")
        if r.get("profile"):
            print(f"  {name} top ops (whole graph, profiled):\n{r['profile']}")
    if len(res) == 2:
        o, c = res["ours"], res["core"]
        fwd = (o["samples_per_s"] * o["forward_samples_per_step"]) / (c["samples_per_s"] * c["forward_samples_per_step"])
        print(f"samples/s ratio ours/core = {o['samples_per_s'] / c['samples_per_s']:.3f} (goal >= 1.3)  "
              f"[from mean step times {o['mean_samples_per_s'] / c['mean_samples_per_s']:.3f}; per sample the model "
              f"actually ran {fwd:.3f}]")
        print(f"peak RSS ratio ours/core = {o['peak_rss_mib'] / c['peak_rss_mib']:.3f} (goal <= 0.8)")
        do, dc = o["peak_rss_mib"] - o["startup_peak_rss_mib"], c["peak_rss_mib"] - c["startup_peak_rss_mib"]
        print(f"peak RSS above ComfyUI start, ours/core = {do:.0f}/{dc:.0f} MiB = {do / max(dc, 1e-9):.3f}")
    print(f"bench wall time {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    main()
