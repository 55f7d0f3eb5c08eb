"""Non-finite numbers, caught where they enter instead of as a black image at the end.

1. Node inputs: NaN passes ComfyUI's min/max check (every comparison with NaN is False), so a
   FLOAT input of NaN used to reach the sampler; and ComfyUI 0.3.x checks a combo's value against
   its options only for V1 nodes (a list type), not for V3 io.Combo inputs. `input_errors` checks
   a node's INT / FLOAT values against its own schema (finite, within min..max) and COMBO values
   against its options, and says which input, what value and what is allowed; nodes call it from
   validate_inputs (ComfyUI's validator, `oboro-run --check`) and again in execute (linked values
   are only known there).
2. Sampling: every MODEL load_oboro_model returns carries two ModelPatcher wrappers (key
   GUARD_KEY; clones keep them, nothing on the model is replaced). OUTER_SAMPLE refuses a guider
   whose cfg is not finite (core KSampler, SamplerCustom, CFGGuider... all land here) and
   non-finite sigmas or input latents; APPLY_MODEL checks each denoiser output and names the sigma
   at which it stopped being finite (overflowing LoRA, fp16 overflow, a diverging cfg).
"""
from __future__ import annotations

import math
import numbers

import torch

import comfy.patcher_extension

GUARD_KEY = "oboro_finite"


def _range(inp) -> str:
    lo, hi = getattr(inp, "min", None), getattr(inp, "max", None)
    if lo is None and hi is None:
        return "any finite number"
    return f"{'-inf' if lo is None else lo}..{'inf' if hi is None else hi}"


def number_error(name: str, value, inp) -> str | None:
    """Why `value` is no valid value of the INT / FLOAT input `inp` (a comfy_api io input), or None."""
    kind = "INT" if inp.get_io_type() == "INT" else "FLOAT"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"{name} must be a number ({kind}), got {type(value).__name__} {str(value)[:80]!r}"
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):  # an int of any size is finite
        return f"{name} is {value}; give a finite number in {_range(inp)}"
    if kind == "INT" and value != int(value):
        return f"{name} must be a whole number in {_range(inp)}, got {value}"
    lo, hi = getattr(inp, "min", None), getattr(inp, "max", None)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        shown = value if isinstance(value, float) or abs(value) < 2**64 else \
            f"({'a negative' if value < 0 else 'an'} integer of {int(value).bit_length()} bits)"
        return f"{name} {shown} is outside the allowed range {_range(inp)}"
    return None


def combo_error(name: str, value, inp) -> str | None:
    options = list(getattr(inp, "options", None) or [])
    if isinstance(value, str) and value in options:
        return None
    shown = options if len(options) <= 20 else f"{len(options)} options, e.g. {options[:3]}"
    return f"{name} {str(value)[:120]!r} is not one of {shown}"


def input_error(name: str, value, inp) -> str | None:
    if inp.get_io_type() == "COMBO":
        return combo_error(name, value, inp)
    return number_error(name, value, inp)


def input_errors(node_cls, **values) -> str | None:
    """The first input_error of `values` against node_cls's schema inputs of the same names."""
    schema = node_cls.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    for name, value in values.items():
        if name in inputs and (err := input_error(name, value, inputs[name])):
            return f"{schema.node_id}: {err}"
    return None


def check_inputs(node_cls, **values) -> None:
    """input_errors as an exception (for execute)."""
    if err := input_errors(node_cls, **values):
        raise ValueError(err)


class NonFiniteError(ValueError):
    """A NaN or inf in sampling, with where it appeared."""


def _count(t: torch.Tensor) -> str:
    bad = ~torch.isfinite(t)
    nan = int(torch.isnan(t).sum())
    return f"{int(bad.sum())} of {t.numel()} values ({nan} NaN, {int(bad.sum()) - nan} inf)"


def outer_sample_guard(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    guider = executor.class_obj
    for name, value in sorted(vars(guider).items()):
        if name.startswith("cfg") and isinstance(value, numbers.Real) and not math.isfinite(value):
            raise NonFiniteError(f"{name} is {value}; give a finite number (the sampler's cfg input: "
                                 "1 turns guidance off)")
    for what, t in (("sigmas", sigmas), ("noise", noise), ("input latent", latent_image)):
        if torch.is_tensor(t) and not t.is_nested and not torch.isfinite(t).all():
            raise NonFiniteError(f"the {what} holds {_count(t)} that are not finite; sampling would "
                                 "produce a black image")
    return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)


def apply_model_guard(executor, x, t, *args, **kwargs):
    out = executor(x, t, *args, **kwargs)
    if torch.is_tensor(out) and not torch.isfinite(out).all():
        sigma = ", ".join(f"{float(s):.4g}" for s in t.flatten()[:4]) if torch.is_tensor(t) else str(t)
        cause = ("its input already was not finite: the sampler diverged (a very large cfg or shift?)"
                 if not torch.isfinite(x).all() else
                 "the input was finite: check LoRA strengths and files, model patches and the conditioning, "
                 "or use a wider weight dtype (fp16 can overflow)")
        raise NonFiniteError(f"the model output is not finite at sigma {sigma}: {_count(out)}; {cause}")
    return out


def guard_non_finite(patcher) -> None:
    """Register the sampling guards on a ModelPatcher (idempotent: a fixed key)."""
    WMP = comfy.patcher_extension.WrappersMP
    for kind, fn in ((WMP.OUTER_SAMPLE, outer_sample_guard), (WMP.APPLY_MODEL, apply_model_guard)):
        patcher.remove_wrappers_with_key(kind, GUARD_KEY)
        patcher.add_wrapper_with_key(kind, GUARD_KEY, fn)
