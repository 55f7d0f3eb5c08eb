"""The ONE table of training inputs: every input of the training nodes (the trainers, the options
nodes and the older all-in-one OboroTrainLoRA / OboroTrainFull), with where it lives on the node
face, its widget, its tooltip in a user's words, and the RunSpec field it sets. Defaults come from
the dataclasses (TrainConfig / LoraSpec instances below), never written twice. The formulas behind
the settings are on the help pages (docs/)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from comfy_api.latest import io

from ..oboro_model.training import TrainConfig
from ..oboro_model.training.adapters import ADAPTERS
from ..oboro_model.training.export import SAVE_DTYPES
from ..oboro_model.training.loss import T_SAMPLING
from ..oboro_model.training.optim import OPTIMIZERS, SCHEDULES
from ..oboro_model.training.run import LORA_TARGETS, LoraSpec
from ..oboro_model.training.tracking import TRACKERS

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # widget value -> TrainConfig.precision
# Node defaults. The trainers of today and their options/data nodes: FACE (steps and lr per kind, on
# the trainer); the older all-in-one nodes keep the defaults they shipped with: LEGACY.
FACE = TrainConfig(warmup=100, schedule="cosine", precision="bf16", checkpoint_every=250, keep_last=2)
FACE_STEPS_LR = {"lora": (1000, 2e-4), "full": (2000, 1e-4)}
LEGACY = {
    "lora": TrainConfig(steps=1000, lr=2e-4, warmup=100, schedule="cosine", precision="bf16", checkpoint_every=250,
                        keep_last=3),
    "full": TrainConfig(steps=2000, lr=1e-4, warmup=500, schedule="cosine", precision="bf16", checkpoint_every=500,
                        keep_last=2, gradient_checkpointing=True),
}
LORA_DEFAULTS = LoraSpec(alpha=16.0)
OTHER_DEFAULTS = {"output_name": {"lora": "oboro_lora", "full": "oboro_finetune"}, "cache_dir": "",
                  "resume_from": "latest", "overwrite": False, "save_dtype": "bf16", "preview_prompts": "",
                  "preview_every": 0, "preview_steps": 20, "preview_cfg": 5.0, "preview_seed": 0, "extra_caches": "",
                  "reg_cache": "", "reg_weight": 1.0, "validation_cache_dir": "", "log_with": "none"}
OPTIONS_TYPE = io.Custom("OBORO_TRAINING_OPTIONS")
DATA_TYPE = io.Custom("OBORO_TRAINING_DATA")
BIG = 10_000_000


@dataclass(frozen=True)
class Field:
    name: str
    widget: str                  # int | float | bool | combo | string | text
    tip: str
    face: str                    # trainer | options | data (where the trainers of today show it)
    lo: Optional[float] = None
    hi: Optional[float] = None
    step: Optional[float] = None
    options: tuple = ()
    only: Optional[str] = None   # lora | full: that trainer kind only
    target: str = "config"       # config (TrainConfig) | lora (LoraSpec) | node (read by the node itself)


F = Field
FIELDS = [
    F("cache_dir", "string", "The training images as a latent cache: connect oboro Cache Latents.", "trainer", target="node"),
    F("output_name", "string", "Name of the result file and of its training folder.", "trainer", target="node"),
    F("steps", "int", "How many training steps in all (a resumed run continues up to this).", "trainer", 1, BIG),
    F("batch_size", "int", "Images per step. More is smoother but needs more memory.", "options", 1, 4096),
    F("lr", "float", "Learning rate: how big each step is. Too high and the result breaks; too low and it "
      "learns nothing.", "trainer", 1e-8, 1.0, 1e-7),
    F("warmup", "int", "Steps over which the learning rate ramps up from zero.", "options", 0, 1_000_000),
    F("schedule", "combo", "How the learning rate falls after warm-up.", "options", options=tuple(SCHEDULES)),
    F("optimizer", "combo", "adamw is the safe choice; prodigy finds its own step size (set lr to 1).", "options",
      options=tuple(OPTIMIZERS)),
    F("grad_accum", "int", "Add up this many batches before each step: a bigger batch without more memory.",
      "options", 1, 4096),
    F("clip_grad_norm", "float", "Limit on how far one step may move the weights (0: no limit).", "options", 0.0,
      1000.0, 0.01),
    F("precision", "combo", "Number format while training: bf16 is fast and safe on current GPUs.", "options",
      options=tuple(PRECISION)),
    F("gradient_checkpointing", "bool", "Use less memory at about 30% more time.", "options"),
    F("caption_dropout", "float", "Share of images trained without their caption, so the model also learns the "
      "empty prompt that CFG compares against.", "options", 0.0, 1.0, 0.01),
    F("t_sampling", "combo", "Which noise levels training practises most: uniform, mid-way (logit_normal) or "
      "noisy (shifted).", "options", options=T_SAMPLING),
    F("spike_guard", "bool", "Skip a step whose loss suddenly jumps, and lower the learning rate.", "options"),
    F("seed", "int", "Fixes the order of images and the noise: the same seed gives the same result.", "trainer",
      0, 2**31 - 1),
    F("checkpoint_every", "int", "Save a state to resume from every N steps (0: only at the end).", "options", 0, BIG),
    F("keep_last", "int", "How many saved states to keep (0: all).", "options", 0, 10_000),
    F("rank", "int", "Size of the LoRA: bigger learns more detail and makes a bigger file.", "trainer", 1, 1024,
      only="lora", target="lora"),
    F("alpha", "float", "Strength scale of the LoRA (the change is scaled by alpha / rank).", "options", 0.01,
      4096.0, 0.01, only="lora", target="lora"),
    F("dropout", "float", "Randomly drop part of the LoRA while training, against over-fitting.", "options", 0.0,
      0.99, 0.01, only="lora", target="lora"),
    F("targets", "combo", "Which layers get the LoRA: attention, the MLP, or both.", "options",
      options=LORA_TARGETS, only="lora", target="lora"),
    F("save_dtype", "combo", "Number format of the saved model file.", "trainer", options=tuple(SAVE_DTYPES),
      only="full", target="node"),
    F("resume_from", "string", "latest: continue this output name's run if it is the same run (same data, model "
      "and settings), else start fresh beside it. Empty: always fresh. Or a saved state's path.", "trainer",
      target="node"),
    F("preview_prompts", "text", "Prompts to draw while training, one per line (needs clip).", "trainer",
      target="node"),
    F("preview_every", "int", "Draw the preview prompts every N steps (0: off).", "trainer", 0, BIG, target="node"),
    F("preview_steps", "int", "Sampling steps of each preview.", "options", 1, 1000, target="node"),
    F("preview_cfg", "float", "Prompt strength (CFG) of the previews.", "options", 0.0, 100.0, 0.1, target="node"),
    F("preview_seed", "int", "Noise seed of the previews (prompt i uses seed + i).", "options", 0, 2**31 - 1,
      target="node"),
    F("overwrite", "bool", "Replace an existing file of that name. Off: the result gets the next free name.",
      "options", target="node"),
    F("adapter", "combo", "Kind of adapter: lora, loha, lokr or dora. All load with core Load LoRA.", "trainer",
      options=tuple(ADAPTERS), only="lora", target="lora"),
    F("extra_caches", "text", "More caches to train on, one per line: 'path [weight [repeats]]'.", "data",
      target="node"),
    F("reg_cache", "string", "Regularisation cache: general images that keep the model from forgetting.", "data",
      target="node"),
    F("reg_weight", "float", "How much the regularisation images count.", "data", 0.0, 100.0, 0.01, target="node"),
    F("masked_loss", "bool", "Learn only inside the masks stored in the cache.", "data"),
    F("ema_decay", "float", "Keep a smoothed average of the weights and save that (e.g. 0.999; 0: off).", "options",
      0.0, 0.99999, 0.0001),
    F("ema_start", "int", "Start averaging after this step.", "options", 0, BIG),
    F("validation_split", "float", "Share of the images kept out of training to measure over-fitting.", "data",
      0.0, 0.9, 0.01),
    F("validation_cache_dir", "string", "A separate cache to measure over-fitting on (instead of a split).", "data",
      target="node"),
    F("validation_every", "int", "Measure every N steps (0: only at the end); the best is saved as _best.", "data",
      0, BIG),
    F("validation_timesteps", "int", "Noise levels each held-out image is scored at.", "data", 1, 1000),
    F("validation_seed", "int", "Which images are held out, and their noise.", "data", 0, 2**31 - 1),
    F("log_with", "combo", "Also log to TensorBoard or Weights & Biases.", "options", options=tuple(TRACKERS),
      target="node"),
    F("t_mean", "float", "logit_normal: below 0 practises noisier images.", "options", -10.0, 10.0, 0.01),
    F("t_std", "float", "logit_normal: how spread the noise levels are.", "options", 0.01, 10.0, 0.01),
    F("t_shift", "float", "shifted: above 1 practises noisier images.", "options", 0.01, 100.0, 0.01),
]
BY_NAME = {f.name: f for f in FIELDS}


def default(f: Field, kind: str, legacy: bool = False):
    if f.target == "lora":
        return getattr(LORA_DEFAULTS, f.name)
    if f.target == "config":
        v = getattr(LEGACY[kind] if legacy else FACE, f.name)
        if not legacy and f.name in ("steps", "lr"):
            v = FACE_STEPS_LR[kind][f.name == "lr"]
        if f.name == "precision":
            return next(k for k, p in PRECISION.items() if p == v)
        return 0.0 if v is None else v
    v = OTHER_DEFAULTS[f.name]
    if f.name == "resume_from" and legacy:
        return ""  # the older nodes started fresh by default
    return v[kind] if isinstance(v, dict) else v


def widget(f: Field, kind: str, optional: bool, legacy: bool = False):
    d, tip = default(f, kind, legacy), f.tip
    if f.widget == "int":
        return io.Int.Input(f.name, default=d, min=int(f.lo), max=int(f.hi), optional=optional, tooltip=tip,
                            **({"control_after_generate": False} if "seed" in f.name else {}))
    if f.widget == "float":
        return io.Float.Input(f.name, default=d, min=f.lo, max=f.hi, step=f.step, optional=optional, tooltip=tip,
                              **({"round": 0.00001} if f.name == "ema_decay" else {}))
    if f.widget == "bool":
        return io.Boolean.Input(f.name, default=d, optional=optional, tooltip=tip)
    if f.widget == "combo":
        return io.Combo.Input(f.name, options=list(f.options), default=d, optional=optional, tooltip=tip)
    return io.String.Input(f.name, default=d, multiline=f.widget == "text", optional=optional, tooltip=tip)


def fields_for(kind: str, face: str) -> list[Field]:
    return [f for f in FIELDS if f.face == face and f.only in (None, kind)]


def values(kind: str, given: dict, legacy: bool = False) -> dict:
    """Every field's value for a run of `kind`: what the node got, else its default."""
    return {f.name: given.get(f.name, default(f, kind, legacy)) for f in FIELDS if f.only in (None, kind)}
