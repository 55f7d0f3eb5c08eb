"""Memory of loading the real-size model through OboroModelLoader's code path, and one CPU step.

The `oboro-base-1b` preset with random weights is saved as bf16, as fp8 (e4m3fn) and as a
ComfyUI scaled-fp8 file (fp8 Linear weights, per-layer scale_weight, `scaled_fp8` marker). Each is
loaded by nodes.comfy_model.load_oboro_model (ComfyUI in CPU mode) in a FRESH subprocess, so each
peak is its own: `load peak` = VmHWM after loading - VmRSS before loading (ComfyUI + torch
imported) once every weight byte has been read (mmap-backed weights are read in lazily, on
first use), and `peak / file` compares it with the file size (goal <= 1.1: the weights exist once,
mmap-backed; 2x means a second copy). `fp8 / bf16` compares the two load peaks with the weights
kept in the file's dtype (goal <= 0.55). With weight_dtype "default" ComfyUI picks fp32 on CPU
(comfy.model_management.unet_dtype), so a bf16 file then has to become 2x its size in RAM.

Then one sampling step (core comfy.sample.sample, euler, cfg 1 = one model call) at 416x736
(52x92 latent, 1196 image tokens) with a 64-token random text conditioning, on the default
(fp32-compute) model: seconds, and MFU = counted FLOPs (every Linear's 2*rows*in*out from forward
hooks, plus 4*N^2*hidden per block for attention) / seconds / the fp32 matmul rate measured in
the same process (4096^3 torch.mm).

    .venv/bin/python bench/load_memory.py [--dir /tmp/oboro_load_memory] [--threads 2] [--no-step]

Writes about 5.5 GB of files under --dir and deletes them afterwards; needs ~7 GB of free RAM.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import oboro_env  # noqa: E402

FILES = {"bf16": "oboro-1b-bf16.safetensors", "fp8": "oboro-1b-fp8.safetensors",
         "scaled_fp8": "oboro-1b-scaled-fp8.safetensors"}
# (file, weight_dtype of the loader): the first three keep the file's dtype.
CASES = [("bf16", "bf16"), ("fp8", "fp8_e4m3fn"), ("scaled_fp8", "default"), ("bf16", "default")]


def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def make_files(d: Path) -> None:
    """Random weights straight into bf16 (never a 4.4 GB fp32 model), then the fp8 variants."""
    import torch
    oboro_env.import_oboro()
    from oboro.oboro_model import MMHDiT, preset
    from oboro.oboro_model.atomic import save_safetensors
    from oboro.oboro_model.checkpoint import CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION
    cfg = preset("oboro-base-1b")
    with torch.device("meta"):
        model = MMHDiT(cfg)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g, dtype=torch.bfloat16) * 0.02) if k in linears
          else torch.ones(v.shape, dtype=torch.bfloat16) for k, v in model.state_dict().items()}
    meta = {CONFIG_KEY: cfg.to_json(), FORMAT_KEY: FORMAT_VERSION}
    save_safetensors(d / FILES["bf16"], sd, meta)
    save_safetensors(d / FILES["fp8"], {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}, meta)
    scaled = {}
    for k in list(sd):
        v = sd.pop(k)
        if k in linears:
            scale = v.float().abs().max() / torch.finfo(torch.float8_e4m3fn).max
            scaled[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            scaled[k[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            scaled[k] = v
    scaled["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_safetensors(d / FILES["scaled_fp8"], scaled, meta)


def measure(path: str, weight_dtype: str, step: bool, threads: int) -> dict:
    """In this (fresh) process: load through the node's code path, then optionally one step."""
    oboro_env.add_comfy_to_path()
    from comfy.cli_args import args
    args.cpu = True
    import torch
    torch.set_num_threads(threads)
    oboro_env.import_oboro()
    import comfy.model_management  # noqa: F401  (imported before the baseline is taken)
    from oboro.nodes.comfy_model import load_oboro_model
    before = status_kb("VmRSS")
    t0 = time.perf_counter()
    patcher = load_oboro_model(path, weight_dtype)
    out = {"file": Path(path).name, "weight_dtype": weight_dtype, "file_gb": os.path.getsize(path) / 1e9,
           "load_s": time.perf_counter() - t0, "rss_before_gb": before * 1024 / 1e9,
           "after_load_gb": (status_kb("VmRSS") - before) * 1024 / 1e9}
    # mmap-backed weights are only read in when first used: read every byte, as sampling will.
    for t in patcher.model.diffusion_model.state_dict().values():
        t.detach().reshape(-1).view(torch.uint8).sum()
    out.update({"load_peak_gb": (status_kb("VmHWM") - before) * 1024 / 1e9,
                "param_dtype": str(patcher.model.diffusion_model.x_embedder.weight.dtype)})
    if step:
        out.update(one_step(patcher, threads))
    return out


def one_step(patcher, threads) -> dict:
    import torch
    import comfy.sample
    dm = patcher.model.diffusion_model
    cfg = dm.config
    flops = [0]

    def count(m, inp, outp):
        x = inp[0]
        flops[0] += 2 * x.numel() // x.shape[-1] * m.in_features * m.out_features

    hooks = [m.register_forward_hook(count) for m in dm.modules() if hasattr(m, "in_features")]
    g = torch.Generator().manual_seed(0)
    n_text, (h, w) = 64, (736 // 8, 416 // 8)
    pos = [[torch.randn(1, n_text, cfg.text_dim, generator=g) * 0.1,
            {"attention_mask": torch.ones(1, n_text, dtype=torch.long)}]]
    latent = torch.zeros(1, cfg.in_channels, h, w)
    noise = torch.randn(latent.shape, generator=g)
    t0 = time.perf_counter()
    comfy.sample.sample(patcher, noise, 1, 1.0, "euler", "simple", pos, pos, latent, seed=0, disable_pbar=True)
    seconds = time.perf_counter() - t0
    for hk in hooks:
        hk.remove()
    n = 1 + n_text + (h // cfg.patch_size) * (w // cfg.patch_size)  # BOS + text + image tokens
    flops[0] += 4 * n * n * cfg.hidden_size * cfg.depth
    a = torch.randn(4096, 4096)
    torch.mm(a, a)
    reps, t1 = 3, time.perf_counter()
    for _ in range(reps):
        torch.mm(a, a)
    mm_rate = reps * 2 * 4096 ** 3 / (time.perf_counter() - t1)
    return {"step_s": seconds, "step_tflop": flops[0] / 1e12, "tokens": n, "matmul_gflops": mm_rate / 1e9,
            "mfu": flops[0] / seconds / mm_rate, "threads": threads,
            "peak_after_step_gb": status_kb("VmHWM") * 1024 / 1e9}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/tmp/oboro_load_memory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-step", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the files (default: delete them)")
    p.add_argument("--measure", nargs=2, metavar=("FILE", "WEIGHT_DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--step", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(*a.measure, a.step, a.threads)))
        return
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    try:
        if not all((d / f).is_file() for f in FILES.values()):
            make_files(d)
        rows = []
        for kind, dtype in CASES:
            step = not a.no_step and (kind, dtype) == ("bf16", "default")
            cmd = [sys.executable, __file__, "--measure", str(d / FILES[kind]), dtype, "--threads", str(a.threads)]
            res = subprocess.run(cmd + (["--step"] if step else []), capture_output=True, text=True)
            if res.returncode:
                print(f"{FILES[kind]:34s} {dtype:11s} -> FAILED: {res.stderr.strip().splitlines()[-1]}", flush=True)
                rows.append(None)
                continue
            rows.append(r := json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"{r['file']:34s} {dtype:11s} -> {r['param_dtype']:20s} file {r['file_gb']:.2f} GB  "
                  f"load peak {r['load_peak_gb']:.2f} GB  peak/file {r['load_peak_gb'] / r['file_gb']:.2f}  "
                  f"right after load {r['after_load_gb']:.2f} GB  ({r['load_s']:.1f} s; baseline {r['rss_before_gb']:.2f} GB)",
                  flush=True)
            if "step_s" in r:
                print(f"  one step 416x736 ({r['tokens']} tokens, {r['step_tflop']:.2f} TFLOP): {r['step_s']:.1f} s, "
                      f"matmul {r['matmul_gflops']:.0f} GFLOP/s, MFU {r['mfu']:.2f} ({r['threads']} threads)",
                      flush=True)
        bf16, fp8 = rows[0], rows[1]
        if bf16 and fp8:
            print(f"fp8 peak / bf16 peak: {fp8['load_peak_gb'] / bf16['load_peak_gb']:.2f}")
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
