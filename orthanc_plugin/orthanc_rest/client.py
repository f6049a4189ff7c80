"""Orthanc REST API as the workers use it: read instances, store outputs, delete them."""

from __future__ import annotations

import base64
import functools
import http.client
import io
import threading
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from orthanc_plugin.imaging.volume import default_pixels

# Orthanc errors (its "OrthancStatus") that mean "these pixels cannot be decoded", not "try again":
# NotImplemented (no codec for the transfer syntax), NotEnoughMemory (absurd dimensions),
# BadFileFormat, CorruptedFile, IncompatibleImageFormat, IncompatibleImageSize.
_UNDECODABLE = {2, 4, 15, 20, 23, 24}


class OrthancError(RuntimeError):
    """Orthanc answered with an error or could not be reached."""

    def __init__(self, message: str, status: int | None = None, orthanc_status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.orthanc_status = orthanc_status


class PixelDecodeError(ValueError):
    """The pixel data of an instance cannot be decoded (corrupt, no codec): bad input, not a retry."""


@functools.cache
def _decodes_locally(transfer_syntax: str) -> bool:
    """Whether pydicom has a working decoder for the syntax (native, RLE; JPEG-LS through pyjpegls,
    JPEG 2000 and JPEG baseline through Pillow, both highdicom dependencies)."""
    try:
        return bool(get_decoder(UID(transfer_syntax)).is_available)
    except (NotImplementedError, ValueError):
        return False


class _FileReader:
    """GET of whole DICOM files over plain HTTP with ``http.client`` and a small pool of
    kept-alive connections (a thread takes one, uses it, puts it back).

    httpx spends more time in Python per byte received: on 320 CT instances of 0.5 MB from a
    local Orthanc, 0.35 s against 0.14 s with http.client (``bench/fetch_transport.py``).
    """

    POOL = 8

    def __init__(self, url: str, headers: dict[str, str], timeout_s: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.headers = headers
        self.timeout_s = timeout_s
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in (1, 2):
            conn = None
            if attempt == 1:
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                conn.request("GET", self.prefix + path, headers=self.headers)
                r = conn.getresponse()
                body = r.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                # Orthanc closes idle kept-alive connections after a second: the others in the
                # pool are as old, so drop them all and try once on a fresh connection.
                if not reused:
                    raise
                self.close()
                continue
            if r.will_close:
                conn.close()
            else:
                with self._lock:
                    if len(self._idle) < self.POOL:
                        self._idle.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()
            return r.status, body
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class OrthancClient:
    def __init__(
        self, url: str, username: str | None = None, password: str | None = None, timeout_s: float = 60.0
    ) -> None:
        auth = httpx.BasicAuth(username, password or "") if username else None
        self.url = url.rstrip("/")
        # DICOM files barely compress, and gzip on both ends cost more than the bytes saved.
        headers = {"Accept-Encoding": "identity"}
        self._http = httpx.Client(base_url=self.url, auth=auth, timeout=timeout_s, headers=headers)
        # Instance files over plain HTTP take the faster reader; HTTPS stays on httpx (its
        # certificate handling is the one the rest of the client uses).
        self._files: _FileReader | None = None
        if self.url.startswith("http://"):
            file_headers = dict(headers)
            if username:
                token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
                file_headers["Authorization"] = f"Basic {token}"
            self._files = _FileReader(self.url, file_headers, timeout_s)

    def close(self) -> None:
        self._http.close()
        if self._files is not None:
            self._files.close()

    def _check(self, r: httpx.Response, what: str) -> httpx.Response:
        if r.status_code >= 400:
            detail = ""
            orthanc_status = None
            try:
                body = r.json()
                detail = body.get("Details") or body.get("Message") or ""
                orthanc_status = body.get("OrthancStatus")
            except (ValueError, AttributeError):
                detail = r.text[:200]
            raise OrthancError(
                f"Orthanc refused {what}: HTTP {r.status_code} {detail}".strip(),
                r.status_code,
                orthanc_status if isinstance(orthanc_status, int) else None,
            )
        return r

    def request(self, method: str, path: str, what: str, **kw: Any) -> httpx.Response:
        """One REST call (``what`` names it in errors); a dropped kept-alive connection is retried once.

        Raises :class:`OrthancError` with Orthanc's own status and message on an error answer.
        """
        for attempt in (1, 2):
            try:
                r = self._http.request(method, path, **kw)
                break
            except (httpx.RemoteProtocolError, httpx.ConnectError) as e:
                # A kept-alive connection closed by Orthanc in the meantime: one fresh try. Storing
                # is idempotent too (same SOPInstanceUID, OverwriteInstances).
                if attempt == 2:
                    raise OrthancError(
                        f"Orthanc unreachable at {self.url} while trying to {what}: {e}"
                    ) from e
            except httpx.HTTPError as e:
                raise OrthancError(f"Orthanc unreachable at {self.url} while trying to {what}: {e}") from e
        return self._check(r, what)

    def get_json(self, path: str) -> Any:
        return self.request("GET", path, f"GET {path}").json()

    def put(self, path: str) -> None:
        """PUT with an empty body (e.g. a study label)."""
        self.request("PUT", path, f"PUT {path}", content=b"")

    def delete(self, path: str) -> None:
        self.request("DELETE", path, f"DELETE {path}")

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json("/system")
        return result

    def instance_file(self, instance_id: str) -> bytes:
        path, what = f"/instances/{instance_id}/file", f"read instance {instance_id}"
        try:
            if self._files is None:
                r = self.request("GET", path, what)
            else:
                try:
                    status, body = self._files.get(path)
                except (http.client.HTTPException, OSError) as e:
                    raise OrthancError(
                        f"Orthanc unreachable at {self.url} while trying to {what}: {e}"
                    ) from e
                if status < 400:
                    return body
                r = self._check(httpx.Response(status, content=body), what)
        except OrthancError as e:
            if e.status == 404:
                raise OrthancError(
                    f"instance {instance_id} is no longer in Orthanc: it (or its study) was deleted while the"
                    " job ran",
                    404,
                ) from e
            raise
        return r.content

    def instance_numpy(self, instance_id: str) -> NDArray[np.generic]:
        """Stored pixel values decoded by Orthanc (its DCMTK codecs: JPEG lossless, JPEG-LS, RLE...).

        ``rescale=0``: Orthanc would otherwise apply RescaleSlope/Intercept itself (float32 HU),
        and the volume applies them again.
        """
        try:
            r = self.request(
                "GET", f"/instances/{instance_id}/numpy?rescale=0", f"decode instance {instance_id}"
            )
        except OrthancError as e:
            refused = e.status is not None and 400 <= e.status < 500 and e.status != 404
            if e.orthanc_status in _UNDECODABLE or refused:
                raise PixelDecodeError(f"Orthanc cannot decode it: {e}") from e
            raise
        arr = np.load(io.BytesIO(r.content), allow_pickle=False)
        return np.asarray(arr).reshape(
            arr.shape[-3:-1] if arr.ndim >= 3 and arr.shape[-1] == 1 else arr.shape
        )

    def read_instances(self, instance_ids: Sequence[str], threads: int = 4) -> list[Dataset]:
        """Download and parse instances (in parallel; order of ``instance_ids`` kept)."""

        def one(iid: str) -> Dataset:
            ds = pydicom.dcmread(io.BytesIO(self.instance_file(iid)))
            ds.buffer = None  # pydicom keeps the file it parsed: a second copy of the pixel data
            ds.orthanc_id = iid  # remembered so pixels can be decoded by Orthanc if needed
            return ds

        if len(instance_ids) <= 1:
            return [one(i) for i in instance_ids]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(one, instance_ids))

    def pixels(self, ds: Dataset) -> NDArray[np.generic]:
        """Stored pixel values of a single-frame instance: decoded here when pydicom has a decoder
        for its transfer syntax, else by Orthanc. Corrupt or undecodable pixels raise
        :class:`PixelDecodeError` (a ValueError); Orthanc being unreachable raises OrthancError."""
        ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
        iid = getattr(ds, "orthanc_id", None)
        if iid is None or _decodes_locally(ts):
            try:
                return default_pixels(ds)
            except (ValueError, NotImplementedError, RuntimeError) as e:
                # pydicom: truncated or inconsistent pixel data, a broken codestream.
                raise PixelDecodeError(str(e).splitlines()[0]) from e
        return self.instance_numpy(iid)

    def store(self, ds: Dataset) -> dict[str, Any]:
        """Store one instance; Orthanc must run with OverwriteInstances so a retry replaces."""
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        r = self.request(
            "POST", "/instances", f"store {ds.get('Modality', '')} instance", content=buf.getvalue(),
            headers={"Content-Type": "application/dicom"},
        )  # fmt: skip
        result: dict[str, Any] = r.json()
        # A filter (Lua ReceivedInstanceFilter, a plugin) discards with HTTP 200 and a Status.
        status = result.get("Status")
        if status not in (None, "Success", "AlreadyStored"):
            raise OrthancError(
                f"Orthanc refused to store the {ds.get('Modality', '')} instance: Status {status} "
                "(discarded by a filter such as a Lua ReceivedInstanceFilter or a plugin)",
                r.status_code,
            )
        return result

    def delete_instance(self, instance_id: str) -> None:
        self.request("DELETE", f"/instances/{instance_id}", f"delete instance {instance_id}")

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        r = self.request("POST", "/tools/lookup", "look up a UID", content=uid.encode("ascii"))
        result: list[dict[str, Any]] = r.json()
        return result

    def series_exists(self, orthanc_series_id: str) -> bool:
        """Whether the series is still there. After storing, ask this of the *source* series:
        the study itself always exists again then, re-created by the outputs just stored."""
        return self._exists(f"/series/{orthanc_series_id}", "read the series")

    def study_exists(self, orthanc_study_id: str) -> bool:
        return self._exists(f"/studies/{orthanc_study_id}", "read the study")

    def _exists(self, path: str, what: str) -> bool:
        try:
            self.request("GET", path, what)
        except OrthancError as e:
            if e.status == 404:
                return False
            raise
        return True
