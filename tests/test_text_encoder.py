"""OboroT5Loader / OboroTextEncode against transformers' T5EncoderModel, on a tiny random T5 saved
in the layouts users have: Hugging Face sharded safetensors and ComfyUI single files."""
import logging

import pytest
import torch
from safetensors.torch import save_file

SUB = "te_test"  # own subfolder: other test modules write their own tiny_t5 files
PROMPT = "a watercolor fox sleeping under a red maple tree, soft morning light"


@pytest.fixture(scope="module")
def t5(comfy):
    """Tiny T5 v1.1 (gated-gelu) written to models/text_encoders in several layouts."""
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
    model = T5EncoderModel(cfg).eval()
    for p in model.parameters():  # random init has tiny attention weights; make every path count
        torch.nn.init.normal_(p, std=0.5)
    d = comfy.models / "text_encoders" / SUB
    d.mkdir(exist_ok=True)
    model.save_pretrained(d / "tiny_hf", safe_serialization=True, max_shard_size="200KB")
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}  # clone the tied embeddings
    save_file(sd, d / "tiny_t5.safetensors")
    save_file({"text_encoders.t5xxl.transformer." + k: v for k, v in sd.items()}, d / "tiny_t5_prefixed.safetensors")
    save_file({k: v.half() for k, v in sd.items()}, d / "tiny_t5_fp16.safetensors")
    broken = {k: v for k, v in sd.items() if k != "encoder.block.1.layer.0.SelfAttention.k.weight"}
    save_file(broken, d / "tiny_t5_broken.safetensors")
    torch.save(sd, d / "tiny_t5.pt")
    return model


def load(name, weight_dtype="fp32"):
    from oboro.nodes.text_encoder import OboroT5Loader
    return OboroT5Loader.execute(f"{SUB}/{name}", weight_dtype)[0]


def encode(clip, text, max_tokens=256):
    from oboro.nodes.text_encoder import OboroTextEncode
    (cond, extra), = OboroTextEncode.execute(clip, text, max_tokens)[0]
    return cond, extra


def reference(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).last_hidden_state


def test_hf_shards_present(t5, comfy):
    files = sorted(p.name for p in (comfy.models / "text_encoders" / SUB / "tiny_hf").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) >= 2


@pytest.mark.parametrize("name", ["tiny_hf/model-00001-of-00002.safetensors", "tiny_hf/model-00002-of-00002.safetensors",
                                  "tiny_t5.safetensors", "tiny_t5_prefixed.safetensors"])
def test_matches_transformers(t5, name):
    import os
    import comfy.text_encoders.sd3_clip as sd3
    from transformers import T5TokenizerFast
    clip = load(name)
    t5xxl = clip.cond_stage_model.t5xxl
    assert t5xxl.enable_attention_masks and t5xxl.return_attention_masks
    ids = [t for t, _ in clip.tokenize(PROMPT)["t5xxl"][0]]
    tok = T5TokenizerFast.from_pretrained(os.path.join(os.path.dirname(sd3.__file__), "t5_tokenizer"))
    assert ids == tok(PROMPT).input_ids and ids[-1] == 1  # same ids as HF, EOS last, no padding
    cond, extra = encode(clip, PROMPT)
    assert cond.dtype == torch.float32 and cond.shape == (1, len(ids), 32)
    assert torch.equal(extra["attention_mask"].cpu(), torch.ones(1, len(ids), dtype=extra["attention_mask"].dtype))
    ref = reference(t5, ids)
    assert (cond.cpu() - ref).abs().max().item() <= 1e-4
    assert ref.abs().mean() > 0.1  # not a degenerate comparison


def test_truncation_keeps_eos_and_warns(t5, caplog):
    clip = load("tiny_t5.safetensors")
    full, _ = encode(clip, PROMPT)
    with caplog.at_level(logging.WARNING):
        cond, extra = encode(clip, PROMPT, max_tokens=5)
    assert cond.shape[1] == 5 and extra["attention_mask"].shape == (1, 5)
    dropped = full.shape[1] - 5
    assert any(f"dropped its last {dropped} tokens" in r.getMessage() for r in caplog.records)
    ids = [t for t, _ in clip.tokenize(PROMPT)["t5xxl"][0]]
    assert (cond.cpu() - reference(t5, ids[:4] + [1])).abs().max().item() <= 1e-4


def test_no_warning_when_within_budget(t5, caplog):
    clip = load("tiny_t5.safetensors")
    with caplog.at_level(logging.WARNING):
        encode(clip, PROMPT)
    assert not any("dropped" in r.getMessage() for r in caplog.records)


def test_empty_prompt_is_eos_only(t5):
    cond, extra = encode(load("tiny_t5.safetensors"), "")
    assert cond.shape == (1, 1, 32) and extra["attention_mask"].tolist() == [[1]]
    assert (cond.cpu() - reference(t5, [1])).abs().max().item() <= 1e-4


def test_fp16_single_file(t5):
    clip = load("tiny_t5_fp16.safetensors", "default")
    assert clip.cond_stage_model.t5xxl.transformer.shared.weight.dtype == torch.float16
    cond, extra = encode(clip, PROMPT)
    ids = [t for t, _ in clip.tokenize(PROMPT)["t5xxl"][0]]
    assert cond.dtype == torch.float32 and torch.isfinite(cond).all()
    assert (cond.cpu() - reference(t5, ids)).abs().max().item() < 0.05  # fp16 storage, fp32 compute


def test_missing_key_names_file_and_key(t5):
    with pytest.raises(ValueError, match=r"tiny_t5_broken\.safetensors.*encoder\.block\.1\.layer\.0\.SelfAttention\.k\.weight"):
        load("tiny_t5_broken.safetensors")


def test_pickle_refused(t5):
    with pytest.raises(ValueError, match=r"tiny_t5\.pt: refusing to load a pickle"):
        load("tiny_t5.pt")


def test_inferred_config(t5, comfy):
    from oboro.nodes.text_encoder import checkpoint_files, infer_t5_config, normalize_keys
    from safetensors.torch import load_file
    index = comfy.models / "text_encoders" / SUB / "tiny_hf" / "model.safetensors.index.json"
    files = checkpoint_files(index)
    assert len(files) >= 2
    sd = normalize_keys({k: v for f in files for k, v in load_file(f).items()})
    assert infer_t5_config(sd, index) == {"vocab_size": 32128, "d_model": 32, "num_heads": 4, "d_kv": 8, "d_ff": 64,
                                          "num_layers": 2, "is_gated_act": True,
                                          "dense_act_fn": "gelu_pytorch_tanh", "model_type": "t5"}


def test_loader_to_encode_chain_and_registration(t5, comfy):
    """Both nodes are registered with ComfyUI; loader output feeds the encoder (called directly)."""
    mappings = comfy.embedded.node_class_mappings()
    assert "OboroT5Loader" in mappings and "OboroTextEncode" in mappings
    clip = mappings["OboroT5Loader"].execute(f"{SUB}/tiny_t5.safetensors", "fp32")[0]
    (cond, extra), = mappings["OboroTextEncode"].execute(clip, "a cat", 256)[0]
    assert cond.shape[:2] == extra["attention_mask"].shape and cond.shape[-1] == 32
