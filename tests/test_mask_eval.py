"""scripts/oboro-mask-eval (demo/mask_eval.py): end to end with tiny settings (the report's
structure and files, every IoU a number in [0, 1]), the shift augmentation, a short evaluation on the
offline demo's model that must beat what ignoring the mask scores by a clear margin (part of `make
test`), and the full default evaluation against the issue's goal (mean IoU >= 0.85 with and without
text; ~30 min on one core, the README figure's run; marked `slow`, run with `pytest -m slow`)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# One pytest-xdist worker runs the offline demo once for both files (the `offline_demo` fixture).
pytestmark = pytest.mark.xdist_group("offline_demo")

REPO = Path(__file__).resolve().parents[1]
SHORT_STEPS, MARGIN = 400, 0.15  # the short evaluation's adapter steps; its required lead over ignoring the mask


def test_mask_eval_tiny(tmp_path):
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "oboro-mask-eval"), "--out", str(out), "--steps", "20",
                        "--adapter-steps", "10", "--sample-steps", "4", "--seeds", "1", "--threads", "1",
                        "--shift", "3", "--image-rank", "2"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"oboro mask-eval: report {out.resolve() / 'report.json'}" in r.stdout
    report = json.loads((out / "report.json").read_text())
    for f in report["files"]:
        assert (out / f).is_file(), f
    assert Image.open(out / "mask_eval.png").size[0] > 300
    assert set(report["mean_iou"]) == {"with_text", "without_text"}
    for key in ("with_text", "without_text"):
        assert 0.0 <= report["mean_iou"][key] <= 1.0
        samples = report["per_sample"][key]
        assert len(samples) == len(report["cases"]) == 12
        for s in samples:
            assert 0.0 <= s["iou"] <= 1.0 and (out / s["file"]).is_file()
        assert all(s["prompt"] == "" for s in samples) == (key == "without_text")
    # held-out masks: held-out (shape, colour) pairs, at centres none of the demo's positions
    from_demo = json.loads((out / "demo" / "report.json").read_text())
    pairs = {tuple(p) for p in from_demo["held_out_pairs"]}
    for c in report["cases"]:
        assert (c["shape"], c["colour"]) in pairs and c["prompt"] in [c2["prompt"] for c2 in report["cases"]]
    assert report["t5_check_max_abs_diff"] < 1e-3
    assert report["scorer_on_true_renders"]["mean_iou"] > 0.8
    assert set(report["seconds"]) >= {"demo", "adapter_train", "generate", "total"}
    assert report["adapter"]["steps"] == 10 and len(report["adapter"]["loss"]) == 10
    assert report["adapter"]["config"]["image_rank"] == 2 and report["adapter"]["shift"] == 3


def ignoring_the_mask_iou() -> tuple[float, float]:
    """Mean IoU of a perfect model that ignores the mask, over the evaluation's masks: with text it
    draws the prompt's shape at the prompt's position word (the demo's positions; the masks sit
    elsewhere); without text at one of the 5 positions, each equally likely."""
    from oboro.demo import data as dd
    from oboro.demo.mask_eval import case_labels, eval_cases, position_word

    def iou(a, b):
        return (a & b).sum() / max(1, (a | b).sum())

    def at(shape, pos):
        return np.asarray(dd.shape_mask(shape, dd.POSITIONS[pos], 32)) > 127

    text, free = [], []
    for c in eval_cases():
        want = case_labels(c, 32).numpy() > 0
        text.append(iou(want, at(c["shape"], position_word(c["centre"]))))
        free.append(np.mean([iou(want, at(c["shape"], p)) for p in dd.POSITIONS]))
    return float(np.mean(text)), float(np.mean(free))


def test_short_mask_eval_beats_ignoring_the_mask(offline_demo, tmp_path):
    """The CI-sized evaluation: the adapter trained SHORT_STEPS steps on the session's offline demo
    model (conftest.py), 2 seeds, 10 sampling steps. Ignoring the mask scores ~0.39 with text and
    ~0.25 without; the adapter must clear those by MARGIN (the full run reaches ~0.87 on both)."""
    assert offline_demo.result.returncode == 0, offline_demo.result.stderr[-4000:]
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "oboro-mask-eval"), "--demo", str(offline_demo.demo),
                        "--out", str(out), "--adapter-steps", str(SHORT_STEPS), "--seeds", "2", "--sample-steps", "10",
                        "--threads", "1"], capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    with_text, without = report["mean_iou"]["with_text"], report["mean_iou"]["without_text"]
    chance_text, chance_free = ignoring_the_mask_iou()
    print(f"short mask eval ({SHORT_STEPS} steps): mean IoU {with_text:.3f} with text (ignoring the mask: "
          f"{chance_text:.3f}), {without:.3f} mask only ({chance_free:.3f}); seconds {report['seconds']}")
    assert with_text >= chance_text + MARGIN and without >= chance_free + MARGIN


@pytest.mark.slow
def test_mask_eval_default_run_meets_the_iou_goal(tmp_path):
    """The default evaluation, as README reports it: a fresh demo base, the adapter trained on the
    engine, held-out (shape, colour) pairs at unseen positions, 8 seeds; both means >= 0.85."""
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "oboro-mask-eval"), "--out", str(out)],
                       capture_output=True, text=True, timeout=3600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    print("mask eval mean IoU", report["mean_iou"], "seconds", report["seconds"])
    assert report["adapter"]["config"]["dropped_text"] == "no_tokens" and report["sampler"]["seeds"] == list(range(8))
    assert len(report["per_sample"]["without_text"]) == 96
    assert report["mean_iou"]["with_text"] >= report["goal"] == 0.85
    assert report["mean_iou"]["without_text"] >= 0.85


def test_shift_keeps_image_and_mask_a_true_render():
    """Rolled demo pairs equal the demo's own renders of the shape at the shifted centre."""
    import numpy as np
    import torch
    from oboro.demo import data as dd
    from oboro.demo.mask_eval import shift_pair
    g = torch.Generator().manual_seed(0)
    for shape, pos in (("triangle", "left"), ("circle", "bottom"), ("square", "center")):
        img, mask = dd.render(shape, "red", "white", pos, 32)
        x, lab = torch.from_numpy(np.array(img)).permute(2, 0, 1), torch.from_numpy(np.array(mask).astype(np.int64))
        for _ in range(4):
            xs, ls = shift_pair(x, lab, 6, g)
            dy, dx = (torch.nonzero(ls).min(0).values - torch.nonzero(lab).min(0).values).tolist()
            assert max(abs(dy), abs(dx)) <= 6
            cx, cy = dd.POSITIONS[pos]
            want_img, want_mask = dd.render(shape, "red", "white", (cx + dx / 32, cy + dy / 32), 32)
            assert torch.equal(ls, torch.from_numpy(np.array(want_mask).astype(np.int64)))
            assert np.abs(xs.permute(1, 2, 0).numpy().astype(int) - np.array(want_img).astype(int)).max() <= 1

