"""Read side of our FHIR reports, for ``/ai/fhir/...``: the resources as this plugin made them.

The reports live in the job store (``jobs.fhir``, the transaction Bundle of each job). A
resource is served with its own uuid as ``id`` (the uuid of its ``urn:ietf:rfc:3986 |
urn:uuid:`` identifier), and in-bundle references (to entries' ``fullUrl``) become
``Type/<uuid>``, readable here as well. The EHR gives the same resources ids of its own; the
identifier is what both share.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from orthanc_plugin.core.errors import BadRequest, NotFound
from orthanc_plugin.fhir.report import DICOM_UID_SYSTEM, URI_SYSTEM
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
    """The bundle's resources with ``id`` set to their identifier's uuid and references to
    ``urn:uuid:`` fullUrls made ``Type/id``."""
    ids: dict[str, str] = {}  # fullUrl -> Type/id
    for entry in bundle.get("entry", []):
        rid = _own_id(entry["resource"])
        if rid is not None and entry.get("fullUrl"):
            ids[entry["fullUrl"]] = f"{entry['resource']['resourceType']}/{rid}"
    out = []
    for entry in bundle.get("entry", []):
        resource = _rewrite(entry["resource"], ids)
        rid = _own_id(resource)
        if rid is not None:
            resource = {"resourceType": resource["resourceType"], "id": rid} | {
                k: v for k, v in resource.items() if k != "resourceType"
            }
        out.append(resource)
    return out


def _own_id(resource: dict[str, Any]) -> str | None:
    """The uuid of the resource's ``urn:ietf:rfc:3986 | urn:uuid:`` identifier, if any."""
    for ident in resource.get("identifier", []):
        value = ident.get("value", "")
        if ident.get("system") == URI_SYSTEM and value.startswith("urn:uuid:"):
            return str(value.removeprefix("urn:uuid:"))
    return None


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
