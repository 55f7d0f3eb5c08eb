"""oboro_model.data: caption sources, bad files, colour modes, resolution policies, buckets, quality
tags and bucketed batching (pure: no ComfyUI)."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from oboro.oboro_model.data import (BucketBatchSampler, OboroDataset, area_buckets, nearest_bucket, quality_tag,
                                    to_rgb)


def save(path, img, caption=None, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def rgb(w=64, h=48, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


@pytest.fixture
def messy(tmp_path):
    """Good images in several modes plus every kind of bad file."""
    root = tmp_path / "ds"
    save(root / "good.png", rgb(), "a red box")
    save(root / "sub" / "deep.jpg", rgb(40, 60, (10, 200, 10)), "a green box")
    save(root / "grey.png", Image.new("L", (50, 50), 128), "grey")
    rgba = Image.new("RGBA", (40, 40), (0, 0, 255, 0))  # fully transparent: composited on white
    save(root / "rgba.png", rgba, "transparent")
    save(root / "pal.gif", rgb().convert("P"), "palette")
    save(root / "cmyk.jpg", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "cmyk red")
    save(root / "i16.png", Image.fromarray(np.full((30, 30), 65535, dtype=np.uint16)), "sixteen bit")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png at all")
    (root / "corrupt.txt").write_text("corrupt")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "truncated.txt").write_text("cut")
    (root / "zero.jpg").write_bytes(b"")
    (root / "zero.txt").write_text("nothing")
    save(root / "nocaption.png", rgb())
    save(root / "blank.png", rgb(), "   \n")
    save(root / ".hidden" / "h.png", rgb(), "hidden folders are ignored")
    return root


def test_bad_files_are_reported_not_fatal(messy):
    ds = OboroDataset(messy, policy="stage1_256")
    assert [e.file for e in ds.entries] == ["cmyk.jpg", "good.png", "grey.png", "i16.png", "pal.gif", "rgba.png",
                                            "sub/deep.jpg"]
    reasons = {r["file"]: r["reason"] for r in ds.report}
    assert set(reasons) == {"corrupt.png", "truncated.png", "zero.jpg", "nocaption.png", "blank.png"}
    assert reasons["corrupt.png"].startswith("unreadable image")
    assert reasons["truncated.png"].startswith("unreadable image") and "truncat" in reasons["truncated.png"]
    assert reasons["zero.jpg"] == "empty file (0 bytes)"
    assert "missing caption" in reasons["nocaption.png"] and reasons["blank.png"] == "empty caption"
    for i in range(len(ds)):
        item = ds[i]
        assert item["pixels"].shape == (3, 256, 256) and item["pixels"].dtype == torch.float32
        assert 0 <= item["pixels"].min() and item["pixels"].max() <= 1 and item["bucket"] == (256, 256)


def test_colour_modes_convert_to_rgb(messy):
    ds = OboroDataset(messy, policy="fixed", size=(32, 32))
    px = {ds[i]["file"]: ds[i]["pixels"] for i in range(len(ds))}
    assert torch.allclose(px["rgba.png"], torch.ones(3, 32, 32))  # transparent -> white
    assert torch.allclose(px["i16.png"], torch.ones(3, 32, 32))  # 65535 -> 1.0, not clipped garbage
    assert torch.allclose(px["grey.png"], torch.full((3, 32, 32), 128 / 255))
    r, g, b = px["cmyk.jpg"].mean((1, 2))
    assert r > 0.8 and g < 0.2 and b < 0.2
    assert to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("1", (2, 2), 1)).mode == "RGB"


def test_caption_sources_txt_jsonl_csv(tmp_path):
    root = tmp_path / "ds"
    save(root / "a.png", rgb(), "from txt")
    save(root / "j" / "b.png", rgb(), "txt loses to metadata")
    (root / "j" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "b.png", "text": "from jsonl"}) + "\n{broken json\n"
        + json.dumps({"file_name": "gone.png", "text": "no such file"}) + "\n")
    save(root / "c" / "x" / "c.png", rgb())
    (root / "c" / "metadata.csv").write_text('file_name,text\nx/c.png,"from csv, with comma"\n')
    ds = OboroDataset(root, policy="stage1_256")
    assert {e.file: e.caption for e in ds.entries} == {"a.png": "from txt", "j/b.png": "from jsonl",
                                                        "c/x/c.png": "from csv, with comma"}
    assert any(r["file"] == "j/metadata.jsonl:2" and r["reason"].startswith("bad metadata line") for r in ds.report)
    assert any(r["file"] == "j/gone.png" and "does not exist" in r["reason"] for r in ds.report)


@pytest.mark.parametrize("score,tag", [(9.0, "excellent score"), (6.0, "excellent score"), (5.99, "good score"),
                                       (5.2, "good score"), (5.19, "average score"), (4.0, "average score"),
                                       (3.99, None), (0.0, None)])
def test_quality_tag_thresholds(score, tag):
    assert quality_tag(score) == tag


def test_score_column_tags_and_drops(tmp_path):
    root = tmp_path / "ds"
    rows = [("hi.png", 6.5), ("mid.png", 5.2), ("avg.png", 4.0), ("low.png", 3.9), ("none.png", "")]
    for name, _ in rows:
        save(root / name, rgb())
    (root / "metadata.csv").write_text("file_name,text,aesthetic\n" + "".join(f"{n},a box,{s}\n" for n, s in rows))
    ds = OboroDataset(root, score_column="aesthetic")
    assert {e.file: e.caption for e in ds.entries} == {"hi.png": "a box, excellent score",
                                                        "mid.png": "a box, good score",
                                                        "avg.png": "a box, average score"}
    reasons = {r["file"]: r["reason"] for r in ds.report}
    assert reasons["low.png"].startswith("dropped by score") and "aesthetic" in reasons["none.png"]
    untagged = OboroDataset(root)  # no score column: no tags, nothing dropped
    assert len(untagged) == 5 and all(e.caption == "a box" for e in untagged.entries)


@pytest.mark.parametrize("area,max_aspect,multiple", [(512 * 512, 1.3, 64), (1024 * 1024, 1.3, 64),
                                                      (768 * 768, 1.3, 64), (256 * 256, 2.0, 32)])
def test_bucket_rules(area, max_aspect, multiple):
    buckets = area_buckets(area, max_aspect, multiple)
    assert len(buckets) == len(set(buckets)) >= 3
    for w, h in buckets:
        assert w % multiple == 0 and h % multiple == 0
        assert 1 / max_aspect - 1e-9 <= w / h <= max_aspect + 1e-9
        assert abs(w * h - area) <= 0.1 * area
        assert (h, w) in buckets
    assert area_buckets() == [(448, 576), (512, 512), (576, 448)]
    assert nearest_bucket(800, 400, area_buckets()) == (576, 448)
    assert nearest_bucket(300, 330, area_buckets()) == (512, 512)
    assert nearest_bucket(100, 1000, area_buckets()) == (448, 576)


def test_policies_sizes(tmp_path):
    root = tmp_path / "ds"
    save(root / "wide.png", rgb(400, 200), "wide")
    save(root / "tall.png", rgb(120, 160), "tall")
    save(root / "square.png", rgb(90, 90), "square")
    s1 = OboroDataset(root, policy="stage1_256")
    assert all(s1[i]["pixels"].shape == (3, 256, 256) for i in range(len(s1)))
    s2 = OboroDataset(root, policy="stage2_area")
    got = {s2[i]["file"]: (s2[i]["bucket"], tuple(s2[i]["pixels"].shape)) for i in range(len(s2))}
    assert got == {"wide.png": ((576, 448), (3, 448, 576)), "tall.png": ((448, 576), (3, 576, 448)),
                   "square.png": ((512, 512), (3, 512, 512))}
    fx = OboroDataset(root, policy="fixed", size=(64, 32))
    assert all(fx[i]["pixels"].shape == (3, 32, 64) and fx[i]["bucket"] == (64, 32) for i in range(len(fx)))
    with pytest.raises(ValueError, match="unknown policy"):
        OboroDataset(root, policy="stage3")


def test_crops_are_seeded(tmp_path):
    root = tmp_path / "ds"
    a = np.zeros((64, 256, 3), dtype=np.uint8)
    a[:, :, 0] = np.arange(256, dtype=np.uint8)[None, :]  # a horizontal ramp: the crop offset shows
    save(root / "ramp.png", Image.fromarray(a), "ramp")
    one = OboroDataset(root, policy="stage1_256", seed=1)[0]["pixels"]
    assert torch.equal(one, OboroDataset(root, policy="stage1_256", seed=1)[0]["pixels"])
    starts = set()
    for seed in range(6):
        starts.add(round(OboroDataset(root, policy="stage1_256", seed=seed)[0]["pixels"][0, 0, 0].item(), 2))
    assert len(starts) > 1  # random crops differ between seeds
    ds = OboroDataset(root, policy="stage1_256", seed=1)
    by_epoch = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        by_epoch.append(ds[0]["pixels"])
        assert torch.equal(ds[0]["pixels"], by_epoch[-1])
    assert torch.equal(by_epoch[0], one) and any(not torch.equal(p, one) for p in by_epoch[1:])
    centre = OboroDataset(root, policy="fixed", size=64)[0]["pixels"][0]
    assert abs(centre.mean().item() - 127.5 / 255) < 0.02  # centre crop of a ramp has the middle mean


def test_bucket_batch_sampler(tmp_path):
    root = tmp_path / "ds"
    sizes = [(400, 200)] * 5 + [(100, 100)] * 4 + [(120, 160)] * 3
    for i, (w, h) in enumerate(sizes):
        save(root / f"{i:02d}.png", rgb(w, h), f"image {i}")
    ds = OboroDataset(root, policy="stage2_area")
    sampler = BucketBatchSampler(ds, batch_size=2, seed=3)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    assert sorted(i for b in epoch0 for i in b) == list(range(12)) and len(epoch0) == len(sampler) == 3 + 2 + 2
    for b in epoch0:
        assert len({ds.bucket_of(i) for i in b}) == 1
    epoch1 = list(sampler)  # the epoch advanced
    assert epoch1 != epoch0 and sampler.batches(0) == epoch0
    again = BucketBatchSampler(ds, batch_size=2, seed=3)
    assert list(again) == epoch0
    assert BucketBatchSampler(ds, batch_size=2, seed=4).batches(0) != epoch0
    dl = BucketBatchSampler(ds, batch_size=2, seed=3, drop_last=True)
    assert len(dl) == 2 + 2 + 1 and all(len(b) == 2 for b in dl)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=BucketBatchSampler(ds, 3, seed=0),
                                         collate_fn=lambda items: torch.stack([it["pixels"] for it in items]))
    assert sum(x.shape[0] for x in loader) == 12


def test_file_changed_after_scan_raises(tmp_path):
    root = tmp_path / "ds"
    save(root / "a.png", rgb(), "a")
    ds = OboroDataset(root, policy="fixed", size=16)
    save(root / "a.png", rgb(color=(0, 0, 0)))
    with pytest.raises(RuntimeError, match="changed since the dataset was scanned"):
        ds[0]


def test_missing_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        OboroDataset(tmp_path / "nope")
    assert len(OboroDataset(tmp_path)) == 0
