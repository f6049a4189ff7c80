"""Fixtures shared by the SEG and SR encoder tests: the real CT, a synthetic label map, its SEG."""

from __future__ import annotations

from typing import Any

import pydicom
import pytest
from numpy.typing import NDArray

from .test_seg import make_seg, sort_along_normal, synthetic_labels

Array = NDArray[Any]


@pytest.fixture(scope="module")
def ct(ct_b40: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    return sort_along_normal(ct_b40)


@pytest.fixture(scope="module")
def labels(ct: list[pydicom.Dataset]) -> Array:
    return synthetic_labels((len(ct), int(ct[0].Rows), int(ct[0].Columns)))


@pytest.fixture(scope="module")
def seg(ct: list[pydicom.Dataset], labels: Array) -> pydicom.Dataset:
    return make_seg(ct, labels)
