"""OboroTaylorCache: forecast the last block's output between full steps (samplers/step_cache.py).

Built on the extension points only: ("double_block", i) patches on every block and an OUTER_SAMPLE
wrapper that resets the state per run. Block 0's patch starts a model call (gated mode: runs the
block and checks its forecast); on a forecast call blocks 1.. return their input untouched and the
last one returns the forecast, so no block maths runs there. State is per stream: the cond/uncond
uuids ComfyUI puts in transformer_options and the latent's shape; the forecast is on the sigma
the sampler asks for (transformer_options["sigmas"]), so any solver and img2img work.
"""
from __future__ import annotations

import dataclasses
import logging

import comfy.patcher_extension
from comfy_api.latest import io

from ..oboro_model import MMHDiT
from ..samplers.step_cache import StepCache, StepCacheConfig
from .finite import check_inputs, input_errors

log = logging.getLogger("oboro")
KEY = "oboro_taylor_cache"


def step_cached(model, cfg: StepCacheConfig, start_percent: float = 0.0, end_percent: float = 1.0):
    """A clone of the ModelPatcher `model` with the forecasting cache; returns (clone, StepCache)."""
    dm = model.model.diffusion_model
    if not isinstance(dm, MMHDiT):
        raise ValueError(f"OboroTaylorCache needs an oboro MODEL (OboroModelLoader), got {type(dm).__name__}")
    depth = len(dm.blocks)
    if depth < 2:
        raise ValueError(f"OboroTaylorCache needs a model of >= 2 blocks, this one has {depth}")
    cache = StepCache(cfg)
    current = {}

    def sigma_of(args) -> float:
        return float(args["transformer_options"]["sigmas"].flatten()[0])

    def first_block(args, extra):
        to = args["transformer_options"]
        key = (tuple(map(str, to.get("uuids") or ())), tuple(args["img"].shape))
        st = current["stream"] = cache.begin(key, sigma_of(args))
        if st.forecast_now:
            return {"txt": args["txt"], "img": args["img"]}
        out = extra["original_block"](args)
        cache.after_first_block(st, sigma_of(args), out["img"])
        return out

    def middle_block(args, extra):
        if current["stream"].forecast_now:
            return {"txt": args["txt"], "img": args["img"]}
        return extra["original_block"](args)

    def last_block(args, extra):
        st = current.pop("stream")
        if st.forecast_now:
            return {"txt": args["txt"], "img": cache.finish(st, sigma_of(args), None).to(args["img"])}
        out = extra["original_block"](args)
        return {"txt": out["txt"], "img": cache.finish(st, sigma_of(args), out["img"])}

    def outer_sample(executor, *args, **kwargs):
        sampling = executor.class_obj.model_patcher.get_model_object("model_sampling")
        cache.cfg = dataclasses.replace(cfg, sigma_start=float(sampling.percent_to_sigma(start_percent)),
                                        sigma_end=float(sampling.percent_to_sigma(end_percent)))
        cache.reset()
        try:
            return executor(*args, **kwargs)
        finally:
            log.info("OboroTaylorCache: %d full, %d forecast model calls", cache.full, cache.forecast)
            current.clear()

    m = model.clone()
    for i in range(depth):
        m.set_model_patch_replace(first_block if i == 0 else last_block if i == depth - 1 else middle_block,
                                  "dit", "double_block", i)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, outer_sample)
    return m, cache


class OboroTaylorCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroTaylorCache", display_name="oboro Taylor Cache", category="oboro/sampling",
            description="Faster sampling: between full steps, forecasts the last block's output from the last full "
                        "steps (Taylor / Newton over sigma) and skips the blocks. threshold 0: a full step every "
                        "max_forecasts + 1 steps (TaylorSeer); > 0: each step runs the first block and forecasts only "
                        "when the first block's forecast is within that relative error (confidence-gated).",
            inputs=[
                io.Model.Input("model", tooltip="An oboro model; the cache is added as a model patch."),
                io.Int.Input("order", default=1, min=1, max=3, tooltip="Taylor order (uses order + 1 full steps)."),
                io.Int.Input("warmup_steps", default=3, min=1, max=1000, tooltip="Full steps at the start."),
                io.Int.Input("max_forecasts", default=2, min=0, max=100,
                             tooltip="Forecast steps in a row before a full step is forced (0: never forecast)."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=10.0, step=0.005,
                               tooltip="0: fixed schedule; > 0: forecast only when the first block's forecast "
                                       "relative error is below this."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in sampling forecasting may begin, as a fraction of the model's "
                                       "sigma range (0: from the first step; core EasyCache counts the same way)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where forecasting stops (1: to the last step); outside start..end every "
                                       "step is a full step."),
            ],
            outputs=[io.Model.Output()])

    @classmethod
    def validate_inputs(cls, threshold=0.0, start_percent=0.0, end_percent=1.0):
        """Finite and in range (NaN passes ComfyUI's own min/max check)."""
        return input_errors(cls, threshold=threshold, start_percent=start_percent, end_percent=end_percent) or True

    @classmethod
    def execute(cls, model, order, warmup_steps, max_forecasts, threshold, start_percent, end_percent):
        check_inputs(cls, order=order, warmup_steps=warmup_steps, max_forecasts=max_forecasts, threshold=threshold,
                      start_percent=start_percent, end_percent=end_percent)
        cfg = StepCacheConfig(order=order, warmup=warmup_steps, max_forecasts=max_forecasts, threshold=threshold)
        return io.NodeOutput(step_cached(model, cfg, start_percent, end_percent)[0])


NODES = [OboroTaylorCache]
