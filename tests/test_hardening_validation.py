"""Issue 13, case 4: inputs that used to pass silently now fail before any work, with a message naming
the input/file/key and the expected and actual value (through ComfyUI's validator and executor)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from oboro.oboro_model import CheckpointError, read_checkpoint, save_checkpoint
from oboro.runner.embedded import GraphError
from tiny import save_t5, tiny_dit, tiny_t5

SUB = "hardening_val"
pytestmark = pytest.mark.usefixtures("one_thread")


def empty_latent(width, height, batch=1):
    return {"lat": {"class_type": "EmptyOboroLatentImage", "inputs": {
                "width": width, "height": height, "batch_size": batch, "channels": "16 (FLUX VAE)"}},
            "save": {"class_type": "SaveLatent", "inputs": {"samples": ["lat", 0], "filename_prefix": "hv/lat"}}}


@pytest.mark.parametrize("w,h", [(1048576, 16), (16, 262144), (262144, 262144)])
def test_empty_latent_rejects_sizes_over_its_max_at_validation(comfy, w, h):
    with pytest.raises(GraphError, match="outside 16..16384"):
        comfy.validate(empty_latent(w, h))


def test_empty_latent_refuses_more_than_free_memory_before_allocating(comfy):
    # within the declared limits, but 4096 x 16 x 2048 x 2048 fp32 = 1 TiB
    with pytest.raises(GraphError, match=r"needs 1024\.0 GiB; .* GiB free"):
        comfy.run(empty_latent(16384, 16384, 4096))


@pytest.fixture(scope="module")
def sampler_models(comfy):
    for kind in ("diffusion_models", "text_encoders"):
        (comfy.models / kind / SUB).mkdir(exist_ok=True)
    save_checkpoint(comfy.models / "diffusion_models" / SUB / "dit.safetensors", tiny_dit())
    save_t5(comfy.models / "text_encoders" / SUB / "t5.safetensors", tiny_t5())


def sample_graph(model_name, cfg=4.0):
    g = {"m": {"class_type": "OboroModelLoader", "inputs": {"model_name": model_name, "weight_dtype": "fp32"}},
         "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": f"{SUB}/t5.safetensors"}},
         "pos": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": "a cat"}},
         **empty_latent(32, 32),
         "ks": {"class_type": "OboroSampler", "inputs": {
             "model": ["m", 0], "positive": ["pos", 0], "negative": ["pos", 0], "latent_image": ["lat", 0],
             "seed": 0, "steps": 2, "cfg": cfg, "solver": "euler", "shift": 1.0, "denoise": 1.0}}}
    g["save"]["inputs"]["samples"] = ["ks", 0]
    return g


@pytest.mark.parametrize("cfg,message", [(float("nan"), r"OboroSampler: cfg is nan; give a finite number in 0.0..100.0"),
                                         (float("inf"), r"OboroSampler: cfg is inf; give a finite number in 0.0..100.0")])
def test_sampler_rejects_non_finite_cfg(comfy, sampler_models, cfg, message):
    with pytest.raises(GraphError, match=message):
        comfy.run(sample_graph(f"{SUB}/dit.safetensors", cfg))


# ---- checkpoints -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_file_and_key(comfy, sampler_models, bad):
    m = tiny_dit()
    with torch.no_grad():
        m.blocks[2].mlp.w2.weight[3, 5] = bad
    path = save_checkpoint(comfy.models / "diffusion_models" / "hv_nan.safetensors", m)
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.2\.mlp\.w2\.weight' \(64, 128\) holds 1 NaN/inf") as e:
        read_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(GraphError, match="hv_nan.safetensors: tensor 'blocks.2.mlp.w2.weight'"):
        comfy.run(sample_graph("hv_nan.safetensors"))


def test_headerless_file_missing_its_last_block_is_an_error(tmp_path):
    sd = {k: v.contiguous() for k, v in tiny_dit().state_dict().items() if not k.startswith("blocks.3.")}
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks 0\.\.2 of the 4-block 'tiny' layout .* blocks 3\.\.3 are "
                                              r"missing") as e:
        read_checkpoint(tmp_path / "cut.safetensors")
    assert str(tmp_path / "cut.safetensors") in str(e.value)
    sd = {k: v.contiguous() for k, v in tiny_dit().state_dict().items() if not k.startswith("blocks.1.")}
    save_file(sd, str(tmp_path / "hole.safetensors"))
    with pytest.raises(CheckpointError, match=r"hole.safetensors: blocks \[1\] are missing"):
        read_checkpoint(tmp_path / "hole.safetensors")


def test_header_claiming_a_huge_model_fails_naming_the_file_before_allocating(comfy, sampler_models):
    m = tiny_dit()
    cfg = json.loads(m.config.to_json())
    cfg.update(hidden_size=1 << 20, mlp_hidden=1 << 22)  # ~ terabytes of weights if built
    path = comfy.models / "diffusion_models" / "hv_huge.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path),
              metadata={"oboro_config": json.dumps(cfg), "oboro_format": "1"})
    with pytest.raises(GraphError, match=r"hv_huge\.safetensors: state dict does not match the model config"):
        comfy.run(sample_graph("hv_huge.safetensors"))
    cfg.update(hidden_size=64, mlp_hidden=128, depth=400, heads=[1] * 400)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path),
              metadata={"oboro_config": json.dumps(cfg), "oboro_format": "1"})
    with pytest.raises(CheckpointError, match="says depth 400 but the file holds 4 blocks"):
        read_checkpoint(path)
