"""Shared test fixtures: paths to the shared data, and the real services for integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from devstack.common import ROOT

DATA = Path(os.environ.get("ORTHANC_AI_DATA", ROOT.parent / "shared" / "data"))
CT_B40 = DATA / "ct" / "A0002-B40f"
CT_B70 = DATA / "ct" / "A0002-B70f"
CT_A0001 = DATA / "ct" / "A0001-5mm"
MR = DATA / "mr" / "nih-ge-epi"


def require_data(*folders: Path) -> None:
    """Missing shared data is a broken checkout, not a reason to skip: fail loudly."""
    for f in folders:
        if not f.is_dir() or not any(f.iterdir()):
            pytest.fail(f"test data folder {f} is missing: the shared data must sit beside the repository")


def read_series(folder: Path) -> list[pydicom.Dataset]:
    require_data(folder)
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


@pytest.fixture(scope="session")
def ct_b40() -> list[pydicom.Dataset]:
    return read_series(CT_B40)


@pytest.fixture(scope="session")
def artifacts() -> Iterator[Path]:
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    yield out
