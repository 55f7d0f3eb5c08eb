"""The memory planner (oboro_model/training/memory.py) against measured peaks: each case trains
two steps of a small model in a probe process (tests/memory_probe.py: peak RSS over the RSS
before the case, after a warm-up; glibc told to return freed tensors to the OS) and the plan's total must
be within 15 % of it. CPU only; full and LoRA, gradient checkpointing on and off, two shapes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("memory_probe.py")
# hidden 384 x depth 4 (~8 M parameters) and a pixel-space hidden 256 x depth 6, at 32x32 latents
# (256 image tokens + 16 text + BOS), batch 2: tens to hundreds of MiB, far above RSS noise.
WIDE = dict(in_channels=4, hidden_size=384, depth=4, heads=[2, 4, 4, 8], mlp_hidden=1024, text_dim=64, adaln_dim=128)
DEEP = dict(in_channels=3, hidden_size=256, depth=6, heads=[2, 2, 4, 4, 8, 8], mlp_hidden=640, text_dim=48,
            adaln_dim=128)
CASES = {
    "full": dict(config=WIDE, lora=None, checkpointing=False),
    "full-checkpointing": dict(config=WIDE, lora=None, checkpointing=True),
    "lora-attn-checkpointing": dict(config=WIDE, lora={"rank": 8, "targets": "attn"}, checkpointing=True),
    "lora-all": dict(config=DEEP, lora={"rank": 4, "targets": "all"}, checkpointing=False),
}


def measure(specs: list) -> list:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, str(PROBE), json.dumps(specs)], capture_output=True, text=True, env=env,
                         timeout=900)
    if out.returncode and "clear_refs" in out.stderr and len(specs) > 1:
        return [r for spec in specs for r in measure([spec])]  # no peak reset here: one process per case
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured():
    """Every case measured in one probe process (one import of torch, one warm-up)."""
    specs = [dict(CASES[c], batch=2, latent=32, text=16, precision="no", optimizer="adamw") for c in CASES]
    return dict(zip(CASES, measure(specs)))


@pytest.mark.parametrize("case", list(CASES))
def test_plan_matches_measured_peak(measured, case):
    r = measured[case]
    ratio = r["plan"] / r["measured"]
    mib = {k: round(v / 2 ** 20, 1) for k, v in r.items()}
    assert 0.85 <= ratio <= 1.15, f"{case}: plan / measured = {ratio:.3f} ({mib} MiB)"


def test_plan_terms_for_the_real_model():
    """The 1B model's plan, checked term by term against parameter counts (no measurement)."""
    from oboro.oboro_model.training.memory import plan_memory
    from oboro.oboro_model.training.run import LoraSpec
    full = plan_memory("oboro-base-1b", None, "adamw", "bf16", batch_size=1, height=512, gradient_checkpointing=True)
    n = full.params
    assert full.trainable == n and 1.0e9 < n < 1.2e9
    assert (full.weights, full.gradients, full.optimizer) == (4 * n, 4 * n, 8 * n)
    assert full.tokens == 1 + 256 + 32 * 32
    assert full.total == full.weights + full.optimizer + max(full.activations, full.gradients + full.step)
    eight = plan_memory("oboro-base-1b", None, "adamw8bit", "bf16", gradient_checkpointing=True)
    assert eight.optimizer == 2 * n and eight.total < full.total
    lora = plan_memory("oboro-base-1b", LoraSpec(16, targets="attn"), "adamw", "bf16", gradient_checkpointing=True)
    assert lora.trainable == 32 * 16 * (1536 + 3 * 1536 + 1536 + 1536)
    assert lora.total < eight.total
    half = plan_memory("oboro-base-1b", LoraSpec(16, targets="attn"), "adamw", "bf16", base_dtype="bf16",
                       gradient_checkpointing=True)
    assert half.weights < 0.51 * lora.weights
    no_ckpt = plan_memory("oboro-base-1b", LoraSpec(16, targets="attn"), "adamw", "bf16")
    assert no_ckpt.activations > 5 * lora.activations
    assert "total (peak)" in lora.table()


def test_cli_plan_reads_the_cache(tmp_path):
    """`scripts/oboro-train --plan` on a checkpoint + a 2-bucket cache written by build_cache: it
    prints the plan for the cache's largest latent and longest text, and trains nothing."""
    import numpy as np
    import torch
    from PIL import Image
    from oboro.oboro_model import MMHDiT, save_checkpoint
    from oboro.oboro_model.config import preset
    from oboro.oboro_model.data import OboroDataset, build_cache
    from oboro.oboro_model.training.memory import GiB, plan_memory
    from oboro.oboro_model.training.run import LoraSpec
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(4):
        h, w = (48, 80) if i % 2 else (64, 64)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        (tmp_path / "images" / f"{i}.txt").write_text("word " * (1 + i))

    def text(captions):  # 3..6 tokens of width 32 (the tiny preset's T5 width)
        hidden = [torch.ones(3 + len(c) % 4, 32) for c in captions]
        return hidden, [torch.ones(h.shape[0], dtype=torch.long) for h in hidden]

    ds = OboroDataset(tmp_path / "images", policy="stage2_area", area=64 * 64, max_aspect=2.0, multiple=16)
    build_cache(ds, tmp_path / "cache", lambda px: torch.nn.functional.avg_pool2d(px, 8), text, {})
    cfg = preset("tiny", in_channels=3)
    save_checkpoint(tmp_path / "base.safetensors", MMHDiT(cfg))
    (tmp_path / "cfg.toml").write_text('model = "base.safetensors"\n[data]\npath = "cache"\n[training]\n'
                                       'batch_size = 2\ngradient_checkpointing = true\n[lora]\nrank = 4\n'
                                       'targets = "all"\n[output]\ndir = "run"\n')
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([str(repo / "scripts" / "oboro-train"), "--plan", str(tmp_path / "cfg.toml"), "--device",
                          "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    texts = [len(c) for c in ("word " * (1 + i) for i in range(4))]
    want = plan_memory(cfg, LoraSpec(4, targets="all"), batch_size=2, gradient_checkpointing=True, device="cpu",
                       latent_size=(8, 8), text_tokens=max(3 + n % 4 for n in texts))
    assert f"batch 2 x {want.tokens} tokens" in out.stdout, out.stdout
    total = next(line for line in out.stdout.splitlines() if "total (peak)" in line)
    assert total.endswith(f"{want.total / 2 ** 20:.3f} MiB"), out.stdout
    assert not (tmp_path / "run").exists()
