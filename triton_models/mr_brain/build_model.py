# SPDX-License-Identifier: AGPL-3.0-or-later
"""Convert the pretrained brainchop ``mindgrab`` brain-extraction MeshNet to ONNX.

Run from the repository root with the training environment (see README.md)::

    .venv-train/bin/python triton_models/mr_brain/build_model.py [--check-mr]

Steps:

1. read ``model.json`` / ``model.bin`` (TF.js layers model, MIT, brainchop) with NumPy only
   (``reference.read_layers``: manifest names, shapes, dtypes and offsets, total size checked);
2. build the same network in PyTorch, channels first: 25 dilated 3x3x3 convolutions (15
   filters, no bias), instance normalisation without affine parameters where the layer name
   ends in ``_gn``, exact (erf) GELU, then a 1x1x1 convolution with bias to 2 logits and a
   softmax over the channels; kernels ``[kd, kh, kw, in, out]`` -> ``[out, in, kd, kh, kw]``;
3. export ONNX opset 17 (input ``image`` ``[N, 1, D, H, W]``, output ``probabilities``
   ``[N, 2, D, H, W]``, dynamic batch and spatial axes) to ``1/model.onnx``;
4. compare onnxruntime on the exported file with the independent NumPy forward pass of
   ``reference.py`` (channels last, kernels as stored) on a random 1x1x24x24x24 input;
5. with ``--check-mr``: brain-extract one temporal position of the EPI series ``mr_0004``
   (see README.md) at 1 mm in a 256^3 grid, for each of the 8 axis flips, and report the
   brain volume and run time.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import reference  # noqa: E402

ONNX_PATH = HERE / "1" / "model.onnx"
OPSET = 17
CHECK_SHAPE = (1, 1, 24, 24, 24)
CHECK_SEED = 20240601
CHECK_TOL = 1e-4
MR_SERIES = HERE.parents[2] / "shared" / "data" / "mr" / "nih-ge-epi" / "mr_0004"  # ../shared
GRID = 256


# --------------------------------------------------------------------------------------------
# PyTorch model


def build_torch_model(layers: list[reference.ConvLayer]):
    import torch
    from torch import nn

    class MeshNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            blocks: list[nn.Module] = []
            for layer in layers:
                kd, kh, kw, cin, cout = layer.kernel.shape
                if not kd == kh == kw:
                    raise ValueError(f"non-cubic kernel in {layer.name}")
                pad = (kd - 1) * layer.dilation // 2
                conv = nn.Conv3d(
                    cin,
                    cout,
                    kernel_size=kd,
                    dilation=layer.dilation,
                    padding=pad,
                    bias=layer.bias is not None,
                )
                with torch.no_grad():
                    w = np.ascontiguousarray(layer.kernel.transpose(4, 3, 0, 1, 2))
                    conv.weight.copy_(torch.from_numpy(w))
                    if layer.bias is not None:
                        conv.bias.copy_(torch.from_numpy(layer.bias.copy()))
                blocks.append(conv)
                if layer.instance_norm:
                    blocks.append(nn.InstanceNorm3d(cout, eps=reference.NORM_EPS, affine=False))
                if layer.gelu:
                    blocks.append(nn.GELU(approximate="none"))
            self.body = nn.Sequential(*blocks)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.body(image), dim=1)

    return MeshNet().eval()


def export_onnx(model, path: Path) -> None:
    import onnx
    import torch

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros((1, 1, 32, 32, 32), dtype=torch.float32)
    spatial = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    torch.onnx.export(
        model,
        (x,),
        str(path),
        opset_version=OPSET,
        input_names=["image"],
        output_names=["probabilities"],
        dynamic_axes={"image": spatial, "probabilities": spatial},
        dynamo=False,
    )
    m = onnx.load(str(path))
    m.producer_name = "orthanc-ai triton_models/mr_brain/build_model.py"
    m.doc_string = (
        "brainchop mindgrab MeshNet (MIT, see shared/models/brainchop-mindgrab/LICENSE); "
        "input image [N,1,D,H,W] 1 mm isotropic, min-max scaled to [0,1]; "
        "output probabilities [N,2,D,H,W] (background, brain)"
    )
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def numeric_check(path: Path, layers: list[reference.ConvLayer]) -> float:
    """Max |onnxruntime - NumPy reference| on a random input (both probabilities)."""
    rng = np.random.default_rng(CHECK_SEED)
    x = rng.random(CHECK_SHAPE, dtype=np.float32)
    got = _session(path).run(["probabilities"], {"image": x})[0]
    want = reference.forward(x, layers)
    if got.shape != want.shape:
        raise AssertionError(f"shape {got.shape} != {want.shape}")
    return float(np.max(np.abs(got.astype(np.float64) - want)))


# --------------------------------------------------------------------------------------------
# Real-data check (--check-mr)


def load_epi_volume(
    series: Path, temporal_position: int = 1
) -> tuple[NDArray[np.float32], tuple[float, ...]]:
    """One temporal position of a multi-volume axial series as (slice, row, col) and its spacing.

    The series has no TemporalPositionIdentifier and one AcquisitionNumber, so the slices are
    grouped by their position along the slice normal and, at each position, the n-th instance
    (by InstanceNumber) belongs to temporal position n.
    """
    import pydicom

    ds = [pydicom.dcmread(str(f)) for f in sorted(series.glob("*.dcm"))]
    iop = np.asarray(ds[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    by_pos: dict[float, list] = {}
    for d in ds:
        key = round(float(np.dot(normal, np.asarray(d.ImagePositionPatient, dtype=np.float64))), 3)
        by_pos.setdefault(key, []).append(d)
    positions = sorted(by_pos)
    counts = {len(v) for v in by_pos.values()}
    if len(counts) != 1:
        raise ValueError(f"unequal number of instances per slice position: {counts}")
    slices = []
    for p in positions:
        d = sorted(by_pos[p], key=lambda d: int(d.InstanceNumber))[temporal_position - 1]
        img = d.pixel_array.astype(np.float32)
        img = img * float(getattr(d, "RescaleSlope", 1) or 1) + float(getattr(d, "RescaleIntercept", 0) or 0)
        slices.append(img)
    vol = np.stack(slices)
    dz = float(np.median(np.diff(positions))) if len(positions) > 1 else float(ds[0].SliceThickness)
    row, col = (float(v) for v in ds[0].PixelSpacing)
    print(
        f"series {series.name}: {len(ds)} instances = {counts.pop()} temporal positions x "
        f"{len(positions)} slices of {vol.shape[1]}x{vol.shape[2]}; spacing (slice, row, col) = "
        f"({dz:g}, {row:g}, {col:g}) mm; using temporal position {temporal_position}"
    )
    return vol, (dz, row, col)


def conform(vol: NDArray[np.float32], spacing: tuple[float, ...], grid: int = GRID):
    """Resample to 1 mm and centre in a grid^3 cube, keeping the array axes; scale to [0, 1].

    Returns the cube and the affine map cube index -> original index (per axis: scale, offset).
    """
    from scipy import ndimage as ndi

    spacing_a = np.asarray(spacing, dtype=np.float64)
    shape = np.asarray(vol.shape, dtype=np.float64)
    # cube voxel c has its centre at (c - (grid-1)/2) mm from the volume's centre
    centre = (shape - 1) / 2
    scale = 1.0 / spacing_a
    offset = centre - (grid - 1) / 2 * scale
    lo, hi = float(vol.min()), float(vol.max())
    scaled = (vol - lo) / max(hi - lo, 1e-12)
    cube = ndi.affine_transform(
        scaled, scale, offset=offset, output_shape=(grid,) * 3, order=1, mode="constant", cval=0.0
    )
    return cube.astype(np.float32), scale, offset


def to_original(mask_cube: NDArray[np.bool_], shape: tuple[int, ...], scale, offset) -> NDArray[np.bool_]:
    """Sample a cube mask at the original voxel centres (nearest neighbour)."""
    from scipy import ndimage as ndi

    inv_scale = 1.0 / np.asarray(scale)
    inv_offset = -np.asarray(offset) * inv_scale
    out = ndi.affine_transform(
        mask_cube.astype(np.float32), inv_scale, offset=inv_offset, output_shape=shape, order=0, cval=0.0
    )
    return out > 0.5


def largest_component(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


# Orientations tried by --check-mr: name -> (axis permutation, axes flipped after permuting).
# The cube keeps the DICOM array axes of an axial series, (slice, row, col), whose indices
# increase towards patient superior, posterior and left. "lia" rearranges them so that the
# indices increase towards anterior, inferior and left, i.e. FreeSurfer's conformed LIA voxel
# axes (i, j, k) = (L, I, A) read with k slowest: (A, I, L).
ORIENTATIONS: dict[str, tuple[tuple[int, int, int], tuple[int, ...]]] = {
    "array": ((0, 1, 2), ()),
    "lia": ((1, 0, 2), (0, 1)),
    "flip0": ((0, 1, 2), (0,)),
    "flip1": ((0, 1, 2), (1,)),
    "flip01": ((0, 1, 2), (0, 1)),
    "transpose01": ((1, 0, 2), ()),
}


def check_mr(path: Path, orientations: list[str]) -> None:
    vol, spacing = load_epi_volume(MR_SERIES, temporal_position=1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    fov_ml = vol.size * voxel_ml
    cube, scale, offset = conform(vol, spacing)
    print(f"conformed to {cube.shape} at 1 mm (array axes kept: slice, row, col); FOV {fov_ml:.0f} mL")
    sess = _session(path)
    for name in orientations:
        perm, flip = ORIENTATIONS[name]
        x = np.flip(cube.transpose(perm), axis=flip) if flip else cube.transpose(perm)
        t0 = time.perf_counter()
        prob = sess.run(["probabilities"], {"image": np.ascontiguousarray(x)[None, None]})[0][0, 1]
        dt = time.perf_counter() - t0
        if flip:
            prob = np.flip(prob, axis=flip)
        prob = prob.transpose(np.argsort(perm))
        mask_cube = largest_component(prob > 0.5)
        mask = to_original(mask_cube, vol.shape, scale, offset)
        inside = vol[mask]
        print(
            f"orientation {name} (perm {perm}, flip {flip}): brain {mask.sum() * voxel_ml:7.1f} mL in "
            f"the original grid ({mask_cube.sum() / 1000:.1f} mL in the 1 mm cube, "
            f"{(prob > 0.5).sum() / 1000:.1f} mL before the largest component), "
            f"{mask.mean() * 100:.1f}% of the FOV, mean intensity inside/outside "
            f"{inside.mean() if inside.size else 0:.0f}/{vol[~mask].mean():.0f}; onnxruntime {dt:.1f} s",
            flush=True,
        )


# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=reference.WEIGHTS_DIR)
    ap.add_argument("--out", type=Path, default=ONNX_PATH)
    ap.add_argument("--check-mr", action="store_true", help="run the real-data check on mr_0004")
    ap.add_argument(
        "--orient",
        default="lia",
        help=f"with --check-mr: comma-separated orientations among {', '.join(ORIENTATIONS)}",
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    layers = reference.read_layers(args.weights)
    n_params = sum(lay.kernel.size + (0 if lay.bias is None else lay.bias.size) for lay in layers)
    bin_size = (args.weights / "model.bin").stat().st_size
    print(
        f"weights: {len(layers)} Conv3D layers, {n_params} parameters ({n_params * 4} bytes; "
        f"model.bin {bin_size} bytes)"
    )
    print(
        "dilations: "
        + ",".join(str(lay.dilation) for lay in layers)
        + f"; instance norm after {sum(lay.instance_norm for lay in layers)} convs, "
        f"GELU after {sum(lay.gelu for lay in layers)}"
    )
    model = build_torch_model(layers)
    export_onnx(model, args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, sha256 {digest[:16]}...)")

    diff = numeric_check(args.out, layers)
    ok = diff < CHECK_TOL
    print(
        f"numeric check: onnxruntime vs NumPy reference on random {CHECK_SHAPE}: "
        f"max |diff| = {diff:.2e} ({'OK' if ok else 'FAIL'}, tolerance {CHECK_TOL:g})"
    )
    if not ok:
        return 1

    if args.check_mr:
        check_mr(args.out, args.orient.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
