"""Issue 26 §1 and the overwrite case: one writer per folder, between REAL processes.

A latent-cache build and the dataset-prep writers hold their folder's lock (oboro_model/folder_lock.py,
an OS flock) for the whole write. The other writer is a second process (tests/lock_holder.py) that
holds the lock until the test lets it go, so nothing here depends on timing: a build of the same
folder meanwhile fails at once, naming the folder and the holder, and the cache ends up holding one
dataset's items, never a mix. Then the same through a real ComfyUI server (main.py over HTTP), and
OboroDedupDataset never replacing an earlier report (next free `_00001_` name instead)."""
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_server import Server
from oboro.oboro_model.data import LatentCache, read_manifest
from test_hardening_server import error_of, submit
from tiny import T5_NAME
from tiny_prep import save_tiny_aesthetic

HOLDER = Path(__file__).with_name("lock_holder.py")
AESTHETIC = "lock_aes"


def images(root: Path, n: int, word: str) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(len(word))
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{word}{i}.png")
        (root / f"{word}{i}.txt").write_text(f"a {word} number {i}")
    return root


class Holder:
    """lock_holder.py in its own process, started and waited on until it holds its lock."""

    def __init__(self, tmp: Path, *args: str):
        self.ready, self.go = tmp / "holder_ready", tmp / "holder_go"
        self.proc = subprocess.Popen([sys.executable, str(HOLDER), *args, str(self.ready), str(self.go)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 300  # a safety net, not a timing assertion
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.proc.kill()
                raise AssertionError(f"lock holder did not start: {self.proc.communicate()}")
            time.sleep(0.05)

    def release(self) -> str:
        self.go.touch()
        out, err = self.proc.communicate(input="", timeout=300)
        assert self.proc.returncode == 0, err
        return out


def build_in_process(dataset: Path, folder: Path, tmp: Path):
    tmp.mkdir(exist_ok=True)
    (tmp / "holder_ready").touch()  # never blocks: it only builds
    (tmp / "holder_go").touch()
    return subprocess.run([sys.executable, str(HOLDER), "build", str(dataset), str(folder), str(tmp / "holder_ready"),
                           str(tmp / "holder_go")], capture_output=True, text=True, timeout=300)


def cached_words(folder: Path) -> set:
    manifest = read_manifest(folder)
    assert len(LatentCache(folder)) == len(manifest["items"])  # every item readable
    shards = {p.name for p in folder.glob("shard_*.safetensors")}
    assert shards == {it["shard"] for it in manifest["items"]}, "an unused shard of the other build remains"
    return {it["caption"].split()[1] for it in manifest["items"]}


def test_two_processes_building_one_cache(tmp_path):
    apples, bananas = images(tmp_path / "apples", 3, "apple"), images(tmp_path / "bananas", 2, "banana")
    folder = tmp_path / "shared_cache"
    first = Holder(tmp_path, "build", str(apples), str(folder))  # encoding, so holding the folder
    second = build_in_process(bananas, folder, tmp_path / "second")
    assert second.returncode == 3, second.stderr
    assert str(folder) in second.stderr and f"pid {first.proc.pid}" in second.stderr, second.stderr
    assert f"lock_holder build of {apples}" in second.stderr, second.stderr
    assert sorted(p.name for p in folder.iterdir()) == [".oboro.lock"]  # the second wrote nothing
    assert "built 3 items" in first.release()
    assert cached_words(folder) == {"apple"} and read_manifest(folder)["dataset_dir"] == str(apples)
    # One after the other is the ordinary rebuild: the cache then holds only the new dataset.
    again = build_in_process(bananas, folder, tmp_path / "third")
    assert again.returncode == 0, again.stderr
    assert cached_words(folder) == {"banana"} and len(read_manifest(folder)["items"]) == 2


@pytest.fixture(scope="module")
def server(model_root, tmp_path_factory):
    if not (model_root / "aesthetic" / AESTHETIC).exists():  # before the server lists its models
        save_tiny_aesthetic(model_root / "aesthetic" / AESTHETIC)
    srv = Server(tmp_path_factory.mktemp("lock_server"), model_root)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def cache_graph(dataset: str, cache_name: str) -> dict:
    return {"vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
            "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": T5_NAME}},
            "cache": {"class_type": "OboroCacheLatents", "inputs": {
                "dataset_dir": dataset, "vae": ["vae", 0], "clip": ["te", 0], "policy": "fixed", "size": 32,
                "area": 64 * 64, "max_tokens": 8, "cache_name": cache_name}}}


def test_cache_node_refuses_a_cache_another_process_is_building(server, tmp_path):
    mine = images(server.root / "input" / "bananas", 2, "banana")
    theirs = images(tmp_path / "apples", 3, "apple")
    folder = server.output / "oboro_cache" / "shared"
    holder = Holder(tmp_path, "build", str(theirs), str(folder))
    message = error_of(submit(server, cache_graph("bananas", "shared")), "OboroCacheLatents")
    assert str(folder) in message and f"pid {holder.proc.pid}" in message, message
    holder.release()
    assert cached_words(folder) == {"apple"}
    entry = submit(server, cache_graph(mine.name, "shared"))  # free again: an ordinary rebuild
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert cached_words(folder) == {"banana"}


def test_score_node_refuses_a_dataset_another_process_is_writing(server, tmp_path):
    data = images(server.root / "input" / "scored", 2, "cherry")
    graph = {"s": {"class_type": "OboroScoreDataset", "inputs": {
        "dataset_dir": "scored", "model": AESTHETIC, "score_column": "aesthetic_score", "overwrite": False}}}
    holder = Holder(tmp_path, "hold", str(data))
    message = error_of(submit(server, graph), "OboroScoreDataset")
    assert str(data) in message and f"pid {holder.proc.pid}" in message and "lock_holder hold" in message, message
    assert not (data / "metadata.jsonl").exists()
    holder.release()
    assert submit(server, graph)["status"]["status_str"] == "success"
    assert len((data / "metadata.jsonl").read_text().splitlines()) == 2


def test_dedup_never_replaces_a_report(server):
    images(server.root / "input" / "deduped", 3, "plum")
    reports = server.output / "oboro_dedup"
    (reports / "taken").mkdir(parents=True)
    (reports / "taken" / "report.json").write_text('{"mine": true}')

    def dedup(name: str, threshold: float) -> dict:
        entry = submit(server, {"d": {"class_type": "OboroDedupDataset", "inputs": {
            "dataset_dir": "deduped", "threshold": threshold, "keep": "largest", "report_name": name}}})
        assert entry["status"]["status_str"] == "success", entry["status"]
        return json.loads(entry["outputs"]["d"]["text"][0])

    assert dedup("taken", 0.01)["report_dir"] == str(reports / "taken_00001_")
    assert (reports / "taken" / "report.json").read_text() == '{"mine": true}'
    first = hashlib.sha256((reports / "taken_00001_" / "report.json").read_bytes()).hexdigest()
    second = dedup("taken", 0.02)  # another threshold, so the node runs again
    assert second["report_dir"] == str(reports / "taken_00002_")
    assert second["exclude_list"] == str(reports / "taken_00002_" / "exclude.txt")
    assert hashlib.sha256((reports / "taken_00001_" / "report.json").read_bytes()).hexdigest() == first
