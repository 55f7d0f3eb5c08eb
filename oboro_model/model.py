"""MMH-DiT: the oboro flow-matching diffusion transformer (paper section III-B).

Joint self-attention over [BOS; text; image] tokens, Lumina-Next style sandwich RMSNorm blocks
modulated by the timestep, QK-norm, SwiGLU, 3-axis RoPE, and a head count that grows with depth.

Conventions (I-CFM): t in [0, 1], t=0 is noise and t=1 is data; the output is the velocity
u = x1 - x0. Layer classes come from `operations` (torch.nn, or comfy.ops inside ComfyUI) and
attention from `attention`, so ComfyUI can supply fp8 casting and its attention kernels.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import OboroConfig
from .rope import apply_rope, rope_freqs

# attention(q, k, v, mask) with q, k, v [B, H, L, D] and mask None or additive [B, 1, 1, L];
# returns [B, L, H*D].
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def sdpa_attention(q, k, v, mask=None):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def modulate(x, scale):
    return x if scale is None else x * (1 + scale.unsqueeze(1))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int, freq_dim: int = 256, ops=nn, **kw):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(ops.Linear(freq_dim, out_dim, bias=True, **kw), nn.SiLU(),
                                 ops.Linear(out_dim, out_dim, bias=True, **kw))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # t*1000 spreads [0, 1] over the sinusoid's useful range, as DiT/SD3 do.
        return self.mlp(timestep_embedding(t * 1000.0, self.freq_dim).to(dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, eps: float, ops=nn, **kw):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = ops.Linear(dim, 3 * dim, bias=False, **kw)
        self.out = ops.Linear(dim, dim, bias=False, **kw)
        if qk_norm:
            self.q_norm = ops.RMSNorm(self.head_dim, eps=eps, elementwise_affine=True, **kw)
            self.k_norm = ops.RMSNorm(self.head_dim, eps=eps, elementwise_affine=True, **kw)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def project(self, x, freqs, lin: "LinearFn"):
        """-> q, k, v [B, H, L, D], q and k normed and rotated."""
        B, L, _ = x.shape
        q, k, v = lin("qkv", self.qkv, x).view(B, L, 3, self.heads, self.head_dim).unbind(2)
        q, k = apply_rope(self.q_norm(q), self.k_norm(k), freqs)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, ops=nn, **kw):
        super().__init__()
        self.w1 = ops.Linear(dim, hidden, bias=False, **kw)
        self.w2 = ops.Linear(hidden, dim, bias=False, **kw)
        self.w3 = ops.Linear(dim, hidden, bias=False, **kw)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def plain_linear(name: str, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return linear(x)


# lin(name, linear, x): how a block applies its linear `name` (qkv, out, w1, w2, w3) to tokens x.
# Mask control passes one that adds adapter deltas on token ranges; everyone else gets plain_linear.
LinearFn = Callable[[str, nn.Module, torch.Tensor], torch.Tensor]


def gate(h, g):
    return h if g is None else g.unsqueeze(1).tanh() * h


class Block(nn.Module):
    """Sandwich-norm block: norm -> modulate -> op -> norm -> tanh-gated residual.

    Mask control reuses it rather than keeping a second copy of the maths: c None runs it
    unmodulated (scale 0, gate 1), as its static stream does; ext_kv (K, V) of tokens computed
    elsewhere are prepended to the keys (the cached static stream); return_kv also returns this
    block's (k, v) (to cache them); kv_only stops right after the projection, for a stream whose
    outputs are never read."""

    def __init__(self, cfg: OboroConfig, heads: int, ops=nn, **kw):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.norm_eps
        self.attn = Attention(d, heads, cfg.qk_norm, eps, ops=ops, **kw)
        self.mlp = SwiGLU(d, cfg.mlp_hidden, ops=ops, **kw)
        self.attn_norm1 = ops.RMSNorm(d, eps=eps, elementwise_affine=True, **kw)
        self.attn_norm2 = ops.RMSNorm(d, eps=eps, elementwise_affine=True, **kw)
        self.mlp_norm1 = ops.RMSNorm(d, eps=eps, elementwise_affine=True, **kw)
        self.mlp_norm2 = ops.RMSNorm(d, eps=eps, elementwise_affine=True, **kw)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(cfg.adaln_dim, 4 * d, bias=True, **kw))

    def forward(self, x, c, mask, freqs, attention: AttentionFn, lin: LinearFn = plain_linear,
                ext_kv=None, return_kv: bool = False, kv_only: bool = False):
        scale_attn, gate_attn, scale_mlp, gate_mlp = (None,) * 4 if c is None else self.adaLN_modulation(c).chunk(4, dim=1)
        q, k, v = self.attn.project(modulate(self.attn_norm1(x), scale_attn), freqs, lin)
        if kv_only:
            return x, (k, v)
        kk, vv = (k, v) if ext_kv is None else (torch.cat([ext_kv[0].to(k), k], 2), torch.cat([ext_kv[1].to(v), v], 2))
        x = x + gate(self.attn_norm2(lin("out", self.attn.out, attention(q, kk, vv, mask))), gate_attn)
        h = modulate(self.mlp_norm1(x), scale_mlp)
        h = lin("w2", self.mlp.w2, F.silu(lin("w1", self.mlp.w1, h)) * lin("w3", self.mlp.w3, h))
        x = x + gate(self.mlp_norm2(h), gate_mlp)
        return (x, (k, v)) if return_kv else x


class FinalLayer(nn.Module):
    def __init__(self, cfg: OboroConfig, ops=nn, **kw):
        super().__init__()
        d = cfg.hidden_size
        self.norm = ops.LayerNorm(d, elementwise_affine=False, eps=1e-6, **kw)
        self.linear = ops.Linear(d, cfg.patch_size ** 2 * cfg.in_channels, bias=True, **kw)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(cfg.adaln_dim, d, bias=True, **kw))

    def forward(self, x, c):
        return self.linear(modulate(self.norm(x), self.adaLN_modulation(c)))


class MMHDiT(nn.Module):
    def __init__(self, config: OboroConfig, operations=nn, attention: AttentionFn = sdpa_attention,
                 device=None, dtype=None):
        super().__init__()
        cfg = self.config = config
        kw = dict(device=device, dtype=dtype)
        ops = operations
        self.attention = attention
        self.gradient_checkpointing = False
        d, p = cfg.hidden_size, cfg.patch_size
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim, ops=ops, **kw)
        self.text_embedder = nn.Sequential(ops.RMSNorm(cfg.text_dim, eps=cfg.norm_eps, elementwise_affine=True, **kw),
                                           ops.Linear(cfg.text_dim, d, bias=True, **kw))
        # Always prepended, so an empty prompt still gives the image something to attend to.
        self.bos_token = nn.Parameter(torch.zeros(1, d, **kw))
        self.x_embedder = ops.Linear(cfg.in_channels * p * p, d, bias=True, **kw)
        self.blocks = nn.ModuleList([Block(cfg, h, ops=ops, **kw) for h in cfg.heads])
        self.final_layer = FinalLayer(cfg, ops=ops, **kw)

    def initialize_weights(self, generator: torch.Generator | None = None) -> "MMHDiT":
        """Training-from-scratch init: Xavier linears, zeroed gates and output (DiT recipe)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.bos_token, std=0.02, generator=generator)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[1].weight)
            nn.init.zeros_(blk.adaLN_modulation[1].bias)
        for m in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        return self

    def position_ids(self, n_text: int, h: int, w: int, device) -> torch.Tensor:
        """[n_text + h*w, 3] ids. Text tokens (BOS first) count 1.. on axis 0; image tokens sit at
        axis 0 = 0 with their row/col. Nothing depends on padded text length, so padding a prompt
        never moves the image tokens' rotations (batched == one by one)."""
        text = torch.zeros(n_text, 3, device=device)
        text[:, 0] = torch.arange(1, n_text + 1, device=device)
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        img = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
        return torch.cat([text, img], dim=0)

    # -- pieces, shared with mask control (oboro_model/mask_control.py) --
    def embed_text(self, text: torch.Tensor, B: int, dtype) -> torch.Tensor:
        """[BOS; text] tokens [B, 1 + L, hidden]."""
        txt = self.text_embedder(text.to(dtype))
        return torch.cat([self.bos_token.to(device=txt.device, dtype=dtype).expand(B, 1, -1), txt], dim=1)

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.x_embedder(F.pixel_unshuffle(x, self.config.patch_size).flatten(2).transpose(1, 2))

    def unpatchify(self, tokens: torch.Tensor, C: int, h: int, w: int) -> torch.Tensor:
        p = self.config.patch_size
        return F.pixel_shuffle(tokens.transpose(1, 2).reshape(tokens.shape[0], C * p * p, h, w), p)

    def rope(self, ids: torch.Tensor) -> dict:
        """RoPE tables per head dim (the schedule has a few distinct ones)."""
        cfg = self.config
        return {hd: rope_freqs(ids, cfg.rope_dims(hd), cfg.rope_theta) for hd in set(cfg.head_dims)}

    def key_bias(self, text_mask: Optional[torch.Tensor], n_img: int, dtype, device) -> Optional[torch.Tensor]:
        """Additive [B, 1, 1, 1 + L + n_img] hiding padded text keys, or None without padding. Eager
        skips an all-ones mask (flash kernels take no mask); a compiled graph always builds it, so
        there is no data-dependent branch to break the graph on."""
        if text_mask is None or (not torch.compiler.is_compiling() and bool(text_mask.all())):
            return None
        B = text_mask.shape[0]
        keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=device), text_mask.to(device).bool(),
                          torch.ones(B, n_img, dtype=torch.bool, device=device)], dim=1)
        return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))[:, None, None, :]

    # -- the seam: ComfyUI's subclass overrides these two; the pure model ignores `options` --
    def attention_for(self, options: Optional[dict]) -> AttentionFn:
        return self.attention

    def run_block(self, i: int, x, c, mask, freqs, attention: AttentionFn, n_txt: int, options: Optional[dict],
                  **kw):
        """The one place a block runs. x is [text tokens (n_txt); the rest (image, then mask tokens
        under mask control)]; kw go to Block.forward (lin, ext_kv, return_kv, kv_only)."""
        blk = self.blocks[i]
        if self.gradient_checkpointing and self.training:
            return checkpoint(blk, x, c, mask, freqs, attention, use_reentrant=False, **kw)
        return blk(x, c, mask, freqs, attention, **kw)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                text_mask: Optional[torch.Tensor] = None, options: Optional[dict] = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] in [0, 1] (1 = data), text [B, L, text_dim], text_mask [B, L]
        (1 = real token); options: an opaque per-call dict for the seam above (ComfyUI's
        transformer_options). Returns the velocity [B, C, H, W]."""
        cfg, p = self.config, self.config.patch_size
        B, C, H, W = x.shape
        if C != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} input channels, got {C}")
        if H % p or W % p:
            raise ValueError(f"height and width must be multiples of patch_size {p}, got {H}x{W}")
        dtype, h, w = x.dtype, H // p, W // p
        c = self.t_embedder(t.expand(B) if t.ndim == 0 else t, dtype)
        txt = self.embed_text(text, B, dtype)
        n_txt = txt.shape[1]
        tokens = torch.cat([txt, self.embed_image(x)], dim=1)
        mask = self.key_bias(text_mask, h * w, dtype, x.device)
        freqs = self.rope(self.position_ids(n_txt, h, w, x.device))
        attention = self.attention_for(options)
        for i, blk in enumerate(self.blocks):
            tokens = self.run_block(i, tokens, c, mask, freqs[blk.attn.head_dim], attention, n_txt, options)
        return self.unpatchify(self.final_layer(tokens[:, n_txt:], c), C, h, w)
