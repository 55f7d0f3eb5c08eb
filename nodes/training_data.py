"""OboroCacheLatents: a folder of captioned images -> a latent cache (VAE latents + T5 hidden
states) for training, built with oboro_model.data and ComfyUI's own VAE and CLIP objects.

Its read inputs (dataset_dir, mask_dir, exclude_list) follow nodes/paths.py confine_read (a plain
name is in ComfyUI's input folder; everything inside the server's folders or OBORO_READ_ROOTS),
its cache folder the write rule (confine); build_cache holds the cache folder's lock while it
writes, so two prompts or servers building one cache_name cannot interleave their shards."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..oboro_model.data import OboroDataset, build_cache, default_latent_transform
from ..oboro_model.data.cache import MANIFEST
from ..oboro_model.data.dataset import POLICIES
from ..oboro_model.data.exclusions import read_exclusions
from ..oboro_model.folder_lock import LOCK_NAME
from ..oboro_model.training.identity import tensor_digest as fingerprint_tensor  # one tensor digest
from .paths import confine, confine_read
from .text_encoder import MAX_TOKENS, encode_text

log = logging.getLogger("oboro")
CACHE_ROOT = "oboro_cache"


def fingerprint(module: torch.nn.Module, extra=()) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and up to 4096 evenly strided
    values of every tensor (not a full hash: that would read gigabytes for T5-XXL)."""
    h = hashlib.sha256(type(module).__name__.encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{fingerprint_tensor(t)}".encode())
    for item in extra:
        h.update(repr(item).encode())
    return h.hexdigest()


def lora_patches(clip) -> list:
    """The CLIP's weight patches (e.g. a LoRA from LoraLoader): key, strengths and patch fingerprint."""
    out = []
    for key, patches in sorted(getattr(clip.patcher, "patches", {}).items()):
        for p in patches:
            tensors = [t for t in (p[1] if isinstance(p[1], (tuple, list)) else (p[1],)) if torch.is_tensor(t)]
            out.append((key, p[0], p[2], [fingerprint_tensor(t) for t in tensors]))
    return out


def cache_folder(name: str) -> Path:
    """`name` under <output>/oboro_cache, or an absolute path inside an allowed root (nodes/paths.py)."""
    return confine(Path(folder_paths.get_output_directory()) / CACHE_ROOT, name, "cache_name")


def read_inputs(dataset_dir: str, mask_dir: str = "", exclude_list: str = "") -> tuple:
    """(dataset folder, mask folder or None, exclusion file or None), each by confine_read's rule;
    an empty optional input is None. Raises naming the input."""
    dataset = confine_read(dataset_dir, "dataset_dir", expect="dir")
    mask = confine_read(mask_dir, "mask_dir", expect="dir") if (mask_dir or "").strip() else None
    exclude = confine_read(exclude_list, "exclude_list", expect="file") if (exclude_list or "").strip() else None
    return dataset, mask, exclude


def vae_encoder(vae):
    def encode(pixels: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] in [0,1] -> ComfyUI IMAGE [B,H,W,3]
        return vae.encode(pixels.movedim(1, -1).contiguous())
    return encode


def clip_encoder(clip, max_tokens: int, stats: dict):
    def encode(captions: list[str]):
        hidden, masks = [], []
        for caption in captions:
            conds, dropped = encode_text(clip, caption, max_tokens)
            cond, extra = conds[0]
            hidden.append(cond[0].float().cpu())
            masks.append(extra["attention_mask"][0].cpu())
            stats["truncated"] += bool(dropped)
        return hidden, masks
    return encode


class OboroCacheLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroCacheLatents",
            display_name="oboro Cache Training Latents",
            category="oboro/training",
            description="Encodes a folder of images with captions (sidecar .txt, or metadata.jsonl / metadata.csv "
                        "with file_name, text and an optional score column) into a latent cache for training. "
                        "Unchanged images are reused from an existing cache; bad files are skipped and listed "
                        "in the report.",
            inputs=[
                io.String.Input("dataset_dir", tooltip="Folder of images (searched recursively): a name in ComfyUI's "
                                                       "input folder, or an absolute path inside the input, output "
                                                       "or models folders or OBORO_READ_ROOTS."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the images into latents: the FLUX VAE, or "
                             "pixel_space for a 3-channel model such as the offline demo's."),
                io.Clip.Input("clip", tooltip="T5 from OboroT5Loader."),
                io.Combo.Input("policy", options=list(POLICIES), default="stage1_256",
                               tooltip="stage1_256: short side to size, random size x size crop. stage2_area: "
                                       "aspect buckets of about `area` pixels, aspect <= 1.3, sides multiples "
                                       "of 64. fixed: size x size (or size x height), centre crop."),
                io.Int.Input("size", default=256, min=16, max=8192, step=8,
                             tooltip="Side for stage1_256 and width for fixed."),
                io.Int.Input("area", default=512 * 512, min=64 * 64, max=4096 * 4096, step=64,
                             tooltip="Target pixel count of stage2_area buckets."),
                io.Int.Input("max_tokens", default=256, min=1, max=MAX_TOKENS,
                             tooltip="Most T5 tokens kept per caption (end-of-sequence token included)."),
                io.String.Input("cache_name", default="default",
                                tooltip="Cache folder: output/oboro_cache/<name>, or an absolute path inside the output folder or "
                                        "OBORO_ALLOWED_ROOTS."),
                io.String.Input("score_column", default="", optional=True,
                                tooltip="Metadata column with an aesthetic score: adds 'excellent score' (>= 6), "
                                        "'good score' (>= 5.2), 'average score' (>= 4) and drops images "
                                        "below 4. Empty: no tags."),
                io.Int.Input("height", default=0, min=0, max=8192, step=8, optional=True,
                             tooltip="fixed policy: height (0: same as size)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True, control_after_generate=False,
                             tooltip="Seed of the (deterministic) random crops."),
                io.String.Input("mask_dir", default="", optional=True,
                                tooltip="Loss masks for masked_loss: <mask_dir>/<image path> (or .png), white = "
                                        "learn, black = ignore (label maps: label > 0 = learn); cropped like "
                                        "their image, stored at latent resolution. Same path rule as dataset_dir. "
                                        "Empty: none."),
                io.Boolean.Input("alpha_mask", default=False, optional=True,
                                 tooltip="Images without a mask file use their alpha channel as loss mask "
                                         "(transparent = ignore)."),
                io.String.Input("exclude_list", default="", optional=True,
                                tooltip="A file of images to skip, one path relative to dataset_dir per line "
                                        "(OboroDedupDataset's exclude_list). Same path rule as dataset_dir. "
                                        "Empty: none."),
                io.Boolean.Input("require_licence", default=False, optional=True,
                                 tooltip="Refuse (writing nothing) to cache a dataset with any image without a "
                                         "licence: a `licence` column in metadata.jsonl / metadata.csv, or a "
                                         "LICENSE / licence.txt / license.txt file (first line) in its folder or "
                                         "a folder above. The cache records every image's licence, consent, "
                                         "source and author either way (docs/provenance.md)."),
            ],
            outputs=[io.String.Output("cache_dir", display_name="cache_dir"),
                     io.String.Output("report", display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, dataset_dir="", cache_name="", mask_dir="", exclude_list="", **kwargs):
        """Re-run when any file under dataset_dir (or mask_dir, or the exclusion list) changes or the
        cache disappears. Paths the read rule refuses are not looked at (execute then says why)."""
        try:
            dataset, mask, exclude = read_inputs(dataset_dir, mask_dir, exclude_list)
        except (ValueError, OSError) as e:
            return f"unusable:{type(e).__name__}:{dataset_dir!r}:{mask_dir!r}:{exclude_list!r}"
        h = hashlib.sha256()
        if exclude is not None:
            st = os.stat(exclude)
            h.update(f"{exclude}:{st.st_size}:{st.st_mtime_ns}".encode())
        for d, subdirs, names in (w for root in (dataset, mask) if root for w in os.walk(root)):
            subdirs.sort()
            for n in sorted(names):
                if n == LOCK_NAME:  # rewritten by every caption/score run, whether or not files changed
                    continue
                try:
                    st = os.stat(os.path.join(d, n))
                    h.update(f"{d}/{n}:{st.st_size}:{st.st_mtime_ns}".encode())
                except OSError:
                    pass
        try:  # existence, not mtime: every run rewrites the manifest, which must not force a re-run
            h.update(str((cache_folder(cache_name) / MANIFEST).is_file()).encode())
        except ValueError:
            pass
        return h.hexdigest()

    @classmethod
    def execute(cls, dataset_dir, vae, clip, policy, size, area, max_tokens, cache_name, score_column="",
                height=0, seed=0, mask_dir="", alpha_mask=False, exclude_list="",
                require_licence=False) -> io.NodeOutput:
        if vae is None or clip is None:
            raise RuntimeError("connect a VAE and a text encoder (OboroT5Loader)")
        ratio = vae.spacial_compression_encode()
        if policy != "stage2_area" and (size % ratio or (height or size) % ratio):
            raise ValueError(f"{policy}: size {size}x{height or size} must be a multiple of the VAE's "
                             f"downscale factor {ratio}")
        folder = cache_folder(cache_name)
        dataset_dir, mask_dir, exclude_list = read_inputs(dataset_dir, mask_dir, exclude_list)
        exclude = read_exclusions(exclude_list) if exclude_list is not None else None
        dataset = OboroDataset(dataset_dir, policy=policy, size=(size, height or size), area=area,
                               score_column=(score_column or "").strip() or None, seed=seed, exclude=exclude)
        if len(dataset) == 0:
            raise ValueError(f"{dataset_dir}: no usable image-caption pairs; skipped: "
                             + json.dumps(dataset.report[:20], ensure_ascii=False))
        masks = None
        if mask_dir is not None or alpha_mask:
            from ..oboro_model.data.masks import LossMasked
            dataset = masks = LossMasked(dataset, mask_dir, alpha_mask)
        settings = {"vae": type(vae.first_stage_model).__name__, "vae_hash": fingerprint(vae.first_stage_model),
                    "t5": type(clip.cond_stage_model).__name__, "max_tokens": int(max_tokens),
                    "t5_hash": fingerprint(clip.cond_stage_model, lora_patches(clip))}
        stats = {"truncated": 0}
        pbar = comfy.utils.ProgressBar(len(dataset))
        # The latent format an oboro model for this VAE applies (the training nodes check it against
        # their MODEL's latent_format; scripts/oboro-train applies it from the manifest).
        transform = default_latent_transform(int(vae.latent_channels))
        report = build_cache(dataset, folder, vae_encoder(vae), clip_encoder(clip, max_tokens, stats), settings,
                             progress=lambda done, total: pbar.update_absolute(done, total), transform=transform,
                             what=f"OboroCacheLatents of {dataset_dir}", require_licence=bool(require_licence))
        summary = {"cache_dir": str(folder), "items": report["items"], "encoded": report["encoded"],
                   "reused": report["reused"], "skipped_count": len(report["skipped"]),
                   "captions_truncated": stats["truncated"], "buckets": [list(b) for b in dataset.buckets],
                   **({"loss_masks": masks.counts()} if masks is not None else {}), "dataset": report["dataset"],
                   "skipped": report["skipped"]}
        text = json.dumps(summary, indent=1, ensure_ascii=False)
        log.info("OboroCacheLatents: %s: %d items (%d encoded, %d reused), %d skipped", folder, report["items"],
                 report["encoded"], report["reused"], len(report["skipped"]))
        return io.NodeOutput(str(folder), text, ui={"text": (text,)})
