"""oboro's ODE solvers as ComfyUI samplers, a flow-shift scheduler, OboroSampler and the empty latent.

Sign conventions (nodes/comfy_model.py has the model side). ComfyUI samplers see a denoiser
D(x, sigma) (CFG, patches, LoRA, low-VRAM offload and inpaint masks already applied) for the
flow path x = sigma * noise + (1 - sigma) * data, with D = x - sigma * v. oboro integrates
dx/dt = u in t = 1 - sigma (t = 0 noise, t = 1 data), u = -v. Hence, here and only here:

    t = 1 - sigma,    u(x, t) = (D(x, sigma) - x) / sigma,    denoised = x + (1 - t) * u = D.

CFG commutes with this map (D is affine in v for fixed x, sigma), so guiding D as ComfyUI does
equals guiding u. At sigma = 0, D(x, 0) = x carries no velocity, so the step into sigma = 0 must
not evaluate its end point: heun and rk4 end with same-order methods whose stages lie inside the
step (samplers.ode.OPEN_END, `open_end=True`), which keeps their convergence order and matches
oboro.samplers.sample exactly.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..samplers.ode import SOLVERS, sigma_grid, solve
from .comfy_model import check_latent
from .finite import check_inputs, input_errors

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
SIZE_MULTIPLE = 16      # FLUX VAE downsampling 8 x DiT patch 2
CHANNELS = {"16 (FLUX VAE)": 16, "3 (pixel space)": 3}
SOLVER_TIP = ("ODE solver: euler (1 model call per step, the reference), heun / midpoint (2 calls, 2nd "
              "order), rk4 (4 calls, 3 on the last step, 4th order). With CFG each call runs both prompts.")
STEPS_TIP = "Integration steps from noise to data (or from denoise); more steps, closer to the exact ODE path."
MODEL_TIP = "An oboro model (oboro Model Loader), or any flow-matching MODEL (SD3, Flux...)."
SHIFT_TIP = ("SD3-style time shift of this schedule, sigma' = shift*sigma / (1 + (shift-1)*sigma); > 1 spends "
             "more steps near noise. Absolute: a ModelSamplingSD3 patch on the model does not change it.")


def sample_icfm(model, x, sigmas, extra_args=None, callback=None, disable=None, solver="euler"):
    """A k-diffusion-style sampler function (what comfy.samplers.KSAMPLER calls): `model(x, sigma)`
    returns D; `x` is already noised to sigmas[0]. Integrates our ODE on t = 1 - sigmas."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])

    def velocity(x, t):
        sigma = 1.0 - t
        if sigma <= 0:
            raise ValueError(f"sigma {sigma} inside the schedule: a denoiser has no velocity there; "
                             "sigmas must decrease and reach 0 only at the end")
        return (model(x, sigma * s_in, **extra_args) - x) / sigma

    bar = tqdm(total=len(sigmas) - 1, disable=disable)

    def step_callback(i, total, x, denoised):
        bar.update(1)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})

    try:
        return solve(velocity, x, 1.0 - sigmas.detach().to("cpu", torch.float64), solver, step_callback, open_end=True)
    finally:
        bar.close()


def icfm_sampler(solver: str) -> comfy.samplers.KSAMPLER:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
    return comfy.samplers.KSAMPLER(sample_icfm, extra_options={"solver": solver})


def flow_sigmas(steps: int, shift: float, denoise: float) -> torch.Tensor:
    """Our schedule as ComfyUI SIGMAS (float32, CPU); empty for denoise = 0, like BasicScheduler."""
    if denoise <= 0:
        return torch.FloatTensor([])
    return sigma_grid(steps, shift, denoise).float()


def check_flow_model(model, node: str) -> None:
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.CONST):
        raise ValueError(f"{node} needs a flow-matching model (ComfyUI CONST sampling: oboro, SD3, Flux...), "
                         f"got {type(ms).__name__}; use KSampler with a scheduler for this model.")


def nearest_sizes(value: int) -> str:
    lo = value // SIZE_MULTIPLE * SIZE_MULTIPLE
    return " or ".join(str(v) for v in (lo, lo + SIZE_MULTIPLE) if v >= SIZE_MULTIPLE)


class OboroSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroSampler",
            display_name="oboro Sampler (I-CFM ODE)",
            category="oboro",
            description="Samples a flow-matching model by integrating its ODE from noise to data with "
                        "classifier-free guidance, through ComfyUI's model management (LoRA, patches, "
                        "low VRAM, previews). With denoise < 1 it starts part-way from the input latent.",
            inputs=[
                io.Model.Input("model", tooltip=MODEL_TIP),
                io.Conditioning.Input("positive", tooltip="What the image should show (oboro Text Encode)."),
                io.Conditioning.Input("negative", tooltip="What to guide away from; an empty prompt is the usual "
                                                          "choice. Unused at cfg 1."),
                io.Latent.Input("latent_image", tooltip="Where to start: oboro Empty Latent Image (its channels must "
                                                        "match the model: 16 for the FLUX VAE, 3 for pixel space) or "
                                                        "an encoded image with denoise < 1."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed; the same seed gives KSampler the same noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip=STEPS_TIP),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale: u = u_neg + cfg * (u_pos - u_neg); 1 disables it."),
                io.Combo.Input("solver", options=list(SOLVERS), default="euler", tooltip=SOLVER_TIP),
                io.Float.Input("shift", default=1.0, min=0.01, max=100.0, step=0.01, tooltip=SHIFT_TIP),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the path to run: 1 from pure noise, lower keeps more of the "
                                       "input latent (starts at t = 1 - denoise); 0 returns it unchanged."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, cfg=5.0, shift=1.0, denoise=1.0, solver="euler"):
        """NaN passes ComfyUI's min/max check (comparisons are False) and V3 combos are not checked
        at all: finite and in range / one of the options, checked here (this replaces core's range
        check for exactly these names)."""
        return input_errors(cls, cfg=cfg, shift=shift, denoise=denoise, solver=solver) or True

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, solver, shift,
                denoise) -> io.NodeOutput:
        check_inputs(cls, steps=steps, cfg=cfg, shift=shift, denoise=denoise, solver=solver)  # linked values too
        latent = latent_image
        check_latent(model, latent["samples"])  # before ComfyUI adapts an empty latent's channels
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        out = latent.copy()
        if denoise <= 0:
            out["samples"] = samples
            return io.NodeOutput(out)
        check_flow_model(model, "OboroSampler")
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        callback = latent_preview.prepare_callback(model, steps)
        out["samples"] = comfy.sample.sample_custom(
            model, noise, cfg, icfm_sampler(solver), flow_sigmas(steps, shift, denoise), positive, negative,
            samples, noise_mask=latent.get("noise_mask"), callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        return io.NodeOutput(out)


class OboroFlowScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroFlowScheduler",
            display_name="oboro Flow Scheduler",
            category="oboro",
            description="OboroSampler's schedule as SIGMAS for SamplerCustomAdvanced: sigma = 1 - t uniform in "
                        "the unshifted time, from denoise to 0.",
            inputs=[
                io.Model.Input("model", tooltip="The model to schedule for (a flow-matching MODEL)."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip=STEPS_TIP),
                io.Float.Input("shift", default=1.0, min=0.01, max=100.0, step=0.01, tooltip=SHIFT_TIP),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the path: the sigmas run from denoise to 0 (1: from pure noise)."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def validate_inputs(cls, shift=1.0, denoise=1.0):
        return input_errors(cls, shift=shift, denoise=denoise) or True

    @classmethod
    def execute(cls, model, steps, shift, denoise) -> io.NodeOutput:
        check_inputs(cls, steps=steps, shift=shift, denoise=denoise)
        check_flow_model(model, "OboroFlowScheduler")
        return io.NodeOutput(flow_sigmas(steps, shift, denoise))


class SamplerOboroICFM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamplerOboroICFM",
            display_name="oboro I-CFM Sampler",
            category="oboro/sampling",
            description="oboro's ODE solvers as a SAMPLER for SamplerCustomAdvanced (any sigmas; deterministic).",
            inputs=[io.Combo.Input("solver", options=list(SOLVERS), default="euler", tooltip=SOLVER_TIP)],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def validate_inputs(cls, solver="euler"):
        return input_errors(cls, solver=solver) or True

    @classmethod
    def execute(cls, solver) -> io.NodeOutput:
        check_inputs(cls, solver=solver)
        return io.NodeOutput(icfm_sampler(solver))


class EmptyOboroLatentImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmptyOboroLatentImage",
            display_name="oboro Empty Latent Image",
            category="oboro",
            description="An empty latent for oboro: 16 channels at 1/8 size (FLUX VAE), or 3 channels at full "
                        "size for pixel-space models. Width and height must be multiples of 16.",
            inputs=[
                io.Int.Input("width", default=416, min=SIZE_MULTIPLE, max=MAX_RESOLUTION, step=SIZE_MULTIPLE,
                             tooltip="Image width in pixels, a multiple of 16 (the latent is 1/8 of it with "
                                     "16 channels, the full width with 3)."),
                io.Int.Input("height", default=736, min=SIZE_MULTIPLE, max=MAX_RESOLUTION, step=SIZE_MULTIPLE,
                             tooltip="Image height in pixels, a multiple of 16."),
                io.Int.Input("batch_size", default=1, min=1, max=4096,
                             tooltip="Images sampled at once (each with its own noise from the one seed)."),
                io.Combo.Input("channels", options=list(CHANNELS), default="16 (FLUX VAE)",
                               tooltip="Must match the model: 16 for a FLUX-VAE model (decode with the FLUX VAE), "
                                       "3 for a pixel-space model such as the offline demo's (VAE pixel_space)."),
            ],
            outputs=[io.Latent.Output()],
        )

    @staticmethod
    def size_error(width, height):
        for name, v in (("width", width), ("height", height)):
            if not SIZE_MULTIPLE <= v <= MAX_RESOLUTION:
                return f"{name} {v} is outside {SIZE_MULTIPLE}..{MAX_RESOLUTION}"
            if v % SIZE_MULTIPLE:
                return (f"{name} {v} is not a multiple of {SIZE_MULTIPLE} (VAE 8 x patch 2); "
                        f"nearest valid: {nearest_sizes(v)}")
        return None

    @classmethod
    def validate_inputs(cls, width=SIZE_MULTIPLE, height=SIZE_MULTIPLE, channels="16 (FLUX VAE)"):
        """Lets ComfyUI's validator (and `oboro-run --check`) reject a bad size before running. It
        replaces ComfyUI's min/max check for exactly the inputs named here (no **kwargs: that
        would switch the range checks of all inputs off), so the range is checked here too."""
        kinds = input_errors(cls, **{k: v for k, v in (("width", width), ("height", height))
                                     if isinstance(v, bool) or not isinstance(v, int)})  # not a number at all
        return kinds or cls.size_error(width, height) or input_errors(cls, channels=channels) or True

    @classmethod
    def execute(cls, width, height, batch_size=1, channels="16 (FLUX VAE)") -> io.NodeOutput:
        if (err := cls.validate_inputs(width, height, channels)) is not True:
            raise ValueError(err)
        check_inputs(cls, batch_size=batch_size)
        c = CHANNELS[channels]
        scale = 8 if c == 16 else 1
        shape, device = [batch_size, c, height // scale, width // scale], comfy.model_management.intermediate_device()
        need, free = 4 * math.prod(shape), comfy.model_management.get_free_memory(device)
        if need > free:  # fail with a message, not inside the allocator (a shared server's memory)
            raise ValueError(f"an empty latent of {batch_size} x {width}x{height} ({channels}) needs "
                             f"{need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free on {device}")
        latent = torch.zeros(shape, device=device)
        return io.NodeOutput({"samples": latent})


NODES = [OboroSampler, OboroFlowScheduler, SamplerOboroICFM, EmptyOboroLatentImage]
__all__ = ["sample_icfm", "icfm_sampler", "flow_sigmas", "NODES"] + [n.__name__ for n in NODES]
