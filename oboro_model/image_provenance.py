"""Images that say how they were made (issue 24 §3). Pure Python, no ComfyUI import.

An image record names every model file the image came from and what those files say about
themselves (their `oboro_provenance` safetensors metadata: base digest, datasets with their
digests and licences). It travels in two places:

* a PNG text chunk `oboro_provenance` (iTXt, JSON), inserted before the image data of the PNG that
  ComfyUI's own saver wrote (the prompt/workflow chunks and the pixels are left as they are);
* with a signing certificate, inside a C2PA manifest (c2pa-python): a `c2pa.created` action with
  digitalSourceType trainedAlgorithmicMedia, and the record as the assertion `ai.oboro.provenance`.
  The manifest's hard binding covers the pixels and the record chunk, so an edit of either makes
  validation fail.

File digests are "quick" (QUICK_DIGEST): sha256 over the file size, the whole safetensors header
(every tensor's name, dtype, shape and offsets, and the metadata) and three 1 MiB windows (start,
middle, end). Cheap on a 12 GB base (reads ~3 MiB), cached per (path, size, mtime); it tells files
apart and notices a re-export, but it is not a hash of every byte. Dataset digests are not computed
here: they are whatever the model files' `oboro_provenance` carries (provenance.py writes them)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterable, Optional

PROVENANCE_KEY = "oboro_provenance"       # safetensors metadata key AND PNG chunk keyword
RECORD_FORMAT = 1
C2PA_ASSERTION = "ai.oboro.provenance"
TRAINED_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
QUICK_DIGEST = "quick-sha256-v1"          # size + safetensors header + 3 x 1 MiB windows
WINDOW = 1 << 20
REPO = Path(__file__).resolve().parents[1]

# ComfyUI model folders whose files become an image's "models", and the role each plays.
ROLES = {"diffusion_models": "model", "unet": "model", "checkpoints": "model", "text_encoders": "text_encoder",
         "clip": "text_encoder", "vae": "vae", "loras": "lora", "oboro_mask_adapters": "mask_adapter",
         "clip_vision": "clip_vision", "controlnet": "controlnet", "model_patches": "model_patch"}

_digest_cache: dict = {}


def pack_version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M) \
        if (REPO / "pyproject.toml").is_file() else None
    return m.group(1) if m else "unknown"


def _safetensors_header(f, size: int) -> Optional[bytes]:
    if size < 8:
        return None
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n <= 0 or 8 + n > size or n > 100 << 20:
        return None
    head = f.read(n)
    return head if head[:1] == b"{" else None


def quick_digest(path) -> str:
    """QUICK_DIGEST of a file as "quick-sha256-v1:<hex>" (see the module docstring)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _digest_cache:
        return _digest_cache[key]
    h = hashlib.sha256(b"%d\n" % st.st_size)
    with open(path, "rb") as f:
        head = _safetensors_header(f, st.st_size)
        h.update(head or b"")
        for start in sorted({0, max(0, st.st_size // 2 - WINDOW // 2), max(0, st.st_size - WINDOW)}):
            f.seek(start)
            h.update(f.read(WINDOW))
    _digest_cache[key] = out = f"{QUICK_DIGEST}:{h.hexdigest()}"
    return out


def safetensors_metadata(path) -> dict:
    """The `__metadata__` of a .safetensors file ({} for other files or none)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = _safetensors_header(f, path.stat().st_size)
    if head is None:
        return {}
    try:
        meta = json.loads(head).get("__metadata__") or {}
    except (json.JSONDecodeError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def model_provenance(path) -> tuple[Optional[dict], Optional[str]]:
    """(the file's parsed `oboro_provenance`, None) or (None, why there is none)."""
    raw = safetensors_metadata(path).get(PROVENANCE_KEY)
    if raw is None:
        return None, f"no {PROVENANCE_KEY} metadata (not trained by oboro, or trained before issue 24)"
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, f"{PROVENANCE_KEY} metadata is not JSON: {e.msg}"
    if not isinstance(rec, dict):
        return None, f"{PROVENANCE_KEY} metadata is not a JSON object"
    return rec, None


# ---- which model files made an image: the graph upstream of the save node ----------------------

def upstream(prompt: dict, node_id: str) -> list[str]:
    """Every node `node_id` depends on through its links (itself excluded), nearest first."""
    seen, order, todo = {str(node_id)}, [], [str(node_id)]
    while todo:
        nid = todo.pop(0)
        for v in ((prompt.get(nid) or {}).get("inputs") or {}).values():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) and str(v[0]) in prompt \
                    and str(v[0]) not in seen:
                seen.add(str(v[0]))
                order.append(str(v[0]))
                todo.append(str(v[0]))
    return order


STRENGTH_INPUTS = ("strength_model", "strength", "strength_clip")


def model_files(prompt: dict, node_id: str, resolve: Callable[[str, str], Optional[str]],
                folders: Iterable[str] = tuple(ROLES)) -> list[dict]:
    """The model files loaded by nodes upstream of `node_id`: every string input of such a node
    that names a file in one of `folders` (resolve(folder, name) -> path or None, e.g.
    folder_paths.get_full_path). One entry per (node, input), in graph order."""
    out = []
    for nid in upstream(prompt, node_id):
        node = prompt[nid]
        inputs = node.get("inputs") or {}
        for name, value in inputs.items():
            if not isinstance(value, str) or not value or name in ("text", "filename_prefix"):
                continue
            for folder in folders:
                path = resolve(folder, value)
                if path and os.path.isfile(path):
                    entry = {"role": ROLES.get(folder, folder), "folder": folder, "file": value, "node": nid,
                             "class_type": node.get("class_type"), "input": name, "path": str(path)}
                    strength = {k: inputs[k] for k in STRENGTH_INPUTS if isinstance(inputs.get(k), (int, float))}
                    if strength:
                        entry["strength"] = strength
                    out.append(entry)
                    break
    return out


def describe_file(entry: dict) -> dict:
    """An image record's model entry: what the file is, its digest and its own provenance."""
    path = entry.pop("path")
    entry["digest"] = quick_digest(path)
    entry["bytes"] = os.path.getsize(path)
    if path.endswith(".safetensors"):
        rec, why = model_provenance(path)
        entry[PROVENANCE_KEY] = rec
        if why:
            entry["no_provenance"] = why
    else:
        entry[PROVENANCE_KEY] = None
        entry["no_provenance"] = "not a .safetensors file"
    return entry


def image_record(entries: list[dict], generator: str = "ComfyUI") -> dict:
    """The record stored in the PNG chunk and the C2PA assertion."""
    return {"format": RECORD_FORMAT, "kind": "image", "generator": generator, "pack_version": pack_version(),
            "digest_method": QUICK_DIGEST, "models": [describe_file(dict(e)) for e in entries]}


def datasets_of(record: dict) -> list[dict]:
    """[(model entry's file and role) + dataset] for every dataset a record's models name."""
    out = []
    for m in record.get("models") or []:
        for ds in ((m.get(PROVENANCE_KEY) or {}).get("datasets") or []):
            out.append({"model": m.get("file"), "model_role": m.get("role"), **ds})
    return out


# ---- PNG chunk ------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunks(data: bytes):
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        yield pos, kind, data[pos + 8:pos + 8 + n], pos + 12 + n
        pos += 12 + n


def _itxt(key: str, text: str) -> bytes:
    body = key.encode("latin-1") + b"\0\0\0" + b"\0" + b"\0" + text.encode("utf-8")
    return struct.pack(">I", len(body)) + b"iTXt" + body + struct.pack(">I", zlib.crc32(b"iTXt" + body))


def add_png_text(data: bytes, key: str, text: str) -> bytes:
    """The PNG `data` with an iTXt chunk key=text before its first IDAT (nothing else changes;
    an existing chunk with that keyword is replaced)."""
    out, inserted = bytearray(PNG_SIGNATURE), False
    for pos, kind, body, end in _chunks(data):
        if kind in (b"tEXt", b"iTXt") and body.split(b"\0", 1)[0] == key.encode("latin-1"):
            continue
        if kind == b"IDAT" and not inserted:
            out += _itxt(key, text)
            inserted = True
        out += data[pos:end]
    if not inserted:
        raise ValueError("PNG without image data")
    return bytes(out)


def read_png_text(path) -> dict:
    """The text chunks (tEXt / iTXt / zTXt) of a PNG, keyword -> str, without decoding pixels."""
    data, out = Path(path).read_bytes(), {}
    for _, kind, body, _ in _chunks(data):
        if kind == b"tEXt":
            k, _, v = body.partition(b"\0")
            out[k.decode("latin-1")] = v.decode("latin-1")
        elif kind == b"zTXt":
            k, _, v = body.partition(b"\0")
            out[k.decode("latin-1")] = zlib.decompress(v[1:]).decode("latin-1")
        elif kind == b"iTXt":
            k, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _tkey, _, text = rest.partition(b"\0")
            out[k.decode("latin-1")] = (zlib.decompress(text) if compressed else text).decode("utf-8")
        elif kind == b"IEND":
            break
    return out


def read_image_record(path) -> Optional[dict]:
    """The record of an image file (PNG chunk), None when it has none."""
    try:
        raw = read_png_text(path).get(PROVENANCE_KEY)
    except ValueError:
        return None
    try:
        rec = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


# ---- C2PA -----------------------------------------------------------------------------------------

CERT_ENV, KEY_ENV, TSA_ENV = "OBORO_C2PA_CERT", "OBORO_C2PA_KEY", "OBORO_C2PA_TSA"


def signing_files(user_dir: Optional[str] = None) -> Optional[tuple[Path, Path]]:
    """The admin's certificate chain and key (PEM): OBORO_C2PA_CERT / OBORO_C2PA_KEY, else
    <ComfyUI user folder>/oboro/c2pa/cert.pem + key.pem; None when neither is configured. One of
    the two variables without the other, or a named file missing, is an error."""
    cert, key = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
    if cert or key:
        if not (cert and key):
            raise ValueError(f"set both {CERT_ENV} and {KEY_ENV} (PEM certificate chain and private key) or neither")
        pair = Path(cert), Path(key)
    elif user_dir:
        pair = Path(user_dir) / "oboro" / "c2pa" / "cert.pem", Path(user_dir) / "oboro" / "c2pa" / "key.pem"
        if not pair[0].is_file() and not pair[1].is_file():
            return None
    else:
        return None
    for p in pair:
        if not p.is_file():
            raise FileNotFoundError(f"C2PA signing file not found: {p}")
    return pair


def _algorithm(key_pem: bytes) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    key = load_pem_private_key(key_pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {256: "es256", 384: "es384", 521: "es512"}[key.curve.key_size]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    raise ValueError(f"unsupported C2PA signing key type {type(key).__name__}")


def load_signer(cert: Path, key: Path):
    """A c2pa.Signer from PEM files (algorithm from the key type; OBORO_C2PA_TSA: a timestamp URL)."""
    try:
        import c2pa
    except ImportError:
        raise RuntimeError(f"a C2PA certificate is configured ({cert}) but c2pa-python is not installed: "
                           "pip install -r requirements.txt in ComfyUI's environment") from None
    key_pem = Path(key).read_bytes()
    return c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg=_algorithm(key_pem).encode(), sign_cert=Path(cert).read_bytes(),
                                                     private_key=key_pem, ta_url=os.environ.get(TSA_ENV) or None))


def sign_png(data: bytes, record: dict, signer, title: str = "image.png") -> bytes:
    """The PNG with a C2PA manifest: c2pa.created (trainedAlgorithmicMedia) + the record."""
    import io
    import c2pa
    manifest = {
        "claim_generator_info": [{"name": "comfyui-oboro", "version": pack_version()}],
        "title": title, "format": "image/png",
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": [{
                "action": "c2pa.created", "digitalSourceType": TRAINED_MEDIA,
                "softwareAgent": {"name": "comfyui-oboro", "version": pack_version()}}]}},
            {"label": C2PA_ASSERTION, "data": record},
        ]}
    dest = io.BytesIO()
    with c2pa.Builder(manifest) as builder:
        builder.sign(signer, "image/png", io.BytesIO(data), dest)
    return dest.getvalue()


def read_c2pa(path) -> dict:
    """What c2pa's Reader says about a file: {"present": False} or {"present": True, "state",
    "failures": [codes], "untrusted": bool, "actions", "record", "signer"}."""
    import c2pa
    try:
        with open(path, "rb") as f, c2pa.Reader("image/png", f) as reader:
            state = reader.get_validation_state()
            results = reader.get_validation_results() or {}
            manifest = reader.get_active_manifest() or {}
    except c2pa.C2paError as e:
        if "ManifestNotFound" in type(e).__name__ or "not found" in str(e).lower():
            return {"present": False}
        return {"present": True, "state": "Unreadable", "failures": [f"{type(e).__name__}: {e}"], "untrusted": False,
                "actions": [], "record": None, "signer": None}
    active = results.get("activeManifest") or {}
    failures = [f["code"] for f in active.get("failure") or []]
    assertions = {a.get("label"): a.get("data") for a in manifest.get("assertions") or []}
    actions = (assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions") or {}).get("actions") or []
    return {"present": True, "state": state, "failures": failures,
            "untrusted": "signingCredential.untrusted" in failures,
            "actions": actions, "record": assertions.get(C2PA_ASSERTION),
            "signer": (manifest.get("signature_info") or {}).get("common_name")
            or (manifest.get("signature_info") or {}).get("issuer")}
