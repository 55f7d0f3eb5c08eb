#!/usr/bin/env python3
"""Regenerate the training templates (example_workflows/oboro_{lora_training,full_finetune}.json and
their API twins) on the trainer + options node face from the node definitions, keeping the loaders,
cache, save nodes and note of the current files. The copies they were made from (the all-in-one
node face, as saved by earlier versions) live in tests/fixtures/legacy_workflows/ and must keep
running. Usage: .venv/bin/python scripts/make_training_templates.py"""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import oboro_env  # noqa: E402

oboro_env.add_comfy_to_path()
from comfy.cli_args import args  # noqa: E402

args.cpu = True
oboro_env.import_oboro()
from oboro.runner import convert, embedded  # noqa: E402

TYPES = {"INT": "INT", "FLOAT": "FLOAT", "STRING": "STRING", "BOOLEAN": "BOOLEAN"}


def ui_node(defs, node_type, nid, pos, size, values: dict, links_in: dict, title=None):
    """A UI-format node of `node_type` with widget `values` (others: defaults) and input links."""
    specs = convert.input_specs(defs[node_type])
    inputs, widgets = [], []
    for name, spec in specs.items():
        typ = spec[0] if isinstance(spec[0], str) else "COMBO"
        slot = {"localized_name": name, "name": name, "type": typ, "link": links_in.get(name)}
        if convert.is_widget(spec):
            slot["widget"] = {"name": name}
            widgets.append(values.get(name, convert.widget_default(spec)))
        elif name in defs[node_type]["input"].get("optional", {}):
            slot["shape"] = 7
        inputs.append(slot)
    outs = defs[node_type]["output"]
    names = defs[node_type].get("output_name", outs)
    node = {"id": nid, "type": node_type, "pos": pos, "size": size, "flags": {}, "order": nid, "mode": 0,
            "inputs": inputs, "outputs": [{"localized_name": n, "name": n, "type": t, "slot_index": i, "links": []}
                                          for i, (n, t) in enumerate(zip(names, outs))],
            "properties": {"Node name for S&R": node_type}, "widgets_values": widgets}
    if title:
        node["title"] = title
    return node


def keep_current(doc: dict, current_path: Path, rebuilt: tuple) -> None:
    """The nodes this script does not rebuild (loaders, cache, save nodes, note) keep what the
    current file has: widget values added since the legacy copy (e.g. the cache's require_licence),
    model metadata (properties.models, read by the frontend's missing-models dialog), notes' text."""
    current = {(n["id"], n["type"]): n for n in json.loads(current_path.read_text())["nodes"]}
    for n in doc["nodes"]:
        cur = current.get((n["id"], n["type"]))
        if cur is not None and n["type"] not in rebuilt:
            n["widgets_values"], n["properties"] = cur["widgets_values"], cur.get("properties", {})


def convert_template(name: str, kind: str, defs) -> None:
    path = REPO / "tests" / "fixtures" / "legacy_workflows" / f"{name}.json"
    doc = json.loads(path.read_text())
    api = convert.to_api(doc, defs)
    old_id = next(k for k, v in api.items() if v["class_type"] in ("OboroTrainLoRA", "OboroTrainFull"))
    old = api[old_id]["inputs"]
    old_node = next(n for n in doc["nodes"] if str(n["id"]) == old_id)
    trainer = "OboroLoRATrainer" if kind == "lora" else "OboroFullTrainer"
    opt_id = max(n["id"] for n in doc["nodes"]) + 1
    link_id = doc["last_link_id"] + 1
    links = [ln for ln in doc["links"] if ln[3] != int(old_id)]
    incoming = {}
    for ln in doc["links"]:
        if ln[3] == int(old_id):
            incoming[old_node["inputs"][ln[4]]["name"]] = ln
    new_specs = list(convert.input_specs(defs[trainer]))
    links_in = {}
    for slot, ln in incoming.items():
        links_in[slot] = ln[0]
        links.append([ln[0], ln[1], ln[2], int(old_id), new_specs.index(slot), ln[5]])
    links_in["options"] = link_id
    links.append([link_id, opt_id, 0, int(old_id), new_specs.index("options"), "OBORO_TRAINING_OPTIONS"])
    values = {k: v for k, v in old.items() if not isinstance(v, list)}
    values["resume_from"] = "latest"
    x, y = old_node["pos"]
    node = ui_node(defs, trainer, int(old_id), [x, y + 420], [380, 520], values, links_in)
    for out, src in zip(node["outputs"], old_node["outputs"]):
        out["links"] = src.get("links", [])
    opts = ui_node(defs, "OboroTrainingOptions", opt_id, [x - 420, y + 620], [380, 760], values, {})
    opts["outputs"][0]["links"] = [link_id]
    doc["nodes"] = [node if n["id"] == int(old_id) else n for n in doc["nodes"]] + [opts]
    doc["links"], doc["last_link_id"], doc["last_node_id"] = links, link_id, opt_id
    keep_current(doc, REPO / "example_workflows" / f"{name}.json", (trainer, "OboroTrainingOptions"))
    (REPO / "example_workflows" / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (REPO / "workflows" / "api" / f"{name}.api.json").write_text(json.dumps(convert.to_api(doc, defs), indent=1) + "\n")


if __name__ == "__main__":
    embedded.start(cpu=True)
    defs = convert.local_node_defs()
    convert_template("oboro_lora_training", "lora", defs)
    convert_template("oboro_full_finetune", "full", defs)
    print("wrote the training templates and their API twins")
