"""Measure the CPU memory of training steps, in a process of its own (run by test_memory_plan.py):

    python tests/memory_probe.py '[{"config": {...}, "lora": null | {"rank": 8, "targets": "attn"},
                                    "precision": "no", "checkpointing": false, "batch": 2, "latent": 32,
                                    "text": 16, "optimizer": "adamw"}, ...]'

prints one {"measured": bytes, "plan": bytes, ...} per case as a JSON list. measured = peak RSS
minus the RSS before the case, over building the model and two Trainer steps (the second one with
optimiser state); imports and a warm-up step of a tiny model (kernels, thread pools, allocator
set-up) come before the first baseline. Between cases the kernel's peak-RSS mark is reset
(/proc/self/clear_refs = 5, Linux >= 4.0); without that, one case per process (ru_maxrss). Run with
MALLOC_MMAP_THRESHOLD_ fixed, so glibc hands freed tensors back to the OS and RSS follows the live
tensors rather than the heap's high-water mark."""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import oboro_env  # noqa: E402

oboro_env.import_oboro()
from oboro.oboro_model.config import OboroConfig, preset  # noqa: E402
from oboro.oboro_model.model import MMHDiT  # noqa: E402
from oboro.oboro_model.training import Trainer, TrainConfig  # noqa: E402
from oboro.oboro_model.training.memory import plan_memory  # noqa: E402
from oboro.oboro_model.training.run import LoraSpec, add_seeded_lora  # noqa: E402


def status(key: str) -> int:
    """A /proc/self/status value (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def data(cfg: OboroConfig, n: int, latent: int, text: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"latent": torch.randn(cfg.in_channels, latent, latent, generator=g),
             "text": torch.randn(text, cfg.text_dim, generator=g), "text_mask": torch.ones(text, dtype=torch.bool)}
            for _ in range(n)]


def steps(cfg: OboroConfig, lora, precision: str, ckpt: bool, batch: int, latent: int, text: int, optimizer: str,
          n: int = 2) -> None:
    model = MMHDiT(cfg).initialize_weights(torch.Generator().manual_seed(0))
    if lora is not None:
        add_seeded_lora(model, lora, 0)
    tc = TrainConfig(steps=n, batch_size=batch, precision=precision, gradient_checkpointing=ckpt,
                     optimizer=optimizer, spike_guard=False, caption_dropout=0.0)
    Trainer(model, data(cfg, batch, latent, text), tc).train()


def case(spec: dict) -> tuple:
    cfg = OboroConfig(**spec["config"])
    lora = LoraSpec(**spec["lora"]) if spec.get("lora") else None
    return cfg, lora, (spec.get("precision", "no"), bool(spec.get("checkpointing")), int(spec.get("batch", 1)),
                       int(spec["latent"]), int(spec.get("text", 16)), spec.get("optimizer", "adamw"))


def main(specs: list) -> list:
    torch.set_num_threads(1)
    for spec in specs:  # warm-up: every kind of case once, on the tiny preset
        cfg, lora, args = case(spec)
        steps(preset("tiny", in_channels=cfg.in_channels), lora, *args[:3], 8, 4, args[5], n=1)
    out = []
    for i, spec in enumerate(specs):
        cfg, lora, args = case(spec)
        gc.collect()
        if not reset_peak() and i:
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): measure one case per process")
        base = status("VmRSS")
        steps(cfg, lora, *args)
        peak = status("VmHWM")
        plan = plan_memory(cfg, lora, args[5], args[0], batch_size=args[2], text_tokens=args[4],
                           gradient_checkpointing=args[1], device="cpu", latent_size=(args[3], args[3]))
        out.append({"measured": peak - base, "plan": plan.total, "activations": plan.activations,
                    "weights": plan.weights})
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
