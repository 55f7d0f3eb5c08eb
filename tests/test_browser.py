"""End to end in a real browser: a ComfyUI 0.3.75 server (CPU, 127.0.0.1) with this extension and
tiny models saved under the shipped templates' model names; Debian's Chromium, headless, driven
by Playwright. Every template (example_workflows/*.json) is opened from the frontend's own template
browser (sidebar "Templates", our extension's section, the template's card, whose thumbnail,
title and description must show) and must load whole: no missing-node or load-error dialog, every node registered, and no
missing-models dialog beyond the models the template itself lists (node properties.models, which the
frontend reads: a template whose files are not on the server must get exactly those listed, in
the right folders). The txt2img template is then run from the Run button. With the frontend's
language set to Japanese (Comfy.Locale "ja"), oboro nodes show their names from locales/ja and a
template card its Japanese title.

The screenshot is kept as a test artifact: test-artifacts/browser_txt2img.png under the repo root.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
import urllib.request

import pytest
from PIL import Image

import oboro_env  # scripts/ is put on sys.path by conftest.py
from comfy_server import Server, http_json

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TEMPLATE = "oboro_txt2img"
ARTIFACTS = oboro_env.REPO / "test-artifacts"
SCREENSHOT = ARTIFACTS / "browser_txt2img.png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGE_TIMEOUT_S = 180
# The frontend's dialog when a workflow uses unknown node types (1.32: "This workflow has missing
# nodes"; older releases: "...the following node types were not found").
MISSING_NODES_TEXT = re.compile(r"missing nodes|node types were not found|some nodes are missing", re.I)
# The frontend's dialog when loading a workflow throws (1.32 errorDialog.loadWorkflowTitle / defaultTitle).
LOAD_ERROR_TEXT = re.compile(r"Loading aborted|error reloading workflow|An error occurred", re.I)
# The frontend's missing-models dialog (1.32 missingModelsDialog.missingModels / missingModelsMessage);
# each entry is labelled "<directory> / <file name>".
MISSING_MODELS_TEXT = re.compile(r"Missing Models|the following models were not found", re.I)
TEMPLATES = sorted(p.stem for p in (oboro_env.REPO / "example_workflows").glob("*.json"))
LOCALE_JA = json.loads((oboro_env.REPO / "locales" / "ja" / "nodeDefs.json").read_text(encoding="utf-8"))
TITLES = {lang: json.loads((oboro_env.REPO / "locales" / lang / "main.json").read_text(encoding="utf-8"))["oboroTemplates"]
          for lang in ("en", "ja")}

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} missing: install Debian's chromium (scripts/bootstrap.sh does, as root)")


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_root):
    srv = Server(tmp_path_factory.mktemp("browser"), model_root)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (its own fresh temporary profile); each test gets a new, empty context."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def our_extension_name() -> str:
    """ComfyUI names a custom node's templates after its folder in custom_nodes/ (the bootstrap
    links this repo as comfyui-oboro)."""
    custom_nodes = oboro_env.comfy_path() / "custom_nodes"
    for entry in sorted(custom_nodes.iterdir()):
        if entry.is_dir() and entry.resolve() == oboro_env.REPO.resolve():
            return entry.name
    pytest.fail(f"this repo is not linked into {custom_nodes}; run scripts/bootstrap.sh")


# --- page helpers ------------------------------------------------------------------------------

def open_app(browser, server, console: list, run_button: bool = True):
    page = browser.new_page(viewport={"width": 1400, "height": 900})  # a fresh context: no stored workflow
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.goto(server.url + "/")
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                           "Object.keys(LiteGraph.registered_node_types).length > 0", timeout=90_000)
    if run_button:  # (its label is translated)
        page.get_by_role("button", name="Run", exact=True).wait_for(timeout=60_000)
    return page


def missing_nodes_dialogs(page) -> list[str]:
    dialogs = page.get_by_role("dialog")
    texts = [dialogs.nth(i).inner_text() for i in range(dialogs.count())]
    return [t for t in texts if MISSING_NODES_TEXT.search(t)]


def error_dialogs(page) -> list[str]:
    dialogs = page.get_by_role("dialog")
    texts = [dialogs.nth(i).inner_text() for i in range(dialogs.count())]
    return [t for t in texts if LOAD_ERROR_TEXT.search(t)]


def missing_models_dialogs(page) -> list[str]:
    dialogs = page.get_by_role("dialog")
    texts = [dialogs.nth(i).inner_text() for i in range(dialogs.count())]
    return [t for t in texts if MISSING_MODELS_TEXT.search(t)]


def listed_models(workflow: dict) -> set[str]:
    """"<directory> / <name>" of every model the workflow's nodes list for the frontend."""
    return {f"{m['directory']} / {m['name']}" for n in workflow["nodes"]
            for m in n.get("properties", {}).get("models", [])}


def template_card(page, ext: str, name: str):
    """Sidebar "Templates" -> our extension's section -> the template's card."""
    page.locator('button[aria-label="Templates"], button[aria-label="テンプレート"]').first.click()  # en / ja
    dialog = page.locator(".workflow-template-selector-dialog")
    dialog.wait_for(timeout=30_000)
    dialog.get_by_role("button", name=ext, exact=True).click()
    card = dialog.get_by_test_id(f"template-workflow-{name}")
    card.wait_for(timeout=30_000)
    return dialog, card


def wait_for_card_text(page, card, lang: str, name: str) -> None:
    """The card shows the template's title and one-line description from locales/<lang>/main.json
    (web/js/oboro_locale.js puts them there; the frontend alone shows the file name)."""
    want = TITLES[lang][name]
    page.wait_for_function("([c, t, d]) => c.querySelector('h3')?.textContent === t && "
                           "c.querySelector('p')?.textContent === d",
                           arg=[card.element_handle(), want["title"], want["description"]], timeout=30_000)


def open_template(page, ext: str, name: str) -> None:
    """As a user does: sidebar "Templates" -> our extension -> the card (its thumbnail, title and
    description shown)."""
    dialog, card = template_card(page, ext, name)
    wait_for_card_text(page, card, "en", name)
    card.scroll_into_view_if_needed()  # cards below the fold load their thumbnails lazily
    # The frontend fetches /api/workflow_templates/<ext>/<name>.jpg and shows it from a blob: URL.
    thumb = card.locator(f'img[alt="{name}"]').first
    thumb.wait_for(timeout=30_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle(), timeout=30_000)
    with Image.open(oboro_env.REPO / "example_workflows" / f"{name}.jpg") as im:
        shown = thumb.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert shown == list(im.size), f"{name}: a {shown} thumbnail shown, ours is {im.size}"
    card.click()
    dialog.wait_for(state="detached", timeout=60_000)


def graph_nodes(page) -> list[dict]:
    return page.evaluate("""() => app.graph.nodes.map(n => ({id: n.id, type: n.type, virtual: !!n.isVirtualNode,
                               registered: n.type in LiteGraph.registered_node_types}))""")


@contextlib.contextmanager
def app_page(browser, server, name: str, run_button: bool = True):
    """(page, console) of a fresh page on the app; on failure a screenshot, the console and the
    server log (diagnose); the page is closed either way."""
    console, page = [], None
    try:
        page = open_app(browser, server, console, run_button)
        yield page, console
    except BaseException:
        diagnose(page, server, console, name)
        raise
    finally:
        if page is not None:
            page.close()


def diagnose(page, server, console, name):
    """On failure: keep a screenshot, print the browser console and the server log."""
    if page is not None:
        try:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"{name}_failure.png"), full_page=True)
        except Exception as e:  # the page may be gone
            print(f"(no failure screenshot: {e})")
    print("----- browser console (errors, warnings) -----\n" + "\n".join(console[-200:]))
    print(server.log())


# --- tests -------------------------------------------------------------------------------------

def test_txt2img_template_runs_in_browser(server, browser):
    ext = our_extension_name()
    listed = http_json(server.url + "/workflow_templates")
    assert TEMPLATE in listed.get(ext, []), f"{TEMPLATE} not among {ext}'s templates: {listed}"
    object_info = http_json(server.url + "/object_info", timeout=60)

    t0 = time.monotonic()
    with app_page(browser, server, "browser_txt2img") as (page, console):
        open_template(page, ext, TEMPLATE)
        page.wait_for_function("() => app.graph.nodes.some(n => n.type === 'OboroSampler')", timeout=30_000)
        page.wait_for_timeout(1000)  # a missing-nodes dialog would open right after the graph loads

        assert not missing_nodes_dialogs(page), f"missing-nodes dialog shown: {missing_nodes_dialogs(page)}"
        assert not MISSING_NODES_TEXT.search(page.locator("body").inner_text())
        graph = graph_nodes(page)
        assert all(n["registered"] for n in graph), f"unregistered node types: {graph}"
        assert all(n["type"] in object_info for n in graph if not n["virtual"]), f"unknown to the server: {graph}"
        types = [n["type"] for n in graph]
        for want in ("OboroModelLoader", "OboroT5Loader", "VAELoader", "OboroTextEncode", "EmptyOboroLatentImage",
                     "OboroSampler", "VAEDecode", "SaveImage"):
            assert want in types, f"{want} not in the loaded template: {types}"
        assert types.count("SaveImage") == 1 and types.count("EmptyOboroLatentImage") == 1
        save_id = str(next(n["id"] for n in graph if n["type"] == "SaveImage"))

        # CPU-sized run: 64x64, 2 steps, set on the nodes' widgets.
        page.evaluate("""() => {
            const set = (type, name, v) => {
                const w = app.graph.nodes.find(n => n.type === type).widgets.find(w => w.name === name);
                w.value = v; w.callback?.(v);
            };
            set('EmptyOboroLatentImage', 'width', 64); set('EmptyOboroLatentImage', 'height', 64);
            set('OboroSampler', 'steps', 2);
            app.graph.setDirtyCanvas(true, true);
        }""")

        page.get_by_role("button", name="Run", exact=True).click()
        image_js = """() => [...document.querySelectorAll('img')].some(i => /\\/view\\?filename=/.test(i.src) &&
                                                                       i.complete && i.naturalWidth > 0)"""
        deadline = time.monotonic() + IMAGE_TIMEOUT_S
        done = None
        while True:
            for entry in http_json(server.url + "/history").values():
                status = entry.get("status", {})
                assert status.get("status_str") != "error", f"the run failed: {json.dumps(status)[:4000]}"
                if status.get("completed") and save_id in entry.get("outputs", {}):
                    done = entry
            if done and page.evaluate(image_js):
                break
            assert time.monotonic() < deadline, (f"no image in the page after {IMAGE_TIMEOUT_S}s "
                                                 f"(server run finished: {bool(done)})")
            page.wait_for_timeout(500)

        image = done["outputs"][save_id]["images"][0]
        out = server.output / image["subfolder"] / image["filename"]
        with Image.open(out) as im:
            assert im.size == (64, 64), im.size
        shown = page.evaluate("() => [...document.querySelectorAll('img')].map(i => i.src)")
        assert any(f"filename={image['filename']}" in s for s in shown), shown

        fit = page.locator('button[aria-label^="Fit View"]')  # whole graph in the screenshot
        if fit.count():
            fit.first.click()
            page.wait_for_timeout(700)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
        data = SCREENSHOT.read_bytes()
        assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC)
        (ARTIFACTS / "browser_txt2img_failure.png").unlink(missing_ok=True)  # stale, from an earlier run
        print(f"\nbrowser txt2img: {time.monotonic() - t0:.1f}s from page load to image; screenshot {SCREENSHOT}")


def test_missing_node_warning_is_detected(server, browser):
    """The check used below is not vacuous: an unknown node type raises the frontend's dialog."""
    with app_page(browser, server, "browser_missing_nodes") as (page, console):
        wf = json.loads((oboro_env.REPO / "example_workflows" / f"{TEMPLATE}.json").read_text())
        wf["nodes"][0]["type"] = "OboroNoSuchNodeForTheTest"
        page.evaluate("wf => app.loadGraphData(wf)", wf)
        page.get_by_role("dialog").filter(has_text=MISSING_NODES_TEXT).first.wait_for(timeout=30_000)
        assert any("OboroNoSuchNodeForTheTest" in t for t in missing_nodes_dialogs(page))


def test_templates_menu_lists_exactly_the_ui_workflows(server):
    """No API-format twin (or anything else) shows up as a template that cannot load."""
    assert sorted(http_json(server.url + "/workflow_templates").get(our_extension_name(), [])) == TEMPLATES


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_loads_from_the_menu(server, browser, name):
    ext = our_extension_name()
    object_info = http_json(server.url + "/object_info", timeout=60)
    doc = json.loads((oboro_env.REPO / "example_workflows" / f"{name}.json").read_text())
    nodes = doc["nodes"]
    want = sorted(n["type"] for n in nodes)
    with app_page(browser, server, f"browser_template_{name}") as (page, console):
        open_template(page, ext, name)
        page.wait_for_function("n => app.graph.nodes.length === n", arg=len(want), timeout=30_000)
        page.wait_for_timeout(1000)  # a missing-nodes or error dialog would open right after the graph loads
        assert not missing_nodes_dialogs(page), f"{name}: missing-nodes dialog: {missing_nodes_dialogs(page)}"
        assert not error_dialogs(page), f"{name}: load error: {error_dialogs(page)}"
        for text in missing_models_dialogs(page):  # only files the template lists, never another one
            shown = set(re.findall(r"[\w.-]+ / [\w.-]+\.\w+", text))
            assert shown and shown <= listed_models(doc), f"{name}: missing-models dialog: {text}"
            assert "Invalid directory" not in text and "not allowed" not in text, f"{name}: {text}"
        assert not [c for c in console if c.startswith("pageerror")], f"{name}: page errors: {console}"
        graph = graph_nodes(page)
        assert sorted(n["type"] for n in graph) == want, f"{name}: loaded {graph}, file has {want}"
        assert all(n["registered"] for n in graph), f"{name}: unregistered node types: {graph}"
        unknown = [n for n in graph if not n["virtual"] and n["type"] not in object_info]
        assert not unknown, f"{name}: node types unknown to the server: {unknown}"


def test_missing_models_dialog_lists_the_templates_model_files(server, browser):
    """The frontend reads our properties.models: with the T5 and VAE files absent (here: renamed in
    the txt2img template, widget and metadata alike), its dialog lists both, in their folders, as
    downloadable (no 'Invalid directory' / 'not allowed' message). The base model has no URL and is
    left to the template's note."""
    wf = json.loads((oboro_env.REPO / "example_workflows" / f"{TEMPLATE}.json").read_text())
    renamed = {}
    for node in wf["nodes"]:
        for m in node.get("properties", {}).get("models", []):
            new = m["name"].replace(".safetensors", "_absent_for_test.safetensors")
            node["widgets_values"][node["widgets_values"].index(m["name"])] = new
            renamed[f"{m['directory']} / {new}"], m["name"] = node["type"], new
    assert set(renamed.values()) == {"OboroT5Loader", "VAELoader"}, renamed
    with app_page(browser, server, "browser_missing_models") as (page, console):
        page.evaluate("wf => app.loadGraphData(wf)", wf)
        page.get_by_role("dialog").filter(has_text=MISSING_MODELS_TEXT).first.wait_for(timeout=30_000)
        text = "\n".join(missing_models_dialogs(page))
        assert set(re.findall(r"[\w.-]+ / [\w.-]+\.\w+", text)) == set(renamed), text
        assert "Invalid directory" not in text and "not allowed" not in text, text


def set_widgets(page, values: dict) -> None:
    """{(node type, widget name): value}, set on the canvas's widgets as a user's edits are."""
    page.evaluate("""vals => { for (const [type, name, v] of vals) {
        const node = app.graph.nodes.find(n => n.type === type);
        const w = node.widgets.find(w => w.name === name);
        w.value = v; w.callback?.(v);
    } app.graph.setDirtyCanvas(true, true); }""", [[t, n, v] for (t, n), v in values.items()])


def run_in_browser(page, server, timeout_s: float = IMAGE_TIMEOUT_S) -> dict:
    """Press Run; -> the history entry of the prompt it queued, once completed (a failure fails)."""
    before = set(http_json(server.url + "/history"))
    page.get_by_role("button", name="Run", exact=True).click()
    deadline = time.monotonic() + timeout_s
    while True:
        for pid, entry in http_json(server.url + "/history").items():
            if pid in before:
                continue
            status = entry.get("status", {})
            assert status.get("status_str") != "error", f"the run failed: {json.dumps(status)[:4000]}"
            if status.get("completed"):
                return entry
        assert time.monotonic() < deadline, f"the run did not finish in {timeout_s}s"
        page.wait_for_timeout(500)


def test_lora_trained_by_the_template_applies_in_the_lora_template(server, browser, model_root):
    """The artist's LoRA path in the browser: captioned images in input/oboro_dataset, the LoRA
    training template run with only widget edits (CPU-sized: 64 px, 4 steps), then the txt2img +
    LoRA template (a reloaded page, as after training) picks the new oboro_lora.safetensors and every
    one of its keys is loaded by core LoraLoaderModelOnly."""
    from safetensors import safe_open
    import numpy as np
    ext, lora = our_extension_name(), model_root / "loras" / "oboro_lora.safetensors"
    assert not lora.exists(), f"{lora} exists before the test"
    data = server.root / "input" / "oboro_dataset"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"p{i}.png")
        (data / f"p{i}.txt").write_text(f"a picture number {i}")
    try:
        with app_page(browser, server, "browser_lora_training") as (page, _):
            open_template(page, ext, "oboro_lora_training")
            page.wait_for_function("() => app.graph.nodes.some(n => n.type === 'OboroLoRATrainer')", timeout=30_000)
            set_widgets(page, {("OboroCacheLatents", "policy"): "fixed", ("OboroCacheLatents", "size"): 64,
                               ("OboroCacheLatents", "area"): 64 * 64, ("OboroCacheLatents", "max_tokens"): 8,
                               ("OboroLoRATrainer", "steps"): 4, ("OboroLoRATrainer", "preview_every"): 0,
                               ("OboroTrainingOptions", "batch_size"): 2, ("OboroTrainingOptions", "warmup"): 0,
                               ("OboroTrainingOptions", "precision"): "fp32"})
            run_in_browser(page, server)
            assert lora.is_file(), f"the training template wrote no {lora}"
            with safe_open(str(lora), "pt") as f:
                trained_keys = len(list(f.keys()))
        with app_page(browser, server, "browser_lora_txt2img") as (page, _):  # reloaded: the new file is listed
            open_template(page, ext, "oboro_txt2img_lora")
            page.wait_for_function("() => app.graph.nodes.some(n => n.type === 'LoraLoaderModelOnly')", timeout=30_000)
            page.wait_for_timeout(1000)
            assert not missing_models_dialogs(page) or "oboro_lora" not in "".join(missing_models_dialogs(page))
            set_widgets(page, {("EmptyOboroLatentImage", "width"): 64, ("EmptyOboroLatentImage", "height"): 64,
                               ("OboroSampler", "steps"): 2})
            log_before = len(server.log_path.read_text(errors="replace"))
            entry = run_in_browser(page, server)
            images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
            assert images, f"no image: {entry['outputs']}"
            log = server.log_path.read_text(errors="replace")[log_before:]
            assert "lora key not loaded" not in log, log[-3000:]
            assert trained_keys > 0
    finally:
        lora.unlink(missing_ok=True)  # the model root is shared with the module's other tests


def set_setting(server, key: str, value) -> None:
    req = urllib.request.Request(f"{server.url}/settings/{key}", data=json.dumps(value).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


def test_japanese_ui_shows_the_japanese_node_names(server, browser):
    """Switching the language to Japanese (Settings > Language, the setting Comfy.Locale = "ja"):
    locales/ja/nodeDefs.json names the oboro nodes in the node search and locales/ja/main.json titles
    the templates, as a user sees them. (Frontend 1.32 alone drops every pack's Japanese text when it
    loads its own Japanese bundle; web/js/oboro_locale.js merges ours back.)"""
    want = {k: LOCALE_JA[k]["display_name"] for k in ("OboroSampler", "OboroModelLoader", "EmptyOboroLatentImage")}
    # Settings > Language = 日本語 is stored on the server (Comfy.Locale); the page then reloads.
    set_setting(server, "Comfy.Locale", "ja")
    try:
        with app_page(browser, server, "browser_japanese", run_button=False) as (page, _):
            page.wait_for_function("() => /[\u3040-\u30ff]/.test(document.body.innerText)", timeout=60_000)
            # What the user sees: the node search (double-click on the canvas) lists the Japanese names;
            # searched again until the node definitions have been reloaded in Japanese.
            deadline = time.monotonic() + 60
            while True:
                page.mouse.dblclick(250, 760)  # an empty spot of the default graph
                search = page.locator("input[type=text]:focus, .comfy-vue-node-search-container input").first
                search.wait_for(timeout=30_000)
                search.type("oboro")
                try:
                    page.get_by_text(want["OboroSampler"], exact=False).first.wait_for(timeout=3_000)
                    break
                except Exception:
                    assert time.monotonic() < deadline, "the node search kept the English names for 60 s"
                    page.keyboard.press("Escape")
            for name in want.values():
                page.get_by_text(name, exact=False).first.wait_for(timeout=30_000)
            page.keyboard.press("Escape")
            page.wait_for_timeout(500)
            dialog, card = template_card(page, our_extension_name(), TEMPLATE)
            wait_for_card_text(page, card, "ja", TEMPLATE)
    finally:
        set_setting(server, "Comfy.Locale", "en")  # the server is shared by the module's other tests
