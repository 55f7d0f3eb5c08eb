"""The near-copy check (issue 24 §4) on the offline demo's own run (conftest.py `offline_demo`,
shared with test_demo.py, so this adds seconds): the images generated from held-out prompts (shape /
colour pairs the training set never had) are not flagged, while the training images themselves and
their copies at the size the demo generates (16 px: what a memorised image comes out as) are.
docs/provenance.md "Near copies" has the distances this prints."""
import json

import numpy as np
import pytest
from PIL import Image

from oboro.oboro_model import near_copies

pytestmark = pytest.mark.xdist_group("offline_demo")


def summary(rows) -> str:
    d = np.array([r["distance"] for r in rows])
    q = np.array([r["ratio"] for r in rows if r["ratio"] is not None])
    return (f"distance min/median/max {d.min():.4f}/{np.median(d):.4f}/{d.max():.4f}, "
            f"ratio to the training image's NN min {q.min():.3f}, flagged {sum(r['near_copy'] for r in rows)}")


def test_heldout_generations_are_not_near_copies_but_training_images_are(offline_demo):
    assert offline_demo.result.returncode == 0, offline_demo.result.stderr[-4000:]
    demo = offline_demo.demo
    report = json.loads((demo / "report.json").read_text())
    train = demo / report["dataset"]["dir"] / "images"  # the folder the demo trained on
    split = {s: [Image.open(demo / im["file"]) for im in report["images"] if im["split"] == s]
             for s in ("heldout", "control")}

    held = near_copies.check(train, split["heldout"])
    print("held-out:", summary(held["images"]))
    assert held["training_images"] == report["dataset"]["train_images"]
    assert held["flagged"] == 0, [r for r in held["images"] if r["near_copy"]]
    seen = near_copies.check(train, split["control"])  # seen captions: may well be close; reported only
    print("seen captions:", summary(seen["images"]))

    files = near_copies.dedup.list_images(train)
    size = report["resolution"]
    originals = [Image.open(train / f) for f in files]
    copies = [im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS) for im in originals]
    for name, images in (("training images", originals), (f"{size} px copies", copies)):
        r = near_copies.check(train, images)
        print(f"{name}:", summary(r["images"]))
        missed = [(f, row) for f, row in zip(files, r["images"]) if not row["near_copy"] or row["file"] != f]
        assert not missed, missed[:3]
