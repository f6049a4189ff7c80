"""Agreement between the AI's segmentation and a reviewer's edit of it, per segment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Agreement:
    """One segment: Dice of the AI's mask and the edited one, the volume change (edited minus
    AI) in mL and in % of the AI's volume, and how many slices the edit changed."""

    label: int
    dice: float
    ai_ml: float
    edited_ml: float
    volume_diff_ml: float
    volume_diff_pct: float | None
    slices_touched: int

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "label": self.label,
            "dice": round(self.dice, 4),
            "ai_ml": round(self.ai_ml, 3),
            "edited_ml": round(self.edited_ml, 3),
            "volume_diff_ml": round(self.volume_diff_ml, 3),
            "volume_diff_pct": None if self.volume_diff_pct is None else round(self.volume_diff_pct, 2),
            "slices_touched": self.slices_touched,
        }


def agreement(
    ai: NDArray[np.integer[Any]],
    edited: NDArray[np.integer[Any]],
    values: Sequence[int],
    voxel_volume_ml: float,
) -> list[Agreement]:
    """Per label of ``values``: both maps ``[z, y, x]`` on the same slices. Two empty masks agree (Dice 1)."""
    if ai.shape != edited.shape:
        raise ValueError(f"label maps differ in shape: {ai.shape} and {edited.shape}")
    out = []
    for v in values:
        a, e = ai == v, edited == v
        na, ne = int(np.count_nonzero(a)), int(np.count_nonzero(e))
        both = int(np.count_nonzero(a & e))
        dice = 1.0 if na + ne == 0 else 2.0 * both / (na + ne)
        touched = int(np.count_nonzero(np.any(a != e, axis=(1, 2))))
        ai_ml, ed_ml = na * voxel_volume_ml, ne * voxel_volume_ml
        out.append(
            Agreement(
                label=v, dice=dice, ai_ml=ai_ml, edited_ml=ed_ml, volume_diff_ml=ed_ml - ai_ml,
                volume_diff_pct=None if na == 0 else 100.0 * (ed_ml - ai_ml) / ai_ml, slices_touched=touched,
            )
        )  # fmt: skip
    return out
