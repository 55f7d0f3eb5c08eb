"""The MMH-DiT as a ComfyUI MODEL: BaseModel/supported-model glue, ops and attention injection.

Sign convention, in this one place. ComfyUI's flow models (ModelType.FLOW, CONST sampling) use
sigma=1 for noise and expect a prediction v with denoised = x - sigma * v. oboro (I-CFM) uses
t=1 for data and predicts u = x1 - x0. With x = sigma*x0 + (1-sigma)*x1 these agree when
    t = 1 - sigma   and   v = -u.
"""
from __future__ import annotations

import functools
import logging
import math

import torch

import comfy.conds
import comfy.latent_formats
import comfy.ldm.common_dit
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models_base
import comfy.utils
from comfy.ldm.modules.attention import optimized_attention

from ..oboro_model import MMHDiT, OboroConfig, read_checkpoint
from ..oboro_model.checkpoint import check_state_dict
from .finite import guard_non_finite

log = logging.getLogger("oboro")

WEIGHT_DTYPES = {
    "default": None,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
# The DiT loader also offers core UNETLoader's "fp8_e4m3fn_fast": fp8 storage plus
# model_options["fp8_optimizations"] (fp8 matmuls where comfy.model_management.supports_fp8_compute;
# elsewhere, CPU included, core silently falls back to casting the weights, and so do we).
DIT_WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn,
                     "fp8_e4m3fn_fast": torch.float8_e4m3fn,
                     **{k: v for k, v in WEIGHT_DTYPES.items() if k not in ("default", "fp8_e4m3fn")}}
FP8_FAST = "fp8_e4m3fn_fast"
# ComfyUI's scaled-fp8 files: a marker tensor whose dtype is the fp8 storage dtype (float32 means
# e4m3fn; two elements mean "no fp8 matmul"), plus per-Linear `scale_weight` (and optionally
# `scale_input`) scalars that comfy.ops.scaled_fp8_ops multiplies back in.
SCALED_FP8_KEY = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")


def comfy_attention(q, k, v, mask=None, transformer_options=None):
    """Our attention contract on top of whatever kernel ComfyUI picked (sdpa, xformers, sage...);
    transformer_options reach it so attention overrides of other packs apply."""
    return optimized_attention(q, k, v, q.shape[1], mask=mask, skip_reshape=True,
                               transformer_options=transformer_options if transformer_options is not None else {})


# A model patch (ModelPatcher.set_model_patch(fn, VELOCITY_PATCH)) that computes the velocity in
# oboro's convention instead of MMHDiT.forward: fn(diffusion_model, x, t, text, text_mask,
# transformer_options) -> u. Mask control is one; it still runs inside the wrapper executor.
VELOCITY_PATCH = "oboro_velocity"


LATENT_GUARD_KEY = "oboro_latent_fit"
CHANNEL_KINDS = {3: "pixel space: the latent is the image itself", 16: "a FLUX VAE latent, 1/8 of the image size",
                 4: "an SD latent such as core Empty Latent Image's, 1/8 of the image size"}
EMPTY_LATENT_CHOICE = {3: "3 (pixel space)", 16: "16 (FLUX VAE)"}  # EmptyOboroLatentImage's channels options


def _channels(c: int) -> str:
    return f"{c} channels ({CHANNEL_KINDS[c]})" if c in CHANNEL_KINDS else f"{c} channels"


def _channels_before_fix(in_channels: int, latent: torch.Tensor):
    """The channel count an all-zero latent had before ComfyUI fitted it to the model, or None.

    comfy.sample.fix_empty_latent_channels (core KSampler, SamplerCustom*, OboroSampler) gives an
    EMPTY latent of another channel count the model's count by narrowing its channels (a view of
    the original tensor) or repeating them (a view of the repeated tensor), keeping its height and
    width. That is right when both formats have the same scale (core's 4-channel Empty Latent Image
    on a FLUX-VAE model) and wrong across scales: a 16-channel latent (1/8 size) on a pixel-space
    model would be sampled as a tiny image. The view's batch stride still spans the channels of
    the tensor it was cut from (nodes run under inference mode, where views keep no _base)."""
    if latent.ndim != 4 or latent.shape[1] != in_channels:
        return None
    h, w = latent.shape[-2:]
    if latent.stride()[1:] != (h * w, w, 1) or latent.stride(0) % (h * w):
        return None
    base = latent.stride(0) // (h * w)
    if base == in_channels or torch.count_nonzero(latent):
        return None
    if in_channels == 3:  # narrowed down from a VAE latent's channels
        return base if base > 3 else None
    # A latent model's count: only a pixel-space latent, repeated up from 3 channels, is of another scale.
    return 3 if base == 3 * math.ceil(in_channels / 3) else None


def latent_fit_error(in_channels: int, latent) -> str | None:
    """Why `latent` cannot be sampled by an oboro model taking `in_channels` channels, or None.
    A latent of the model's scale with other channels is refused unless empty (ComfyUI adapts an
    empty latent's channels); one of another scale (pixel space vs 1/8-size VAE latent) always is,
    empty or not, naming both counts and the size that would come out."""
    if not torch.is_tensor(latent) or latent.is_nested or latent.ndim != 4:
        return None
    c, (h, w) = int(latent.shape[1]), latent.shape[-2:]
    empty = False
    if c == in_channels:
        c = _channels_before_fix(in_channels, latent)
        if c is None:
            return None
        empty = True
    else:
        empty = not bool(torch.count_nonzero(latent))
    same_scale = (c == 3) == (in_channels == 3)
    if empty and same_scale:
        return None
    what = "an empty latent" if empty else "a latent"
    msg = f"{what} with {_channels(c)}, {w}x{h}, does not fit this oboro model, which takes {_channels(in_channels)}"
    if not same_scale and in_channels == 3:
        msg += f": the image would come out {w}x{h} instead of the {8 * w}x{8 * h} that latent stands for"
    elif not same_scale:
        msg += f": sampling would run at {8 * w}x{8 * h}, 64 times the work, instead of {w}x{h}"
    fix = EMPTY_LATENT_CHOICE.get(in_channels)
    msg += (f". Set oboro Empty Latent Image's channels to {fix!r}" if fix else
            f". Give it a {in_channels}-channel latent")
    return msg + (" (and for img2img encode with the VAE the model was trained with: "
                  f"{'pixel_space' if in_channels == 3 else 'the FLUX VAE ae.safetensors'}).")


def oboro_in_channels(model_patcher):
    """The input channels of an oboro MODEL, or None for any other model."""
    net = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    return net.config.in_channels if isinstance(net, MMHDiT) else None


def check_latent(model_patcher, latent) -> None:
    in_channels = oboro_in_channels(model_patcher)
    if in_channels is not None and (err := latent_fit_error(in_channels, latent)):
        raise ValueError(err)


def latent_fit_guard(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """OUTER_SAMPLE wrapper (every sampler node lands here, core KSampler included): the latent as
    the sampler received it, after ComfyUI's empty-latent channel fix."""
    check_latent(executor.class_obj.model_patcher, latent_image)
    return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)


class OboroComfyDiT(MMHDiT):
    """Built by BaseModel as `unet_model(**unet_config, device, operations)`; same state-dict keys
    as MMHDiT, so LoRA key mapping and our checkpoints need no translation.

    Plays by ComfyUI's DiT conventions (comfy/ldm/flux/model.py): forward runs through the
    DIFFUSION_MODEL wrapper executor (EasyCache and other packs' wrappers), transformer_options
    reach attention, and each block sets block_index / total_blocks / block_type ("double") and
    honours patches_replace["dit"][("double_block", i)] (SkipLayerGuidanceDiT and others). A
    block patch receives args {"txt", "img", "vec", "pe", "attn_mask", "transformer_options"}:
    txt the [BOS; text] tokens (none under cached mask control, whose static stream is not patched), img the image tokens (followed
    by mask tokens under holistic mask control), vec the timestep embedding (None on an
    unmodulated stream), pe the block's RoPE table, attn_mask the additive key mask or None; and
    extra {"original_block": f}, f(args) -> {"txt", "img"}. It returns {"txt", "img"}."""

    def __init__(self, oboro_config: dict, image_model=None, device=None, dtype=None, operations=None):
        super().__init__(OboroConfig.from_dict(oboro_config), operations=operations or torch.nn,
                         attention=comfy_attention, device=device, dtype=dtype)
        self.dtype = dtype

    def forward(self, x, timesteps, context, attention_mask=None, transformer_options={}, **kwargs):
        # BaseModel hands us the sampler's own latent when no dtype cast is needed (fp32) and reads
        # it again afterwards (calculate_denoised); core EasyCache's wrapper adds its cached diff
        # into x in place, which then corrupts that read. A latent-sized copy keeps wrappers safe.
        x = x.clone()
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options),
        ).execute(x, timesteps, context, attention_mask, transformer_options, **kwargs)

    def _forward(self, x, timesteps, context, attention_mask=None, transformer_options={}, **kwargs):
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:  # a clear error, not a matmul shape error
            raise ValueError(latent_fit_error(self.config.in_channels, x) if x.ndim == 4 else
                             f"the oboro model takes [batch, {self.config.in_channels}, height, width] latents, "
                             f"got shape {list(x.shape)}")
        h, w = x.shape[-2:]
        p = self.config.patch_size
        x = comfy.ldm.common_dit.pad_to_patch_size(x, (p, p))
        velocity = transformer_options.get("patches", {}).get(VELOCITY_PATCH)
        if velocity:
            u = velocity[-1](self, x, 1.0 - timesteps, context, attention_mask, transformer_options)
        else:
            u = MMHDiT.forward(self, x, 1.0 - timesteps, context, attention_mask, options=transformer_options)
        return -u[..., :h, :w]

    def attention_for(self, options):
        return functools.partial(comfy_attention, transformer_options=options)

    def run_block(self, i, x, c, mask, freqs, attention, n_txt, options, **kw):
        to = options if options is not None else {}
        to["block_index"], to["total_blocks"], to["block_type"] = i, len(self.blocks), "double"
        replace = to.get("patches_replace", {}).get("dit", {}).get(("double_block", i))
        if replace is None:
            return super().run_block(i, x, c, mask, freqs, attention, n_txt, to, **kw)

        def original_block(args):
            n = args["txt"].shape[1]
            out = super(OboroComfyDiT, self).run_block(
                i, torch.cat([args["txt"], args["img"]], dim=1), args["vec"], args.get("attn_mask"), args["pe"],
                self.attention_for(args.get("transformer_options", to)), n, to, **kw)
            return {"txt": out[:, :n], "img": out[:, n:]}

        out = replace({"txt": x[:, :n_txt], "img": x[:, n_txt:], "vec": c, "pe": freqs, "attn_mask": mask,
                       "transformer_options": to}, {"original_block": original_block})
        return torch.cat([out["txt"], out["img"]], dim=1)


class OboroBaseModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=OboroComfyDiT)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:
            # CONDCrossAttn would repeat short prompts to a common length, which breaks the padding
            # mask; CONDRegular only batches equal lengths and runs the rest separately.
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            out["attention_mask"] = comfy.conds.CONDRegular(mask)
        return out


class OboroSupported(comfy.supported_models_base.BASE):
    unet_config = {"image_model": "oboro"}
    unet_extra_config = {}
    # I-CFM with uniform t needs no time shift; ModelSamplingSD3 can add one.
    sampling_settings = {"multiplier": 1.0, "shift": 1.0}
    latent_format = comfy.latent_formats.Flux
    memory_usage_factor = 1.4
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def __init__(self, unet_config):
        super().__init__(unet_config)
        if unet_config["oboro_config"]["in_channels"] == 3:
            self.latent_format = comfy.latent_formats.ChromaRadiance()  # identity pixel-space format

    def get_model(self, state_dict, prefix="", device=None):
        return OboroBaseModel(self, device=device)


def load_oboro_model(path: str, weight_dtype: str = "default", key_map=None) -> comfy.model_patcher.ModelPatcher:
    """Build a ModelPatcher the way comfy.sd.load_diffusion_model_state_dict does for core models
    (scaled-fp8 detection as in comfy.model_detection.model_config_from_unet), except that the
    weights are assigned rather than copied: see assign_weights. The patcher carries the
    non-finite guards of nodes/finite.py (wrappers; clones keep them)."""
    if weight_dtype not in DIT_WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {list(DIT_WEIGHT_DTYPES)}, got {weight_dtype!r}")
    sd, config, _ = read_checkpoint(path, key_map=key_map)
    model_config = OboroSupported({"image_model": "oboro", "oboro_config": config.to_dict()})
    file_dtype = comfy.utils.weight_dtype(sd)
    marker = sd.pop(SCALED_FP8_KEY, None)
    if marker is not None:
        model_config.scaled_fp8 = torch.float8_e4m3fn if marker.dtype == torch.float32 else marker.dtype
        model_config.optimizations["fp8"] = marker.nelement() != 2
        file_dtype = None
    if weight_dtype == FP8_FAST:
        model_config.optimizations["fp8"] = True
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    unet_dtype = DIT_WEIGHT_DTYPES[weight_dtype] or mm.unet_dtype(
        model_params=comfy.utils.calculate_parameters(sd), supported_dtypes=model_config.supported_inference_dtypes,
        weight_dtype=file_dtype)
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    model = model_config.get_model(sd, device=offload_device)
    # Which per-layer scales a scaled-fp8 file carries depends on its maker; the ops default the
    # missing ones to 1 (and ignore scale_input unless fp8 matmuls are on), as core does.
    optional = SCALE_SUFFIXES if marker is not None else ()
    check_state_dict(model.diffusion_model, sd, str(path), optional_suffixes=optional)
    assign_weights(model.diffusion_model, sd)
    log.info("oboro: loaded %s (%d layers, heads %s) as %s%s", path, config.depth, list(config.heads), unet_dtype,
             f", scaled {model_config.scaled_fp8}" if marker is not None else "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    guard_non_finite(patcher)  # a non-finite cfg or model output is an error, not a black image (finite.py)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, LATENT_GUARD_KEY, latent_fit_guard)
    return patcher


def assign_weights(module: torch.nn.Module, sd: dict) -> None:
    """Put the file's tensors into the model without a second copy at peak.

    read_checkpoint's tensors live in the safetensors mmap; core's load_model_weights copies them
    into freshly allocated parameters, so the file pages and the parameters are resident together
    (about 2x the weights). Here a tensor already in the parameter's dtype is taken as is (the
    parameter becomes the mmap-backed tensor, copy-on-write), and one that needs a cast (or another
    device) is converted into its own new tensor once; the empty parameters ComfyUI's ops
    allocated are never written, so they never become resident. Consumes `sd` as
    load_model_weights does."""
    expected = module.state_dict()
    to_load = {}
    for k in list(sd):
        v = sd.pop(k)
        if k in expected:  # cast (and move, when the offload device is a GPU: --highvram/--gpu-only)
            e = expected[k]
            to_load[k] = v if (v.dtype, v.device) == (e.dtype, e.device) else v.to(device=e.device, dtype=e.dtype)
    missing, _ = module.load_state_dict(to_load, strict=False, assign=True)
    if missing:  # only optional scales can be missing here (check_state_dict ran first)
        log.info("oboro: %d optional keys not in the file, defaults kept: %s", len(missing), missing[:4])
