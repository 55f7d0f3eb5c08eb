"""Mask + text collaborative control as ComfyUI nodes (the model is oboro_model/mask_control.py).

Adapter files: models/oboro_mask_adapters/ (folder kind "oboro_mask_adapters", registered at import;
extra_model_paths.yaml may add paths under that name). Not models/loras: an adapter is no LoRA of
the base weights, and LoRA loaders listing it would fail to apply it.

OboroApplyMaskControl clones the ModelPatcher and installs
  * an object patch on "diffusion_model.forward": MaskControlDiT logic run over ComfyUI's own
    diffusion model (its comfy.ops layers, LoRA patches, casts), with nodes/comfy_model.py's sign
    convention t = 1 - sigma, v = -u; the adapter weights follow the input's device;
  * an OUTER_SAMPLE wrapper: when a sampling run (KSampler, OboroSampler, SamplerCustomAdvanced)
    ends, the static K/V cache is dropped and the adapter weights go back to the offload device.
The cache lives on the MaskController the patch closes over. An entry is keyed by the cond uuids
ComfyUI puts in transformer_options (one per cond/uncond chunk, batched or not), batch, latent
size, dtype and device; a hit also needs the context and attention mask equal to the entry's.
mask_on_negative=False: the chunks ComfyUI marks uncond (transformer_options["cond_or_uncond"])
run with the mask dropped (mask_keep False), so CFG guides towards the mask as well.

OboroTrainMaskAdapter masks: mask_dir/<image path relative to the dataset folder, suffix .png>,
the size of its image. Mode P / L / I: pixel value = label (0 background, 1.. regions; what
oboro_model/demo_data.py writes). RGB(A): colour i of `palette` = label i. The latent cache's
crop/resize of the image (policy, crop, seed, epoch 0) is replayed on the mask (nearest). Training
runs on the engine (oboro_model/training: BucketTrainer over MaskedLatents), so it has the LoRA
nodes' spike guard, schedules, resumable states (output/oboro_training/<output_name>_mask) and
interrupt; text and mask dropout are independent per sample (p = condition_dropout each). A dropped
text is no tokens (the adapter records dropped_text "no_tokens", so OboroApplyMaskControl reads an
empty prompt the same way); with `clip` connected it is T5("") ("empty_prompt").
"""
from __future__ import annotations

import gc
import json
import logging
import os
import random
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import comfy.ldm.common_dit
import comfy.model_management as mm
import comfy.patcher_extension
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..oboro_model import MMHDiT
from ..oboro_model.data import LatentCache, crop_box
from ..oboro_model.mask_control import (SHAPE_FIELDS, MaskAdapterConfig, MaskControlDiT, MaskedLatents,
                                        palette_to_labels, read_mask_adapter, region_mask_to_labels,
                                        save_mask_adapter)
from ..oboro_model.training import TrainConfig, list_checkpoints
from ..oboro_model.training.optim import SCHEDULES
from .training import PRECISION, STATE_ROOT, _inside, _plain_weights, drive
from .training_preview import BucketTrainer, encode_plain, load_history, loss_curve_image, resume_file

log = logging.getLogger("oboro")
FOLDER, PATCH, KEY, MAX_ENTRIES = "oboro_mask_adapters", "diffusion_model.forward", "oboro_mask_control", 8
DEFAULT_PALETTE = "#000000,#ffffff"
IMAGE_RANK = 16  # default image-stream LoRA rank: see the mask-eval figures in README
MaskAdapterIO = io.Custom("OBORO_MASK_ADAPTER")

folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
folder_paths.folder_names_and_paths[FOLDER][1].add(".safetensors")


def parse_palette(text: str) -> list[tuple[int, int, int]]:
    """'#000000,#ff0000,...' -> [(r, g, b), ...]; label i is the i-th colour."""
    toks = [t.strip() for t in (text or "").replace(";", ",").split(",") if t.strip()]
    if len(toks) < 2 or not all(re.fullmatch(r"#?[0-9a-fA-F]{6}", t) for t in toks):
        raise ValueError(f"palette must list >= 2 colours like '#000000,#ff0000' (label i = colour i), got {text!r}")
    return [tuple(int(t.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4)) for t in toks]


@dataclass
class MaskAdapter:
    """An adapter file's weights and config; checked against a model when applied."""
    name: str
    cfg: MaskAdapterConfig
    base_config: dict
    sd: dict

    @classmethod
    def read(cls, path) -> "MaskAdapter":
        return cls(Path(path).name, *read_mask_adapter(path))

    def build(self, dm: MMHDiT, strength: float) -> MaskControlDiT:
        have = json.loads(dm.config.to_json())
        diff = [f"{k}: adapter {self.base_config[k]} vs model {have[k]}" for k in SHAPE_FIELDS
                if k in self.base_config and self.base_config[k] != have[k]]
        if diff:
            raise ValueError(f"mask adapter {self.name} was trained for a different base model ({'; '.join(diff)})")
        mcd = MaskControlDiT(dm, self.cfg, strength)
        mcd.load_adapter_state_dict(self.sd, f"mask adapter {self.name}")
        return mcd


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


class MaskController:
    """The patched forward and its per-run static K/V cache (see the module docstring)."""

    def __init__(self, mcd: MaskControlDiT, labels: torch.Tensor, offload_device, mask_on_negative: bool = True):
        self.mcd, self.labels, self.offload_device = mcd, labels, offload_device
        self.mask_on_negative = mask_on_negative
        self.cache, self.hits, self.misses = OrderedDict(), 0, 0

    def __deepcopy__(self, memo):  # model_options get deep-copied; never copy the model with them
        return self

    def _to(self, device) -> None:
        if self.mcd.mask_embedder.weight.device != torch.device(device):
            self.mcd.adapter_to(device)

    def end_run(self) -> None:
        self.cache.clear()
        self._to(self.offload_device)

    def labels_for(self, B: int) -> torch.Tensor:
        n = self.labels.shape[0]
        if B % n == 0:  # 1 mask, or one per latent: ComfyUI batches cond chunks one after another
            return self.labels if n in (1, B) else self.labels.repeat(B // n, 1, 1)
        raise ValueError(f"mask batch {n} does not fit the model batch {B}; use 1 mask or one per latent")

    def keep(self, B: int, transformer_options) -> torch.Tensor | None:
        """mask_keep [B] for this call: None (all keep it), or False on the negative prompt's chunk
        when mask_on_negative is off (ComfyUI stacks equal chunks in cond_or_uncond's order)."""
        cou = list(transformer_options.get("cond_or_uncond") or ())
        if self.mask_on_negative or 1 not in cou:
            return None
        return torch.tensor([c != 1 for c in cou]).repeat_interleave(B // len(cou))

    def static(self, x, context, attention_mask, transformer_options):
        B, _, H, W = x.shape
        keep = self.keep(B, transformer_options)
        key = (tuple(map(str, transformer_options.get("uuids") or ())), B, H, W, x.dtype, x.device,
               None if keep is None else tuple(keep.tolist()))
        hit = self.cache.get(key)
        if hit is not None and _same(hit[0], context) and _same(hit[1], attention_mask):
            self.hits += 1
            self.cache.move_to_end(key)
            return hit[2]
        self.misses += 1
        sc = self.mcd.precompute_static(context, attention_mask, self.labels_for(B), B, (H, W), dtype=x.dtype,
                                        mask_keep=None if keep is None else keep.to(x.device))
        self.cache[key] = (context, attention_mask, sc)
        while len(self.cache) > MAX_ENTRIES:
            self.cache.popitem(last=False)
        return sc

    def __call__(self, x, timesteps, context, attention_mask=None, transformer_options={}, **kwargs):
        self._to(x.device)
        h, w, p = *x.shape[-2:], self.mcd.base.config.patch_size
        x = comfy.ldm.common_dit.pad_to_patch_size(x, (p, p))
        sc = self.static(x, context, attention_mask, transformer_options) if self.mcd.decoupled else None
        keep = None if sc is not None else self.keep(x.shape[0], transformer_options)
        u = self.mcd(x, 1.0 - timesteps, context, attention_mask, self.labels_for(x.shape[0]), static_cache=sc,
                     mask_keep=None if keep is None else keep.to(x.device))
        return -u[..., :h, :w]


def mask_controlled(model, mcd: MaskControlDiT, labels: torch.Tensor, mask_on_negative: bool = True):
    """A clone of the ModelPatcher `model` that runs `mcd` with these labels (see the docstring)."""
    ctl = MaskController(mcd, labels, model.offload_device, mask_on_negative)

    def forward(*args, **kwargs):
        return ctl(*args, **kwargs)

    def outer_sample(executor, *args, **kwargs):
        ctl.cache.clear()
        try:
            return executor(*args, **kwargs)
        finally:
            ctl.end_run()

    forward.controller = ctl
    m = model.clone()
    m.add_object_patch(PATCH, forward)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, outer_sample)
    return m


def _oboro_dm(model, node: str) -> MMHDiT:
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(dm, MMHDiT):
        raise ValueError(f"{node} needs an oboro MODEL (OboroModelLoader), got {type(dm).__name__}")
    return dm


class OboroMaskAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroMaskAdapterLoader", display_name="Load oboro Mask Adapter", category="oboro/mask",
            description="Loads a mask adapter (OboroTrainMaskAdapter) from models/oboro_mask_adapters; checked "
                        "against the model when applied.",
            inputs=[io.Combo.Input("adapter_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="File in models/oboro_mask_adapters.")],
            outputs=[MaskAdapterIO.Output("adapter", display_name="adapter")])

    @classmethod
    def execute(cls, adapter_name) -> io.NodeOutput:
        return io.NodeOutput(MaskAdapter.read(folder_paths.get_full_path_or_raise(FOLDER, adapter_name)))


class OboroApplyMaskControl(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroApplyMaskControl", display_name="oboro Apply Mask Control", category="oboro/mask",
            description="Adds a layout mask to an oboro MODEL next to the prompt (any sampler). Connect exactly one "
                        "of mask_image (colour-coded label map + palette) or mask (one region). Sizes other than the "
                        "image's or the latent's are nearest-resized with a warning.",
            inputs=[
                io.Model.Input("model"),
                MaskAdapterIO.Input("adapter"),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Attention weight on the mask: 1 as trained, 0 off, > 1 stronger."),
                io.Image.Input("mask_image", optional=True, tooltip="Label map; every pixel one palette colour."),
                io.String.Input("palette", default=DEFAULT_PALETTE, optional=True,
                                tooltip="Colours of labels 0, 1, 2, ... of mask_image: '#000000,#ff0000,...'."),
                io.Mask.Input("mask", optional=True, tooltip="One region (> 0.5) on label 0 background."),
                io.Int.Input("region_label", default=1, min=1, max=255, optional=True,
                             tooltip="The label the region of `mask` gets."),
                io.Boolean.Input("mask_on_negative", default=True, optional=True,
                                 tooltip="Off: the negative prompt runs without the mask, so CFG guides towards "
                                         "the mask as well (with an empty positive prompt: guided mask-only)."),
            ],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, adapter, strength, mask_image=None, palette=DEFAULT_PALETTE, mask=None,
                region_label=1, mask_on_negative=True) -> io.NodeOutput:
        dm, K = _oboro_dm(model, "OboroApplyMaskControl"), adapter.cfg.num_labels
        if (mask_image is None) == (mask is None):
            raise ValueError("OboroApplyMaskControl: connect exactly one of mask_image (a colour-coded label map, "
                             f"with palette) or mask (one region); got {'both' if mask is not None else 'neither'}")
        if PATCH in model.object_patches:
            raise ValueError("OboroApplyMaskControl: this MODEL already has a mask control (or another patch of "
                             "diffusion_model.forward); apply it once")
        if mask_image is not None:
            pal = parse_palette(palette)
            if len(pal) > K:
                raise ValueError(f"palette lists {len(pal)} colours but adapter {adapter.name} knows {K} labels")
            labels = palette_to_labels(mask_image[..., :3], pal)
        else:
            if region_label >= K:
                raise ValueError(f"region_label {region_label} >= the adapter's {K} labels (0..{K - 1})")
            labels = region_mask_to_labels(mask) * int(region_label)
        labels = labels[None] if labels.ndim == 2 else labels
        return io.NodeOutput(mask_controlled(model, adapter.build(dm, strength), labels.cpu(), mask_on_negative))


def load_label_mask(path: Path, item: dict, settings: dict, palette) -> torch.Tensor:
    """A training mask, cropped and resized (nearest) like the cache item's image -> [h, w] long."""
    img = Image.open(path)
    if img.mode in ("P", "L", "I", "I;16"):
        arr = np.asarray(img).astype(np.int64)
    elif palette is None:
        raise ValueError(f"{path}: an {img.mode} mask needs the palette input (or save label PNGs, mode P or L)")
    else:
        arr = palette_to_labels(np.asarray(img.convert("RGB")), palette).numpy()
    lab = Image.fromarray(arr.astype(np.int32), "I")
    bucket = tuple(item["bucket"])
    rng = random.Random(f"{settings.get('seed', 0)}/0/{item['file']}")  # the dataset's crop draw, epoch 0
    box = crop_box(lab.size, bucket, settings.get("crop", "center"), rng)
    lab = lab.resize(bucket, Image.Resampling.NEAREST, box=box)
    return torch.from_numpy(np.asarray(lab).astype(np.int64))


class OboroTrainMaskAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroTrainMaskAdapter", display_name="oboro Train Mask Adapter", category="oboro/mask",
            description="Trains a mask adapter (mask embedder + LoRAs of the mask stream and, with image_rank > 0, "
                        "the image stream) on a frozen oboro model from a latent cache plus per-image label masks, "
                        "with condition dropout per modality, on the training engine (resumable). "
                        "Saves models/oboro_mask_adapters/<output_name>.safetensors.",
            inputs=[
                io.Model.Input("model", tooltip="From OboroModelLoader; its patches (e.g. LoRAs) are merged in."),
                io.String.Input("cache_dir", default="", tooltip="Connect OboroCacheLatents' cache_dir."),
                io.String.Input("mask_dir", default="", tooltip="Label masks: <mask_dir>/<image path>.png (see docs)."),
                io.String.Input("output_name", default="oboro_mask_adapter"),
                io.Int.Input("steps", default=2000, min=1, max=10_000_000),
                io.Int.Input("batch_size", default=4, min=1, max=4096),
                io.Float.Input("lr", default=1e-4, min=1e-8, max=1.0, step=1e-6, tooltip="AdamW, clip 1.0."),
                io.Int.Input("rank", default=8, min=1, max=256, tooltip="LoRA rank of the mask stream."),
                io.Int.Input("image_rank", default=IMAGE_RANK, min=0, max=256,
                             tooltip="LoRA rank on the image stream too (0: image stream frozen). A base never "
                                     "trained on layouts follows masks far better with it; see README."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False),
                io.Int.Input("num_labels", default=0, min=0, max=256,
                             tooltip="0: automatic, max(palette length, largest label found + 1)."),
                io.Float.Input("condition_dropout", default=0.1, min=0.0, max=0.9, step=0.01,
                               tooltip="Per sample, drop the text and (independently) the mask with this p."),
                io.Combo.Input("precision", options=["fp32", "bf16"], default="bf16", tooltip="Autocast dtype."),
                io.String.Input("palette", default="", optional=True, tooltip="Only for RGB masks: '#000000,...'."),
                io.Int.Input("warmup", default=0, min=0, max=1_000_000, optional=True, tooltip="Linear LR warm-up steps."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="constant", optional=True),
                io.Int.Input("checkpoint_every", default=0, min=0, max=10_000_000, optional=True,
                             tooltip="Save a resumable training state every N steps (0: at the end and on interrupt)."),
                io.String.Input("resume_from", default="", optional=True,
                                tooltip="'latest' continues this output_name's last state (after an interrupt too)."),
                io.Clip.Input("clip", optional=True, tooltip="Leave unconnected (recommended): a dropped text is no "
                              "tokens, and an empty prompt is read so when sampling. Connected (T5): a dropped "
                              "text is T5(\"\") as encoded; on the demo mask-only followed masks worse so."),
            ],
            outputs=[io.String.Output("path", display_name="path"),
                     io.Image.Output("loss_curve", display_name="loss_curve"),
                     MaskAdapterIO.Output("adapter", display_name="adapter")],
            is_output_node=True)

    @classmethod
    def execute(cls, model, cache_dir, mask_dir, output_name, steps, batch_size, lr, rank, image_rank, seed, num_labels,
                condition_dropout: float, precision, palette="", warmup=0, schedule="constant", checkpoint_every=0,
                resume_from="", clip=None) -> io.NodeOutput:
        node, t0 = "OboroTrainMaskAdapter", time.time()
        dm = _oboro_dm(model, node)
        stem = output_name.strip().removesuffix(".safetensors")
        target = _inside(folder_paths.get_folder_paths(FOLDER)[0], stem + ".safetensors")
        state_dir = _inside(Path(folder_paths.get_output_directory()) / STATE_ROOT, stem + "_mask")
        resume = resume_file(resume_from, state_dir)
        if resume is None and list_checkpoints(state_dir):
            raise ValueError(f"{node}: {state_dir} already holds training states of an earlier run; set resume_from "
                             "to 'latest' to continue it, or pick another output_name (or delete that folder)")
        cache, root = LatentCache(cache_dir, transform=model.model.latent_format.process_in), Path(mask_dir or "")
        pal = parse_palette(palette) if (palette or "").strip() else None
        if len(cache) == 0 or not root.is_dir():
            raise ValueError(f"{node}: need a non-empty latent cache ({len(cache)} items in {cache_dir}) and a mask "
                             f"folder (mask_dir {mask_dir!r})")
        paths = [next((c for c in (root / it["file"], (root / it["file"]).with_suffix(".png")) if c.is_file()), None)
                 for it in cache.items]
        if missing := [it["file"] for it, p in zip(cache.items, paths) if p is None]:
            raise ValueError(f"{node}: {len(missing)} of {len(cache)} images have no mask in {root}: {missing[:5]}")
        with torch.inference_mode(False):
            masks = [load_label_mask(p, it, cache.settings, pal) for p, it in zip(paths, cache.items)]
        top = max(int(m.max()) for m in masks)
        K = num_labels or max(len(pal) if pal else 0, top + 1, 2)
        if top >= K:
            raise ValueError(f"{node}: the masks hold label {top} but num_labels is {K}")
        cfg = MaskAdapterConfig(num_labels=K, rank=rank, image_rank=image_rank, text_dropout=condition_dropout,
                                mask_dropout=condition_dropout,
                                dropped_text="no_tokens" if clip is None else "empty_prompt",
                                vae_scale=cache.items[0]["bucket"][0] // cache.items[0]["latent_shape"][-1])
        tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0, warmup=warmup,
                           schedule=schedule, precision=PRECISION[precision], caption_dropout=condition_dropout,
                           mask_dropout=condition_dropout, seed=seed, checkpoint_every=checkpoint_every,
                           output_dir=str(state_dir))
        empty = encode_plain(clip, "", int(cache.settings.get("max_tokens", 256))) if clip is not None else (None, None)
        device = mm.get_torch_device()
        weights = _plain_weights(model, device)
        mm.unload_all_models()
        with torch.inference_mode(False), torch.enable_grad():
            with torch.device("meta"):
                net = MMHDiT(dm.config)
            net.load_state_dict({k: weights.pop(k) for k in net.state_dict()}, strict=True, assign=True)
            with torch.random.fork_rng(devices=[]):  # the adapter's init follows `seed` too
                torch.manual_seed(seed)
                mcd = MaskControlDiT(net, cfg)  # the base is frozen: only the adapter trains
            trainer = BucketTrainer(mcd, MaskedLatents(cache, masks), tcfg, empty_text=empty[0], empty_mask=empty[1])
            if resume is not None:
                trainer.resume(resume)
            history = load_history(resume, trainer.step)
            drive(trainer, node, stem, steps, state_dir, history, checkpoint_every)
            save_mask_adapter(target, mcd)
            step = trainer.step
            mcd = net = trainer = None
        gc.collect()
        mm.soft_empty_cache()
        summary = json.dumps({"path": str(target), "steps": step, "items": len(cache), "num_labels": K,
                              "final_loss": history["loss"][-1] if history["loss"] else None,
                              "state_dir": str(state_dir), "seconds": round(time.time() - t0, 1)}, indent=1)
        log.info("%s: saved %s", node, target)
        return io.NodeOutput(str(target), loss_curve_image(history, f"{node}: {stem}"), MaskAdapter.read(target),
                             ui={"text": (summary,)})


NODES = [OboroMaskAdapterLoader, OboroApplyMaskControl, OboroTrainMaskAdapter]
