"""Radiomics features against the IBSI consensus: the IBSI-1 digital phantom, every feature we ship.

Reference values and tolerances: tests/data/ibsi1_digital_phantom_reference.csv (its header
names the source). The failure message lists every feature that does not conform. Running this
file as a script prints the table for docs/radiomics.md.
"""

from __future__ import annotations

import csv
import json
import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orthanc_plugin.imaging.radiomics import FEATURES, RadiomicsSettings, compute_features

from ..conftest import DATA, require_data

PHANTOM = DATA / "ibsi-digital-phantom"
REFERENCE = Path(__file__).resolve().parents[1] / "data" / "ibsi1_digital_phantom_reference.csv"
AGGREGATIONS = ("3D_merged", "3D_averaged")


def reference() -> list[dict[str, str]]:
    lines = [line for line in REFERENCE.read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines))


def tolerance(row: dict[str, str]) -> float:
    """The published tolerance, or half a unit of the last digit the manual gives."""
    if row["tolerance"]:
        return float(row["tolerance"])
    # "567" is given to the units digit, "0.0574" to its fourth decimal.
    exponent = Decimal(row["value"]).as_tuple().exponent
    assert isinstance(exponent, int)
    return 0.5 * 10.0**exponent


def phantom() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    require_data(PHANTOM)
    data = json.loads((PHANTOM / "phantom.json").read_text())
    # Stored [x][y][z]; our volumes are [z, y, x].
    image = np.transpose(np.asarray(data["image"], dtype=np.float64), (2, 1, 0))
    mask = np.transpose(np.asarray(data["mask"]) > 0, (2, 1, 0))
    return image, mask


def comparison() -> list[tuple[str, str, float, float, float, bool]]:
    """(feature, aggregation, ours, reference, tolerance, conforms) for every reference row."""
    image, mask = phantom()
    ours = {
        agg: compute_features(
            image, mask, (2.0, 2.0, 2.0), RadiomicsSettings(bin_width=1.0, glcm_aggregation=agg)
        )
        for agg in AGGREGATIONS
    }
    rows = []
    for row in reference():
        agg = row["aggregation"] or "3D_merged"
        value = ours[agg][row["feature"]]
        ref, tol = float(row["value"]), tolerance(row)
        rows.append(
            (
                row["feature"],
                row["aggregation"],
                value,
                ref,
                tol,
                math.isfinite(value) and abs(value - ref) <= tol + 1e-12,
            )
        )
    return rows


def test_every_shipped_feature_has_a_reference_value() -> None:
    covered = {(r["feature"], r["aggregation"]) for r in reference()}
    for f in FEATURES:
        aggs = AGGREGATIONS if f.family == "glcm" else ("",)
        missing = [a for a in aggs if (f.id, a) not in covered]
        assert not missing, f"{f.id} has no IBSI reference value for {missing}"


def test_digital_phantom_conforms_to_the_ibsi_consensus() -> None:
    rows = comparison()
    bad = [f"{f} {a}: ours {v:.5g}, reference {r:g} +/- {t:g}" for f, a, v, r, t, ok in rows if not ok]
    assert not bad, "features that do not conform to IBSI:\n" + "\n".join(bad)


def test_the_phantom_mask_is_the_published_one() -> None:
    image, mask = phantom()
    assert image.shape == (4, 4, 5) and int(mask.sum()) == 74


@pytest.mark.parametrize("bad", [{}, {"bin_width": 1.0, "bin_count": 8}, {"bin_width": 0.0}])
def test_discretisation_must_be_one_of_fbs_or_fbn(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="bin"):
        RadiomicsSettings(**bad)


if __name__ == "__main__":
    print("| feature | GLCM aggregation | ours | IBSI reference | tolerance | conforms |")
    print("|---|---|---|---|---|---|")
    for f, a, v, r, t, ok in comparison():
        print(f"| `{f}` | {a.replace('_', ' ')} | {v:.4g} | {r:g} | {t:g} | {'yes' if ok else 'NO'} |")
