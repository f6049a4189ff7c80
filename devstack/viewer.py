# SPDX-License-Identifier: AGPL-3.0-or-later
"""Serve the prebuilt OHIF viewer and Orthanc's DICOMweb from one origin.

Orthanc 1.10 has no CORS option, so the viewer (``var/ohif/package/dist``, fetched by
``scripts/install_viewer.sh``) and DICOMweb must share an origin. This small proxy serves the
viewer's files (``index.html`` for client-side routes such as ``/viewer?StudyInstanceUIDs=...``),
our ``viewer/app-config.js`` at ``/app-config.js``, and forwards reads of ``/dicom-web/`` and
``/wado`` to Orthanc with the browser's ``Host`` header, so the BulkDataURIs that Orthanc writes
into the metadata point back at this origin. Bodies are streamed both ways. It listens on
127.0.0.1 only.

One write passes: STOW-RS (``POST /dicom-web/studies[/{StudyInstanceUID}]``), which OHIF uses to
store a segmentation a reviewer corrected. Only from a page of this origin (``Origin``, else
``Referer``, must be one of the proxy's own origins, so a form on another site cannot store), only
as ``multipart/related``, and with the user's own credentials passed on: Orthanc's authentication
decides, and the plugin credits the edit to that user.

Command line (``make up`` / ``make down``)::

    python -m devstack.viewer --orthanc http://127.0.0.1:8042 --port 3000          # foreground
    python -m devstack.viewer --orthanc http://127.0.0.1:8042 --port 3000 start    # background
    python -m devstack.viewer stop
"""

from __future__ import annotations

import argparse
import contextlib
import mimetypes
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
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

from devstack.common import ROOT, var_dir
from orthanc_plugin.core.processes import read_pid_file

VAR = var_dir()
# The prebuilt OHIF (scripts/install_viewer.sh) is the same for every release: always under var/.
DEFAULT_DIST = ROOT / "var" / "ohif" / "package" / "dist"
DEFAULT_CONFIG = ROOT / "viewer" / "app-config.js"
PID_FILE = VAR / "viewer.pid"
LOG_FILE = VAR / "log" / "viewer.log"
HOST = "127.0.0.1"

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


def local_origins(port: int) -> frozenset[str]:
    """The origins a browser uses for a proxy on 127.0.0.1:``port``."""
    return frozenset(f"http://{host}:{port}" for host in (HOST, "localhost", "[::1]"))


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
            f"OHIF viewer not found ({dist_dir / 'index.html'} is missing): run scripts/install_viewer.sh"
        )
    if not config_file.is_file():
        raise ViewerError(f"OHIF configuration {config_file} not found")


class ViewerServer:
    """The viewer proxy on 127.0.0.1:``port``, run by uvicorn in a background thread (tests)."""

    def __init__(
        self,
        orthanc_url: str,
        port: int,
        dist_dir: Path = DEFAULT_DIST,
        config_file: Path = DEFAULT_CONFIG,
    ) -> None:
        self.orthanc_url = orthanc_url
        self.port = port
        self.dist_dir = Path(dist_dir)
        self.config_file = Path(config_file)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def viewer_url(self, study_instance_uid: str) -> str:
        """OHIF's basic viewer for one study."""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_instance_uid}"

    def start(self, timeout: float = 15.0) -> ViewerServer:
        import uvicorn

        app = create_app(self.orthanc_url, self.dist_dir, self.config_file, local_origins(self.port))
        config = uvicorn.Config(
            app, host=HOST, port=self.port, log_level="warning", access_log=False, lifespan="on",
            timeout_keep_alive=30,
        )  # fmt: skip
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, name=f"viewer:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                raise ViewerError(f"the viewer could not listen on {self.url} (port taken?)")
            if time.monotonic() > deadline:
                self.stop()
                raise ViewerError(f"the viewer did not start on {self.url} within {timeout:.0f} s")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None
        self._thread = None

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI for make up/down


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ViewerError(f"the viewer exited with {proc.returncode}; see {LOG_FILE}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/app-config.js", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise ViewerError(f"the viewer did not answer on {url} within {timeout:.0f} s; see {LOG_FILE}")


def start_background(orthanc_url: str, port: int, dist_dir: Path, config_file: Path) -> int:
    """Start ``run`` as a detached process, write ``var/viewer.pid``; returns the pid."""
    pid = read_pid_file(PID_FILE)
    if pid is not None:
        print(f"Viewer     running (pid {pid})")
        return pid
    check_files(dist_dir, config_file)
    LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "devstack.viewer", "--orthanc", orthanc_url, "--port", str(port),
            "--dist", str(dist_dir), "--config", str(config_file), "run"]  # fmt: skip
    with open(LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(ROOT),
            start_new_session=True,
        )  # fmt: skip
    url = f"http://{HOST}:{port}"
    try:
        _wait_ready(url, proc, 20)
    except ViewerError:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        raise
    PID_FILE.write_text(f"{proc.pid}\n")
    print(f"Viewer     ready   {url}/  (OHIF, DICOMweb of {orthanc_url}, log {LOG_FILE})")
    return proc.pid


def stop_background() -> None:
    from devstack.triton_server import terminate_process

    pid = read_pid_file(PID_FILE)
    if pid is not None:
        terminate_process(pid, 10)
        print(f"viewer stopped (pid {pid})")
    with contextlib.suppress(OSError):
        PID_FILE.unlink()


def run_foreground(orthanc_url: str, port: int, dist_dir: Path, config_file: Path) -> None:
    import uvicorn

    app = create_app(orthanc_url, dist_dir, config_file, local_origins(port))
    print(f"OHIF viewer on http://{HOST}:{port}/ (DICOMweb of {orthanc_url})", flush=True)
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False, timeout_keep_alive=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m devstack.viewer", description="OHIF viewer + DICOMweb forwarder on one origin"
    )
    p.add_argument("action", nargs="?", default="run", choices=("run", "start", "stop"),
                   help="run in the foreground (default), start in the background (var/viewer.pid), stop")  # fmt: skip
    p.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc's HTTP root")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--dist", type=Path, default=DEFAULT_DIST, help="OHIF's prebuilt dist/ folder")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="app-config.js to serve")
    args = p.parse_args(argv)
    try:
        if args.action == "stop":
            stop_background()
        elif args.action == "start":
            start_background(args.orthanc, args.port, args.dist.resolve(), args.config.resolve())
        else:
            with contextlib.suppress(KeyboardInterrupt):
                run_foreground(args.orthanc, args.port, args.dist.resolve(), args.config.resolve())
    except ViewerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
