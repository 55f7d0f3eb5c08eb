"""How much memory a training run needs, before running it: `plan_memory(...)` -> MemoryPlan.

A studio has to know whether LoRA or full training of oboro-base-1b at 512² fits its GPU before
it rents one, so the plan is computed from the architecture and the run settings alone (the model
is only built on the meta device, to count parameters). What it counts, in bytes:

- weights: every parameter in its storage dtype (`base_dtype`: full training keeps fp32; a LoRA's
  frozen base keeps the model's storage dtype, frozen_base.py; the LoRA's own weights are fp32);
- gradients: one fp32 gradient per trainable parameter (all of them, after the backward pass);
- optimizer: AdamW and ScheduleFree AdamW 2 fp32 tensors per trainable parameter, 8-bit AdamW 2
  bytes (bitsandbytes: two 8-bit moments), Prodigy 4 fp32 tensors (moments, s, the initial
  weights p0); `ema` adds one fp32 copy (kept in `ema`);
- activations: what autograd keeps between forward and backward for one micro-batch of
  `batch_size` samples of N = 1 (BOS) + text tokens + (H/8/patch)·(W/8/patch) tokens. Per block:
  N·(a·hidden + b·mlp_hidden) bytes, a and b depending on what trains (full, or LoRA on attn / mlp
  / all) and on autocast; under bf16 autocast the bf16 copies of fp32 weights the matmuls keep for
  backward are added (2 bytes per block Linear weight; LoRA's frozen adaLN keeps none). Outside
  the blocks (embedders, final layer, loss) c·N·hidden. Plus backward's working set inside one
  block (gradients of its intermediates, 4·N·(2·hidden + 2·mlp_hidden)). With gradient
  checkpointing a block keeps only its fp32 input (4·N·hidden) and one block at a time is
  recomputed with all of its activations (autocast still caches the half copies of all trainable
  weights until the forward pass ends). a, b, c were fitted to the bytes autograd saves
  (saved-tensor hooks) for models of several widths, depths and token counts (CPU, SDPA's flash
  kernel: no N² attention matrix; a padded prompt on a GPU kernel without mask support would add
  B·heads·N² per block);
- step: temporaries of the optimiser step. With the GPU's foreach AdamW one fp32 tensor per
  trainable parameter (the square root of the second moment); on the CPU (per-tensor loop) one
  of the largest parameter; bitsandbytes none.

total = weights + optimizer + ema + max(backward, gradients + step): at the start of backward all
activations are alive and almost no gradient; as backward goes on, activations are freed while
gradients appear, and at the optimiser step all gradients and its temporaries coexist. backward is
the activations; with checkpointing, the larger of them and the last recomputed block's on top of
(nearly) all gradients; with grad_accum > 1 plus all gradients (the next micro-batch's forward runs
with the previous one's gradients).

Not counted: the CUDA context and kernels' workspaces (~0.5-1 GiB on a GPU), allocator
fragmentation, the data loader, and previews rendered by the nodes. tests/test_memory_plan.py
checks the total against measured peaks on CPU (within 15 %).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..config import OboroConfig, preset
from .optim import OPTIMIZERS

GiB = 1024 ** 3
VAE_FACTOR = 8  # FLUX VAE: 8x8 pixels per latent cell

# Bytes per token per block (a·hidden + b·mlp_hidden) and outside the blocks (c·hidden), keyed by
# (what trains, autocast). Fitted as the module docstring says; "all" also stands for a custom
# target list (an upper bound for any subset).
_ACT = {  # (mode, autocast): (a, b, c)
    ("full", False): (88.1, 16.1, 13.4), ("full", True): (78.1, 8.1, 11.9),
    ("attn", False): (44.3, 12.1, 1.3), ("attn", True): (40.0, 6.2, 0.0),
    ("mlp", False): (44.3, 16.1, 0.0), ("mlp", True): (40.8, 7.9, 0.0),
    ("all", False): (48.4, 16.1, 1.3), ("all", True): (44.1, 8.3, 0.0),
}
_ACT_CKPT_FIXED = {"full": 13.2, "lora": 5.3}  # c with checkpointing (bytes per token·hidden)
_OPT_BYTES = {"adamw": 8.0, "schedulefree": 8.0, "adamw8bit": 2.0, "prodigy": 16.0}
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "fp8": torch.float8_e4m3fn,
           "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a run needs (see the module docstring for what each term counts)."""
    weights: int
    gradients: int
    optimizer: int
    ema: int
    activations: int
    step: int
    total: int
    params: int
    trainable: int
    tokens: int
    settings: dict

    def table(self) -> str:
        s = self.settings
        what = f"LoRA rank {s['lora_rank']} on {s['lora_targets']}" if s["lora_rank"] else "all weights"
        head = (f"memory plan: {s['model']} ({self.params / 1e6:.1f} M parameters, {self.trainable / 1e6:.2f} M "
                f"trained: {what}); {s['optimizer']}, precision {s['precision']}, base {s['base_dtype']}, batch "
                f"{s['batch_size']} x {self.tokens} tokens ({s['height']}x{s['width']} px, {s['text_tokens']} text), "
                f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}")
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer)]
        if self.ema:
            rows.append(("EMA", self.ema))
        rows += [("activations", self.activations), ("optimizer step temporaries", self.step),
                 ("total (peak)", self.total)]
        w = max(len(r[0]) for r in rows)
        unit, div = ("GiB", GiB) if self.total >= GiB else ("MiB", 2 ** 20)
        lines = [head] + [f"  {name:<{w}}  {b / div:9.3f} {unit}" for name, b in rows]
        lines.append("  (not counted: CUDA context and workspaces ~0.5-1 GiB, allocator fragmentation)")
        return "\n".join(lines)

    def line(self) -> str:
        """One log line."""
        unit, div = ("GiB", GiB) if self.total >= GiB else ("MiB", 2 ** 20)
        f = lambda b: f"{b / div:.2f}"  # noqa: E731
        s = self.settings
        return (f"memory plan ({s['model']}, batch {s['batch_size']} x {self.tokens} tokens, {s['precision']}, "
                f"base {s['base_dtype']}, "
                f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}): peak {f(self.total)} {unit} = "
                f"weights {f(self.weights)} + optimizer {f(self.optimizer)} + EMA {f(self.ema)} + the larger of "
                f"activations {f(self.activations)} and gradients {f(self.gradients)} + step {f(self.step)}")


def _dtype(d: Union[None, str, torch.dtype]) -> torch.dtype:
    if d is None:
        return torch.float32
    if isinstance(d, torch.dtype):
        return d
    if d not in _DTYPES:
        raise ValueError(f"unknown dtype {d!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[d]


def _lora_mode(targets) -> str:
    return targets if isinstance(targets, str) and targets in ("attn", "mlp", "all") else "all"


def _count(config: OboroConfig, lora) -> tuple[int, int, int, int]:
    """(all parameters incl. LoRA, trainable, largest trainable tensor, block Linear weights that a
    bf16 autocast keeps copies of) counted on a meta-device model."""
    from ..model import MMHDiT
    from .lora import resolve_targets
    with torch.device("meta"):
        net = MMHDiT(config)
    base = sum(p.numel() for p in net.parameters())
    blk = net.blocks[0]
    cast = sum(m.weight.numel() for n, m in blk.named_modules() if isinstance(m, torch.nn.Linear)
               and not (lora is not None and n.startswith("adaLN")))
    cast *= config.depth  # heads differ per block, weight shapes do not
    if lora is None:
        return base, base, max(p.numel() for p in net.parameters()), cast
    mods = dict(net.named_modules())
    targets = [mods[n] for n in resolve_targets(net, lora.targets)]
    sizes = [lora.rank * (m.in_features + m.out_features) for m in targets]
    largest = max(lora.rank * max(m.in_features, m.out_features) for m in targets)
    return base + sum(sizes), sum(sizes), largest, cast


def plan_memory(config: Union[str, OboroConfig], lora=None, optimizer: str = "adamw", precision: str = "no",
                base_dtype=None, batch_size: int = 1, height: int = 512, width: Optional[int] = None,
                text_tokens: int = 256, gradient_checkpointing: bool = False, grad_accum: int = 1,
                ema: bool = False, device: str = "cuda", latent_size: Optional[tuple[int, int]] = None) -> MemoryPlan:
    """The memory of one training run (module docstring). `config`: an OboroConfig or preset name;
    `lora`: a LoraSpec (run.py) or None for full training; `precision`: TrainConfig's no | bf16 |
    fp16 (autocast); `base_dtype`: storage dtype of the weights (fp32 for full training;
    a frozen LoRA base keeps bf16 / fp8); height/width in pixels (latent = pixels / 8, or = pixels for a 3-channel
    pixel-space model; tokens = latent / patch), or
    `latent_size` (h, w) in latent cells (e.g. a pixel-space model's latents); `device`: "cuda"
    (foreach optimiser temporaries) or "cpu"."""
    cfg = preset(config) if isinstance(config, str) else config
    name = config if isinstance(config, str) else f"hidden {cfg.hidden_size} x depth {cfg.depth}"
    if optimizer not in _OPT_BYTES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    if precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; choose one of no, bf16, fp16")
    width = height if width is None else width
    f = 1 if cfg.in_channels == 3 else VAE_FACTOR  # 3 channels: a pixel-space model
    lh, lw = latent_size if latent_size is not None else (height // f, width // f)
    p = cfg.patch_size
    tokens = 1 + text_tokens + (lh // p) * (lw // p)
    n, trainable, largest, cast = _count(cfg, lora)
    bdt = _dtype(base_dtype)
    base_bytes = torch.empty(0, dtype=bdt).element_size()
    lora_params = trainable if lora is not None else 0
    weights = (n - lora_params) * base_bytes + lora_params * 4
    grads = trainable * 4
    opt = int(trainable * _OPT_BYTES[optimizer])
    ema_b = trainable * 4 if ema else 0

    amp = precision != "no"
    mode = "full" if lora is None else _lora_mode(lora.targets)
    a, b, c = _ACT[(mode, amp)]
    d, m, BN = cfg.hidden_size, cfg.mlp_hidden, batch_size * tokens
    block = BN * (a * d + b * m)
    # Autocast keeps a half copy of each fp32 Linear weight a matmul needs in backward; weights
    # already stored in half precision are used as they are (and counted in `weights`).
    cast_bytes = 2 * cast if amp and base_bytes == 4 else 0
    work = BN * 4 * (2 * d + 2 * m)  # backward's gradient working set inside one block
    if gradient_checkpointing:
        fixed = BN * d * _ACT_CKPT_FIXED["full" if lora is None else "lora"]
        one = block + cast_bytes / cfg.depth + work  # the block being recomputed and back-propagated
        act = BN * d * 4 * cfg.depth + fixed + one
        # The first block's backward runs with the other blocks' gradients already there. Autocast
        # caches its half copies of trainable weights until the forward ends, checkpointed or not.
        backward = max(act, grads + fixed + one, act + (cast_bytes if lora is None else 0))
    else:
        act = backward = cfg.depth * block + BN * c * d + cast_bytes + work
    if optimizer == "adamw8bit":
        step = 0
    elif device == "cuda" and optimizer != "prodigy":  # Prodigy steps one tensor at a time
        step = trainable * 4
    else:
        step = largest * 4
    act = int(act)
    live = max(backward + (grads if grad_accum > 1 else 0), grads + step)
    total = weights + opt + ema_b + live
    settings = dict(model=name, lora_rank=0 if lora is None else lora.rank,
                    lora_targets=None if lora is None else lora.targets, optimizer=optimizer,
                    precision={"no": "fp32"}.get(precision, precision),
                    base_dtype=str(bdt).replace("torch.", ""), batch_size=batch_size, height=lh * f,
                    width=lw * f, text_tokens=text_tokens, gradient_checkpointing=gradient_checkpointing,
                    grad_accum=grad_accum, device=device)
    return MemoryPlan(int(weights), int(grads), opt, ema_b, act, int(step), int(total), n, trainable, tokens, settings)


def plan_for_training(config: OboroConfig, train_config, lora=None, cache=None, device: str = "cuda",
                      latent_size: Optional[tuple[int, int]] = None, text_tokens: Optional[int] = None,
                      base_dtype=None, name: Optional[str] = None) -> MemoryPlan:
    """plan_memory for a TrainConfig (trainer.py) on a latent cache folder: its largest latent and
    longest text, unless `latent_size` / `text_tokens` say otherwise (no cache: 512² pixels, 256
    text tokens)."""
    tc = train_config
    found, found_text = cache_shape(cache) if cache is not None else (None, None)
    if latent_size is None:
        latent_size = found or ((512, 512) if config.in_channels == 3 else (512 // VAE_FACTOR,) * 2)
    text = text_tokens or found_text or 256
    plan = plan_memory(config, lora, tc.optimizer, tc.precision, base_dtype, tc.batch_size, text_tokens=text,
                       gradient_checkpointing=tc.gradient_checkpointing, grad_accum=tc.grad_accum,
                       ema=bool(tc.ema_decay), device=device, latent_size=tuple(latent_size))
    if name:
        plan = dataclasses.replace(plan, settings={**plan.settings, "model": name})
    return plan


def log_plan(log, what: str, config: OboroConfig, train_config, lora=None, cache=None, device: str = "cuda",
             base_dtype=None) -> None:
    """Log a run's plan as one line at its start; a planner failure only warns (it never stops a run)."""
    try:
        plan = plan_for_training(config, train_config, lora, cache, device, base_dtype=base_dtype)
        log.info("%s: %s", what, plan.line())
    except Exception as e:  # noqa: BLE001  (the plan is advice; training goes on without it)
        log.warning("%s: no memory plan (%s: %s)", what, type(e).__name__, e)


def cache_shape(folder) -> tuple[Optional[tuple[int, int]], Optional[int]]:
    """(largest latent (h, w), longest text) a latent cache's manifest lists; (None, None) if absent."""
    from ..data.cache import read_manifest
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError):
        return None, None
    items = (manifest or {}).get("items") or []
    if not items:
        return None, None
    h, w = max((tuple(int(v) for v in it["latent_shape"][-2:]) for it in items), key=lambda s: s[0] * s[1])
    return (h, w), max(int(it.get("text_len") or 0) for it in items) or None
