import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from oboro.oboro_model import CheckpointError, MMHDiT, load_checkpoint, preset, read_checkpoint, save_checkpoint
from oboro.oboro_model.checkpoint import infer_config, strip_prefixes


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = MMHDiT(preset("tiny", in_channels=16))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return m.eval()


def same_output(a, b):
    """A round trip must give the same weights, bit for bit. The forward passes of two separately
    built models are only equal to rounding: the loaded tensors have other memory layouts, and
    CPU kernels may then sum in another order (4.8e-7 seen on one machine). Outputs here are O(1)
    in fp32, so 1e-5 is ~100x that rounding and far below any real difference (a wrong key or
    config changes outputs by > 1e-2)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])] == []
    torch.manual_seed(1)
    args = (torch.randn(1, 16, 4, 6), torch.rand(1), torch.randn(1, 3, 32), torch.ones(1, 3))
    torch.testing.assert_close(a(*args), b(*args), atol=1e-5, rtol=0)


def test_round_trip_with_header(model, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"note": "hi"})
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert read_checkpoint(path)[2]["note"] == "hi"
    same_output(model, loaded)
    assert not list(tmp_path.glob(".*tmp")), "atomic write left a temp file"


def test_round_trip_without_header_infers_config(model, tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_checkpoint(path)
    assert loaded.config.heads == (1, 2, 2, 4)
    assert loaded.config == model.config
    same_output(model, loaded)


def test_infers_progressive_heads_of_base_layout():
    cfg = preset("oboro-base-1b")
    with torch.device("meta"):
        sd = MMHDiT(cfg).state_dict()
    assert infer_config(sd) == cfg


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", "module.", "model."])
def test_prefixes_are_stripped(model, tmp_path, prefix):
    path = tmp_path / "p.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    same_output(model, load_checkpoint(path))


def test_strip_prefers_longest_prefix():
    assert list(strip_prefixes({"model.diffusion_model.a": 1})) == ["a"]


def test_key_map_renames_foreign_layout(model, tmp_path):
    path = tmp_path / "foreign.safetensors"
    sd = {k.replace("blocks.", "layers.", 1): v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="blocks"):
        load_checkpoint(path)
    same_output(model, load_checkpoint(path, key_map={"layers.": "blocks."}))


def test_dtype_conversion(model, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    loaded = load_checkpoint(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert not any(p.is_meta for p in loaded.parameters())


def test_wrong_shape_lists_every_problem(model, tmp_path):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["blocks.0.mlp.w1.weight"] = torch.zeros(7, 64)
    del sd["blocks.1.mlp.w2.weight"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path), metadata={"oboro_config": model.config.to_json()})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys (1): blocks.1.mlp.w2.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "blocks.0.mlp.w1.weight: file (7, 64) vs model (128, 64)" in msg


def test_truncated_file(model, tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_garbage_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable safetensors file"):
        load_checkpoint(path)


def test_bad_config_header(model, tmp_path):
    path = tmp_path / "h.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"oboro_config": json.dumps({**model.config.to_dict(), "heads": [3, 3, 3, 3]})})
    with pytest.raises(CheckpointError, match="header 'oboro_config' is invalid: layer 0: 3 heads do not divide"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["m.ckpt", "m.safetensors"])
def test_pickle_is_refused(model, tmp_path, name):
    path = tmp_path / name
    if name.endswith(".ckpt"):
        torch.save(model.state_dict(), path)
    else:  # a pickle hiding behind the safetensors suffix
        path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(CheckpointError, match="pickle/zip checkpoints are refused"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.safetensors")
