"""Sliding-window inference in NumPy: a fixed-size model over a volume of any size.

The semantics are those of MONAI's ``monai.inferers.sliding_window_inference`` (1.x): the
input is padded up to the window where it is smaller, windows step by
``int(roi * (1 - overlap))`` and the last one is pulled back to end at the edge, the windows'
outputs are blended with a constant or Gaussian importance map and divided by the summed
weights. It is written here so that the worker needs no torch; ``bench/sliding_window_vs_monai.py``
compares the two.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import numpy as np
from numpy.typing import NDArray

BlendMode = Literal["constant", "gaussian"]
PaddingMode = Literal["constant", "replicate", "reflect", "circular"]
Predictor = Callable[[NDArray[np.float32]], NDArray[Any]]
T = TypeVar("T")

# MONAI (torch.nn.functional.pad) names -> numpy.pad names
_NUMPY_PAD = {"constant": "constant", "replicate": "edge", "reflect": "reflect", "circular": "wrap"}
_MIN_WEIGHT = 1e-3  # MONAI's floor for importance weights, so every voxel has a positive total


def roi_for(image_size: Sequence[int], roi_size: int | Sequence[int | None]) -> tuple[int, ...]:
    """The window size per axis; a single int is used on every axis, ``None`` or <= 0 takes the image size."""
    sizes: Sequence[int | None] = [roi_size] * len(image_size) if isinstance(roi_size, int) else roi_size
    if len(sizes) != len(image_size):
        raise ValueError(f"roi_size {tuple(sizes)} has {len(sizes)} axes, the image has {len(image_size)}")
    return tuple(
        int(r) if r is not None and r > 0 else int(s) for r, s in zip(sizes, image_size, strict=True)
    )


def _overlaps(overlap: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    values = (
        (float(overlap),) * ndim if isinstance(overlap, int | float) else tuple(float(o) for o in overlap)
    )
    if len(values) != ndim:
        raise ValueError(f"overlap {values} has {len(values)} values, the image has {ndim} axes")
    for o in values:
        if not 0.0 <= o < 1.0:
            raise ValueError(f"overlap must be >= 0 and < 1, got {o}")
    return values


def window_starts(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float] = 0.25
) -> list[list[int]]:
    """Start index of the windows along each axis of an image at least as large as the window.

    Windows step by ``int(roi * (1 - overlap))`` (at least 1; one window when the window is the
    axis), as many as needed to reach the end, and the last is moved back to end at the edge.
    """
    overlaps = _overlaps(overlap, len(image_size))
    starts = []
    for size, roi, o in zip(image_size, roi_size, overlaps, strict=True):
        if roi > size:
            raise ValueError(f"window {roi} is larger than the (padded) image axis {size}")
        step = roi if roi == size else max(1, int(roi * (1.0 - o)))
        count = 1
        while (count - 1) * step + roi < size:
            count += 1
        starts.append([min(i * step, size - roi) for i in range(count)])
    return starts


def window_origins(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float] = 0.25
) -> list[tuple[int, ...]]:
    """Every window's start, first axis slowest (the order in which windows are batched)."""
    return list(itertools.product(*window_starts(image_size, roi_size, overlap)))


def importance_map(
    roi_size: Sequence[int], mode: BlendMode = "constant", sigma_scale: float | Sequence[float] = 0.125
) -> NDArray[np.float32]:
    """Weight of each voxel of a window's output: all ones, or a separable Gaussian.

    The Gaussian has sigma ``sigma_scale * roi`` per axis, is centred on the window's centre,
    is 1 there (for an odd size) and is floored at 1e-3 so that the summed weights are positive.
    """
    if mode == "constant":
        return np.ones(tuple(roi_size), dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'constant' or 'gaussian', got {mode!r}")
    scales = (sigma_scale,) * len(roi_size) if isinstance(sigma_scale, int | float) else tuple(sigma_scale)
    if len(scales) != len(roi_size):
        raise ValueError(
            f"sigma_scale {scales} has {len(scales)} values, the window has {len(roi_size)} axes"
        )
    weights = np.ones((), dtype=np.float32)
    for n, s in zip(roi_size, scales, strict=True):
        x = np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2.0)
        profile = np.exp(x * x / np.float32(-2.0 * (n * s) ** 2)).astype(np.float32)
        weights = np.multiply.outer(weights, profile)
    floor = max(float(np.min(weights)), _MIN_WEIGHT)
    return np.maximum(weights, np.float32(floor)).astype(np.float32)


def _batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def sliding_window_inference(
    image: NDArray[np.floating[Any]],
    roi_size: int | Sequence[int | None],
    predict: Predictor,
    sw_batch_size: int = 1,
    overlap: float | Sequence[float] = 0.25,
    mode: BlendMode = "constant",
    sigma_scale: float | Sequence[float] = 0.125,
    padding_mode: PaddingMode = "constant",
    cval: float = 0.0,
    channels: Sequence[int] | None = None,
    out: NDArray[np.float32] | None = None,
) -> NDArray[np.float32]:
    """Run ``predict`` over windows of ``image[C, *spatial]`` and blend its outputs into ``[K, *spatial]``.

    ``predict`` takes a float32 batch ``[B, C, *roi]`` (B <= ``sw_batch_size``; the last batch may
    be smaller) and returns ``[B, K, *roi]``. ``channels`` keeps only those output channels (e.g.
    just the foreground of a two-class softmax), in that order, to bound memory; ``out``, a
    float32 array ``[K, *spatial]`` (K after ``channels``), receives the result instead of a new
    array. Accumulation is in float32.
    """
    if image.ndim < 2:
        raise ValueError(f"image must be [C, *spatial], got shape {image.shape}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if padding_mode not in _NUMPY_PAD:
        raise ValueError(f"padding_mode must be one of {sorted(_NUMPY_PAD)}, got {padding_mode!r}")
    spatial = tuple(int(s) for s in image.shape[1:])
    roi = roi_for(spatial, roi_size)
    weights = importance_map(roi, mode, sigma_scale)

    pads = [
        (max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, spatial, strict=True)
    ]
    padded = any(before or after for before, after in pads)
    source = np.asarray(image, dtype=np.float32)
    if padded:
        pad_width = [(0, 0), *pads]
        if padding_mode == "constant":
            source = np.pad(source, pad_width, mode="constant", constant_values=cval)
        else:
            source = np.pad(source, pad_width, mode=_NUMPY_PAD[padding_mode])  # type: ignore[call-overload]
    size = tuple(int(s) for s in source.shape[1:])
    origins = window_origins(size, roi, overlap)
    windows = [tuple(slice(o, o + r) for o, r in zip(origin, roi, strict=True)) for origin in origins]

    total = np.zeros(size, dtype=np.float32)
    for win in windows:
        total[win] += weights

    acc: NDArray[np.float32] | None = None
    for batch in _batches(windows, sw_batch_size):
        x = np.stack([source[(slice(None), *win)] for win in batch])
        y = np.asarray(predict(x))
        if y.ndim != len(roi) + 2 or y.shape[0] != len(batch) or tuple(y.shape[2:]) != roi:
            raise ValueError(
                f"the predictor returned shape {y.shape} for a batch of {x.shape}; expected ({len(batch)}, K, *{roi})"
            )
        if channels is not None:
            y = y[:, list(channels)]
        if acc is None:
            acc = _accumulator(out, (int(y.shape[1]), *spatial), (int(y.shape[1]), *size), padded)
        for win, pred in zip(batch, y, strict=True):
            target = acc[(slice(None), *win)]
            if mode == "constant":
                target += pred
            else:
                target += pred * weights
    assert acc is not None  # there is always at least one window
    acc /= total
    if not padded:
        return acc
    inner = tuple(slice(before, before + s) for (before, _), s in zip(pads, spatial, strict=True))
    result = acc[(slice(None), *inner)]
    if out is not None:
        out[...] = result
        return out
    return np.ascontiguousarray(result)


def _accumulator(
    out: NDArray[np.float32] | None, shape: tuple[int, ...], padded_shape: tuple[int, ...], padded: bool
) -> NDArray[np.float32]:
    if out is not None:
        if out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {shape}, got {out.dtype} {out.shape}")
        if not padded:
            out[...] = 0.0
            return out
    return np.zeros(padded_shape, dtype=np.float32)
