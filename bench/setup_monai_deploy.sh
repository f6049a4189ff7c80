#!/usr/bin/env bash
# Separate venv for bench/monai_deploy_compare.py: MONAI Deploy App SDK (Apache-2.0) and what
# its DICOM operators need. Kept apart from .venv: the SDK pulls Holoscan, CUDA runtime
# wheels and torch, none of which the plugin ships with. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-monai-deploy
SDK_VERSION=4.0.0
if [ -f "$VENV/.installed-$SDK_VERSION" ]; then
  echo "monai-deploy venv: ok"; exit 0
fi
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
pip=("$VENV/bin/pip" install -q --disable-pip-version-check)
# CPU torch: a local wheel when the machine has one, else PyTorch's CPU index.
wheel=$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
if [ -n "$wheel" ]; then
  "${pip[@]}" "$wheel"
else
  "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
fi
# Holoscan (the SDK's operator base classes) loads the CUDA 13 runtime even without a GPU.
"${pip[@]}" "monai-deploy-app-sdk==$SDK_VERSION" monai highdicom pydicom SimpleITK nvidia-cuda-runtime
touch "$VENV/.installed-$SDK_VERSION"
echo "monai-deploy venv: installed in $VENV"
