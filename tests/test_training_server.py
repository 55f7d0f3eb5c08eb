"""The training nodes on a real ComfyUI server (main.py, over HTTP and the browser's websocket), as
an artist meets them: live preview images and loss/ETA text while training; Cancel (POST
/interrupt) shows "saved at step N of M — queue again to resume" on the node before the prompt
ends, and queueing again resumes to the same weights as a run never cancelled; the same output
name with new data or another base model starts fresh beside the old run and says what differs."""
from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid

import aiohttp
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from comfy_server import Server, http_json
from oboro.oboro_model import save_checkpoint
from tiny import DIT_NAME, T5_NAME, VAE_NAME, tiny_dit

STEPS, OTHER_BASE = 120, "srv_other_base.safetensors"


@pytest.fixture(scope="module")
def server(model_root, tmp_path_factory):
    if not (model_root / "diffusion_models" / OTHER_BASE).exists():  # before the server lists its models
        save_checkpoint(model_root / "diffusion_models" / OTHER_BASE, tiny_dit(seed=5))
    srv = Server(tmp_path_factory.mktemp("train_server"), model_root)
    rng = np.random.default_rng(0)
    for folder, n in (("ds", 4), ("ds_other", 3)):
        (srv.root / "input" / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(srv.root / "input" / folder
                                                                                    / f"i{i}.png")
            (srv.root / "input" / folder / f"i{i}.txt").write_text(f"picture {i} of {folder}")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def graph(name: str, dataset: str = "ds", model: str = DIT_NAME) -> dict:
    return {
        "m": {"class_type": "OboroModelLoader", "inputs": {"model_name": model, "weight_dtype": "fp32"}},
        "te": {"class_type": "OboroT5Loader", "inputs": {"t5_name": T5_NAME}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_NAME}},
        "cache": {"class_type": "OboroCacheLatents", "inputs": {
            "dataset_dir": dataset, "vae": ["vae", 0], "clip": ["te", 0], "policy": "fixed", "size": 64,
            "area": 64 * 64, "max_tokens": 8, "cache_name": f"srv_{dataset}"}},
        "opts": {"class_type": "OboroTrainingOptions", "inputs": {
            "batch_size": 2, "warmup": 0, "schedule": "constant", "optimizer": "adamw", "grad_accum": 1,
            "clip_grad_norm": 1.0, "precision": "fp32", "gradient_checkpointing": False, "caption_dropout": 0.1,
            "t_sampling": "uniform", "spike_guard": True, "checkpoint_every": 0, "keep_last": 2, "alpha": 8.0,
            "dropout": 0.0, "targets": "all", "preview_steps": 2, "preview_cfg": 3.0, "preview_seed": 0,
            "overwrite": False, "ema_decay": 0.0, "ema_start": 0, "log_with": "none", "t_mean": 0.0, "t_std": 1.0,
            "t_shift": 1.0}},
        "train": {"class_type": "OboroLoRATrainer", "inputs": {
            "model": ["m", 0], "cache_dir": ["cache", 0], "output_name": name, "steps": STEPS, "lr": 1e-3, "seed": 0,
            "rank": 4, "adapter": "lora", "resume_from": "latest", "clip": ["te", 0], "vae": ["vae", 0],
            "options": ["opts", 0], "preview_prompts": "a red square", "preview_every": 40}},
    }


async def _queue(server, g: dict, interrupt_at=None) -> dict:
    """Queue `g` as the browser does (websocket open first); press Cancel once the trainer's
    progress reaches `interrupt_at`. -> {"texts", "previews", "progress", "entry"}."""
    client = uuid.uuid4().hex
    seen = {"texts": [], "previews": 0, "progress": []}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{server.url}/ws?clientId={client}") as ws:
            async with http.post(f"{server.url}/prompt", json={"prompt": g, "client_id": client}) as r:
                pid = (await r.json())["prompt_id"]
            deadline, pressed = time.monotonic() + 300, False
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=300)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    kind = struct.unpack(">I", msg.data[:4])[0]
                    if kind == 3:
                        n = struct.unpack(">I", msg.data[4:8])[0]
                        seen["texts"].append((msg.data[8:8 + n].decode(), msg.data[8 + n:].decode()))
                    elif kind in (1, 2, 4):
                        seen["previews"] += 1
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(msg.data)
                if data["type"] == "progress" and data["data"].get("node") == "train":
                    seen["progress"].append(data["data"]["value"])
                    if interrupt_at is not None and not pressed and data["data"]["value"] >= interrupt_at:
                        pressed = True
                        async with http.post(f"{server.url}/interrupt", json={}) as r:
                            assert r.status == 200
                if data["type"] in ("execution_success", "execution_error", "execution_interrupted") and \
                        data["data"].get("prompt_id") == pid:
                    break
    for _ in range(100):
        entry = http_json(f"{server.url}/history/{pid}").get(pid)
        if entry and entry.get("status", {}).get("completed") is not None:
            seen["entry"] = entry
            return seen
        time.sleep(0.2)
    raise AssertionError(f"prompt {pid} did not finish\n{server.log()}")


def queue(server, g, interrupt_at=None) -> dict:
    return asyncio.run(_queue(server, g, interrupt_at))


def summary(seen) -> dict:
    return json.loads(seen["entry"]["outputs"]["train"]["text"][0])


def test_cancel_says_saved_and_queueing_again_resumes_to_the_uncancelled_weights(server):
    whole = queue(server, graph("srv_whole"))
    assert whole["entry"]["status"]["status_str"] == "success", server.log()
    assert whole["previews"] >= STEPS // 40  # live preview images on the progress bar
    assert any("loss" in t and "ETA" in t for node, t in whole["texts"] if node == "train")

    cut = queue(server, graph("srv_cut"), interrupt_at=3)
    assert cut["entry"]["status"]["status_str"] == "error", cut["entry"]["status"]
    assert any(m[0] == "execution_interrupted" for m in cut["entry"]["status"]["messages"])
    said = [t for node, t in cut["texts"] if node == "train" and "saved at step" in t]
    assert said and "queue again to resume" in said[-1], cut["texts"][-5:]
    step = int(said[-1].split("saved at step ")[1].split()[0])
    assert 3 <= step < STEPS, f"the interrupt landed after the run ended ({said[-1]})"

    again = queue(server, graph("srv_cut"))
    s = summary(again)
    assert again["entry"]["status"]["status_str"] == "success", server.log()
    assert (s["start_step"], s["step"]) == (step, STEPS)
    a, b = load_file(summary(whole)["path"]), load_file(s["path"])
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_new_data_or_another_base_under_the_same_name_start_fresh_and_say_so(server):
    g = graph("srv_id")
    g["train"]["inputs"]["steps"] = 2
    first = summary(queue(server, g))
    assert first["state_dir"].endswith("srv_id")
    g2 = graph("srv_id", dataset="ds_other")
    g2["train"]["inputs"]["steps"] = 2
    seen = queue(server, g2)
    s = summary(seen)
    assert s["state_dir"].endswith("srv_id_00001_") and s["start_step"] == 0
    assert "the training data" in s["note"] and any("started a fresh run" in t for _, t in seen["texts"])
    g3 = graph("srv_id", model=OTHER_BASE)
    g3["train"]["inputs"]["steps"] = 2
    s = summary(queue(server, g3))
    assert s["state_dir"].endswith("srv_id_00002_") and "the base model" in s["note"]
    # the first run, re-queued unchanged, is found again and not retrained
    g["opts"]["inputs"]["keep_last"] = 3  # a cadence setting: ComfyUI executes, the run is the same
    s = summary(queue(server, g))
    assert s["reused"] and s["path"] == first["path"]
