"""OboroTrainLoRA / OboroTrainFull inside ComfyUI's executor: a tiny pixel-space model (3 channels,
text_dim 32), a tiny T5 and core's pixel_space VAE, trained a few steps on four images cached at 64x32 by
OboroCacheLatents. The LoRA file equals the node's MODEL under core LoraLoaderModelOnly, the full
checkpoint loads with OboroModelLoader, resume continues the step count, interrupt leaves a resumable
state; plus the shipped training workflows' UI/API twins. (Bucket-per-step batching is the core
Trainer's: tests/test_ddp.py; node = CLI = DDP weights: tests/test_train_equivalence.py.)"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from oboro.oboro_model import MMHDiT, preset, save_checkpoint
from oboro.oboro_model.training import list_checkpoints

TEXT_DIM = 32
SUB = "train_nodes"
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(comfy, tmp_path_factory):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    dit = MMHDiT(preset("tiny", in_channels=3, text_dim=TEXT_DIM))
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    for kind in ("diffusion_models", "text_encoders"):
        (comfy.models / kind / SUB).mkdir(exist_ok=True)
    save_checkpoint(comfy.models / "diffusion_models" / SUB / "tiny_px.safetensors", dit)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=TEXT_DIM, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                 feed_forward_proj="gated-gelu"))
    save_file({k: v.contiguous().clone() for k, v in t5.state_dict().items()},
              str(comfy.models / "text_encoders" / SUB / "tiny_t5.safetensors"))
    root = tmp_path_factory.mktemp("train_ds")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(["a red square", "a blue circle", "green noise", "white text"][i])
    return SimpleNamespace(model=f"{SUB}/tiny_px.safetensors", t5=f"{SUB}/tiny_t5.safetensors", data=str(root))


def graph(setup, node="OboroTrainLoRA", sample=True, **over):
    train = {"model": ["m", 0], "cache_dir": ["cache", 0], "clip": ["te", 0], "output_name": "tn_lora", "steps": 6,
             "batch_size": 2, "lr": 1e-3, "warmup": 0, "schedule": "constant", "optimizer": "adamw", "grad_accum": 1,
             "clip_grad_norm": 1.0, "precision": "fp32", "gradient_checkpointing": False, "caption_dropout": 0.1,
             "t_sampling": "uniform", "spike_guard": True, "seed": 0, "checkpoint_every": 3, "keep_last": 2,
             "preview_prompts": "a red square\n\na blue circle", "preview_every": 3, "preview_steps": 2,
             "preview_cfg": 3.0, "preview_seed": 1}
    train.update({"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": "all"} if node == "OboroTrainLoRA"
                 else {"save_dtype": "fp32"})
    train.update(over)
    g = {
        "m": {"class_type": "OboroModelLoader", "inputs": {"model_name": setup.model, "weight_dtype": "fp32"}},
        "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": setup.t5}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "cache": {"class_type": "OboroCacheLatents", "inputs": {
            "dataset_dir": setup.data, "vae": ["vae", 0], "clip": ["te", 0], "policy": "fixed", "size": 64,
            "height": 32, "area": 64 * 64, "max_tokens": 16, "cache_name": SUB}},
        "train": {"class_type": node, "inputs": train},
        "curve": {"class_type": "SaveImage", "inputs": {"images": ["train", 2], "filename_prefix": "tn/curve"}},
        "prev": {"class_type": "SaveImage", "inputs": {"images": ["train", 3], "filename_prefix": "tn/prev"}},
    }
    if sample:
        g.update(sampler_nodes(["train", 0]))
    return g


def sampler_nodes(model, suffix=""):
    """OboroSampler on `model` (a link) -> SaveLatent `save{suffix}`: a fixed prompt, seed and noise."""
    return {
        f"pos{suffix}": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": "a red square"}},
        f"neg{suffix}": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": ""}},
        f"lat{suffix}": {"class_type": "EmptyOboroLatentImage", "inputs": {
            "width": 64, "height": 32, "batch_size": 1, "channels": "3 (pixel space)"}},
        f"ks{suffix}": {"class_type": "OboroSampler", "inputs": {
            "model": model, "positive": [f"pos{suffix}", 0], "negative": [f"neg{suffix}", 0],
            "latent_image": [f"lat{suffix}", 0], "seed": 3, "steps": 3, "cfg": 4.0, "solver": "euler", "shift": 1.0,
            "denoise": 1.0}},
        f"save{suffix}": {"class_type": "SaveLatent", "inputs": {"samples": [f"ks{suffix}", 0],
                                                                 "filename_prefix": f"tn/lat{suffix}"}},
    }


def summary(result):
    return json.loads(result["outputs"]["train"]["text"][0])


def saved(comfy, result, node, key="images"):
    return [comfy.output / f["subfolder"] / f["filename"] for f in result["outputs"][node][key]]


def latent(comfy, result, node="save"):
    return load_file(str(saved(comfy, result, node, "latents")[0]))["latent_tensor"]


class FakeServer:
    def __init__(self):
        self.texts = []

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((node_id, text))


def test_lora_node_file_equals_model_output(comfy, setup, monkeypatch):
    server = FakeServer()
    if "server" in sys.modules:  # the browser's progress text, caught on its way out
        monkeypatch.setattr(sys.modules["server"].PromptServer, "instance", server, raising=False)
    res = comfy.run(graph(setup))
    monkeypatch.undo()
    s = summary(res)
    lora = comfy.models / "loras" / "tn_lora.safetensors"
    assert s["path"] == str(lora.resolve()) and lora.is_file() and (s["start_step"], s["step"]) == (0, 6)
    assert s["preview_steps"] == [3, 6] and s["items"] == 4
    sd = load_file(str(lora))
    assert any(k.endswith("mlp.w1.lora_up.weight") for k in sd) and all(k.startswith("diffusion_model.") for k in sd)
    assert max(v.abs().max() for k, v in sd.items() if "lora_up" in k) > 0  # trained (peft starts B at 0)
    states = list_checkpoints(comfy.output / "oboro_training" / "tn_lora")
    assert [p.name for p in states] == ["step_00000003.safetensors", "step_00000006.safetensors"]
    curve, = saved(comfy, res, "curve")
    img = np.asarray(Image.open(curve))
    assert img.shape == (450, 800, 3) and img.std() > 5  # a drawn plot, not a blank canvas
    prev = saved(comfy, res, "prev")
    assert len(prev) == 2 and Image.open(prev[0]).size == (128, 32)  # 2 preview steps x 2 prompts side by side
    assert all(np.asarray(Image.open(p)).std() > 1 for p in prev)  # rendered, not the black placeholder
    if "server" in sys.modules:
        assert any("loss" in t and "lr" in t and "it/s" in t for _, t in server.texts), server.texts
    trained = latent(comfy, res)

    g = {k: v for k, v in graph(setup, sample=False).items() if k in ("m", "te")}
    g["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["m", 0], "lora_name": "tn_lora.safetensors", "strength_model": 1.0}}
    g.update(sampler_nodes(["lora", 0]))
    g.update(sampler_nodes(["m", 0], "_base"))
    res = comfy.run(g)
    via_loader, base = latent(comfy, res), latent(comfy, res, "save_base")
    assert (trained - base).abs().max() > 1e-4  # the LoRA changes the model...
    torch.testing.assert_close(trained, via_loader, atol=1e-5, rtol=0)  # ...exactly as the saved file does


def test_full_finetune_loads_and_resumes(comfy, setup):
    res = comfy.run(graph(setup, "OboroTrainFull", output_name="tn_full", steps=4, checkpoint_every=2,
                          preview_every=0, sample=False))
    ckpt = comfy.models / "diffusion_models" / "tn_full.safetensors"
    s = summary(res)
    assert s["path"] == str(ckpt.resolve()) and (s["start_step"], s["step"]) == (0, 4) and s["preview_steps"] == []
    assert len(saved(comfy, res, "prev")) == 1  # previews off: one black placeholder image
    g = {k: v for k, v in graph(setup, sample=False).items() if k == "te"}
    g["m"] = {"class_type": "OboroModelLoader", "inputs": {"model_name": "tn_full.safetensors", "weight_dtype": "fp32"}}
    g.update(sampler_nodes(["m", 0]))
    assert torch.isfinite(latent(comfy, comfy.run(g))).all()

    from oboro.runner.embedded import GraphError
    with pytest.raises(GraphError, match="already holds training states"):  # a fresh start never mixes runs
        comfy.run(graph(setup, "OboroTrainFull", output_name="tn_full", steps=6, preview_every=0, sample=False))
    res = comfy.run(graph(setup, "OboroTrainFull", output_name="tn_full", steps=6, checkpoint_every=2,
                          preview_every=0, resume_from="latest", sample=False))
    s = summary(res)
    assert (s["start_step"], s["step"]) == (4, 6) and s["last_state"].endswith("step_00000006.safetensors")
    log = json.loads((comfy.output / "oboro_training" / "tn_full" / "loss_log.json").read_text())
    assert log["step"] == [1, 2, 3, 4, 5, 6] and log["resumed_at"] == [4]


def test_full_merges_the_patches_of_its_input(comfy, setup):
    """Training starts from what the MODEL computes: a LoRA already applied by LoraLoaderModelOnly is
    merged into the weights (lr ~0 here, so the saved checkpoint is the merged model)."""
    base = load_file(str(comfy.models / "diffusion_models" / setup.model))
    key, rank, alpha = "blocks.1.attn.qkv", 2, 1.0
    torch.manual_seed(4)
    out_f, in_f = base[key + ".weight"].shape
    down, up = torch.randn(rank, in_f) * 0.3, torch.randn(out_f, rank)
    save_file({f"diffusion_model.{key}.lora_down.weight": down, f"diffusion_model.{key}.lora_up.weight": up,
               f"diffusion_model.{key}.alpha": torch.tensor(alpha)},
              str(comfy.models / "loras" / "tn_patch.safetensors"))
    g = graph(setup, "OboroTrainFull", output_name="tn_merged", steps=1, lr=1e-8, preview_every=0, sample=False)
    g["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["m", 0], "lora_name": "tn_patch.safetensors", "strength_model": 1.0}}
    g["train"]["inputs"]["model"] = ["lora", 0]
    comfy.run(g)
    got = load_file(str(comfy.models / "diffusion_models" / "tn_merged.safetensors"))
    torch.testing.assert_close(got[key + ".weight"], base[key + ".weight"] + (alpha / rank) * up @ down,
                               atol=1e-6, rtol=0)
    for k, v in base.items():
        if k != key + ".weight":
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)


def test_interrupt_leaves_resumable_state(comfy, setup):
    from comfy import model_management as mm, utils as comfy_utils  # (binds no `comfy`: that is the fixture)
    from oboro.runner.embedded import GraphError
    old = comfy_utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, prompt_id=None, node_id=None):
        if total == 40 and value >= 2:  # the training node's bar, after step 2: the user presses Cancel
            mm.interrupt_current_processing()
        old(value, total, preview, prompt_id=prompt_id, node_id=node_id)

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(GraphError, match="InterruptProcessingException|interrupted"):
            comfy.run(graph(setup, output_name="tn_int", steps=40, checkpoint_every=0, preview_every=0, sample=False))
    finally:
        comfy_utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    state_dir = comfy.output / "oboro_training" / "tn_int"
    assert [p.name for p in list_checkpoints(state_dir)] == ["step_00000002.safetensors"]
    assert not (comfy.models / "loras" / "tn_int.safetensors").exists()
    res = comfy.run(graph(setup, output_name="tn_int", steps=3, checkpoint_every=0, preview_every=0,
                          resume_from=str(state_dir), sample=False))
    assert (summary(res)["start_step"], summary(res)["step"]) == (2, 3)
    assert (comfy.models / "loras" / "tn_int.safetensors").is_file()


LEGACY = REPO / "tests" / "fixtures" / "legacy_workflows"  # the all-in-one node face, as saved before
TEMPLATES = [(REPO / "example_workflows", "oboro_lora_training"), (REPO / "example_workflows", "oboro_full_finetune"),
             (LEGACY, "oboro_lora_training"), (LEGACY, "oboro_full_finetune"), (LEGACY, "oboro_lora_training_studio")]


@pytest.mark.parametrize("folder,name", TEMPLATES[:4])
def test_training_workflow_twins(comfy, folder, name):
    from oboro.runner import convert
    ui = convert.load(folder / f"{name}.json")
    api_dir = REPO / "workflows" / "api" if folder != LEGACY else LEGACY
    api = convert.load(api_dir / f"{name}.api.json")
    assert convert.is_ui(ui) and ui["version"] == 0.4 and not convert.is_ui(api)
    got = convert.to_api(ui, convert.local_node_defs())
    if folder == LEGACY:  # saved before the display names became "oboro ...": titles aside, the same prompt
        got, api = ({k: {**v, "_meta": None} for k, v in d.items()} for d in (got, api))
    assert got == api
    kinds = ("OboroTrainLoRA", "OboroTrainFull") if folder == LEGACY else ("OboroLoRATrainer", "OboroFullTrainer")
    assert [n["class_type"] for n in api.values()].count(kinds[0] if "lora" in name else kinds[1]) == 1


def run_template(comfy, setup, model_root, folder, name, out_name):
    """A training template as is (16-channel FLUX-VAE model, previews decoded by the VAE), only made
    small: a 64x64 bucket, two steps, fp32. Settings go to the trainer or its options node."""
    import folder_paths
    from oboro.runner import convert
    kinds = ("diffusion_models", "text_encoders", "vae")
    for kind in kinds:  # appended: the fixture's folders stay first
        folder_paths.add_model_folder_path(kind, str(model_root / kind))
    try:
        api = convert.to_api(convert.load(folder / f"{name}.json"), convert.local_node_defs())
        api["4"]["inputs"].update(dataset_dir=setup.data, area=64 * 64, cache_name=f"{SUB}_flux")
        small = dict(steps=2, batch_size=2, precision="fp32", warmup=0, preview_every=2, preview_steps=2,
                     checkpoint_every=0, output_name=out_name)
        for key, value in small.items():
            (api["9"] if "9" in api and key in api["9"]["inputs"] else api["5"])["inputs"][key] = value
        return comfy.run(api)
    finally:  # leave the session's model folders as they were
        for kind in kinds:
            folder_paths.folder_names_and_paths[kind][0].remove(str(model_root / kind))
            folder_paths.filename_list_cache.pop(kind, None)


@pytest.mark.parametrize("folder,name", TEMPLATES)
def test_training_workflow_runs(comfy, setup, model_root, folder, name):
    out_name = f"tn_wf_{folder.name}_{name}"
    res = run_template(comfy, setup, model_root, folder, name, out_name)
    kind = "loras" if "lora" in name else "diffusion_models"
    assert (comfy.models / kind / f"{out_name}.safetensors").is_file()
    assert len(saved(comfy, res, "6")) == 1
    prev, = saved(comfy, res, "7")
    assert Image.open(prev).size == (128, 64)  # 2 prompts side by side, decoded from 8x8 FLUX latents
    if name == "oboro_lora_training_studio":
        s = json.loads(res["outputs"]["5"]["text"][0])
        assert s["best_step"] in (1, 2) and s["items"] == 3  # validation split on, EMA exported


@pytest.mark.parametrize("name", ["oboro_lora_training", "oboro_full_finetune"])
def test_saved_workflows_train_to_the_same_result_as_the_templates(comfy, setup, model_root, name):
    """A workflow saved with the old all-in-one node trains to the same weights as today's template."""
    kind = "loras" if "lora" in name else "diffusion_models"
    for folder in (REPO / "example_workflows", LEGACY):  # names of their own: tests may run in any order
        run_template(comfy, setup, model_root, folder, name, f"tn_same_{folder.name}_{name}")
    new = load_file(str(comfy.models / kind / f"tn_same_example_workflows_{name}.safetensors"))
    old = load_file(str(comfy.models / kind / f"tn_same_legacy_workflows_{name}.safetensors"))
    assert new.keys() == old.keys()
    assert max((new[k].float() - old[k].float()).abs().max().item() for k in new) <= 1e-6
