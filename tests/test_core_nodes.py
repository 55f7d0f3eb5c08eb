"""Core ComfyUI model patches and caches on an oboro MODEL, through the executor (issue: extension
points): EasyCache, LazyCache, SkipLayerGuidanceDiT, ("double_block", i) block patches,
TorchCompileModel, LoRA, and all of them stacked on mask control. Model work is counted as block
forwards (a global forward pre-hook observing model.Block by name: ComfyUI imports this package
under its own module name; nothing is replaced)."""
import contextlib

import pytest
import torch
from safetensors.torch import save_file

from oboro.oboro_model import save_checkpoint
from tiny import TEXT_DIM, save_t5, tiny_dit, tiny_t5

DIT, T5, LORA, STEPS = "core_tiny.safetensors", "core_tiny_t5.safetensors", "core_tiny_lora.safetensors", 12
DEPTH = 4  # the tiny preset


@pytest.fixture(scope="module")
def models(comfy):
    dit = tiny_dit()
    save_checkpoint(comfy.models / "diffusion_models" / DIT, dit)
    save_t5(comfy.models / "text_encoders" / T5, tiny_t5())
    g = torch.Generator().manual_seed(5)
    lora = {}
    for key in ("blocks.1.attn.qkv", "blocks.2.mlp.w1"):
        w = dit.state_dict()[key + ".weight"]
        lora[f"diffusion_model.{key}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.3
        lora[f"diffusion_model.{key}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.3
    save_file(lora, str(comfy.models / "loras" / LORA))
    return dit


def graph(*patches, steps=STEPS):
    """Loader -> patches (each (class_type, inputs) taking the previous MODEL) -> KSampler euler."""
    g = {
        "m0": {"class_type": "OboroModelLoader", "inputs": {"model_name": DIT, "weight_dtype": "fp32"}},
        "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": T5}},
        "pos": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": "a red circle on blue"}},
        "neg": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": "blurry"}},
        "lat": {"class_type": "EmptyOboroLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                                  "channels": "16 (FLUX VAE)"}},
    }
    for i, (kind, inputs) in enumerate(patches, 1):
        g[f"m{i}"] = {"class_type": kind, "inputs": {"model": [f"m{i - 1}", 0], **inputs}}
    g["ks"] = {"class_type": "KSampler", "inputs": {
        "model": [f"m{len(patches)}", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
        "seed": 3, "steps": steps, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "core_nodes"}}
    return g


def run_counted(comfy, g):
    """(latent, number of block forwards) of one executor run."""
    calls = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: calls.append(1) if type(m).__name__ == "Block" else None)
    try:
        latent = comfy.latent(comfy.run(g), "save")
    finally:
        hook.remove()
    return latent, len(calls)


def easycache(threshold, start=0.0, end=1.0):
    return ("EasyCache", {"reuse_threshold": threshold, "start_percent": start, "end_percent": end, "verbose": False})


def lazycache(threshold, start=0.0, end=1.0):
    return ("LazyCache", {"reuse_threshold": threshold, "start_percent": start, "end_percent": end, "verbose": False})


def slg(scale, layers="1"):
    return ("SkipLayerGuidanceDiT", {"double_layers": layers, "single_layers": "", "scale": scale,
                                     "start_percent": 0.0, "end_percent": 1.0, "rescaling_scale": 0.0})


LORA_NODE = ("LoraLoaderModelOnly", {"lora_name": LORA, "strength_model": 1.0})


@pytest.fixture(scope="module")
def plain(comfy, models):
    return run_counted(comfy, graph())


@pytest.mark.parametrize("cache", [easycache, lazycache])
def test_core_caches_skip_model_work_and_are_exact_when_off(comfy, models, plain, cache):
    ref, ref_calls = plain
    # Different prompt lengths: cond and uncond run as separate model calls, DEPTH blocks each.
    assert ref_calls == STEPS * 2 * DEPTH
    cached, calls = run_counted(comfy, graph(cache(0.5)))
    err = float((cached - ref).norm() / ref.norm())
    print(cache.__name__, "block forwards", calls, "of", ref_calls, "relative error", err)
    # Skipped calls reuse cached changes: close to the uncached result, not equal. (EasyCache adds
    # into the model input in place; an fp32 run once turned that into noise, error ~1.)
    assert calls < ref_calls * 0.8 and err < 0.4
    off, off_calls = run_counted(comfy, graph(cache(0.0)))  # threshold 0: never reuses
    assert off_calls == ref_calls
    assert (off - ref).abs().max() <= 1e-6
    late, late_calls = run_counted(comfy, graph(cache(3.0, start=0.99, end=1.0)))  # window after the run's steps
    assert late_calls == ref_calls and (late - ref).abs().max() <= 1e-6


def test_skip_layer_guidance_runs_the_patched_blocks(comfy, models, plain):
    ref, ref_calls = plain
    zero, zero_calls = run_counted(comfy, graph(slg(0.0)))
    assert zero_calls == ref_calls and torch.equal(zero, ref)
    guided, calls = run_counted(comfy, graph(slg(3.0)))
    # One more cond pass per step with block 1 replaced by the skip patch: DEPTH - 1 blocks ran.
    assert calls - ref_calls == STEPS * (DEPTH - 1)
    assert (guided - ref).abs().max() > 1e-3


def ksample(patcher, pos, neg, steps=4):
    import nodes as comfy_nodes
    lat = {"samples": torch.zeros(1, 16, 8, 8)}
    return comfy_nodes.common_ksampler(patcher, 3, steps, 4.0, "euler", "simple", pos, neg, lat)[0]["samples"]


def conds():
    import nodes as comfy_nodes
    n = comfy_nodes.NODE_CLASS_MAPPINGS
    clip = n["OboroT5Loader"].execute(t5_name=T5)[0]
    return [n["OboroTextEncode"].execute(clip=clip, text=t)[0] for t in ("a red circle on blue", "blurry")]


def test_block_patch_contract_identity_is_bit_equal(comfy, models):
    import nodes as comfy_nodes
    patcher = comfy_nodes.NODE_CLASS_MAPPINGS["OboroModelLoader"].execute(DIT, "fp32")[0]
    pos, neg = conds()
    seen = []

    def identity(args, extra):
        seen.append((args["transformer_options"]["block_index"], args["transformer_options"]["total_blocks"],
                     args["txt"].shape[1], args["img"].shape[1], args["vec"].shape, args["attn_mask"] is None))
        return extra["original_block"](args)

    patched = patcher.clone()
    for i in range(DEPTH):
        patched.set_model_patch_replace(identity, "dit", "double_block", i)
    assert torch.equal(ksample(patched, pos, neg), ksample(patcher, pos, neg))
    # txt = BOS + the prompt's tokens, img = 8x8 latent / patch 2 = 16 tokens, vec [B, adaln_dim]
    assert {s[0] for s in seen} == set(range(DEPTH)) and {s[1] for s in seen} == {DEPTH}
    assert all(s[3] == 16 and s[4] == (1, 64) for s in seen)


def test_mmhdit_has_no_dynamo_graph_breaks():
    import torch._dynamo
    torch._dynamo.reset()
    model = tiny_dit()
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.7])
    text, mask = torch.randn(2, 6, TEXT_DIM), torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    explained = torch._dynamo.explain(model)(x, t, text, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_torch_compile_model_samples(comfy, models, plain, one_thread):
    import torch._dynamo
    torch._dynamo.reset()
    ref, _ = run_counted(comfy, graph(steps=STEPS))
    compiled, _ = run_counted(comfy, graph(("TorchCompileModel", {"backend": "inductor"})))
    # Inductor fuses and reorders float ops: equal up to rounding, not bitwise.
    assert (compiled - ref).abs().max() <= 1e-4


@contextlib.contextmanager
def with_mask_control(comfy, folder):
    """Yields with_mask(*patches): graph() with a random mask adapter applied right after the loader."""
    import folder_paths
    from oboro.oboro_model.mask_control import MaskAdapterConfig, MaskControlDiT, save_mask_adapter
    folder_paths.add_model_folder_path("oboro_mask_adapters", str(folder), is_default=True)
    try:
        mcd = MaskControlDiT(tiny_dit(), MaskAdapterConfig(num_labels=2, image_rank=4))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in mcd.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        save_mask_adapter(folder / "core_mask.safetensors", mcd)

        def with_mask(*patches):
            g = graph(*patches)
            g["ad"] = {"class_type": "OboroMaskAdapterLoader", "inputs": {"adapter_name": "core_mask.safetensors"}}
            g["m0s"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
            g["mc"] = {"class_type": "OboroApplyMaskControl", "inputs": {"model": ["m0", 0], "adapter": ["ad", 0],
                                                                         "strength": 1.0, "mask": ["m0s", 0]}}
            g["m1"]["inputs"]["model"] = ["mc", 0]
            return g
        yield with_mask
    finally:
        folder_paths.folder_names_and_paths["oboro_mask_adapters"][0].remove(str(folder))


def test_everything_stacks_on_mask_control(comfy, models, tmp_path):
    """Mask control + LoRA + EasyCache or LazyCache + SkipLayerGuidanceDiT on one MODEL."""
    with with_mask_control(comfy, tmp_path) as with_mask:
        lora_only, lora_calls = run_counted(comfy, with_mask(LORA_NODE))
        masked, _ = run_counted(comfy, graph(LORA_NODE))
        assert (lora_only - masked).abs().max() > 1e-3  # the mask changes the result
        off, off_calls = run_counted(comfy, with_mask(LORA_NODE, easycache(0.0)))
        assert off_calls == lora_calls and (off - lora_only).abs().max() <= 1e-6
        # EasyCache and LazyCache each, not both: core keeps either one's state under the same
        # transformer_options["easycache"] key, so stacking them fails on any model (README).
        for cache in (easycache, lazycache):
            stacked, calls = run_counted(comfy, with_mask(LORA_NODE, cache(3.0), slg(3.0)))
            print(f"mask + LoRA + {cache.__name__} + SLG: block forwards", calls, "vs", lora_calls)
            assert torch.isfinite(stacked).all() and calls < lora_calls
