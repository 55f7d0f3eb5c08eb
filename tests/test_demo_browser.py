"""The newcomer's first image without model files, as README tells it: `make run` trains the offline
demo (conftest.py's `offline_demo` fixture), ComfyUI's extra_model_paths.yaml gets README's
`oboro_demo` block with its base_path set to out/demo/models, and the template "oboro: try the
offline demo model" is opened from the browser's template menu and run with nothing changed. The
image shows the template's prompt (a red circle on white, centre), judged by the demo's own scorer."""
from __future__ import annotations

import re

import pytest
from PIL import Image

import oboro_env
from comfy_server import Server
from test_browser import CHROMIUM, app_page, browser, open_template, our_extension_name, run_in_browser  # noqa: F401

pytestmark = [pytest.mark.xdist_group("offline_demo"),
              pytest.mark.skipif(not __import__("os").path.exists(CHROMIUM), reason=f"{CHROMIUM} missing")]
TEMPLATE = "oboro_demo_txt2img"


def readme_demo_block(models) -> str:
    """README's extra_model_paths.yaml block for the demo, its base_path pointed at `models`."""
    readme = (oboro_env.REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(oboro_demo:\n.*?)```", readme, re.S)
    assert block, "README.md has no ```yaml oboro_demo: block"
    text = block.group(1)
    assert "base_path: /path/to/comfyui-oboro/out/demo/models" in text, text
    return text.replace("/path/to/comfyui-oboro/out/demo/models", str(models))


@pytest.fixture(scope="module")
def demo_server(offline_demo, tmp_path_factory):
    assert offline_demo.result.returncode == 0, offline_demo.result.stderr[-4000:]
    models = (offline_demo.demo / "models").resolve()
    srv = Server(tmp_path_factory.mktemp("demo_browser"), models, extra_paths=readme_demo_block(models))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def test_demo_template_generates_in_the_browser_from_readme_setup(demo_server, browser):  # noqa: F811
    from oboro.demo.data import score_image
    with app_page(browser, demo_server, "browser_demo") as (page, _):
        open_template(page, our_extension_name(), TEMPLATE)
        page.wait_for_function("() => app.graph.nodes.some(n => n.type === 'OboroSampler')", timeout=30_000)
        entry = run_in_browser(page, demo_server)
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert len(images) == 4, entry["outputs"]
    scores = []
    for image in images:
        with Image.open(demo_server.output / image["subfolder"] / image["filename"]) as im:
            assert im.size == (16, 16), im.size
            scores.append(score_image(im, "circle", "red", "white", "center"))
    right = sum(s["colour_ok"] and s["shape_ok"] and s["position_ok"] for s in scores)
    assert right >= 2, f"{right} of 4 images show a red circle in the centre: {scores}"
