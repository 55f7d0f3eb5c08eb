"""OboroModelLoader with fp8 weights, through ComfyUI's executor: ComfyUI's scaled-fp8 files (fp8
Linear weights, a per-layer `scale_weight`, a `scaled_fp8` marker) and core UNETLoader's
`fp8_e4m3fn_fast`, each sampled by core KSampler and compared with the fp32 model.

Tolerance: e4m3 keeps 3 mantissa bits (about 6% per weight, relative); the per-layer scale keeps
every weight in the normal range, so 4 euler steps of the tiny model stay within 10% relative L2 of
fp32 (seen: 1.4%; unscaled fp8 1.6%). Unscaled fp8 of the same weights (std 0.05, partly subnormal in e4m3) is
checked against the same bound only as a sanity check."""
import pytest
import torch
from safetensors.torch import save_file

from oboro.oboro_model import save_checkpoint
from tiny import save_t5, tiny_dit, tiny_t5

DIT, T5 = "fp8_tiny.safetensors", "fp8_tiny_t5.safetensors"
SCALED = "fp8_tiny_scaled.safetensors"
SCALED_NO_FAST = "fp8_tiny_scaled_nofast.safetensors"
FP8 = torch.float8_e4m3fn
REL_TOL = 0.10


def scaled_fp8_state_dict(model, marker_elements=0, scale_input=None) -> dict:
    """As ComfyUI's scaled-fp8 files are made: each Linear weight divided by a per-layer scale
    (absmax / fp8 max) and stored as fp8, the scale as a float32 scalar `<layer>.scale_weight`;
    other tensors keep their dtype; a `scaled_fp8` marker of the fp8 dtype (0 elements: fp8
    matmuls allowed, as ComfyUI's own save writes it; 2 elements: not). Some makers also store a
    per-layer `scale_input` (used only by fp8 matmuls)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            w = sd[f"{name}.weight"].float()
            scale = w.abs().max() / torch.finfo(FP8).max
            sd[f"{name}.weight"] = (w / scale).to(FP8)
            sd[f"{name}.scale_weight"] = scale.reshape(()).float()
            if scale_input is not None:
                sd[f"{name}.scale_input"] = torch.tensor(scale_input)
    sd["scaled_fp8"] = torch.zeros(marker_elements, dtype=FP8)
    return sd


@pytest.fixture(scope="module")
def models(comfy):
    dit = tiny_dit()
    save_checkpoint(comfy.models / "diffusion_models" / DIT, dit)
    save_file(scaled_fp8_state_dict(dit, scale_input=2.0), str(comfy.models / "diffusion_models" / SCALED))
    save_file(scaled_fp8_state_dict(dit, 2), str(comfy.models / "diffusion_models" / SCALED_NO_FAST))
    save_t5(comfy.models / "text_encoders" / T5, tiny_t5())
    return dit


def graph(model_name, weight_dtype):
    return {
        "m": {"class_type": "OboroModelLoader", "inputs": {"model_name": model_name, "weight_dtype": weight_dtype}},
        "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": T5}},
        "pos": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": "a red circle on blue"}},
        "neg": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": "blurry"}},
        "lat": {"class_type": "EmptyOboroLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                                  "channels": "16 (FLUX VAE)"}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["m", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "seed": 3, "steps": 4, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "fp8"}},
    }


def sample(comfy, model_name, weight_dtype):
    return comfy.latent(comfy.run(graph(model_name, weight_dtype)), "save")


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def reference(comfy, models, one_thread):
    return sample(comfy, DIT, "fp32")


def loaded(name, weight_dtype):
    import nodes as comfy_nodes
    return comfy_nodes.NODE_CLASS_MAPPINGS["OboroModelLoader"].execute(name, weight_dtype)[0].model.diffusion_model


@pytest.mark.parametrize("name", [SCALED, SCALED_NO_FAST])
def test_scaled_fp8_file_loads_and_samples_close_to_fp32(comfy, models, reference, name):
    dm = loaded(name, "default")
    qkv = dm.blocks[1].attn.qkv
    assert qkv.weight.dtype == FP8
    want = scaled_fp8_state_dict(models)["blocks.1.attn.qkv.scale_weight"]
    assert torch.equal(qkv.scale_weight.detach().cpu(), want)  # the file's scale, not the default 1
    if name == SCALED:  # fp8 matmuls allowed: the file's input scale is loaded (else core drops it)
        assert float(qkv.scale_input) == 2.0
    else:
        assert qkv.scale_input is None
    # The dequantized weight is the fp32 weight to fp8 precision.
    w = qkv.weight.float() * qkv.scale_weight
    assert rel_err(w, models.blocks[1].attn.qkv.weight) < 0.05
    out = sample(comfy, name, "default")
    err = rel_err(out, reference)
    print(name, "relative L2 vs fp32:", err)
    assert torch.isfinite(out).all() and err < REL_TOL


def test_fp8_e4m3fn_fast_samples_on_cpu_like_fp8(comfy, models, reference):
    """On CPU core has no fp8 matmul (supports_fp8_compute is False) and falls back to casting the
    fp8 weights, so fast and plain fp8 storage compute the same thing."""
    assert loaded(DIT, "fp8_e4m3fn_fast").blocks[0].attn.qkv.weight.dtype == FP8
    fast = sample(comfy, DIT, "fp8_e4m3fn_fast")
    plain = sample(comfy, DIT, "fp8_e4m3fn")
    print("fp8_e4m3fn relative L2 vs fp32:", rel_err(plain, reference))
    assert (fast - plain).abs().max() <= 1e-6
    assert torch.isfinite(fast).all() and rel_err(fast, reference) < REL_TOL


def test_scaled_fp8_file_with_a_foreign_key_is_refused(comfy, models, tmp_path):
    """The scale keys are let through, nothing else: a stray key still names itself."""
    from oboro.oboro_model.checkpoint import CheckpointError
    from oboro.nodes.comfy_model import load_oboro_model
    sd = scaled_fp8_state_dict(models)
    sd["blocks.0.attn.qkv.bogus"] = torch.ones(())
    path = tmp_path / "bad_scaled.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): blocks\.0\.attn\.qkv\.bogus"):
        load_oboro_model(str(path))
