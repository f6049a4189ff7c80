# SPDX-License-Identifier: AGPL-3.0-or-later
"""The acquisition of a series as input-drift monitoring sees it: scanner, reconstruction, age band.

Read from one dataset of the series (the attributes are the same on every slice of a series).
The patient's age is reduced to a band here, so the job store never holds the age itself.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from pydicom.dataset import Dataset

from orthanc_plugin.core.handoff import AcquisitionInfo

#: (lowest age in years, band name), ascending
AGE_BANDS: tuple[tuple[int, str], ...] = (
    (0, "0-17"),
    (18, "18-39"),
    (40, "40-59"),
    (60, "60-79"),
    (80, "80+"),
)


def age_band(years: float | None) -> str | None:
    if years is None or years < 0 or years > 150:
        return None
    band = None
    for low, name in AGE_BANDS:
        if years >= low:
            band = name
    return band


def _age_years(ds: Dataset) -> float | None:
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(text) == 4 and text[:3].isdigit() and text[3] in "DWMY":
        per_year = {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[text[3]]
        return int(text[:3]) / per_year
    birth, when = str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
    try:
        b = date(int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
        s = date(int(when[:4]), int(when[4:6]), int(when[6:8]))
    except ValueError:
        return None
    return (s - b).days / 365.25


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, (str, int, float)) and hasattr(value, "__getitem__"):
            value = value[0]
        number = float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return round(number, 4) if number > 0 else None


def acquisition_of(ds: Dataset) -> AcquisitionInfo:
    """The monitored attributes of a series, from one of its datasets (missing ones are None)."""
    return AcquisitionInfo(
        manufacturer=_text(ds.get("Manufacturer")),
        model=_text(ds.get("ManufacturerModelName")),
        kernel=_text(ds.get("ConvolutionKernel")),
        slice_thickness_mm=_number(ds.get("SliceThickness")),
        pixel_spacing_mm=_number(ds.get("PixelSpacing")),
        age_band=age_band(_age_years(ds)),
    )
