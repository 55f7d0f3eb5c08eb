"""ComfyUI adapters for oboro. Only ever imported relatively, from this extension's package."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .dataset_prep import OboroCaptionDataset, OboroDedupDataset, OboroScoreDataset
from .loader import OboroModelLoader
from .mask_control import OboroApplyMaskControl, OboroMaskAdapterLoader
from .mask_training import OboroTrainMaskAdapter
from .provenance import OboroNearCopyCheck, OboroSaveImage
from .sampling import EmptyOboroLatentImage, OboroFlowScheduler, OboroSampler, SamplerOboroICFM
from .step_cache import OboroTaylorCache
from .text_encoder import OboroT5Loader, OboroTextEncode
from .training import OboroFullTrainer, OboroLoRATrainer, OboroTrainingData, OboroTrainingOptions
from .training_legacy import OboroTrainFull, OboroTrainLoRA
from .training_data import OboroCacheLatents


class OboroExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [OboroModelLoader, OboroT5Loader, OboroTextEncode,
                OboroSampler, OboroFlowScheduler, SamplerOboroICFM, EmptyOboroLatentImage, OboroTaylorCache,
                OboroDedupDataset, OboroCaptionDataset, OboroScoreDataset,
                OboroCacheLatents, OboroLoRATrainer, OboroFullTrainer, OboroTrainingOptions, OboroTrainingData,
                OboroTrainLoRA, OboroTrainFull,
                OboroMaskAdapterLoader, OboroApplyMaskControl, OboroTrainMaskAdapter,
                OboroSaveImage, OboroNearCopyCheck]
