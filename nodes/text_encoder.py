"""OboroT5Loader / OboroTextEncode: a T5 v1.1 encoder file -> CLIP -> CONDITIONING with a mask.

Built on ComfyUI's own T5 (comfy.text_encoders.t5 via sd1_clip), so offloading, fp8 / scaled fp8
storage, LoRA key mapping and hooks behave as for core text encoders. We only add what core lacks:
Hugging Face (sharded) checkpoints, a config inferred from the weights, clear errors, and an
unpadded, masked encoding with an explicit token budget, which is what the oboro model reads.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import folder_paths
from comfy.supported_models_base import ClipTarget
from comfy import sd1_clip
from comfy.text_encoders import sd3_clip
from comfy.text_encoders.pixart_t5 import PixArtTokenizer
from comfy_api.latest import io

from .comfy_model import WEIGHT_DTYPES
from .finite import check_inputs, input_errors
from .paths import model_file_error

log = logging.getLogger("oboro")

PREFIXES = ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.")
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl", ".pickle"}
T5_TOKENIZER_VOCAB = 32100  # sentencepiece pieces + 100 sentinels; the embedding is padded to 32128
# OboroTextEncode's token budget. T5 v1.1 was trained on 512-token inputs (as Flux's t5xxl budget) and
# its encoder attention grows with the square of the length: 8192 tokens took 20 s on the 2-layer
# test T5 and would need ~17 GB per attention map in T5-XXL. Prompts are truncated by tokens before
# encoding, so any prompt length costs at most this many tokens.
MAX_TOKENS = 512


def checkpoint_files(path: str | Path) -> list[Path]:
    """Files holding the weights. A Hugging Face shard names no other shard, only the
    `*.safetensors.index.json` beside it does, so any shard (or the index) stands for all."""
    p = Path(path)
    if not p.name.lower().endswith((".safetensors", ".sft", ".index.json")):
        kind = ("a pickle checkpoint: unpickling can run arbitrary code" if p.suffix.lower() in PICKLE_SUFFIXES
                else f"'{p.suffix}': only safetensors are supported")
        raise ValueError(f"{p}: refusing to load {kind}. Convert it to .safetensors.")
    index = p if p.name.endswith(".index.json") else None
    if index is None:
        for cand in sorted(p.parent.glob("*.safetensors.index.json")):
            if p.name in json.loads(cand.read_text()).get("weight_map", {}).values():
                index = cand
                break
    if index is None:
        return [p]
    files = [index.parent / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{p}: shard '{f.name}' listed in {index.name} is missing")
    return files


def normalize_keys(sd: dict) -> dict:
    """ComfyUI-single-file and HF T5EncoderModel keys -> the keys of comfy's T5 (they already
    match HF's, minus prefixes). Decoder / lm_head keys of full T5 checkpoints are dropped."""
    for pre in PREFIXES:
        if any(k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
            break
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:  # tied; HF saves only one
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    return {k: v for k, v in sd.items() if k == "scaled_fp8" or
            (k.startswith(("encoder.", "shared.")) and k != "encoder.embed_tokens.weight")}


def infer_t5_config(sd: dict, path) -> dict:
    """Overrides for comfy's t5_config_xxl.json, read off tensor shapes so any T5 v1.1-style
    encoder (XXL or a tiny test model) loads. The activation is not stored in weights: gated
    FFNs are T5 v1.1 (gated-gelu, tanh approximation), plain ones original T5 (relu)."""
    def need(key):
        if key not in sd:
            raise ValueError(f"{path}: not a T5 encoder checkpoint, missing key '{key}'")
        return sd[key]

    vocab_size, d_model = need("shared.weight").shape
    buckets, num_heads = need("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight").shape
    inner = need("encoder.block.0.layer.0.SelfAttention.q.weight").shape[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    d_ff = need(f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight").shape[0]
    need("encoder.final_layer_norm.weight")
    if buckets != 32:  # comfy's T5Attention hard-codes 32 buckets and max distance 128
        raise ValueError(f"{path}: {buckets} relative attention buckets; ComfyUI's T5 supports 32")
    if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in sd:
        raise ValueError(f"{path}: per-layer position bias (UMT5) is not supported, only T5 v1.1")
    if vocab_size < T5_TOKENIZER_VOCAB:
        raise ValueError(f"{path}: vocabulary of {vocab_size} is smaller than the T5 tokenizer's "
                         f"{T5_TOKENIZER_VOCAB}; not a T5 (v1.1 / t5xxl) encoder")
    if inner % num_heads:
        raise ValueError(f"{path}: attention width {inner} is not a multiple of {num_heads} heads")
    return {"vocab_size": vocab_size, "d_model": d_model, "num_heads": num_heads, "d_kv": inner // num_heads,
            "d_ff": d_ff, "num_layers": 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block.")),
            "is_gated_act": gated, "dense_act_fn": "gelu_pytorch_tanh" if gated else "relu", "model_type": "t5"}


class OboroT5Model(sd1_clip.SD1ClipModel):
    """Core's T5XXLModel (config overridden via model_options["t5xxl_model_config"]) with attention
    masks both applied inside T5 and returned, so conditioning carries `attention_mask`."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, name="t5xxl", clip_model=sd3_clip.T5XXLModel,
                         model_options=model_options, attention_mask=True)


def load_t5(path: str | Path, dtype: torch.dtype | None = None) -> comfy.sd.CLIP:
    """A T5 encoder checkpoint as a comfy CLIP, built like comfy.sd.load_text_encoder_state_dicts.
    `dtype` is the weight storage dtype; None picks core's default (the file's dtype, capped by
    the text encoder dtype, fp16 unless --fp32-text-enc etc.). Activations are fp32 either way."""
    sd, quant = {}, None
    for f in checkpoint_files(path):
        part, meta = comfy.utils.load_torch_file(str(f), safe_load=True, return_metadata=True)
        sd.update(part)
        quant = (meta or {}).get("_quantization_metadata", quant)
    sd = normalize_keys(sd)
    options = {"t5xxl_model_config": infer_t5_config(sd, path)}
    if "scaled_fp8" in sd:
        options["t5xxl_scaled_fp8"] = sd["scaled_fp8"].dtype
    if quant is not None:
        options["quantization_metadata"] = quant
    if dtype is None:
        device = mm.text_encoder_device()
        dtype = mm.pick_weight_dtype(sd["encoder.final_layer_norm.weight"].dtype, mm.text_encoder_dtype(device), device)
    options["dtype"] = dtype
    clip = comfy.sd.CLIP(ClipTarget(PixArtTokenizer, OboroT5Model), parameters=comfy.utils.calculate_parameters(sd),
                         embedding_directory=folder_paths.get_folder_paths("embeddings"), model_options=options)
    missing, unexpected = clip.load_sd(sd)
    missing = [k for k in missing if not k.endswith((".scale_weight", ".scale_input"))]  # absent scale = 1
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{path}: T5 checkpoint is missing key '{missing[0]}'{more}")
    if unexpected:
        log.debug("oboro T5 %s: unused keys %s", path, unexpected)
    log.info("oboro: loaded T5 %s %s as %s", path, options["t5xxl_model_config"], dtype)
    return clip


def truncate_tokens(tokens: dict, max_tokens: int) -> tuple[dict, int]:
    """Keep the first max_tokens - 1 tokens of each sequence plus its last (end-of-sequence) one:
    T5 was trained with EOS closing the text. Returns (tokens, number dropped)."""
    out, dropped = {}, 0
    for key, sections in tokens.items():
        out[key] = []
        for seq in sections:
            if len(seq) > max_tokens:
                dropped += len(seq) - max_tokens
                seq = seq[:max_tokens - 1] + seq[-1:]
            out[key].append(seq)
    return out, dropped


def encode_text(clip, text: str, max_tokens: int = 256) -> tuple[list, int]:
    """`text` -> (CONDITIONING [[hidden [1,L,D], {..., "attention_mask": [1,L]}]], number of tokens
    dropped by truncate_tokens). Unpadded: L is the prompt's token count (EOS included), at most
    max_tokens. Shared by OboroTextEncode and the training-data nodes."""
    if clip is None:
        raise RuntimeError("clip input is None: connect a text encoder (e.g. OboroT5Loader).")
    tokens, dropped = truncate_tokens(clip.tokenize(text), max_tokens)
    conds = clip.encode_from_tokens_scheduled(tokens)
    for cond, extra in conds:
        if extra.get("attention_mask") is None:  # a core CLIP without masks: unpadded T5 only
            extra["attention_mask"] = torch.ones(cond.shape[:2], dtype=torch.long, device=cond.device)
    return conds, dropped


class OboroT5Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroT5Loader",
            display_name="oboro T5 Loader",
            category="oboro",
            description="Loads a T5 v1.1 encoder (t5xxl fp16 / fp8 / scaled fp8 single files, or a Hugging "
                        "Face T5EncoderModel .safetensors, sharded ones via any shard) from "
                        "models/text_encoders as a CLIP for OboroTextEncode.",
            inputs=[
                io.Combo.Input("t5_name", options=folder_paths.get_filename_list("text_encoders"),
                               tooltip="File in models/text_encoders. For a sharded Hugging Face checkpoint "
                                       "pick any shard; all shards in its .safetensors.index.json load."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default", optional=True,
                               tooltip="Storage dtype of the weights; 'default' keeps the file's dtype up to "
                                       "the text encoder dtype (fp16). Compute always runs in fp32."),
            ],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def validate_inputs(cls, t5_name="", weight_dtype="default"):
        """ComfyUI 0.3.x checks combo values only for V1 nodes: a name not in the list is refused here,
        when queued (with the other loaders' missing files in the same error)."""
        return (model_file_error("OboroT5Loader", "t5_name", "text_encoders", t5_name)
                or input_errors(cls, weight_dtype=weight_dtype) or True)

    @classmethod
    def execute(cls, t5_name, weight_dtype="default") -> io.NodeOutput:
        check_inputs(cls, t5_name=t5_name, weight_dtype=weight_dtype)
        path = folder_paths.get_full_path_or_raise("text_encoders", t5_name)
        return io.NodeOutput(load_t5(path, WEIGHT_DTYPES[weight_dtype]))


class OboroTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OboroTextEncode",
            display_name="oboro Text Encode",
            category="oboro",
            description="Encodes a prompt with T5 into unpadded hidden states plus the attention mask "
                        "the oboro model uses.",
            inputs=[
                io.Clip.Input("clip", tooltip="The T5 text encoder from oboro T5 Loader."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt (English, as the model was trained). Empty is allowed: the "
                                        "usual negative prompt."),
                io.Int.Input("max_tokens", default=256, min=1, max=MAX_TOKENS, optional=True,
                             tooltip="Most T5 tokens kept, end-of-sequence token included (at most 512, "
                                     "T5's training length). Longer prompts are cut at the end before "
                                     "encoding (a warning says how many tokens were dropped). Longer "
                                     "conditioning costs attention time in every sampling step."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, clip, text, max_tokens=256) -> io.NodeOutput:
        check_inputs(cls, max_tokens=max_tokens)  # a linked value is only checked here
        if not isinstance(text, str):
            raise ValueError(f"OboroTextEncode: text must be a string, got {type(text).__name__}")
        conds, dropped = encode_text(clip, text, max_tokens)
        if dropped:
            log.warning("OboroTextEncode: prompt is longer than max_tokens=%d; dropped its last %d tokens "
                        "(end-of-sequence token kept).", max_tokens, dropped)
        return io.NodeOutput(conds)
