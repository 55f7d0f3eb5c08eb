"""Pure-PyTorch training engine for oboro (I-CFM): loss, optimisers and LR schedules, the
loss-spike guard, resumable training state and the Trainer loop. Imports no ComfyUI."""
from .loss import caption_dropout_mask, drop_captions, icfm_loss, sample_t
from .optim import EMA, LRSchedule, build_optimizer, build_scheduler, is_schedule_free
from .spike_guard import SpikeGuard
from .state import checkpoint_path, latest_checkpoint, list_checkpoints, prune_checkpoints, read_state, write_state
from .batching import collate
from .trainer import StopTraining, Trainer, TrainConfig

__all__ = ["caption_dropout_mask", "drop_captions", "icfm_loss", "sample_t", "EMA", "LRSchedule", "build_optimizer",
           "build_scheduler", "is_schedule_free", "SpikeGuard", "checkpoint_path", "latest_checkpoint",
           "list_checkpoints", "prune_checkpoints", "read_state", "write_state", "StopTraining", "Trainer",
           "TrainConfig", "collate"]
