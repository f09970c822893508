#!/usr/bin/env bash
# Create .venv (if missing) and install mrgd with its test extras. torch==2.13.0 first: that CPU wheel is on
# local disk here, and any other torch would download gigabytes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# CLIP's BPE merges file, for rebuilding the shapes-world tokenizer; its own dependencies would pull a CUDA torch.
python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('open_clip') else 1)" 2>/dev/null \
  || python -m pip install -q --no-deps open_clip_torch
