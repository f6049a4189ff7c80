#!/usr/bin/env bash
# Build TensorRT engines (model.plan) from the committed ONNX models, on a machine with an NVIDIA
# GPU and TensorRT (`trtexec`, e.g. inside nvcr.io/nvidia/tritonserver:<ver>-py3 or
# nvcr.io/nvidia/tensorrt). Engines are specific to the GPU model and the TensorRT version: build
# them on the machine (or the same GPU type and container) that serves them.
#
#   scripts/build_tensorrt.sh [model ...]        default: ct_lung mr_brain
#
# For each model it writes triton_models/<model>/<version>/model.plan (FP16) and
# triton_models/<model>/configs/trt.pbtxt (platform tensorrt_plan, KIND_GPU); start Triton with
# --model-config-name=trt to serve the plans, or =gpu for ONNX Runtime with the TensorRT
# execution accelerator (no prebuilt engine needed). Exits 2, saying why, without a GPU or trtexec.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "build_tensorrt: no NVIDIA GPU here (nvidia-smi missing or failing); nothing built" >&2
  exit 2
fi
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
if [ ! -x "$TRTEXEC" ]; then
  echo "build_tensorrt: trtexec not found (set TRTEXEC or run inside a TensorRT/Triton container)" >&2
  exit 2
fi

models=("$@")
[ ${#models[@]} -gt 0 ] || models=(ct_lung mr_brain)
for m in "${models[@]}"; do
  dir="triton_models/$m"
  version=$(ls -1 "$dir" | grep -E '^[0-9]+$' | sort -n | tail -1)
  onnx="$dir/$version/model.onnx"
  [ -f "$onnx" ] || { echo "build_tensorrt: $onnx missing" >&2; exit 1; }
  # Input name and per-sample dims from config.pbtxt (the first input; batch axis added here).
  name=$(grep -m1 -A3 '^input' "$dir/config.pbtxt" | sed -n 's/.*name: *"\([^"]*\)".*/\1/p' | head -1)
  dims=$(grep -m1 -A6 '^input' "$dir/config.pbtxt" | sed -n 's/.*dims: *\[\(.*\)\].*/\1/p' | head -1 | tr -d ' ')
  max_batch=$(sed -n 's/^max_batch_size: *\([0-9]*\).*/\1/p' "$dir/config.pbtxt")
  shape_of() { echo "$1x${dims//,/x}"; }
  echo "== $m version $version: input $name [$dims], batch 1..$max_batch, FP16"
  "$TRTEXEC" --onnx="$onnx" --saveEngine="$dir/$version/model.plan" --fp16 \
    --minShapes="$name:$(shape_of 1)" --optShapes="$name:$(shape_of 1)" \
    --maxShapes="$name:$(shape_of "$max_batch")" --skipInference
  sed -e 's/^platform: .*/platform: "tensorrt_plan"/' \
      -e '/^optimization/,$d' \
      -e 's/KIND_CPU/KIND_GPU/' "$dir/config.pbtxt" > "$dir/configs/trt.pbtxt"
  grep -q KIND_GPU "$dir/configs/trt.pbtxt" || echo 'instance_group [ { kind: KIND_GPU, count: 1 } ]' >> "$dir/configs/trt.pbtxt"
  echo "   wrote $dir/$version/model.plan and $dir/configs/trt.pbtxt"
done
