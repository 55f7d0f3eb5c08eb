"""A real ComfyUI 0.3.75 server (main.py) on 127.0.0.1 for tests, with everything it writes in a
temp folder and the given model root as its model folders."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import oboro_env  # scripts/ is put on sys.path by conftest.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Server:
    def __init__(self, root: Path, models: Path, extra_paths: str | None = None):
        """extra_paths: the extra_model_paths.yaml text to use instead of one rooted at `models`."""
        self.root, self.models, self.port = root, models, free_port()
        self.extra_paths = extra_paths
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = root / "output"
        self.log_path = root / "server.log"
        self.proc = None

    def start(self, timeout: float = 180):
        for d in ("output", "input", "temp", "user/default"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        paths = self.root / "extra_model_paths.yaml"
        paths.write_text(self.extra_paths or (
            f"oboro_browser_test:\n  base_path: {self.models}\n  is_default: true\n"
            "  diffusion_models: diffusion_models\n  text_encoders: text_encoders\n  vae: vae\n"
            "  loras: loras\n  aesthetic: aesthetic\n  florence2: florence2\n"))
        # A fresh user: skip the first-run template pop-up (the test opens the browser itself) and
        # keep the missing-node/model warnings on whatever the defaults become.
        (self.root / "user/default/comfy.settings.json").write_text(json.dumps({
            "Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingNodesWarning": True,
            "Comfy.Workflow.ShowMissingModelsWarning": True}))
        cpu = [] if os.environ.get("OBORO_TEST_GPU") == "1" else ["--cpu"]
        cmd = [sys.executable, "main.py", *cpu, "--listen", "127.0.0.1", "--port", str(self.port),
               "--extra-model-paths-config", str(paths), "--output-directory", str(self.output),
               "--input-directory", str(self.root / "input"), "--temp-directory", str(self.root / "temp"),
               "--user-directory", str(self.root / "user"), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", "--disable-api-nodes"]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=oboro_env.comfy_path(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ComfyUI did not answer on {self.url} within {timeout}s\n{self.log()}")
            time.sleep(0.5)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
            except ProcessLookupError:
                pass
        if self.proc:
            self._log.close()

    def log(self, tail: int = 20000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"----- ComfyUI server log ({self.log_path}) -----\n{text[-tail:]}"
