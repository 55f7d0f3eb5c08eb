"""The one export path of a training run, whichever front end ran it (the training nodes, the
mask-adapter node, scripts/oboro-train): the same files with the same metadata.

Files, in the export folder, each under the next free name unless `overwrite` (an existing model is
never replaced silently; see naming.free_target):
  <name>.safetensors       the exported weights: the EMA when EMA is on, ScheduleFree's averaged
                           sequence, else as trained (LoRA in ComfyUI's key format, a full
                           checkpoint, or a mask adapter)
  <name>_best.safetensors  with validation: the weights of the best validation loss
Metadata `oboro_training` (JSON): kind, step, the run identity's digests (data, base, settings),
items, and the main settings. `oboro_provenance` (JSON, docs/provenance.md): format, kind, base and
settings digests, each cache's role / dataset digest / items / licence counts, pack version. Nothing non-finite is ever written: the export refuses, naming the
tensor, and the run's last good training state stays for a resume with other settings.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..checkpoint import save_checkpoint
from ..naming import claim_free_target
from ..provenance import METADATA_KEY, export_metadata
from .swap import exported_weights
from .validation import best_weights

logger = logging.getLogger(__name__)
KINDS = ("lora", "full", "mask_adapter")
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ExportSpec:
    folder: str
    name: str
    kind: str = "lora"
    overwrite: bool = False
    save_dtype: Optional[str] = None  # full fine-tune: bf16 | fp16 | fp32 (None: as trained, fp32)
    extra_metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"export kind {self.kind!r}: choose one of {KINDS}")
        if self.save_dtype is not None and self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype {self.save_dtype!r}: choose one of {sorted(SAVE_DTYPES)}")


class _Cast:
    """What save_checkpoint needs of a model (config, state_dict), with the weights cast."""

    def __init__(self, net, dtype):
        self.config, self.net, self.dtype = net.config, net, dtype

    def state_dict(self):
        return {k: v.detach().to("cpu", self.dtype) for k, v in self.net.state_dict().items()}


def check_finite(trainer, what: str) -> None:
    for name, p in trainer.params:
        if not bool(torch.isfinite(p.detach()).all()):
            raise ValueError(f"{what}: the trained weights are not finite ({name} holds NaN/inf) after step "
                             f"{trainer.step}; nothing was written. Lower lr, check alpha / clip_grad_norm / "
                             f"t_mean, or resume from an earlier state in {trainer.config.output_dir}")


def metadata(trainer, spec: ExportSpec, identity: Mapping, items: int, datasets: Sequence[Mapping] = ()) -> dict:
    """The exported files' safetensors metadata. `datasets`: provenance.run_datasets of the run."""
    c = trainer.config
    info = {"kind": spec.kind, "step": trainer.step, "items": items, "lr": c.lr, "batch_size": c.batch_size,
            "grad_accum": c.grad_accum, "optimizer": c.optimizer, "seed": c.seed, "ema_decay": c.ema_decay,
            "data_digest": identity.get("data"), "base_digest": identity.get("base"),
            "settings_digest": identity.get("settings")}
    prov = export_metadata(spec.kind, identity.get("base"), datasets, identity.get("settings"))
    return {"oboro_training": json.dumps(info), METADATA_KEY: prov, **dict(spec.extra_metadata)}


def _write(path: Path, spec: ExportSpec, net, meta: dict) -> Path:
    try:
        return _write_as(path, spec, net, meta)
    except BaseException:
        if path.is_file() and path.stat().st_size == 0:
            path.unlink()  # the name claimed for this write
        raise


def _write_as(path: Path, spec: ExportSpec, net, meta: dict) -> Path:
    if spec.kind == "lora":
        from .adapters import save_adapter
        save_adapter(path, net, metadata=meta)
    elif spec.kind == "mask_adapter":
        from ..mask_control import save_mask_adapter
        save_mask_adapter(path, net, metadata=meta)
    else:
        model = net if spec.save_dtype is None else _Cast(net, SAVE_DTYPES[spec.save_dtype])
        save_checkpoint(path, model, metadata=meta)
    return path


def export(trainer, spec: ExportSpec, identity: Mapping, items: int, datasets: Sequence[Mapping] = ()) -> dict:
    """Main process: write the files above; returns {"path": main file, "best_path": ... or absent}.
    `datasets`: the run's caches as provenance.run_datasets gives them (role, digest, items, licences)."""
    folder, meta = Path(spec.folder), metadata(trainer, spec, identity, items, datasets)
    out = {}
    with exported_weights(trainer):
        check_finite(trainer, f"export of {spec.name}")
        out["path"] = str(_write(claim_free_target(folder / f"{spec.name}.safetensors", spec.overwrite), spec,
                                 trainer.model, meta))
    with best_weights(trainer) as best_step:
        if best_step is not None:
            check_finite(trainer, f"export of {spec.name}_best")
            best = claim_free_target(folder / f"{Path(spec.name).name}_best.safetensors", spec.overwrite)
            out["best_path"] = str(_write(best, spec, trainer.model, meta))
            v = trainer.validation
            logger.info("best validation loss %.5f at step %d", v.best_loss if math.isfinite(v.best_loss) else -1,
                        best_step)
    for p in out.values():
        logger.info("wrote %s", p)
    return out
