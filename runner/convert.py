"""Saved graphs: load API- or UI-format JSON, convert UI -> API with the live node definitions
(what ComfyUI serves at /object_info), and the checks both runners make before running anything
(unknown node types, missing model files, and, without a local ComfyUI, bad values).

The conversion follows the ComfyUI frontend's graphToPrompt: notes and other virtual nodes are
dropped, Reroutes and bypassed (mode 4) nodes are followed through, muted (mode 2) nodes dropped,
`widgets_values` are mapped in definition order onto the widget inputs (skipping the serialized
"control after generate" value of seed-like inputs and the upload button of image/video inputs),
and links come from the `links` array.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize", "increment-wrap"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode", "Label (rgthree)"}
MUTED, BYPASSED = 2, 4
# Which model folder an input name usually belongs to, for when the folder lists can't tell.
MODEL_INPUTS = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "model_name": "diffusion_models",
                "vae_name": "vae", "clip_name": "text_encoders", "clip_name1": "text_encoders",
                "clip_name2": "text_encoders", "clip_name3": "text_encoders", "t5_name": "text_encoders",
                "lora_name": "loras", "control_net_name": "controlnet", "style_model_name": "style_models",
                "upscale_model": "upscale_models", "gligen_name": "gligen"}
NOT_MODEL_FOLDERS = {"configs", "custom_nodes", "classifiers"}


class WorkflowError(ValueError):
    """The graph can't be run as given; `problems` holds one message per problem."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def load(path) -> dict:
    """The parsed workflow file; anything that isn't a JSON object is a WorkflowError."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkflowError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WorkflowError(f"{p}: can't read: {e}") from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{p}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(doc, dict):
        raise WorkflowError(f"{p}: expected a JSON object (a ComfyUI workflow), got {type(doc).__name__}")
    return doc


def is_ui(doc: dict) -> bool:
    return isinstance(doc.get("nodes"), list)


def to_api(doc: dict, defs) -> dict:
    """API-format prompt of a loaded workflow of either format."""
    if is_ui(doc):
        try:
            return ui_to_api(doc, defs)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
            if isinstance(e, WorkflowError):
                raise
            raise WorkflowError(f"malformed UI-format workflow ({type(e).__name__}: {e})") from None
    prompt = doc.get("prompt", doc) if isinstance(doc.get("prompt"), dict) else doc
    bad = [k for k, v in prompt.items() if not isinstance(v, dict) or not isinstance(v.get("class_type"), str)
           or not isinstance(v.get("inputs", {}), dict)]
    if bad or not prompt:
        raise WorkflowError("not a ComfyUI workflow: neither UI format (a 'nodes' list) nor API format "
                            f"(node id -> {{class_type, inputs}}); offending keys: {bad[:5]}")
    return prompt


def local_node_defs(class_types=None) -> dict:
    """What ComfyUI's /object_info gives for these node types (server.py's node_info), computed in
    this process from the V3 schema or the V1 INPUT_TYPES. Needs ComfyUI's nodes loaded."""
    import folder_paths
    import nodes
    from comfy_api.internal import _ComfyNodeInternal
    out = {}
    with folder_paths.cache_helper:
        for name in class_types if class_types is not None else list(nodes.NODE_CLASS_MAPPINGS):
            cls = nodes.NODE_CLASS_MAPPINGS.get(name)
            if cls is None:
                continue
            if issubclass(cls, _ComfyNodeInternal):
                out[name] = cls.GET_NODE_INFO_V1()
                continue
            types = cls.INPUT_TYPES()
            out[name] = {"input": types, "input_order": {k: list(v) for k, v in types.items()},
                         "output": list(cls.RETURN_TYPES), "name": name,
                         "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
                         "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    return out


def input_specs(info: dict) -> dict:
    """{input name: (type, options)} over required then optional inputs, in definition order."""
    specs = {}
    inputs, order = info.get("input", {}), info.get("input_order") or {}
    for section in ("required", "optional"):
        group = inputs.get(section) or {}
        for name in order.get(section) or list(group):
            if name in group:
                spec = group[name]
                specs[name] = (spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return specs


def combo_options(spec):
    typ, opts = spec
    if isinstance(typ, list):
        return typ
    if typ == "COMBO":
        return opts.get("options", [])
    return None


def is_widget(spec) -> bool:
    typ, opts = spec
    return (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput")


def has_control(name, spec) -> bool:
    typ, opts = spec
    flag = opts.get("control_after_generate")
    if flag is None and typ == "INT":
        return name in ("seed", "noise_seed")
    return bool(flag)


def widget_default(spec):
    typ, opts = spec
    if "default" in opts:
        return opts["default"]
    options = combo_options(spec)
    if options is not None:
        return options[0] if options else None
    return {"STRING": "", "BOOLEAN": False}.get(typ, max(0, opts.get("min", 0)) if typ in ("INT", "FLOAT") else None)


def _link_fields(link):
    if isinstance(link, dict):
        return tuple(link.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"))
    return tuple(link[:6])


def widget_slots(values, specs) -> dict:
    """{widget input name: its key in a UI node's widgets_values} (an index, or the name when the
    values are a dict), skipping the "control after generate" and upload-button entries."""
    widgets = [n for n, s in specs.items() if is_widget(s)]
    if isinstance(values, dict):
        return {n: n for n in widgets if n in values}
    slots, values = {}, values or []
    surplus, i = len(values) - len(widgets), 0
    for name in widgets:
        if i >= len(values):
            break
        slots[name] = i
        i += 1
        spec = specs[name]
        if surplus > 0 and i < len(values) and has_control(name, spec) and values[i] in CONTROL_VALUES:
            i, surplus = i + 1, surplus - 1
        if surplus > 0 and i < len(values) and any(spec[1].get(f) for f in UPLOAD_FLAGS):
            i, surplus = i + 1, surplus - 1
    return slots


def ui_with_values(ui: dict, prompt: dict, defs) -> dict:
    """A copy of the UI workflow whose widgets show the values a job ran with (its --set, batch
    row and seed), so the workflow embedded in its PNG reloads as that job, not the template."""
    ui = copy.deepcopy(ui)
    for node in ui.get("nodes") or []:
        api = prompt.get(str(node.get("id")))
        values = node.get("widgets_values")
        if api is None or not values or node.get("type") not in defs:
            continue
        for name, key in widget_slots(values, input_specs(defs[node["type"]])).items():
            val = (api.get("inputs") or {}).get(name)
            if name in (api.get("inputs") or {}) and not isinstance(val, list):
                values[key] = val
    return ui


def ui_to_api(ui: dict, defs) -> dict:
    """API-format prompt of a UI-format workflow; raises WorkflowError listing every problem."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {}
    for link in ui.get("links") or []:
        f = _link_fields(link)
        links[f[0]] = f
    subgraphs = {s.get("id") for s in (ui.get("definitions") or {}).get("subgraphs") or []}
    problems, prompt = [], {}

    def source(link_id, want_type, seen=()):
        """(node id, slot) feeding a link, following reroutes and bypassed nodes; None if nothing."""
        link = links.get(link_id)
        if link is None or link_id in seen:
            return None
        origin = nodes.get(link[1])
        if origin is None:
            return None
        kind, mode, seen = origin.get("type"), origin.get("mode", 0), seen + (link_id,)
        if kind == "Reroute":
            ins = origin.get("inputs") or []
            return source(ins[0].get("link"), want_type, seen) if ins else None
        if mode == BYPASSED:
            ins = origin.get("inputs") or []
            for i in [link[2]] + list(range(len(ins))):
                if 0 <= i < len(ins) and ins[i].get("type") == want_type and ins[i].get("link") is not None:
                    return source(ins[i]["link"], want_type, seen)
            return None
        if mode == MUTED or kind in VIRTUAL_NODES:
            return None  # a PrimitiveNode's value is already in the target's widgets_values
        return str(origin["id"]), link[2]

    for node in ui["nodes"]:
        kind, nid = node.get("type"), str(node.get("id"))
        if kind in VIRTUAL_NODES or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        if kind not in defs:
            hint = (" (a subgraph: unpack it in ComfyUI, or save the workflow with Export (API))"
                    if kind in subgraphs else " (not installed?)")
            problems.append(f"node {nid}: unknown node type '{kind}'{hint}")
            continue
        info = defs[kind]
        specs = input_specs(info)
        widgets = [n for n, s in specs.items() if is_widget(s)]
        values = node.get("widgets_values")
        inputs = {name: values[key] for name, key in widget_slots(values, specs).items()}
        for name in widgets:  # saved before the node had this widget: the frontend shows its default
            if name not in inputs and widget_default(specs[name]) is not None:
                inputs[name] = widget_default(specs[name])
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            src = source(slot["link"], slot.get("type"))
            if src is not None:
                inputs[slot["name"]] = [src[0], src[1]]
        prompt[nid] = {"inputs": inputs, "class_type": kind,
                       "_meta": {"title": node.get("title") or info.get("display_name") or kind}}
    if problems:
        raise WorkflowError(problems)
    return prompt


def model_folder(name, value, options, folder_files) -> str | None:
    """The model folder a combo input lists, found by which folder's file list it shows, else by
    the input's usual folder when the value looks like a file. `folder_files(folder)` lists one."""
    hint = MODEL_INPUTS.get(name)
    found = []
    opts = {o for o in options if isinstance(o, str)}
    for folder in folder_files.folders():
        if folder in NOT_MODEL_FOLDERS:
            continue
        files = folder_files(folder)
        if files and set(files) <= opts:
            found.append((folder != hint, -len(files), folder))
    if found:
        return min(found)[2]
    return hint if isinstance(value, str) and "." in value else None


def needed(prompt: dict, defs) -> set:
    """Ids of the nodes that run: output nodes (and unknown ones) and all they link to."""
    todo = [nid for nid, n in prompt.items() if n.get("class_type") not in defs
            or defs[n.get("class_type")].get("output_node")]
    seen = set()
    while todo:
        nid = todo.pop()
        if nid in seen or nid not in prompt:
            continue
        seen.add(nid)
        todo += [v[0] for v in (prompt[nid].get("inputs") or {}).values() if isinstance(v, list) and len(v) == 2]
    return seen


def check(prompt: dict, defs, folder_files, need=None, values: bool = False) -> dict:
    """Problems found before running: {(node id, input or None): message}. Always: unknown node
    types, and in the nodes that run (`need`): malformed links (slot not an output index), model
    files not in their folder, V3 combo values, and numbers ComfyUI would change or not range-check
    (1.5 for an INT, NaN, a bool). With `values` (no local ComfyUI validator to ask): missing
    required inputs, every combo value, numbers and their ranges."""
    problems = {}
    need = needed(prompt, defs) if need is None else need
    for nid, node in prompt.items():
        kind = node.get("class_type")
        info = defs.get(kind)
        if info is None:
            problems[(nid, None)] = f"node {nid}: unknown node type '{kind}' (not installed?)"
            continue
        if nid not in need:
            continue
        where = f"node {nid} ({kind})"
        specs, inputs = input_specs(info), node.get("inputs") or {}
        required = (info.get("input") or {}).get("required") or {}
        for name, val in inputs.items():
            if isinstance(val, list):
                msg = _bad_link(val, prompt, defs)
                if msg:
                    problems[(nid, name)] = f"{where} input {name}: {msg}"
                continue
            spec = specs.get(name)
            msg = _not_a_number(spec, val) if spec else None
            if msg:  # ComfyUI's validator would run 1.5 as seed 1 and let NaN through every range check
                problems[(nid, name)] = f"{where} input {name}: {msg}"
                continue
            options = combo_options(spec) if spec else None
            if options is not None and val not in options:
                folder = model_folder(name, val, options, folder_files)
                if folder:
                    problems[(nid, name)] = (f"{where} input {name}: missing model file {val}: "
                                             f"put it in ComfyUI/models/{folder}/{folder_files.where(folder)}")
                elif (values or spec[0] == "COMBO") and not any(spec[1].get(f) for f in UPLOAD_FLAGS):
                    # ComfyUI's validator checks only list-typed (V1) combos; V3 "COMBO" inputs
                    # (OboroSampler.solver...) pass it with any value and fail mid-run
                    problems[(nid, name)] = f"{where} input {name}: value {val!r} not in {_short(options)}"
            elif values and spec:
                msg = _bad_value(spec, val)
                if msg:
                    problems[(nid, name)] = f"{where} input {name}: {msg}"
        if values:
            for name in required:
                if name not in inputs:
                    problems[(nid, name)] = f"{where}: required input {name} is missing"
    return problems


def _bad_link(val, prompt, defs):
    """Why a [node id, output slot] link is malformed, or None. ComfyUI indexes RETURN_TYPES with
    the slot as given: "0" crashes its validator, and -1 silently picks the last output."""
    if len(val) != 2:
        return f"link {val!r}: expected [node id, output slot]"
    src, slot = val
    if not isinstance(src, str) or src not in prompt:
        return f"linked to node {src!r}, which is not in the graph" + (" (node ids are strings)" if str(src) in prompt
                                                                       else "")
    kind = prompt[src].get("class_type")
    outputs = (defs.get(kind) or {}).get("output")
    if outputs is None:
        return None  # an unknown node type is reported on its own
    allowed = f"node {src} ({kind}) has output slot{'s 0..' + str(len(outputs) - 1) if len(outputs) > 1 else ' 0'}" \
        if outputs else f"node {src} ({kind}) has no outputs"
    if isinstance(slot, bool) or not isinstance(slot, int):
        return f"link {val!r}: output slot {slot!r} is not an integer; {allowed}"
    if not 0 <= slot < len(outputs):
        return f"link {val!r}: output slot {slot} does not exist; {allowed}"
    return None


def _range(opts) -> str:
    lo, hi = opts.get("min"), opts.get("max")
    return f"allowed {'' if lo is None else lo}..{'' if hi is None else hi}"


def _not_a_number(spec, val):
    """INT and FLOAT values ComfyUI's validator would let through changed or unchecked: a bool, a
    fractional INT (int() would cut 1.5 to 1) and NaN or infinity (every range test is False)."""
    typ, opts = spec
    if typ not in ("INT", "FLOAT") or isinstance(val, str):
        return None  # strings: ComfyUI's own int()/float() conversion reports them
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        return f"{val!r} is not a{'n integer' if typ == 'INT' else ' number'} ({typ}, {_range(opts)})"
    if not math.isfinite(val):
        return f"{val} is not a finite number ({typ}, {_range(opts)})"
    if typ == "INT" and not float(val).is_integer():
        return f"{val} is not an integer (INT, {_range(opts)})"
    return None


def _bad_value(spec, val):
    typ, opts = spec
    if typ not in ("INT", "FLOAT"):
        return None
    try:
        num = int(val) if typ == "INT" else float(val)
    except (TypeError, ValueError):
        return f"{val!r} is not a{'n' if typ == 'INT' else ''} {typ}"
    if opts.get("min") is not None and num < opts["min"]:
        return f"{num} is below the minimum {opts['min']}"
    if opts.get("max") is not None and num > opts["max"]:
        return f"{num} is above the maximum {opts['max']}"
    return None


def _short(options):
    return str(options) if len(options) <= 8 else f"{options[:8]}... ({len(options)} options)"
