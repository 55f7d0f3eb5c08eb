"""Issue 13, case 1 on a real ComfyUI server (main.py, over HTTP, as a user of a shared server would
submit it): OboroCacheLatents aimed at another folder on the machine fails with a clear message, and
nothing outside the server's folders changes (the tree is hashed before and after)."""
import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_server import Server, http_json
from test_hardening_paths import tree_hash, victim_folder
from tiny import T5_NAME


@pytest.fixture(scope="module")
def server(model_root, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("hard_server"), model_root)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def submit(server, graph, timeout=120) -> dict:
    req = urllib.request.Request(server.url + "/prompt", data=json.dumps({"prompt": graph}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        pid = json.loads(r.read())["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = http_json(f"{server.url}/history/{pid}").get(pid)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.3)
    raise AssertionError(f"job {pid} did not finish\n{server.log()}")


def test_cache_into_a_folder_elsewhere_is_refused_and_changes_nothing(server, model_root, tmp_path):
    data = tmp_path / "ds"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(data / f"a{i}.png")
        (data / f"a{i}.txt").write_text(f"grey {i}")
    victim = victim_folder(tmp_path / "someone_else" / "cache")
    before, models_before = tree_hash(tmp_path), tree_hash(Path(model_root))
    for name in (str(victim), str(tmp_path / "new_folder"), "../../../escape"):
        graph = {"vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
                 "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": T5_NAME}},
                 "cache": {"class_type": "OboroCacheLatents", "inputs": {
                     "dataset_dir": str(data), "vae": ["vae", 0], "clip": ["te", 0], "policy": "fixed", "size": 32,
                     "area": 64 * 64, "max_tokens": 8, "cache_name": name}}}
        entry = submit(server, graph)
        assert entry["status"]["status_str"] == "error", entry["status"]
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert errors and errors[0]["node_type"] == "OboroCacheLatents"
        assert "cache_name" in errors[0]["exception_message"], errors[0]["exception_message"]
        assert ("absolute paths must lie inside" if name.startswith("/") else "leaves") in errors[0]["exception_message"]
    assert tree_hash(tmp_path) == before and tree_hash(Path(model_root)) == models_before
    assert not (server.root / "escape").exists() and not (server.root.parent / "escape").exists()
