"""Images that say how they were made, and a near-copy check (issue 24 §3-§4).

OboroSaveImage saves exactly as core Save Image (ComfyUI's own ImageSaveHelper.save_images: output
folder, filename_prefix with %date% etc., next free _00001_ number, prompt/workflow PNG chunks,
--disable-metadata honoured for those) and then adds an `oboro_provenance` PNG chunk (iTXt) to each
file it wrote, and with the admin's signing certificate a C2PA manifest (image_provenance.py).

How the model files are identified: from the graph, the ComfyUI-native record of what ran. The
executor hands every node the prompt it runs (hidden PROMPT, the same object core Save Image embeds)
and the node's own id (hidden UNIQUE_ID). Every node upstream of this one (through links) whose
string input names a file in a model folder (folder_paths: diffusion_models, text_encoders, vae,
loras, ...) contributed that file: OboroModelLoader / UNETLoader -> model, OboroT5Loader /
CLIPLoader -> text encoder, VAELoader -> vae, LoraLoaderModelOnly / LoraLoader / any other pack's
LoRA loader -> lora (with its strength inputs). A ModelPatcher's patches keep the LoRA's tensors
but not which file they came from, so the patches alone cannot name it; the graph can, and it also
covers LoRAs applied by other packs' loaders without their cooperation. Each file gets a quick
content digest and the `oboro_provenance` its safetensors metadata carries (datasets, licences).

The signing certificate is configured by the admin, never by the graph: OBORO_C2PA_CERT and
OBORO_C2PA_KEY (PEM files), or <ComfyUI user folder>/oboro/c2pa/cert.pem + key.pem. Without one,
images are unsigned and the log says so once per process.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..oboro_model import image_provenance as ip
from ..oboro_model import near_copies
from ..oboro_model.atomic import atomic_write
from .dataset_prep import clip_embedding, folder_state, readable_dataset

log = logging.getLogger("oboro")
_signer_cache: dict = {}
_said_unsigned = False


def current_signer():
    """The admin's c2pa signer, loaded once per (files, mtimes); None when none is configured."""
    global _said_unsigned
    pair = ip.signing_files(folder_paths.get_user_directory())
    if pair is None:
        if not _said_unsigned:
            log.warning("oboro: images are saved UNSIGNED (no C2PA certificate): set %s and %s to PEM files, or put "
                        "cert.pem and key.pem in %s", ip.CERT_ENV, ip.KEY_ENV,
                        os.path.join(folder_paths.get_user_directory(), "oboro", "c2pa"))
            _said_unsigned = True
        return None
    key = tuple((str(p), p.stat().st_mtime_ns) for p in pair)
    if key not in _signer_cache:
        _signer_cache.clear()
        _signer_cache[key] = ip.load_signer(*pair)
        log.info("oboro: C2PA signing with %s", pair[0])
    return _signer_cache[key]


def record_for(prompt, node_id) -> dict:
    """The image record of what the graph upstream of node `node_id` loaded."""
    prompt = prompt or {}
    if str(node_id) not in prompt:  # run outside a prompt (tests calling execute) or an expanded node
        prompt = {**prompt, str(node_id): {"inputs": {k: [k, 0] for k in prompt}}}
    entries = ip.model_files(prompt, str(node_id), folder_paths.get_full_path)
    return ip.image_record(entries, generator="ComfyUI")


class OboroSaveImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroSaveImage",
            display_name="oboro Save Image (with provenance)",
            category="oboro/image",
            description="Saves images like core Save Image (same output folder, numbering and prompt/workflow "
                        "metadata) and adds a provenance record: digests of the model, T5, VAE and every LoRA "
                        "upstream in the graph, with the dataset digests and licences their oboro_provenance "
                        "metadata carries. With the admin's C2PA certificate the PNG also carries a signed C2PA "
                        "manifest (created, trainedAlgorithmicMedia). Check with scripts/oboro-provenance.",
            inputs=[
                io.Image.Input("images", tooltip="The images to save."),
                io.String.Input("filename_prefix", default="oboro",
                                tooltip="As core Save Image: may include a subfolder and %date:yyyy-MM-dd%."),
            ],
            outputs=[io.String.Output("provenance", display_name="provenance")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo, io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, filename_prefix="oboro") -> io.NodeOutput:
        record = record_for(cls.hidden.prompt, cls.hidden.unique_id)
        text = json.dumps(record, ensure_ascii=False, sort_keys=True)
        signer = current_signer()
        results = ui.ImageSaveHelper.save_images(images, filename_prefix=filename_prefix,
                                                 folder_type=io.FolderType.output, cls=cls, compress_level=4)
        base = Path(folder_paths.get_output_directory())
        for r in results:
            path = base / r["subfolder"] / r["filename"]
            data = ip.add_png_text(path.read_bytes(), ip.PROVENANCE_KEY, text)
            if signer is not None:
                data = ip.sign_png(data, record, signer, title=r["filename"])
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), fsync=False)
        return io.NodeOutput(json.dumps(record, indent=1, ensure_ascii=False), ui=ui.SavedImages(results))


def to_pil(images) -> list[Image.Image]:
    return [Image.fromarray(np.clip(255.0 * im.cpu().float().numpy(), 0, 255).astype(np.uint8)) for im in images]


class OboroNearCopyCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroNearCopyCheck",
            display_name="oboro Near-Copy Check",
            category="oboro/image",
            description="For each image, the nearest training images of a dataset folder by the dedup embedding "
                        "(built-in perceptual hash, or CLIP vision when connected), with cosine distances. An image "
                        "is flagged when it is much closer to a training image than that image's own nearest "
                        "neighbour in the dataset is (or within a fixed threshold, when one is set). Only reads. "
                        "The contact sheet shows each image with its closest training images.",
            inputs=[
                io.Image.Input("images", tooltip="Generated images to check."),
                io.String.Input("dataset_dir", tooltip="The training image folder (read recursively): a name in "
                                                       "ComfyUI's input folder, or an absolute path inside the input, "
                                                       "output or models folders or OBORO_READ_ROOTS."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=2.0, step=0.001,
                               tooltip=f"Cosine distance at or below which an image is a near copy. 0: automatic, "
                                       f"relative to the dataset: within {near_copies.NEAR_COPY_RATIO} x the "
                                       f"training image's distance to its nearest other training image, always "
                                       f"within {near_copies.NEAR_COPY_HASH} ({near_copies.NEAR_COPY_CLIP} with CLIP "
                                       f"vision), never beyond {near_copies.NEAR_COPY_CAP}."),
                io.Int.Input("top_k", default=near_copies.TOP_K, min=1, max=16,
                             tooltip="Nearest training images listed per image."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Embed with this model (core Load CLIP Vision) instead of the hash."),
            ],
            outputs=[io.String.Output("report", display_name="report"),
                     io.Image.Output("contact_sheet", display_name="contact_sheet"),
                     io.Int.Output("flagged", display_name="flagged")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, dataset_dir="", **kwargs):
        return folder_state(dataset_dir)

    @classmethod
    def execute(cls, images, dataset_dir, threshold=0.0, top_k=near_copies.TOP_K, clip_vision=None) -> io.NodeOutput:
        root = readable_dataset(dataset_dir)
        embed = near_copies.dedup.hash_embedding if clip_vision is None else clip_embedding(clip_vision)
        pbar = comfy.utils.ProgressBar(1)
        pils = to_pil(images)
        report = near_copies.check(root, pils, embed, threshold, top_k, clip=clip_vision is not None,
                                   progress=lambda d, t: pbar.update_absolute(d, t),
                                   stop=mm.throw_exception_if_processing_interrupted)
        sheet = near_copies.contact_sheet(root, pils, report)
        text = json.dumps(report, indent=1, ensure_ascii=False)
        log.info("OboroNearCopyCheck: %d of %d images flagged as near copies of a training image in %s (%s)",
                 report["flagged"], len(pils), root, near_copies.describe_rule(report["rule"]))
        return io.NodeOutput(text, torch.from_numpy(np.asarray(sheet, np.float32) / 255.0)[None], report["flagged"],
                             ui={"text": (text,)})
