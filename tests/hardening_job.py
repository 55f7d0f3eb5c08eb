"""Runs API graphs through ComfyUI's executor in a FRESH process (what a restarted server is), for
the cross-process resume tests: `python hardening_job.py spec.json`.

spec: {"output": dir, "models": {kind: dir}, "rng_noise": int, "result": path,
       "jobs": [{"graph": {...}, "node": id, "interrupt_at": step or null}]}
`rng_noise` draws that many numbers from the global torch RNG first, as a server that has been
sampling other jobs has; seeded training must not depend on it. `interrupt_at` presses Cancel
(ComfyUI's interrupt) when the training node's progress bar reaches that step.
Writes {"results": [{"text": ui text of `node`} or {"error": message}]} to `result`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import oboro_env  # noqa: E402

oboro_env.add_comfy_to_path()
from comfy.cli_args import args  # noqa: E402

args.cpu = True
oboro_env.import_oboro()


def main(spec_path: str) -> int:
    import torch
    from oboro.runner import embedded
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    embedded.start(cpu=True, output_dir=spec["output"], model_dirs=spec["models"])
    torch.randn(int(spec.get("rng_noise", 0)) + 1)
    import comfy.model_management as mm
    import comfy.utils as cu
    base_hook = cu.PROGRESS_BAR_HOOK
    results = []
    for job in spec["jobs"]:
        at = job.get("interrupt_at")
        steps = job["graph"][job["node"]]["inputs"]["steps"]

        def hook(value, total, preview, prompt_id=None, node_id=None, at=at, steps=steps):
            if at is not None and total == steps and value == at:
                mm.interrupt_current_processing()
            base_hook(value, total, preview, prompt_id=prompt_id, node_id=node_id)

        cu.set_progress_bar_global_hook(hook)
        try:
            res = embedded.run(job["graph"])
            results.append({"text": res["outputs"][job["node"]]["text"][0]})
        except embedded.GraphError as e:
            results.append({"error": str(e)})
        finally:
            cu.set_progress_bar_global_hook(base_hook)
            mm.interrupt_current_processing(False)
    Path(spec["result"]).write_text(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
