"""`scripts/oboro-train CONFIG.toml`: the command-line front end of the training engine. It turns
the TOML into a RunSpec, builds the network, and calls run() (run.py), the same run the training
nodes call; under `accelerate launch` every process does so as one DDP rank (distributed.py).
CONFIG.toml (relative paths are relative to the file):

    model = "tiny"                    # a preset name or a checkpoint path; or a table:
    # [model]
    # preset = "oboro-small"          # from scratch: initialize_weights with `seed`
    # config = { in_channels = 16 }   # OboroConfig overrides of the preset
    # seed = 0
    # checkpoint = "base.safetensors" # fine-tune: start from these weights (instead of preset)

    [data]
    path = "cache"                    # a latent cache folder written by OboroCacheLatents (or
                                      # build_cache): its manifest's latent transform and empty
                                      # prompt are applied as the training nodes apply them
    validation_cache_dir = "val"      # optional: a second cache scored for validation (or
                                      # [training] validation_split = 0.1 to hold out a fraction)
    # Several caches: [[data]] tables instead, each path + optional weight (1.0), repeats (from
    # an N_name folder, else 1), loss_weight (1.0), reg (false: true = regularization set); see
    # oboro_model/training/datasets.py and README "Adapter kinds, weighted datasets".

    [training]                        # any TrainConfig field; batch_size is per process
    steps = 1000
    batch_size = 4
    lr = 1e-4
    # ema_decay = 0.999, ema_start = 0, t_sampling = "shifted", t_shift = 3.0, optimizer = "prodigy",
    # validation_split = 0.1, validation_every = 100, validation_timesteps = 8, validation_seed = 0

    [lora]                            # optional: train a LoRA (peft) instead of all weights
    rank = 16
    alpha = 16
    dropout = 0.0
    targets = "attn"                  # attn | mlp | all | [module paths or suffixes]
    base_dtype = "stored"             # the frozen base's Linear weights: stored (the checkpoint's
                                      # dtype) | fp32 | bf16 | fp16 | fp8_e4m3fn | fp8_e5m2
    adapter = "lora"                  # lora | loha | lokr | dora (README: adapter kinds)

    [output]
    dir = "runs/my-run"               # training states (step_*.safetensors) and the final export
    name = "model"                    # final file <dir>/<name>.safetensors (LoRA default "lora")
    resume = true                     # continue from the newest state in dir, if any (false: refuse
                                      # to start over an earlier run's states, as the nodes do)
    log_every = 10
    log_with = "none"                 # none | tensorboard | wandb: trackers under <dir>/logs

`oboro-train --plan CONFIG.toml` prints the memory this run needs per process (memory.py) and exits.
    # export_dir = "exports"          # where <name>.safetensors goes (default: dir); next free name
    # overwrite = false               # replace an existing <name>.safetensors (default: next free name)
    # samples = 4                     # samples.png: this many cached captions sampled at the end

`oboro-train --plan CONFIG.toml` prints the memory this run needs per process (memory.py) and exits.
`--comfyui PATH` exports into that ComfyUI's models/loras (LoRA) or models/diffusion_models (full).
Re-running a finished, unchanged config writes nothing and prints the existing file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from ..checkpoint import load_checkpoint, read_checkpoint
from ..config import PRESETS, OboroConfig, preset
from ..data.cache import MANIFEST
from ..model import MMHDiT
from .datasets import parse_data_config
from .export import ExportSpec
from .frozen_base import frozen_base_model, linear_dtype, storage_dtype
from .memory import log_plan
from .run import LoraSpec, RunHooks, RunInterrupted, RunSpec, open_cache, run
from .trainer import TrainConfig

logger = logging.getLogger(__name__)

SECTIONS = ("model", "data", "training", "lora", "output")
LORA_KEYS = ("rank", "alpha", "dropout", "targets", "base_dtype", "adapter")
OUTPUT_KEYS = ("dir", "name", "resume", "log_every", "log_with", "export_dir", "overwrite", "samples")
MODEL_KEYS = ("preset", "config", "seed", "checkpoint")


def load_cached_dataset(path, what: str = "[data]"):
    """The latent cache folder at `path` (written by OboroCacheLatents or build_cache), read with
    its recorded latent transform and empty prompt: the same reader the training nodes use."""
    p = Path(path)
    if not (p / MANIFEST).is_file():
        raise FileNotFoundError(f"{p}: not a latent cache folder (no {MANIFEST}); write one with the "
                                "OboroCacheLatents node or oboro_model.data.build_cache")
    return open_cache(p, what=what)


# ---- config -------------------------------------------------------------------------------------
def load_run_config(path) -> dict:
    """Parse CONFIG.toml; relative paths resolve against its folder (kept as `_base_dir`)."""
    import tomllib
    path = Path(path)
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    cfg["_base_dir"] = str(path.resolve().parent)
    return cfg


def _check_keys(section: str, table: Mapping, allowed) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"[{section}]: unknown keys {unknown}; allowed: {sorted(allowed)}")


def _path(base: Path, p) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else base / p


def build_model(spec: Union[str, Mapping[str, Any]], base_dir=".", lora_base: Optional[str] = None) -> MMHDiT:
    """A preset name (fresh init) or a checkpoint path (fp32 weights), or the [model] table. With
    `lora_base` (a LoRA run's [lora] base_dtype) the model is a frozen base whose Linear weights
    stay in that storage dtype ("stored": the checkpoint's own) instead of an fp32 copy."""
    base = Path(base_dir)
    if isinstance(spec, str):
        spec = {"preset": spec} if spec in PRESETS else {"checkpoint": spec}
    _check_keys("model", spec, MODEL_KEYS)
    dtype = None if lora_base is None else storage_dtype(lora_base)
    if "checkpoint" in spec:
        if "preset" in spec or "config" in spec:
            raise ValueError("[model]: give either checkpoint or preset (+ config), not both")
        path = _path(base, spec["checkpoint"])
        if lora_base is None:
            return load_checkpoint(path, dtype=torch.float32).train()
        sd, config, _ = read_checkpoint(path)
        return frozen_base_model(config, sd, dtype, name=str(path)).train()
    if "preset" not in spec:
        raise ValueError("[model]: needs `preset` or `checkpoint`")
    config: OboroConfig = preset(spec["preset"], **dict(spec.get("config", {})))
    gen = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    net = MMHDiT(config).initialize_weights(gen)
    if dtype is not None and dtype != torch.float32:
        net = frozen_base_model(config, net.state_dict(), dtype, name=spec["preset"]).train()
    return net


def model_config(spec: Union[str, Mapping[str, Any]], base_dir=".") -> tuple[OboroConfig, str]:
    """(OboroConfig, display name) of what build_model would build, without building it (a
    checkpoint's header or inferred shapes; its tensors are not read)."""
    base = Path(base_dir)
    if isinstance(spec, str):
        spec = {"preset": spec} if spec in PRESETS else {"checkpoint": spec}
    _check_keys("model", spec, MODEL_KEYS)
    if "checkpoint" in spec:
        from ..checkpoint import read_checkpoint
        path = _path(base, spec["checkpoint"])
        return read_checkpoint(path)[1], path.name
    if "preset" not in spec:
        raise ValueError("[model]: needs `preset` or `checkpoint`")
    return preset(spec["preset"], **dict(spec.get("config", {}))), spec["preset"]


def plan_from_config(cfg: Union[str, Path, Mapping], device: Optional[str] = None, resolution: Optional[int] = None,
                     text_tokens: Optional[int] = None):
    """The memory plan (memory.py) of the run a CONFIG.toml describes, per process: its model, [lora],
    [training] and the largest latent / longest text of its [data] cache (`resolution` in pixels
    overrides the cache, e.g. to plan before the cache exists)."""
    from .memory import VAE_FACTOR, plan_for_training
    if not isinstance(cfg, Mapping):
        cfg = load_run_config(cfg)
    base = Path(cfg.get("_base_dir", "."))
    if "model" not in cfg:
        raise ValueError("config needs `model` (a preset name or checkpoint path, or a [model] table)")
    config, name = model_config(cfg["model"], base)
    lora = cfg.get("lora")
    if lora is not None:
        _check_keys("lora", lora, LORA_KEYS)
    tc = train_config(cfg, None)
    latent = None
    if resolution:
        f = 1 if config.in_channels == 3 else VAE_FACTOR
        latent = (resolution // f, resolution // f)
    data = parse_data_config(cfg["data"])[0].path if cfg.get("data") else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = None if lora is None else lora_spec(lora)
    return plan_for_training(config, tc, spec, None if data is None else _path(base, data), device, latent,
                             text_tokens, base_dtype=None if spec is None else _base_dtype(cfg["model"], base, spec),
                             name=name)


def _base_dtype(model_spec, base: Path, spec: LoraSpec) -> torch.dtype:
    """The dtype a LoRA run keeps its frozen base in: [lora] base_dtype, or the checkpoint's own."""
    dtype = storage_dtype(spec.base_dtype)
    if dtype is not None:
        return dtype
    if isinstance(model_spec, str):
        model_spec = {"preset": model_spec} if model_spec in PRESETS else {"checkpoint": model_spec}
    if "checkpoint" not in model_spec:
        return torch.float32
    from safetensors import safe_open
    with safe_open(str(_path(base, model_spec["checkpoint"])), framework="pt") as f:
        key = next(k for k in f.keys() if k.endswith("attn.qkv.weight"))
        return {"BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn,
                "F8_E5M2": torch.float8_e5m2}.get(f.get_slice(key).get_dtype(), torch.float32)


def lora_spec(table: Mapping) -> LoraSpec:
    targets = table.get("targets", "attn")
    base_dtype = str(table.get("base_dtype", "stored"))
    storage_dtype(base_dtype)  # a clear error for an unknown name, before anything loads
    return LoraSpec(int(table.get("rank", 16)), None if table.get("alpha") is None else float(table["alpha"]),
                    float(table.get("dropout", 0.0)), targets if isinstance(targets, str) else tuple(targets),
                    base_dtype, str(table.get("adapter", "lora")))


def train_config(cfg: Mapping, output_dir: Optional[Path]) -> TrainConfig:
    training = dict(cfg.get("training", {}))
    _check_keys("training", training, [f.name for f in dataclasses.fields(TrainConfig)])
    if "output_dir" in training:
        training["output_dir"] = str(_path(Path(cfg["_base_dir"]), training["output_dir"]))
    elif output_dir is not None:
        training["output_dir"] = str(output_dir)
    return TrainConfig(**training)


def run_spec(cfg: Mapping, comfyui: Optional[str] = None) -> tuple[RunSpec, dict]:
    """(RunSpec, [output] table) of a parsed CONFIG.toml."""
    unknown = sorted(set(cfg) - set(SECTIONS) - {"_base_dir"})
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; allowed: {list(SECTIONS)}")
    base = Path(cfg.get("_base_dir", "."))
    out = dict(cfg.get("output", {}))
    _check_keys("output", out, OUTPUT_KEYS)
    if "dir" not in out:
        raise ValueError("[output]: needs `dir` (the run's folder: training states, loss curve, samples)")
    if "model" not in cfg:
        raise ValueError("config needs `model` (a preset name or checkpoint path, or a [model] table)")
    if "data" not in cfg:
        raise ValueError("[data]: needs `path` (a latent cache folder written by OboroCacheLatents)")
    out_dir = _path(base, out["dir"])
    lora = cfg.get("lora")
    if lora is not None:
        _check_keys("lora", lora, LORA_KEYS)
    data_table = cfg["data"]
    val_dir = data_table.get("validation_cache_dir") if isinstance(data_table, Mapping) else None
    if isinstance(data_table, Mapping):  # the validation cache is not a training source
        data_table = {k: v for k, v in data_table.items() if k != "validation_cache_dir"}
    sources = tuple(dataclasses.replace(s, path=str(_path(base, s.path))) for s in parse_data_config(data_table))
    kind = "lora" if lora is not None else "full"
    folder = _path(base, out["export_dir"]) if "export_dir" in out else out_dir
    if comfyui:
        folder = Path(comfyui).expanduser() / "models" / ("loras" if kind == "lora" else "diffusion_models")
        if not folder.parent.is_dir():
            raise ValueError(f"--comfyui {comfyui}: no models/ folder there (the ComfyUI folder?)")
    export = ExportSpec(str(folder), str(out.get("name") or ("lora" if kind == "lora" else "model")), kind,
                        bool(out.get("overwrite", False)))
    spec = RunSpec(train_config(cfg, None), str(out_dir), sources, None if lora is None else lora_spec(lora),
                   str(_path(base, val_dir)) if val_dir else None, "latest" if out.get("resume", True) else "",
                   export, samples=int(out.get("samples", 4)), what="oboro-train")
    return spec, out


def train_from_config(cfg: Union[str, Path, Mapping], accelerator=None, comfyui: Optional[str] = None) -> dict:
    """Run the training a CONFIG.toml (path or parsed dict) describes, in this process as one rank
    of `accelerator` (default: a new Accelerator, which picks up `accelerate launch`'s settings).
    Returns {"step", "export": [files], "summary", "reused"}."""
    from .distributed import AccelerateProcess
    if not isinstance(cfg, Mapping):
        cfg = load_run_config(cfg)
    cfg = dict(cfg)
    cfg.setdefault("_base_dir", ".")
    spec, out = run_spec(cfg, comfyui)
    tc = spec.config
    log_with = str(out.get("log_with", "none"))
    if accelerator is None:
        from accelerate import Accelerator
        # accelerate only runs several processes on CPU (gloo) when told cpu=True; without a GPU,
        # a multi-process launch (accelerate launch --multi_gpu / torchrun) means exactly that.
        accelerator = Accelerator(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1)
    dist = AccelerateProcess(accelerator)
    # Same seed on every rank: identical LoRA init and dropout streams (DDP also broadcasts rank 0's
    # weights), and the saved torch RNG state is then valid for every rank on resume.
    torch.manual_seed(tc.seed)
    model = build_model(cfg["model"], cfg["_base_dir"], None if spec.adapter is None else spec.adapter.base_dtype)
    every = int(out.get("log_every", 10))

    def log(trainer, step, loss, lr, rate):
        if dist.is_main and every > 0 and (step % every == 0 or step == tc.steps):
            logger.info("step %d/%d  loss %.5f  lr %.3g  %.2f it/s", step, tc.steps, loss, lr, rate)

    def tracker(folder, config):
        from .tracking import Tracker
        return Tracker(log_with, Path(folder) / "logs", Path(folder).name, dataclasses.asdict(config),
                       is_main=dist.is_main)

    if dist.is_main:
        log_plan(logger, "oboro-train", model.config, tc, spec.adapter, spec.sources[0].path, accelerator.device.type,
                 base_dtype=None if spec.adapter is None else linear_dtype(model))
        logger.info("training %s: %d process(es) x batch %d x accum %d = global batch %d",
                    "LoRA" if spec.adapter is not None else "all weights", dist.world_size, tc.batch_size,
                    tc.grad_accum, dist.world_size * tc.batch_size * tc.grad_accum)
    hooks = RunHooks(on_step=log, dist=dist, tracker=tracker,
                     open_cache=lambda p, what: load_cached_dataset(p, what))
    result = run(spec, model.to(accelerator.device), hooks)
    if dist.is_main:
        logger.info("summary: %s", json.dumps(result.summary, default=str))
    paths = [result.summary[k] for k in ("path", "best_path") if result.summary.get(k)]
    return {"step": result.summary["step"], "export": [Path(p) for p in paths], "summary": result.summary,
            "reused": result.reused, "state_dir": str(result.state_dir)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="oboro-train", description="Train oboro (I-CFM) from a CONFIG.toml; run "
                                 "under `accelerate launch` for multi-GPU / multi-node DDP.")
    ap.add_argument("config", help="CONFIG.toml")
    ap.add_argument("--plan", action="store_true", help="print the memory the run needs (per process: weights, "
                    "gradients, optimizer state, activations) and exit without training")
    ap.add_argument("--resolution", type=int, default=None, help="with --plan: image side in pixels to plan for "
                    "(default: the largest latent in [data] path's cache, else 512)")
    ap.add_argument("--text-tokens", type=int, default=None, help="with --plan: text length (default: the "
                    "cache's longest, else 256)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="with --plan: the device to plan "
                    "for (cuda: the optimiser step's foreach temporaries; default)")
    ap.add_argument("--comfyui", default=None, help="a ComfyUI folder: export the result into its models/loras "
                    "(LoRA) or models/diffusion_models (full), under the next free name")
    args = ap.parse_args(argv)
    if args.plan:
        print(plan_from_config(args.config, args.device, args.resolution, args.text_tokens).table())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    try:
        r = train_from_config(args.config, comfyui=args.comfyui)
    except RunInterrupted as e:
        print(f"oboro-train: interrupted: {e}")
        return 130
    s = r["summary"]
    if r["reused"]:
        print(f"oboro-train: already trained, nothing written: {s['path']}")
    else:
        for key in ("path", "best_path"):
            if s.get(key):
                print(f"oboro-train: wrote {s[key]}")
        print(f"oboro-train: loss curve and samples in {r['state_dir']}")
    return 0
