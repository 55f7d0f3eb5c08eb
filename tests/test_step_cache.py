"""OboroTaylorCache (samplers/step_cache.py + nodes/step_cache.py): the forecast maths, and the node
through ComfyUI's executor with OboroSampler, core KSampler and SamplerCustomAdvanced, a LoRA and
mask control. Model work is counted as block forwards (tests/test_core_nodes.py's hook)."""
import sys

import pytest
import torch

from oboro.samplers.step_cache import Forecaster, StepCache, StepCacheConfig
from test_core_nodes import DEPTH, LORA_NODE, STEPS, graph, models, run_counted  # noqa: F401  (fixture)


pytestmark = pytest.mark.usefixtures("models")  # the tiny models of test_core_nodes, in ComfyUI's folders


def taylor(order=2, warmup=3, max_forecasts=3, threshold=0.0):
    return ("OboroTaylorCache", {"order": order, "warmup_steps": warmup, "max_forecasts": max_forecasts,
                                 "threshold": threshold, "start_percent": 0.0, "end_percent": 1.0})


@pytest.mark.parametrize("order", [1, 2, 3])
def test_forecast_is_exact_for_polynomials_of_its_order_on_any_sigma_grid(order, comfy):
    g = torch.Generator().manual_seed(0)
    coeffs = [torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(order + 1)]
    feature = lambda s: sum(c * s ** k for k, c in enumerate(coeffs))  # noqa: E731
    f = Forecaster(order)
    for s in (1.0, 0.93, 0.81, 0.7, 0.64)[:order + 2]:  # uneven steps; the oldest point drops out
        f.add(s, feature(s))
    for s in (0.6, 0.55, 0.3):
        torch.testing.assert_close(f.predict(s), feature(s), atol=1e-9, rtol=1e-9)
    if order > 1:  # one order lower is not exact on this feature
        low = Forecaster(order - 1)
        for s in (1.0, 0.93, 0.81, 0.7):
            low.add(s, feature(s))
        assert (low.predict(0.5) - feature(0.5)).abs().max() > 1e-4


def test_fixed_schedule_and_gate_decisions(comfy):
    cache = StepCache(StepCacheConfig(order=1, warmup=2, max_forecasts=2))
    plan = []
    for i, s in enumerate([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]):
        st = cache.begin("k", s)
        plan.append("F" if st.forecast_now else "x")
        cache.finish(st, s, None if st.forecast_now else torch.full((1,), s))
    assert "".join(plan) == "xxFFxFF" and (cache.full, cache.forecast) == (3, 4)
    gated = StepCache(StepCacheConfig(order=1, warmup=2, max_forecasts=5, threshold=0.01))
    for s, first in [(1.0, 1.0), (0.9, 0.9), (0.8, 0.8), (0.7, 0.5)]:  # linear, then off the line
        st = gated.begin("k", s)
        gated.after_first_block(st, s, torch.full((3,), first))
        gated.finish(st, s, None if st.forecast_now else torch.full((3,), s))
    assert (gated.full, gated.forecast) == (3, 1)  # 0.8 forecast (on the line), 0.7 computed


@pytest.mark.parametrize("threshold", [0.0, 1e-30])
def test_no_forecast_settings_equal_uncached_bit_for_bit(comfy, threshold):
    ref, ref_calls = run_counted(comfy, graph())
    # max_forecasts 0 never forecasts; a gate nothing passes runs block 0 once and reuses it
    for patch in (taylor(max_forecasts=0, threshold=threshold), taylor(threshold=threshold or 1e-30)):
        out, calls = run_counted(comfy, graph(patch))
        assert calls == ref_calls and torch.equal(out, ref)


def test_fixed_and_gated_skip_blocks_and_stay_close(comfy):
    ref, ref_calls = run_counted(comfy, graph())
    for patch in (taylor(), taylor(threshold=0.2, max_forecasts=4)):
        out, calls = run_counted(comfy, graph(patch))
        err = (out - ref).norm() / ref.norm()
        print(patch[1], "block forwards", calls, "of", ref_calls, "relative error", float(err))
        assert calls < ref_calls * 0.8 and torch.isfinite(out).all() and err < 0.5
    again, _ = run_counted(comfy, graph(taylor()))  # state never leaks from one run into the next
    first, _ = run_counted(comfy, graph(taylor()))
    assert torch.equal(again, first)


def test_streams_are_separate_per_cond_and_reset_per_run(comfy):
    import nodes as comfy_nodes
    from test_core_nodes import DIT, conds, ksample
    # ComfyUI loaded this package under its own module name: use that copy (its MMHDiT class)
    step_cached = sys.modules[comfy_nodes.NODE_CLASS_MAPPINGS["OboroTaylorCache"].__module__].step_cached
    patcher = comfy_nodes.NODE_CLASS_MAPPINGS["OboroModelLoader"].execute(DIT, "fp32")[0]
    pos, neg = conds()
    m, cache = step_cached(patcher, StepCacheConfig(order=2, warmup=2, max_forecasts=2))
    ksample(m, pos, neg, steps=8)
    assert len(cache.streams) == 2  # cond and uncond (different prompt lengths: separate calls)
    assert all(st.full_steps + st.forecasts_in_row >= 2 for st in cache.streams.values())
    counts = (cache.full, cache.forecast)
    ksample(m, pos, neg, steps=8)
    assert (cache.full, cache.forecast) == counts and counts[1] > 0


def custom_advanced(patch):
    g = graph(patch)
    ks = g.pop("ks")["inputs"]
    g.update({
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ks["model"], "positive": ["pos", 0],
                                                         "negative": ["neg", 0], "cfg": 4.0}},
        "solver": {"class_type": "SamplerOboroICFM", "inputs": {"solver": "heun"}},
        "sigmas": {"class_type": "OboroFlowScheduler", "inputs": {"model": ks["model"], "steps": STEPS, "shift": 1.0,
                                                                 "denoise": 0.7}},
        "ks": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["noise", 0], "guider": ["guider", 0],
                                                                "sampler": ["solver", 0], "sigmas": ["sigmas", 0],
                                                                "latent_image": ["lat", 0]}},
    })
    return g


def oboro_sampler(*patches):
    g = graph(*patches)
    ks = g["ks"]["inputs"]
    g["ks"] = {"class_type": "OboroSampler", "inputs": {k: ks[k] for k in ("model", "positive", "negative",
                                                                             "latent_image", "seed", "steps", "cfg")}
               | {"solver": "midpoint", "shift": 3.0, "denoise": 1.0}}
    return g


def test_works_with_every_sampler_a_lora_and_mask_control(comfy, tmp_path):
    from test_core_nodes import with_mask_control
    for make in (custom_advanced, lambda p: oboro_sampler(LORA_NODE, p)):
        ref, ref_calls = run_counted(comfy, make(taylor(max_forecasts=0)))
        out, calls = run_counted(comfy, make(taylor()))
        assert calls < ref_calls and torch.isfinite(out).all()
        assert (out - ref).norm() / ref.norm() < 0.5
    with with_mask_control(comfy, tmp_path) as with_mask:
        ref, ref_calls = run_counted(comfy, with_mask(LORA_NODE, taylor(max_forecasts=0)))
        out, calls = run_counted(comfy, with_mask(LORA_NODE, taylor(threshold=0.2)))
        assert calls < ref_calls and torch.isfinite(out).all() and (out - ref).norm() / ref.norm() < 0.5
