"""Pure-PyTorch core of oboro: the MMH-DiT, its config and checkpoints. Imports no ComfyUI."""
from .config import OboroConfig, PRESETS, head_schedule, parse_heads, preset
from .model import MMHDiT, sdpa_attention
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint

__all__ = ["OboroConfig", "PRESETS", "head_schedule", "parse_heads", "preset", "MMHDiT", "sdpa_attention",
           "CheckpointError", "load_checkpoint", "read_checkpoint", "save_checkpoint"]
