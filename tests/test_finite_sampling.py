"""Issue #26 §4-§5: non-finite numbers fail with a message naming the value, through ComfyUI's own
validator and executor, instead of a black image or a hang. Core KSampler / SamplerCustom on an oboro
MODEL (the loader's wrappers, nodes/finite.py), our sampler nodes' FLOAT inputs, the text encoder's
token budget and extra_caches lines."""
import math

import pytest
import torch
from safetensors.torch import save_file

from oboro.oboro_model import save_checkpoint
from oboro.oboro_model.training.datasets import MAX_REPEATS, DataSource, parse_data_config, parse_source_lines
from oboro.runner.embedded import GraphError
from tiny import save_t5, tiny_dit, tiny_t5

SUB = "finite"
pytestmark = pytest.mark.usefixtures("one_thread")
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def models(comfy):
    for kind in ("diffusion_models", "text_encoders", "loras"):
        (comfy.models / kind / SUB).mkdir(exist_ok=True)
    dit = tiny_dit()
    save_checkpoint(comfy.models / "diffusion_models" / SUB / "dit.safetensors", dit)
    save_t5(comfy.models / "text_encoders" / SUB / "t5.safetensors", tiny_t5())
    w = dit.state_dict()["blocks.1.attn.qkv.weight"]  # an overflowing LoRA: 1e30 * 1e30 = inf in fp32
    save_file({"diffusion_model.blocks.1.attn.qkv.lora_down.weight": torch.full((1, w.shape[1]), 1e30),
               "diffusion_model.blocks.1.attn.qkv.lora_up.weight": torch.full((w.shape[0], 1), 1e30)},
              str(comfy.models / "loras" / SUB / "overflow.safetensors"))


def base(text="a red circle", max_tokens=None):
    enc = {"clip": ["te", 0], "text": text, **({} if max_tokens is None else {"max_tokens": max_tokens})}
    return {"m": {"class_type": "OboroModelLoader", "inputs": {"model_name": f"{SUB}/dit.safetensors",
                                                               "weight_dtype": "fp32"}},
            "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": f"{SUB}/t5.safetensors"}},
            "pos": {"class_type": "OboroTextEncode", "inputs": enc},
            "neg": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": "blurry"}},
            "lat": {"class_type": "EmptyOboroLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1,
                                                                      "channels": "16 (FLUX VAE)"}}}


def save(g, node):
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": [node, 0], "filename_prefix": f"{SUB}/x"}}
    return g


def ksampler(cfg=4.0, model=("m", 0), **kw):
    g = base(**kw)
    g["ks"] = {"class_type": "KSampler", "inputs": {
        "model": list(model), "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
        "seed": 1, "steps": 2, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    return save(g, "ks")


def sampler_custom(cfg):
    g = base()
    g["sel"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["sig"] = {"class_type": "BasicScheduler", "inputs": {"model": ["m", 0], "scheduler": "simple", "steps": 2,
                                                           "denoise": 1.0}}
    g["sc"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["m", 0], "add_noise": True, "noise_seed": 1, "cfg": cfg, "positive": ["pos", 0],
        "negative": ["neg", 0], "sampler": ["sel", 0], "sigmas": ["sig", 0], "latent_image": ["lat", 0]}}
    return save(g, "sc")


def test_core_samplers_refuse_a_nan_cfg_instead_of_saving_black(comfy, models):
    out = comfy.latent(comfy.run(ksampler(4.0)), "save")  # the guards change nothing when all is finite
    assert torch.isfinite(out).all() and out.abs().max() > 0
    for g in (ksampler(NAN), sampler_custom(NAN)):
        with pytest.raises(GraphError, match=r"NonFiniteError: cfg is nan; give a finite number"):
            comfy.run(g)


def test_core_cfg_guider_refuses_nan_cfg(comfy, models):
    g = base()
    g.update({"gd": {"class_type": "CFGGuider", "inputs": {"model": ["m", 0], "positive": ["pos", 0],
                                                          "negative": ["neg", 0], "cfg": NAN}},
              "sel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
              "sig": {"class_type": "OboroFlowScheduler", "inputs": {"model": ["m", 0], "steps": 2, "shift": 1.0,
                                                                     "denoise": 1.0}},
              "rn": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
              "sca": {"class_type": "SamplerCustomAdvanced", "inputs": {
                  "noise": ["rn", 0], "guider": ["gd", 0], "sampler": ["sel", 0], "sigmas": ["sig", 0],
                  "latent_image": ["lat", 0]}}})
    with pytest.raises(GraphError, match="cfg is nan"):
        comfy.run(save(g, "sca"))


def test_non_finite_model_output_names_the_sigma(comfy, models):
    g = ksampler(4.0, model=("lora", 0))
    g["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["m", 0], "lora_name": f"{SUB}/overflow.safetensors", "strength_model": 1.0}}
    with pytest.raises(GraphError, match=r"the model output is not finite at sigma 1(\.0+)?\b.*the input was finite"):
        comfy.run(g)


def oboro_sampler(**kw):
    g = base()
    g["os"] = {"class_type": "OboroSampler", "inputs": {
        "model": ["m", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
        "seed": 0, "steps": 2, "cfg": 4.0, "solver": "euler", "shift": 1.0, "denoise": 1.0, **kw}}
    return save(g, "os")


@pytest.mark.parametrize("name,value,message", [
    ("cfg", NAN, r"cfg is nan; give a finite number in 0.0..100.0"),
    ("cfg", -INF, r"cfg is -inf; give a finite number in 0.0..100.0"),
    ("shift", NAN, r"shift is nan; give a finite number in 0.01..100.0"),
    ("shift", 0.0, r"shift 0.0 is outside the allowed range 0.01..100.0"),
    ("denoise", INF, r"denoise is inf; give a finite number in 0.0..1.0"),
    ("denoise", 1e300, r"denoise 1e\+300 is outside the allowed range 0.0..1.0")])
def test_oboro_sampler_inputs_are_checked_at_validation(comfy, models, name, value, message):
    with pytest.raises(GraphError, match=f"OboroSampler: {message}"):
        comfy.validate(oboro_sampler(**{name: value}))


def test_flow_scheduler_and_taylor_cache_refuse_nan(comfy, models):
    g = base()
    g["sig"] = {"class_type": "OboroFlowScheduler", "inputs": {"model": ["m", 0], "steps": 2, "shift": 1.0,
                                                               "denoise": NAN}}
    g["tc"] = {"class_type": "OboroTaylorCache", "inputs": {"model": ["m", 0], "order": 1, "warmup_steps": 1,
                                                            "max_forecasts": 1, "threshold": NAN,
                                                            "start_percent": 0.0, "end_percent": 1.0}}
    g["ks"] = ksampler(model=("tc", 0))["ks"]
    g = save(g, "ks")
    g["sel"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["sca"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["m", 0], "add_noise": True, "noise_seed": 1, "cfg": 1.0, "positive": ["pos", 0],
        "negative": ["neg", 0], "sampler": ["sel", 0], "sigmas": ["sig", 0], "latent_image": ["lat", 0]}}
    g["save2"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sca", 0], "filename_prefix": f"{SUB}/y"}}
    with pytest.raises(GraphError) as e:
        comfy.validate(g)
    assert "OboroFlowScheduler: denoise is nan; give a finite number in 0.0..1.0" in str(e.value)
    assert "OboroTaylorCache: threshold is nan; give a finite number in 0.0..10.0" in str(e.value)


def test_text_encoder_token_budget_is_bounded_and_long_prompts_cost_the_budget(comfy, models):
    with pytest.raises(GraphError, match=r"Value 8192 bigger than max of 512: max_tokens"):
        comfy.validate(ksampler(max_tokens=8192))
    import nodes as comfy_nodes
    n = comfy_nodes.NODE_CLASS_MAPPINGS
    clip = n["OboroT5Loader"].execute(t5_name=f"{SUB}/t5.safetensors")[0]
    text = " ".join(["a red circle on blue with stars"] * 1430)  # 10k words
    cond = n["OboroTextEncode"].execute(clip=clip, text=text, max_tokens=512)[0]
    assert cond[0][0].shape[1] == 512 and cond[0][1]["attention_mask"].shape == (1, 512)
    with pytest.raises(ValueError, match=r"OboroTextEncode: max_tokens 100000 is outside the allowed range 1..512"):
        n["OboroTextEncode"].execute(clip=clip, text="x", max_tokens=100000)


@pytest.mark.parametrize("line,message", [
    ("/c inf", "weight must be a finite number, 0 < weight <= 10000, got inf"),
    ("/c nan", "weight must be a finite number, 0 < weight <= 10000, got nan"),
    ("/c 1e9", "got 1000000000.0"),
    ("/c 1e300 2", "got 1e+300"),
    ("/c 0", "0 < weight"),
    ("/c 1 inf", "repeats must be a whole number in 1..10000, got inf"),
    ("/c 1 1e300", "repeats must be a whole number in 1..10000, got 1e+300"),
    ("/c 1 1e999", "got inf"),
    ("/c 1 0", "got 0.0"),
    ("/c 1 10001", "got 10001.0")])
def test_extra_caches_lines_name_line_value_and_range(line, message):
    with pytest.raises(ValueError) as e:
        parse_source_lines(f"# first\n/ok 2 3\n{line}")
    assert f"extra_caches line 3 ({line!r})" in str(e.value) and message in str(e.value)


def test_extra_caches_bounds_are_inclusive_and_toml_sources_checked_too():
    got = parse_source_lines(f"/a 10000 {MAX_REPEATS}\n/b 1e-6 1")
    assert got == [DataSource("/a", 1e4, MAX_REPEATS), DataSource("/b", 1e-6, 1)]
    for bad in ({"repeats": math.inf}, {"repeats": 1e300}, {"weight": math.nan}, {"loss_weight": math.inf}):
        with pytest.raises(ValueError, match="must be a (finite|whole) number"):
            parse_data_config({"path": "c", **bad})
