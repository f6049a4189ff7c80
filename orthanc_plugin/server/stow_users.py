"""Who stored an instance through STOW-RS: the authenticated HTTP user, for crediting an edit.

Orthanc records the storing user (``HttpUsername`` metadata) for a REST upload, but not for a
STOW-RS: the DICOMweb plugin (1.7 on Orthanc 1.10, 1.20 on 1.12) stores each part through
Orthanc's internal REST API, where no user is known. Two callbacks of the Python plugin close
that gap, both available since plugin 3.1 (Debian 12 ships 4.0, Debian 13 5.0):

- the incoming-request filter runs for every HTTP request after Orthanc has checked the
  credentials, in the HTTP server thread that then serves the request: for a
  ``POST /dicom-web/studies[/{uid}]`` it notes the user against that thread;
- the stored-instance callback runs in the thread that stores, which for a STOW-RS is the same
  HTTP thread (the DICOMweb plugin stores synchronously while serving the request): it records
  the noted user against the new instance in the job store (``stored-by:<instance id>``),
  where the intake reads it when it looks for revised SEGs.

Every other request clears the thread's note, so a thread reused by Orthanc for another
request, a C-STORE (its own threads) or a job never inherits a user. Only users whose
credentials match ``RegisteredUsers`` are noted: without authentication nobody is (the
``Authorization`` header is then unchecked and could name anyone).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

from orthanc_plugin.intake.revisions import stored_by_key

log = logging.getLogger("orthanc_ai.server.stow_users")


class StowUsers:
    """Notes the user of each STOW-RS request and records it for the instances it stores."""

    def __init__(
        self,
        authenticate: Callable[[Mapping[str, Any]], str | None],
        record: Callable[[str, str], None],
        dicomweb_root: str = "/dicom-web/",
    ) -> None:
        self._authenticate = authenticate
        self._record = record
        root = "/" + dicomweb_root.strip("/") + "/"
        self._path = re.compile(re.escape(root) + r"studies(/[0-9]+(\.[0-9]+)*)?/?")
        self._users: dict[int, str] = {}  # HTTP thread -> the user of its STOW-RS in progress
        self._lock = threading.Lock()

    def on_request(self, uri: str, method: str, headers: Mapping[str, Any]) -> None:
        """The incoming-request filter's part (it never refuses anything itself)."""
        ident = threading.get_ident()
        user = None
        if method.upper() == "POST" and self._path.fullmatch(uri):
            user = self._authenticate(headers)
        with self._lock:
            if user is None:
                self._users.pop(ident, None)
            else:
                self._users[ident] = user

    def on_stored(self, instance_id: str) -> str | None:
        """The stored-instance callback's part: the user recorded for ``instance_id``, if any."""
        with self._lock:
            user = self._users.get(threading.get_ident())
        if user is None:
            return None
        self._record(stored_by_key(instance_id), user)
        return user


def method_name(method: Any) -> str:
    """The HTTP method as the Python plugin hands it (an ``orthanc.HttpMethod`` number or a name)."""
    if isinstance(method, str):
        return method
    # orthanc.HttpMethod: GET=1, POST=2, PUT=3, DELETE=4
    return {1: "GET", 2: "POST", 3: "PUT", 4: "DELETE"}.get(int(method), str(method))
