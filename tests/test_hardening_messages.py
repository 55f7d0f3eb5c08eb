"""Issue 13, case 5 through ComfyUI's executor: a damaged latent cache fails a training node with a
message naming the file, the item and the missing key, instead of a bare KeyError or a safetensors
error without a file name."""
import json
import shutil

import pytest

from oboro.runner.embedded import GraphError
from test_hardening_paths import train_graph, train_world  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def damaged(train_world, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    shutil.copytree(train_world / "cache", cache)
    return cache


def test_manifest_item_without_a_field_names_file_item_and_key(comfy, train_world, damaged):  # noqa: F811
    m = json.loads((damaged / "manifest.json").read_text())
    del m["items"][1]["bucket"]
    (damaged / "manifest.json").write_text(json.dumps(m))
    g = train_graph(train_world, "OboroTrainLoRA", "msg_manifest", cache_dir=str(damaged))
    with pytest.raises(GraphError) as e:
        comfy.run(g)
    assert f"{damaged / 'manifest.json'}: item 1 ({m['items'][1]['file']}) lacks field(s) ['bucket']" in str(e.value)


def test_truncated_shard_names_the_file(comfy, train_world, damaged):  # noqa: F811
    shard = damaged / json.loads((damaged / "manifest.json").read_text())["items"][0]["shard"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 40])
    g = train_graph(train_world, "OboroTrainLoRA", "msg_shard", cache_dir=str(damaged))
    with pytest.raises(GraphError) as e:
        comfy.run(g)
    msg = str(e.value)
    assert f"{shard}: cannot read 'latent_0' of item 0" in msg and "damaged or truncated" in msg
