"""How a training node runs the engine inside ComfyUI: the MODEL's weights as a plain trainable
network, the node's values as a RunSpec (one table, training_inputs.py), and run()'s hooks onto
ComfyUI: the progress bar with a live preview image, loss and ETA as progress text, interrupt ->
"saved at step N of M — queue again to resume" shown on the node before the prompt ends."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..oboro_model import MMHDiT
from ..oboro_model.checkpoint import check_state_dict
from ..oboro_model.data import ScaleShift
from ..oboro_model.training import TrainConfig
from ..oboro_model.training.datasets import DataSource, parse_source_lines
from ..oboro_model.training.export import ExportSpec
from ..oboro_model.training.loss import PRECISIONS
from ..oboro_model.training.frozen_base import frozen_base_model, linear_dtype
from ..oboro_model.training.memory import log_plan
from ..oboro_model.training.report import loss_curve
from ..oboro_model.training.run import LoraSpec, RunHooks, RunInterrupted, RunSpec, open_cache, run
from ..oboro_model.training.seeding import seeded_rng
from ..oboro_model.training.swap import exported_weights
from ..oboro_model.training.tracking import Tracker
from . import training_inputs as table
from .paths import confine, confine_read
from .training_preview import Previews, black_image, encode_plain

log = logging.getLogger("oboro")
STATE_ROOT = "oboro_training"


def _inside(root, name: str) -> Path:
    return confine(root, name, "output_name", absolute_ok=False)


def send_text(text: str) -> None:
    """Progress text under the node in the browser (absent headless: no PromptServer)."""
    from comfy_execution.utils import get_executing_context
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    ctx = get_executing_context()
    if server is not None and ctx is not None:
        server.send_progress_text(text, ctx.node_id)


def interrupted_text(e: RunInterrupted) -> str:
    return f"saved at step {e.step} of {e.steps} — queue again to resume (resume_from latest)"


def open_node_cache(cache_dir: str, latent_format, node: str):
    """The cache through the core reader with the latent transform its manifest records, checked
    against the MODEL's latent format (an older cache without one: the MODEL's process_in)."""
    if not (cache_dir or "").strip():
        raise ValueError(f"{node}: cache_dir is empty; connect oboro Cache Latents' cache_dir output")
    cache = open_cache(cache_dir, transform=None, what=node)
    spec = cache.latent_transform
    if spec is None:
        log.warning("%s: %s records no latent transform (an older cache); using the model's %s", node, cache.folder,
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


def plain_weights(model, device, lora: bool = False) -> tuple[dict, dict]:
    """The MODEL's diffusion weights with its patches merged (as ComfyUI's own checkpoint saving
    does), made outside inference mode, and the scaled-fp8 factors {weight key: scale}. Full
    training gets fp32 copies; a LoRA's frozen base keeps the MODEL's storage dtype, aliased (not
    copied) on an unpatched MODEL already on `device`."""
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


def read_path(value: str, what: str, root: str = "oboro_cache", expect: str = "dir") -> str:
    """A path the graph names for reading, confined (paths.confine_read); plain names are looked up
    in output/<root> (the caches' and training states' own folder)."""
    return str(confine_read(value, what, base=Path(folder_paths.get_output_directory()) / root, expect=expect))


def run_spec(kind: str, node: str, v: dict) -> RunSpec:
    """The node's values (training_inputs.values) as the engine's RunSpec."""
    stem = v["output_name"].strip().removesuffix(".safetensors")
    folder = folder_paths.get_folder_paths("loras" if kind == "lora" else "diffusion_models")[0]
    target = _inside(folder, stem + ".safetensors")
    state_dir = _inside(Path(folder_paths.get_output_directory()) / STATE_ROOT, stem)
    cfg_fields = {f.name for f in table.FIELDS if f.target == "config"}
    cfg = {k: v[k] for k in cfg_fields}
    cfg.update(precision=table.PRECISION[v["precision"]], clip_grad_norm=v["clip_grad_norm"] or None,
               ema_decay=v["ema_decay"] or None, masked_loss=bool(v["masked_loss"]))
    lora = LoraSpec(v["rank"], v["alpha"], v["dropout"], v["targets"], adapter=v["adapter"]) if kind == "lora" else None
    sources = [DataSource(read_path(v["cache_dir"], "cache_dir"))] + [
        DataSource(read_path(s.path, "extra_caches"), s.weight, s.repeats)
        for s in parse_source_lines(v["extra_caches"] or "", node)]
    if (v["reg_cache"] or "").strip():
        sources.append(DataSource(read_path(v["reg_cache"].strip(), "reg_cache"), loss_weight=float(v["reg_weight"]),
                                  reg=True))
    val = (v["validation_cache_dir"] or "").strip()
    resume = (v["resume_from"] or "").strip()
    if resume not in ("", "latest"):
        resume = read_path(resume, "resume_from", STATE_ROOT, expect=None)
    export = ExportSpec(str(target.parent), target.stem, kind, bool(v["overwrite"]),
                        v.get("save_dtype") if kind == "full" else None)
    return RunSpec(TrainConfig(**cfg), str(state_dir), tuple(sources), lora,
                   read_path(val, "validation_cache_dir") if val else None, resume, export, samples=0, what=node)


class NodeHooks(RunHooks):
    """run()'s hooks on ComfyUI: progress bar (+ live preview), text, interrupt."""

    def __init__(self, node: str, steps: int, preview_every: int = 0, previews=None, render=None, **kw):
        super().__init__(should_stop=self.interrupted, say=self.tell, **kw)
        self.node, self.steps, self.every, self.previews, self.render = node, steps, preview_every, previews, render
        self.pbar, self.said, self.t0, self.first = comfy.utils.ProgressBar(steps), 0.0, time.time(), None
        self.on_step, self.cancelled = self.step, False

    def tell(self, text: str) -> None:
        log.info("%s: %s", self.node, text)
        send_text(text)

    def interrupted(self) -> bool:
        return self.cancelled or mm.processing_interrupted()

    def step(self, trainer, step, loss, lr, rate) -> None:
        if self.first is None:
            self.first = (step - 1, time.time())
        image = None
        if self.render is not None and self.every and step % self.every == 0:
            image = self.render(trainer, step)
        done, t = step - self.first[0], time.time() - self.first[1]
        eta = (self.steps - step) * t / max(done, 1)
        text = f"step {step}/{self.steps}  loss {loss:.4f}  lr {lr:.3g}  {rate:.2f} it/s  ETA {eta:.0f} s"
        if time.time() - self.said > 1.0 or step == self.steps or image is not None:
            self.said = time.time()
            log.info("%s: %s", self.node, text)
            send_text(text)
        try:  # ComfyUI's progress hook raises on Cancel: run() then saves the state and says so
            self.pbar.update_absolute(step, self.steps, ("JPEG", image, 512) if image is not None else None)
        except mm.InterruptProcessingException:
            self.cancelled = True


def preview_setup(v: dict, clip, vae, latent_format, cache_first, node: str, device, amp):
    """(Previews or None, render(trainer, step) -> PIL image) for the node's preview inputs."""
    prompts = [p.strip() for p in (v.get("preview_prompts") or "").splitlines() if p.strip()]
    if v.get("preview_every", 0) <= 0:
        return None, None
    if clip is None or not prompts:
        log.warning("%s: previews need a clip (T5) and preview_prompts; none will be rendered", node)
        return None, None
    pv = Previews(clip, prompts, cache_first["latent"].shape, v["preview_steps"], v["preview_cfg"], v["preview_seed"],
                  int(cache_first.get("max_tokens", 256)))

    def render(trainer, step):
        with exported_weights(trainer):
            pv.render(trainer.model, step, device, amp)
        with torch.inference_mode():  # ComfyUI's VAE holds inference tensors
            img = pv.decode(pv.rows[-1], latent_format, vae)
        if img is None:
            return None
        row = torch.cat(list(img), dim=1).clamp(0, 1)
        tracker = getattr(trainer, "tracker", None)
        if tracker is not None:
            tracker.log_images("previews", row[None].clone(), step)
        return Image.fromarray((row.numpy() * 255).round().astype(np.uint8))
    return pv, render


def run_node(kind: str, node: str, model, inputs: dict):
    """Train as the node's inputs say; -> (RunResult, {"loss_curve": IMAGE, "previews": IMAGE})."""
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(dm, MMHDiT):
        raise ValueError(f"{node} trains oboro models: connect a MODEL from oboro Load Model, got {type(dm).__name__}")
    v = table.values(kind, inputs, legacy=inputs.pop("_legacy", False))
    clip, vae = inputs.get("clip"), inputs.get("vae")
    if not (v["cache_dir"] or "").strip():
        raise ValueError(f"{node}: cache_dir is empty; connect oboro Cache Latents' cache_dir output")
    spec = run_spec(kind, node, v)
    config, fmt = dm.config, model.model.latent_format
    first = open_node_cache(spec.sources[0].path, fmt, node)
    device = mm.get_torch_device()
    amp = PRECISIONS[spec.config.precision]
    pv, render = preview_setup(v, clip, vae, fmt, {**first[0], "max_tokens": first.settings.get("max_tokens", 256)},
                               node, device, amp)
    empty = None
    if first.empty_text is None and clip is not None:  # an older cache: T5("") encoded here
        empty = encode_plain(clip, "", int(first.settings.get("max_tokens", 256)))
    base_dtype = linear_dtype(dm) if kind == "lora" else torch.float32
    log_plan(log, node, config, spec.config, spec.adapter, first.folder, device.type, base_dtype=base_dtype)
    weights, scales = plain_weights(model, device, lora=kind == "lora")
    mm.unload_all_models()
    mm.soft_empty_cache()
    hooks = NodeHooks(node, spec.config.steps, v["preview_every"], pv, render, empty=empty,
                      open_cache=lambda p, what: open_node_cache(p, fmt, what),
                      tracker=lambda folder, cfg: Tracker(v["log_with"], Path(folder) / "logs", Path(folder).name,
                                                          __import__("dataclasses").asdict(cfg)))
    with torch.inference_mode(False), torch.enable_grad(), seeded_rng(spec.config.seed, device):
        with torch.device("meta"):
            net = MMHDiT(config)
        weights = {k: weights[k] for k in net.state_dict() if k in weights}
        if kind == "lora":  # the frozen base stays in the MODEL's dtype (bf16 / fp8): no fp32 copy
            narrow = torch.bfloat16 if scales and spec.adapter.adapter == "dora" else None
            net = frozen_base_model(config, weights, narrow, scales=scales, name=f"{node} input MODEL")
        else:
            check_state_dict(net, weights, f"{node} input MODEL")
            net.load_state_dict(weights, strict=True, assign=True)
        del weights
        try:
            result = run(spec, net, hooks)
        except RunInterrupted as e:
            send_text(interrupted_text(e))
            log.warning("%s: %s", node, e)
            raise mm.InterruptProcessingException() from None
        result.summary["base_dtype"] = str(linear_dtype(net)).removeprefix("torch.")
        net = None
    if result.reused:
        send_text(result.note)
    images = None
    if pv is not None and pv.rows:
        images = pv.images(fmt, vae)
    curve = torch.from_numpy(loss_curve(result.history or {"step": [], "loss": [], "spikes": [], "resumed_at": []},
                                        f"{node}: {Path(spec.state_dir).name}")).float().div_(255.0)[None]
    result.summary["preview_steps"] = pv.row_steps if pv is not None else []
    return result, {"loss_curve": curve, "previews": images if images is not None else black_image()}
