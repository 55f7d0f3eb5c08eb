"""Tiny random-weight stand-ins for the data-prep models (no Florence-2 or SigLIP weights exist
offline), built from their transformers configs and saved in the layout the nodes read."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

WORDS = "a the red green blue yellow circle square triangle on of background image shows with in and".split()


def save_tiny_florence(folder: Path, seed: int = 0) -> Path:
    """Florence2ForConditionalGeneration (DaViT 4 stages, 1-layer BART, width 32) + its processor
    (a word-level byte-BPE tokenizer with Florence's <image> token, CLIP image processor at 64²).
    The end-of-sequence row of the (tied) output embedding is zeroed, so random weights write
    tokens rather than stop at once."""
    from transformers import (BartConfig, BartTokenizer, CLIPImageProcessor, Florence2Config,
                              Florence2ForConditionalGeneration, Florence2Processor)
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for tok in ["Ġ"] + sorted(set("".join(WORDS))) + ["Ġ" + w for w in WORDS]:
        vocab.setdefault(tok, len(vocab))
    tok = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    width = 32
    vision = Florence2VisionConfig(depths=(1, 1, 1, 1), embed_dim=(8, 16, 16, width), num_heads=(1, 1, 1, 2),
                                   num_groups=(1, 1, 1, 2), window_size=2, projection_dim=width, drop_path_rate=0.0)
    text = BartConfig(vocab_size=len(tok), d_model=width, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                      bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                      forced_bos_token_id=0, forced_eos_token_id=2)
    torch.manual_seed(seed)
    cfg = Florence2Config(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=tok.image_token_id)
    model = Florence2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight[tok.eos_token_id] = 0.0  # logit 0 for eos: rarely the top token
    proc = Florence2Processor(image_processor=CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False,
                                                                 image_seq_length=5), tokenizer=tok)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def save_tiny_aesthetic(folder: Path, centre: float = 5.5, seed: int = 0) -> Path:
    """A 1-layer SigLIP vision tower (32², patch 8) and a v2.5-shaped head whose output is
    `centre` plus a small image-dependent term, as aesthetic_predictor_v2_5.safetensors."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from oboro.oboro_model.data.annotate import _head
    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=8)
    SiglipVisionModel(cfg).eval().save_pretrained(folder)
    head = _head(cfg.hidden_size)
    with torch.no_grad():
        head[-1].bias.fill_(centre)
    save_file({f"scoring_head.{k}": v.contiguous() for k, v in head.state_dict().items()},
              str(folder / "aesthetic_predictor_v2_5.safetensors"))
    return folder
