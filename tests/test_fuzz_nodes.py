"""Issue #26 §6: every oboro node's widget inputs, fuzzed through ComfyUI's own validator (and, for cheap
nodes, the executor) on tiny models. Property: a value is either refused with an error that names the
input (or, in execution, the chosen file), or accepted and the node's outputs are finite; no raw OverflowError / MemoryError / SystemError;
nothing outside the test's folders changes.

Nodes come from OboroExtension().get_node_list() and their inputs from the registered classes'
INPUT_TYPES, so a new node or input is fuzzed without touching this file. Each node gets a fixed
sweep of extreme values over every widget input, then hypothesis' random values (derandomized: the
same cases on every run; no example database written). Training / dataset nodes are validated only
(they are being rewritten and run for minutes); EXECUTE lists the nodes also run."""
from __future__ import annotations

import asyncio
import math
import os
import re
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from oboro.oboro_model import save_checkpoint
from tiny import save_t5, tiny_dit, tiny_t5

REPO = Path(__file__).resolve().parents[1]
SUB = "fuzz"
pytestmark = pytest.mark.usefixtures("one_thread")
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Nodes cheap enough to execute on every accepted value (tiny models, a 32x32 latent).
EXECUTE = {"OboroModelLoader", "OboroT5Loader", "OboroTextEncode", "OboroSampler", "OboroFlowScheduler",
           "SamplerOboroICFM", "EmptyOboroLatentImage", "OboroTaylorCache", "OboroMaskAdapterLoader",
           "OboroApplyMaskControl"}
RAW_CRASHES = ("OverflowError", "MemoryError", "SystemError", "RecursionError", "ZeroDivisionError")
# (node, input) -> reason: known failures in other engineers' scope (issue #26), not fixed here.
KNOWN = {
    ("OboroMaskAdapterLoader", "adapter_name"):
        "nodes/mask_control.py (not this change's scope): a V3 combo value outside the file list passes "
        "ComfyUI 0.3.x validation and fails in execute with a raw TypeError/FileNotFoundError; needs "
        "validate_inputs like OboroModelLoader's (nodes/finite.input_errors)",
}
NAN, INF = float("nan"), float("inf")
# A 2-element list is a link [node_id, slot], not a value: core reports a bogus link without the input's
# name (its own behaviour for every node), so lists here have other lengths.
EXTREMES = [NAN, INF, -INF, 0, -0.0, -1, 1e308, -1e308, 10**30, -(10**30), 2**63, 10**400, 1e-300, "", "nan", "1e999",
            "\x00", "é\u202e\U0001F600", "a" * 5000, None, True, [1], {"x": 1}]


def oboro_node_ids() -> list[str]:
    import importlib
    ext = importlib.import_module("oboro.nodes").OboroExtension()
    return [cls.define_schema().node_id for cls in asyncio.run(ext.get_node_list())]


NODE_IDS = oboro_node_ids()


@pytest.fixture(scope="module")
def fuzz_env(comfy, tmp_path_factory):
    import folder_paths
    from oboro.oboro_model.mask_control import MaskAdapterConfig, MaskControlDiT, save_mask_adapter
    for kind in ("diffusion_models", "text_encoders"):
        (comfy.models / kind / SUB).mkdir(exist_ok=True)
    save_checkpoint(comfy.models / "diffusion_models" / SUB / "dit.safetensors", tiny_dit())
    save_t5(comfy.models / "text_encoders" / SUB / "t5.safetensors", tiny_t5())
    adapters = tmp_path_factory.mktemp("fuzz_adapters")
    save_mask_adapter(adapters / "fuzz_mask.safetensors",
                      MaskControlDiT(tiny_dit(), MaskAdapterConfig(num_labels=2, image_rank=4)))
    folder_paths.add_model_folder_path("oboro_mask_adapters", str(adapters), is_default=True)
    yield
    folder_paths.folder_names_and_paths["oboro_mask_adapters"][0].remove(str(adapters))


# ---- graphs ------------------------------------------------------------------------------------------
def classes():
    import nodes as comfy_nodes
    return comfy_nodes.NODE_CLASS_MAPPINGS


def input_table(class_type: str) -> dict:
    """name -> (kind, options, required): kind a widget kind or the link type."""
    spec, out = classes()[class_type].INPUT_TYPES(), {}
    for section in ("required", "optional"):
        for name, (typ, *rest) in spec.get(section, {}).items():
            opts = rest[0] if rest else {}
            if isinstance(typ, (list, tuple)):
                typ, opts = "COMBO", {**opts, "options": list(typ)}
            out[name] = (str(typ), opts, section == "required")
    return out


def default_value(kind, opts):
    if kind == "COMBO":
        options = opts.get("options") or []
        return opts.get("default", options[0] if options else "")
    return opts.get("default", {"INT": max(0, opts.get("min", 0)), "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind])


PREFERRED = {  # a source for each link type; others are found among all registered nodes
    "MODEL": ("OboroModelLoader", {"model_name": f"{SUB}/dit.safetensors", "weight_dtype": "fp32"}),
    "CLIP": ("OboroT5Loader", {"t5_name": f"{SUB}/t5.safetensors"}),
    "CONDITIONING": ("OboroTextEncode", {"clip": "CLIP", "text": "a red circle"}),
    "LATENT": ("EmptyOboroLatentImage", {"width": 32, "height": 32, "batch_size": 1, "channels": "16 (FLUX VAE)"}),
    "MASK": ("SolidMask", {"value": 1.0, "width": 32, "height": 32}),
    "IMAGE": ("EmptyImage", {"width": 32, "height": 32, "batch_size": 1, "color": 0}),
}


def add_source(g: dict, typ: str) -> list:
    """A node in `g` producing `typ` (built once per graph); returns the link [id, slot]."""
    key = f"src_{typ}"
    if key not in g:
        if typ in PREFERRED:
            ct, inputs = PREFERRED[typ]
        else:
            ct = next((c for c, cls in classes().items() if typ in getattr(cls, "RETURN_TYPES", ())
                       and all(k in WIDGETS for k, _, req in input_table(c).values() if req)), None)
            if ct is None:
                raise LookupError(f"no node with widget inputs only produces {typ}")
            inputs = {}
        g[key] = {"class_type": ct, "inputs": {}}
        table = input_table(ct)
        for name, (kind, opts, req) in table.items():
            v = inputs.get(name)
            if kind not in WIDGETS:
                if req or v:
                    g[key]["inputs"][name] = add_source(g, kind)
            else:
                g[key]["inputs"][name] = default_value(kind, opts) if v is None else v
    return [key, list(classes()[g[key]["class_type"]].RETURN_TYPES).index(typ)]


OPTIONAL_LINKS = {"OboroApplyMaskControl": {"mask"}}  # needs one of mask / mask_image to run


def base_graph(class_type: str) -> dict:
    g = {}
    node = {"class_type": class_type, "inputs": {}}
    for name, (kind, opts, req) in input_table(class_type).items():
        if kind in WIDGETS:
            node["inputs"][name] = default_value(kind, opts)
        elif req or name in OPTIONAL_LINKS.get(class_type, ()):
            node["inputs"][name] = add_source(g, kind)
    g["F"] = node
    if not getattr(classes()[class_type], "OUTPUT_NODE", False):
        g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["F", 0]}}
    return g


# ---- checks ------------------------------------------------------------------------------------------
def validation_errors(comfy, g) -> set[str]:
    from oboro.runner.embedded import GraphError
    try:
        comfy.validate(g)
        return set()
    except GraphError as e:
        out = {str(e)} if not (e.details or {}).get("node_errors") else set()
        for nid, info in (e.details or {}).get("node_errors", {}).items():
            out |= {f"{nid}: {x.get('extra_info', {}).get('input_name')}: {x.get('message')}: {x.get('details')}"
                    for x in info.get("errors", [])}
        return out


def finite(value) -> bool:
    if torch.is_tensor(value):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return True


def execute(g):
    """Runs only node F (not the PreviewAny consumer); (error message or None, F's outputs)."""
    import execution
    from oboro.runner.embedded import HeadlessServer
    ex = execution.PromptExecutor(HeadlessServer(), cache_type=execution.CacheType.CLASSIC,
                                  cache_args={"lru": 0, "ram": 0})
    ex.execute(g, str(uuid.uuid4()), {}, ["F"])
    if not ex.success:
        err = next((d for ev, d in ex.status_messages if ev == "execution_error"), {})
        return f"{err.get('exception_type')}: {err.get('exception_message')}", None
    return None, ex.caches.outputs.get("F").outputs


def check(comfy, class_type, baseline, name, value):
    """None if the property holds for `value` in input `name`, else why not."""
    g = base_graph(class_type)
    g["F"]["inputs"][name] = value
    new = validation_errors(comfy, g) - baseline
    word = re.compile(rf"\b{re.escape(name)}\b")
    if new:
        bad = [e for e in new if not word.search(e) or any(c in e for c in RAW_CRASHES)]
        return f"validation error not naming {name!r}: {bad[0][:300]}" if bad else None
    if baseline or class_type not in EXECUTE or not cheap(class_type, name, value):
        return None
    err, outputs = execute(g)
    if err is not None:
        # a broken model file among the combo's options: naming that file names the value
        named = word.search(err) or (isinstance(value, str) and len(value) >= 3 and value in err)
        if not named or err.split(":")[0] in RAW_CRASHES:
            return f"execution error not naming {name!r}: {err[:300]}"
        return None
    return None if finite(outputs) else f"accepted and returned a non-finite output"


def cheap(class_type, name, value) -> bool:
    """Accepted values that would only make the run long (many sampling steps) are validated only."""
    return not (class_type == "OboroSampler" and name == "steps" and isinstance(value, (int, float))
                and abs(value) > 8)


def tree(root: Path) -> dict:
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "custom_nodes"}
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip]
        for f in files:
            p = os.path.join(d, f)
            try:
                s = os.stat(p)
            except OSError:
                continue
            out[p] = (s.st_size, s.st_mtime_ns)
    return out


# ---- the property ------------------------------------------------------------------------------------
def value_strategy(kind, opts):
    lo, hi = opts.get("min"), opts.get("max")
    edges = [v for v in (lo, hi) if v is not None]
    edges += [v + d for v in edges for d in (-1, 1)] if kind == "INT" else [v * (1 + 1e-9) + d for v in edges
                                                                           for d in (-1e-6, 1e-6)]
    numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**80), 2**80),
                        st.sampled_from(edges or [0]))
    text = st.text(st.characters(codec="utf-8"), max_size=300)
    junk = st.one_of(st.none(), st.booleans(), st.lists(st.integers(), min_size=3, max_size=4), st.just([]), text)
    if kind in ("INT", "FLOAT"):
        return st.one_of(numbers, numbers, junk)
    if kind == "COMBO":
        return st.one_of(text, st.sampled_from(opts.get("options") or [""]), numbers)
    return st.one_of(text, text, numbers, junk)


@pytest.mark.parametrize("class_type", NODE_IDS)
def test_fuzzed_inputs_are_refused_by_name_or_give_finite_results(comfy, fuzz_env, class_type):
    assert class_type in classes(), f"{class_type} is in get_node_list() but not registered with ComfyUI"
    table = {n: (k, o) for n, (k, o, _) in input_table(class_type).items() if k in WIDGETS}
    if not table:
        pytest.skip(f"{class_type} has no widget inputs")
    before = tree(REPO)
    baseline = validation_errors(comfy, base_graph(class_type))
    if class_type in EXECUTE:  # the unfuzzed graph must run, or the executed cases prove nothing
        assert not baseline and execute(base_graph(class_type))[0] is None, baseline
    failures: dict[str, tuple] = {}

    def record(name, value):
        if name not in failures and (why := check(comfy, class_type, baseline, name, value)):
            failures[name] = (value, why)

    for name in table:  # the fixed sweep: every input, every extreme
        for value in EXTREMES:
            record(name, value)

    @settings(max_examples=20, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(table)).flatmap(lambda n: st.tuples(st.just(n), value_strategy(*table[n]))))
    def fuzz(case):
        record(*case)

    fuzz()
    assert tree(REPO) == before, "the fuzzed runs changed files outside the test's folders"
    unknown = {n: f for n, f in failures.items() if (class_type, n) not in KNOWN}
    assert not unknown, "\n".join(f"{class_type}.{n} = {str(v)[:80]!r}: {why}" for n, (v, why) in unknown.items())
    if failures:
        pytest.xfail("; ".join(f"{class_type}.{n}: {KNOWN[(class_type, n)]}" for n in failures))
