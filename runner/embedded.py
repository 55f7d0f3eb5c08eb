"""ComfyUI's own validator and PromptExecutor, in this process, with core and custom nodes.

No web server: `HeadlessServer` is the sink the executor reports to (what the browser would get
over the websocket), so failures, progress and outputs can be read back by callers and tests.
ComfyUI must already be importable (see scripts/oboro_env.py).
"""
from __future__ import annotations

import asyncio
import importlib
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

_started = False


@dataclass
class HeadlessServer:
    """The attributes PromptExecutor and its progress handler use on `server`."""
    on_event: Optional[Callable[[str, dict], None]] = None
    client_id: Optional[str] = None
    last_node_id: Optional[str] = None
    last_prompt_id: Optional[str] = None
    sockets_metadata: dict = field(default_factory=dict)
    events: list = field(default_factory=list)

    def send_sync(self, event, data, sid=None):
        if isinstance(event, str):  # binary preview frames are not kept
            self.events.append((event, data))
            if self.on_event:
                self.on_event(event, data)

    def queue_updated(self):
        pass


class GraphError(RuntimeError):
    """Validation or execution failed; `details` holds ComfyUI's own error structures."""

    def __init__(self, message: str, details=None):
        super().__init__(message)
        self.details = details


def start(cpu: bool = True, output_dir: Optional[str] = None, model_dirs: Optional[dict] = None,
          custom_nodes: bool = True) -> None:
    """Import ComfyUI and load its nodes once per process. `model_dirs` maps a folder kind
    (e.g. "diffusion_models") to extra directories searched first."""
    global _started
    from comfy.cli_args import args
    if not _started:
        args.cpu = cpu
        args.disable_api_nodes = True
    import folder_paths
    if output_dir:
        folder_paths.set_output_directory(output_dir)
    for kind, paths in (model_dirs or {}).items():
        for p in [paths] if isinstance(paths, str) else paths:
            folder_paths.add_model_folder_path(kind, str(p), is_default=True)
    if _started:
        return
    try:  # ComfyUI's `utils` package must be imported before its nodes.py puts comfy/ (which has a
        import utils.install_util  # noqa: F401   utils.py) first on sys.path; comfy_extras need it.
    except ImportError:
        pass
    comfy_nodes = importlib.import_module("nodes")  # ComfyUI's top-level module, not ours
    asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=custom_nodes, init_api_nodes=False))
    _install_progress_hook()
    _started = True


def _install_progress_hook():
    """Like ComfyUI's main.hijack_progress: lets interrupt stop sampling loops headless too."""
    import comfy.model_management
    import comfy.utils

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
    comfy.utils.set_progress_bar_global_hook(hook)


def node_class_mappings() -> dict:
    return importlib.import_module("nodes").NODE_CLASS_MAPPINGS


def validate(prompt: dict) -> list[str]:
    """ComfyUI's validator; returns the ids of the output nodes to execute."""
    import execution
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    if not ok:
        lines = [f"{error.get('message', error)} {error.get('details', '')}".strip()]
        for node_id, info in (node_errors or {}).items():
            for e in info.get("errors", []):
                lines.append(f"node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
        raise GraphError("\n".join(lines), {"error": error, "node_errors": node_errors})
    return outputs


def run(prompt: dict, server: Optional[HeadlessServer] = None, executor=None, client_id: str = "headless",
        workflow: Optional[dict] = None) -> dict:
    """Validate then execute; returns ComfyUI's history result {"outputs": {node_id: ui}}.
    With a client id ComfyUI reports per-node events to `server` (as it would to a browser).
    `workflow` (UI format) is what the browser sends as extra_pnginfo: SaveImage embeds it in the
    PNG next to the prompt, so the image can be dragged back into ComfyUI."""
    import execution
    outputs = validate(prompt)
    server = server or HeadlessServer()
    executor = executor or execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                                    cache_args={"lru": 0, "ram": 0})
    prompt_id = str(uuid.uuid4())
    server.last_prompt_id = prompt_id
    extra = {"client_id": client_id} if client_id else {}
    if workflow is not None:
        extra["extra_pnginfo"] = {"workflow": workflow}
    executor.execute(prompt, prompt_id, extra, outputs)
    if not executor.success:
        msgs = [d for ev, d in executor.status_messages if ev in ("execution_error", "execution_interrupted")]
        err = msgs[-1] if msgs else {}
        raise GraphError(f"{err.get('node_type', '?')} (node {err.get('node_id', '?')}): "
                         f"{err.get('exception_type', 'interrupted')}: {err.get('exception_message', '')}", err)
    return executor.history_result
