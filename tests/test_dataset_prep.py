"""Data preparation (paper section IV-A) from the user's side: near-duplicates on the offline demo's
dataset plus injected edits (JPEG, 10 % crop, brightness, resize), found by the model-free hash
embedding and the partitioned DBSCAN; the exclusion list then honoured by OboroCacheLatents in
ComfyUI's executor; Florence-2 captions and aesthetic scores from tiny random-weight models in the
models folders, written beside the images, never over existing ones, bad images reported."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from oboro.demo import data as demo_data
from oboro.oboro_model.data import dedup
from oboro.oboro_model.data.exclusions import read_exclusions, write_exclusions
from oboro.demo.near_dups import EDITS, smaller
from tiny_prep import save_tiny_aesthetic, save_tiny_florence

SUB = "dataprep"
TEXT_DIM = 32
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    info = demo_data.write_dataset(tmp_path_factory.mktemp("prep_demo"))
    return Path(info["dataset_dir"])


def test_hash_dedup_on_demo_set_with_injected_duplicates(demo):
    """Every edit lands in its source's group, no two distinct demo images merge, and the
    partitioned algorithm (partitions of 100) equals DBSCAN on the whole set."""
    files = dedup.list_images(demo)
    assert len(files) == 225
    emb = dedup.embed_folder(demo, files)
    vecs, source = list(emb.vectors), list(range(len(files)))
    for i, rel in enumerate(files):
        img = Image.open(demo / rel).convert("RGB")
        for edit in EDITS:
            vecs.append(dedup.hash_embedding(edit(img)))
            source.append(i)
    vecs = np.stack(vecs)
    whole = dedup.dbscan_groups(vecs, dedup.HASH_EPS)
    expected = sorted(sorted(j for j, s in enumerate(source) if s == i) for i in range(len(files)))
    assert whole == expected
    parts, rounds = dedup.iterative_dbscan(vecs, dedup.HASH_EPS, partition_size=100)
    assert sorted(sorted(g) for g in parts) == whole and rounds > 1
    # The representative is the best-ranked member: here the source (rank 0) before its copies.
    rank = [0 if j < len(files) else 1 for j in range(len(vecs))]
    parts, _ = dedup.iterative_dbscan(vecs, dedup.HASH_EPS, rank=rank, partition_size=100)
    assert all(g[0] < len(files) for g in parts)


def test_exclusion_list_format(tmp_path):
    path = write_exclusions(tmp_path / "x.txt", ["b/c.png", "a.png"], "/data/set", "note")
    lines = path.read_text().splitlines()
    assert lines[0] == "# oboro exclusion list v1" and lines[-2:] == ["a.png", "b/c.png"]
    assert read_exclusions(path) == {"a.png", "b/c.png"}
    (tmp_path / "bad.txt").write_text("ok.png\n../up.png\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 2: '\.\./up.png'"):
        read_exclusions(tmp_path / "bad.txt")


@pytest.fixture(scope="module")
def tiny_t5(comfy):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=TEXT_DIM, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                 feed_forward_proj="gated-gelu"))
    (comfy.models / "text_encoders" / SUB).mkdir(exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in t5.state_dict().items()},
              str(comfy.models / "text_encoders" / SUB / "tiny_t5.safetensors"))
    return f"{SUB}/tiny_t5.safetensors"


def cache_node(dataset, t5, name, **over):
    return {"class_type": "OboroCacheLatents", "inputs": {
        "dataset_dir": dataset, "vae": ["vae", 0], "clip": ["te", 0], "policy": "fixed", "size": 32,
        "area": 64 * 64, "max_tokens": 16, "cache_name": name, **over}}


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_dedup_node_then_cache_skips_duplicates(comfy, demo, tiny_t5, tmp_path):
    """Through ComfyUI's executor: OboroDedupDataset's exclude_list linked into OboroCacheLatents;
    the cache holds the sources only, the dataset folder is untouched."""
    data = tmp_path / "studio"
    (data / "dups").mkdir(parents=True)
    sources = sorted(demo.glob("*.png"))[::20]  # 12 distinct demo images
    for src in sources:
        img = Image.open(src).convert("RGB")
        img.save(data / src.name)
        (data / src.with_suffix(".txt").name).write_text(src.with_suffix(".txt").read_text())
    copies = {}
    for src in sources[:3]:
        for edit in EDITS:
            name = f"dups/{src.stem}_{edit.__name__}.png"
            edit(Image.open(src).convert("RGB")).save(data / name)
            (data / name).with_suffix(".txt").write_text("a copy")
            copies[name] = src.name
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (data / "broken.txt").write_text("broken")
    before = snapshot(data)
    graph = {
        "dd": {"class_type": "OboroDedupDataset", "inputs": {"dataset_dir": str(data), "threshold": 0.0,
                                                            "keep": "first", "report_name": f"{SUB}/t1"}},
        "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": tiny_t5}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "cache": cache_node(["dd", 0], tiny_t5, f"{SUB}_dedup", exclude_list=["dd", 1]),
        "sheet": {"class_type": "SaveImage", "inputs": {"images": ["dd", 3], "filename_prefix": f"{SUB}/sheet"}},
    }
    res = comfy.run(graph)
    report = json.loads(res["outputs"]["dd"]["text"][0])
    out_dir = comfy.output / "oboro_dedup" / SUB / "t1"
    assert report["exclude_list"] == str(out_dir / "exclude.txt")
    # "first" keeps the source (a top-level file sorts before dups/); each group = a source + its 4 copies.
    groups = {g["keep"]: sorted(g["duplicates"]) for g in report["duplicate_groups"]}
    assert groups == {s.name: sorted(c for c, o in copies.items() if o == s.name) for s in sources[:3]}
    assert read_exclusions(out_dir / "exclude.txt") == set(copies)
    assert [s["file"] for s in report["skipped"]] == ["broken.png"]
    full = json.loads((out_dir / "report.json").read_text())
    assert full["excluded"] == 12 and full["images"] == 12 + 12 + 1
    sheet, = res["outputs"]["sheet"]["images"]
    with Image.open(comfy.output / sheet["subfolder"] / sheet["filename"]) as im:
        assert im.height >= 3 * 96 and im.width >= 5 * 96  # 3 groups of 5
    manifest = json.loads((comfy.output / "oboro_cache" / f"{SUB}_dedup" / "manifest.json").read_text())
    assert sorted(i["file"] for i in manifest["items"]) == sorted(s.name for s in sources)
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert all("exclusion list" in reasons[c] for c in copies) and "broken.png" in reasons
    assert snapshot(data) == before  # nothing written, moved or deleted in the dataset folder


@pytest.fixture
def prep_models(comfy, tmp_path, monkeypatch):
    """Tiny Florence-2 and aesthetic models in registered model folders; tmp_path writable."""
    import folder_paths
    monkeypatch.setenv("OBORO_ALLOWED_ROOTS", str(tmp_path))
    roots = {kind: tmp_path / "models" / kind for kind in ("florence2", "aesthetic")}
    save_tiny_florence(roots["florence2"] / "tiny-florence")
    save_tiny_aesthetic(roots["aesthetic"] / "tiny-aesthetic")
    for kind, root in roots.items():
        folder_paths.add_model_folder_path(kind, str(root))
    yield SimpleNamespace(florence="tiny-florence", aesthetic="tiny-aesthetic")
    for kind, root in roots.items():
        folder_paths.folder_names_and_paths[kind][0].remove(str(root))


def small_set(root: Path) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "img0.txt").write_text("my own caption\n")
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_caption_node_writes_sidecars_keeps_existing(comfy, prep_models, tmp_path):
    data = small_set(tmp_path / "set")
    node = {"class_type": "OboroCaptionDataset", "inputs": {
        "dataset_dir": str(data), "model": prep_models.florence, "task": "<CAPTION>", "prefix": "oboro style",
        "suffix": "", "overwrite": False, "max_new_tokens": 6, "num_beams": 1}}
    report = json.loads(comfy.run({"cap": node})["outputs"]["cap"]["text"][0])
    assert (report["written"], report["kept_existing"]) == (2, 1)
    assert [s["file"] for s in report["skipped"]] == ["bad.jpg"]
    assert "unreadable image" in report["skipped"][0]["reason"]
    assert (data / "img0.txt").read_text() == "my own caption\n"
    for i in (1, 2):
        text = (data / f"img{i}.txt").read_text(encoding="utf-8")
        assert text.startswith("oboro style, ") and text.endswith("\n") and len(text.strip()) > len("oboro style,")
    assert not (data / "bad.txt").exists()
    node["inputs"].update(overwrite=True)
    comfy.run({"cap": node})
    assert (data / "img0.txt").read_text().startswith("oboro style, ")
    # Writing into a folder outside input/, output/ and OBORO_ALLOWED_ROOTS is refused.
    from oboro.runner.embedded import GraphError
    node["inputs"].update(dataset_dir=str(Path(os.sep) / "tmp"))
    with pytest.raises(GraphError, match="must lie inside"):
        comfy.run({"cap": node})


def test_score_node_writes_metadata_that_the_cache_tags(comfy, prep_models, tiny_t5, tmp_path):
    data = small_set(tmp_path / "set")
    for i in (1, 2):
        (data / f"img{i}.txt").write_text(f"picture {i}")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "img2.png", "aesthetic_score": 7.25}) + "\n")
    graph = {
        "score": {"class_type": "OboroScoreDataset", "inputs": {
            "dataset_dir": str(data), "model": prep_models.aesthetic, "score_column": "aesthetic_score",
            "overwrite": False, "batch_size": 2}},
        "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": tiny_t5}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "cache": cache_node(["score", 0], tiny_t5, f"{SUB}_scored", score_column="aesthetic_score"),
    }
    res = comfy.run(graph)
    report = json.loads(res["outputs"]["score"]["text"][0])
    assert (report["written"], report["kept_existing"]) == (2, 1)
    assert [s["file"] for s in report["skipped"]] == ["bad.jpg"]
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    by_file = {r["file_name"]: r["aesthetic_score"] for r in rows}
    assert set(by_file) == {"img0.png", "img1.png", "img2.png"} and by_file["img2.png"] == 7.25
    assert all(isinstance(v, float) and 5.0 < v < 6.0 for f, v in by_file.items() if f != "img2.png")
    manifest = json.loads((comfy.output / "oboro_cache" / f"{SUB}_scored" / "manifest.json").read_text())
    captions = {i["file"]: i["caption"] for i in manifest["items"]}
    assert captions == {"img0.png": "my own caption, good score", "img1.png": "picture 1, good score",
                        "img2.png": "picture 2, excellent score"}


def test_dataset_prep_template_twin_and_run(comfy, prep_models, tiny_t5, demo, tmp_path):
    """The shipped template converts to its API twin and runs as is, with only model names, the
    dataset folder and sizes changed: folder -> dedup -> caption -> score -> cache."""
    from oboro.runner import convert
    repo = Path(__file__).resolve().parents[1]
    ui = convert.load(repo / "example_workflows" / "oboro_dataset_prep.json")
    api = convert.load(repo / "workflows" / "api" / "oboro_dataset_prep.api.json")
    assert convert.is_ui(ui) and not convert.is_ui(api)
    assert convert.to_api(ui, convert.local_node_defs()) == api
    data = tmp_path / "studio"
    data.mkdir()
    sources = sorted(demo.glob("*.png"))[5::40]
    for src in sources:
        Image.open(src).save(data / src.name)
    smaller(Image.open(sources[0]).convert("RGB")).save(data / "copy.png")  # "largest" keeps the source
    nodes = {n["class_type"]: n["inputs"] for n in api.values()}
    nodes["OboroDedupDataset"].update(dataset_dir=str(data), report_name=f"{SUB}/template")
    nodes["OboroCaptionDataset"].update(model=prep_models.florence, max_new_tokens=6, num_beams=1)
    nodes["OboroScoreDataset"].update(model=prep_models.aesthetic)
    nodes["OboroT5Loader"].update(t5_name=tiny_t5)
    nodes["VAELoader"].update(vae_name="pixel_space")
    nodes["OboroCacheLatents"].update(policy="fixed", size=32, max_tokens=16, cache_name=f"{SUB}_template")
    nodes["SaveImage"].update(filename_prefix=f"{SUB}/template_sheet")
    comfy.run(api)
    manifest = json.loads((comfy.output / "oboro_cache" / f"{SUB}_template" / "manifest.json").read_text())
    assert sorted(i["file"] for i in manifest["items"]) == sorted(s.name for s in sources)
    assert all(i["caption"].endswith(", good score") for i in manifest["items"])
    assert not (data / "copy.txt").exists()  # the duplicate was neither captioned nor scored
    assert "copy.png" not in (data / "metadata.jsonl").read_text()


def test_clip_vision_embedding_from_core_object(comfy, demo, tmp_path):
    """The CLIP_VISION path: core's ClipVisionModel (a tiny config, random weights; core's loader
    only knows full-size checkpoints; 2 layers, as encode_image reads the penultimate) embeds through
    encode_image into the projected embedding, and a JPEG re-encode is nearest to its source."""
    import comfy.clip_vision
    from oboro.nodes.dataset_prep import clip_embedding
    cfg = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32,
           "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-5,
           "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2,
           "patch_size": 8, "projection_dim": 16, "torch_dtype": "float32"}
    (tmp_path / "cv.json").write_text(json.dumps(cfg))
    cv = comfy.clip_vision.ClipVisionModel(str(tmp_path / "cv.json"))
    gen = torch.Generator().manual_seed(0)
    # core's ops skip weight init: random weights, norms' scales at 1
    cv.load_sd({k: torch.ones(v.shape) if "norm" in k and k.endswith("weight")
                else torch.randn(v.shape, generator=gen) * 0.2 for k, v in cv.get_sd().items()})
    files = sorted(p.name for p in demo.glob("*.png"))[:6]
    emb = dedup.embed_folder(demo, files, clip_embedding(cv))
    assert not emb.skipped, emb.skipped
    assert emb.vectors.shape == (6, 16) and np.isfinite(emb.vectors).all()
    img = Image.open(demo / files[0]).convert("RGB")
    again = clip_embedding(cv)(EDITS[0](img))
    x = dedup._normalise(np.concatenate([emb.vectors, again[None]]))
    assert int(np.argmax(x[:6] @ x[6])) == 0  # nearest to its source (random weights: no threshold to test)


def test_remote_code_florence_folder_is_refused(tmp_path):
    from oboro.oboro_model.data.annotate import Captioner
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "florence2", "auto_map": {"AutoConfig": "x.Y"}}))
    with pytest.raises(ValueError, match="needs remote code"):
        Captioner(tmp_path)


def test_plain_dataset_name_is_in_the_input_folder(comfy, tmp_path, monkeypatch):
    import folder_paths
    from oboro.nodes.dataset_prep import folder_state, readable_dataset, writable_dataset
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path))
    (tmp_path / "set").mkdir()
    assert writable_dataset("set") == readable_dataset("set") == (tmp_path / "set").resolve()
    assert folder_state("set") != "missing:set"
    with pytest.raises(ValueError, match="leaves"):
        writable_dataset("../elsewhere")


def test_representative_choice(tmp_path):
    """largest: most pixels, then the larger file; highest score: unscored last; first: path order."""
    field = np.random.default_rng(0).integers(0, 255, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((40, 40), Image.Resampling.BICUBIC)  # smooth: a photo-like image
    img.save(tmp_path / "a.png")
    img.resize((80, 80)).save(tmp_path / "b.png")
    img.save(tmp_path / "c.jpg", quality=50)  # same pixels as a.png, smaller file
    emb = dedup.embed_folder(tmp_path, dedup.list_images(tmp_path))
    assert emb.files == ["a.png", "b.png", "c.jpg"]

    def kept(keep, scores=None):
        groups, _ = dedup.iterative_dbscan(emb.vectors, 0.1, dedup.rank_for(keep, emb, tmp_path, scores))
        assert len(groups) == 1
        return emb.files[groups[0][0]]
    assert kept("largest") == "b.png" and kept("first") == "a.png"
    assert kept("highest score", {"a.png": 5.0, "c.jpg": 6.5}) == "c.jpg"
    (tmp_path / "b.png").unlink()
    emb = dedup.embed_folder(tmp_path, dedup.list_images(tmp_path))
    assert kept("largest") == "a.png"


def test_caption_interrupt_keeps_what_was_written(comfy, prep_models, tmp_path):
    """Cancel after the second of three images: the first captions stay, whole; no more are written."""
    from comfy import model_management as mm, utils as comfy_utils  # (binds no `comfy`: that is the fixture)
    from oboro.runner.embedded import GraphError
    data = small_set(tmp_path / "set")  # to caption, in order: bad.jpg (skipped), img1.png, img2.png
    old = comfy_utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, prompt_id=None, node_id=None):
        if total == 3 and value >= 2:
            mm.interrupt_current_processing()
        old(value, total, preview, prompt_id=prompt_id, node_id=node_id)

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(GraphError, match="InterruptProcessingException|interrupted"):
            comfy.run({"cap": {"class_type": "OboroCaptionDataset", "inputs": {
                "dataset_dir": str(data), "model": prep_models.florence, "task": "<CAPTION>", "prefix": "",
                "suffix": "", "overwrite": False, "max_new_tokens": 4, "num_beams": 1}}})
    finally:
        comfy_utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert sorted(p.name for p in data.glob("*.txt")) == ["img0.txt", "img1.txt"]
    assert (data / "img1.txt").read_text().endswith("\n")
    assert not list(data.glob(".*.tmp"))
