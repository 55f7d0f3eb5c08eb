"""The MMH-DiT as a MODEL inside a real ComfyUI 0.3.75, driven through its executor and core nodes."""
import pytest
import torch
from safetensors.torch import save_file

from oboro.oboro_model import save_checkpoint
from tiny import TEXT_DIM, save_t5, tiny_dit, tiny_t5


@pytest.fixture(scope="module")
def models(comfy):
    """A tiny DiT checkpoint and a tiny T5 (d_model 32) in the temporary model folders."""
    dit = tiny_dit()
    save_checkpoint(comfy.models / "diffusion_models" / "tiny.safetensors", dit)
    save_t5(comfy.models / "text_encoders" / "tiny_t5.safetensors", tiny_t5())
    return dit


def sample_graph(model_node, sampler="euler", steps=4, cfg=5.0, seed=7, w=64, h=48):
    return {
        "m": model_node,
        "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": "tiny_t5.safetensors"}},
        "pos": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": "a red circle on blue"}},
        "neg": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": ""}},
        "lat": {"class_type": "EmptySD3LatentImage", "inputs": {"width": w, "height": h, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["m", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "simple", "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "oboro_test"}},
    }


def loader(name="tiny.safetensors", dtype="default"):
    return {"class_type": "OboroModelLoader", "inputs": {"model_name": name, "weight_dtype": dtype}}


def saved_latent(comfy, result, node="save"):
    return comfy.latent(result, node)


def test_custom_node_loader_imports_our_package(comfy, caplog):
    import nodes as comfy_nodes  # ComfyUI's top-level module
    assert "OboroModelLoader" in comfy_nodes.NODE_CLASS_MAPPINGS
    ours = [p for p in comfy_nodes.LOADED_MODULE_DIRS.values() if p.endswith("comfyui-oboro")]
    assert ours, f"our package is not among the loaded custom nodes: {list(comfy_nodes.LOADED_MODULE_DIRS)}"


def test_denoised_matches_core_model_convention(comfy, models):
    """ComfyUI flow convention: denoised = x - sigma * v, with v = -u(x, t = 1 - sigma)."""
    import nodes as comfy_nodes
    patcher = comfy_nodes.NODE_CLASS_MAPPINGS["OboroModelLoader"].execute("tiny.safetensors", "fp32")[0]
    x, sigma = torch.randn(2, 16, 6, 8), torch.tensor([0.8, 0.3])
    ctx, mask = torch.randn(2, 5, TEXT_DIM), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        denoised = patcher.model.apply_model(x, sigma, c_crossattn=ctx, attention_mask=mask)
        u = models(x, 1 - sigma, ctx, mask)
    torch.testing.assert_close(denoised, x + sigma[:, None, None, None] * u, atol=1e-5, rtol=1e-5)


def test_ksampler_euler_through_executor(comfy, models):
    lat = saved_latent(comfy, comfy.run(sample_graph(loader())))
    assert lat.shape == (1, 16, 6, 8) and torch.isfinite(lat).all() and lat.abs().max() > 0
    again = saved_latent(comfy, comfy.run(sample_graph(loader())))
    torch.testing.assert_close(lat, again)  # same seed, same result
    other = saved_latent(comfy, comfy.run(sample_graph(loader(), seed=8)))
    assert (other - lat).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", ["fp8_e4m3fn", "fp8_e5m2", "bf16"])
def test_low_precision_weights_load_and_sample(comfy, models, dtype):
    import nodes as comfy_nodes
    patcher = comfy_nodes.NODE_CLASS_MAPPINGS["OboroModelLoader"].execute("tiny.safetensors", dtype)[0]
    want = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "bf16": torch.bfloat16}[dtype]
    assert patcher.model.diffusion_model.blocks[0].attn.qkv.weight.dtype == want
    ref = saved_latent(comfy, comfy.run(sample_graph(loader(dtype="fp32"))))
    lat = saved_latent(comfy, comfy.run(sample_graph(loader(dtype=dtype))))
    assert lat.shape == ref.shape and torch.isfinite(lat).all()
    assert (lat - ref).abs().mean() < 0.25 * ref.abs().mean()  # quantised, but the same model


def test_sampler_custom_advanced_with_sd3_shift(comfy, models):
    g = sample_graph(loader())
    del g["ks"]
    g.update({
        "ms": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["m", 0], "shift": 3.0}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ["ms", 0], "positive": ["pos", 0],
                                                         "negative": ["neg", 0], "cfg": 5.0}},
        "sel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "heun"}},
        "sch": {"class_type": "BasicScheduler", "inputs": {"model": ["ms", 0], "scheduler": "simple", "steps": 4, "denoise": 1.0}},
        "sca": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["noise", 0], "guider": ["guider", 0],
                                                                  "sampler": ["sel", 0], "sigmas": ["sch", 0],
                                                                  "latent_image": ["lat", 0]}},
    })
    g["save"]["inputs"]["samples"] = ["sca", 0]
    lat = saved_latent(comfy, comfy.run(g))
    assert lat.shape == (1, 16, 6, 8) and torch.isfinite(lat).all()


def test_lora_loader_model_only_applies_our_lora(comfy, models):
    """A LoRA on block 0's qkv via core LoraLoaderModelOnly == sampling the merged weights."""
    torch.manual_seed(3)
    rank, alpha = 4, 2.0
    key = "blocks.0.attn.qkv"
    w = models.state_dict()[key + ".weight"]
    down, up = torch.randn(rank, w.shape[1]) * 0.3, torch.randn(w.shape[0], rank) * 0.3
    save_file({f"diffusion_model.{key}.lora_down.weight": down, f"diffusion_model.{key}.lora_up.weight": up,
               f"diffusion_model.{key}.alpha": torch.tensor(alpha)}, str(comfy.models / "loras" / "tiny_lora.safetensors"))
    merged = tiny_dit()
    with torch.no_grad():
        merged.blocks[0].attn.qkv.weight += (alpha / rank) * up @ down
    save_checkpoint(comfy.models / "diffusion_models" / "tiny_merged.safetensors", merged)

    g = sample_graph(loader())
    g["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["m", 0], "lora_name": "tiny_lora.safetensors",
                                                                 "strength_model": 1.0}}
    g["ks"]["inputs"]["model"] = ["lora", 0]
    with_lora = saved_latent(comfy, comfy.run(g))
    base = saved_latent(comfy, comfy.run(sample_graph(loader())))
    want = saved_latent(comfy, comfy.run(sample_graph(loader("tiny_merged.safetensors"))))
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(with_lora, want, atol=1e-4, rtol=1e-4)


def test_bad_checkpoint_is_a_clear_node_error(comfy, models):
    from oboro.runner.embedded import GraphError
    (comfy.models / "diffusion_models" / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(GraphError, match=r"OboroModelLoader.*broken\.safetensors: not a readable safetensors file"):
        comfy.run(sample_graph(loader("broken.safetensors")))
