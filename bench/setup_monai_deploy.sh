#!/usr/bin/env bash
# Separate venv for bench/monai_deploy_compare.py: MONAI Deploy App SDK and what its DICOM
# operators need. Bench-only: nothing here ships with the plugin. Kept apart from .venv because
# the SDK pulls Holoscan (with the CUDA 13 runtime wheels it loads even without a GPU), tritonclient
# and torch.
#
# What it installs (licences as the installed packages declare them): monai-deploy-app-sdk 4.0.0
# (Apache-2.0), holoscan-cu13 and holoscan-cli (Apache-2.0), monai (Apache-2.0), SimpleITK
# (Apache-2.0), tritonclient (BSD-3-Clause) and cupy (MIT) pulled by the SDK, torch (CPU build;
# BSD-3-Clause with Apache-2.0 parts), nvidia-cuda-runtime (NVIDIA's proprietary CUDA licence: a
# reason more to keep all of this out of what the plugin ships), and highdicom (MIT), pydicom
# (MIT), numpy (BSD-3-Clause), scipy (BSD-3-Clause) and onnxruntime (MIT) pinned to exactly the
# versions installed in .venv, so that both sides of the comparison run the same DICOM code and
# the same model runtime.
# Idempotent; re-installs when .venv's versions change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-monai-deploy
SDK_VERSION=4.0.0
MONAI_VERSION=1.6.1
[ -x .venv/bin/python ] || { echo "run scripts/install.sh first (.venv gives the versions to pin)"; exit 1; }
pins=$(.venv/bin/python -c 'import highdicom, pydicom, numpy, scipy, onnxruntime
print(f"highdicom=={highdicom.__version__} pydicom=={pydicom.__version__} numpy=={numpy.__version__}",
      f"scipy=={scipy.__version__} onnxruntime=={onnxruntime.__version__}")')
stamp="$VENV/.installed-$SDK_VERSION-$(echo "$pins" | tr ' =' '_-')"
if [ -f "$stamp" ]; then
  echo "monai-deploy venv: ok ($pins)"; exit 0
fi
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
rm -f "$VENV"/.installed-*
pip=("$VENV/bin/pip" install -q --disable-pip-version-check)
# CPU torch: the local wheel when the machine has one, else PyPI's (the CPU build on Python 3.11
# here; on other Pythons PyPI would give the CUDA build).
wheel=$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
if [ -n "$wheel" ]; then
  "${pip[@]}" "$wheel"
else
  "${pip[@]}" torch
fi
# shellcheck disable=SC2086  # $pins is five requirement words
"${pip[@]}" "monai-deploy-app-sdk==$SDK_VERSION" "monai==$MONAI_VERSION" SimpleITK nvidia-cuda-runtime $pins
# The same DICOM stack on both sides, or the comparison measures library versions.
"$VENV/bin/python" -c 'import highdicom, pydicom, numpy, scipy, onnxruntime, sys
got = (f"highdicom=={highdicom.__version__} pydicom=={pydicom.__version__} numpy=={numpy.__version__} "
       f"scipy=={scipy.__version__} onnxruntime=={onnxruntime.__version__}")
sys.exit(0 if got == sys.argv[1] else f"monai-deploy venv has {got}, .venv has {sys.argv[1]}")' "$pins"
touch "$stamp"
echo "monai-deploy venv: installed in $VENV ($pins)"
