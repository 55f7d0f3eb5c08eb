"""Mask + text collaborative control for a frozen MMH-DiT (after MDiTFace, arXiv 2511.12631).

Mask tokens, a third stream: a label map -> one token per image token, with the same RoPE ids as
the image token it covers (0, row, col). Mask tokens use adapter copies of the image stream's
weights, base Linear + LoRA (rank 8) on attn.qkv/out and SwiGLU w1/w2/w3, so they evolve through
the blocks as in MDiTFace (norm weights shared; the last block only needs qkv). Own LoRA, not
peft: peft patches a Linear for all tokens, here one Linear serves text/image plain and mask
adapted. Trainable: mask embedder + LoRAs; the base is frozen in place (requires_grad_(False)).
The block maths is the base's own model.Block: the LoRAs enter as a per-token-range linear
(`_lin`), the cached static stream as Block's ext_kv, and every image-stream block goes through
the base's run_block, so block patches (ComfyUI's patches_replace) apply under mask control too.

Mask embedding "onehot_patch" (the only one built, instead of MDiTFace's VAE pass): one-hot labels
averaged over each latent pixel (label area fractions), pixel-unshuffled by patch_size like the
latent, one Linear. Measured at 1024^2: 0.96 GFLOP (0.2 s on one CPU core with the one-hot) vs
4.4 TFLOP for a FLUX VAE encoder (flop counter; 6 s on that core already at 256^2), done once per
run either way; and it is exact and permutation-free (no colour code squeezed through a VAE
never trained on flat label maps) while keeping sub-token detail at latent resolution. Accepted
silently: maps at the latent size or latent size * vae_scale (pixel space); other sizes are
nearest-resized to pixel space with a logging warning naming both sizes (we resize, never
reject); labels outside 0..num_labels-1 raise, naming the max/min found.

Decoupled (cfg.decoupled, default): the static path [BOS; text; mask] runs through every block
WITHOUT timestep modulation (scale 0, gate 1: plain sandwich norms; or with cfg.static_t the
base's modulation at that fixed t), text with base weights and mask with the adapters, attending
jointly (mask <-> text perception stays). Its per-block post-RoPE K, V are computed once
(`precompute_static`; 2 * depth * L_static * hidden values per sample) and cached; per step only
image tokens run, t-modulated, attending to [cached K, V; image K, V]. This CHANGES the text
pathway vs the base (there text is t-modulated and sees the image): a decoupled model is not the
base even with no mask. Holistic tri-stream (decoupled=False, the benchmark's reference): [BOS;
text; image; mask] all t-modulated and recomputed jointly each step; with mask None (and no
image LoRA) it runs the base's exact operations (== base bitwise); with the mask dropped or
strength 0, equal up to float rounding.

Image-stream LoRA (cfg.image_rank > 0, off by default here, 16 in OboroTrainMaskAdapter): LoRAs
on the image tokens' qkv/out/w1/w2/w3 too (never on text tokens, so the static path is as above).
MDiTFace fine-tunes its whole DiT with LoRA; on the demo a frozen image stream could not draw the
mask's outline (demo/mask_eval.py, README).

`strength` s scales the attention weight every query gives mask keys (logit bias log s): 1 = as
trained, 0 = mask off, > 1 amplifies. Condition dropout (cfg.text_dropout, cfg.mask_dropout:
p = 0.1 each, independent; drawn by the training engine, TrainConfig caption_dropout and
mask_dropout) drops a sample's text or mask (mask_keep False: keys -> -inf). A dropped text is no
text tokens by default (cfg.dropped_text "no_tokens"; the engine without empty_text), and then an
empty prompt at sampling (T5(""), EOS alone) is read as no tokens too, so ComfyUI's empty prompt
reaches the trained mask-only path; "empty_prompt" adapters were trained on T5("") as given.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .atomic import save_safetensors
from .model import MMHDiT, plain_linear

log = logging.getLogger(__name__)
META_KEY, BASE_CONFIG_KEY, FORMAT_KEY = "oboro_mask_adapter", "oboro_base_config", "oboro_mask_adapter_format"
SHAPE_FIELDS = ("hidden_size", "depth", "heads", "patch_size", "mlp_hidden")
TARGETS = ("qkv", "out", "w1", "w2", "w3")
# What text-dropout training fed the adapter for "no text", hence what an empty prompt becomes:
DROPPED_TEXT = {
    # no text tokens at all (the static path is [BOS; mask]); at sampling, a row whose text has at
    # most one valid token, i.e. T5("") = EOS alone (T5 ends every prompt with EOS), is read as
    # that. On the demo it is what made mask-only follow the mask (README, mask evaluation).
    "no_tokens",
    # the encoded empty prompt T5(""), used as given.
    "empty_prompt",
}


@dataclass(frozen=True)
class MaskAdapterConfig:
    num_labels: int = 19              # CelebAMask-HQ face parsing; 2 for a single-region MASK
    rank: int = 8
    alpha: Optional[float] = None     # None -> rank (LoRA scale 1)
    mask_embed: str = "onehot_patch"
    vae_scale: int = 8                # pixel size / latent size of the VAE (FLUX: 8)
    text_dropout: float = 0.1
    mask_dropout: float = 0.1
    decoupled: bool = True
    static_t: Optional[float] = None  # None: unmodulated static path; a t: base modulation at that t
    image_rank: int = 0               # > 0: LoRA of that rank on the image tokens' linears too
    dropped_text: str = "no_tokens"   # what a dropped text was in training: see DROPPED_TEXT

    def __post_init__(self):
        if self.num_labels < 2 or self.rank < 1 or self.vae_scale < 1 or self.image_rank < 0:
            raise ValueError(f"need num_labels >= 2, rank >= 1, vae_scale >= 1, image_rank >= 0; got {self}")
        if self.mask_embed != "onehot_patch":
            raise ValueError(f"mask_embed {self.mask_embed!r} is not built; only 'onehot_patch' (a VAE pass "
                             f"costs TFLOPs per image for no gain on label maps)")
        for p in (self.text_dropout, self.mask_dropout):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"dropout probabilities must be in [0, 1), got {p}")
        if self.dropped_text not in DROPPED_TEXT:
            raise ValueError(f"dropped_text must be one of {sorted(DROPPED_TEXT)}, got {self.dropped_text!r}")
        if self.static_t is not None and not 0.0 <= self.static_t <= 1.0:
            raise ValueError(f"static_t must be None or in [0, 1], got {self.static_t}")

    @property
    def scale(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha) / self.rank

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "MaskAdapterConfig":
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown MaskAdapterConfig fields: {unknown}")
        return cls(**{"dropped_text": "empty_prompt", **d})  # files from before the field: as they were trained


# --- label maps ---

def palette_to_labels(rgb, palette) -> torch.Tensor:
    """Colour-coded map [..., 3] (uint8, or float in [0, 1] like a ComfyUI IMAGE) -> labels [...]
    (long), label i = palette[i]. Colours outside the palette raise, naming them with counts."""
    pal = [tuple(int(c) for c in col) for col in palette]
    if not pal or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in pal):
        raise ValueError(f"palette must be a non-empty list of (r, g, b) in 0..255, got {palette!r}")
    if len(set(pal)) != len(pal):
        raise ValueError(f"palette lists a colour twice: {sorted(c for c in set(pal) if pal.count(c) > 1)}")
    t = torch.as_tensor(rgb)
    if t.shape[-1] != 3:
        raise ValueError(f"expected an RGB map [..., 3], got shape {tuple(t.shape)}")
    t = (t.float().clamp(0, 1) * 255).round().long() if t.is_floating_point() else t.long()
    codes = (t[..., 0] << 16) | (t[..., 1] << 8) | t[..., 2]
    srt, order = torch.tensor([(r << 16) | (g << 8) | b for r, g, b in pal]).sort()
    idx = torch.searchsorted(srt, codes).clamp_(max=len(pal) - 1)
    ok = srt[idx] == codes
    if not bool(ok.all()):
        colours, counts = codes[~ok].unique(return_counts=True)
        top = counts.argsort(descending=True)[:5].tolist()
        named = ", ".join(f"{(c >> 16, (c >> 8) & 255, c & 255)} x {n}"
                          for c, n in ((int(colours[i]), int(counts[i])) for i in top))
        raise ValueError(f"{len(colours)} colour(s) not in the palette ({int(counts.sum())} pixels): {named}"
                         f"{', ...' if len(colours) > 5 else ''}")
    return order[idx]


def region_mask_to_labels(mask, threshold: float = 0.5) -> torch.Tensor:
    """ComfyUI MASK [H, W] or [B, H, W] (float, 1 = region) -> labels 0/1 (use num_labels=2)."""
    m = torch.as_tensor(mask)
    if m.ndim not in (2, 3):
        raise ValueError(f"expected a MASK [H, W] or [B, H, W], got shape {tuple(m.shape)}")
    return (m.float() > threshold).long()


def labels_to_grid(labels: torch.Tensor, num_labels: int, size: tuple[int, int], vae_scale: int,
                   batch: int) -> torch.Tensor:
    """labels [B|1, h, w] or [h, w] (int) -> label area fractions [batch, num_labels, H, W] at the
    latent size (H, W); see the module docstring for the accepted sizes and the resize notice."""
    lab = torch.as_tensor(labels)
    if lab.dtype == torch.bool:
        lab = lab.long()
    if lab.is_floating_point() or lab.is_complex():
        raise ValueError(f"mask labels must be integers, got {lab.dtype} (for a ComfyUI MASK use "
                         f"region_mask_to_labels, for a colour map palette_to_labels)")
    lab = lab[None] if lab.ndim == 2 else lab
    if lab.ndim != 3 or lab.shape[0] not in (1, batch):
        raise ValueError(f"mask labels must be [H, W] or [B, H, W] with B 1 or {batch}, got {tuple(lab.shape)}")
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0 or hi >= num_labels:
        raise ValueError(f"mask labels must be in 0..{num_labels - 1} (num_labels={num_labels}); "
                         f"found max label {hi}, min label {lo}")
    H, W = size
    pix = (H * vae_scale, W * vae_scale)
    if tuple(lab.shape[1:]) not in ((H, W), pix):
        log.warning("mask of size %dx%d does not match the latent grid %dx%d or the image size %dx%d; "
                    "resized (nearest) to %dx%d", lab.shape[1], lab.shape[2], H, W, *pix, *pix)
        lab = F.interpolate(lab[:, None].float(), size=pix, mode="nearest")[:, 0].long()
    onehot = torch.zeros(lab.shape[0], num_labels, *lab.shape[1:], device=lab.device).scatter_(1, lab[:, None], 1.0)
    if tuple(lab.shape[1:]) != (H, W):
        onehot = F.avg_pool2d(onehot, vae_scale)
    return onehot.expand(batch, -1, -1, -1)


# --- the model ---

class LoRA(nn.Module):
    def __init__(self, lin: nn.Linear, rank: int, scale: float, device=None):
        super().__init__()
        self.scale = scale
        self.down = nn.Parameter(torch.empty(rank, lin.in_features, device=device))
        self.up = nn.Parameter(torch.zeros(lin.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # peft's default; up = 0: starts as the base

    def forward(self, x):
        y = F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))
        return y if self.scale == 1.0 else y * self.scale


@dataclass
class StaticCache:
    """Per-block (K, V) [B, H, L_static, D] of [BOS; text; mask] and their key bias [B, 1, 1, L]."""
    kv: list
    bias: Optional[torch.Tensor]
    batch: int
    size: Optional[tuple]
    strength: float


def empty_prompts_dropped(text: torch.Tensor, text_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """text_mask with every row of at most one valid token (T5's empty prompt, EOS alone) masked
    out entirely, so such a row attends to no text, as a "no_tokens" adapter was trained."""
    valid = text_mask.bool() if text_mask is not None else torch.ones(text.shape[:2], dtype=torch.bool,
                                                                       device=text.device)
    empty = valid.sum(-1) <= 1
    if not bool(empty.any()):
        return text_mask
    return valid & ~empty[:, None].to(valid.device)


class MaskControlDiT(nn.Module):
    def __init__(self, base: MMHDiT, cfg: MaskAdapterConfig = MaskAdapterConfig(), strength: float = 1.0):
        super().__init__()
        self.base, self.cfg, self.strength = base.requires_grad_(False), cfg, strength
        self.decoupled = cfg.decoupled
        bc, dev = base.config, next(base.parameters()).device
        self.mask_embedder = nn.Linear(cfg.num_labels * bc.patch_size ** 2, bc.hidden_size, device=dev)
        # The last block's mask-token outputs are never read (only its K, V are): qkv only there.
        self.adapters = nn.ModuleList(nn.ModuleDict({
            n: LoRA(blk.attn.get_submodule(n) if n in ("qkv", "out") else blk.mlp.get_submodule(n),
                    cfg.rank, cfg.scale, dev) for n in (TARGETS if i < bc.depth - 1 else TARGETS[:1])})
            for i, blk in enumerate(base.blocks))
        # Optional image-stream LoRA (MDiTFace fine-tunes the whole DiT with LoRA): a frozen base
        # that never learnt to follow a layout may lack the directions to draw a mask's outline.
        self.image_adapters = None if not cfg.image_rank else nn.ModuleList(nn.ModuleDict({
            n: LoRA(blk.attn.get_submodule(n) if n in ("qkv", "out") else blk.mlp.get_submodule(n),
                    cfg.image_rank, 1.0, dev) for n in TARGETS}) for blk in base.blocks)

    def trainable_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    def adapter_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def load_adapter_state_dict(self, sd: dict, source: str) -> None:
        """Strict over the adapter's own weights (the base is not in sd); errors name `source`."""
        dev = self.mask_embedder.weight.device
        try:
            missing, unexpected = self.load_state_dict({k: v.to(dev) for k, v in sd.items()}, strict=False)
            missing = [k for k in missing if not k.startswith("base.")]
            if missing or unexpected:
                raise RuntimeError(f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        except RuntimeError as e:
            raise ValueError(f"{source}: adapter weights do not fit the model: {e}") from None

    def adapter_to(self, device) -> None:
        """Move only the adapter's weights (the base belongs to whoever manages it)."""
        for name, mod in self.named_children():
            if name != "base":
                mod.to(device)

    # -- pieces (the block maths is model.Block's; only the adapters live here) --
    def _lin(self, i: int, n_mask: int, img: tuple[int, int]):
        """Block i's LinearFn: the base linear over all tokens, + the mask LoRA on the last n_mask
        tokens, + the image LoRA (if any) on tokens img = (start, end)."""
        mask_ad = self.adapters[i]
        image_ad = self.image_adapters[i] if self.image_adapters is not None else None
        a, b = img if image_ad is not None else (0, 0)
        if not n_mask and a == b:
            return plain_linear

        def lin(name, linear, x):
            y, L = linear(x), x.shape[1]
            if not n_mask and (a, b) == (0, L):  # the cached per-step stream: image tokens only, no copies
                d = image_ad[name](x)
                return y + d if torch.is_grad_enabled() else y.add_(d)
            parts = [y[:, :a], y[:, a:b] + image_ad[name](x[:, a:b]) if b > a else y[:, a:b], y[:, b:L - n_mask]]
            if n_mask:  # the last block has a mask qkv LoRA only: its mask-token outputs are never read
                parts.append(y[:, L - n_mask:] + mask_ad[name](x[:, L - n_mask:]) if name in mask_ad
                             else y[:, L - n_mask:])
            return torch.cat(parts, dim=1)
        return lin

    def _text_tokens(self, text, text_mask, B, dtype):
        text = text.expand(B, -1, -1) if text.shape[0] == 1 else text
        if text_mask is not None and text_mask.shape[0] == 1:
            text_mask = text_mask.expand(B, -1)
        if self.cfg.dropped_text == "no_tokens":
            text_mask = empty_prompts_dropped(text, text_mask)
        return self.base.embed_text(text, B, dtype), text_mask

    def _mask_tokens(self, labels, size, B, dtype, device):
        p = self.base.config.patch_size
        frac = labels_to_grid(labels.to(device), self.cfg.num_labels, size, self.cfg.vae_scale, B)
        feats = F.pixel_unshuffle(frac, p).flatten(2).transpose(1, 2).to(dtype)
        return F.linear(feats, self.mask_embedder.weight.to(dtype), self.mask_embedder.bias.to(dtype))

    def _key_bias(self, B, text_mask, n_txt, n_img, n_mask, mask_keep, device, dtype):
        """Additive [B, 1, 1, L] over keys [BOS; text; image; mask], or None when all zero."""
        if not self.strength >= 0 or math.isinf(self.strength):
            raise ValueError(f"strength must be a finite number >= 0, got {self.strength}")
        bias = torch.zeros(B, n_txt + n_img + n_mask, device=device)
        if text_mask is not None:
            bias[:, 1:n_txt].masked_fill_(~text_mask.to(device).bool(), float("-inf"))
        if n_mask:
            bias[:, n_txt + n_img:] = math.log(self.strength) if self.strength > 0 else float("-inf")
            if mask_keep is not None:
                bias[:, n_txt + n_img:].masked_fill_(~mask_keep.to(device).bool()[:, None], float("-inf"))
        return None if not bool(bias.any()) else bias.to(dtype)[:, None, None, :]

    # -- API --
    def precompute_static(self, text, text_mask=None, mask_labels=None, batch=None, size=None, mask_keep=None,
                          dtype=None, options=None) -> StaticCache:
        """Per-block K, V of the static [BOS; text; mask] tokens, for forward(static_cache=...).
        size: the latent (H, W) the mask is laid on (needed with a mask); batch: expand 1 -> B.
        This stream runs the base's blocks unpatched (block patches act on the image stream)."""
        base, B = self.base, batch or text.shape[0]
        dtype = dtype or (text.dtype if text.is_floating_point() else torch.float32)
        txt, text_mask = self._text_tokens(text, text_mask, B, dtype)
        n_txt, n_mask, ids = txt.shape[1], 0, base.position_ids(txt.shape[1], 0, 0, txt.device)
        if mask_labels is not None:
            if size is None:
                raise ValueError("precompute_static with a mask needs size=(latent H, W) of the image")
            p = base.config.patch_size
            msk = self._mask_tokens(mask_labels, size, B, dtype, txt.device)
            n_mask, ids = msk.shape[1], base.position_ids(n_txt, size[0] // p, size[1] // p, txt.device)
            txt = torch.cat([txt, msk], dim=1)
        bias = self._key_bias(B, text_mask, n_txt, 0, n_mask, mask_keep, txt.device, dtype)
        c = None if self.cfg.static_t is None else base.t_embedder(
            torch.full((B,), self.cfg.static_t, device=txt.device), dtype)
        freqs, attention, kv, last = base.rope(ids), base.attention_for(options), [], len(base.blocks) - 1
        for i, blk in enumerate(base.blocks):
            txt, kv_i = MMHDiT.run_block(base, i, txt, c, bias, freqs[blk.attn.head_dim], attention, n_txt, options,
                                         lin=self._lin(i, n_mask, (0, 0)), return_kv=True, kv_only=i == last)
            kv.append(kv_i)
        return StaticCache(kv, bias, B, tuple(size) if n_mask else None, self.strength)

    def forward(self, x, t, text, text_mask=None, mask_labels=None, static_cache: Optional[StaticCache] = None,
                mask_keep=None, options=None):
        """x [B, C, H, W] latent, t [B] (1 = data), text [B|1, L, text_dim], text_mask [B|1, L],
        mask_labels [B|1, h, w] int (see labels_to_grid) or None, mask_keep [B] bool (dropout).
        Decoupled: static_cache from precompute_static (then text/mask args are not read), else the
        static path is computed here, i.e. every step. Holistic: static_cache must be None.
        options: as MMHDiT.forward's (ComfyUI's transformer_options: block patches apply)."""
        base, p = self.base, self.base.config.patch_size
        B, C, H, W = x.shape
        if C != base.config.in_channels or H % p or W % p:
            raise ValueError(f"expected {base.config.in_channels} channels and H, W multiples of {p}, "
                             f"got {tuple(x.shape)}")
        if static_cache is not None and not self.decoupled:
            raise ValueError("static_cache is for the decoupled model; this one has decoupled=False")
        dtype, h, w = x.dtype, H // p, W // p
        c = base.t_embedder(t.expand(B) if t.ndim == 0 else t, dtype)
        img, attention = base.embed_image(x), base.attention_for(options)
        if not self.decoupled:
            txt, text_mask = self._text_tokens(text, text_mask, B, dtype)
            n_txt, n_mask, parts = txt.shape[1], 0, [txt, img]
            ids = base.position_ids(n_txt, h, w, x.device)
            if mask_labels is not None:
                parts.append(self._mask_tokens(mask_labels, (H, W), B, dtype, x.device))
                n_mask, ids = h * w, torch.cat([ids, ids[n_txt:]])
            s, freqs = torch.cat(parts, dim=1), base.rope(ids)
            bias = self._key_bias(B, text_mask, n_txt, h * w, n_mask, mask_keep, x.device, dtype)
            for i, blk in enumerate(base.blocks):
                s = base.run_block(i, s, c, bias, freqs[blk.attn.head_dim], attention, n_txt, options,
                                   lin=self._lin(i, n_mask, (n_txt, n_txt + h * w)))
            img = s[:, n_txt:n_txt + h * w]
        else:
            cache = static_cache
            if cache is None:
                cache = self.precompute_static(text, text_mask, mask_labels, B, (H, W), mask_keep, dtype, options)
            elif cache.batch != B or (cache.size is not None and cache.size != (H, W)) \
                    or cache.strength != self.strength:
                raise ValueError(f"static cache built for batch {cache.batch}, latent {cache.size}, strength "
                                 f"{cache.strength}; called with {B}, {(H, W)}, {self.strength}: rebuild it")
            bias = cache.bias
            if bias is not None:
                bias = torch.cat([bias.to(dtype), bias.new_zeros(B, 1, 1, h * w).to(dtype)], dim=-1)
            freqs = base.rope(base.position_ids(0, h, w, x.device))
            for i, blk in enumerate(base.blocks):
                img = base.run_block(i, img, c, bias, freqs[blk.attn.head_dim], attention, 0, options,
                                     lin=self._lin(i, 0, (0, h * w)), ext_kv=cache.kv[i])
        return base.unpatchify(base.final_layer(img, c), C, h, w)


class MaskedLatents(torch.utils.data.Dataset):
    """A latent cache (oboro_model.data.LatentCache) with one label map per item, as the training
    engine takes them: item + "mask_labels" [h, w] (long). bucket_of follows the cache."""

    def __init__(self, cache, masks: list):
        if len(masks) != len(cache):
            raise ValueError(f"{len(masks)} masks for {len(cache)} cached items")
        self.cache, self.masks = cache, masks

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, i):
        return {**self.cache[i], "mask_labels": self.masks[i]}

    def bucket_of(self, i):
        return self.cache.bucket_of(i)


# --- save / load ---

def save_mask_adapter(path, model: MaskControlDiT, metadata: Optional[dict] = None) -> Path:
    """Atomic safetensors of the mask embedder + LoRA weights only; header: the adapter config and
    the base model's config (JSON), plus `metadata` (the training export's)."""
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.adapter_state_dict().items()}
    meta = {**(metadata or {}), META_KEY: model.cfg.to_json(), BASE_CONFIG_KEY: model.base.config.to_json(),
            FORMAT_KEY: "1"}
    return save_safetensors(path, sd, meta)


def read_mask_adapter(path) -> tuple[MaskAdapterConfig, dict, dict]:
    """-> (adapter config, config of the base it was trained on, state dict); errors name the file."""
    from safetensors import safe_open
    if not Path(path).is_file():
        raise FileNotFoundError(f"mask adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, sd = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if META_KEY not in meta:
        raise ValueError(f"{path}: no {META_KEY!r} header; not a mask adapter (save_mask_adapter and "
                         "OboroTrainMaskAdapter write them)")
    return MaskAdapterConfig.from_dict(json.loads(meta[META_KEY])), json.loads(meta.get(BASE_CONFIG_KEY, "{}")), sd


def load_mask_adapter(path, base: MMHDiT, strength: float = 1.0) -> MaskControlDiT:
    """MaskControlDiT over `base` (frozen in place) with the adapter saved in `path`."""
    cfg, trained, sd = read_mask_adapter(path)
    have = json.loads(base.config.to_json())
    diff = [f"{k}: adapter {trained[k]} vs base {have[k]}" for k in SHAPE_FIELDS
            if k in trained and trained[k] != have[k]]
    if diff:
        raise ValueError(f"{path}: mask adapter was trained for a different base model ({'; '.join(diff)})")
    model = MaskControlDiT(base, cfg, strength)
    model.load_adapter_state_dict(sd, str(path))
    return model
