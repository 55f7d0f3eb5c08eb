"""oboro's sampler nodes inside the embedded ComfyUI: parity with core KSampler / SamplerCustomAdvanced,
parity with the pure-PyTorch sampler, img2img, progress / previews / interrupt, the empty latent."""
import pytest
import torch
from safetensors.torch import save_file

from oboro.oboro_model import MMHDiT, preset, save_checkpoint
from oboro.samplers import prepare_noise, sample

TEXT_DIM = 32
DIT, T5 = "samplers_tiny.safetensors", "samplers_tiny_t5.safetensors"
SOLVERS = ["euler", "heun", "midpoint", "rk4"]
POS, NEG = "a red circle on blue", "blurry"


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    m = MMHDiT(preset("tiny", text_dim=TEXT_DIM))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()


@pytest.fixture(scope="module")
def models(comfy):
    from transformers import T5Config, T5EncoderModel
    dit = tiny_dit()
    save_checkpoint(comfy.models / "diffusion_models" / DIT, dit)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=TEXT_DIM, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                 feed_forward_proj="gated-gelu"))
    save_file({k: v.contiguous().clone() for k, v in t5.state_dict().items()}, str(comfy.models / "text_encoders" / T5))
    return dit


def nodes():
    import nodes as comfy_nodes  # ComfyUI's top-level module
    return comfy_nodes.NODE_CLASS_MAPPINGS


def t5_inputs():
    """{file input: T5}; the loader's first required input names the file (t5_name / clip_name)."""
    return {next(iter(nodes()["OboroT5Loader"].INPUT_TYPES()["required"])): T5}


def graph(w=64, h=48, batch=1):
    """Model, prompts and an empty latent; samplers are added by each test."""
    return {
        "m": {"class_type": "OboroModelLoader", "inputs": {"model_name": DIT, "weight_dtype": "fp32"}},
        "te": {"class_type": "OboroT5Loader", "inputs": t5_inputs()},
        "pos": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": POS}},
        "neg": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": NEG}},
        "lat": {"class_type": "EmptyOboroLatentImage", "inputs": {"width": w, "height": h, "batch_size": batch,
                                                                  "channels": "16 (FLUX VAE)"}},
    }


def oboro_sampler(latent=("lat", 0), solver="euler", steps=4, cfg=5.0, seed=7, shift=1.0, denoise=1.0):
    return {"class_type": "OboroSampler", "inputs": {
        "model": ["m", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": list(latent),
        "seed": seed, "steps": steps, "cfg": cfg, "solver": solver, "shift": shift, "denoise": denoise}}


def ksampler(latent=("lat", 0), sampler="euler", steps=4, cfg=5.0, seed=7, denoise=1.0):
    return {"class_type": "KSampler", "inputs": {
        "model": ["m", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": list(latent),
        "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "simple", "denoise": denoise}}


def custom_advanced(g, sampler_node, steps=4, shift=1.0, seed=7, cfg=5.0, prefix="ca"):
    """SamplerCustomAdvanced fed by core RandomNoise / CFGGuider and our OboroFlowScheduler."""
    g.update({
        f"{prefix}_noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        f"{prefix}_guider": {"class_type": "CFGGuider", "inputs": {"model": ["m", 0], "positive": ["pos", 0],
                                                                   "negative": ["neg", 0], "cfg": cfg}},
        f"{prefix}_sigmas": {"class_type": "OboroFlowScheduler", "inputs": {"model": ["m", 0], "steps": steps,
                                                                            "shift": shift, "denoise": 1.0}},
        f"{prefix}_sampler": sampler_node,
        prefix: {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": [f"{prefix}_noise", 0], "guider": [f"{prefix}_guider", 0], "sampler": [f"{prefix}_sampler", 0],
            "sigmas": [f"{prefix}_sigmas", 0], "latent_image": ["lat", 0]}},
    })
    return prefix


def save(g, *sources):
    for s in sources:
        g[f"save_{s}"] = {"class_type": "SaveLatent", "inputs": {"samples": [s, 0], "filename_prefix": f"oboro_{s}"}}
    return g


def latents(comfy, result, *sources):
    return [comfy.latent(result, f"save_{s}") for s in sources]


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_nodes_are_registered(comfy):
    for n in ("OboroSampler", "OboroFlowScheduler", "SamplerOboroICFM", "EmptyOboroLatentImage"):
        assert n in nodes(), n


def test_euler_matches_core_ksampler(comfy, models):
    """Same sigmas (shift 1: linspace = core "simple" on the model's shift 1.0) and seed: our Euler in t
    equals core Euler in sigma, from noise and img2img from a sampled latent (denoise 0.5)."""
    g = graph()
    g.update({"ours": oboro_sampler(), "core": ksampler(),
              "ours_i2i": oboro_sampler(latent=("core", 0), denoise=0.5, seed=11),
              "core_i2i": ksampler(latent=("core", 0), denoise=0.5, seed=11)})
    ours, core, ours_i2i, core_i2i = latents(comfy, comfy.run(save(g, "ours", "core", "ours_i2i", "core_i2i")),
                                             "ours", "core", "ours_i2i", "core_i2i")
    assert ours.shape == (1, 16, 6, 8) and core.abs().max() > 0.1
    print("euler vs KSampler", max_diff(ours, core), "img2img", max_diff(ours_i2i, core_i2i))
    assert max_diff(ours, core) <= 1e-5
    assert max_diff(ours_i2i, core_i2i) <= 1e-5
    assert max_diff(core_i2i, core) > 1e-3  # img2img did something


def test_flow_scheduler_is_core_simple_with_sd3_shift(comfy, models):
    from comfy.model_sampling import ModelSamplingDiscreteFlow
    from comfy.samplers import calculate_sigmas
    patcher = nodes()["OboroModelLoader"].execute(DIT, "fp32")[0]
    for shift in (1.0, 3.0):
        ms = ModelSamplingDiscreteFlow()
        ms.set_parameters(shift=shift, multiplier=1.0)
        core = calculate_sigmas(ms, "simple", 10)
        ours = nodes()["OboroFlowScheduler"].execute(patcher, 10, shift, 1.0)[0]
        assert ours.dtype == torch.float32 and ours.shape == (11,)
        torch.testing.assert_close(ours, core.float(), atol=1e-6, rtol=0)
    half = nodes()["OboroFlowScheduler"].execute(patcher, 4, 3.0, 0.5)[0]
    assert half[0] == 0.5 and half[-1] == 0
    assert nodes()["OboroFlowScheduler"].execute(patcher, 4, 3.0, 0.0)[0].numel() == 0


def test_custom_advanced_euler_matches_core_euler(comfy, models):
    g = graph()
    ours = custom_advanced(g, {"class_type": "SamplerOboroICFM", "inputs": {"solver": "euler"}}, shift=3.0,
                           prefix="ours")
    core = custom_advanced(g, {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}, shift=3.0,
                           prefix="core")
    a, b = latents(comfy, comfy.run(save(g, ours, core)), ours, core)
    print("SamplerCustomAdvanced euler vs core euler", max_diff(a, b))
    assert max_diff(a, b) <= 1e-5 and b.abs().max() > 0.1


@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_through_both_paths_and_pure_pytorch(comfy, models, solver):
    """OboroSampler == SamplerCustomAdvanced(SamplerOboroICFM) == oboro.samplers.sample on the raw DiT."""
    steps, shift, cfg, seed = 3, 2.0, 4.0, 5
    g = graph()
    g["ob"] = oboro_sampler(solver=solver, steps=steps, shift=shift, cfg=cfg, seed=seed)
    ca = custom_advanced(g, {"class_type": "SamplerOboroICFM", "inputs": {"solver": solver}}, steps=steps,
                         shift=shift, seed=seed, cfg=cfg)
    ob, ca = latents(comfy, comfy.run(save(g, "ob", ca)), "ob", ca)
    assert ob.shape == (1, 16, 6, 8) and torch.isfinite(ob).all()
    assert max_diff(ob, ca) <= 1e-6

    n = nodes()
    clip = n["OboroT5Loader"].execute(**t5_inputs())[0]
    pos, neg = (n["OboroTextEncode"].execute(clip=clip, text=text)[0][0] for text in (POS, NEG))
    patcher = n["OboroModelLoader"].execute(DIT, "fp32")[0]
    noise = prepare_noise(torch.zeros(1, 16, 6, 8), seed)
    pure = sample(models, noise, (pos[0], pos[1]["attention_mask"]), (neg[0], neg[1]["attention_mask"]),
                  steps=steps, cfg=cfg, solver=solver, shift=shift)
    pure = patcher.model.process_latent_out(pure)  # ComfyUI hands back latents in VAE (FLUX) scale
    print(solver, "ComfyUI vs pure", max_diff(ob, pure), "scale", pure.abs().max().item())
    assert max_diff(ob, pure) <= 5e-5


def test_solvers_differ_and_seed_matters(comfy, models):
    g = graph()
    for s in SOLVERS:
        g[s] = oboro_sampler(solver=s, steps=2)
    g["other_seed"] = oboro_sampler(seed=8, steps=2)
    outs = dict(zip(SOLVERS + ["other_seed"], latents(comfy, comfy.run(save(g, *SOLVERS, "other_seed")),
                                                       *SOLVERS, "other_seed")))
    assert max_diff(outs["euler"], outs["other_seed"]) > 1e-3
    assert max_diff(outs["euler"], outs["rk4"]) > 1e-4 and max_diff(outs["heun"], outs["midpoint"]) > 1e-5


def test_denoise_zero_returns_input_latent(comfy, models):
    g = graph()
    g["first"] = oboro_sampler(steps=2)
    g["again"] = oboro_sampler(latent=("first", 0), denoise=0.0, seed=99)
    first, again = latents(comfy, comfy.run(save(g, "first", "again")), "first", "again")
    assert torch.equal(first, again)


def test_noise_matches_comfy_prepare_noise(comfy):
    from comfy.sample import prepare_noise as core_noise
    lat = torch.zeros(3, 16, 4, 5)
    for seed in (0, 7, 0xffffffffffffffff):
        assert torch.equal(prepare_noise(lat, seed), core_noise(lat, seed))
    assert torch.equal(prepare_noise(lat, 3, [4, 1, 4]), core_noise(lat, 3, [4, 1, 4]))


def test_progress_previews_and_interrupt(comfy, models, monkeypatch):
    import latent_preview
    from comfy import model_management as mm, utils as comfy_utils
    from comfy.cli_args import LatentPreviewMethod
    from oboro.runner.embedded import GraphError
    monkeypatch.setattr(latent_preview.args, "preview_method", LatentPreviewMethod.Latent2RGB)
    calls, stop_at = [], [None]

    def hook(value, total, preview, prompt_id=None, node_id=None):
        calls.append((value, total, preview))
        if stop_at[0] is not None and value >= stop_at[0]:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    old = comfy_utils.PROGRESS_BAR_HOOK
    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        g = graph()
        g["ob"] = oboro_sampler(solver="heun", steps=5)
        comfy.run(save(g, "ob"))
        steps = [(v, t) for v, t, p in calls if t == 5]
        assert steps == [(i, 5) for i in range(1, 6)], calls
        assert all(p is not None and p[0] == "JPEG" for v, t, p in calls if t == 5)  # latent previews

        calls.clear()
        stop_at[0] = 2
        with pytest.raises(GraphError, match="interrupted|Interrupt"):
            comfy.run(save(graph() | {"ob": oboro_sampler(steps=5)}, "ob"))
        assert max(v for v, t, p in calls if t == 5) == 2
    finally:
        comfy_utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)


def test_empty_latent_shapes(comfy):
    node = nodes()["EmptyOboroLatentImage"]
    assert node.execute(416, 736, 2, "16 (FLUX VAE)")[0]["samples"].shape == (2, 16, 92, 52)
    assert node.execute(416, 736, 1, "3 (pixel space)")[0]["samples"].shape == (1, 3, 736, 416)


def test_empty_latent_size_error(comfy):
    from oboro.runner.embedded import GraphError
    g = {"lat": {"class_type": "EmptyOboroLatentImage",
                 "inputs": {"width": 100, "height": 736, "batch_size": 1, "channels": "16 (FLUX VAE)"}},
         "save": {"class_type": "SaveLatent", "inputs": {"samples": ["lat", 0], "filename_prefix": "x"}}}
    # ComfyUI's validator rejects it before anything runs (so `oboro-run --check` catches it too)
    with pytest.raises(GraphError, match=r"EmptyOboroLatentImage.*width 100 is not a multiple of 16.*nearest valid: 96 or 112"):
        comfy.validate(g)
    from oboro.nodes.sampling import EmptyOboroLatentImage
    with pytest.raises(ValueError, match=r"width 100 is not a multiple of 16"):
        EmptyOboroLatentImage.execute(100, 736)
    g["lat"]["inputs"].update(width=416, height=730)
    with pytest.raises(GraphError, match=r"height 730 is not a multiple of 16.*nearest valid: 720 or 736"):
        comfy.run(g)


def test_non_flow_model_is_rejected(comfy):
    from types import SimpleNamespace
    from comfy.model_sampling import EPS
    eps_model = SimpleNamespace(get_model_object=lambda name: EPS())
    with pytest.raises(ValueError, match="OboroFlowScheduler needs a flow-matching model"):
        nodes()["OboroFlowScheduler"].execute(eps_model, 4, 1.0, 1.0)
