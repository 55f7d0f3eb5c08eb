"""OboroModelLoader: an oboro .safetensors from models/diffusion_models -> MODEL."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from .comfy_model import DIT_WEIGHT_DTYPES, load_oboro_model
from .finite import check_inputs, input_errors
from .paths import model_file_error


class OboroModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroModelLoader",
            display_name="oboro Model Loader",
            category="oboro",
            description="Loads an oboro MMH-DiT checkpoint (e.g. oboro-base-v1-1b.safetensors) from "
                        "models/diffusion_models as a MODEL usable by KSampler and other core nodes.",
            inputs=[
                io.Combo.Input("model_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="File in models/diffusion_models."),
                io.Combo.Input("weight_dtype", options=list(DIT_WEIGHT_DTYPES), default="default",
                               tooltip="Storage dtype of the weights. fp8 halves memory; compute runs in "
                                       "the device's inference dtype. fp8_e4m3fn_fast also uses fp8 "
                                       "matmuls where the GPU supports them (as core UNETLoader). "
                                       "ComfyUI scaled-fp8 files are detected from their keys."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, model_name="", weight_dtype="default"):
        """ComfyUI 0.3.x checks combo values only for V1 nodes: a name not in the list is refused here,
        when queued (with the other loaders' missing files in the same error)."""
        return (model_file_error("OboroModelLoader", "model_name", "diffusion_models", model_name)
                or input_errors(cls, weight_dtype=weight_dtype) or True)

    @classmethod
    def execute(cls, model_name, weight_dtype) -> io.NodeOutput:
        check_inputs(cls, model_name=model_name, weight_dtype=weight_dtype)
        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        return io.NodeOutput(load_oboro_model(path, weight_dtype))
