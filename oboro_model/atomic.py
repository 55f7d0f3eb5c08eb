"""Atomic file writes: a crash or interrupt leaves the previous file, never half a new one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from safetensors.torch import save_file


def atomic_write(path, write: Callable[[str], None], fsync: bool = True) -> Path:
    """Call write(temp_path) on a temp file beside `path` (same filesystem), fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_safetensors(path, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> Path:
    return atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata or {})))
