"""What a user meets first (issue #27 §1-§2): every node's face (display name "oboro ...", an oboro
category, a tooltip on every input, the same name as locales/en), the templates' model metadata
(the frontend's missing-models dialog), all missing model files named at once when a graph is
queued (a real server), the offline demo's and the LoRA template, and a latent that does not fit
the model refused with both channel counts named, through core KSampler and OboroSampler."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from comfy_server import Server
from tiny import TEXT_DIM, save_t5, tiny_dit, tiny_t5

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "example_workflows"
LOCALE_EN = json.loads((REPO / "locales" / "en" / "nodeDefs.json").read_text(encoding="utf-8"))

# Files a template may list in node properties.models (the frontend's ModelFile: name, url,
# directory; it shows only entries with a url from huggingface.co / civitai.com and a .safetensors
# or .sft name). The oboro base model has no public URL, so no template may list it.
DOWNLOADS = {
    "t5xxl_fp16.safetensors": ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    "ae.safetensors": ("vae", "https://huggingface.co/black-forest-labs/FLUX.1-schnell/resolve/main/ae.safetensors"),
}
LOADER_FOLDER = {"OboroT5Loader": "text_encoders", "VAELoader": "vae"}



def node_classes():
    from oboro.nodes import OboroExtension
    return asyncio.run(OboroExtension().get_node_list())


NODE_IDS = [c.define_schema().node_id for c in node_classes()]


def load(name: str) -> dict:
    return json.loads((TEMPLATES / f"{name}.json").read_text(encoding="utf-8"))


def note_text(doc: dict) -> str:
    return "\n".join(n["widgets_values"][0] for n in doc["nodes"] if n["type"] == "MarkdownNote")


# ---- names, categories, tooltips -----------------------------------------------------------------

@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_face(node_id):
    schema = next(c for c in node_classes() if c.define_schema().node_id == node_id).define_schema()
    assert schema.display_name.startswith("oboro "), schema.display_name
    assert schema.display_name == LOCALE_EN.get(node_id, {}).get("display_name"), \
        f"{node_id}: {schema.display_name!r} in Python, {LOCALE_EN.get(node_id, {}).get('display_name')!r} in locales/en"
    assert schema.category == "oboro" or schema.category.startswith("oboro/"), schema.category
    untipped = [i.id for i in schema.inputs if not (getattr(i, "tooltip", None) or "").strip()]
    assert not untipped, f"{node_id}: inputs without a tooltip: {untipped}"


# ---- templates: model metadata, notes, shipped inputs --------------------------------------------

@pytest.mark.parametrize("name", sorted(p.stem for p in TEMPLATES.glob("*.json")))
def test_template_model_metadata_and_note(name):
    doc = load(name)
    for node in doc["nodes"]:
        models = node.get("properties", {}).get("models")
        values = [v for v in (node.get("widgets_values") or []) if isinstance(v, str)]
        wanted = [v for v in values if v in DOWNLOADS and node["type"] in LOADER_FOLDER]
        if not wanted:
            assert not models, f"{name}: node {node['id']} ({node['type']}) lists models it does not load: {models}"
            continue
        assert models and [m["name"] for m in models] == wanted, f"{name}: node {node['id']}: {models}"
        for m in models:
            directory, url = DOWNLOADS[m["name"]]
            assert m == {"name": m["name"], "url": url, "directory": directory}, m
            assert directory == LOADER_FOLDER[node["type"]] and url.endswith("/" + m["name"])
    text = note_text(doc)
    assert text, f"{name}: no Read me note"
    if any(n["type"] == "OboroModelLoader" and n["widgets_values"][0] == "oboro-base-v1-1b.safetensors"
           for n in doc["nodes"]):
        assert "no public download" in text and "models/diffusion_models" in text, text
    for ref in re.findall(r"(\w+)/(oboro_\w+\.json)", text):
        assert ref[0] == "example_workflows" and (TEMPLATES / ref[1]).is_file(), f"{name}: note names {ref}"
    for image in (n["widgets_values"][0] for n in doc["nodes"] if n["type"] == "LoadImage"):
        shipped = (TEMPLATES / image).is_file()
        assert shipped or image == "example.png", f"{name}: LoadImage {image!r} is neither shipped nor generic"
        if shipped:
            assert image in text, f"{name}: the note does not say where {image} comes from"


def test_mask_example_fits_the_mask_template():
    from PIL import Image
    doc = load("oboro_mask_text")
    palette = next(n for n in doc["nodes"] if n["type"] == "OboroApplyMaskControl")["widgets_values"][1]
    colours = {tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in palette.split(",")}
    with Image.open(TEMPLATES / "oboro_mask_example.png") as im:
        rgb = im.convert("RGB")
        used = {c for _, c in rgb.getcolors(1 << 16)}
        assert im.size == (512, 512) and used <= colours and len(used) >= 2, (im.size, used)
    assert (TEMPLATES / "oboro_mask_example.png").stat().st_size < 8_000


def test_demo_template_is_the_demos_setup():
    from oboro.demo import offline as demo
    doc = load("oboro_demo_txt2img")
    values = {n["type"]: n["widgets_values"] for n in doc["nodes"]}
    assert values["OboroModelLoader"][0] == f"{demo.TRAINED}.safetensors"
    assert values["OboroT5Loader"][0] == demo.T5_FILE and values["VAELoader"] == ["pixel_space"]
    size = demo.parse_args([]).size
    assert values["EmptyOboroLatentImage"][:2] == [size, size] and values["EmptyOboroLatentImage"][3] == "3 (pixel space)"
    assert "extra_model_paths.yaml" in note_text(doc) and "out/demo/models" in note_text(doc)


def test_lora_template_puts_the_training_templates_lora_between_loader_and_sampler():
    doc = load("oboro_txt2img_lora")
    nodes = {n["id"]: n for n in doc["nodes"]}
    lora = next(n for n in doc["nodes"] if n["type"] == "LoraLoaderModelOnly")
    trained = next(n for n in load("oboro_lora_training")["nodes"] if n["type"] == "OboroLoRATrainer")
    assert lora["widgets_values"] == [f"{trained['widgets_values'][1]}.safetensors", 1.0]  # output_name
    links = {ln[0]: ln for ln in doc["links"]}
    src = links[lora["inputs"][0]["link"]]
    assert nodes[src[1]]["type"] == "OboroModelLoader"
    sampler = next(n for n in doc["nodes"] if n["type"] == "OboroSampler")
    assert links[sampler["inputs"][0]["link"]][1] == lora["id"]


@pytest.mark.parametrize("name", ["oboro_demo_txt2img", "oboro_txt2img_lora"])
def test_new_templates_equal_their_api_twins(comfy, name):
    from oboro.runner import convert
    ui = convert.load(TEMPLATES / f"{name}.json")
    assert convert.to_api(ui, convert.local_node_defs()) == convert.load(REPO / "workflows" / "api" / f"{name}.api.json")


def test_demo_template_runs_on_the_demos_model_files(comfy, one_thread):
    """As shipped (only the folder differs): the demo's architecture and file names, untrained."""
    from oboro.oboro_model import OboroConfig
    from oboro.demo import offline as demo
    from oboro.runner import convert
    cfg = OboroConfig(in_channels=3, text_dim=demo.T5_CONFIG["d_model"], **demo.SETUPS[16]["model"])
    root = comfy.models.parent / "demo_models"
    demo.write_models(root, cfg)
    shutil.copyfile(root / "diffusion_models" / demo.INIT, comfy.models / "diffusion_models" / f"{demo.TRAINED}.safetensors")
    shutil.copyfile(root / "text_encoders" / demo.T5_FILE, comfy.models / "text_encoders" / demo.T5_FILE)
    api = convert.to_api(convert.load(TEMPLATES / "oboro_demo_txt2img.json"), convert.local_node_defs())
    next(n for n in api.values() if n["class_type"] == "OboroSampler")["inputs"]["steps"] = 2
    result = comfy.run(api)
    images = [i for out in result["outputs"].values() for i in out.get("images", [])]
    from PIL import Image
    with Image.open(comfy.output / images[0]["subfolder"] / images[0]["filename"]) as im:
        assert im.size == (16, 16) and len(images) == 4


# ---- all missing model files named when queued (a real server, no model files) ------------------

@pytest.fixture(scope="module")
def bare_server(tmp_path_factory):
    models = tmp_path_factory.mktemp("no_models")
    for kind in ("diffusion_models", "text_encoders", "vae", "loras", "oboro_mask_adapters"):
        (models / kind).mkdir()
    srv = Server(tmp_path_factory.mktemp("bare_server"), models)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def queue(server, graph) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + "/prompt", data=json.dumps({"prompt": graph}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("name, files", [
    ("oboro_txt2img", {"OboroModelLoader": "oboro-base-v1-1b.safetensors", "OboroT5Loader": "t5xxl_fp16.safetensors",
                       "VAELoader": "ae.safetensors"}),
    ("oboro_txt2img_lora", {"OboroModelLoader": "oboro-base-v1-1b.safetensors",
                            "OboroT5Loader": "t5xxl_fp16.safetensors", "VAELoader": "ae.safetensors",
                            "LoraLoaderModelOnly": "oboro_lora.safetensors"}),
    ("oboro_mask_text", {"OboroModelLoader": "oboro-base-v1-1b.safetensors", "OboroT5Loader": "t5xxl_fp16.safetensors",
                         "VAELoader": "ae.safetensors", "OboroMaskAdapterLoader": "oboro_mask_adapter.safetensors"}),
])
def test_every_missing_model_file_is_named_on_the_first_queue(bare_server, name, files):
    graph = json.loads((REPO / "workflows" / "api" / f"{name}.api.json").read_text())
    status, body = queue(bare_server, graph)
    assert status == 400, body
    errors = body["node_errors"]
    kinds = {graph[i]["class_type"]: i for i in graph}
    for kind, file in files.items():
        node = kinds[kind]
        assert node in errors, f"{kind} (node {node}) not among the errors: {json.dumps(errors)[:3000]}"
        text = json.dumps(errors[node]["errors"])
        assert file in text, text
    ours = {k: v for k, v in files.items() if k.startswith("Oboro")}
    for kind, file in ours.items():
        details = " ".join(e.get("details", "") for e in errors[kinds[kind]]["errors"])
        assert "is not in models/" in details, details


# ---- a latent that does not fit the model ---------------------------------------------------------

PIXEL, FLUX, T5 = "face_pixel.safetensors", "face_flux.safetensors", "face_t5.safetensors"


@pytest.fixture(scope="module")
def latent_models(comfy):
    from oboro.oboro_model import save_checkpoint
    save_checkpoint(comfy.models / "diffusion_models" / PIXEL, tiny_dit(in_channels=3))
    save_checkpoint(comfy.models / "diffusion_models" / FLUX, tiny_dit())
    save_t5(comfy.models / "text_encoders" / T5, tiny_t5(d_model=TEXT_DIM))


def fit_graph(model: str, channels: str, sampler: str, size=64):
    g = {"m": {"class_type": "OboroModelLoader", "inputs": {"model_name": model, "weight_dtype": "fp32"}},
         "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": T5}},
         "pos": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": "a red circle"}},
         "neg": {"class_type": "OboroTextEncode", "inputs": {"clip": ["te", 0], "text": ""}},
         "lat": {"class_type": "EmptyOboroLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1,
                                                                   "channels": channels}}}
    g["s"] = sampler_node(sampler, "m", ["lat", 0])
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": "face/fit"}}
    return g


def sampler_node(kind: str, model: str, latent: list) -> dict:
    common = {"model": [model, 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": latent,
              "seed": 1, "steps": 2, "cfg": 2.0}
    if kind == "KSampler":
        return {"class_type": "KSampler", "inputs": {**common, "sampler_name": "euler", "scheduler": "simple",
                                                     "denoise": 1.0}}
    return {"class_type": "OboroSampler", "inputs": {**common, "solver": "euler", "shift": 1.0, "denoise": 1.0}}


@pytest.mark.parametrize("sampler", ["KSampler", "OboroSampler"])
def test_a_16_channel_latent_on_the_pixel_model_is_refused(comfy, latent_models, one_thread, sampler):
    from oboro.runner.embedded import GraphError
    with pytest.raises(GraphError) as e:
        comfy.run(fit_graph(PIXEL, "16 (FLUX VAE)", sampler))
    msg = str(e.value)
    assert "16 channels" in msg and "takes 3 channels" in msg and "8x8" in msg and "64x64" in msg, msg
    assert "'3 (pixel space)'" in msg, msg


@pytest.mark.parametrize("sampler", ["KSampler", "OboroSampler"])
def test_a_pixel_latent_on_a_flux_vae_model_is_refused(comfy, latent_models, one_thread, sampler):
    from oboro.runner.embedded import GraphError
    with pytest.raises(GraphError) as e:
        comfy.run(fit_graph(FLUX, "3 (pixel space)", sampler, size=32))
    msg = str(e.value)
    assert "3 channels" in msg and "takes 16 channels" in msg and "'16 (FLUX VAE)'" in msg, msg


def test_a_sampled_16_channel_latent_on_the_pixel_model_is_refused(comfy, latent_models, one_thread):
    """Not empty, so ComfyUI leaves its channels alone: the model itself refuses it by name."""
    from oboro.runner.embedded import GraphError
    g = fit_graph(FLUX, "16 (FLUX VAE)", "KSampler")
    g["pm"] = {"class_type": "OboroModelLoader", "inputs": {"model_name": PIXEL, "weight_dtype": "fp32"}}
    g["s2"] = sampler_node("KSampler", "pm", ["s", 0])
    g["save"]["inputs"]["samples"] = ["s2", 0]
    with pytest.raises(GraphError) as e:
        comfy.run(g)
    msg = str(e.value)
    assert "a latent with 16 channels" in msg and "takes 3 channels" in msg, msg


def test_fitting_latents_still_sample(comfy, latent_models, one_thread):
    """The matching channels, and core's 4-channel Empty Latent Image on a FLUX-VAE model (same scale:
    ComfyUI adapts the channels, as for any model)."""
    g = fit_graph(PIXEL, "3 (pixel space)", "KSampler", size=32)
    g["s3"] = sampler_node("OboroSampler", "m", ["lat", 0])
    g["fm"] = {"class_type": "OboroModelLoader", "inputs": {"model_name": FLUX, "weight_dtype": "fp32"}}
    g["core_lat"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g["s4"] = sampler_node("KSampler", "fm", ["core_lat", 0])
    g["save3"] = {"class_type": "SaveLatent", "inputs": {"samples": ["s3", 0], "filename_prefix": "face/fit3"}}
    g["save4"] = {"class_type": "SaveLatent", "inputs": {"samples": ["s4", 0], "filename_prefix": "face/fit4"}}
    result = comfy.run(g)
    assert tuple(comfy.latent(result, "save").shape) == (1, 3, 32, 32)
    assert tuple(comfy.latent(result, "save3").shape) == (1, 3, 32, 32)
    assert tuple(comfy.latent(result, "save4").shape) == (1, 16, 8, 8)
    assert torch.isfinite(comfy.latent(result, "save4")).all()
