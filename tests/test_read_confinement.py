"""Issue 26 §2, the NUL case, and #27 §3, as a user of a shared server meets them: a real ComfyUI
server (main.py, --input-directory set to a temp folder, OBORO_READ_ROOTS unset as on a fresh
install) answering graphs over HTTP.

- One path rule: a plain dataset_dir / mask_dir / exclude_list is in the server's input folder.
- Reads are confined: a folder outside the server's input/output/models folders, whether named
  absolute, by '..' or through a symlink in input/, is refused with the input named and the
  admin's remedy (OBORO_READ_ROOTS), and the refusal reads and changes nothing there.
- A NUL byte in a path input is an error naming that input.
Then the admin's allow-lists through ComfyUI's executor in this process (the env is read per call)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_server import Server
from oboro.runner.embedded import GraphError
from test_hardening_paths import tree_hash
from test_hardening_server import error_of, submit
from tiny import T5_NAME, save_t5, tiny_t5
from tiny_prep import save_tiny_aesthetic

AESTHETIC = "read_aes"


def images(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"picture {i}")
    return root


@pytest.fixture(scope="module")
def server(model_root, tmp_path_factory):
    if not (model_root / "aesthetic" / AESTHETIC).exists():  # before the server lists its models
        save_tiny_aesthetic(model_root / "aesthetic" / AESTHETIC)
    srv = Server(tmp_path_factory.mktemp("read_server"), model_root)
    with pytest.MonkeyPatch.context() as mp:  # the server starts as a fresh install would
        mp.delenv("OBORO_READ_ROOTS", raising=False)
        mp.delenv("OBORO_ALLOWED_ROOTS", raising=False)
        try:
            srv.start()
        except BaseException:
            srv.stop()
            raise
    try:
        yield srv
    finally:
        srv.stop()


def cache_node(dataset: str, cache_name: str, **extra) -> dict:
    return {"vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
            "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": T5_NAME}},
            "cache": {"class_type": "OboroCacheLatents", "inputs": {
                "dataset_dir": dataset, "vae": ["vae", 0], "clip": ["te", 0], "policy": "fixed", "size": 32,
                "area": 64 * 64, "max_tokens": 8, "cache_name": cache_name, **extra}}}


def dedup_node(dataset: str, report_name: str = "rc") -> dict:
    return {"d": {"class_type": "OboroDedupDataset", "inputs": {
        "dataset_dir": dataset, "threshold": 0.0, "keep": "largest", "report_name": report_name}}}


def score_node(dataset: str, **extra) -> dict:
    return {"s": {"class_type": "OboroScoreDataset", "inputs": {
        "dataset_dir": dataset, "model": AESTHETIC, "score_column": "aesthetic_score", "overwrite": True, **extra}}}


def test_plain_names_are_in_the_input_directory(server):
    """dataset_dir, mask_dir and exclude_list given as plain names resolve in --input-directory
    (not ComfyUI's own input/ nor the working folder), like the dataset-prep nodes."""
    inp = server.root / "input"
    images(inp / "studio" / "set")
    (inp / "masks").mkdir()
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(inp / "masks" / "img0.png")
    (inp / "skip.txt").write_text("img2.png\n")
    entry = submit(server, cache_node("studio/set", "plain", mask_dir="masks", exclude_list="skip.txt"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = json.loads(entry["outputs"]["cache"]["text"][0])
    assert report["items"] == 2 and report["loss_masks"] == {"mask_file": 1, "alpha": 0, "none": 1}
    manifest = json.loads((server.output / "oboro_cache" / "plain" / "manifest.json").read_text())
    assert manifest["dataset_dir"] == str((inp / "studio" / "set").resolve())
    dedup = json.loads(submit(server, dedup_node("studio/set"))["outputs"]["d"]["text"][0])
    assert dedup["dataset_dir"] == str((inp / "studio" / "set").resolve())


def test_template_style_input_prefix_says_what_to_type(server):
    """The shipped training templates said dataset_dir 'input/oboro_dataset' (then relative to the
    working folder); now plain names are in input/ already, and the error says to drop 'input/'."""
    images(server.root / "input" / "oboro_dataset")
    message = error_of(submit(server, cache_node("input/oboro_dataset", "tmpl")), "OboroCacheLatents")
    assert "dataset_dir 'input/oboro_dataset': not a folder" in message and "drop the leading 'input/'" in message
    assert submit(server, cache_node("oboro_dataset", "tmpl"))["status"]["status_str"] == "success"


def test_reads_outside_the_servers_folders_are_refused(server, tmp_path):
    inp = server.root / "input"
    images(inp / "ok")
    outside = images(tmp_path / "private")
    (outside / "list.txt").write_text("img0.png\n")
    (inp / "door").symlink_to(outside, target_is_directory=True)
    before, outputs = tree_hash(tmp_path), tree_hash(server.output)
    climb = os.path.relpath(outside, inp)  # '../../...': a plain name may not climb out either
    cases = [(cache_node(str(outside), "x"), "OboroCacheLatents", "dataset_dir"),
             (cache_node(str(tmp_path / "no_such"), "x"), "OboroCacheLatents", "dataset_dir"),
             (cache_node(climb, "x"), "OboroCacheLatents", "dataset_dir"),
             (cache_node("door", "x"), "OboroCacheLatents", "dataset_dir"),
             (cache_node("door/../door", "x"), "OboroCacheLatents", "dataset_dir"),
             (cache_node("ok", "x", mask_dir=str(outside)), "OboroCacheLatents", "mask_dir"),
             (cache_node("ok", "x", exclude_list=str(outside / "list.txt")), "OboroCacheLatents", "exclude_list"),
             (dedup_node(str(outside)), "OboroDedupDataset", "dataset_dir"),
             (dedup_node("door"), "OboroDedupDataset", "dataset_dir"),
             (score_node("ok", exclude_list=str(outside / "list.txt")), "OboroScoreDataset", "exclude_list")]
    for graph, node, what in cases:
        message = error_of(submit(server, graph), node)
        assert message.startswith(f"{what} ") and "is outside the folders this server may read" in message, message
        assert "OBORO_READ_ROOTS" in message, message
    # an outside path that does not exist is refused in the same words: no probing for paths
    assert "not a folder" not in error_of(submit(server, cache_node(str(tmp_path / "no_such"), "x")),
                                          "OboroCacheLatents")
    assert tree_hash(tmp_path) == before and tree_hash(server.output) == outputs
    assert not (inp / "ok" / ".oboro.lock").exists()  # the refused score run did not touch its dataset


def test_nul_byte_in_a_path_names_the_input(server):
    images(server.root / "input" / "nul_ok")
    cases = [(cache_node("nul_ok\x00x", "n"), "OboroCacheLatents", "dataset_dir"),
             (cache_node("nul_ok", "n\x00x"), "OboroCacheLatents", "cache_name"),
             (cache_node("nul_ok", "n", mask_dir="m\x00"), "OboroCacheLatents", "mask_dir"),
             (cache_node("nul_ok", "n", exclude_list="e\x00"), "OboroCacheLatents", "exclude_list"),
             (dedup_node("nul_ok\x00"), "OboroDedupDataset", "dataset_dir"),
             (dedup_node("nul_ok", "zz\x00"), "OboroDedupDataset", "report_name"),
             (score_node("\x00nul_ok"), "OboroScoreDataset", "dataset_dir")]
    for graph, node, what in cases:
        message = error_of(submit(server, graph), node)
        assert message.startswith(f"{what} ") and "NUL byte" in message, message
        assert "embedded null byte" not in message, message
    assert not (server.output / "oboro_cache" / "n").exists()
    assert not any(p.name.startswith("zz") for p in (server.output / "oboro_dedup").glob("*"))


@pytest.fixture(scope="module")
def t5(comfy):
    (comfy.models / "text_encoders" / "readconf").mkdir(exist_ok=True)
    save_t5(comfy.models / "text_encoders" / "readconf" / "t5.safetensors", tiny_t5())
    return "readconf/t5.safetensors"


@pytest.mark.usefixtures("one_thread")
def test_admin_allow_lists(comfy, t5, tmp_path, monkeypatch):
    """OBORO_READ_ROOTS lets the graph read a folder; OBORO_ALLOWED_ROOTS (writes) allows reading too."""
    data = images(tmp_path / "datasets" / "mine")
    graph = cache_node(str(data), "allow_list_test")
    graph["te"]["inputs"]["t5_name"] = t5
    monkeypatch.delenv("OBORO_READ_ROOTS", raising=False)
    monkeypatch.delenv("OBORO_ALLOWED_ROOTS", raising=False)
    with pytest.raises(GraphError, match="dataset_dir .* is outside the folders this server may read"):
        comfy.run(graph)
    monkeypatch.setenv("OBORO_READ_ROOTS", os.pathsep.join(["/nonexistent", str(tmp_path / "datasets")]))
    assert json.loads(comfy.run(graph)["outputs"]["cache"]["text"][0])["items"] == 3
    monkeypatch.delenv("OBORO_READ_ROOTS")
    monkeypatch.setenv("OBORO_ALLOWED_ROOTS", str(tmp_path))
    graph["cache"]["inputs"]["size"] = 16  # another input, so the executor runs the node again
    assert json.loads(comfy.run(graph)["outputs"]["cache"]["text"][0])["items"] == 3
