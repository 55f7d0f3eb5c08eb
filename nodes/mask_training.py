"""OboroTrainMaskAdapter: trains a mask adapter (oboro_model/mask_control.py) on the training engine.

OboroTrainMaskAdapter masks: mask_dir/<image path relative to the dataset folder, suffix .png>,
the size of its image. Mode P / L / I: pixel value = label (0 background, 1.. regions; what
demo/data.py writes). RGB(A): colour i of `palette` = label i. The latent cache's
crop/resize of the image (policy, crop, seed, epoch 0) is replayed on the mask (nearest). Training
runs on the engine (oboro_model/training: the Trainer over MaskedLatents, one bucket per step), so it has the LoRA
nodes' spike guard, schedules, resumable states (output/oboro_training/<output_name>_mask) and
interrupt; text and mask dropout are independent per sample (p = condition_dropout each). A dropped
text is no tokens (the adapter records dropped_text "no_tokens", so OboroApplyMaskControl reads an
empty prompt the same way); with `clip` connected it is T5("") ("empty_prompt").
"""
from __future__ import annotations

import gc
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import comfy.model_management as mm
import folder_paths
from comfy_api.latest import io

from ..oboro_model import MMHDiT
from ..oboro_model.data import crop_box
from ..oboro_model.mask_control import MaskAdapterConfig, MaskControlDiT, MaskedLatents, palette_to_labels
from ..oboro_model.training import TrainConfig
from ..oboro_model.training.datasets import DataSource
from ..oboro_model.training.export import ExportSpec
from ..oboro_model.training.optim import SCHEDULES
from ..oboro_model.training.run import RunInterrupted, RunSpec, run
from ..oboro_model.training.seeding import seeded_rng
from .mask_control import FOLDER, IMAGE_RANK, MaskAdapter, MaskAdapterIO, _oboro_dm, parse_palette
from .training_inputs import PRECISION
from .training_preview import encode_plain, loss_curve_image
from .paths import confine_read
from .training_run import STATE_ROOT, read_path, NodeHooks, _inside, interrupted_text, open_node_cache, plain_weights, send_text

log = logging.getLogger("oboro")


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
                io.String.Input("output_name", default="oboro_mask_adapter",
                                tooltip="Name of the adapter file and of its training folder."),
                io.Int.Input("steps", default=2000, min=1, max=10_000_000,
                             tooltip="How many training steps in all (a resumed run continues up to this)."),
                io.Int.Input("batch_size", default=4, min=1, max=4096,
                             tooltip="Images per step. More is smoother but needs more memory."),
                io.Float.Input("lr", default=1e-4, min=1e-8, max=1.0, step=1e-6, tooltip="AdamW, clip 1.0."),
                io.Int.Input("rank", default=8, min=1, max=256, tooltip="LoRA rank of the mask stream."),
                io.Int.Input("image_rank", default=IMAGE_RANK, min=0, max=256,
                             tooltip="LoRA rank on the image stream too (0: image stream frozen). A base never "
                                     "trained on layouts follows masks far better with it; see README."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Fixes the order of images, the noise and the adapter's start: same seed, same result."),
                io.Int.Input("num_labels", default=0, min=0, max=256,
                             tooltip="0: automatic, max(palette length, largest label found + 1)."),
                io.Float.Input("condition_dropout", default=0.1, min=0.0, max=0.9, step=0.01,
                               tooltip="Per sample, drop the text and (independently) the mask with this p."),
                io.Combo.Input("precision", options=["fp32", "bf16"], default="bf16", tooltip="Autocast dtype."),
                io.String.Input("palette", default="", optional=True, tooltip="Only for RGB masks: '#000000,...'."),
                io.Int.Input("warmup", default=0, min=0, max=1_000_000, optional=True, tooltip="Linear LR warm-up steps."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="constant", optional=True,
                               tooltip="How the learning rate falls after warm-up."),
                io.Int.Input("checkpoint_every", default=0, min=0, max=10_000_000, optional=True,
                             tooltip="Save a resumable training state every N steps (0: at the end and on interrupt)."),
                io.String.Input("resume_from", default="", optional=True,
                                tooltip="'latest' continues this output_name's last state (after an interrupt too)."),
                io.Clip.Input("clip", optional=True, tooltip="Leave unconnected (recommended): a dropped text is no "
                              "tokens, and an empty prompt is read so when sampling. Connected (T5): a dropped "
                              "text is T5(\"\") as encoded; on the demo mask-only followed masks worse so."),
                # last: saved workflows map widget values by position
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace an existing adapter of that name. Off: it is kept and the result "
                                         "gets the next free name <output_name>_00001_ (see the path output)."),
            ],
            outputs=[io.String.Output("path", display_name="path"),
                     io.Image.Output("loss_curve", display_name="loss_curve"),
                     MaskAdapterIO.Output("adapter", display_name="adapter")],
            is_output_node=True)

    @classmethod
    def execute(cls, model, cache_dir, mask_dir, output_name, steps, batch_size, lr, rank, image_rank, seed, num_labels,
                condition_dropout: float, precision, palette="", warmup=0, schedule="constant", checkpoint_every=0,
                resume_from="", clip=None, overwrite=False) -> io.NodeOutput:
        node = "OboroTrainMaskAdapter"
        dm = _oboro_dm(model, node)
        stem = output_name.strip().removesuffix(".safetensors")
        target = _inside(folder_paths.get_folder_paths(FOLDER)[0], stem + ".safetensors")
        state_dir = _inside(Path(folder_paths.get_output_directory()) / STATE_ROOT, stem + "_mask")
        if not (cache_dir or "").strip():
            raise ValueError(f"{node}: cache_dir is empty; connect oboro Cache Latents' cache_dir output")
        cache_dir = read_path(cache_dir, "cache_dir")
        root = confine_read(mask_dir, "mask_dir", expect="dir")
        if (resume_from or "").strip() not in ("", "latest"):
            resume_from = read_path(resume_from.strip(), "resume_from", STATE_ROOT, expect=None)
        cache = open_node_cache(cache_dir, model.model.latent_format, node)
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
                           mask_dropout=condition_dropout, seed=seed, checkpoint_every=checkpoint_every)
        spec = RunSpec(tcfg, str(state_dir), (DataSource(cache_dir),), None, None, resume_from,
                       ExportSpec(str(target.parent), target.stem, "mask_adapter", bool(overwrite)), samples=0,
                       what=node)
        empty = (None, None)  # no clip: a dropped text is no tokens (the adapter records "no_tokens")
        if clip is not None:  # T5("") as the cache stored it (older caches: encoded here)
            empty = ((cache.empty_text, cache.empty_mask) if cache.empty_text is not None
                     else encode_plain(clip, "", int(cache.settings.get("max_tokens", 256))))
        device = mm.get_torch_device()
        weights, _ = plain_weights(model, device)  # fp32: the adapter reads the base layers directly
        mm.unload_all_models()
        hooks = NodeHooks(node, steps, empty=empty, open_cache=lambda p, what: cache,
                          wrap_data=lambda data: MaskedLatents(data, masks))
        with torch.inference_mode(False), torch.enable_grad(), seeded_rng(seed, device):
            with torch.device("meta"):
                net = MMHDiT(dm.config)
            net.load_state_dict({k: weights.pop(k) for k in net.state_dict()}, strict=True, assign=True)
            with torch.random.fork_rng(devices=[]):  # the adapter's init follows `seed` too
                torch.manual_seed(seed)
                mcd = MaskControlDiT(net, cfg)  # the base is frozen: only the adapter trains
            try:
                result = run(spec, mcd, hooks)
            except RunInterrupted as e:
                send_text(interrupted_text(e))
                raise mm.InterruptProcessingException() from None
            mcd = net = None
        gc.collect()
        mm.soft_empty_cache()
        s = result.summary
        path = s["path"]
        summary = json.dumps({"path": path, "steps": s["step"], "items": len(cache), "num_labels": K,
                              "final_loss": s.get("final_loss"), "state_dir": s["state_dir"],
                              "seconds": s.get("seconds"), **({"note": result.note} if result.note else {})},
                             indent=1)
        log.info("%s: saved %s", node, path)
        return io.NodeOutput(path, loss_curve_image(result.history or {"step": [], "loss": [], "spikes": [],
                                                                          "resumed_at": []}, f"{node}: {stem}"),
                             MaskAdapter.read(Path(path)), ui={"text": (summary,)})


NODES = [OboroTrainMaskAdapter]
