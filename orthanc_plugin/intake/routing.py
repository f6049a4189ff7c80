"""Routing: which pipelines run on a study, on which series, and why (or why not).

Pure logic over series descriptions; it knows nothing of Orthanc's API or of Triton.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from orthanc_plugin.core.config import Condition, InputRole, PipelineConfig

# Series we wrote ourselves are never inputs, whatever a rule says.
OWN_MANUFACTURER = "orthanc-ai"
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "DOC", "RTSTRUCT", "REG", "OT"})
#: multi-frame SOP classes whose frames the worker reads as slices (imaging.multiframe)
ENHANCED_IMAGE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
    }
)


@dataclass(frozen=True)
class SeriesInfo:
    """What routing needs to know about one series."""

    orthanc_id: str
    series_instance_uid: str
    tags: Mapping[str, str]
    instance_ids: tuple[str, ...]

    def value(self, keyword: str) -> str | None:
        if keyword == "ImageCount":
            # Slices: the frames of an enhanced multi-frame series count one each.
            frames = _number(self.tags.get("NumberOfFrames") or "1")
            if self.tags.get("SOPClassUID") in ENHANCED_IMAGE_CLASSES and frames is not None and frames > 1:
                return str(len(self.instance_ids) * int(frames))
            return str(len(self.instance_ids))
        return self.tags.get(keyword)

    def label(self) -> str:
        desc = self.tags.get("SeriesDescription", "")
        num = self.tags.get("SeriesNumber", "?")
        return f"#{num} '{desc}'" if desc else f"#{num}"


@dataclass(frozen=True)
class StudyInfo:
    orthanc_id: str
    study_instance_uid: str
    tags: Mapping[str, str]
    series: tuple[SeriesInfo, ...]


@dataclass(frozen=True)
class RoleResult:
    role: str
    required: bool
    chosen: SeriesInfo | None
    reason: str
    rejected: dict[str, list[str]] = field(default_factory=dict)  # series label -> failed conditions
    # Series that fit equally well when the role says ambiguity is an error (none chosen then).
    ambiguous: tuple[SeriesInfo, ...] = ()


@dataclass(frozen=True)
class RouteDecision:
    pipeline: str
    matched: bool
    roles: tuple[RoleResult, ...]
    reason: str
    # The pipeline applies to this study (some of its inputs are there) but cannot run: a
    # required role is missing or ambiguous. Intake records this as a failed job so the admin
    # sees which role and why; a study none of whose series fits gets no job at all.
    problem: str | None = None
    # Each study-level condition (study_where) with the study's value and whether it holds.
    study_checks: tuple[str, ...] = ()

    def chosen(self) -> dict[str, SeriesInfo]:
        return {r.role: r.chosen for r in self.roles if r.chosen is not None}

    def to_json(self) -> dict[str, object]:
        return {
            "pipeline": self.pipeline,
            "matched": self.matched,
            "reason": self.reason,
            "problem": self.problem,
            "study": list(self.study_checks),
            "roles": [
                {
                    "role": r.role,
                    "required": r.required,
                    "series": None
                    if r.chosen is None
                    else {"ID": r.chosen.orthanc_id, "SeriesInstanceUID": r.chosen.series_instance_uid},
                    "reason": r.reason,
                    "rejected": r.rejected,
                    "ambiguous": [
                        {"ID": s.orthanc_id, "SeriesInstanceUID": s.series_instance_uid, "label": s.label()}
                        for s in r.ambiguous
                    ],
                }
                for r in self.roles
            ],
        }


def _values(v: str | list[str]) -> list[str]:
    return [v] if isinstance(v, str) else list(v)


def _number(text: str) -> float | None:
    # Multi-valued DICOM strings use a backslash; numeric rules look at the first value.
    try:
        return float(text.split("\\")[0].strip())
    except ValueError:
        return None


def check_condition(keyword: str, cond: Condition, value: str | None) -> list[str]:
    """Return the failed parts of ``cond`` for ``value`` (empty when it holds)."""
    failed: list[str] = []
    shown = "missing" if value is None else repr(value)
    if cond.present is not None and (value is not None and value != "") != cond.present:
        failed.append(f"{keyword} is {shown}, rule wants it {'present' if cond.present else 'absent'}")
    if value is None:
        if any(x is not None for x in (cond.equals, cond.matches, cond.min, cond.max)):
            failed.append(f"{keyword} is missing")
        return failed
    v = value.strip()
    if cond.equals is not None and v.upper() not in {e.upper() for e in _values(cond.equals)}:
        failed.append(f"{keyword} is {shown}, rule wants {cond.equals!r}")
    if cond.not_equals is not None and v.upper() in {e.upper() for e in _values(cond.not_equals)}:
        failed.append(f"{keyword} is {shown}, rule excludes {cond.not_equals!r}")
    if cond.matches is not None and re.search(cond.matches, v) is None:
        failed.append(f"{keyword} is {shown}, does not match /{cond.matches}/")
    if cond.not_matches is not None and re.search(cond.not_matches, v) is not None:
        failed.append(f"{keyword} is {shown}, matches excluded /{cond.not_matches}/")
    if cond.min is not None or cond.max is not None:
        num = _number(v)
        if num is None:
            failed.append(f"{keyword} is {shown}, not a number")
        else:
            if cond.min is not None and num < cond.min:
                failed.append(f"{keyword} is {num:g}, below minimum {cond.min:g}")
            if cond.max is not None and num > cond.max:
                failed.append(f"{keyword} is {num:g}, above maximum {cond.max:g}")
    return failed


def _series_failures(role: InputRole, s: SeriesInfo) -> list[str]:
    if s.tags.get("Manufacturer", "") == OWN_MANUFACTURER:
        return ["series was written by orthanc-ai"]
    if role.where.get("Modality") is None and s.tags.get("Modality", "").upper() in NON_IMAGE_MODALITIES:
        return [f"Modality is {s.tags.get('Modality')!r}, not an image series"]
    failed: list[str] = []
    for kw, cond in role.where.items():
        failed += check_condition(kw, cond, s.value(kw))
    for kw, cond in role.exclude.items():
        if not check_condition(kw, cond, s.value(kw)):
            failed.append(f"excluded by rule on {kw} (value {s.value(kw)!r})")
    frames = _number(s.tags.get("NumberOfFrames") or "1")
    if frames is not None and frames > 1 and s.tags.get("SOPClassUID") not in ENHANCED_IMAGE_CLASSES:
        # The volume is built from single-frame slices; an enhanced (multi-frame) series would
        # otherwise be rejected only as "ImageCount is 1", which tells an admin nothing.
        failed.append(
            f"instances are multi-frame (NumberOfFrames {frames:g}) of SOP class {s.tags.get('SOPClassUID', '?')}:"
            " only Enhanced and Legacy Converted Enhanced CT and MR multi-frame images are read"
        )
    return failed


def _prefer(role: InputRole, candidates: list[SeriesInfo]) -> tuple[list[SeriesInfo], list[str]]:
    """Apply the preferences in order; the first that separates the candidates decides.

    Returns the candidates still tied (a single one when the preferences decided) and why."""
    pool = candidates
    reasons: list[str] = []
    for pref in role.prefer:
        if len(pool) == 1:
            break
        if pref.matches is not None:
            hit = [s for s in pool if re.search(pref.matches, s.value(pref.attribute) or "")]
            if hit and len(hit) < len(pool):
                why = pref.reason or f"{pref.attribute} matches /{pref.matches}/"
                vals = ", ".join(f"{s.label()}={s.value(pref.attribute)!r}" for s in pool)
                reasons.append(f"preferred {why} ({vals})")
                pool = hit
        else:
            nums = [(_number(s.value(pref.attribute) or "") or float("nan"), s) for s in pool]
            valid = [(n, s) for n, s in nums if n == n]
            if valid:
                best = max(n for n, _ in valid) if pref.order == "max" else min(n for n, _ in valid)
                hit = [s for n, s in valid if n == best]
                if len(hit) < len(pool):
                    why = pref.reason or f"{pref.order} {pref.attribute}"
                    reasons.append(f"preferred {why} ({pref.attribute}={best:g})")
                    pool = hit
    return sorted(pool, key=lambda s: s.series_instance_uid), reasons


def select_role(role: InputRole, series: Sequence[SeriesInfo]) -> RoleResult:
    """Pick the series for one role, or say why none fits."""
    rejected: dict[str, list[str]] = {}
    candidates: list[SeriesInfo] = []
    for s in series:
        failures = _series_failures(role, s)
        if failures:
            rejected[s.label()] = failures
        else:
            candidates.append(s)
    if not candidates:
        return RoleResult(role.role, role.required, None, "no series satisfies the rule", rejected)
    pool, reasons = _prefer(role, candidates)
    if len(pool) > 1:
        labels = ", ".join(s.label() for s in pool)
        if role.ambiguous == "fail":
            return RoleResult(
                role.role, role.required, None,
                f"ambiguous: {len(pool)} series fit equally well ({labels}); narrow 'where' or add a "
                "'prefer' rule that separates them", rejected, tuple(pool),
            )  # fmt: skip
        # Deterministic last resort so a re-run picks the same series; said in the reason.
        reasons.append(f"{len(pool)} series equally good ({labels}), took the first by SeriesInstanceUID")
    chosen, why = pool[0], "; ".join(reasons)
    base = f"chose {chosen.label()} ({chosen.series_instance_uid})"
    if len(candidates) == 1:
        reason = f"{base}: the only series that satisfies the rule"
    else:
        reason = f"{base} among {len(candidates)} matching series: {why}"
    return RoleResult(role.role, role.required, chosen, reason, rejected)


def _why_missing(r: RoleResult) -> str:
    if not r.rejected:
        return "the study has no series"
    parts = [f"{label}: {'; '.join(failed)}" for label, failed in r.rejected.items()]
    return "no series satisfies the rule (" + " | ".join(parts) + ")"


def study_checks(pipeline: PipelineConfig, study: StudyInfo) -> tuple[str, ...]:
    """For the dry-run: each ``study_where`` condition, the study's value, and whether it holds."""
    out = []
    for kw, cond in pipeline.study_where.items():
        value = study.tags.get(kw)
        rule = ", ".join(f"{k} {v!r}" for k, v in cond.model_dump(exclude_none=True).items())
        failed = check_condition(kw, cond, value)
        shown = "missing" if value is None else repr(value)
        out.append("fails: " + "; ".join(failed) if failed else f"holds: {kw} is {shown} ({rule})")
    return tuple(out)


def route(pipeline: PipelineConfig, study: StudyInfo) -> RouteDecision:
    """Decide whether ``pipeline`` runs on ``study`` and with which series (and say why)."""
    decision = _route(pipeline, study)
    if not pipeline.enabled or not pipeline.study_where:
        return decision
    return replace(decision, study_checks=study_checks(pipeline, study))


def _route(pipeline: PipelineConfig, study: StudyInfo) -> RouteDecision:
    if not pipeline.enabled:
        return RouteDecision(pipeline.name, False, (), "pipeline is disabled")
    study_failed: list[str] = []
    for kw, cond in pipeline.study_where.items():
        study_failed += check_condition(kw, cond, study.tags.get(kw))
    if study_failed:
        return RouteDecision(pipeline.name, False, (), "study: " + "; ".join(study_failed))
    roles = tuple(select_role(r, study.series) for r in pipeline.inputs)
    # One series cannot fill two roles: that would be an ambiguous configuration, not a match.
    used: dict[str, str] = {}
    for r in roles:
        if r.chosen is not None:
            if r.chosen.orthanc_id in used:
                return RouteDecision(
                    pipeline.name,
                    False,
                    roles,
                    f"series {r.chosen.label()} fits both role '{used[r.chosen.orthanc_id]}' and '{r.role}'",
                )
            used[r.chosen.orthanc_id] = r.role
    missing = [r for r in roles if r.required and r.chosen is None]
    if missing:
        reason = "required role(s) without a series: " + ", ".join(r.role for r in missing)
        applies = any(r.chosen is not None or r.ambiguous for r in roles)
        problem = None
        if applies:
            problem = "; ".join(
                f"role '{r.role}' " + (r.reason if r.ambiguous else "is missing: " + _why_missing(r))
                for r in missing
            )
        return RouteDecision(pipeline.name, False, roles, reason, problem)
    return RouteDecision(pipeline.name, True, roles, "all required roles found")
