# SPDX-License-Identifier: AGPL-3.0-or-later
"""The viewer gateway: OHIF and Orthanc's DICOMweb on one origin.

Orthanc has no CORS option, so the OHIF viewer and DICOMweb must share an origin. The gateway
serves OHIF's prebuilt files (``index.html`` for client-side routes such as
``/viewer?StudyInstanceUIDs=...``) and the site's ``app-config.js`` at ``/app-config.js``, and
forwards reads of ``/dicom-web/`` and ``/wado`` to Orthanc with the browser's ``Host`` header, so
the BulkDataURIs that Orthanc writes into the metadata point back at this origin. Bodies are
streamed both ways.

One write passes: STOW-RS (``POST /dicom-web/studies[/{StudyInstanceUID}]``), which OHIF uses to
store a segmentation a reviewer corrected. Only from a page of one of the gateway's configured
origins (``Origin``, else ``Referer``; a form on another site cannot store), only as
``multipart/related``, and with the user's own credentials passed on: Orthanc's authentication
decides, and the plugin credits the edit to that user.

In production it runs behind the site's HTTPS reverse proxy (``docker-compose.yml``, service
``viewer``)::

    python -m orthanc_plugin viewer --orthanc http://orthanc:8042 --listen 0.0.0.0:3000 \
        --dist /opt/ohif/dist --config /opt/orthanc-ai/viewer/app-config.js --origin https://pacs.example

Locally ``devstack/viewer.py`` runs it on 127.0.0.1 (``make up``, the browser tests).
"""

from __future__ import annotations

import contextlib
import mimetypes
import re
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

# Python's table lacks these on some systems; a wrong type makes the browser refuse the module.
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".mjs")

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade"}
)  # fmt: skip
# The viewer reads; its one write is STOW-RS (a corrected SEG), on the two routes below and
# only from this origin. Anything else that writes or deletes goes to Orthanc directly, with its
# own authentication, never through a page's origin.
PROXIED_METHODS = ["GET", "HEAD"]
PROXIED_PREFIXES = ("/dicom-web/", "/wado/")
STOW_ROUTES = ("/dicom-web/studies", "/dicom-web/studies/{study_uid}")
UID = re.compile(r"[0-9]+(\.[0-9]+)*")
NO_CACHE = {"Cache-Control": "no-cache"}


class ViewerError(RuntimeError):
    """The viewer cannot be served (missing OHIF build, port taken, ...)."""


class _SpaFiles(StaticFiles):
    """Static files; a path without a file extension that is not a file gets ``index.html``."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            response = await super().get_response(path, scope)
        except HTTPException as e:
            # A missing asset (``x.js``) stays a 404 rather than HTML the browser cannot parse.
            if e.status_code != 404 or "." in path.rsplit("/", 1)[-1]:
                raise
            response = await super().get_response("index.html", scope)
        if path in ("", ".", "index.html") or response.media_type == "text/html":
            response.headers.update(NO_CACHE)
        return response


def upstream_path(raw_path: bytes) -> str | None:
    """The path to forward to Orthanc, or None when it could reach anything but DICOMweb/WADO.

    Refused: encoded slashes or backslashes (``%2f``, ``%5c``, ``\\``), dot segments, plain or
    encoded (``/dicom-web/../tools``, ``%2e%2e``), and anything outside ``/dicom-web/`` and ``/wado``.
    """
    raw = raw_path.decode("latin-1")
    lowered = raw.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in raw or "%00" in lowered:
        return None
    segments = unquote(raw).split("/")
    if any(seg in (".", "..") for seg in segments):
        return None
    if raw != "/wado" and not raw.startswith(PROXIED_PREFIXES):
        return None
    return raw


def single_part_bulk(request: Request) -> str | None:
    """The media type a GET of bulk data asks for as a single part (e.g. ``application/pdf``), else None."""
    if request.method != "GET" or "/bulk/" not in request.url.path:
        return None
    accept = request.headers.get("accept", "").strip()
    first = accept.split(",", 1)[0].split(";", 1)[0].strip().lower()
    if not first or first.startswith("multipart/") or first == "*/*":
        return None
    return first


def first_part(body: bytes, content_type: str) -> bytes | None:
    """The content of the first part of a multipart/related body (RFC 2046), or None."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        return None
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        return None
    headers_end = body.find(b"\r\n\r\n", start)
    end = body.find(b"\r\n" + delimiter, headers_end)
    if headers_end < 0 or end < 0:
        return None
    return body[headers_end + 4 : end]


def _origin_of(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def store_refusal(request: Request, origins: frozenset[str]) -> str | None:
    """Why a STOW-RS request may not pass, or None when it may.

    It must come from a page of one of ``origins`` (the proxy's own; listed rather than taken
    from the ``Host`` header, which a DNS-rebinding page controls): its ``Origin`` header, or
    without one its ``Referer``, names one of them, and a browser's ``Sec-Fetch-Site``, when
    sent, says ``same-origin``. The body is ``multipart/related`` (a cross-site HTML form can
    only send form encodings or text/plain).
    """
    if not origins:
        return "storing through the viewer is not enabled"
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer")
        origin = _origin_of(referer) if referer else None
    if origin is None or origin.lower() not in origins:
        return "only a page of this viewer may store (Origin/Referer of another site or none)"
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site != "same-origin":
        return f"only a page of this viewer may store (Sec-Fetch-Site: {fetch_site})"
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "multipart/related":
        return "STOW-RS takes multipart/related"
    uid = request.path_params.get("study_uid")
    if uid is not None and (len(uid) > 64 or not UID.fullmatch(uid)):
        return "not a StudyInstanceUID"
    return None


def create_app(
    orthanc_url: str, dist_dir: Path, config_file: Path, origins: frozenset[str] = frozenset()
) -> Starlette:
    """The ASGI application: OHIF's files, our config, and the DICOMweb/WADO forwarder.

    ``origins`` are the proxy's own origins, the only pages that may store (STOW-RS); empty:
    nothing is stored through the proxy.
    """
    origins = frozenset(o.lower().rstrip("/") for o in origins)
    check_files(dist_dir, config_file)
    base = orthanc_url.rstrip("/")
    upstream = httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5, read=300, write=300, pool=30),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
    )

    async def app_config(request: Request) -> Response:
        return FileResponse(config_file, media_type="text/javascript", headers=NO_CACHE)

    async def forward(request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        bulk = request.method == "GET" and "/bulk/" in request.url.path
        single = single_part_bulk(request)
        if bulk:
            # Orthanc's DICOMweb plugin (1.20) serves bulk data only as multipart/related of
            # application/octet-stream and answers 400 to what OHIF asks for an encapsulated PDF
            # (application/pdf, single or multipart): ask for that form, and hand a viewer that
            # wanted a single part its one part, as the type it asked for.
            headers = [(k, v) for k, v in headers if k.lower() != "accept"]
            headers.append(("accept", 'multipart/related; type="application/octet-stream"'))
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        path = upstream_path(request.scope["raw_path"])
        if path is None:
            return PlainTextResponse("only DICOMweb and WADO paths are forwarded\n", status_code=400)
        target = base + path
        if request.scope["query_string"]:
            target += "?" + request.scope["query_string"].decode("latin-1")
        # A bare Request, not client.build_request(): no client defaults (Accept-Encoding, ...) are
        # added, and the Host header goes through: Orthanc builds its BulkDataURIs from it.
        body = await request.body() if has_body else None
        answer = None
        # A kept-alive connection that Orthanc closed at the same moment is not a failure of
        # Orthanc: try once more on a fresh connection (every request here can be re-sent:
        # reads, and a STOW-RS, whose instances Orthanc stores once by SOP Instance UID).
        for attempt in (1, 2):
            upstream_request = httpx.Request(request.method, target, headers=headers, content=body)
            try:
                answer = await upstream.send(upstream_request, stream=True)
                break
            except (httpx.RemoteProtocolError, httpx.ConnectError, httpx.ReadError) as e:
                if attempt == 2:
                    return PlainTextResponse(
                        f"Orthanc at {orthanc_url} did not answer: {e}\n", status_code=502
                    )
            except httpx.HTTPError as e:
                return PlainTextResponse(f"Orthanc at {orthanc_url} did not answer: {e}\n", status_code=502)
        assert answer is not None
        if single is not None and answer.status_code == 200:
            body = await answer.aread()
            await answer.aclose()
            part = first_part(body, answer.headers.get("content-type", ""))
            if part is None:
                return PlainTextResponse("Orthanc's bulk data answer could not be read\n", status_code=502)
            return Response(part, media_type=single)
        out_headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(
            answer.aiter_raw(), status_code=answer.status_code, headers=out_headers,
            background=BackgroundTask(answer.aclose),
        )  # fmt: skip

    async def store(request: Request) -> Response:
        if upstream_path(request.scope["raw_path"]) is None:
            return PlainTextResponse("only DICOMweb and WADO paths are forwarded\n", status_code=400)
        refusal = store_refusal(request, origins)
        if refusal is not None:
            return PlainTextResponse(refusal + "\n", status_code=403)
        # Credentials (Authorization) travel on unchanged: Orthanc's authentication decides.
        return await forward(request)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await upstream.aclose()

    return Starlette(
        routes=[
            Route("/app-config.js", app_config, methods=["GET", "HEAD"]),
            *(Route(path, store, methods=["POST"]) for path in STOW_ROUTES),
            Route("/dicom-web/{path:path}", forward, methods=PROXIED_METHODS),
            Route("/wado", forward, methods=PROXIED_METHODS),
            Route("/wado/{path:path}", forward, methods=PROXIED_METHODS),
            Mount("/", _SpaFiles(directory=dist_dir, html=True)),
        ],
        lifespan=lifespan,
    )


def check_files(dist_dir: Path, config_file: Path) -> None:
    if not (dist_dir / "index.html").is_file():
        raise ViewerError(
            f"OHIF viewer not found ({dist_dir / 'index.html'} is missing): give the folder of OHIF's"
            " prebuilt dist/ (scripts/install_viewer.sh fetches it; the image has it in /opt/ohif/dist)"
        )
    if not config_file.is_file():
        raise ViewerError(f"OHIF configuration {config_file} not found")


def serve(
    orthanc_url: str, host: str, port: int, dist_dir: Path, config_file: Path, origins: frozenset[str]
) -> None:
    """Run the gateway in the foreground (uvicorn) until interrupted."""
    import uvicorn

    app = create_app(orthanc_url, dist_dir, config_file, origins)
    stores = ", ".join(sorted(origins)) if origins else "nobody (no --origin)"
    print(
        f"OHIF viewer on http://{host}:{port}/ (DICOMweb of {orthanc_url}; storing from {stores})", flush=True
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_keep_alive=30)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:3000`` for IPv6) as a host and a port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"--listen {value!r}: give HOST:PORT, e.g. 0.0.0.0:3000")
    return host.strip("[]"), int(port)


def parse_origins(values: list[str]) -> frozenset[str]:
    """The origins whose pages may store, checked: ``scheme://host[:port]``, nothing after it."""
    out = set()
    for value in values:
        for item in value.split(","):
            item = item.strip().rstrip("/")
            if not item:
                continue
            origin = _origin_of(item)
            if origin is None or origin != item.lower() or origin.split("://")[0] not in ("http", "https"):
                raise ValueError(f"--origin {item!r}: give an origin such as https://pacs.example (no path)")
            out.add(origin)
    return frozenset(out)
