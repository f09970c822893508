#!/usr/bin/env bash
# Create .venv (if missing) and install mrgd with its test and web extras (and, as root, Chromium). torch==2.13.0
# first: that CPU wheel is on local disk here, and any other torch would download gigabytes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,web]"
# The web UI's browser tests drive Debian's Chromium (never a downloaded browser). As root on Debian/Ubuntu, install
# it; elsewhere those tests skip and say why.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -q && apt-get install -y -q chromium; } >/dev/null \
    || echo "setup.sh: could not install chromium; the browser tests will skip" >&2
fi
# CLIP's BPE merges file, for rebuilding the shapes-world tokenizer; its own dependencies would pull a CUDA torch.
python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('open_clip') else 1)" 2>/dev/null \
  || python -m pip install -q --no-deps open_clip_torch
