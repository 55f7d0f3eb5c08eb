"""The embedded backend of oboro-run: ComfyUI in this process (runner/embedded.py), its validator
on top of convert.check, and PromptExecutor for the jobs, one executor so unchanged nodes (model
loaders) stay cached from job to job."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

from .convert import WorkflowError
from .output import output_items

REPO = Path(__file__).resolve().parents[1]
LEGACY_FOLDERS = {"unet": "diffusion_models", "clip": "text_encoders"}


class LocalFolders:
    """The model folders of the ComfyUI in this process (folder_paths)."""

    def folders(self):
        import folder_paths
        return list(folder_paths.folder_names_and_paths)

    def __call__(self, folder):
        import folder_paths
        return folder_paths.get_filename_list(folder)

    def where(self, folder):
        import folder_paths
        paths = folder_paths.get_folder_paths(folder)
        named = [p for p in paths if Path(p).name == folder] or paths
        return f" ({named[0]})" if named else ""


class Embedded:
    """ComfyUI in this process (runner/embedded.py)."""
    remote = False

    def __init__(self, opts):
        root = Path(opts.comfyui or os.environ.get("COMFYUI_PATH") or REPO / ".comfyui").resolve()
        if not (root / "comfy").is_dir():
            raise WorkflowError(f"ComfyUI not found at {root}; pass --comfyui PATH or set COMFYUI_PATH")
        os.environ["COMFYUI_PATH"] = str(root)
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from comfy.cli_args import args  # before comfy.model_management reads it
        import torch
        cpu = opts.cpu or args.cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available())
        from . import embedded
        import folder_paths
        model_dirs = {}
        for d in opts.models:
            if not Path(d).is_dir():
                raise WorkflowError(f"--models {d}: not a directory")
            for sub in sorted(Path(d).iterdir()):
                kind = LEGACY_FOLDERS.get(sub.name, sub.name)
                if sub.is_dir() and kind in folder_paths.folder_names_and_paths:
                    model_dirs.setdefault(kind, []).append(str(sub.resolve()))
        print(f"oboro-run: loading ComfyUI from {root} ({'CPU' if cpu else 'GPU'})", file=sys.stderr)
        embedded.start(cpu=cpu, model_dirs=model_dirs)
        self.embedded, self.folders, self.verbose = embedded, LocalFolders(), opts.verbose

    def node_defs(self, kinds):
        from .convert import local_node_defs
        return local_node_defs(None if kinds is None else sorted(k for k in kinds if isinstance(k, str)))

    def problems(self, prompt, found: dict, need: set) -> list[str]:
        """Ours first, then ComfyUI's own validate_inputs on every node an output needs (not just
        up to the first error), minus the nodes and inputs we already reported."""
        import asyncio
        import execution
        dropped = {nid for nid, inp in found if inp is None}
        skip = set(found) | {(nid, k) for nid, n in prompt.items() for k, v in (n.get("inputs") or {}).items()
                             if isinstance(v, list) and v and v[0] in dropped}
        pruned = {nid: dict(n, inputs={k: v for k, v in (n.get("inputs") or {}).items() if (nid, k) not in skip})
                  for nid, n in prompt.items() if nid not in dropped}
        msgs = list(found.values())

        async def validate_each():
            validated = {}
            for nid in sorted(need & set(pruned), key=lambda x: (len(x), x)):
                try:
                    await execution.validate_inputs("oboro-run", pruned, nid, validated)
                except Exception as e:  # noqa: BLE001  (a malformed graph can raise in there)
                    validated[nid] = (False, [{"message": "Exception when validating node", "details": str(e)}], nid)
            return validated
        logging.disable(logging.CRITICAL)  # ComfyUI logs every validation error itself
        try:
            results = asyncio.run(validate_each())
            for nid in sorted(results, key=lambda x: (len(x), x)):
                for err in results[nid][1]:
                    name = (err.get("extra_info") or {}).get("input_name")
                    if (nid, name) not in skip:
                        msgs.append(f"node {nid} ({prompt[nid].get('class_type')})" + (f" input {name}" if name else "")
                                    + f": {err.get('message')}: {err.get('details')}")
            if not msgs:  # graph-level checks (outputs present...)
                try:
                    self.embedded.validate(pruned)
                except self.embedded.GraphError as e:
                    msgs.append(str(e).splitlines()[0])
        finally:
            logging.disable(logging.NOTSET)
        return msgs

    def session(self, tmp: Path, on_event=None, on_step=None) -> "Session":
        return Session(self.embedded, tmp, on_event, on_step, self.verbose)

    def run(self, jobs, out, progress) -> int:
        session = self.session(out.tmp, on_event=progress.event, on_step=progress.step)
        failed = 0
        for job in jobs:
            progress.begin(job, job.prompt)
            t0 = time.monotonic()
            try:
                files = session.execute(job.prompt, job.ui)
                progress.finished(job, out.commit(job, files, time.monotonic() - t0))
            except self.embedded.GraphError as e:
                failed += 1
                out.commit(job, [], time.monotonic() - t0, error=str(e))
                progress.failed(job, str(e))
            finally:
                session.clear()  # whatever a failed job left half-written
        return failed


class Session:
    """One PromptExecutor for a whole batch, so nodes whose inputs did not change (the model
    loaders) stay cached from job to job; ComfyUI writes into `tmp`. Shared by the embedded
    backend and each Ray actor (ray_backend.py), so both run a job the same way."""

    def __init__(self, embedded, tmp: Path, on_event=None, on_step=None, verbose=False):
        import comfy.model_management
        import comfy.utils
        import execution
        import folder_paths
        self.embedded, self.comfy_out = embedded, Path(tmp) / "comfy-output"
        folder_paths.set_output_directory(str(self.comfy_out))
        folder_paths.set_temp_directory(str(Path(tmp) / "comfy-temp"))
        self.server = embedded.HeadlessServer(on_event=on_event)
        comfy.utils.PROGRESS_BAR_ENABLED = verbose  # our own step lines instead of tqdm bars
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})

        def hook(value, total, preview, prompt_id=None, node_id=None):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if on_step:
                on_step(value, total)
        comfy.utils.set_progress_bar_global_hook(hook)

    def execute(self, prompt: dict, ui: dict | None = None) -> list[tuple[Path, str, str]]:
        """Run one job; its saved files as (path, subfolder, ComfyUI's filename). GraphError when
        the job itself fails (validation or a node raising)."""
        result = self.embedded.run(prompt, self.server, self.executor, client_id="oboro-run", workflow=ui)
        return [(self.comfy_out / it["subfolder"] / it["filename"], it["subfolder"], it["filename"])
                for it in output_items(result.get("outputs", {}))]

    def clear(self) -> None:
        shutil.rmtree(self.comfy_out, ignore_errors=True)
