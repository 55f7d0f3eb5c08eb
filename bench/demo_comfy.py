"""Shared set-up of the benches that sample the trained offline-demo model in an embedded ComfyUI
(core_caches.py, step_cache.py): argument parsing basics, ComfyUI on the CPU, and the loaded
demo model, T5, pixel-space VAE and empty negative prompt."""
import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import oboro_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--demo", default=str(REPO / "out" / "demo"), help="an oboro-demo output folder")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    return p


def start(a) -> SimpleNamespace:
    """ComfyUI (CPU) with the demo's model folders -> nodes (NODE_CLASS_MAPPINGS), comfy_nodes
    (ComfyUI's module), base (MODEL), clip, vae, neg (the empty prompt's CONDITIONING), demo, dd."""
    models = Path(a.demo) / "models"
    if not (models / "diffusion_models" / "oboro-demo.safetensors").is_file():
        sys.exit(f"no trained demo model in {models}: run scripts/oboro-demo --out {a.demo} first")
    oboro_env.add_comfy_to_path()
    from comfy.cli_args import args
    args.cpu = True
    import torch
    oboro_env.import_oboro()
    from oboro.demo import data as dd
    from oboro.demo import offline as demo, embedded
    torch.set_num_threads(a.threads)
    embedded.start(cpu=True, model_dirs={k: str(models / k) for k in ("diffusion_models", "text_encoders", "vae")})
    import nodes as comfy_nodes  # ComfyUI's
    n = comfy_nodes.NODE_CLASS_MAPPINGS
    clip = n["OboroT5Loader"].execute(t5_name=demo.T5_FILE)[0]
    return SimpleNamespace(nodes=n, comfy_nodes=comfy_nodes, models=models, demo=demo, dd=dd, clip=clip,
                           base=n["OboroModelLoader"].execute("oboro-demo.safetensors", "fp32")[0],
                           vae=n["VAELoader"]().load_vae("pixel_space")[0],
                           neg=n["OboroTextEncode"].execute(clip=clip, text="")[0])
