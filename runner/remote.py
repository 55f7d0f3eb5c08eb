"""`oboro-run --server URL ...`: run the jobs on running ComfyUI servers over their HTTP API.

Each server gets a worker that takes the next job as soon as it is free (round-robin while the
servers keep pace, and a slow GPU never holds the batch back): POST /prompt, poll
/history/{prompt_id} (and /queue, to say when it starts), then GET /view each saved file into
--out. Node definitions come from the first server's /object_info, model lists from its
/models/{folder}; every server is expected to have the same nodes and models. Local image files
given to LoadImage-style inputs are uploaded first (POST /upload/image).
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import queue
import sys
import threading
import time
import uuid
from pathlib import Path

import requests

from .convert import UPLOAD_FLAGS, WorkflowError, combo_options, input_specs, ui_with_values
from .output import output_items

POLL_S = 0.25


class JobFailed(RuntimeError):
    pass


def format_errors(body: dict) -> str:
    """ComfyUI's /prompt 400 answer ({error, node_errors}) as lines naming node and input."""
    error, lines = body.get("error") or {}, []
    for nid, info in (body.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            name = (e.get("extra_info") or {}).get("input_name")
            lines.append(f"node {nid} ({info.get('class_type')})" + (f" input {name}" if name else "")
                         + f": {e.get('message')}: {e.get('details')}")
    return "\n".join(lines) or f"{error.get('message', body)} {error.get('details', '')}".strip()


class Server:
    def __init__(self, url: str, timeout: float = 60):
        self.url = (url if "://" in url else "http://" + url).rstrip("/")
        self.client_id, self.timeout = str(uuid.uuid4()), timeout
        self.http = requests.Session()
        self.uploads: dict[str, str] = {}
        self.lock = threading.Lock()
        self.watchers: dict = {}  # prompt id -> on_step(value, total)

    def listen(self) -> None:
        """Step progress from the server's websocket (best effort; needs aiohttp, which ComfyUI has)."""
        try:
            import aiohttp
        except ImportError:
            return

        async def events():
            url = "ws" + self.url[len("http"):] + f"/ws?clientId={self.client_id}"
            try:
                async with aiohttp.ClientSession() as session, session.ws_connect(url, heartbeat=30) as ws:
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            event = json.loads(msg.data)
                            data = event.get("data") or {}
                            on_step = self.watchers.get(data.get("prompt_id"))
                            if event.get("type") == "progress" and on_step:
                                on_step(data.get("value"), data.get("max"))
            except Exception:  # noqa: BLE001  (no progress lines, the jobs still run)
                pass
        threading.Thread(target=lambda: asyncio.run(events()), daemon=True).start()

    def json(self, path: str):
        r = self.http.get(self.url + path, timeout=self.timeout)
        r.raise_for_status()
        return r.json()

    def submit(self, prompt: dict, workflow: dict | None = None) -> str:
        """Queue a prompt; `workflow` (UI format) goes where the browser puts it, extra_pnginfo, so
        the server's SaveImage embeds it in the PNG as it does for a job queued from the UI."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        r = self.http.post(self.url + "/prompt", json=body, timeout=self.timeout)
        if r.status_code == 400:
            try:
                raise JobFailed("rejected by the server:\n" + format_errors(r.json()))
            except ValueError:
                raise JobFailed(f"rejected by the server: {r.text[:500]}") from None
        r.raise_for_status()
        return r.json()["prompt_id"]

    def wait(self, prompt_id: str, say) -> dict:
        """The finished history entry; says once when the job starts running."""
        running = False
        while True:
            entry = self.json(f"/history/{prompt_id}").get(prompt_id)
            if entry and (entry.get("status") or {}).get("completed") is not None:
                return entry
            if not running:
                q = self.json("/queue")
                if any(item[1] == prompt_id for item in q.get("queue_running", [])):
                    running = True
                    say("running")
            time.sleep(POLL_S)

    def download(self, item: dict, dest: Path) -> None:
        params = {k: item.get(k, d) for k, d in (("filename", ""), ("subfolder", ""), ("type", "output"))}
        with self.http.get(self.url + "/view", params=params, stream=True, timeout=self.timeout) as r:
            r.raise_for_status()
            with open(dest, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)

    def upload(self, path: str) -> str:
        """A local image in the server's input folder; returns the name LoadImage takes."""
        with self.lock:
            if path not in self.uploads:
                with open(path, "rb") as f:
                    r = self.http.post(self.url + "/upload/image", files={"image": (Path(path).name, f)},
                                       data={"type": "input"}, timeout=self.timeout)
                r.raise_for_status()
                d = r.json()
                self.uploads[path] = f"{d['subfolder']}/{d['name']}" if d.get("subfolder") else d["name"]
            return self.uploads[path]

    def cancel(self, prompt_id: str) -> None:
        for path, body in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                self.http.post(self.url + path, json=body, timeout=5)
            except requests.RequestException:
                pass


class RemoteFolders:
    """A server's model folders, as convert.check wants them."""

    def __init__(self, server: Server):
        self.server, self.cache, self._folders = server, {}, None

    def folders(self):
        if self._folders is None:
            self._folders = self.server.json("/models")
        return self._folders

    def __call__(self, folder):
        if folder not in self.cache:
            try:
                self.cache[folder] = self.server.json(f"/models/{folder}")
            except requests.HTTPError:
                self.cache[folder] = []
        return self.cache[folder]

    def where(self, folder):
        return f" on {self.server.url}"


class Farm:
    remote = True

    def __init__(self, urls):
        self.servers = [Server(u) for u in urls]
        for s in self.servers:
            try:
                s.json("/system_stats")
            except (requests.RequestException, ValueError) as e:
                raise WorkflowError(f"--server {s.url}: no ComfyUI answering there ({e})") from None
            s.listen()
        self.folders = RemoteFolders(self.servers[0])
        self._defs = None
        self.inflight: dict[Server, str] = {}

    def node_defs(self, kinds=None):
        if self._defs is None:
            self._defs = self.servers[0].json("/object_info")
        return self._defs

    def local_images(self, prompt):
        """(node id, input, path) of upload inputs (LoadImage...) naming a local file instead."""
        for nid, node in prompt.items():
            specs = input_specs(self._defs.get(node.get("class_type"), {}))
            for name, val in (node.get("inputs") or {}).items():
                spec = specs.get(name)
                if spec and any(spec[1].get(f) for f in UPLOAD_FLAGS) and isinstance(val, str) \
                        and val not in (combo_options(spec) or []):
                    yield nid, name, val

    def problems(self, prompt, found: dict, need: set) -> list[str]:
        msgs = list(found.values())
        for nid, name, val in self.local_images(prompt):
            if nid in need and not os.path.isfile(val):
                msgs.append(f"node {nid} ({prompt[nid]['class_type']}) input {name}: {val} is neither in the "
                            f"server's input folder nor a local file to upload")
        return msgs

    def run(self, jobs, out, progress) -> int:
        todo = queue.Queue()
        for job in jobs:
            todo.put(job)
        failed, alive = [], set(self.servers)

        def worker(server):
            while True:
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    return
                result = self.run_one(server, job, out, progress, last=len(alive) == 1)
                if result == "down":  # the others take its jobs
                    alive.discard(server)
                    todo.put(job)
                    print(f"oboro-run: {server.url} stopped answering; leaving it out", file=sys.stderr)
                    return
                if result == "failed":
                    failed.append(job.index)

        threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in self.servers]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.2)
        except KeyboardInterrupt:
            while not todo.empty():
                todo.get_nowait()
            for server, prompt_id in list(self.inflight.items()):
                print(f"oboro-run: cancelling {prompt_id} on {server.url}", file=sys.stderr)
                server.cancel(prompt_id)
            raise
        return len(failed)

    def run_one(self, server: Server, job, out, progress, last=True) -> str:
        """"done", "failed", or "down" (the server can't be reached and others are left)."""
        progress.begin(job, job.prompt, where=f" on {server.url}")
        t0 = time.monotonic()
        try:
            prompt, ui = copy.deepcopy(job.prompt), job.ui
            for nid, name, path in list(self.local_images(prompt)):
                prompt[nid]["inputs"][name] = server.upload(path)
            if ui is not None and prompt != job.prompt:  # the embedded workflow names the uploaded file
                ui = ui_with_values(ui, prompt, self._defs)
            prompt_id = server.submit(prompt, ui)
            self.inflight[server] = prompt_id
            server.watchers[prompt_id] = lambda value, total: progress.step(value, total, job)
            entry = server.wait(prompt_id, lambda msg: progress.say(job, msg))
            status = entry.get("status") or {}
            if status.get("status_str") == "error" or not status.get("completed", True):
                errs = [d for ev, d in status.get("messages", []) if ev in ("execution_error", "execution_interrupted")]
                e = errs[-1] if errs else {}
                raise JobFailed(f"{e.get('node_type', '?')} (node {e.get('node_id', '?')}): "
                                f"{e.get('exception_type', 'interrupted')}: {e.get('exception_message', '')}")
            stage, files = out.staging(), []
            for item in output_items(entry.get("outputs")):
                dest = stage / f"{len(files)}.part"
                server.download(item, dest)
                files.append((dest, item["subfolder"], item["filename"]))
            saved = out.commit(job, files, time.monotonic() - t0, server=server.url)
            progress.finished(job, saved, where=f" on {server.url}")
            return "done"
        except (JobFailed, requests.RequestException, OSError, ValueError) as e:
            if isinstance(e, requests.ConnectionError) and not last:
                return "down"
            out.commit(job, [], time.monotonic() - t0, error=str(e), server=server.url)
            progress.failed(job, f"{server.url}: {e}")
            return "failed"
        finally:
            server.watchers.pop(self.inflight.pop(server, None), None)
