"""Where a graph may make our nodes write and read: ComfyUI's own folders, plus explicit allow-lists.

A ComfyUI server is often shared, and anything a submitted graph can do, every user of that
server can do. So a path a node takes from a graph for WRITING (a cache, a training-state folder,
a model, a LoRA, an adapter) is confined the way core SaveImage confines its prefix:
  - a plain name (or sub/path) lands under the node's own folder (output/oboro_cache,
    output/oboro_training, models/<kind>), never above it;
  - an absolute path is accepted only inside one of the folders ComfyUI already serves for that
    kind (the output folder, or models/<kind> including those added by extra_model_paths.yaml) or
    one listed in the environment variable OBORO_ALLOWED_ROOTS (os.pathsep-separated, set by
    whoever starts the server). Symlinks are resolved before the check.
Reading is confined too (confine_read), or any user of a shared server could make it read, and
train a model on, any folder its account can see, and probe which paths exist. Every path a graph
names for READING (a dataset, mask_dir, an exclusion list, a cache, a state to resume from) follows
ONE rule: a plain name (or sub/path) is looked up in the caller's base folder (by default ComfyUI's
input folder, honouring --input-directory); either way the resolved path (symlinks followed) must
lie inside ComfyUI's input, output or models folders (extra_model_paths.yaml included), or a root
listed in OBORO_READ_ROOTS or OBORO_ALLOWED_ROOTS (what may be written may be read). Only the node
layer confines; the core (oboro_model) and the CLI take any path their user gives them.
A NUL byte in any path input is refused with the input named (Python's own error names nothing).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

import folder_paths

from ..oboro_model.naming import free_target  # noqa: F401  (the nodes' next-free names)

ALLOWED_ENV = "OBORO_ALLOWED_ROOTS"
READ_ENV = "OBORO_READ_ROOTS"


def no_nul(value, what: str) -> str:
    """`value` unchanged, or a ValueError naming the input when it holds a NUL byte (which no path
    can contain; os calls would fail later with a bare 'embedded null byte')."""
    if isinstance(value, str) and "\x00" in value:
        raise ValueError(f"{what} {value!r} contains a NUL byte (\\x00), which no file name can hold; "
                         "retype the value")
    return value


def _env_roots(name: str) -> list[str]:
    return [r for r in os.environ.get(name, "").split(os.pathsep) if r.strip()]


def allowed_roots(kind: Optional[str] = None) -> list[Path]:
    """The folders absolute write paths may lie in: ComfyUI's output folder (kind None) or every
    registered folder of model kind `kind`, plus OBORO_ALLOWED_ROOTS."""
    roots = [folder_paths.get_output_directory()] if kind is None else list(folder_paths.get_folder_paths(kind))
    roots += _env_roots(ALLOWED_ENV)
    return [Path(r).resolve() for r in roots]


def read_roots() -> list[Path]:
    """The folders a graph may make our nodes read: ComfyUI's input, output and models folders
    (every registered model folder, extra_model_paths.yaml included; not custom_nodes, which holds
    code and perhaps its secrets), plus OBORO_ALLOWED_ROOTS and OBORO_READ_ROOTS."""
    roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory(), folder_paths.models_dir]
    roots += [p for kind, (paths, _) in folder_paths.folder_names_and_paths.items() if kind != "custom_nodes"
              for p in paths]
    roots += _env_roots(ALLOWED_ENV) + _env_roots(READ_ENV)
    out: list[Path] = []
    for r in roots:
        if (r := Path(r).resolve()) not in out:
            out.append(r)
    return out


def confine_read(value: str, what: str, base=None, expect: Optional[str] = None) -> Path:
    """The one rule for paths a graph names for reading. A plain name (or sub/path) is looked up in
    `base` (default: ComfyUI's input folder); an absolute path is itself. The resolved path must lie
    in read_roots(), else ValueError naming `what` and saying how the admin allows a folder; this
    check comes before any existence check, so a refusal tells nothing about the path. `expect`
    "dir" / "file" then requires a folder / file (FileNotFoundError naming `what`)."""
    no_nul(value, what)
    name = (value or "").strip()
    if not name:
        raise ValueError(f"{what} is empty")
    base = Path(base if base is not None else folder_paths.get_input_directory())
    path = Path(name) if os.path.isabs(name) else base / name
    path, roots = path.resolve(), read_roots()
    if not _within(path, roots):
        raise ValueError(f"{what} {value!r} ({path}) is outside the folders this server may read: "
                         f"{', '.join(str(r) for r in roots)}. A plain name is looked up in {base}. The admin "
                         f"can allow more folders with the environment variable {READ_ENV} ({os.pathsep}-"
                         f"separated, set when starting ComfyUI; {ALLOWED_ENV} allows reading and writing)")
    kinds = {"dir": (Path.is_dir, "a folder"), "file": (Path.is_file, "a file")}
    if expect is not None and not kinds[expect][0](path):
        hint = ""
        parts = Path(name).parts  # e.g. 'input/x' from when plain names meant the working folder
        if not os.path.isabs(name) and len(parts) > 1 and parts[0] == base.name and base.joinpath(*parts[1:]).exists():
            hint = f"; plain names are relative to {base}: drop the leading '{parts[0]}/'"
        raise FileNotFoundError(f"{what} {value!r}: not {kinds[expect][1]} ({path}){hint}")
    return path


def _within(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def confine(root, name: str, what: str, kind: Optional[str] = None, absolute_ok: bool = True) -> Path:
    """`name` under `root` (a plain name or sub/path; '..' may not climb out), or, when absolute and
    `absolute_ok`, inside allowed_roots(kind). `what` names the input in the error message."""
    no_nul(name, what)
    if not (name or "").strip():
        raise ValueError(f"{what} is empty")
    root = Path(root).resolve()
    if os.path.isabs(name):
        path, roots = Path(name).resolve(), allowed_roots(kind)
        if absolute_ok and _within(path, roots) and path not in roots:
            return path
        raise ValueError(f"{what} {name!r}: absolute paths must lie inside "
                         f"{', '.join(str(r) for r in roots)} (this server's folders; the admin can add more "
                         f"with the environment variable {ALLOWED_ENV}); or use a plain name, which goes to {root}"
                         if absolute_ok else f"{what} {name!r} must be a plain name (or sub/path) inside {root}")
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ValueError(f"{what} {name!r} leaves {root}; use a plain name (or sub/path) inside it")
    return path


def model_file_error(node: str, what: str, kind: str, name) -> Optional[str]:
    """Why `name` is not a file ComfyUI lists in models/<kind> (extra_model_paths.yaml included), or
    None. Loaders call it from validate_inputs, so a graph missing several model files is refused
    when queued with every missing file named at once (ComfyUI collects each node's error), not one
    per run."""
    if isinstance(name, str) and name in folder_paths.get_filename_list(kind):
        return None
    folders = folder_paths.get_folder_paths(kind) if kind in folder_paths.folder_names_and_paths else []
    where = f"put it in {folders[0]}" if folders else f"no folder is configured for {kind}"
    also = f" (or another folder of {kind}: {', '.join(folders[1:])})" if len(folders) > 1 else ""
    return (f"{node}: {what} {str(name)[:200]!r} is not in models/{kind}: {where}{also}, then refresh the "
            "model lists (R in the browser) or restart; extra_model_paths.yaml can add folders")
