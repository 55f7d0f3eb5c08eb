"""`oboro-provenance IMAGE [--dataset DIR] [--near-copies DIR]`: the chain image -> models ->
datasets -> licences of an image saved by OboroSaveImage, its C2PA manifest checked with c2pa's
Reader, and optionally a dataset folder's digest recomputed and compared, and the image's nearest
training images. No ComfyUI needed.

Exit codes: 0 all checks passed; 1 a check failed (no provenance record, C2PA manifest invalid,
--dataset matching no dataset of the image's models, a near copy found); 2 bad arguments."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import image_provenance as ip

UNTRUSTED = "signingCredential.untrusted"


def dataset_digest(folder) -> str:
    """The dataset digest as training records it (provenance.dataset_digest_of_folder, §1-§2)."""
    try:
        from .provenance import dataset_digest_of_folder
    except ImportError as e:
        raise RuntimeError("this version has no oboro_model.provenance.dataset_digest_of_folder, so a dataset "
                           f"digest cannot be recomputed ({e})") from None
    d = dataset_digest_of_folder(folder)
    return d["digest"] if isinstance(d, dict) else str(d)


def licences(ds: dict) -> str:
    lic = ds.get("licences") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(lic.items(), key=lambda kv: (-kv[1], kv[0]))) or "none recorded"


def describe(record: dict, say) -> None:
    models = record.get("models") or []
    say(f"  provenance record format {record.get('format')} (pack {record.get('pack_version')}), "
        f"{len(models)} model file(s), digests {record.get('digest_method')}")
    for m in models:
        strength = " ".join(f"{k} {v}" for k, v in (m.get("strength") or {}).items())
        say(f"  {m.get('role', '?'):<12} {m.get('file')}  {strength + '  ' if strength else ''}{m.get('digest')}"
            f"  (node {m.get('node')} {m.get('class_type')})")
        prov = m.get(ip.PROVENANCE_KEY)
        if not prov:
            say(f"               no training record: {m.get('no_provenance', 'none')}")
            continue
        say(f"               trained as {prov.get('kind')} on base {prov.get('base_digest')}, settings "
            f"{prov.get('settings_digest')}, pack {prov.get('pack_version')}")
        for ds in prov.get("datasets") or []:
            say(f"               dataset {ds.get('role', '?'):<10} {ds.get('digest') or 'digest unknown (old cache)'}  "
                f"{ds.get('items')} item(s)  "
                f"licences: {licences(ds)}")


def check_c2pa(path, record, say) -> bool:
    try:
        c = ip.read_c2pa(path)
    except ImportError:
        say("c2pa: not checked (c2pa-python is not installed: pip install c2pa-python)")
        return True
    if not c["present"]:
        say("c2pa: no manifest (the image was saved unsigned, or the manifest was stripped)")
        return True
    real = [f for f in c["failures"] if f != UNTRUSTED]
    ok = c["state"] in ("Valid", "Trusted") and not real
    trust = ("certificate not on a C2PA trust list (expected for a studio's own CA)" if c["untrusted"]
             else "certificate trusted")
    say(f"c2pa: {'VALID' if ok else 'INVALID'} ({c['state']}), signer {c['signer']!r}, {trust}")
    for f in real:
        say(f"      failure: {f}")
    for a in c["actions"]:
        say(f"      action {a.get('action')}, source type {str(a.get('digitalSourceType', '')).rsplit('/', 1)[-1]}")
    if c["record"] is None:
        say(f"      no {ip.C2PA_ASSERTION} assertion")
    elif record is not None:
        same = c["record"] == record
        say(f"      assertion {ip.C2PA_ASSERTION} {'matches' if same else 'DIFFERS FROM'} the PNG record")
        ok = ok and same
    return ok


def check_dataset(folder, record, say) -> bool:
    try:
        digest = dataset_digest(folder)
    except (RuntimeError, OSError, ValueError) as e:
        say(f"--dataset {folder}: cannot recompute: {e}")
        return False
    hits = [d for d in ip.datasets_of(record or {}) if d.get("digest") == digest]
    if hits:
        for d in hits:
            say(f"--dataset {folder}: digest {digest} MATCHES the {d.get('role')} dataset of {d.get('model_role')} "
                f"{d.get('model')}")
        return True
    say(f"--dataset {folder}: digest {digest} matches NO dataset of this image's models "
        f"({len(ip.datasets_of(record or {}))} recorded)")
    return False


def check_near(path, folder, sheet, threshold, say) -> bool:
    from PIL import Image
    from . import near_copies
    img = Image.open(path).convert("RGB")
    report = near_copies.check(folder, [img], threshold=threshold)
    row = report["images"][0]
    verdict = f"NEAR COPY of {row['file']} ({row['rule']} rule)" if row["near_copy"] else "no near copy"
    say(f"--near-copies {folder}: {verdict} (hash embedding, {near_copies.describe_rule(report['rule'])}; "
        f"{report['training_images']} training images)")
    say("      distance  its NN  ratio  limit   training image (NN: its distance to its nearest other one)")
    for n in row["nearest"]:  # train_nn and ratio are None when the dataset holds one image
        nn, ratio = ("-" if v is None else f"{v:.{k}f}" for v, k in ((n["train_nn"], 4), (n["ratio"], 3)))
        say(f"      {n['distance']:.4f}  {nn:>6}  {ratio:>5}  {n['limit']:.4f}  {n['file']}"
            f"{'  NEAR COPY' if n['near_copy'] else ''}")
    if sheet:
        near_copies.contact_sheet(folder, [img], report).save(sheet)
        say(f"      contact sheet: {sheet}")
    return not row["near_copy"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="oboro-provenance", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="a PNG saved by OboroSaveImage")
    p.add_argument("--dataset", action="append", default=[], metavar="DIR",
                   help="recompute this dataset folder's digest and say whether the image's models name it")
    p.add_argument("--near-copies", metavar="DIR", help="the nearest training images in DIR; fails on a near copy")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="near-copy cosine distance (0: the automatic rule, relative to the training set's own "
                        "nearest-neighbour distances; docs/provenance.md)")
    p.add_argument("--sheet", metavar="PNG", help="with --near-copies: write the contact sheet here")
    p.add_argument("--json", action="store_true", help="print the record as JSON instead of the chain")
    a = p.parse_args(argv)
    path = Path(a.image)
    if not path.is_file():
        print(f"oboro-provenance: {path}: no such file", file=sys.stderr)
        return 2
    say = print
    record = ip.read_image_record(path)
    if a.json:
        print(json.dumps(record, indent=1, ensure_ascii=False))
    else:
        say(f"image: {path}")
        if record is None:
            say(f"  NO PROVENANCE: no {ip.PROVENANCE_KEY} record (not saved by OboroSaveImage, or re-encoded "
                "without its metadata)")
        else:
            describe(record, say)
    ok = record is not None
    ok = check_c2pa(path, record, say) and ok
    for d in a.dataset:
        ok = check_dataset(d, record, say) and ok
    if a.near_copies:
        ok = check_near(path, a.near_copies, a.sheet, a.threshold, say) and ok
    return 0 if ok else 1
