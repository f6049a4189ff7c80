"""Read side of our FHIR reports, for ``/ai/fhir/...``: the resources as this plugin made them.

The reports live in the job store (``jobs.fhir``, the transaction Bundle of each job). A
resource is served with its own uuid as ``id`` (the uuid of its ``urn:uuid:`` fullUrl and
identifier), and in-bundle references become ``Type/<uuid>``, readable here as well. The EHR
gives the same resources ids of its own; the identifier is what both share.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from orthanc_plugin.core.errors import BadRequest, NotFound
from orthanc_plugin.fhir.report import DICOM_UID_SYSTEM
from orthanc_plugin.jobs.database import Database, DatabaseTarget

#: Resource types a report bundle holds.
TYPES = ("DiagnosticReport", "Observation", "Device")
_SEARCH_PARAMS = frozenset({"study", "_count", "_format"})


class FhirReports:
    """Search and read the resources of the reports stored in the job store at ``path``."""

    def __init__(self, path: DatabaseTarget, busy_timeout_s: float = 30.0) -> None:
        self.path = path
        self._db = Database(path, busy_timeout_s)

    def close(self) -> None:
        self._db.close()

    def search(self, query: Mapping[str, str]) -> dict[str, Any]:
        """Searchset Bundle of the DiagnosticReports, newest first.

        ``study`` takes a StudyInstanceUID, ``urn:oid:<uid>`` or ``urn:dicom:uid|urn:oid:<uid>``;
        without it, the latest reports of all studies. ``_count`` limits (default 100).
        """
        unknown = sorted(set(query) - _SEARCH_PARAMS)
        if unknown:
            raise BadRequest(
                f"unsupported search parameter(s) {', '.join(unknown)}; supported: study, _count"
            )
        count_text = query.get("_count", "100")
        if not count_text.isdigit():
            raise BadRequest("_count must be a number")
        count = min(int(count_text), 1000)
        sql, args = "SELECT fhir FROM jobs WHERE fhir IS NOT NULL", []
        study = query.get("study")
        if study:
            sql += " AND study_uid=?"
            args.append(_study_uid(study))
        sql += " ORDER BY updated DESC LIMIT ?"
        reports = []
        for row in self._db.execute(sql, (*args, count)).fetchall():
            for resource in _resources(json.loads(row["fhir"])):
                if resource["resourceType"] == "DiagnosticReport":
                    reports.append(resource)
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(reports),
            "entry": [
                {
                    # Absolute, as FHIR wants, without knowing how Orthanc is reached.
                    "fullUrl": f"urn:uuid:{r.get('id')}",
                    "resource": r,
                    "search": {"mode": "match"},
                }
                for r in reports
            ],
        }

    def read(self, resource_type: str, rid: str) -> dict[str, Any]:
        """One resource by type and uuid; ``KeyError`` when we made no such resource."""
        if resource_type not in TYPES:
            raise NotFound(f"{resource_type}/{rid}")
        try:
            rid = str(uuid.UUID(rid))
        except ValueError:
            raise NotFound(f"{resource_type}/{rid}") from None
        # The uuid is unique to one resource (a Device's is shared by the jobs of one model
        # version, with identical content): the newest bundle that names it has it.
        rows = self._db.execute(
            "SELECT fhir FROM jobs WHERE fhir IS NOT NULL AND fhir LIKE ? ORDER BY updated DESC LIMIT 5",
            (f"%urn:uuid:{rid}%",),  # a canonical uuid holds no LIKE wildcard
        ).fetchall()
        for row in rows:
            for resource in _resources(json.loads(row["fhir"])):
                if resource["resourceType"] == resource_type and resource.get("id") == rid:
                    return resource
        raise NotFound(f"{resource_type}/{rid}")


def _study_uid(value: str) -> str:
    system, sep, uid = value.rpartition("|")
    if sep and system not in ("", DICOM_UID_SYSTEM):
        raise BadRequest(f"study: identifier system {system!r} is not {DICOM_UID_SYSTEM}")
    uid = uid.removeprefix("urn:oid:")
    if not uid or not all(part.isdigit() for part in uid.split(".")):
        raise BadRequest(f"study: {value!r} is not a DICOM UID")
    return uid


def _resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The bundle's resources with ``id`` set and ``urn:uuid:`` references made ``Type/id``."""
    ids: dict[str, str] = {}
    for entry in bundle.get("entry", []):
        full_url = entry.get("fullUrl", "")
        if full_url.startswith("urn:uuid:"):
            ids[full_url] = f"{entry['resource']['resourceType']}/{full_url.removeprefix('urn:uuid:')}"
    out = []
    for entry in bundle.get("entry", []):
        resource = _rewrite(entry["resource"], ids)
        full_url = entry.get("fullUrl", "")
        if full_url in ids:
            resource = {"resourceType": resource["resourceType"], "id": ids[full_url].split("/", 1)[1]} | {
                k: v for k, v in resource.items() if k != "resourceType"
            }
        out.append(resource)
    return out


def _rewrite(value: Any, ids: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _rewrite(v, ids) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in ids:
            out["reference"] = ids[ref]
        return out
    if isinstance(value, list):
        return [_rewrite(v, ids) for v in value]
    return value
