"""A review's FHIR update: the job's report and observations, the same resources, updated.

The job's own bundle (:func:`~orthanc_plugin.fhir.report.build_diagnostic_report`) created the
DiagnosticReport and its Observations, each with an identifier derived from the job key. A
review sends the same resources again as conditional updates on those identifiers
(``PUT DiagnosticReport?identifier=...`` in a transaction), so the EHR keeps one report whose
status moves on, never a second report:

- accept: ``final``; the reviewer is the report's ``resultsInterpreter`` (R4 and R5 both
  have the element; a display-only reference, the EHR's practitioner id is not known here);
- edit: ``amended`` with the values measured on the edited segmentation (``corrected`` is
  the narrower child of ``amended`` for a fix after a final release; a preliminary AI
  result edited before sign-off is the generic case, so ``amended``);
- reject: ``entered-in-error``, with the reason as the conclusion. R4 and R5 define that
  code for "withdrawn following a previous release ... should never have existed", which
  is what a wrong AI result is: consumers must not use it. ``cancelled`` would say the
  examination was not done, which is false.

The Device entry stays a conditional create: the algorithm does not change with a review.
"""

from __future__ import annotations

import copy
import datetime as dt
import html
from collections.abc import Mapping
from typing import Any

from orthanc_plugin.fhir.report import URI_SYSTEM, validate_bundle

#: DiagnosticReport and Observation status per decision.
STATUS = {"accept": "final", "edit": "amended", "reject": "entered-in-error"}


def review_bundle(
    original: dict[str, Any],
    decision: str,
    reviewer: str,
    when: dt.datetime,
    reason: str | None = None,
    volumes_ml: Mapping[str, float] | None = None,
    fhir_version: str = "R4",
) -> dict[str, Any]:
    """The transaction Bundle that updates ``original`` (a job's bundle) after a review.

    ``volumes_ml`` (an edit) maps an Observation's ``code.text`` (e.g. ``"Lung volume"``, as
    the job's bundle names it) to its new value. Raises ``ValueError`` for an unknown
    decision, a naive ``when``, or a volume for an observation the report does not have.
    """
    if decision not in STATUS:
        raise ValueError(f"decision must be one of {', '.join(STATUS)}, got {decision!r}")
    if when.utcoffset() is None:
        raise ValueError("when must carry a time zone (FHIR instant)")
    status = STATUS[decision]
    issued = when.isoformat(timespec="milliseconds")
    volumes = dict(volumes_ml or {})
    bundle = copy.deepcopy(original)
    seen: set[str] = set()
    rows: list[str] = []
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        kind = resource["resourceType"]
        if kind == "Device":
            continue
        (identifier,) = [i["value"] for i in resource["identifier"] if i.get("system") == URI_SYSTEM]
        entry["request"] = {"method": "PUT", "url": f"{kind}?identifier={URI_SYSTEM}|{identifier}"}
        resource["status"] = status
        resource["issued"] = issued
        if kind == "Observation":
            name = (resource.get("code") or {}).get("text", "")
            if name in volumes and "valueQuantity" in resource:
                resource["valueQuantity"]["value"] = round(float(volumes[name]), 3)
                seen.add(name)
            value = resource.get("valueQuantity", {}).get("value")
            rows.append(f"{name}: {value} mL" if value is not None else name)
            resource["text"] = _text(
                f"{name}: {value} mL" if value is not None else name, decision, reviewer, reason
            )
        else:  # DiagnosticReport
            resource["resultsInterpreter"] = [{"display": reviewer}]
            if decision == "reject":
                resource["conclusion"] = f"Rejected by {reviewer}: {reason}. The AI result must not be used."
            elif decision == "edit":
                resource["conclusion"] = f"AI segmentation edited and verified by {reviewer}."
            else:
                resource["conclusion"] = f"AI result accepted and verified by {reviewer}."
    unknown = set(volumes) - seen
    if unknown:
        raise ValueError(f"no observation named {', '.join(sorted(unknown))} in the report")
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        if resource["resourceType"] == "DiagnosticReport":
            resource["text"] = {
                "status": "generated",
                "div": _div(
                    f"<p>{html.escape(_what(decision, reviewer, reason))}</p><ul>"
                    + "".join(f"<li>{html.escape(r)}</li>" for r in rows)
                    + "</ul>"
                ),
            }
    validate_bundle(bundle, fhir_version)
    return bundle


def _what(decision: str, reviewer: str, reason: str | None) -> str:
    if decision == "accept":
        return f"AI results accepted and verified by {reviewer}."
    if decision == "edit":
        return f"AI segmentation edited by {reviewer}; the values are measured on the edited segmentation."
    return f"AI results rejected by {reviewer} ({reason}): they must not be used."


def _text(line: str, decision: str, reviewer: str, reason: str | None) -> dict[str, str]:
    return {
        "status": "generated",
        "div": _div(f"<p>{html.escape(line)}</p><p>{html.escape(_what(decision, reviewer, reason))}</p>"),
    }


def _div(body: str) -> str:
    return f'<div xmlns="http://www.w3.org/1999/xhtml">{body}</div>'
