"""Issue 13, case 1 on a real ComfyUI server (main.py, over HTTP, as a user of a shared server would
submit it): OboroCacheLatents aimed at another folder on the machine fails with a clear message, and
nothing outside the server's folders changes (the tree is hashed before and after). The same for the
data-preparation nodes that write files (scores beside the images, the dedup report)."""
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
from tiny_prep import save_tiny_aesthetic

AESTHETIC = "hard_aes"


@pytest.fixture(scope="module")
def server(model_root, tmp_path_factory):
    if not (model_root / "aesthetic" / AESTHETIC).exists():  # before the server lists its models
        save_tiny_aesthetic(model_root / "aesthetic" / AESTHETIC)
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


def error_of(entry: dict, node_type: str) -> str:
    assert entry["status"]["status_str"] == "error", entry["status"]
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == node_type, errors
    return errors[0]["exception_message"]


def test_dataset_prep_writes_only_inside_the_servers_folders(server, tmp_path):
    """OboroScoreDataset on someone else's folder is refused (it writes metadata.jsonl beside the
    images) and OboroDedupDataset's report cannot climb out of output/; the same score graph on a
    folder in the server's input/ writes its metadata.jsonl there and nothing else."""
    def images(folder):
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32, 3), 60 * i + 30, np.uint8)).save(folder / f"p{i}.png")
        return folder

    theirs = images(tmp_path / "their_dataset")
    before, outputs = tree_hash(tmp_path), tree_hash(server.output)

    def score(folder):
        return {"s": {"class_type": "OboroScoreDataset", "inputs": {
            "dataset_dir": folder, "model": AESTHETIC, "score_column": "aesthetic_score", "overwrite": True}}}
    assert "must lie inside" in error_of(submit(server, score(str(theirs))), "OboroScoreDataset")
    for name in ("../../escape", str(tmp_path / "report")):
        dedup = {"d": {"class_type": "OboroDedupDataset", "inputs": {
            "dataset_dir": str(theirs), "threshold": 0.0, "keep": "largest", "report_name": name}}}
        assert "report_name" in error_of(submit(server, dedup), "OboroDedupDataset")
    assert tree_hash(tmp_path) == before and tree_hash(server.output) == outputs
    assert not (server.root / "escape").exists() and not (server.root.parent / "escape").exists()

    mine = images(server.root / "input" / "my_dataset")
    entry = submit(server, score("my_dataset"))  # a plain name: a folder in the server's input/
    assert entry["status"]["status_str"] == "success", entry["status"]
    # .oboro.lock: the folder lock's marker (oboro_model/folder_lock.py), hidden from dataset readers
    assert sorted(p.name for p in mine.iterdir()) == [".oboro.lock", "metadata.jsonl", "p0.png", "p1.png"]
    rows = [json.loads(line) for line in (mine / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["file_name"] for r in rows) == ["p0.png", "p1.png"]
    assert tree_hash(tmp_path) == before
