"""Mask + text collaborative control as ComfyUI nodes (the model is oboro_model/mask_control.py).

Adapter files: models/oboro_mask_adapters/ (folder kind "oboro_mask_adapters", registered at import;
extra_model_paths.yaml may add paths under that name). Not models/loras: an adapter is no LoRA of
the base weights, and LoRA loaders listing it would fail to apply it.

OboroApplyMaskControl clones the ModelPatcher and adds, the way core patches are added,
  * a model patch (VELOCITY_PATCH, nodes/comfy_model.py): the diffusion model's forward, inside the
    DIFFUSION_MODEL wrapper executor (so EasyCache and other wrappers see it), hands it oboro's t
    and gets u (the sign mapping stays in comfy_model.py); it runs MaskControlDiT over ComfyUI's
    own diffusion model (its comfy.ops layers, LoRA patches, casts, block patches on the image
    stream); the adapter weights follow the input's device;
  * an OUTER_SAMPLE wrapper: when a sampling run (KSampler, OboroSampler, SamplerCustomAdvanced)
    ends, the static K/V cache is dropped and the adapter weights go back to the offload device.
The cache lives on the MaskController the patch closes over. An entry is keyed by the cond uuids
ComfyUI puts in transformer_options (one per cond/uncond chunk, batched or not), batch, latent
size, dtype and device; a hit also needs the context and attention mask equal to the entry's.
mask_on_negative=False: the chunks ComfyUI marks uncond (transformer_options["cond_or_uncond"])
run with the mask dropped (mask_keep False), so CFG guides towards the mask as well.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

import comfy.ldm.common_dit
import comfy.patcher_extension
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..oboro_model import MMHDiT
from ..oboro_model.mask_control import (SHAPE_FIELDS, MaskAdapterConfig, MaskControlDiT, palette_to_labels,
                                        read_mask_adapter, region_mask_to_labels)
from .comfy_model import VELOCITY_PATCH
from .paths import model_file_error

log = logging.getLogger("oboro")
FOLDER, KEY, MAX_ENTRIES = "oboro_mask_adapters", "oboro_mask_control", 8
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
    """The velocity patch's state: the adapter model and the per-run static K/V cache."""

    def __init__(self, mcd: MaskControlDiT, labels: torch.Tensor, offload_device, mask_on_negative: bool = True):
        self.mcd, self.labels, self.offload_device = mcd, labels, offload_device
        self.mask_on_negative = mask_on_negative
        self.cache, self.hits, self.misses = OrderedDict(), 0, 0

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

    def static(self, x, context, attention_mask, keep, transformer_options):
        B, _, H, W = x.shape
        key = (tuple(map(str, transformer_options.get("uuids") or ())), B, H, W, x.dtype, x.device,
               None if keep is None else tuple(keep.tolist()))
        hit = self.cache.get(key)
        if hit is not None and _same(hit[0], context) and _same(hit[1], attention_mask):
            self.hits += 1
            self.cache.move_to_end(key)
            return hit[2]
        self.misses += 1
        sc = self.mcd.precompute_static(context, attention_mask, self.labels_for(B), B, (H, W), dtype=x.dtype,
                                        mask_keep=keep, options=transformer_options)
        self.cache[key] = (context, attention_mask, sc)
        while len(self.cache) > MAX_ENTRIES:
            self.cache.popitem(last=False)
        return sc

    def velocity(self, x, t, context, attention_mask, transformer_options):
        """The VELOCITY_PATCH contract (nodes/comfy_model.py): oboro's t and u, x padded to the patch."""
        self._to(x.device)
        keep = self.keep(x.shape[0], transformer_options)
        keep = None if keep is None else keep.to(x.device)
        sc = self.static(x, context, attention_mask, keep, transformer_options) if self.mcd.decoupled else None
        return self.mcd(x, t, context, attention_mask, self.labels_for(x.shape[0]), static_cache=sc,
                        mask_keep=None if sc is not None else keep, options=transformer_options)


def mask_controlled(model, mcd: MaskControlDiT, labels: torch.Tensor, mask_on_negative: bool = True):
    """A clone of the ModelPatcher `model` with mask control as a model patch (see the docstring)."""
    ctl = MaskController(mcd, labels, model.offload_device, mask_on_negative)

    # Plain functions, not bound methods: ModelPatcher.clone deep-copies model_options, and
    # deepcopy keeps functions as they are (a bound method would copy the controller and its model).
    def velocity(dm, x, t, context, attention_mask, transformer_options):
        return ctl.velocity(x, t, context, attention_mask, transformer_options)

    def outer_sample(executor, *args, **kwargs):
        ctl.cache.clear()
        try:
            return executor(*args, **kwargs)
        finally:
            ctl.end_run()

    velocity.controller = ctl
    m = model.clone()
    m.set_model_patch(velocity, VELOCITY_PATCH)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, outer_sample)
    return m


def mask_controller(model) -> MaskController | None:
    """The controller of a MODEL's mask control, if it has one."""
    patches = model.model_options.get("transformer_options", {}).get("patches", {}).get(VELOCITY_PATCH, [])
    return getattr(patches[-1], "controller", None) if patches else None


def _oboro_dm(model, node: str) -> MMHDiT:
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(dm, MMHDiT):
        raise ValueError(f"{node} needs an oboro MODEL (OboroModelLoader), got {type(dm).__name__}")
    return dm


class OboroMaskAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroMaskAdapterLoader", display_name="oboro Mask Adapter Loader", category="oboro/mask",
            description="Loads a mask adapter (OboroTrainMaskAdapter) from models/oboro_mask_adapters; checked "
                        "against the model when applied.",
            inputs=[io.Combo.Input("adapter_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="File in models/oboro_mask_adapters.")],
            outputs=[MaskAdapterIO.Output("adapter", display_name="adapter")])

    @classmethod
    def validate_inputs(cls, adapter_name=""):
        """Refused when queued, together with any other missing model file of the graph."""
        return model_file_error("OboroMaskAdapterLoader", "adapter_name", FOLDER, adapter_name) or True

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
                io.Model.Input("model", tooltip="An oboro model (oboro Model Loader, LoRA applied or not)."),
                MaskAdapterIO.Input("adapter", tooltip="A mask adapter trained for this base model "
                                                       "(oboro Mask Adapter Loader)."),
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
        if model.model_options.get("transformer_options", {}).get("patches", {}).get(VELOCITY_PATCH):
            raise ValueError("OboroApplyMaskControl: this MODEL already has a mask control (or another "
                             f"{VELOCITY_PATCH!r} patch); apply it once")
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


NODES = [OboroMaskAdapterLoader, OboroApplyMaskControl]
