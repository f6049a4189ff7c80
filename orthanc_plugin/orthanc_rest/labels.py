"""Study labels for reviews (Orthanc >= 1.12 has labels; 1.10 answers 404 and is left alone).

``ai-reviewed`` marks a study whose AI result a person accepted or edited, ``ai-rejected`` one
whose result was rejected; the latest review decides, so the other label is removed.
"""

from __future__ import annotations

import contextlib
import logging

from orthanc_plugin.orthanc_rest.client import OrthancClient, OrthancError

log = logging.getLogger("orthanc_ai.labels")

REVIEWED, REJECTED = "ai-reviewed", "ai-rejected"


def label_review(orthanc: OrthancClient, study_id: str, decision: str) -> bool:
    """Set the study's review label; False where this Orthanc has no labels."""
    keep, drop = (REJECTED, REVIEWED) if decision == "reject" else (REVIEWED, REJECTED)
    try:
        orthanc.request("PUT", f"/studies/{study_id}/labels/{keep}", f"label study {keep}", content=b"")
    except OrthancError as e:
        if e.status in (400, 404, 405):
            log.debug("study labels are not supported by this Orthanc (HTTP %s)", e.status)
            return False
        raise
    with contextlib.suppress(OrthancError):
        orthanc.request("DELETE", f"/studies/{study_id}/labels/{drop}", f"unlabel study {drop}")
    return True
