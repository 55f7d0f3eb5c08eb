"""The offline demo's task in process (no ComfyUI): the procedural dataset, the demo's tiny random T5,
oboro_model.training.Trainer, samplers.sample and demo_data.score_image. A cheap, faithful proxy of
demo/offline.py for comparing recipes (bench/demo_recipe.py) and head schedules
(bench/ablation_heads.py); the demo itself always trains through the shipped workflow.

Pixels: rendered at 64 px and LANCZOS-resized to `size`, in [-1, 1] (what OboroCacheLatents with the
pixel_space VAE gives). Text: runner/demo.T5_CONFIG with torch seed 0 (the weights write_models()
saves) through transformers' T5EncoderModel and the real T5 tokenizer shipped inside ComfyUI.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import oboro_env  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

oboro = oboro_env.import_oboro()
from oboro.oboro_model import MMHDiT, OboroConfig  # noqa: E402,F401
from oboro.demo import data as dd  # noqa: E402
from oboro.oboro_model.training import Trainer, TrainConfig, collate, icfm_loss  # noqa: E402,F401
from oboro.demo.offline import CONTROL, T5_CONFIG  # noqa: E402
from oboro.samplers import prepare_noise, sample  # noqa: E402

MAX_TOKENS = 64


def text_encoder(t5_layers: int | None = None, context_free: bool = False):
    import transformers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast
    transformers.logging.set_verbosity_error()
    tok = T5TokenizerFast.from_pretrained(str(oboro_env.comfy_path() / "comfy" / "text_encoders" / "t5_tokenizer"))
    torch.manual_seed(0)  # as runner/demo.write_models: the demo's T5 weights
    t5 = T5EncoderModel(T5Config(**{**T5_CONFIG, **({"num_layers": t5_layers} if t5_layers else {})})).eval()
    if context_free:  # no attention output: each token's state depends on its own word only
        for block in t5.encoder.block:
            torch.nn.init.zeros_(block.layer[0].SelfAttention.o.weight)

    @torch.no_grad()
    def encode(text: str):
        ids = tok(text, truncation=True, max_length=MAX_TOKENS, return_tensors="pt").input_ids  # ends with </s>
        h = t5(input_ids=ids).last_hidden_state[0].float().clone()
        return h, torch.ones(h.shape[0], dtype=torch.bool)
    return encode


def pixels(combo, size: int) -> torch.Tensor:
    img, _ = dd.render(*combo, size=64)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class Task:
    """Train / held-out / control items at one size, plus the empty-prompt embedding."""

    def __init__(self, size: int, t5_layers: int | None = None, t5_context_free: bool = False, omit: tuple = (),
                 extra_colours: int = 0):
        encode = text_encoder(t5_layers, t5_context_free)
        self.size = size

        def items(combos, omit=""):
            out = []
            for combo in combos:
                h, m = encode(dd.caption(*combo, omit=omit))
                out.append({"latent": pixels(combo, size), "text": h, "text_mask": m, "combo": combo})
            return out
        self.train, self.held = items(dd.combinations("train")), items(dd.combinations("heldout"))
        self.extra = [it for o in omit for it in items(dd.combinations("train"), o)]  # caption augmentation
        self.extra += items([c for c in dd.combinations("train", extra_colours) if c[1] in dd.EXTRA_COLOURS])
        self.control = [it for it in self.train if it["combo"] in CONTROL]
        assert not {dd.caption(*i["combo"]) for i in self.train} & {dd.caption(*i["combo"]) for i in self.held}
        self.empty_text, self.empty_mask = encode("")

    @torch.no_grad()
    def val_loss(self, net, noise_seed: int = 1000, t_grid: int = 8) -> float:
        """I-CFM MSE on the held-out images at t = (k + 0.5) / t_grid, fixed noise: identical draws for any model."""
        net.eval()
        x1, text, mask = collate(self.held)
        x1, text, mask = (v.repeat_interleave(t_grid, 0) for v in (x1, text, mask))
        t = ((torch.arange(t_grid, dtype=torch.float32) + 0.5) / t_grid).repeat(len(self.held))
        x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(noise_seed))
        per = torch.cat([icfm_loss(net, x1[i:i + 120], text[i:i + 120], mask[i:i + 120], t[i:i + 120], x0[i:i + 120],
                                   reduction="none") for i in range(0, len(t), 120)])
        net.train()
        return per.mean().item()

    @torch.no_grad()
    def scores(self, net, items, seeds=(0, 1), steps=20, cfg=3.0, solver="euler", shift=1.0) -> dict:
        """demo_data.summarize over items x seeds, ComfyUI-style noise per seed (the demo's sampler)."""
        net.eval()
        neg = (self.empty_text[None], self.empty_mask[None].long())
        S, out = self.size, []
        for k in range(0, len(items), 15):
            chunk = items[k:k + 15]
            _, text, mask = collate(chunk)
            for seed in seeds:
                noise = torch.cat([prepare_noise(torch.zeros(1, 3, S, S), seed) for _ in chunk])
                x = sample(net, noise, (text, mask.long()), neg, steps=steps, cfg=cfg, solver=solver, shift=shift)
                imgs = ((x + 1.0) / 2.0).clamp(0, 1).mul(255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
                out += [dd.score_image(img, *it["combo"]) for img, it in zip(imgs, chunk)]
        net.train()
        return dd.summarize(out)


def model_config(size_cfg: dict) -> OboroConfig:
    return OboroConfig(in_channels=3, text_dim=T5_CONFIG["d_model"], **size_cfg)
