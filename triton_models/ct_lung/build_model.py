# SPDX-License-Identifier: AGPL-3.0-or-later
"""Build the ``ct_lung`` model end to end: DICOM -> reference labels -> 3D UNet -> ONNX -> Dice.

Run from the repository root with the training environment (see README.md)::

    .venv-train/bin/python triton_models/ct_lung/build_model.py

Steps:

1. read the chest CT series (pydicom), sorted along the slice normal, in Hounsfield units;
2. label the right/left lung of each series with the classical method of ``reference_labels.py``;
3. put the training series (plus z-cropped and slice-thickness-resampled variants) on the
   network grid with the worker's own functions (``orthanc_plugin.imaging.preprocess``);
4. train a small MONAI 3D UNet (CPU, fixed seed) with intensity, noise, blur and small affine
   augmentation (no left-right flips: the labels are sided);
5. export ONNX (opset 17, dynamic batch, softmax inside the graph), check it against torch
   in onnxruntime, batch 1 and 2;
6. run the exported ONNX on every series exactly as the worker does (window, resize to the
   network grid, resize the probabilities back, argmax, largest component per label) and
   write the Dice per lung against the reference labels to stdout and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from scipy import ndimage as ndi

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from reference_labels import LEFT_LUNG, RIGHT_LUNG, label_volumes_ml, reference_labels  # noqa: E402

from orthanc_plugin.imaging.preprocess import resize, window  # noqa: E402

GRID = (64, 128, 128)  # network input (z, y, x)
HU_LOW, HU_HIGH = -1024.0, 400.0
N_CLASSES = 3
LABELS = {RIGHT_LUNG: "right_lung", LEFT_LUNG: "left_lung"}

TRAIN_SERIES = ("A0001-5mm", "A0002-B70f")
EVAL_SERIES = ("A0002-B40f",)


# --------------------------------------------------------------------------------------------
# DICOM


@dataclass
class Series:
    name: str
    hu: NDArray[np.float32]  # (z, y, x)
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm


def load_series(folder: Path) -> Series:
    """Read one axial CT series: slices sorted along the normal, stored values -> HU."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    if not files:
        raise FileNotFoundError(f"no .dcm files in {folder}")
    datasets = [pydicom.dcmread(p) for p in files]
    uids = {str(d.SeriesInstanceUID) for d in datasets}
    if len(uids) != 1:
        raise ValueError(f"{folder}: {len(uids)} series in one folder")
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    for d in datasets:
        if not np.allclose(np.asarray(d.ImageOrientationPatient, dtype=float), iop, atol=1e-4):
            raise ValueError(f"{folder}: slices with different orientations")
    pos = np.array([float(np.dot(np.asarray(d.ImagePositionPatient, dtype=float), normal)) for d in datasets])
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    gaps = np.diff(pos)
    if len(gaps) and (gaps.min() <= 0 or gaps.max() - gaps.min() > 0.01 * gaps.max() + 1e-3):
        raise ValueError(f"{folder}: slices are not evenly spaced ({gaps.min():.3f}..{gaps.max():.3f} mm)")
    hu = np.stack(
        [
            datasets[i].pixel_array.astype(np.float32) * np.float32(float(datasets[i].RescaleSlope))
            + np.float32(float(datasets[i].RescaleIntercept))
            for i in order
        ]
    )
    dy, dx = (float(v) for v in datasets[0].PixelSpacing)  # row spacing, column spacing
    dz = float(np.median(gaps)) if len(gaps) else float(datasets[0].SliceThickness)
    return Series(folder.name, hu, (dz, dy, dx))


# --------------------------------------------------------------------------------------------
# network grid (the worker's preprocessing, unchanged)


def to_network(hu: NDArray[np.floating[Any]]) -> NDArray[np.float32]:
    """HU volume -> (64, 128, 128) network input in [0, 1]."""
    return resize(window(hu, HU_LOW, HU_HIGH), GRID, order=1)


def labels_to_grid(labels: NDArray[np.uint8], shape: tuple[int, int, int]) -> NDArray[np.uint8]:
    """Label volume -> another grid: each one-hot channel resized linearly, then argmax."""
    chans = np.stack([resize((labels == k).astype(np.float32), shape, order=1) for k in range(N_CLASSES)])
    return np.asarray(np.argmax(chans, axis=0), dtype=np.uint8)


def probabilities_to_labels(
    probs: NDArray[np.floating[Any]], shape: tuple[int, int, int]
) -> NDArray[np.uint8]:
    """What the worker does with the model output: resize each channel back, argmax, then keep
    the largest 3D connected component of each label."""
    chans = np.stack([resize(probs[k], shape, order=1) for k in range(probs.shape[0])])
    lab = np.asarray(np.argmax(chans, axis=0), dtype=np.uint8)
    out = np.zeros_like(lab)
    for k in range(1, probs.shape[0]):
        comp, n = ndi.label(lab == k)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[comp == int(np.argmax(sizes))] = k
    return out


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    denom = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if denom == 0 else 2.0 * int(np.count_nonzero(a & b)) / denom


# --------------------------------------------------------------------------------------------
# training data


@dataclass
class Sample:
    name: str
    image: NDArray[np.float32]  # GRID
    target: NDArray[np.uint8]  # GRID


def training_samples(series: list[Series], labels: dict[str, NDArray[np.uint8]]) -> list[Sample]:
    """Each training series, plus variants with less z coverage (apex or base cut off, as in
    scans that do not cover the whole chest) and, for thin-slice series, the same scan
    resampled to 8 mm slices (then labelled again from its own HU)."""
    out: list[Sample] = []

    def add(name: str, hu: NDArray[np.float32], lab: NDArray[np.uint8]) -> None:
        out.append(Sample(name, to_network(hu), labels_to_grid(lab, GRID)))

    for s in series:
        lab = labels[s.name]
        nz = s.hu.shape[0]
        add(s.name, s.hu, lab)
        cut = max(2, round(0.15 * nz))
        half = max(1, cut // 2)
        for tag, lo, hi in (("-base", cut, nz), ("-apex", 0, nz - cut), ("-both", half, nz - half)):
            add(s.name + tag, s.hu[lo:hi], lab[lo:hi])
        if s.spacing[0] < 6.0:
            nz8 = max(8, round(nz * s.spacing[0] / 8.0))
            hu8 = resize(s.hu, (nz8, s.hu.shape[1], s.hu.shape[2]), order=1)
            sp8 = (s.spacing[0] * nz / nz8, s.spacing[1], s.spacing[2])
            add(s.name + "-8mm", hu8, reference_labels(hu8, sp8))
    return out


# --------------------------------------------------------------------------------------------
# model


def make_model(torch: Any) -> Any:
    """A small MONAI 3D UNet over the whole field of view, with a fixed x-coordinate channel
    (-1 at column 0, +1 at the last column) appended inside the graph so that right and left
    can be told apart even where the two lungs look alike; softmax is part of the model."""
    from monai.networks.nets import UNet

    class LungNet(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.unet = UNet(
                spatial_dims=3,
                in_channels=2,
                out_channels=N_CLASSES,
                channels=(16, 32, 64, 128),
                strides=(2, 2, 2),
                num_res_units=1,
            )
            xs = torch.linspace(-1.0, 1.0, GRID[2]).view(1, 1, 1, 1, GRID[2])
            self.register_buffer("xcoord", xs, persistent=False)

        def logits(self, image: Any) -> Any:
            return self.unet(torch.cat([image, self.xcoord.expand_as(image)], dim=1))

        def forward(self, image: Any) -> Any:
            return torch.softmax(self.logits(image), dim=1)

    return LungNet()


def augment(torch: Any, img: Any, lab: Any, gen: Any) -> tuple[Any, Any]:
    """Random small affine (zoom, in-plane rotation, shift; never a left-right flip) and
    intensity jitter, noise and in-plane blur (sharp vs soft kernels) on a (B,1,D,H,W) batch."""
    import torch.nn.functional as F

    b = img.shape[0]

    def u(lo: float, hi: float, n: int = b) -> Any:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    zoom_xy, zoom_z = u(0.85, 1.2), u(0.9, 1.12)
    ang = u(-8.0, 8.0) * math.pi / 180.0
    tx, ty, tz = u(-0.08, 0.08), u(-0.08, 0.08), u(-0.06, 0.06)
    theta = torch.zeros(b, 3, 4)
    theta[:, 0, 0] = torch.cos(ang) / zoom_xy
    theta[:, 0, 1] = -torch.sin(ang) / zoom_xy
    theta[:, 1, 0] = torch.sin(ang) / zoom_xy
    theta[:, 1, 1] = torch.cos(ang) / zoom_xy
    theta[:, 2, 2] = 1.0 / zoom_z
    theta[:, 0, 3], theta[:, 1, 3], theta[:, 2, 3] = tx, ty, tz
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    lab = F.grid_sample(
        lab[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False
    )
    lab = lab[:, 0].long()

    out = []
    for i in range(b):
        x = img[i : i + 1]
        sigma = float(u(0.0, 1.2, 1))
        if sigma > 0.3:
            r = int(math.ceil(2.5 * sigma))
            t = torch.arange(-r, r + 1, dtype=torch.float32)
            k = torch.exp(-0.5 * (t / sigma) ** 2)
            k = k / k.sum()
            x = F.pad(x, (r, r, r, r, 0, 0), mode="replicate")
            x = F.conv3d(x, k.view(1, 1, 1, 1, -1))
            x = F.conv3d(x, k.view(1, 1, 1, -1, 1))
        x = x * float(u(0.92, 1.08, 1)) + float(u(-0.04, 0.04, 1))
        noise = float(u(0.0, 0.03, 1))
        x = x + noise * torch.randn(x.shape, generator=gen)
        out.append(x.clamp(0.0, 1.0))
    return torch.cat(out), lab


def train(
    torch: Any, samples: list[Sample], epochs: int, batch: int, lr: float, seed: int
) -> tuple[Any, dict[str, Any]]:
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = make_model(torch)
    images = torch.from_numpy(np.stack([s.image for s in samples]))[:, None]
    targets = torch.from_numpy(np.stack([s.target for s in samples]).astype(np.int64))
    steps_per_epoch = math.ceil(len(samples) / batch)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, total // 10)

    def lr_factor(step: int) -> float:  # linear warm-up over 10 %, then cosine decay to 2 %
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    model.train()
    t0 = time.perf_counter()
    history = []
    for epoch in range(epochs):
        perm = rng.permutation(len(samples))
        running = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * batch : (s + 1) * batch]
            if len(idx) < batch:  # keep the batch size fixed: top up from the start
                idx = np.concatenate([idx, perm[: batch - len(idx)]])
            x, y = augment(torch, images[idx], targets[idx], gen)
            loss = loss_fn(model.logits(x), y[:, None])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
        mean = running / steps_per_epoch
        history.append(round(mean, 5))
        if epoch == 0 or (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            print(
                f"  epoch {epoch + 1:3d}/{epochs}  loss {mean:.4f}  {time.perf_counter() - t0:6.1f} s",
                flush=True,
            )
    model.eval()
    return model, {"seconds": round(time.perf_counter() - t0, 1), "steps": total, "loss_per_epoch": history}


# --------------------------------------------------------------------------------------------
# export and check


def export_onnx(torch: Any, model: Any, path: Path, probe: NDArray[np.float32]) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.from_numpy(probe[None, None])
    torch.onnx.export(
        model,
        (x,),
        str(path),
        opset_version=17,
        input_names=["image"],
        output_names=["probabilities"],
        dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)))
    sess = ort.InferenceSession(str(path), sess_options=_ort_options(ort), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    got1 = sess.run(["probabilities"], {"image": probe[None, None]})[0]
    other = np.ascontiguousarray(probe[:, :, ::-1])  # any second input, to tell batch items apart
    with torch.no_grad():
        ref2 = model(torch.from_numpy(other[None, None])).numpy()
    got2 = sess.run(["probabilities"], {"image": np.stack([probe, other])[:, None]})[0]
    check: dict[str, Any] = {
        "inputs": [[i.name, i.type, i.shape] for i in sess.get_inputs()],
        "outputs": [[o.name, o.type, o.shape] for o in sess.get_outputs()],
        "max_abs_diff_torch_vs_onnxruntime": float(np.abs(got1 - ref).max()),
        "max_abs_diff_batch2": float(max(np.abs(got2[0] - ref[0]).max(), np.abs(got2[1] - ref2[0]).max())),
        "batch2_output_shape": list(got2.shape),
        "softmax_sum_max_err": float(np.abs(got1.sum(axis=1) - 1.0).max()),
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    if check["max_abs_diff_torch_vs_onnxruntime"] > 1e-3 or check["max_abs_diff_batch2"] > 1e-3:
        raise RuntimeError(f"ONNX output differs from torch: {check}")
    return check


def _ort_options(ort: Any) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    return opts


def evaluate(
    path: Path, series: list[Series], labels: dict[str, NDArray[np.uint8]], train_names: list[str]
) -> dict[str, Any]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), sess_options=_ort_options(ort), providers=["CPUExecutionProvider"])
    results: dict[str, Any] = {}
    for s in series:
        t0 = time.perf_counter()
        x = to_network(s.hu)
        t1 = time.perf_counter()
        probs = sess.run(["probabilities"], {"image": x[None, None]})[0][0]
        t2 = time.perf_counter()
        pred = probabilities_to_labels(probs, (s.hu.shape[0], s.hu.shape[1], s.hu.shape[2]))
        t3 = time.perf_counter()
        ref = labels[s.name]
        results[s.name] = {
            "role": "train" if s.name in train_names else "eval",
            "dice": {n: round(dice(pred == k, ref == k), 4) for k, n in LABELS.items()},
            "reference_ml": {n: round(v, 1) for n, v in label_volumes_ml(ref, s.spacing).items()},
            "predicted_ml": {n: round(v, 1) for n, v in label_volumes_ml(pred, s.spacing).items()},
            "predicted_centroid_x": {
                n: round(float(np.nonzero(pred == k)[2].mean()), 1) if (pred == k).any() else None
                for k, n in LABELS.items()
            },
            "shape_zyx": list(s.hu.shape),
            "spacing_mm": [round(v, 4) for v in s.spacing],
            "seconds": {
                "preprocess": round(t1 - t0, 2),
                "onnxruntime": round(t2 - t1, 2),
                "postprocess": round(t3 - t2, 2),
            },
        }
    # a steadier figure for the model alone: median of 3 runs on the last volume
    x = to_network(series[-1].hu)[None, None]
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        sess.run(["probabilities"], {"image": x})
        runs.append(time.perf_counter() - t)
    results["_onnxruntime_seconds_per_volume_median_of_3"] = round(float(np.median(runs)), 3)
    return results


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", type=Path, default=REPO.parent / "shared" / "data" / "ct", help="CT series root"
    )
    ap.add_argument(
        "--output", type=Path, default=HERE, help="model folder: writes 1/model.onnx, metrics.json"
    )
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train", nargs="+", default=list(TRAIN_SERIES), help="series used for training")
    ap.add_argument("--eval", nargs="+", default=list(EVAL_SERIES), help="held-out series")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.perf_counter()

    names = list(dict.fromkeys([*args.train, *args.eval]))
    print(f"reading {len(names)} series from {args.data}", flush=True)
    series = [load_series(args.data / n) for n in names]
    labels: dict[str, NDArray[np.uint8]] = {}
    for s in series:
        t = time.perf_counter()
        labels[s.name] = reference_labels(s.hu, s.spacing)
        vols = label_volumes_ml(labels[s.name], s.spacing)
        print(
            f"  {s.name}: {s.hu.shape} spacing {tuple(round(v, 3) for v in s.spacing)} mm; reference "
            f"right {vols['right_lung']:.0f} ml, left {vols['left_lung']:.0f} ml "
            f"({time.perf_counter() - t:.1f} s)",
            flush=True,
        )

    samples = training_samples([s for s in series if s.name in args.train], labels)
    print(f"training on {len(samples)} volumes: {', '.join(s.name for s in samples)}", flush=True)
    model, train_info = train(torch, samples, args.epochs, args.batch, args.lr, args.seed)

    onnx_path = args.output / "1" / "model.onnx"
    probe_series = next(s for s in series if s.name == names[-1])
    check = export_onnx(torch, model, onnx_path, to_network(probe_series.hu))
    print(
        f"exported {onnx_path} ({check['bytes'] / 1e6:.2f} MB); max |onnx - torch| "
        f"{check['max_abs_diff_torch_vs_onnxruntime']:.2e}, batch 2 {check['max_abs_diff_batch2']:.2e}",
        flush=True,
    )
    results = evaluate(onnx_path, series, labels, list(args.train))
    total = time.perf_counter() - t_start

    print("\nDice against the reference labels (original grid, after largest-component post-processing)")
    print(f"{'series':<14}{'role':<7}{'right':>8}{'left':>8}   {'ref ml R/L':>13}   {'pred ml R/L':>13}")
    for s in series:
        r = results[s.name]
        print(
            f"{s.name:<14}{r['role']:<7}{r['dice']['right_lung']:>8.4f}{r['dice']['left_lung']:>8.4f}   "
            f"{r['reference_ml']['right_lung']:>6.0f}/{r['reference_ml']['left_lung']:<6.0f}   "
            f"{r['predicted_ml']['right_lung']:>6.0f}/{r['predicted_ml']['left_lung']:<6.0f}"
        )
    print(
        f"onnxruntime, one volume, {args.threads} threads: "
        f"{results['_onnxruntime_seconds_per_volume_median_of_3']:.2f} s; "
        f"training {train_info['seconds']:.0f} s; total {total:.0f} s"
    )

    import monai
    import onnxruntime

    metrics = {
        "model": "ct_lung",
        "labels": {"0": "background", "1": "right_lung (patient right)", "2": "left_lung (patient left)"},
        "reference": "classical threshold/morphology labels (reference_labels.py), not expert annotation",
        "evaluation": "onnxruntime on the exported model; probabilities resized back to the original "
        "grid (order=1), argmax, largest 3D component per label; Dice vs reference labels",
        "train_series": list(args.train),
        "eval_series": list(args.eval),
        "training_volumes": [s.name for s in samples],
        "series": {s.name: results[s.name] for s in series},
        "onnxruntime_seconds_per_volume": results["_onnxruntime_seconds_per_volume_median_of_3"],
        "onnx": check,
        "training": {
            "epochs": args.epochs,
            "batch": args.batch,
            "lr": args.lr,
            "seed": args.seed,
            "threads": args.threads,
            **train_info,
        },
        "total_seconds": round(total, 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {args.output / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())
