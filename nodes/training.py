"""OboroTrainLoRA / OboroTrainFull: train an oboro MODEL on a latent cache (OboroCacheLatents) with
the pure-PyTorch Trainer, inside ComfyUI.

ComfyUI runs nodes under torch.inference_mode(), and its MODEL's weights are inference tensors
behind ComfyUI's ops. Training therefore runs on a fresh plain MMHDiT (torch.nn + sdpa) holding
the MODEL's weights (patches such as LoRAs merged in) outside inference mode: fp32 copies for a full
fine-tune; for a LoRA the frozen base as the MODEL stores it (bf16 / fp8, aliased when possible;
oboro_model/training/frozen_base.py). Outputs: a LoRA (ComfyUI key format) in models/loras, applied to the input
MODEL exactly as LoraLoaderModelOnly applies the saved file; or a full checkpoint in
models/diffusion_models, loaded back with load_oboro_model. Resumable training states go to
output/oboro_training/<output_name>/; interrupting writes one, then re-raises the interrupt.
"""
from __future__ import annotations

import gc
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..oboro_model import MMHDiT, save_checkpoint
from ..oboro_model.checkpoint import check_state_dict
from ..oboro_model.data import LatentCache, ScaleShift
from ..oboro_model.training import StopTraining, TrainConfig
from ..oboro_model.training.frozen_base import frozen_base_model, linear_dtype
from ..oboro_model.training.job import Job
from ..oboro_model.training.loss import T_SAMPLING
from ..oboro_model.training.memory import log_plan
from ..oboro_model.training.optim import OPTIMIZERS, SCHEDULES
from ..oboro_model.training.run import LORA_TARGETS, LoraSpec, build_trainer, check_cache_fits, open_cache
from ..oboro_model.training.seeding import seeded_rng
from ..oboro_model.training.trainer import PRECISIONS
from .comfy_model import load_oboro_model
from .paths import confine, free_target
from . import training_studio as studio
from .training_options import after_overwrite, training_data
from .training_preview import CastForSaving, Previews, black_image, encode_plain, loss_curve_image

log = logging.getLogger("oboro")
STATE_ROOT = "oboro_training"
PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inside(root, name: str) -> Path:
    return confine(root, name, "output_name", absolute_ok=False)


def open_node_cache(cache_dir: str, latent_format, node: str) -> LatentCache:
    """The cache through the core reader, with the latent transform its manifest records (what
    scripts/oboro-train applies too), checked against the MODEL's latent format. A cache written
    before the manifest recorded it uses the MODEL's latent_format.process_in."""
    if not (cache_dir or "").strip():
        raise ValueError(f"{node}: cache_dir is empty; connect OboroCacheLatents' cache_dir output")
    cache = open_cache(cache_dir, transform=None, what=node)
    spec = cache.latent_transform
    if spec is None:
        log.warning("%s: %s records no latent transform (an older cache); using the model's %s. Rebuild it with "
                    "OboroCacheLatents so scripts/oboro-train applies the same one.", node, cache.folder,
                    type(latent_format).__name__)
        cache.transform = latent_format.process_in
        return cache
    cache.transform = ScaleShift(spec)
    c = int(cache.items[0]["latent_shape"][0])
    probe = torch.linspace(-3.0, 3.0, 4 * c).view(1, c, 2, 2)
    with torch.inference_mode(False):
        want = latent_format.process_in(probe.clone())
    if want.shape != probe.shape or not torch.allclose(cache.transform(probe), want, atol=1e-6, rtol=1e-6):
        raise ValueError(f"{node}: {cache.folder} was encoded for latent format {spec}, but this model's latent "
                         f"format is {type(latent_format).__name__}; encode the cache with this model's VAE")
    return cache


def _send_text(text: str) -> None:
    """Progress text under the node in the browser (absent headless: no PromptServer)."""
    from comfy_execution.utils import get_executing_context
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    ctx = get_executing_context()
    if server is not None and ctx is not None:
        server.send_progress_text(text, ctx.node_id)


def _plain_weights(model, device, lora: bool = False) -> tuple[dict, dict]:
    """The MODEL's diffusion weights with its patches merged (as ComfyUI's own checkpoint saving
    does), made outside inference mode so autograd may use them, and the scaled-fp8 factors
    {weight key: scale}. Full training gets fp32 copies. A LoRA's frozen base keeps every weight
    in the MODEL's storage dtype (frozen_base.py casts per layer); on an unpatched MODEL whose
    weights already sit on `device` they are aliased, not copied, so the model exists once."""
    share = lora
    if model.patches:
        mm.load_models_gpu([model], force_patch_weights=True)
        share = False  # unpatching restores ComfyUI's tensors in place: keep our own merged copy
    sd = model.model.diffusion_model.state_dict()
    device = torch.device(device)
    scales = {k[: -len(".scale_weight")] + ".weight": v for k, v in sd.items() if k.endswith(".scale_weight")}
    with torch.inference_mode(False):
        def plain(v):
            dtype = v.dtype if lora else torch.float32
            if share and v.dtype == dtype and v.device == device:
                return torch.empty(0, dtype=v.dtype, device=v.device).set_(
                    v.untyped_storage(), v.storage_offset(), v.shape, v.stride())
            return v.detach().to(device=device, dtype=dtype, copy=True)
        weights = {k: plain(v) for k, v in sd.items()}
        if lora:
            return weights, {k: plain(v).float() for k, v in scales.items() if v is not None}
        for k, s in scales.items():  # full training: dequantise scaled fp8 into the fp32 copy
            if s is not None and k in weights:
                weights[k] = weights[k] * s.to(device=device, dtype=torch.float32)
        return weights, {}


def drive(trainer, job: Job, node: str, stem: str, on_step=None) -> None:
    """Run `trainer` up to its steps as a ComfyUI job: progress bar, a log/status line about once a
    second, the job's loss log (saved with each checkpoint), on_step(step) after every update, and
    interrupt -> state saved, InterruptProcessingException (resume with resume_from='latest')."""
    steps, every = trainer.config.steps, trainer.config.checkpoint_every
    pbar, st = comfy.utils.ProgressBar(steps), {"interrupted": False, "said": 0.0}
    pbar.update_absolute(trainer.step, steps)

    def callback(step, loss, lr_now, rate):
        job.record(trainer, step, loss, lr_now)
        if on_step is not None:
            on_step(step)
        if every and step % every == 0:
            job.save()
        text = f"step {step}/{steps}  loss {loss:.4f}  lr {lr_now:.3g}  {rate:.2f} it/s"
        if time.time() - st["said"] > 1.0 or step == steps:
            st["said"] = time.time()
            log.info("%s %s: %s", node, stem, text)
            _send_text(text)
        try:
            pbar.update_absolute(step, steps)
            mm.throw_exception_if_processing_interrupted()
        except mm.InterruptProcessingException:
            st["interrupted"] = True
            raise StopTraining from None

    try:
        trainer.train(callback)
    finally:
        job.save()
    if st["interrupted"]:
        log.warning("%s: interrupted at step %d; resume with resume_from='latest' (state in %s)", node,
                    trainer.step, job.state_dir)
        raise mm.InterruptProcessingException()


@dataclass(frozen=True)
class PreviewSpec:
    prompts: tuple = ()
    every: int = 0
    steps: int = 20
    cfg: float = 5.0
    seed: int = 0


def run_config(kind: str, inputs: dict, state_dir: Path) -> tuple[TrainConfig, Optional[LoraSpec], PreviewSpec]:
    """The node's inputs as the engine's typed run config (TrainConfig, LoRA, previews)."""
    keys = ("steps", "batch_size", "lr", "warmup", "schedule", "optimizer", "grad_accum", "gradient_checkpointing",
            "caption_dropout", "t_sampling", "spike_guard", "seed", "checkpoint_every", "keep_last")
    cfg = TrainConfig(**{k: inputs[k] for k in keys}, clip_grad_norm=inputs["clip_grad_norm"] or None,
                      masked_loss=bool(inputs.get("masked_loss", False)),
                      precision=PRECISION[inputs["precision"]], output_dir=str(state_dir),
                      **studio.config_kwargs(inputs))
    lora = (LoraSpec(inputs.get("rank", 16), inputs.get("alpha", 16.0), inputs.get("dropout", 0.0),
                     inputs.get("targets", "attn"), adapter=inputs.get("adapter", "lora")) if kind == "lora" else None)
    prompts = tuple(p.strip() for p in (inputs.get("preview_prompts") or "").splitlines() if p.strip())
    previews = PreviewSpec(prompts, inputs.get("preview_every", 0), inputs.get("preview_steps", 20),
                           inputs.get("preview_cfg", 5.0), inputs.get("preview_seed", 0))
    return cfg, lora, previews


def train(kind: str, model, cache_dir: str, output_name: str, resume_from: str = "", clip=None, vae=None,
          save_dtype: str = "bf16", overwrite: bool = False, **inputs) -> io.NodeOutput:
    node = "OboroTrainLoRA" if kind == "lora" else "OboroTrainFull"
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(dm, MMHDiT):
        raise ValueError(f"{node} trains oboro models: connect a MODEL from OboroModelLoader, got {type(dm).__name__}")
    config, fmt = dm.config, model.model.latent_format
    stem = output_name.strip().removesuffix(".safetensors")
    target = _inside(folder_paths.get_folder_paths("loras" if kind == "lora" else "diffusion_models")[0],
                     stem + ".safetensors")
    state_dir = _inside(Path(folder_paths.get_output_directory()) / STATE_ROOT, stem)
    cfg, lora, pv = run_config(kind, inputs, state_dir)
    job = Job(state_dir, resume_from, node)
    cache = open_node_cache(cache_dir, fmt, node)
    check_cache_fits(cache, config, node)

    def open_more(path):
        more = open_node_cache(path, fmt, node)
        check_cache_fits(more, config, node)
        return more

    data = training_data(cache, cache_dir, inputs, open_more, node)
    val = studio.validation_cache(inputs, lambda p: open_node_cache(p, fmt, node + " validation_cache_dir"), node)
    if val is not None:
        check_cache_fits(val, config, node + " validation_cache_dir")
    max_tokens = int(cache.settings.get("max_tokens", 256))
    previews = None
    if pv.every > 0 and (clip is None or not pv.prompts):
        log.warning("%s: previews need a clip (T5) and preview_prompts; none will be rendered", node)
    elif pv.every > 0:
        previews = Previews(clip, list(pv.prompts), cache[0]["latent"].shape, pv.steps, pv.cfg, pv.seed, max_tokens)
    empty = (cache.empty_text, cache.empty_mask)  # T5("") as the cache's own T5 encoded it
    if empty[0] is None and clip is not None:  # an older cache: encode it here
        empty = encode_plain(clip, "", max_tokens)
    device = mm.get_torch_device()
    base_dtype = linear_dtype(dm) if kind == "lora" else torch.float32  # the frozen base stays as stored
    log_plan(log, node, config, cfg, lora, cache.folder, device.type, base_dtype=base_dtype)
    weights, scales = _plain_weights(model, device, lora=kind == "lora")
    mm.unload_all_models()
    mm.soft_empty_cache()
    amp = PRECISIONS[cfg.precision]
    with torch.inference_mode(False), torch.enable_grad(), seeded_rng(cfg.seed, device):
        with torch.device("meta"):
            net = MMHDiT(config)
        weights = {k: weights[k] for k in net.state_dict() if k in weights}
        if kind == "lora":  # the frozen base stays in the MODEL's dtype (bf16 / fp8): no fp32 copy
            # peft's DoRA reads the base weight itself: a scaled-fp8 base is dequantised to bf16 for it
            narrow = torch.bfloat16 if scales and lora.adapter == "dora" else None
            net = frozen_base_model(config, weights, narrow, scales=scales, name=f"{node} input MODEL")
        else:
            check_state_dict(net, weights, f"{node} input MODEL")
            net.load_state_dict(weights, strict=True, assign=True)
        del weights
        trainer = build_trainer(net, data, cfg, lora, empty=empty, validation_cache=val)
        job.start(trainer)
        job.tracker = studio.tracker(inputs, state_dir, stem, cfg)

        def on_step(step):
            if previews is not None and step % pv.every == 0:
                with studio.export_weights(trainer):
                    previews.render(net, step, device, amp)

        try:
            drive(trainer, job, node, stem, on_step)
        except BaseException:
            job.close()
            raise
        if previews is not None and trainer.step > job.start_step and previews.row_steps[-1:] != [trainer.step]:
            with studio.export_weights(trainer):
                previews.render(net, trainer.step, device, amp)
        if trainer.schedule_free:
            trainer.optimizer.eval()  # export the averaged weights ScheduleFree evaluates with
        info = {"oboro_training": json.dumps({"kind": kind, "step": trainer.step, "cache_dir": str(cache.folder),
                                              "items": len(cache), "lr": cfg.lr, "batch_size": cfg.batch_size,
                                              "grad_accum": cfg.grad_accum, "optimizer": cfg.optimizer,
                                              "seed": cfg.seed})}

        def write(path):
            if kind == "lora":
                from ..oboro_model.training.adapters import save_adapter
                save_adapter(path, net, metadata=info)
            else:
                save_checkpoint(path, CastForSaving(net, SAVE_DTYPES[save_dtype]), metadata=info)
            return str(path)

        target = free_target(target, overwrite)
        with studio.export_weights(trainer):
            write(target)
        extra = {"data": data.describe()} if data is not cache else {}
        from ..oboro_model.training.validation import best_weights
        with best_weights(trainer) as best_step:
            if best_step is not None:
                best = target.with_name(f"{Path(stem).name}_best.safetensors")
                extra["best_path"] = write(free_target(best, overwrite))
        summary = job.summary(trainer, path=str(target), items=len(trainer.dataset),
                              base_dtype=str(linear_dtype(net)).removeprefix("torch."),
                              preview_steps=previews.row_steps if previews is not None else [], **extra)
        trainer = net = None  # (the scheduler's lambdas make a cycle: collect before freeing the cache)
    gc.collect()
    mm.soft_empty_cache()
    log.info("%s: saved %s after step %d", node, target, summary["step"])
    if kind == "lora":
        lora_sd = comfy.utils.load_torch_file(str(target), safe_load=True)
        out_model = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)[0]
    else:
        out_model = load_oboro_model(str(target))
    curve = loss_curve_image(job.history, f"{node}: {stem}")
    images = previews.images(fmt, vae) if previews is not None else None
    studio.log_previews(job, images, previews.row_steps if previews is not None else [])
    job.close()
    if previews is not None and images is None:
        log.warning("%s: connect a VAE to decode the previews of a %d-channel model", node, config.in_channels)
    text = json.dumps(summary, indent=1)
    return io.NodeOutput(out_model, str(target), curve, images if images is not None else black_image(),
                         ui={"text": (text,)})


def schema(kind: str) -> io.Schema:
    lora = kind == "lora"
    extra = [
        io.Int.Input("rank", default=16, min=1, max=1024, tooltip="LoRA rank."),
        io.Float.Input("alpha", default=16.0, min=0.01, max=4096.0, step=0.01,
                       tooltip="LoRA alpha; the update is scaled by alpha / rank."),
        io.Float.Input("dropout", default=0.0, min=0.0, max=0.99, step=0.01, tooltip="Dropout on the LoRA input."),
        io.Combo.Input("targets", options=list(LORA_TARGETS), default="attn",
                       tooltip="attn: attention qkv + out; mlp: SwiGLU w1/w2/w3; all: both."),
    ] if lora else [
        io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default="bf16",
                       tooltip="Dtype of the saved checkpoint (training itself runs on fp32 weights)."),
    ]
    return io.Schema(
        node_id="OboroTrainLoRA" if lora else "OboroTrainFull",
        display_name="oboro Train LoRA" if lora else "oboro Train (full fine-tune)",
        category="oboro/training",
        description=("Trains a LoRA on an oboro model" if lora else "Fine-tunes all weights of an oboro model")
        + " from a latent cache (OboroCacheLatents) with the I-CFM loss. Saves to models/"
        + ("loras" if lora else "diffusion_models") + "/<output_name>.safetensors; resumable training states go to "
        "output/oboro_training/<output_name>/ (also on interrupt). Outputs the trained MODEL, the file path, a "
        "loss curve and preview images.",
        inputs=[
            io.Model.Input("model", tooltip="From OboroModelLoader; patches already on it (e.g. LoRAs) are merged in."),
            io.String.Input("cache_dir", default="", tooltip="Connect OboroCacheLatents' cache_dir."),
            io.String.Input("output_name", default="oboro_lora" if lora else "oboro_finetune",
                            tooltip="File name stem of the result and name of its training-state folder."),
            io.Int.Input("steps", default=1000 if lora else 2000, min=1, max=10_000_000,
                         tooltip="Total optimiser updates (a resumed run continues up to this)."),
            io.Int.Input("batch_size", default=4, min=1, max=4096),
            io.Float.Input("lr", default=2e-4 if lora else 1e-4, min=1e-8, max=1.0, step=1e-7,
                           tooltip="Peak learning rate (AdamW betas 0.9/0.999, eps 1e-8, weight decay 0.01)."),
            io.Int.Input("warmup", default=100 if lora else 500, min=0, max=1_000_000, tooltip="Linear warm-up steps."),
            io.Combo.Input("schedule", options=list(SCHEDULES), default="cosine",
                           tooltip="LR schedule after warm-up; schedulefree needs 'constant'."),
            io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw",
                           tooltip="adamw; schedulefree (pip install schedulefree); adamw8bit (bitsandbytes, CUDA); "
                                   "prodigy (prodigyopt; set lr = 1, it finds the step size)."),
            io.Int.Input("grad_accum", default=1, min=1, max=4096, tooltip="Micro-batches per update."),
            io.Float.Input("clip_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.01, tooltip="0: no clipping."),
            io.Combo.Input("precision", options=list(PRECISION), default="bf16",
                           tooltip="Autocast dtype (weights stay fp32); fp16 adds a grad scaler."),
            io.Boolean.Input("gradient_checkpointing", default=not lora,
                             tooltip="Recompute block activations in the backward pass: less memory, ~30% slower."),
            io.Float.Input("caption_dropout", default=0.1, min=0.0, max=1.0, step=0.01,
                           tooltip="Fraction of samples trained on the empty prompt (what CFG's negative uses): "
                                   "T5('') as stored in the cache (older caches: T5('') of the connected clip, "
                                   "else no text at all)."),
            io.Combo.Input("t_sampling", options=list(T_SAMPLING), default="uniform",
                           tooltip="Distribution of training times t: uniform; logit_normal (t_mean, t_std; "
                                   "favours mid-path); shifted (t_shift > 1: more near noise)."),
            io.Boolean.Input("spike_guard", default=True,
                             tooltip="Skip updates whose loss spikes (or is NaN) and halve the LR."),
            io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                         tooltip="Seeds data order and noise; a resumed run keeps its saved random state."),
            io.Int.Input("checkpoint_every", default=250 if lora else 500, min=0, max=10_000_000,
                         tooltip="Write a resumable training state every N steps (0: only at the end)."),
            io.Int.Input("keep_last", default=3 if lora else 2, min=0, max=10_000,
                         tooltip="Training states kept (0: all). Full fine-tune states hold weights + optimiser."),
            *extra,
            io.String.Input("resume_from", default="", optional=True,
                            tooltip="Empty: fresh start. 'latest': newest state of output_name (fresh if none). Or a "
                                    "state file/folder, absolute or relative to output/oboro_training."),
            io.Clip.Input("clip", optional=True, tooltip="T5 from OboroT5Loader: previews and the empty prompt."),
            io.Vae.Input("vae", optional=True, tooltip="Decodes previews (not needed for pixel-space models)."),
            io.String.Input("preview_prompts", default="", multiline=True, optional=True,
                            tooltip="One prompt per line; rendered every preview_every steps."),
            io.Int.Input("preview_every", default=0, min=0, max=10_000_000, optional=True,
                         tooltip="Render previews every N steps and at the end (0: off)."),
            io.Int.Input("preview_steps", default=20, min=1, max=1000, optional=True, tooltip="Euler ODE steps."),
            io.Float.Input("preview_cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01, optional=True),
            io.Int.Input("preview_seed", default=0, min=0, max=2**31 - 1, control_after_generate=False, optional=True,
                         tooltip="Prompt i uses seed preview_seed + i (OboroSampler's noise for that seed)."),
            # last: saved workflows map widget values by position
            io.Boolean.Input("overwrite", default=False, optional=True,
                             tooltip="Replace an existing file of that name. Off: an existing file is kept and the "
                                     "result gets the next free name <output_name>_00001_ (see the path output)."),
            *after_overwrite(kind),  # adapters, datasets, masked loss (training_options.py)
            *studio.inputs(),  # studio options (training_studio.py): after those, in their order
        ],
        outputs=[io.Model.Output(), io.String.Output("path", display_name="path"),
                 io.Image.Output("loss_curve", display_name="loss_curve"),
                 io.Image.Output("previews", display_name="previews",
                                 tooltip="One row per preview step, the prompts side by side.")],
        is_output_node=True,
    )


class OboroTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema("lora")

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        return train("lora", **kwargs)


class OboroTrainFull(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema("full")

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        return train("full", **kwargs)
