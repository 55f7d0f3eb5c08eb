"""OboroTrainLoRA / OboroTrainFull: the all-in-one training nodes of earlier versions (48 inputs),
kept so saved workflows still load and train to the same result. Deprecated (hidden from search):
new graphs use OboroLoRATrainer / OboroFullTrainer + the options nodes. Same table, same run().

Saved UI workflows map widget values by position, so LEGACY_ORDER is frozen as it shipped."""
from __future__ import annotations

from comfy_api.latest import io

from . import training_inputs as table
from .training import outputs, trainer_node

LEGACY_ORDER = [
    "cache_dir", "output_name", "steps", "batch_size", "lr", "warmup", "schedule", "optimizer", "grad_accum",
    "clip_grad_norm", "precision", "gradient_checkpointing", "caption_dropout", "t_sampling", "spike_guard", "seed",
    "checkpoint_every", "keep_last", "rank", "alpha", "dropout", "targets", "save_dtype", "resume_from", "clip", "vae",
    "preview_prompts", "preview_every", "preview_steps", "preview_cfg", "preview_seed", "overwrite", "adapter",
    "extra_caches", "reg_cache", "reg_weight", "masked_loss", "ema_decay", "ema_start", "validation_split",
    "validation_cache_dir", "validation_every", "validation_timesteps", "validation_seed", "log_with", "t_mean",
    "t_std", "t_shift"]
REQUIRED_UNTIL = "resume_from"  # inputs before it were required on the old face


def legacy_schema(kind: str) -> io.Schema:
    lora = kind == "lora"
    inputs, optional = [io.Model.Input("model", tooltip="The oboro model to train (from oboro Model Loader).")], False
    for name in LEGACY_ORDER:
        optional = optional or name == REQUIRED_UNTIL
        if name == "clip":
            inputs.append(io.Clip.Input("clip", optional=True, tooltip="T5, for previews."))
        elif name == "vae":
            inputs.append(io.Vae.Input("vae", optional=True, tooltip="Decodes previews."))
        elif table.BY_NAME[name].only in (None, kind):
            inputs.append(table.widget(table.BY_NAME[name], kind, optional, legacy=True))
    return io.Schema(
        node_id="OboroTrainLoRA" if lora else "OboroTrainFull",
        display_name="oboro Train LoRA" if lora else "oboro Train (full fine-tune)",  # as saved in workflows
        category="oboro/training", is_deprecated=True,
        description="The earlier all-in-one trainer, kept for saved workflows. Use oboro LoRA Trainer / oboro Full "
                    "Fine-tune Trainer with oboro Training Options / Data instead: same engine, same results.",
        inputs=inputs, outputs=outputs(), is_output_node=True)


OboroTrainLoRA = trainer_node("OboroTrainLoRA", "lora", lambda: legacy_schema("lora"), legacy=True)
OboroTrainFull = trainer_node("OboroTrainFull", "full", lambda: legacy_schema("full"), legacy=True)
NODES = [OboroTrainLoRA, OboroTrainFull]
