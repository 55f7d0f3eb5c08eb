"""scripts/oboro-run: the shipped workflows, UI -> API conversion, headless runs (embedded and
against a real ComfyUI server), and bad input: exit code 2, every problem named, no files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_server import Server

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "scripts" / "oboro-run"
WORKFLOWS = ("oboro_txt2img", "oboro_img2img")
CPU = [] if os.environ.get("OBORO_TEST_GPU") == "1" else ["--cpu"]
FAST = ["--set", "OboroSampler.steps=2"]
FAST_T2I = FAST + ["--set", "EmptyOboroLatentImage.width=64", "--set", "EmptyOboroLatentImage.height=48"]
FAST_I2I = FAST + ["--set", "ImageScale.width=64", "--set", "ImageScale.height=48"]


def workflow(name, api=False):
    return REPO / "workflows" / "api" / f"{name}.api.json" if api else REPO / "example_workflows" / f"{name}.json"


@pytest.fixture(scope="session")
def input_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(path)
    return path


def oboro_run(*args, timeout=180):
    r = subprocess.run([sys.executable, str(RUN), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO)
    return r


def files_in(folder: Path):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def runs(out: Path):
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


# the shipped txt2img prompt, "A beautiful cherry blossom tree in full bloom, anime style, ...", as a slug,
# and its SaveImage prefix "oboro"
BLOSSOM = "a-beautiful-cherry-blossom-tree"


def assert_traceable(png: Path, seed: int, ui: bool = True):
    """ComfyUI's SaveImage chunks: the prompt that ran (this seed) and, for a UI workflow, the workflow."""
    text = Image.open(png).text
    assert json.loads(text["prompt"])["6"]["inputs"]["seed"] == seed
    if ui:
        assert {n["id"]: n for n in json.loads(text["workflow"])["nodes"]}[6]["widgets_values"][0] == seed
    else:
        assert "workflow" not in text


# ---- conversion ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_conversion_equals_api_twin(comfy, name):
    from oboro.runner import convert
    ui, api = convert.load(workflow(name)), convert.load(workflow(name, api=True))
    assert convert.is_ui(ui) and ui["version"] == 0.4 and not convert.is_ui(api)
    assert convert.to_api(ui, convert.local_node_defs()) == api


def test_conversion_follows_reroutes_and_bypasses_and_drops_muted(comfy):
    """Frontend semantics: a Reroute and a bypassed IMAGE -> IMAGE node are passed through, a muted
    node is dropped, a PrimitiveNode's value stays in its target's widgets_values."""
    from oboro.runner import convert
    ui = convert.load(workflow("oboro_txt2img"))
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    vae_link = nodes[8]["inputs"][1]["link"]                 # VAELoader -> VAEDecode.vae
    img_link = nodes[9]["inputs"][0]["link"]                 # VAEDecode -> SaveImage.images
    links[vae_link][3:5] = [20, 0]                           # ... now via Reroute 20
    links[100] = [100, 20, 0, 8, 1, "VAE"]
    nodes[8]["inputs"][1]["link"] = 100
    links[img_link][3:5] = [21, 0]                           # ... now via bypassed ImageInvert 21
    links[101] = [101, 21, 0, 9, 0, "IMAGE"]
    nodes[9]["inputs"][0]["link"] = 101
    links[102] = [102, 30, 0, 6, 4, "INT"]                   # a PrimitiveNode drives the seed
    nodes[6]["inputs"][4]["link"] = 102
    ui["nodes"] += [
        {"id": 20, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": vae_link}],
         "outputs": [{"name": "", "type": "VAE", "links": [100]}], "properties": {}},
        {"id": 21, "type": "ImageInvert", "mode": 4, "inputs": [{"name": "image", "type": "IMAGE", "link": img_link}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [101]}], "properties": {}, "widgets_values": []},
        {"id": 22, "type": "PreviewImage", "mode": 2, "inputs": [{"name": "images", "type": "IMAGE", "link": None}],
         "outputs": [], "properties": {}, "widgets_values": []},
        {"id": 30, "type": "PrimitiveNode", "mode": 0, "inputs": [],
         "outputs": [{"name": "INT", "type": "INT", "links": [102], "widget": {"name": "seed"}}],
         "properties": {"Run widget replace on values": False}, "widgets_values": [42, "fixed"]},
    ]
    ui["links"] = list(links.values())
    assert convert.to_api(ui, convert.local_node_defs()) == convert.load(workflow("oboro_txt2img", api=True))


# ---- headless runs ---------------------------------------------------------------------------

def test_txt2img_seeds_and_batch_rows_embedded(model_root, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"Positive Prompt.text": "a red fox"}\n\n{"Positive Prompt.text": "a blue bird", "6.cfg": 1.0}\n')
    out = tmp_path / "out"
    r = oboro_run(workflow("oboro_txt2img"), "--models", model_root, "--seeds", "3:5", "--batch", rows,
                  *FAST_T2I, "--out", out, *CPU)
    assert r.returncode == 0, r.stderr
    log = runs(out)
    assert [(j["job"], j["seed"], j["row"]) for j in log] == [(0, 3, 1), (1, 4, 1), (2, 3, 2), (3, 4, 2)]
    assert [j["outputs"] for j in log] == [["00000-s3-a-red-fox-oboro.png"], ["00001-s4-a-red-fox-oboro.png"],
                                           ["00002-s3-a-blue-bird-oboro.png"], ["00003-s4-a-blue-bird-oboro.png"]]
    assert log[0]["overrides"] == {"OboroSampler.steps": 2, "EmptyOboroLatentImage.width": 64,
                                   "EmptyOboroLatentImage.height": 48, "Positive Prompt.text": "a red fox"}
    assert log[3]["overrides"]["6.cfg"] == 1.0 and all(j["seconds"] > 0 and "error" not in j for j in log)
    images = [out / j["outputs"][0] for j in log]
    assert [len(j["outputs"]) for j in log] == [1, 1, 1, 1]
    assert files_in(out) == sorted([".oboro.lock", "runs.jsonl"] + [j["outputs"][0] for j in log])  # no temp files left
    assert r.stdout.split() == [str(p) for p in images]
    pixels = [np.asarray(Image.open(p)) for p in images]
    assert all(p.shape == (48, 64, 3) for p in pixels)
    assert not np.array_equal(pixels[0], pixels[1])  # other seed, other image
    for j in log:
        assert_traceable(out / j["outputs"][0], j["seed"])
    assert "[4/4]" in r.stderr  # progress on stderr


def test_img2img_csv_batch_embedded(model_root, input_image, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text('Positive Prompt.text,OboroSampler.denoise\n"a cat, oil painting",0.5\n"a dog",\n')
    out = tmp_path / "out"
    r = oboro_run(workflow("oboro_img2img"), "--models", model_root, "--batch", rows, "--set",
                  f"LoadImage.image={input_image}", *FAST_I2I, "--out", out, *CPU)
    assert r.returncode == 0, r.stderr
    log = runs(out)
    assert [j["overrides"].get("OboroSampler.denoise") for j in log] == [0.5, None]
    assert log[0]["overrides"]["Positive Prompt.text"] == "a cat, oil painting" and log[0]["seed"] == 42
    for j in log:
        assert np.asarray(Image.open(out / j["outputs"][0])).shape == (48, 64, 3)


def test_check_runs_nothing(model_root, tmp_path):
    out = tmp_path / "out"
    r = oboro_run(workflow("oboro_txt2img", api=True), "--models", model_root, "--check", "--seeds", "0:3",
                  "--out", out, *CPU)
    assert r.returncode == 0, r.stderr
    assert "3 job(s) valid" in r.stderr and not out.exists()


def test_embedded_names_and_png_chunks_match_the_server_backend(model_root, tmp_path):
    """The names test_server_round_robin expects for the same jobs. An API workflow has no UI
    workflow to embed: like ComfyUI's SaveImage for an API-queued prompt, the prompt only."""
    out = tmp_path / "out"
    r = oboro_run(workflow("oboro_txt2img", api=True), "--models", model_root, "--seeds", "0:2", *FAST_T2I,
                  "--out", out, *CPU)
    assert r.returncode == 0, r.stderr
    assert [j["outputs"] for j in runs(out)] == [[f"00000-s0-{BLOSSOM}-oboro.png"], [f"00001-s1-{BLOSSOM}-oboro.png"]]
    assert_traceable(out / f"00001-s1-{BLOSSOM}-oboro.png", 1, ui=False)


# ---- bad input: exit 2, each problem named, nothing written ----------------------------------

def test_malformed_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"1": {"class_type": "VAELoader", ')
    r = oboro_run(bad, "--out", tmp_path / "out")
    assert r.returncode == 2 and "malformed JSON" in r.stderr and str(bad) in r.stderr
    assert files_in(tmp_path / "out") == []


def test_every_problem_named_and_no_files(model_root, tmp_path):
    g = json.loads(workflow("oboro_txt2img", api=True).read_text())
    g["7"]["inputs"]["vae_name"] = "flux_ae_missing.safetensors"
    g["1"]["inputs"]["model_name"] = "oboro-huge.safetensors"
    g["6"]["inputs"]["cfg"] = "banana"
    g["12"] = {"class_type": "NoSuchNode", "inputs": {"image": ["8", 0]}}
    g["9"]["inputs"]["images"] = ["12", 0]
    wf = tmp_path / "wf.api.json"
    wf.write_text(json.dumps(g))
    out = tmp_path / "out"
    out.mkdir()
    r = oboro_run(wf, "--models", model_root, "--set", "EmptyOboroLatentImage.width=99999",
                  "--set", "NoSuchTitle.text=x", "--set", "OboroSampler.bogus=1", "--out", out, *CPU)
    assert r.returncode == 2, r.stderr
    err = r.stderr
    assert "node 12: unknown node type 'NoSuchNode'" in err
    assert "node 7 (VAELoader) input vae_name: missing model file flux_ae_missing.safetensors: " \
           "put it in ComfyUI/models/vae/" in err
    assert "missing model file oboro-huge.safetensors: put it in ComfyUI/models/diffusion_models/" in err
    assert "node 6 (OboroSampler) input cfg" in err and "banana" in err
    assert "node 5 (EmptyOboroLatentImage) input width" in err and "99999" in err
    assert "no node with id, title or type 'NoSuchTitle'" in err
    assert "has no input 'bogus'" in err
    assert files_in(out) == []


# ---- --server: a real ComfyUI over HTTP ------------------------------------------------------

@pytest.fixture(scope="module")
def server(model_root, tmp_path_factory):
    """ComfyUI's own main.py on 127.0.0.1 with the tiny models; everything it writes in a temp dir."""
    srv = Server(tmp_path_factory.mktemp("server"), model_root)
    try:
        srv.start()
        yield srv.url
    finally:
        srv.stop()


def test_server_round_robin(server, input_image, tmp_path):
    out = tmp_path / "out"
    r = oboro_run(workflow("oboro_txt2img"), "--server", server, "--server", server.replace("127.0.0.1", "localhost"),
                  "--seeds", "0:3", *FAST_T2I, "--out", out)
    assert r.returncode == 0, r.stderr
    log = runs(out)
    assert sorted(j["seed"] for j in log) == [0, 1, 2] and len({j["server"] for j in log}) == 2
    for j in log:  # named as the embedded backend names them, not by the server's counter
        assert j["outputs"] == [f"{j['job']:05d}-s{j['seed']}-{BLOSSOM}-oboro.png"]
        assert np.asarray(Image.open(out / j["outputs"][0])).shape == (48, 64, 3)
        assert_traceable(out / j["outputs"][0], j["seed"])
    assert files_in(out) == sorted([".oboro.lock", "runs.jsonl"] + [j["outputs"][0] for j in log])

    # img2img: a local input image is uploaded to the server first
    out2 = tmp_path / "out2"
    r = oboro_run(workflow("oboro_img2img"), "--server", server, "--set", f"LoadImage.image={input_image}",
                  *FAST_I2I, "--out", out2)
    assert r.returncode == 0, r.stderr
    png = Image.open(out2 / runs(out2)[0]["outputs"][0])
    assert np.asarray(png).shape == (48, 64, 3)
    loads = [n for n in json.loads(png.text["workflow"])["nodes"] if n["type"] == "LoadImage"]
    assert loads[0]["widgets_values"][0] == json.loads(png.text["prompt"])["5"]["inputs"]["image"] != str(input_image)


def test_server_check_names_problems(server, tmp_path):
    g = json.loads(workflow("oboro_img2img", api=True).read_text())
    g["7"]["inputs"]["vae_name"] = "nope.safetensors"
    g["9"]["inputs"]["steps"] = 0
    g["5"]["inputs"]["image"] = str(tmp_path / "missing.png")
    wf = tmp_path / "wf.api.json"
    wf.write_text(json.dumps(g))
    for extra in (["--check"], []):
        r = oboro_run(wf, "--server", server, "--out", tmp_path / "out", *extra)
        assert r.returncode == 2, r.stderr
        assert "missing model file nope.safetensors: put it in ComfyUI/models/vae/" in r.stderr
        assert "node 9 (OboroSampler) input steps: 0 is below the minimum 1" in r.stderr
        assert "missing.png is neither in the server's input folder nor a local file" in r.stderr
        assert files_in(tmp_path / "out") == []
