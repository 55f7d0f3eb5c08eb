"""`oboro-run --ray [ADDRESS]`: the batch on Ray actors, each an embedded ComfyUI that stays up.

Why actors: a ComfyUI process keeps loaded models in memory between prompts (its executor cache
keeps every node whose inputs did not change), so an actor per GPU (or per --cpus-per-worker CPUs)
that lives for the whole batch pays the start-up and the model loads once, and the scheduler sends
each job to an idle actor that already holds the job's model files when one does (Queue).

Exactly once, because the driver alone writes: actors return a finished job's files as bytes and
the driver moves them into --out and appends the runs.jsonl line (output.Output, the same as the
embedded backend), so --out's lock, --resume and the file names work as they do without Ray. A job
whose actor (or node) dies mid-job left nothing in --out; it goes back to the queue and runs on
another actor, at most --retries more times, then is recorded as failed with every reason. Ray
restarts the dead actor (max_restarts) and it rejoins when its ComfyUI is up; Ray itself never
re-runs a task (max_task_retries=0), so the ledger stays the only record of what ran. A job that
fails by itself (a bad graph, a node raising) is recorded at once and never retried.

Workers import this package as `oboro` the way scripts/oboro-run does (scripts/oboro_env.py, as
Ray's worker set-up hook), so every node needs the repo, ComfyUI and the models at the same paths
(a shared file system or one container image); --out need only exist where the driver runs.
"""
from __future__ import annotations

import collections
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from .convert import WorkflowError

REPO = Path(__file__).resolve().parents[1]
TMP_PREFIX = "oboro-ray-"
PING_S = 1.0     # how often to ask whether a restarting actor is back
REJOIN_S = 600   # then it is left out (e.g. its node is gone and no other has room)


def model_key(prompt: dict) -> tuple:
    """The model files a job loads: every `*_name` string input (model_name, lora_name, vae_name,
    ckpt_name...). After the job they stay loaded in its actor's executor cache."""
    return tuple(sorted({(n.get("class_type"), k, v) for n in prompt.values()
                         for k, v in (n.get("inputs") or {}).items() if k.endswith("_name") and isinstance(v, str)}))


class Queue:
    """Pending jobs grouped by model_key, in batch order within a group and across groups."""

    def __init__(self, jobs, key=lambda job: model_key(job.prompt)):
        self.key, self.groups = key, collections.OrderedDict()
        for job in jobs:
            self.groups.setdefault(key(job), collections.deque()).append(job)

    def __len__(self):
        return sum(len(g) for g in self.groups.values())

    def take(self, loaded, held=()):
        """The next job for an idle actor holding `loaded`: one of its model's, else one of a model
        no other actor holds (`held`), else the next job (it loads another model then)."""
        k = loaded if loaded in self.groups else next((k for k in self.groups if k not in held), None)
        k = next(iter(self.groups)) if k is None else k
        job = self.groups[k].popleft()
        if not self.groups[k]:
            del self.groups[k]
        return job

    def put_back(self, job):
        """A job to retry goes first."""
        k = self.key(job)
        self.groups.setdefault(k, collections.deque()).appendleft(job)
        self.groups.move_to_end(k, last=False)

    def drain(self):
        jobs = [j for g in self.groups.values() for j in g]
        self.groups.clear()
        return jobs


class Worker:
    """The actor: local.Embedded (ComfyUI in this process) and one local.Session for the batch."""

    def __init__(self, opts: dict):
        from .local import Embedded
        if Path(opts["cwd"]).is_dir():  # relative paths in the jobs (LoadImage...) mean what they do for the driver
            os.chdir(opts["cwd"])
        _remove_stale_temp()
        self.backend = Embedded(SimpleNamespace(**opts))
        self.tmp = Path(tempfile.gettempdir()) / f"{TMP_PREFIX}{os.getpid()}"
        self.tmp.mkdir(exist_ok=True)
        self.session = self.backend.session(self.tmp)

    def info(self) -> dict:
        import socket
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def node_defs(self, kinds):
        """As JSON, like a server's /object_info: the driver does not import ComfyUI's types."""
        import json
        return json.loads(json.dumps(self.backend.node_defs(kinds), default=str))

    def folder(self, op: str, *args):
        """LocalFolders' folders(), (folder) and where(folder), for the driver's checks."""
        f = self.backend.folders
        return {"folders": f.folders, "files": f, "where": f.where}[op](*args)

    def problems(self, prompt, found, need):
        return self.backend.problems(prompt, found, need)

    def cleanup(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run(self, prompt: dict, ui=None) -> dict:
        """{"files": [(subfolder, ComfyUI's filename, bytes)]} or {"error": why the job failed}."""
        try:
            return {"files": [(sub, name, path.read_bytes()) for path, sub, name in self.session.execute(prompt, ui)]}
        except self.backend.embedded.GraphError as e:
            return {"error": str(e)}
        finally:
            self.session.clear()


def _remove_stale_temp():
    """Temp folders of actors on this host whose process is gone (killed actors leave theirs)."""
    for p in Path(tempfile.gettempdir()).glob(TMP_PREFIX + "*"):
        try:
            os.kill(int(p.name[len(TMP_PREFIX):]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


class Folders:
    """The first actor's model folders, as convert.check wants them (cached: asked once each)."""

    def __init__(self, ray, actor):
        self.ray, self.actor, self.cache = ray, actor, {}

    def _ask(self, *args):
        if args not in self.cache:
            self.cache[args] = self.ray.get(self.actor.folder.remote(*args))
        return self.cache[args]

    def folders(self):
        return self._ask("folders")

    def __call__(self, folder):
        return self._ask("files", folder)

    def where(self, folder):
        return self._ask("where", folder)


class RayFarm:
    remote = False  # the actors run ComfyUI's own validator (problems)

    def __init__(self, opts):
        try:
            import ray
        except ImportError:
            raise WorkflowError("--ray needs Ray: pip install 'comfyui-oboro[ray]' (or pip install ray)") from None
        for d in opts.models:  # before Ray starts: a typo should not cost a cluster start-up
            if not Path(d).is_dir():
                raise WorkflowError(f"--models {d}: not a directory")
        self.ray, self.retries = ray, opts.retries
        scripts = str(REPO / "scripts")
        env = {"PYTHONPATH": os.pathsep.join(filter(None, (scripts, os.environ.get("PYTHONPATH"))))}
        if opts.comfyui or os.environ.get("COMFYUI_PATH"):
            env["COMFYUI_PATH"] = str(Path(opts.comfyui or os.environ["COMFYUI_PATH"]).resolve())
        runtime_env = {"env_vars": env, "worker_process_setup_hook": "oboro_env.import_oboro"}
        common = {"runtime_env": runtime_env, "log_to_driver": opts.verbose,
                  "logging_level": logging.INFO if opts.verbose else logging.WARNING}
        if opts.ray == "local":
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a throwaway Ray: no usage report
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **common)
        else:
            ray.init(address=opts.ray, **common)
        try:
            self._start_actors(opts)
        except BaseException:
            ray.shutdown()
            raise

    def _start_actors(self, opts):
        ray = self.ray
        res = ray.cluster_resources()
        gpus = 0 if opts.cpu else int(res.get("GPU", 0))
        if gpus:
            count, need = gpus, {"num_gpus": 1, "num_cpus": 1}
        else:
            count, need = max(1, int(res.get("CPU", 1) // opts.cpus_per_worker)), {"num_cpus": opts.cpus_per_worker}
        worker_opts = {"comfyui": opts.comfyui and str(Path(opts.comfyui).resolve()), "cwd": os.getcwd(),
                       "models": [str(Path(d).resolve()) for d in opts.models], "cpu": not gpus, "verbose": opts.verbose}
        actor = ray.remote(Worker).options(max_restarts=max(1, opts.retries), max_task_retries=0, **need)
        print(f"oboro-run: starting {count} Ray actor(s) ({'1 GPU' if gpus else f'{opts.cpus_per_worker:g} CPU'} "
              "each), each loading ComfyUI", file=sys.stderr)
        self.actors = [actor.remote(worker_opts) for _ in range(count)]
        try:
            infos = ray.get([a.info.remote() for a in self.actors])
        except ray.exceptions.RayError as e:
            raise WorkflowError(f"--ray: an actor failed to start: {_reason(e)}") from None
        self.names = {a: _name(i) for a, i in zip(self.actors, infos)}
        self.folders = Folders(ray, self.actors[0])
        self._defs = {}

    def node_defs(self, kinds):
        key = None if kinds is None else tuple(sorted(k for k in kinds if isinstance(k, str)))
        if key not in self._defs:
            self._defs[key] = self.ray.get(self.actors[0].node_defs.remote(key))
        return self._defs[key]

    def problems(self, prompt, found: dict, need: set) -> list[str]:
        return self.ray.get(self.actors[0].problems.remote(prompt, found, need))

    def close(self):
        refs = [a.cleanup.remote() for a in self.actors]
        self.ray.wait(refs, num_returns=len(refs), timeout=10)  # a dead actor's answer is an error: fine
        self.ray.shutdown()  # ends the actors (not detached), or the local Ray we started

    def run(self, jobs, out, progress) -> int:
        ray = self.ray
        queue, alive = Queue(jobs), list(self.actors)
        idle, loaded = list(alive), dict.fromkeys(alive)
        running, rejoining = {}, {}  # ref -> (actor, job, t0) / ref -> actor
        down = {}  # actor -> (when it died, when to ask again whether it is back)
        reasons = collections.defaultdict(list)
        bar = Throughput(len(jobs), self.names)
        failed = 0
        try:
            while queue or running:
                while idle and queue:
                    actor = idle.pop(0)
                    job = queue.take(loaded[actor], {loaded[a] for a in alive if a is not actor})
                    loaded[actor] = model_key(job.prompt)
                    progress.begin(job, job.prompt, where=f" on {self.names[actor]}")
                    running[actor.run.remote(job.prompt, job.ui)] = (actor, job, time.monotonic())
                now = time.monotonic()
                for actor, (since, at) in list(down.items()):
                    if at <= now:  # one question in flight per actor
                        rejoining[actor.info.remote()] = actor
                        down[actor] = (since, float("inf"))
                if not running and not down:
                    for job in queue.drain():
                        failed += 1
                        self._failed(out, progress, job, 0, reasons[job.index] + ["no Ray actor left to run it"])
                    break
                if not running and not rejoining:
                    time.sleep(PING_S)
                    continue
                ready = ray.wait(list(running) + list(rejoining), num_returns=1, timeout=PING_S)[0]
                if not ready:
                    continue
                ref = ready[0]
                if ref in rejoining:
                    actor = rejoining.pop(ref)
                    try:
                        info = ray.get(ref)
                        self.names[actor], loaded[actor] = _name(info), None
                        print(f"oboro-run: Ray actor restarted as {self.names[actor]} after "
                              f"{time.monotonic() - down.pop(actor)[0]:.1f}s", file=sys.stderr)
                        idle.append(actor)
                    except ray.exceptions.ActorUnavailableError:  # restarting: ComfyUI is loading
                        since = down[actor][0]
                        down[actor] = (since, time.monotonic() + PING_S)
                        if time.monotonic() - since > REJOIN_S:
                            self._leave_out(actor, alive, down, f"not back after {REJOIN_S}s")
                    except ray.exceptions.RayError as e:
                        self._leave_out(actor, alive, down, _reason(e))
                    continue
                actor, job, t0 = running.pop(ref)
                tries = len(reasons[job.index]) + 1
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # raised in our code, not ComfyUI's: the job's own
                    result = {"error": _reason(e)}
                except ray.exceptions.RayError as e:  # the actor, its process or its node is gone
                    reasons[job.index].append(f"{self.names[actor]} died mid-job: {_reason(e)}")
                    down[actor] = (time.monotonic(), time.monotonic())  # ask at once: it waits for the restart
                    if tries <= self.retries:
                        progress.say(job, f"{self.names[actor]} died; retrying on another actor")
                        queue.put_back(job)
                    else:
                        failed += 1
                        self._failed(out, progress, job, tries, reasons[job.index], time.monotonic() - t0)
                    continue
                idle.append(actor)
                extra = {"worker": self.names[actor], "attempts": tries}
                if reasons[job.index]:
                    extra["retried"] = reasons[job.index]
                if "error" in result:
                    failed += 1
                    out.commit(job, [], time.monotonic() - t0, error=result["error"], **extra)
                    progress.failed(job, result["error"])
                    continue
                stage, files = out.staging(), []
                for k, (sub, name, data) in enumerate(result["files"]):
                    (stage / f"{k}.part").write_bytes(data)
                    files.append((stage / f"{k}.part", sub, name))
                progress.finished(job, out.commit(job, files, time.monotonic() - t0, **extra),
                                  where=f" on {self.names[actor]}")
                bar.done(actor)
        except KeyboardInterrupt:  # the jobs in flight are dropped: nothing of theirs is in --out
            for ref in running:
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001  (close() ends the actors anyway)
                    pass
            raise
        return failed

    @staticmethod
    def _leave_out(actor, alive, down, why):
        alive.remove(actor)
        down.pop(actor, None)
        print(f"oboro-run: leaving out a Ray actor that did not come back: {why}", file=sys.stderr)

    def _failed(self, out, progress, job, tries, why, seconds=0.0):
        msg = "; ".join(why) + (f" (gave up after {tries} attempt(s), --retries {self.retries})" if tries else "")
        out.commit(job, [], seconds, error=msg, attempts=tries, retried=why)
        progress.failed(job, msg)


class Throughput:
    """The batch line: jobs done of the total and jobs/s, overall and per actor."""

    def __init__(self, total: int, names: dict):
        self.total, self.names, self.t0 = total, names, time.monotonic()
        self.count = collections.Counter()

    def done(self, actor):
        self.count[actor] += 1
        dt = max(time.monotonic() - self.t0, 1e-9)
        per = ", ".join(f"{self.names[a]} {n} ({n / dt:.2f}/s)" for a, n in self.count.items())
        print(f"oboro-run: {sum(self.count.values())}/{self.total} job(s) done, "
              f"{sum(self.count.values()) / dt:.2f} job/s [{per}]", file=sys.stderr, flush=True)


def _name(info: dict) -> str:
    return f"ray pid {info['pid']}@{info['host']}"


def _reason(e: BaseException) -> str:
    """The last meaningful line of a Ray error (they carry whole tracebacks)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[-1] if lines else type(e).__name__
