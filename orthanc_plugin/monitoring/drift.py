# SPDX-License-Identifier: AGPL-3.0-or-later
"""Drift statistics: is a recent window of jobs distributed like a reference window?

* Categories (scanner manufacturer, kernel, age band...): the **population stability index**,
  ``PSI = sum_i (r_i - e_i) * ln(r_i / e_i)`` over the categories seen in either window, with
  ``e_i``/``r_i`` the reference/recent proportions after adding half a job to every category
  (so a category new in one window counts, without an infinite index). The usual reading:
  below 0.1 stable, 0.1 to 0.25 a shift worth a look (``warn``), above 0.25 a shift (``alert``).
* Numbers (a segment's volume): the two-sample **Kolmogorov-Smirnov** statistic ``D`` (the largest
  distance between the two empirical distribution functions) with its asymptotic p-value
  (Kolmogorov's distribution with Stephens' small-sample correction). ``alert`` when
  p < 0.01, ``warn`` when p < 0.05.

A window with fewer than ``MIN_SAMPLES`` jobs gives ``insufficient``: no alert is raised on
a handful of jobs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

MIN_SAMPLES = 10
PSI_WARN = 0.1
PSI_ALERT = 0.25
KS_WARN_P = 0.05
KS_ALERT_P = 0.01
#: the drift states, from none to the worst
STATES = ("insufficient", "ok", "warn", "alert")


@dataclass(frozen=True)
class Drift:
    """One comparison of a recent window with the reference window."""

    test: str  # "psi" or "ks"
    statistic: float
    p_value: float | None  # KS only
    state: str
    reference_n: int
    recent_n: int

    @property
    def alert(self) -> bool:
        return self.state == "alert"


def psi(reference: Mapping[str, int], recent: Mapping[str, int], smoothing: float = 0.5) -> float:
    """Population stability index of two category counts (see the module docstring)."""
    categories = sorted(set(reference) | set(recent))
    if not categories:
        return 0.0
    n_ref = sum(reference.values()) + smoothing * len(categories)
    n_rec = sum(recent.values()) + smoothing * len(categories)
    total = 0.0
    for c in categories:
        e = (reference.get(c, 0) + smoothing) / n_ref
        r = (recent.get(c, 0) + smoothing) / n_rec
        total += (r - e) * math.log(r / e)
    return total


def kolmogorov_q(lam: float) -> float:
    """P(K > lam) for Kolmogorov's distribution: 2 * sum_j (-1)^(j-1) exp(-2 j^2 lam^2)."""
    if lam < 1e-3:
        return 1.0
    total, sign = 0.0, 1.0
    for j in range(1, 101):
        term = sign * math.exp(-2.0 * j * j * lam * lam)
        total += term
        if abs(term) < 1e-12:
            break
        sign = -sign
    return min(1.0, max(0.0, 2.0 * total))


def ks_2samp(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(D, asymptotic p-value) of the two-sample Kolmogorov-Smirnov test."""
    if not a or not b:
        raise ValueError("the Kolmogorov-Smirnov test needs two non-empty samples")
    xs, ys = sorted(a), sorted(b)
    n, m = len(xs), len(ys)
    i = j = 0
    d = 0.0
    while i < n and j < m:
        v = min(xs[i], ys[j])
        while i < n and xs[i] <= v:
            i += 1
        while j < m and ys[j] <= v:
            j += 1
        d = max(d, abs(i / n - j / m))
    en = math.sqrt(n * m / (n + m))
    return d, kolmogorov_q((en + 0.12 + 0.11 / en) * d)


def categorical_drift(
    reference: Iterable[str], recent: Iterable[str]
) -> tuple[Drift, Counter[str], Counter[str]]:
    """PSI of two windows of category values; also returns both windows' counts."""
    ref, rec = Counter(reference), Counter(recent)
    n_ref, n_rec = sum(ref.values()), sum(rec.values())
    value = psi(ref, rec)
    if min(n_ref, n_rec) < MIN_SAMPLES:
        state = "insufficient"
    else:
        state = "alert" if value > PSI_ALERT else "warn" if value > PSI_WARN else "ok"
    return Drift("psi", value, None, state, n_ref, n_rec), ref, rec


def numeric_drift(reference: Sequence[float], recent: Sequence[float]) -> Drift:
    """Kolmogorov-Smirnov comparison of two windows of a measurement."""
    if min(len(reference), len(recent)) < MIN_SAMPLES:
        d, p = ks_2samp(reference, recent) if reference and recent else (0.0, 1.0)
        return Drift("ks", d, p, "insufficient", len(reference), len(recent))
    d, p = ks_2samp(reference, recent)
    state = "alert" if p < KS_ALERT_P else "warn" if p < KS_WARN_P else "ok"
    return Drift("ks", d, p, state, len(reference), len(recent))


def worst(states: Iterable[str]) -> str:
    """The worst of drift states (``insufficient`` when there are none)."""
    return max(states, key=STATES.index, default="insufficient")
