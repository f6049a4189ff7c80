import numpy as np
from scipy import ndimage

from orthanc_plugin.imaging.postprocess import (
    BOX_SLAB,
    keep_largest_components,
    label_box,
    labels_from_probabilities,
    volumes_ml,
)
from orthanc_plugin.imaging.preprocess import resize


def test_resize_matches_scipy_linear_zoom():
    a = np.random.default_rng(1).random((9, 17, 13), dtype=np.float32)
    for shape in [(20, 40, 30), (4, 8, 5), (9, 34, 6)]:
        ref = ndimage.zoom(
            a,
            [t / s for t, s in zip(shape, a.shape, strict=True)],
            order=1,
            mode="nearest",
            grid_mode=True,
            prefilter=False,
        )
        np.testing.assert_allclose(resize(a, shape), ref, atol=1e-5)


def test_labels_match_full_resolution_argmax_and_drop_islands():
    rng = np.random.default_rng(2)
    p = rng.random((3, 16, 32, 32), dtype=np.float32) * 0.1
    p[0] += 0.5
    p[1, 2:12, 4:28, 2:14] = 0.9
    p[2, 2:12, 4:28, 18:30] = 0.9
    p[1, 13:16, 28:32, 28:32] = 0.95  # an island of label 1 far from its organ
    shape = (24, 64, 64)
    labels = labels_from_probabilities(p, shape, largest_component=False)
    full = np.argmax(np.stack([resize(p[c], shape) for c in range(3)]), axis=0)
    np.testing.assert_array_equal(labels, full)
    assert ndimage.label(labels == 1)[1] == 2
    keep_largest_components(labels, [1, 2])
    assert ndimage.label(labels == 1)[1] == 1 and ndimage.label(labels == 2)[1] == 1


def _plain_largest(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """The obvious version: label the whole mask, keep the first largest component."""
    out = labels.copy()
    for v in values:
        comp, n = ndimage.label(labels == v)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[(labels == v) & (comp != int(np.argmax(sizes)))] = 0
    return out


def test_largest_components_equal_the_plain_version_on_random_maps():
    rng = np.random.default_rng(11)
    for _ in range(60):
        shape = tuple(int(x) for x in rng.integers(1, 24, 3))
        density = rng.uniform(0.02, 0.7)
        labels = ((rng.random(shape) < density) * rng.integers(1, 4, shape)).astype(np.uint8)
        expected = _plain_largest(labels, [1, 2, 3])
        keep_largest_components(labels, [1, 2, 3])
        np.testing.assert_array_equal(labels, expected)


def test_volumes_ml():
    labels = np.zeros((2, 3, 4), dtype=np.uint8)
    labels[0, :, :2] = 1
    assert volumes_ml(labels, [1, 2], 0.5) == {1: 3.0, 2: 0.0}


def _reference_labels(p: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Every channel resampled to the full grid (slices first, then the image plane, as
    documented), then the argmax (the first class wins ties)."""
    _, _, my, mx = p.shape
    full = [resize(resize(p[c], (shape[0], my, mx)), shape) for c in range(p.shape[0])]
    return np.argmax(np.stack(full), axis=0).astype(np.uint8)


def test_labels_equal_full_resampling_on_odd_grids_ties_and_slabs():
    # Only the cells where the model grid's classes disagree are interpolated: the result
    # must still be the full-resolution argmax exactly, whatever the grids, ties and slabs.
    rng = np.random.default_rng(7)
    for trial in range(25):
        n = int(rng.integers(2, 5))
        model = tuple(int(s) for s in rng.integers(2, 12, 3))
        shape = tuple(int(s) for s in rng.integers(2, 40, 3))
        p = rng.random((n, *model), dtype=np.float32)
        if trial % 3 == 0:
            p = np.round(p, 1).astype(np.float32)  # many exact ties
        labels = labels_from_probabilities(p, shape, largest_component=False, slab=int(rng.integers(1, 9)))
        np.testing.assert_array_equal(labels, _reference_labels(p, shape), err_msg=f"trial {trial}")


def test_labels_of_smooth_organs_equal_full_resampling():
    # Smooth blobs like a real model's output: most cells are uniform, boundaries interpolated.
    rng = np.random.default_rng(3)
    logits = ndimage.gaussian_filter(rng.normal(size=(3, 12, 24, 24)), sigma=(0, 2, 3, 3)).astype(np.float32)
    p = np.exp(logits * 20) / np.exp(logits * 20).sum(axis=0)
    shape = (30, 96, 96)
    labels = labels_from_probabilities(p.astype(np.float32), shape, largest_component=False)
    np.testing.assert_array_equal(labels, _reference_labels(p.astype(np.float32), shape))
    assert set(np.unique(labels)) == {0, 1, 2}


def test_label_box_a_few_slices_at_a_time_equals_the_whole_grid_one() -> None:
    rng = np.random.default_rng(5)
    for nz in (1, BOX_SLAB - 1, BOX_SLAB, 2 * BOX_SLAB + 3):
        labels = (rng.random((nz, 9, 11)) < 0.05).astype(np.uint8) * rng.integers(1, 4, (nz, 9, 11)).astype(
            np.uint8
        )
        for v in (1, 2, 3, 7):
            where = np.argwhere(labels == v)
            expected = (
                None
                if where.size == 0
                else tuple(
                    slice(int(a), int(b) + 1)
                    for a, b in zip(where.min(axis=0), where.max(axis=0), strict=True)
                )
            )
            assert label_box(labels, v) == expected
