"""Comfy Registry metadata (pyproject.toml, https://docs.comfy.org/registry/specifications) and the
templates folder: fields the registry and comfy-cli read, in the formats they accept; runtime
dependencies as ranges that match requirements.txt and the installed environment; every template a
UI-format graph with a thumbnail, and no API-format file where ComfyUI's template scanner looks."""
from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from PIL import Image

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
# app/custom_node_manager.py (ComfyUI 0.3.75): every *.json directly in one of these is a template.
SCANNED = ("example_workflows", "example", "examples", "workflow", "workflows")
# comfy-cli's accepted accelerator classifiers (registry/config_parser.py).
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")


def requirement_lines() -> list[str]:
    lines = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


def test_project_fields_follow_the_registry_spec():
    name = PROJECT["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", name), name
    assert not re.search(r"[._-]{2}", name), f"consecutive special characters in {name!r}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), PROJECT["version"]
    assert (REPO / PROJECT["license"]["file"]).is_file()
    assert PROJECT["description"].strip() and PROJECT["requires-python"].startswith(">=")
    urls = PROJECT["urls"]
    for key in ("Repository", "Documentation", "Bug Tracker"):
        assert urls.get(key, "").startswith("https://"), f"[project.urls] {key!r}: {urls.get(key)!r}"
    classifiers = PROJECT["classifiers"]
    assert "Operating System :: OS Independent" in classifiers
    env = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert env and set(env) <= ACCELERATORS, env


def test_tool_comfy_fields():
    assert COMFY["PublisherId"] and COMFY["DisplayName"]
    parts = [p.strip() for p in COMFY["requires-comfyui"].split(",")]
    assert all(VERSION_PART.match(p) for p in parts), COMFY["requires-comfyui"]
    tested = re.search(r'COMFY_VERSION="([^"]+)"', (REPO / "scripts" / "bootstrap.sh").read_text()).group(1)
    assert f">={tested}" in parts, f"requires-comfyui should start at the tested ComfyUI {tested}"
    # The icon is a URL to this repo's file (registry: SVG/PNG/JPG/GIF, at most 800x400 px).
    icon = COMFY["Icon"]
    repo_path = PROJECT["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo_path}/main/"
    assert icon.startswith(prefix), icon
    with Image.open(REPO / icon.removeprefix(prefix)) as im:
        assert im.format in ("PNG", "JPEG", "GIF") and im.width <= 800 and im.height <= 400, (im.format, im.size)


def test_dependencies_are_ranges_matching_requirements_txt_and_the_environment():
    deps = [Requirement(d) for d in PROJECT["dependencies"]]
    reqs = [Requirement(r) for r in requirement_lines()]
    assert {str(d) for d in deps} == {str(r) for r in reqs}, "pyproject.toml dependencies != requirements.txt"
    for r in reqs:
        assert r.name not in ("torch", "torchvision", "torchaudio"), "ComfyUI owns torch"
        assert r.specifier and not any(s.operator in ("==", "===") for s in r.specifier), f"{r}: a range, not a pin"
        assert any(s.operator == ">=" for s in r.specifier), f"{r}: no lower bound"
        installed = metadata.version(r.name)
        assert r.specifier.contains(installed, prereleases=True), f"installed {r.name} {installed} not in {r}"


def test_templates_are_ui_graphs_with_thumbnails():
    """What the template browser lists loads as a UI graph and shows a picture of its own run."""
    templates = sorted((REPO / "example_workflows").glob("*.json"))
    assert len(templates) >= 5
    for wf in templates:
        graph = json.loads(wf.read_text(encoding="utf-8"))
        assert isinstance(graph.get("nodes"), list) and "links" in graph, f"{wf.name} is not a UI-format graph"
        thumb = wf.with_suffix(".jpg")  # the frontend asks for <name>.jpg (mediaSubtype "jpg")
        assert thumb.is_file(), f"{thumb.name} missing (scripts/oboro-thumbnails makes it)"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and min(im.size) >= 64, (thumb.name, im.format, im.size)
    for folder in SCANNED:
        for f in (REPO / folder).glob("*.json"):
            assert not f.name.endswith(".api.json"), f"{f}: the template scanner would list an API-format file"
    for api in (REPO / "workflows" / "api").glob("*.api.json"):
        assert (REPO / "example_workflows" / api.name.replace(".api.json", ".json")).is_file(), api



def test_templates_folder_holds_templates_thumbnails_and_their_inputs():
    """Besides <name>.json and <name>.jpg, only a file a template loads (e.g. the mask template's example
    mask, which its note says to copy into ComfyUI/input/), small enough to ship."""
    folder = REPO / "example_workflows"
    names = {p.stem for p in folder.glob("*.json")}
    loaded = {v for wf in folder.glob("*.json") for n in json.loads(wf.read_text(encoding="utf-8"))["nodes"]
              for v in (n.get("widgets_values") or []) if isinstance(v, str)}
    for f in folder.iterdir():
        if f.suffix in (".json", ".jpg") and f.stem in names:
            assert f.stat().st_size < 100_000, f"{f.name}: keep templates and thumbnails small"
            continue
        assert f.name in loaded and f.stat().st_size < 20_000, f"{f.name}: neither a template, its thumbnail, nor a small file one loads"


def test_the_ray_extra_admits_the_ray_the_tests_run():
    """`pip install comfyui-oboro[ray]` (oboro-run --ray) allows the release tests/test_runner_farm.py ran on."""
    extra = [Requirement(r) for r in PROJECT["optional-dependencies"]["ray"]]
    dev = [Requirement(x.split("#", 1)[0].strip()) for x in (REPO / "requirements-dev.txt").read_text().splitlines()
           if x.split("#", 1)[0].strip().startswith("ray")]
    assert [r.name for r in extra] == ["ray"] and len(dev) == 1, (extra, dev)
    assert extra[0].specifier.contains(metadata.version("ray")) and extra[0].specifier.contains(
        next(iter(dev[0].specifier)).version)
