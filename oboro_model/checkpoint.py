"""oboro checkpoints: safetensors with the config as JSON in the header.

Files without the header (converted or third-party) are still loadable: depth, widths and the
per-layer head counts are inferred from tensor names and shapes (each block's per-head QK-norm
weight has exactly head_dim entries). Pickle formats are refused: they can run code on load.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors import safe_open

from .atomic import save_safetensors
from .config import PRESETS, OboroConfig
from .model import MMHDiT

CONFIG_KEY = "oboro_config"
FORMAT_KEY = "oboro_format"
FORMAT_VERSION = "1"
# Longest first: "model.diffusion_model." must win over "model.".
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "module.", "model.")
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model; the message names the file."""


def save_checkpoint(path, model: MMHDiT, metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves a half-written checkpoint."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[CONFIG_KEY] = model.config.to_json()
    meta[FORMAT_KEY] = FORMAT_VERSION
    return save_safetensors(path, {k: v.detach().contiguous() for k, v in model.state_dict().items()}, meta)


def strip_prefixes(sd: dict, prefixes=PREFIXES) -> dict:
    """Remove the one wrapper prefix every key shares (ComfyUI, DDP and Lightning add these)."""
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items()}
    return sd


def rename_keys(sd: dict, key_map: Optional[Mapping[str, str]]) -> dict:
    """Apply an explicit old-prefix -> new-prefix map (the seam for foreign layouts)."""
    if not key_map:
        return sd
    out = {}
    for k, v in sd.items():
        for old, new in key_map.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def infer_config(sd: Mapping[str, torch.Tensor], name: str = "<state dict>", patch_size: int = 2) -> OboroConfig:
    """Recover an OboroConfig from tensor names and shapes alone."""
    def need(key):
        if key not in sd:
            raise CheckpointError(f"{name}: cannot infer the model config: key {key!r} is missing")
        return sd[key]

    hidden, patch_in = need("x_embedder.weight").shape
    found = _block_indices(sd)
    depth = len(found)
    if depth == 0:
        raise CheckpointError(f"{name}: no 'blocks.N.' keys; this is not an MMH-DiT state dict")
    if found != list(range(depth)):
        missing = sorted(set(range(found[-1] + 1)) - set(found))
        raise CheckpointError(f"{name}: blocks {missing} are missing (found blocks {found[0]}..{found[-1]}); "
                              "the file is incomplete")
    qk_norm = "blocks.0.attn.q_norm.weight" in sd
    if not qk_norm:
        raise CheckpointError(f"{name}: no per-head QK-norm weights, so head counts cannot be inferred; "
                              "save the file with its config header")
    heads = tuple(hidden // need(f"blocks.{i}.attn.q_norm.weight").shape[0] for i in range(depth))
    if patch_in % (patch_size ** 2):
        raise CheckpointError(f"{name}: x_embedder takes {patch_in} features, not a multiple of patch {patch_size}^2")
    mlp_hidden = need("blocks.0.mlp.w1.weight").shape[0]
    for pname, p in PRESETS.items():  # the last block(s) of a known architecture cut off: no silent small model
        if (p.hidden_size, p.mlp_hidden) == (hidden, mlp_hidden) and depth < p.depth and heads == p.heads[:depth]:
            raise CheckpointError(f"{name}: has blocks 0..{depth - 1} of the {p.depth}-block {pname!r} layout "
                                  f"(heads {list(p.heads)}); blocks {depth}..{p.depth - 1} are missing, so the file "
                                  "is incomplete (a deliberately shallower model needs its config header)")
    try:
        return OboroConfig(
            in_channels=patch_in // patch_size ** 2, patch_size=patch_size, hidden_size=hidden, depth=depth,
            heads=heads, mlp_hidden=mlp_hidden,
            text_dim=need("text_embedder.1.weight").shape[1], adaln_dim=need("t_embedder.mlp.0.weight").shape[0],
            qk_norm=qk_norm)
    except ValueError as e:
        raise CheckpointError(f"{name}: inferred config is invalid: {e}") from None


def _block_indices(sd) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})


def check_finite(sd: Mapping[str, torch.Tensor], name: str, chunk: int = 1 << 24) -> None:
    """NaN/inf weights only show up as black or NaN images much later; name the file and tensor now.
    Chunked, in fp32 (fp8 has no isfinite), so the check never holds more than one chunk extra."""
    for k, t in sd.items():
        if not t.is_floating_point():
            continue
        flat, bad = t.reshape(-1), 0
        for i in range(0, flat.numel(), chunk):
            bad += int((~torch.isfinite(flat[i:i + chunk].float())).sum())
        if bad:
            raise CheckpointError(f"{name}: tensor {k!r} {tuple(t.shape)} holds {bad} NaN/inf value(s); the "
                                  "file is damaged or comes from a diverged training run")


SCALED_FP8_EXTRAS = ("scaled_fp8", ".scale_weight", ".scale_input")


def check_config_fits(sd: Mapping[str, torch.Tensor], config: OboroConfig, name: str) -> None:
    """A header config must describe the tensors in the file, checked on the meta device (nothing
    allocated) BEFORE anyone builds the model: a header claiming a huge model is an error naming
    the file, not an allocator failure."""
    found = _block_indices(sd)
    if len(found) != config.depth:
        raise CheckpointError(f"{name}: header {CONFIG_KEY!r} says depth {config.depth} but the file holds "
                              f"{len(found)} blocks; header and tensors do not match")
    with torch.device("meta"):
        model = MMHDiT(config)
    # ComfyUI's scaled-fp8 files add a `scaled_fp8` marker and per-layer scale scalars; the ComfyUI
    # loader (nodes/comfy_model.py) consumes them, the pure model has no such keys.
    extras = SCALED_FP8_EXTRAS if SCALED_FP8_EXTRAS[0] in sd else ()
    check_state_dict(model, sd, name, optional_suffixes=extras)


def _check_not_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix.lower() in PICKLE_SUFFIXES or head[:2] in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"):
        raise CheckpointError(f"{path}: pickle/zip checkpoints are refused (they can run code when loaded); "
                              "convert it to .safetensors first")


def read_checkpoint(path, key_map: Optional[Mapping[str, str]] = None, device="cpu"):
    """-> (state_dict, OboroConfig, metadata). Tensors are read straight from the file (mmap). The
    config must match the tensors and every weight must be finite (CheckpointError naming the
    file and key otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_not_pickle(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    sd = rename_keys(strip_prefixes(sd), key_map)
    if CONFIG_KEY in meta:
        try:
            config = OboroConfig.from_dict(json.loads(meta[CONFIG_KEY]))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: header {CONFIG_KEY!r} is invalid: {e}") from None
    else:
        config = infer_config(sd, str(path))
    check_config_fits(sd, config, str(path))
    check_finite(sd, str(path))
    return sd, config, meta


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], name: str,
                     optional_suffixes: tuple = ()) -> None:
    """Raise one error listing every missing key, unexpected key and shape mismatch.

    Keys ending in one of `optional_suffixes` may be absent on either side: the caller's layers
    keep a default for them or ignore them (ComfyUI's scaled-fp8 files carry per-layer
    `.scale_weight` / `.scale_input` scalars, which ComfyUI's fp8 ops default to 1 when missing)."""
    expected = model.state_dict()
    missing = sorted(k for k in set(expected) - set(sd) if not k.endswith(optional_suffixes))
    unexpected = sorted(k for k in set(sd) - set(expected) if not k.endswith(optional_suffixes))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{name}: state dict does not match the model config"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"  {label} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(parts))


def load_checkpoint(path, dtype: Optional[torch.dtype] = None, device="cpu",
                    key_map: Optional[Mapping[str, str]] = None, **model_kwargs) -> MMHDiT:
    """Build the model on the meta device and assign the file's tensors into it: the weights
    exist once in RAM, never as a random init plus a loaded copy."""
    sd, config, _ = read_checkpoint(path, key_map=key_map, device=device)
    with torch.device("meta"):
        model = MMHDiT(config, **model_kwargs)
    check_state_dict(model, sd, str(path))
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
