"""The frontend's text for every node of the extension matches the nodes themselves.

ComfyUI's frontend shows locales/<lang>/nodeDefs.json over what the Python schema says, and the
help panel shows web/docs/<NodeId>.md (web/docs/<NodeId>/<lang>.md in another language). A stale
locale entry therefore misleads (an input that no longer exists, a tooltip that says something the
node no longer does), and a missing one leaves a node half translated. Checked for every node of
OboroExtension().get_node_list(), against the schema ComfyUI registered (INPUT_TYPES, hidden inputs
aside): an entry in en and ja; every input a locale names exists; every input has an entry in both;
the English tooltips (inputs and outputs) and descriptions are the Python ones, word for word; a
Japanese tooltip wherever the node has one; and both help pages exist."""
from __future__ import annotations

import asyncio
import importlib
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LANGS = ("en", "ja")


def node_list() -> list:
    ext = importlib.import_module("oboro.nodes").OboroExtension()
    return asyncio.run(ext.get_node_list())


NODE_LIST = node_list()
NODES = {cls.define_schema().node_id: cls for cls in NODE_LIST}


@pytest.fixture(scope="module")
def registered(comfy):
    """node id -> the class ComfyUI registered for it (the embedded ComfyUI loaded our extension)."""
    import nodes as comfy_nodes
    return comfy_nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def locales():
    return {lang: json.loads((REPO / "locales" / lang / "nodeDefs.json").read_text(encoding="utf-8"))
            for lang in LANGS}


def schema_inputs(cls) -> dict:
    """input name -> its tooltip (None without one), as INPUT_TYPES gives them to the frontend."""
    spec, out = cls.INPUT_TYPES(), {}
    for section in ("required", "optional"):
        for name, (_typ, *rest) in spec.get(section, {}).items():
            out[name] = (rest[0] if rest else {}).get("tooltip")
    return out


def test_every_node_is_listed_once():
    ids = [cls.define_schema().node_id for cls in NODE_LIST]
    assert len(ids) == len(set(ids)), f"node ids listed twice: {sorted(i for i in set(ids) if ids.count(i) > 1)}"


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_locale_entries_match_the_schema(comfy, registered, locales, node_id):
    assert node_id in registered, f"{node_id} is in get_node_list() but not registered with ComfyUI"
    cls = registered[node_id]
    inputs = schema_inputs(cls)
    schema = NODES[node_id].define_schema()
    problems = []
    for lang in LANGS:
        entry = locales[lang].get(node_id)
        if entry is None:
            problems.append(f"locales/{lang}: no entry for {node_id}")
            continue
        if not (entry.get("display_name") or "").strip():
            problems.append(f"locales/{lang} {node_id}: no display_name")
        named = entry.get("inputs", {})
        for name in sorted(set(named) - set(inputs)):
            problems.append(f"locales/{lang} {node_id}: input {name!r} is not an input of the node")
        for name, tip in inputs.items():
            e = named.get(name)
            if e is None:
                problems.append(f"locales/{lang} {node_id}: no entry for input {name!r}")
                continue
            if not (e.get("name") or "").strip():
                problems.append(f"locales/{lang} {node_id}.{name}: no name")
            if lang == "en" and e.get("tooltip") != tip:
                problems.append(f"locales/en {node_id}.{name}: tooltip {e.get('tooltip')!r} != the node's {tip!r}")
            if lang != "en" and tip and not (e.get("tooltip") or "").strip():
                problems.append(f"locales/{lang} {node_id}.{name}: no tooltip (the node has one)")
        outs = entry.get("outputs", {})
        if len(outs) != len(schema.outputs) or set(outs) != {str(i) for i in range(len(schema.outputs))}:
            problems.append(f"locales/{lang} {node_id}: outputs {sorted(outs)} != the node's {len(schema.outputs)}")
        for i, out in enumerate(schema.outputs):
            e = outs.get(str(i), {})
            if lang == "en" and e.get("tooltip") != out.tooltip:
                problems.append(f"locales/en {node_id} output {i}: tooltip {e.get('tooltip')!r} != {out.tooltip!r}")
            if lang != "en" and out.tooltip and not (e.get("tooltip") or "").strip():
                problems.append(f"locales/{lang} {node_id} output {i}: no tooltip (the node has one)")
        if lang == "en" and entry.get("description") != schema.description:
            problems.append(f"locales/en {node_id}: description {entry.get('description')!r} != the node's "
                            f"{schema.description!r}")
        if lang != "en" and schema.description and not (entry.get("description") or "").strip():
            problems.append(f"locales/{lang} {node_id}: no description")
    assert not problems, "\n".join(problems)


def test_no_locale_entry_without_a_node(locales):
    for lang in LANGS:
        stale = sorted(set(locales[lang]) - set(NODES))
        assert not stale, f"locales/{lang}/nodeDefs.json has entries for nodes that do not exist: {stale}"


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_help_pages_exist(node_id):
    for page in (REPO / "web" / "docs" / f"{node_id}.md", REPO / "web" / "docs" / node_id / "ja.md"):
        assert page.is_file(), f"no help page {page.relative_to(REPO)}"
        text = page.read_text(encoding="utf-8")
        assert text.startswith("# ") and len(text.splitlines()) > 3, f"{page.relative_to(REPO)}: no title or no text"
        assert "Being built" not in text and "開発中" not in text, f"{page.relative_to(REPO)} still says it is being built"


def test_every_template_has_a_title_and_description():
    """The template browser's cards show locales/<lang>/main.json "oboroTemplates" (web/js/oboro_locale.js):
    one entry per example_workflows/*.json in each language, each a title and a one-line description,
    free of vue-i18n's message syntax (braces, @, |) that would garble them."""
    templates = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
    for lang in LANGS:
        table = json.loads((REPO / "locales" / lang / "main.json").read_text(encoding="utf-8"))["oboroTemplates"]
        assert sorted(table) == templates, f"locales/{lang}/main.json oboroTemplates: {sorted(table)} != {templates}"
        for name, entry in table.items():
            assert set(entry) == {"title", "description"}, f"locales/{lang} oboroTemplates.{name}: {sorted(entry)}"
            for key, text in entry.items():
                assert text.strip() and "\n" not in text, f"locales/{lang} oboroTemplates.{name}.{key}: {text!r}"
                assert not set(text) & set("{}@|"), f"locales/{lang} oboroTemplates.{name}.{key}: {text!r}"
