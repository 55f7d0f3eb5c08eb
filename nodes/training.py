"""The training nodes: OboroLoRATrainer / OboroFullTrainer (the essentials) with the optional
OboroTrainingOptions / OboroTrainingData nodes plugged in, as core splits sampler, sigmas and
guider. They only turn their inputs (one table: training_inputs.py) into a RunSpec and a network
and call the engine's run() (oboro_model/training/run.py), which scripts/oboro-train calls too.

ComfyUI runs nodes under torch.inference_mode() and its MODEL's weights are inference tensors
behind ComfyUI's ops, so training runs on a plain MMHDiT holding the MODEL's weights (patches such
as LoRAs merged in; training_model.py). The trained LoRA comes back applied to the input MODEL as
core LoraLoaderModelOnly applies the saved file; a full fine-tune loads back with load_oboro_model.
"""
from __future__ import annotations

import gc
import json
import logging
import math

import comfy.model_management as mm
import comfy.sd
import comfy.utils
from comfy_api.latest import io

from . import training_inputs as table
from .comfy_model import load_oboro_model
from .training_run import interrupted_text, run_node

log = logging.getLogger("oboro")


def check_values(values: dict) -> None:
    """Every number finite and inside its range; the message names input, value and range."""
    for name, v in values.items():
        f = table.BY_NAME.get(name)
        if f is None or f.widget not in ("int", "float") or isinstance(v, (list, tuple)):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name}: expected a number, got {v!r}")
        if (isinstance(v, float) and not math.isfinite(v)) or v < f.lo or v > f.hi:  # (huge ints compare exactly)
            raise ValueError(f"{name} is {v!r}; give a finite number from {f.lo:g} to {f.hi:g}")
        if f.widget == "int" and int(v) != v:
            raise ValueError(f"{name} is {v!r}; give a whole number")


def validate(values: dict):
    try:
        check_values(values)
    except ValueError as e:
        return str(e)
    return True


def execute_training(kind: str, node: str, model, inputs: dict) -> io.NodeOutput:
    check_values(inputs)
    result, out = run_node(kind, node, model, inputs)
    summary = result.summary
    if kind == "lora":
        lora_sd = comfy.utils.load_torch_file(summary["path"], safe_load=True)
        out_model = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)[0]
    else:
        out_model = load_oboro_model(summary["path"])
    gc.collect()
    mm.soft_empty_cache()
    text = json.dumps(summary, indent=1, default=str)
    return io.NodeOutput(out_model, summary["path"], out["loss_curve"], out["previews"], ui={"text": (text,)})


def outputs() -> list:
    return [io.Model.Output(tooltip="The input model with the result applied."),
            io.String.Output("path", display_name="path", tooltip="Where the result was saved."),
            io.Image.Output("loss_curve", display_name="loss_curve", tooltip="The loss over the steps."),
            io.Image.Output("previews", display_name="previews",
                            tooltip="One row per preview step, the prompts side by side.")]


def trainer_schema(kind: str) -> io.Schema:
    lora = kind == "lora"
    essentials = [table.widget(f, kind, optional=f.name in ("preview_prompts", "preview_every"))
                  for f in table.fields_for(kind, "trainer")]
    return io.Schema(
        node_id="OboroLoRATrainer" if lora else "OboroFullTrainer",
        display_name="oboro LoRA Trainer" if lora else "oboro Full Fine-tune Trainer",
        category="oboro/training",
        description=("Teaches an oboro model your images as a LoRA (or LoHa / LoKr / DoRA), saved in models/loras."
                     if lora else "Fine-tunes every weight of an oboro model on your images, saved in "
                     "models/diffusion_models.")
        + " Connect the cache from oboro Cache Latents. Cancel keeps the work: queue again to continue. "
        "More settings: plug in oboro Training Options / oboro Training Data.",
        inputs=[io.Model.Input("model", tooltip="The oboro model to train (from oboro Load Model)."),
                *essentials,
                io.Clip.Input("clip", optional=True, tooltip="The T5 text encoder, for the preview prompts."),
                io.Vae.Input("vae", optional=True, tooltip="The VAE, to show the previews as pictures."),
                table.OPTIONS_TYPE.Input("options", optional=True, tooltip="From oboro Training Options."),
                table.DATA_TYPE.Input("data", optional=True, tooltip="From oboro Training Data.")],
        outputs=outputs(), is_output_node=True)


def trainer_node(node_id: str, kind: str, schema, legacy: bool = False):
    """A trainer node class: `schema()` its face; execute merges the options/data nodes' values."""
    class Node(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return schema()

        @classmethod
        def validate_inputs(cls, **kwargs):
            return validate(kwargs)

        @classmethod
        def execute(cls, model, options=None, data=None, **kwargs) -> io.NodeOutput:
            values = {**(options or {}), **(data or {}), **kwargs, **({"_legacy": True} if legacy else {})}
            return execute_training(kind, node_id, model, values)

    Node.__name__ = Node.__qualname__ = node_id
    return Node


OboroLoRATrainer = trainer_node("OboroLoRATrainer", "lora", lambda: trainer_schema("lora"))
OboroFullTrainer = trainer_node("OboroFullTrainer", "full", lambda: trainer_schema("full"))


def _settings_node(node_id: str, name: str, face: str, out, description: str):
    fields = [f for f in table.FIELDS if f.face == face]

    class Node(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=node_id, display_name=name, category="oboro/training", description=description,
                             inputs=[table.widget(f, "lora", optional=False) for f in fields],
                             outputs=[out.Output()])

        @classmethod
        def validate_inputs(cls, **kwargs):
            return validate(kwargs)

        @classmethod
        def execute(cls, **kwargs) -> io.NodeOutput:
            check_values(kwargs)
            return io.NodeOutput(dict(kwargs))

    Node.__name__ = Node.__qualname__ = node_id
    return Node


OboroTrainingOptions = _settings_node(
    "OboroTrainingOptions", "oboro Training Options", "options", table.OPTIONS_TYPE,
    "Studio settings for a trainer: batch, schedule, optimiser, precision, noise levels, EMA, saving, previews, "
    "logging. LoRA-only settings (alpha, dropout, targets) are ignored by the full fine-tune.")
OboroTrainingData = _settings_node(
    "OboroTrainingData", "oboro Training Data", "data", table.DATA_TYPE,
    "What a trainer learns from beyond its cache: more weighted caches, a regularisation cache, masked loss, and "
    "the validation set that measures over-fitting.")
NODES = [OboroLoRATrainer, OboroFullTrainer, OboroTrainingOptions, OboroTrainingData]
__all__ = ["NODES", "interrupted_text"]
