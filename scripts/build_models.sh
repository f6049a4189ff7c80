#!/usr/bin/env bash
# Rebuild the model files from their scripts (only needed when they are absent).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-train/bin/python ]; then
  /usr/bin/python3 -m venv .venv-train
  # torch first and pinned, so nothing pulls a CUDA build from the registry.
  .venv-train/bin/pip install -q --disable-pip-version-check torch==2.13.0
  .venv-train/bin/pip install -q --disable-pip-version-check -r triton_models/ct_lung/requirements-train.txt
fi
.venv-train/bin/python triton_models/ct_lung/build_model.py
