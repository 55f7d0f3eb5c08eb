"""Make this repo importable as the package `oboro` and find ComfyUI, without ever putting the
repo root on sys.path (ComfyUI owns the top-level name `nodes`; ours is `oboro.nodes`).

Used by tests/conftest.py, bench/ and the scripts/ entry points.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "oboro"


def comfy_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or REPO / ".comfyui").resolve()


def import_oboro():
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


def add_comfy_to_path() -> Path:
    root = comfy_path()
    if not (root / "comfy").is_dir():
        sys.exit(f"ComfyUI not found at {root}; run `bash scripts/bootstrap.sh` or set COMFYUI_PATH")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root
