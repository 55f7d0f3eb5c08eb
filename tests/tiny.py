"""Tiny stand-ins for the real model files (no oboro/T5/FLUX weights exist on test machines).

Same architectures as the real ones, random weights: a `tiny` MMH-DiT, a 2-layer T5 v1.1 with the
real vocabulary, and a VAE with FLUX ae.safetensors' architecture and keys (ComfyUI fixes its
width, so it has ~84M parameters; stored in fp16 as shipped)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from oboro.oboro_model import MMHDiT, preset, save_checkpoint

TEXT_DIM = 32
# The file names the shipped workflows use.
DIT_NAME, T5_NAME, VAE_NAME = "oboro-base-v1-1b.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"
MODEL_KINDS = ("diffusion_models", "text_encoders", "vae", "loras")


def tiny_dit(seed=0, in_channels=16, text_dim=TEXT_DIM, std=0.05) -> MMHDiT:
    """Every parameter random (no zero-init gates), so every path of the model contributes."""
    torch.manual_seed(seed)
    m = MMHDiT(preset("tiny", in_channels=in_channels, text_dim=text_dim))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=std)
    return m.eval()


def tiny_t5(seed=0, d_model=TEXT_DIM):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=32128, d_model=d_model, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                   feed_forward_proj="gated-gelu")).eval()


def save_t5(path: Path, t5) -> None:
    """ComfyUI single-file layout: HF key names, tied embeddings stored separately."""
    save_file({k: v.contiguous().clone() for k, v in t5.state_dict().items()}, str(path))


def random_flux_vae_state_dict(seed=0) -> dict:
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder
    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    sd = {}
    torch.manual_seed(seed)
    for prefix, module in (("encoder", Encoder(**ddconfig)), ("decoder", Decoder(**ddconfig))):
        for sub in module.modules():  # comfy's ops skip weight init; use torch's
            for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm):
                if isinstance(sub, base):
                    base.reset_parameters(sub)
        sd.update({f"{prefix}.{k}": v.to(torch.float16).contiguous() for k, v in module.state_dict().items()})
    return sd


def save_shipped_models(root: Path) -> Path:
    """The tiny models under the shipped workflows' file names, in ComfyUI's folder layout."""
    for kind in MODEL_KINDS:
        (root / kind).mkdir(parents=True, exist_ok=True)
    save_checkpoint(root / "diffusion_models" / DIT_NAME, tiny_dit())
    save_t5(root / "text_encoders" / T5_NAME, tiny_t5())
    save_file(random_flux_vae_state_dict(), str(root / "vae" / VAE_NAME))
    return root
