"""Mask control nodes (nodes/mask_control.py) in the embedded ComfyUI with tiny models: sampling with
OboroSampler and core KSampler, the wrapper's static K/V cache == MaskControlDiT recomputed every
step, cache lifetime, the adapter loader, mask input handling, training an adapter, the workflow."""
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from oboro.oboro_model import save_checkpoint
from oboro.oboro_model.mask_control import MaskAdapterConfig, MaskControlDiT, load_mask_adapter, save_mask_adapter
from oboro.samplers.ode import cfg_velocity, prepare_noise, solve, time_grid
from tiny import save_t5, tiny_dit, tiny_t5

REPO = Path(__file__).resolve().parents[1]
DIT, T5, ADAPTER, K = "mask_tiny.safetensors", "mask_tiny_t5.safetensors", "mask_tiny_adapter.safetensors", 4
HOLISTIC = "mask_tiny_holistic.safetensors"  # decoupled=False: tri-stream recomputed every step, no cache
POS, NEG = "a red square on a black background", "blurry"
PALETTE = "#000000,#ff0000,#00ff00,#0000ff"


@pytest.fixture(scope="module")
def adapter_dir(comfy, tmp_path_factory):
    import folder_paths
    d = str(tmp_path_factory.mktemp("oboro_mask_adapters"))
    folder_paths.add_model_folder_path("oboro_mask_adapters", d, is_default=True)
    yield Path(d)
    folder_paths.folder_names_and_paths["oboro_mask_adapters"][0].remove(d)


@pytest.fixture(scope="module")
def models(comfy, adapter_dir):
    dit = tiny_dit()
    save_checkpoint(comfy.models / "diffusion_models" / DIT, dit)
    save_t5(comfy.models / "text_encoders" / T5, tiny_t5())
    for name, decoupled in ((ADAPTER, True), (HOLISTIC, False)):  # the cached one with an image-stream LoRA
        mcd = MaskControlDiT(tiny_dit(), MaskAdapterConfig(num_labels=K, decoupled=decoupled, image_rank=4 * decoupled))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():  # LoRA "up" starts at 0: randomise everything so the mask path counts
            for p in mcd.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        save_mask_adapter(adapter_dir / name, mcd)
    return dit


def nodes():
    import nodes as comfy_nodes  # ComfyUI's top-level module
    return comfy_nodes.NODE_CLASS_MAPPINGS


def node_module():
    import sys
    return sys.modules[nodes()["OboroApplyMaskControl"].__module__]


def t5_inputs():
    return {next(iter(nodes()["OboroT5Loader"].INPUT_TYPES()["required"])): T5}


def square_labels(size=64):
    lab = torch.zeros(1, size, size, dtype=torch.long)
    lab[:, size // 4:size // 4 + size // 2, size // 4:size // 4 + size // 2] = 1
    return lab


def graph(mask_size=64, **apply):
    """Model, prompts, a 64x64 latent, a red square on black (IMAGE) and the same square as a MASK."""
    s = mask_size
    inputs = {"model": ["m", 0], "adapter": ["ad", 0], "strength": 1.0, "mask_image": ["mimg", 0],
              "palette": PALETTE}
    inputs.update(apply)
    return {
        "m": {"class_type": "OboroModelLoader", "inputs": {"model_name": DIT, "weight_dtype": "fp32"}},
        "te": {"class_type": "OboroT5Loader", "inputs": t5_inputs()},
        "pos": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": POS}},
        "neg": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": NEG}},
        "lat": {"class_type": "EmptyOboroLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                                  "channels": "16 (FLUX VAE)"}},
        "ad": {"class_type": "OboroMaskAdapterLoader", "inputs": {"adapter_name": ADAPTER}},
        "bg": {"class_type": "EmptyImage", "inputs": {"width": s, "height": s, "batch_size": 1, "color": 0}},
        "fg": {"class_type": "EmptyImage", "inputs": {"width": s // 2, "height": s // 2, "batch_size": 1,
                                                      "color": 0xFF0000}},
        "mimg": {"class_type": "ImageCompositeMasked", "inputs": {"destination": ["bg", 0], "source": ["fg", 0],
                                                                  "x": s // 4, "y": s // 4, "resize_source": False}},
        "m0": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": s, "height": s}},
        "m1": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": s // 2, "height": s // 2}},
        "region": {"class_type": "MaskComposite", "inputs": {"destination": ["m0", 0], "source": ["m1", 0],
                                                             "x": s // 4, "y": s // 4, "operation": "add"}},
        "mc": {"class_type": "OboroApplyMaskControl", "inputs": inputs},
    }


def sampler(kind, model, steps=4, cfg=4.0, seed=7, solver="euler"):
    common = {"model": [model, 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
              "seed": seed, "steps": steps, "cfg": cfg}
    if kind == "oboro":
        return {"class_type": "OboroSampler", "inputs": {**common, "solver": solver, "shift": 1.0, "denoise": 1.0}}
    return {"class_type": "KSampler", "inputs": {**common, "sampler_name": solver, "scheduler": "simple",
                                                 "denoise": 1.0}}


def run_latents(comfy, g, *sources):
    for s in sources:
        g[f"save_{s}"] = {"class_type": "SaveLatent", "inputs": {"samples": [s, 0], "filename_prefix": f"mask_{s}"}}
    result = comfy.run(g)
    return [comfy.latent(result, f"save_{s}") for s in sources]


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_nodes_are_registered(comfy):
    for n in ("OboroMaskAdapterLoader", "OboroApplyMaskControl", "OboroTrainMaskAdapter"):
        assert n in nodes(), n


def test_sampling_with_oboro_sampler_and_ksampler(comfy, models, monkeypatch):
    calls, cls = [], node_module().MaskControlDiT  # ComfyUI's copy of our package, not oboro.*
    precompute = cls.precompute_static
    monkeypatch.setattr(cls, "precompute_static", lambda self, *a, **k: calls.append(1) or precompute(self, *a, **k))
    g = graph()
    g["mc_region"] = {"class_type": "OboroApplyMaskControl", "inputs": {
        "model": ["m", 0], "adapter": ["ad", 0], "strength": 1.0, "mask": ["region", 0], "region_label": 1}}
    g.update({"ob": sampler("oboro", "mc"), "ob_plain": sampler("oboro", "m"), "ks": sampler("ksampler", "mc"),
              "ks_plain": sampler("ksampler", "m"), "ob_region": sampler("oboro", "mc_region")})
    ob, ob_plain, ks, ks_plain, ob_region = run_latents(comfy, g, "ob", "ob_plain", "ks", "ks_plain", "ob_region")
    for x in (ob, ks, ob_region):
        assert x.shape == (1, 16, 8, 8) and torch.isfinite(x).all()
    print("mask vs plain", max_diff(ob, ob_plain), "oboro vs ksampler", max_diff(ob, ks),
          "plain", max_diff(ob_plain, ks_plain))
    assert max_diff(ob, ob_plain) > 1e-3 and max_diff(ks, ks_plain) > 1e-3
    assert max_diff(ob, ks) <= 1e-5            # same Euler in t and in sigma, mask control included
    assert max_diff(ob, ob_region) <= 1e-6     # the same layout as a MASK region
    # 3 masked runs, cond and uncond (different lengths: separate batches): 2 static passes per run
    # for 4 steps x 2 forwards each
    assert len(calls) == 6, len(calls)


def pure_reference(models, labels, steps, cfg, seed, solver, adapter=ADAPTER, mask_on_negative=True):
    import folder_paths
    n = nodes()
    clip = n["OboroT5Loader"].execute(**t5_inputs())[0]
    pos, neg = (n["OboroTextEncode"].execute(clip=clip, text=t)[0][0] for t in (POS, NEG))
    pos, neg = (pos[0], pos[1]["attention_mask"]), (neg[0], neg[1]["attention_mask"])
    base = tiny_dit()
    base.load_state_dict(models.state_dict())
    mcd = load_mask_adapter(folder_paths.get_full_path("oboro_mask_adapters", adapter), base)
    noise = prepare_noise(torch.zeros(1, 16, 8, 8), seed)
    with torch.no_grad():  # static path recomputed at every call (no cache), CFG as two forwards like ComfyUI
        def model(x, t, text, text_mask):  # POS and NEG differ in length: tell them apart by it
            on = mask_on_negative or text.shape[1] == pos[0].shape[1]
            return mcd(x, t, text, text_mask, mask_labels=labels if on else None)
        velocity = lambda x, t: cfg_velocity(model, x, t, pos, neg, cfg, batched=False)  # noqa: E731
        return solve(velocity, noise, time_grid(steps), solver, open_end=True), pos, neg


@pytest.mark.parametrize("solver,adapter", [("euler", ADAPTER), ("heun", ADAPTER), ("euler", HOLISTIC)])
def test_cached_wrapper_equals_mask_control_recomputed_each_step(comfy, models, monkeypatch, solver, adapter):
    """OboroSampler over the patched MODEL == our pure sampler calling MaskControlDiT (static path
    recomputed at every call) on a plain MMHDiT; and, inside ComfyUI, cached == cache disabled."""
    g = graph()
    g["ad"]["inputs"]["adapter_name"] = adapter
    g["ob"] = sampler("oboro", "mc", steps=3, cfg=4.0, seed=5, solver=solver)
    ob, = run_latents(comfy, g, "ob")
    pure, _, _ = pure_reference(models, square_labels(), 3, 4.0, 5, solver, adapter)
    patcher = nodes()["OboroModelLoader"].execute(DIT, "fp32")[0]
    pure = patcher.model.process_latent_out(pure)  # ComfyUI hands back latents in VAE (FLUX) scale
    print(solver, adapter, "ComfyUI vs pure recomputed", max_diff(ob, pure), "scale", pure.abs().max().item())
    assert max_diff(ob, pure) <= 1e-5
    if adapter == ADAPTER:
        monkeypatch.setattr(node_module().MaskController, "static", lambda self, *a: None)  # no cache
        uncached, = run_latents(comfy, g, "ob")
        print(solver, "ComfyUI cached vs uncached", max_diff(ob, uncached))
        assert max_diff(ob, uncached) <= 1e-6


@pytest.mark.parametrize("adapter", [ADAPTER, HOLISTIC])
def test_mask_off_on_the_negative_prompt(comfy, models, adapter):
    """mask_on_negative=False: the negative prompt's forward runs without the mask (CFG then guides
    towards it too), == the pure sampler with the mask on the positive only."""
    g = graph(mask_on_negative=False)
    g["ad"]["inputs"]["adapter_name"] = adapter
    g["ob"] = sampler("oboro", "mc", steps=3, cfg=4.0, seed=5)
    g["mc_same"] = {**g["mc"], "inputs": {**g["mc"]["inputs"], "mask_on_negative": True}}
    g["ob_same"] = sampler("oboro", "mc_same", steps=3, cfg=4.0, seed=5)
    ob, same = run_latents(comfy, g, "ob", "ob_same")
    pure, _, _ = pure_reference(models, square_labels(), 3, 4.0, 5, "euler", adapter, mask_on_negative=False)
    pure = nodes()["OboroModelLoader"].execute(DIT, "fp32")[0].model.process_latent_out(pure)
    assert max_diff(ob, pure) <= 1e-5 and max_diff(ob, same) > 1e-3
    ctl = node_module().MaskController(None, square_labels(), "cpu", mask_on_negative=False)
    assert ctl.keep(4, {"cond_or_uncond": [0, 1]}).tolist() == [True, True, False, False]
    assert ctl.keep(2, {"cond_or_uncond": [1, 0]}).tolist() == [False, True]
    assert ctl.keep(2, {"cond_or_uncond": [0]}) is None


@pytest.mark.parametrize("dropped_text", ["no_tokens", "empty_prompt"])
def test_empty_prompts_are_mask_only_as_trained(comfy, models, adapter_dir, dropped_text):
    """Guided mask-only in ComfyUI (empty positive and negative prompts, mask_on_negative off): a
    "no_tokens" adapter reads ComfyUI's empty prompt T5("") as no text tokens, == the pure sampler
    with zero-length text (mask on the positive only); an "empty_prompt" one does not."""
    import folder_paths
    src = load_mask_adapter(adapter_dir / ADAPTER, tiny_dit())
    variant = MaskControlDiT(tiny_dit(), dataclasses.replace(src.cfg, dropped_text=dropped_text))
    variant.load_adapter_state_dict(src.adapter_state_dict(), "test")
    name = f"mask_tiny_{dropped_text}.safetensors"
    save_mask_adapter(adapter_dir / name, variant)
    g = graph(mask_on_negative=False)
    g["ad"]["inputs"]["adapter_name"] = name
    g["pos"]["inputs"]["text"] = g["neg"]["inputs"]["text"] = ""
    g["ob"] = sampler("oboro", "mc", steps=3, cfg=2.0, seed=5)
    ob, = run_latents(comfy, g, "ob")
    base = tiny_dit()
    base.load_state_dict(models.state_dict())
    mcd = load_mask_adapter(folder_paths.get_full_path("oboro_mask_adapters", name), base)
    none = (torch.zeros(1, 0, base.config.text_dim), torch.zeros(1, 0, dtype=torch.bool))
    with torch.no_grad():
        def model(x, t, text, text_mask):  # positive: mask; negative: no mask (told apart by identity)
            return mcd(x, t, text, text_mask, mask_labels=square_labels() if text is pos[0] else None)
        pos, neg = none, (none[0].clone(), none[1].clone())
        velocity = lambda x, t: cfg_velocity(model, x, t, pos, neg, 2.0, batched=False)  # noqa: E731
        pure = solve(velocity, prepare_noise(torch.zeros(1, 16, 8, 8), 5), time_grid(3), "euler", open_end=True)
    pure = nodes()["OboroModelLoader"].execute(DIT, "fp32")[0].model.process_latent_out(pure)
    print(dropped_text, "ComfyUI empty prompts vs pure no tokens", max_diff(ob, pure))
    if dropped_text == "no_tokens":
        assert max_diff(ob, pure) <= 1e-5
    else:
        assert max_diff(ob, pure) > 1e-3


def test_cache_lifetime_and_base_model_untouched(comfy, models):
    from oboro.nodes.mask_control import mask_controller
    n = nodes()
    patcher = n["OboroModelLoader"].execute(DIT, "fp32")[0]
    clip = n["OboroT5Loader"].execute(**t5_inputs())[0]
    pos, neg = (n["OboroTextEncode"].execute(clip=clip, text=t)[0] for t in (POS, NEG))
    lat = {"samples": torch.zeros(1, 16, 8, 8)}
    run = lambda m: n["OboroSampler"].execute(m, pos, neg, lat, 1, 3, 4.0, "heun", 1.0, 1.0)[0]["samples"]
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    masked = n["OboroApplyMaskControl"].execute(model=patcher, adapter=n["OboroMaskAdapterLoader"].execute(ADAPTER)[0],
                                               strength=1.0, mask=mask)[0]
    ctl = mask_controller(masked)
    before = run(patcher)
    a = run(masked)
    # heun, 3 steps (open end: ralston2 last): 6 model calls, each cond and uncond -> 2 static passes
    assert (ctl.misses, ctl.hits, len(ctl.cache)) == (2, 10, 0)
    assert torch.equal(run(masked), a) and ctl.misses == 4 and len(ctl.cache) == 0
    # equal-length prompts: ComfyUI batches cond + uncond (B = 2): one static pass for both chunks
    n["OboroSampler"].execute(masked, pos, pos, lat, 1, 3, 4.0, "heun", 1.0, 1.0)
    assert (ctl.misses, ctl.hits, len(ctl.cache)) == (5, 25, 0)
    assert mask_controller(patcher) is None
    after = run(patcher)
    assert torch.equal(before, after) and max_diff(a, before) > 1e-3


def test_adapter_round_trip_via_loader(comfy, models, adapter_dir):
    adapter = nodes()["OboroMaskAdapterLoader"].execute(ADAPTER)[0]
    saved = load_file(str(adapter_dir / ADAPTER))
    assert adapter.cfg.to_json() == MaskAdapterConfig(num_labels=K, image_rank=4).to_json() and set(adapter.sd) == set(saved)
    assert all(torch.equal(adapter.sd[k], saved[k]) for k in saved)
    patcher = nodes()["OboroModelLoader"].execute(DIT, "fp32")[0]
    mcd = adapter.build(patcher.model.diffusion_model, 1.0)
    assert all(torch.equal(v, saved[k]) for k, v in mcd.state_dict().items() if not k.startswith("base."))
    other = dataclasses.replace(adapter, base_config={**adapter.base_config, "hidden_size": 128})
    with pytest.raises(ValueError, match="different base model.*hidden_size"):
        nodes()["OboroApplyMaskControl"].execute(model=patcher, adapter=other, strength=1.0, mask=torch.ones(1, 8, 8))
    (adapter_dir / "not_an_adapter.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        nodes()["OboroMaskAdapterLoader"].execute("not_an_adapter.safetensors")


def test_wrong_size_mask_image_is_resized_with_a_notice(comfy, models, caplog):
    g = graph(mask_size=100)
    g.update({"ob": sampler("oboro", "mc", steps=2), "ob64": sampler("oboro", "m", steps=2)})
    with caplog.at_level(logging.WARNING):
        ob, _ = run_latents(comfy, g, "ob", "ob64")
    assert torch.isfinite(ob).all()
    assert any("100x100" in r.getMessage() and "resized" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("which", ["neither", "both"])
def test_neither_or_both_mask_inputs_is_a_clear_error(comfy, models, which):
    from oboro.runner.embedded import GraphError
    g = graph(**({"mask": ["region", 0]} if which == "both" else {}))
    if which == "neither":
        del g["mc"]["inputs"]["mask_image"]
    g["ob"] = sampler("oboro", "mc", steps=1)
    with pytest.raises(GraphError, match=f"exactly one of mask_image.*got {which}"):
        run_latents(comfy, g, "ob")


def test_bad_palette_and_labels(comfy, models):
    from oboro.nodes.mask_control import parse_palette
    assert parse_palette("#000000, ff0000") == [(0, 0, 0), (255, 0, 0)]
    for bad in ("#00000", "#000000", "#000000,#gg0000"):
        with pytest.raises(ValueError, match="palette|colour"):
            parse_palette(bad)
    n = nodes()
    patcher, adapter = n["OboroModelLoader"].execute(DIT, "fp32")[0], n["OboroMaskAdapterLoader"].execute(ADAPTER)[0]
    with pytest.raises(ValueError, match="not in the palette"):
        n["OboroApplyMaskControl"].execute(model=patcher, adapter=adapter, strength=1.0,
                                           mask_image=torch.full((1, 8, 8, 3), 0.5), palette="#000000,#ffffff")
    with pytest.raises(ValueError, match="region_label 4"):
        n["OboroApplyMaskControl"].execute(model=patcher, adapter=adapter, strength=1.0, mask=torch.ones(8, 8),
                                           region_label=4)


def write_mask_dataset(root: Path, size=64):
    """images/<stem>.png + .txt and masks/<stem>.png (palette PNG, 0 background, 1 circle, 2 square,
    3 triangle): demo/data.py's layout."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    shapes = [(1, (220, 40, 40)), (2, (40, 170, 60)), (3, (40, 70, 220)), (2, (235, 205, 30))]
    for i, (shape, colour) in enumerate(shapes):
        lab = np.zeros((size, size), np.uint8)
        lo, hi = 8 + 4 * i, 40 + 4 * i
        lab[lo:hi, lo:hi] = shape
        img = np.full((size, size, 3), 245, np.uint8)
        img[lab > 0] = colour
        Image.fromarray(img).save(root / "images" / f"s{i}.png")
        (root / "images" / f"s{i}.txt").write_text(f"shape {shape}")
        m = Image.fromarray(lab, "P")
        m.putpalette([0, 0, 0, 230, 80, 80, 80, 200, 80, 80, 120, 230])
        m.save(root / "masks" / f"s{i}.png")


def test_train_mask_adapter_writes_a_loadable_adapter(comfy, models, adapter_dir, tmp_path):
    import torch.nn.functional as F
    from oboro.oboro_model.data import OboroDataset, build_cache
    write_mask_dataset(tmp_path / "data")
    ds = OboroDataset(tmp_path / "data" / "images", policy="fixed", size=64)

    def encode_text(captions):  # stand-in T5: deterministic [L, 32] states
        g = torch.Generator().manual_seed(len(captions))
        return [torch.randn(3, 32, generator=g) for _ in captions], [torch.ones(3, dtype=torch.long) for _ in captions]
    build_cache(ds, tmp_path / "cache", lambda px: F.avg_pool2d(px, 8).repeat(1, 6, 1, 1)[:, :16], encode_text, {})
    g = {"m": {"class_type": "OboroModelLoader", "inputs": {"model_name": DIT, "weight_dtype": "fp32"}},
         "train": {"class_type": "OboroTrainMaskAdapter", "inputs": {
             "model": ["m", 0], "cache_dir": str(tmp_path / "cache"), "mask_dir": str(tmp_path / "data" / "masks"),
             "output_name": "trained_mask", "steps": 3, "batch_size": 2, "lr": 1e-3, "rank": 4, "image_rank": 2, "seed": 0,
             "num_labels": 0, "condition_dropout": 0.5, "precision": "fp32", "clip": ["te", 0]}},
         "mc": {"class_type": "OboroApplyMaskControl", "inputs": {
             "model": ["m", 0], "adapter": ["train", 2], "strength": 1.0, "mask": ["region", 0], "region_label": 2}},
         "region": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
         "te": {"class_type": "OboroT5Loader", "inputs": t5_inputs()},
         "pos": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": POS}},
         "neg": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": NEG}},
         "lat": {"class_type": "EmptyOboroLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                                   "channels": "16 (FLUX VAE)"}},
         "ob": sampler("oboro", "mc", steps=2)}
    g["save_ob"] = {"class_type": "SaveLatent", "inputs": {"samples": ["ob", 0], "filename_prefix": "mask_trained"}}
    result = comfy.run(g)
    summary = json.loads(result["outputs"]["train"]["text"][0])
    path = Path(summary["path"])
    assert path == adapter_dir / "trained_mask.safetensors" and path.is_file() and summary["steps"] == 3
    assert summary["num_labels"] == 4 and np.isfinite(summary["final_loss"])
    mcd = load_mask_adapter(path, tiny_dit())
    assert mcd.cfg.num_labels == 4 and mcd.cfg.rank == 4 and mcd.cfg.vae_scale == 8
    assert mcd.adapters[0]["qkv"].up.abs().max() > 0  # trained (starts at 0)
    assert mcd.cfg.image_rank == 2 and mcd.image_adapters[0]["w2"].up.abs().max() > 0
    assert mcd.cfg.dropped_text == "empty_prompt"  # the T5 was connected: a dropped text was T5("")
    assert nodes()["OboroMaskAdapterLoader"].execute("trained_mask.safetensors")[0].cfg.to_json() == mcd.cfg.to_json()

    # on the training engine: 2 steps, then resume_from 'latest' up to 3 == the straight 3-step run
    train = {"m": g["m"], "te": g["te"], "train": {**g["train"], "inputs": {**g["train"]["inputs"], "output_name": "resumed"}}}
    train["train"]["inputs"]["steps"] = 2
    comfy.run(train)
    train["train"]["inputs"].update(steps=3, resume_from="latest")
    again = json.loads(comfy.run(train)["outputs"]["train"]["text"][0])
    assert again["steps"] == 3 and Path(again["state_dir"]).name == "resumed_mask"
    straight, resumed = load_file(str(path)), load_file(again["path"])
    assert set(straight) == set(resumed) and all(torch.equal(straight[k], resumed[k]) for k in straight)
    train["train"]["inputs"].update(resume_from="")
    with pytest.raises(Exception, match="already holds training states"):
        comfy.run(train)
    # with the T5 connected a dropped text is T5(""), without it no tokens: other training
    del train["train"]["inputs"]["clip"]
    train["train"]["inputs"].update(output_name="no_clip")
    no_clip_path = json.loads(comfy.run(train)["outputs"]["train"]["text"][0])["path"]
    no_clip = load_file(no_clip_path)
    assert not all(torch.equal(straight[k], no_clip[k]) for k in straight)
    assert load_mask_adapter(no_clip_path, tiny_dit()).cfg.dropped_text == "no_tokens"


def test_mask_label_alignment_replays_the_cache_crop(tmp_path):
    from oboro.nodes.mask_training import load_label_mask
    from oboro.oboro_model.data import crop_box
    import random
    lab = np.arange(40 * 30, dtype=np.uint8).reshape(30, 40) % 7
    Image.fromarray(lab, "L").save(tmp_path / "m.png")
    item, settings = {"file": "a/b.jpg", "bucket": [16, 16]}, {"crop": "random", "seed": 3}
    got = load_label_mask(tmp_path / "m.png", item, settings, None)
    box = crop_box((40, 30), (16, 16), "random", random.Random("3/0/a/b.jpg"))
    want = np.asarray(Image.fromarray(lab).resize((16, 16), Image.Resampling.NEAREST, box=box))
    assert got.shape == (16, 16) and np.array_equal(got.numpy(), want)


def test_workflow_ui_equals_api_twin(comfy):
    from oboro.runner import convert
    ui = convert.load(REPO / "example_workflows" / "oboro_mask_text.json")
    api = convert.load(REPO / "workflows" / "api" / "oboro_mask_text.api.json")
    assert convert.is_ui(ui) and ui["version"] == 0.4 and not convert.is_ui(api)
    assert convert.to_api(ui, convert.local_node_defs()) == api
    kinds = sorted(n["class_type"] for n in api.values())
    assert kinds == sorted(["OboroModelLoader", "OboroT5Loader", "VAELoader", "LoadImage", "OboroMaskAdapterLoader",
                            "OboroApplyMaskControl", "OboroTextEncode", "OboroTextEncode", "EmptyOboroLatentImage",
                            "OboroSampler", "VAEDecode", "SaveImage"])
