"""Latent cache: reuse and invalidation, manifest hashes, atomic rebuilds, LatentCache as the
Trainer's dataset; then the OboroCacheLatents node inside ComfyUI (pixel_space VAE, tiny T5)."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from oboro.oboro_model.data import BucketBatchSampler, LatentCache, OboroDataset, build_cache, item_hash
from oboro.oboro_model.data.cache import MANIFEST

TEXT_DIM = 32


def write_images(root, n=5, sizes=None):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = sizes[i] if sizes else (40 + 8 * i, 32)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"caption number {i}" + " word" * i)
    return root


class FakeEncoders:
    """Deterministic stand-ins that count what they encode."""

    def __init__(self):
        self.images, self.texts, self.fail_after = 0, 0, None

    def image(self, pixels):
        self.images += pixels.shape[0]
        if self.fail_after is not None and self.images > self.fail_after:
            raise RuntimeError("encoder died")
        return torch.nn.functional.avg_pool2d(pixels, 8) * 2 - 1  # [B,3,H/8,W/8]

    def text(self, captions):
        self.texts += len(captions)
        hidden = [torch.arange(len(c.split()) * TEXT_DIM, dtype=torch.float32).view(1, -1, TEXT_DIM) + len(c)
                  for c in captions]
        return hidden, [torch.ones(1, h.shape[1], dtype=torch.long) for h in hidden]


def build(ds, folder, enc, settings=None, **kw):
    return build_cache(ds, folder, enc.image, enc.text, settings or {"vae": "fake", "t5": "fake", "max_tokens": 8},
                       **kw)


def test_reuse_and_exact_invalidation(tmp_path):
    root, folder = write_images(tmp_path / "ds"), tmp_path / "cache"
    enc = FakeEncoders()
    r = build(OboroDataset(root, policy="fixed", size=32), folder, enc, shard_size=2)
    assert (r["encoded"], r["reused"], r["skipped"]) == (5, 0, []) and enc.images == 5
    assert enc.texts == 6  # the captions and, once, the empty prompt (kept while the settings are the same)
    assert sorted(p.name for p in folder.glob("shard_*")) == ["shard_00000.safetensors", "shard_00001.safetensors",
                                                              "shard_00002.safetensors"]
    enc = FakeEncoders()
    r = build(OboroDataset(root, policy="fixed", size=32), folder, enc, shard_size=2)
    assert (r["encoded"], r["reused"]) == (0, 5) and enc.images == enc.texts == 0

    (root / "img1.txt").write_text("a brand new caption")  # one caption changes
    r = build(OboroDataset(root, policy="fixed", size=32), folder, enc := FakeEncoders(), shard_size=2)
    assert (r["encoded"], r["reused"]) == (1, 4) and enc.images == enc.texts == 1
    Image.new("RGB", (40, 32), (1, 2, 3)).save(root / "img3.png")  # one image changes
    r = build(OboroDataset(root, policy="fixed", size=32), folder, enc := FakeEncoders(), shard_size=2)
    assert (r["encoded"], r["reused"]) == (1, 4) and enc.images == 1

    r = build(OboroDataset(root, policy="fixed", size=32), folder, enc := FakeEncoders(),
              {"vae": "fake", "t5": "fake", "max_tokens": 16})  # encode settings change: everything
    assert (r["encoded"], r["reused"]) == (5, 0)
    r = build(OboroDataset(root, policy="fixed", size=32, seed=1), folder, enc := FakeEncoders(),
              {"vae": "fake", "t5": "fake", "max_tokens": 16})  # so does the crop seed
    assert r["encoded"] == 5
    used = {it["shard"] for it in LatentCache(folder).items}
    assert {p.name for p in folder.glob("shard_*")} == used  # unreferenced shards are gone
    assert not list(folder.glob("*.tmp"))


def test_sparse_shards_are_compacted(tmp_path):
    root, folder = write_images(tmp_path / "ds", 5), tmp_path / "cache"
    build(OboroDataset(root, policy="fixed", size=32), folder, FakeEncoders(), shard_size=4)
    before = LatentCache(folder)
    kept = before[3]
    assert before.items[3]["shard"] == "shard_00000.safetensors"
    for i in range(3):  # 3 of shard 0's 4 items change: its one live item moves to a new shard
        (root / f"img{i}.txt").write_text(f"new {i}")
    r = build(OboroDataset(root, policy="fixed", size=32), folder, enc := FakeEncoders(), shard_size=4)
    assert (r["encoded"], r["reused"]) == (3, 2) and enc.images == 3
    after = LatentCache(folder)
    assert not (folder / "shard_00000.safetensors").exists() and after.items[4]["shard"] == "shard_00001.safetensors"
    assert all(torch.equal(after[3][k], kept[k]) for k in ("latent", "text", "text_mask"))


def test_manifest_and_tensors(tmp_path):
    root, folder = write_images(tmp_path / "ds", 4), tmp_path / "cache"
    ds = OboroDataset(root, policy="fixed", size=(32, 16))
    settings = {"vae": "fake", "vae_hash": "abc", "t5": "fake", "max_tokens": 8}
    build(ds, folder, FakeEncoders(), settings)
    m = json.loads((folder / MANIFEST).read_text())
    assert m["format"] == "oboro-latent-cache" and m["settings"] == {**ds.settings(), **settings}
    cache = LatentCache(folder)
    assert len(cache) == 4 and cache.bucket_of(0) == (32, 16)
    ref = FakeEncoders()
    for i, it in enumerate(m["items"]):
        data = (root / it["file"]).read_bytes()
        assert it["image_sha256"] == hashlib.sha256(data).hexdigest()
        assert it["sha256"] == item_hash(it["image_sha256"], it["caption"], {**m["settings"], "bucket": [32, 16]})
        assert it["shard"].startswith("shard_") and it["key"]
        got, item = cache[i], ds[i]
        assert torch.equal(got["latent"], ref.image(item["pixels"][None])[0])
        hidden, mask = ref.text([item["caption"]])
        assert torch.equal(got["text"], hidden[0][0]) and torch.equal(got["text_mask"], mask[0][0])
        assert got["caption"] == it["caption"] == item["caption"] and got["file"] == it["file"]
    hidden, mask = ref.text([""])  # caption dropout's empty prompt, stored with the cache
    assert torch.equal(cache.empty_text, hidden[0][0]) and torch.equal(cache.empty_mask, mask[0][0])
    assert m["latent_transform"] == {"format": "identity", "scale": 1.0, "shift": 0.0}  # 3 channels: pixel space


def test_latent_transform_is_recorded_and_applied(tmp_path, caplog):
    """The manifest says how stored latents become model inputs; LatentCache(transform="manifest")
    applies it; a cache without the record (older versions) falls back to oboro's rule by channel
    count, with a warning."""
    from oboro.oboro_model.data import latent_transform
    root, folder = write_images(tmp_path / "ds", 2), tmp_path / "cache"
    spec = latent_transform("Flux", 0.3611, 0.1159)
    build(OboroDataset(root, policy="fixed", size=32), folder, FakeEncoders(), transform=spec)
    raw, scaled = LatentCache(folder), LatentCache(folder, transform="manifest")
    assert raw.latent_transform == spec
    torch.testing.assert_close(scaled[1]["latent"], (raw[1]["latent"] - 0.1159) * 0.3611)
    m = json.loads((folder / MANIFEST).read_text())
    del m["latent_transform"], m["empty_prompt"]
    (folder / MANIFEST).write_text(json.dumps(m))
    old = LatentCache(folder, transform="manifest")
    assert old.empty_text is None and "does not record its latent transform" in caplog.text
    assert torch.equal(old[1]["latent"], raw[1]["latent"])  # 3 channels: identity
    with pytest.raises(ValueError, match="transform must be"):
        LatentCache(folder, transform="flux")


def test_skips_and_failed_build_keeps_old_cache(tmp_path):
    root, folder = write_images(tmp_path / "ds", 4), tmp_path / "cache"
    (root / "broken.png").write_bytes(b"not an image")
    (root / "broken.txt").write_text("x")
    r = build(OboroDataset(root, policy="fixed", size=32), folder, FakeEncoders())
    assert r["encoded"] == 4 and [s["file"] for s in r["skipped"]] == ["broken.png"]
    before = (folder / MANIFEST).read_text()
    for i in range(4):
        (root / f"img{i}.txt").write_text(f"changed {i}")
    enc = FakeEncoders()
    enc.fail_after = 2
    with pytest.raises(RuntimeError, match="encoder died"):
        build(OboroDataset(root, policy="fixed", size=32), folder, enc, shard_size=1, batch_size=1)
    assert (folder / MANIFEST).read_text() == before  # manifest untouched...
    assert len(LatentCache(folder)) == 4 and LatentCache(folder)[3]["latent"].shape == (3, 4, 4)  # ...and readable
    ds = OboroDataset(root, policy="fixed", size=32)
    (root / "img0.png").unlink()  # vanishes after the scan: skipped at encode time, not fatal
    r = build(ds, folder, FakeEncoders())
    assert r["encoded"] == 3 and {s["file"] for s in r["skipped"]} == {"broken.png", "img0.png"}
    assert [it["file"] for it in LatentCache(folder).items] == ["img1.png", "img2.png", "img3.png"]


def test_damaged_shard_is_reencoded(tmp_path):
    root, folder = write_images(tmp_path / "ds", 3), tmp_path / "cache"
    build(OboroDataset(root, policy="fixed", size=32), folder, FakeEncoders(), shard_size=1)
    shard = LatentCache(folder).items[1]["shard"]
    save_file({"unrelated": torch.zeros(1)}, str(folder / shard))
    r = build(OboroDataset(root, policy="fixed", size=32), folder, enc := FakeEncoders(), shard_size=1)
    assert (r["encoded"], r["reused"]) == (1, 2) and enc.images == 1


def test_buckets_sampler_and_trainer_on_cache(tmp_path):
    from oboro.oboro_model import MMHDiT, preset
    from oboro.oboro_model.training import Trainer, TrainConfig, collate
    root, folder = write_images(tmp_path / "ds", 6, [(80, 48)] * 3 + [(48, 48)] * 3), tmp_path / "cache"
    build(OboroDataset(root, policy="stage2_area", area=64 * 64, max_aspect=2.0, multiple=16), folder, FakeEncoders())
    cache = LatentCache(folder)
    assert {cache.bucket_of(i) for i in range(6)} == {(80, 48), (64, 64)}
    for batch in BucketBatchSampler(cache, 3, seed=0):
        latent, text, mask = collate([cache[i] for i in batch])
        assert latent.shape[1] == 3 and text.shape[-1] == TEXT_DIM and mask.any(1).all()
    square = LatentCache(folder)
    square.items = [it for it in square.items if it["bucket"] == [64, 64]]
    torch.manual_seed(0)
    model = MMHDiT(preset("tiny", in_channels=3, text_dim=TEXT_DIM))
    loss = Trainer(model, square, TrainConfig(steps=1, batch_size=3, spike_guard=False)).train_step()
    assert np.isfinite(loss)


# ---- inside ComfyUI -------------------------------------------------------------------------------
SUB = "cache_test"


@pytest.fixture(scope="module")
def tiny_t5(comfy):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=TEXT_DIM, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                 feed_forward_proj="gated-gelu"))
    d = comfy.models / "text_encoders" / SUB
    d.mkdir(exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in t5.state_dict().items()}, str(d / "tiny_t5.safetensors"))
    return f"{SUB}/tiny_t5.safetensors"


def test_comfy_encoders_into_cache(comfy, tiny_t5, tmp_path):
    from comfy.sd import VAE
    from oboro.nodes.text_encoder import OboroT5Loader, OboroTextEncode
    from oboro.nodes.training_data import clip_encoder, vae_encoder
    vae = VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    clip = OboroT5Loader.execute(tiny_t5, "fp32")[0]
    root, folder = write_images(tmp_path / "ds", 3), tmp_path / "cache"
    ds = OboroDataset(root, policy="stage1_256", size=32)
    stats = {"truncated": 0}
    r = build_cache(ds, folder, vae_encoder(vae), clip_encoder(clip, 4, stats), {"max_tokens": 4}, batch_size=2)
    n_tokens = [len(clip.tokenize(ds[i]["caption"])["t5xxl"][0]) for i in range(3)]
    assert n_tokens[-1] > 4 and r["encoded"] == 3 and stats["truncated"] == sum(n > 4 for n in n_tokens)
    cache = LatentCache(folder)
    for i in range(3):
        got, item = cache[i], ds[i]
        torch.testing.assert_close(got["latent"], item["pixels"] * 2 - 1)  # pixel space: [0,1] -> [-1,1]
        (cond, extra), = OboroTextEncode.execute(clip, item["caption"], 4)[0]
        torch.testing.assert_close(got["text"], cond[0].float())
        assert torch.equal(got["text_mask"], extra["attention_mask"][0]) and got["text"].shape[0] <= 4


def test_cache_node_in_comfy(comfy, tiny_t5, tmp_path):
    root = write_images(tmp_path / "ds", 3)
    (root / "bad.jpg").write_bytes(b"")
    (root / "bad.txt").write_text("zero bytes")
    graph = {
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": tiny_t5}},
        "cache": {"class_type": "OboroCacheLatents", "inputs": {
            "dataset_dir": str(root), "vae": ["vae", 0], "clip": ["te", 0], "policy": "stage2_area", "size": 256,
            "area": 64 * 64, "max_tokens": 256, "cache_name": "node_test", "score_column": ""}},
    }
    report = json.loads(comfy.run(graph)["outputs"]["cache"]["text"][0])
    folder = comfy.output / "oboro_cache" / "node_test"
    assert report["cache_dir"] == str(folder.resolve()) and (report["encoded"], report["reused"]) == (3, 0)
    assert report["skipped"] == [{"file": "bad.jpg", "reason": "empty file (0 bytes)"}]
    cache = LatentCache(folder)
    assert len(cache) == 3 and cache[0]["latent"].shape == (3, 64, 64) and cache[0]["text"].shape[1] == TEXT_DIM
    assert cache.settings["policy"] == "stage2_area" and len(cache.settings["vae_hash"]) == 64
    again = json.loads(comfy.run(graph)["outputs"]["cache"]["text"][0])
    assert (again["encoded"], again["reused"]) == (0, 3)
    from oboro.nodes.training_data import OboroCacheLatents
    fp = OboroCacheLatents.fingerprint_inputs(dataset_dir=str(root), cache_name="node_test")
    assert fp == OboroCacheLatents.fingerprint_inputs(dataset_dir=str(root), cache_name="node_test")
    (root / "img0.txt").write_text("edited")
    assert fp != OboroCacheLatents.fingerprint_inputs(dataset_dir=str(root), cache_name="node_test")
    graph["cache"]["inputs"]["cache_name"] = "../../escape"
    from oboro.runner.embedded import GraphError
    with pytest.raises(GraphError, match="leaves"):
        comfy.run(graph)
