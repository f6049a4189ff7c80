"""The viewer proxy forwards reads of DICOMweb/WADO paths, and STOW-RS only from its own pages,
whatever the path is dressed as."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from devstack.stack import free_port
from devstack.viewer import local_origins
from orthanc_plugin.viewer.gateway import create_app, parse_listen, parse_origins, upstream_path


@pytest.mark.parametrize(
    "raw",
    [
        b"/dicom-web/../tools/find",
        b"/dicom-web/studies/../../instances",
        b"/dicom-web/%2e%2e/tools/find",
        b"/dicom-web/%2E%2E/patients",
        b"/dicom-web/studies%2f..%2f..%2ftools",
        b"/dicom-web/studies%5c..%5cinstances",
        b"/dicom-web/studies\\..\\instances",
        b"/dicom-web/./studies",
        b"/wado/../instances",
        b"/wadox",
        b"/instances",
    ],
)
def test_paths_that_could_leave_dicomweb_are_refused(raw: bytes) -> None:
    assert upstream_path(raw) is None


@pytest.mark.parametrize(
    "raw", [b"/dicom-web/studies", b"/dicom-web/studies/1.2.3/series", b"/wado", b"/wado/x"]
)
def test_dicomweb_and_wado_paths_pass_unchanged(raw: bytes) -> None:
    assert upstream_path(raw) == raw.decode()


def _viewer_files(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in OHIF build (its index.html) and app-config.js."""
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html>OHIF</html>")
    config = tmp_path / "app-config.js"
    config.write_text("window.config = {};")
    return dist, config


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    dist, config = _viewer_files(tmp_path)
    # Orthanc's address is a closed port: nothing refused below may reach it (it would be a 502).
    return TestClient(create_app("http://127.0.0.1:9", dist, config))


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_only_reads_and_stow_are_forwarded(client: TestClient, method: str) -> None:
    for path in ("/dicom-web/studies", "/dicom-web/studies/1.2.3", "/wado"):
        assert client.request(method, path).status_code == 405


class _Recorder(BaseHTTPRequestHandler):
    """Orthanc's stand-in: answers 200 to everything and keeps (method, path, headers, body)."""

    seen: list[tuple[str, str, dict[str, str], bytes]] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        type(self).seen.append((self.command, self.path, dict(self.headers.items()), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


ORIGIN = "http://127.0.0.1:3000"
STOW = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b', "Origin": ORIGIN}


@pytest.fixture
def orthanc_stand_in() -> Iterator[tuple[str, type[_Recorder]]]:
    """Orthanc's stand-in on a free port: its URL and the recorder of what reached it."""
    recorder = type("Recorder", (_Recorder,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", recorder
    finally:
        server.shutdown()


@pytest.fixture
def stow_client(
    tmp_path: Path, orthanc_stand_in: tuple[str, type[_Recorder]]
) -> tuple[TestClient, type[_Recorder]]:
    url, recorder = orthanc_stand_in
    dist, config = _viewer_files(tmp_path)
    return TestClient(create_app(url, dist, config, local_origins(3000)), base_url=ORIGIN), recorder


@pytest.mark.parametrize("path", ["/dicom-web/studies", "/dicom-web/studies/1.2.840.113619.2.1"])
def test_stow_from_the_viewers_own_page_reaches_orthanc_with_the_users_credentials(
    stow_client: tuple[TestClient, type[_Recorder]], path: str
) -> None:
    client, orthanc = stow_client
    r = client.post(path, content=b"--b\r\n...", headers=STOW, auth=("rad", "secret"))
    assert r.status_code == 200, r.text
    ((method, upstream, headers, body),) = orthanc.seen
    assert (method, upstream, body) == ("POST", path, b"--b\r\n...")
    credentials = {k.lower(): v for k, v in headers.items()}["authorization"]
    assert credentials == "Basic cmFkOnNlY3JldA=="  # rad:secret, for Orthanc to check
    # without an Origin header, the Referer's origin counts (older browsers, some fetches)
    referer = {**STOW, "Referer": f"{ORIGIN}/viewer?StudyInstanceUIDs=1.2"}
    del referer["Origin"]
    assert client.post(path, content=b"x", headers=referer).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {**STOW, "Origin": "https://evil.example"},  # a form or script on another site
        {**STOW, "Origin": "http://127.0.0.1:3001"},  # another local port is another origin
        {**STOW, "Origin": "null"},  # a sandboxed frame or a file:// page
        {"Content-Type": STOW["Content-Type"]},  # neither Origin nor Referer
        {"Content-Type": STOW["Content-Type"], "Referer": "https://evil.example/form.html"},
        {**STOW, "Sec-Fetch-Site": "cross-site"},
        {**STOW, "Content-Type": "multipart/form-data; boundary=b"},  # what a cross-site form sends
        {**STOW, "Content-Type": "text/plain"},
    ],
)
def test_stow_from_anywhere_else_is_refused_before_orthanc(
    stow_client: tuple[TestClient, type[_Recorder]], headers: dict[str, str]
) -> None:
    client, orthanc = stow_client
    r = client.post("/dicom-web/studies", content=b"--b\r\n...", headers=headers)
    assert r.status_code == 403, r.text
    assert orthanc.seen == []


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/dicom-web/studies/1.2.3/series", 405),  # STOW-RS only: no other DICOMweb write
        ("/dicom-web/studies/1.2.3/series/4.5/instances", 405),
        ("/wado", 405),
        ("/app-config.js", 405),
        ("/instances", 405),  # Orthanc's own REST API is never reached
        ("/tools/execute-script", 405),
        # Dot segments and encoded slashes: refused as a path (400), or never routed to STOW (405)
        ("/dicom-web/studies/..", 405),
        ("/dicom-web/studies/%2e%2e", 400),
        ("/dicom-web/studies/%2e%2e%2f..%2finstances", 405),
        ("/dicom-web/studies/1.2%2f..%2f..%2finstances", 405),
        ("/dicom-web/studies/1.2%5c..%5cinstances", 400),  # an encoded backslash
        ("/dicom-web/studies/1.2.3%00", 400),
        ("/dicom-web/studies/1.2.abc", 403),
    ],
)
def test_posts_to_other_paths_are_refused_before_orthanc(
    stow_client: tuple[TestClient, type[_Recorder]], path: str, status: int
) -> None:
    client, orthanc = stow_client
    r = client.post(path, content=b"--b\r\n...", headers=STOW)
    assert r.status_code == status, (path, r.status_code, r.text)
    assert orthanc.seen == []


def test_without_origins_nothing_is_stored(client: TestClient) -> None:
    r = client.post("/dicom-web/studies", content=b"x", headers={**STOW, "Origin": "http://testserver"})
    assert r.status_code == 403 and "not enabled" in r.text


def test_a_dot_segment_request_is_answered_400_before_orthanc(client: TestClient) -> None:
    r = client.get("/dicom-web/%2e%2e/tools/find")
    assert r.status_code == 400 and "only DICOMweb" in r.text
    assert client.get("/dicom-web/studies").status_code == 502  # a clean path does go upstream


PDF = b"%PDF-1.4 a small document\r\n--not a boundary\r\n%%EOF"


class _BulkOnlyMultipart(BaseHTTPRequestHandler):
    """Answers bulk data as Orthanc's DICOMweb 1.20 does: multipart/related only, 400 otherwise."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if not self.headers.get("Accept", "").startswith("multipart/related"):
            self.send_response(400)
            self.end_headers()
            return
        body = b"--b0undary\r\nContent-Type: application/octet-stream\r\n\r\n" + PDF + b"\r\n--b0undary--\r\n"
        self.send_response(200)
        self.send_header(
            "Content-Type", 'multipart/related; type="application/octet-stream"; boundary=b0undary'
        )
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_single_part_bulk_request_gets_the_part_the_viewer_asked_for(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BulkOnlyMultipart)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dist = tmp_path / "dist"
        dist.mkdir()
        (dist / "index.html").write_text("<html>OHIF</html>")
        config = tmp_path / "app-config.js"
        config.write_text("window.config = {};")
        client = TestClient(create_app(f"http://127.0.0.1:{server.server_port}", dist, config))
        url = "/dicom-web/studies/1/series/2/instances/3/bulk/00420011"
        r = client.get(url, headers={"Accept": "application/pdf"})  # what OHIF asks for a PDF
        assert r.status_code == 200 and r.content == PDF and r.headers["content-type"] == "application/pdf"
        multipart = client.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
        assert multipart.status_code == 200 and b"--b0undary" in multipart.content  # passed through as is
    finally:
        server.shutdown()


@pytest.mark.parametrize("value", ["0.0.0.0", "3000", ":3000", "host:0", "host:70000", "host:x"])
def test_listen_must_be_host_and_port(value: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(value)


def test_origins_are_scheme_host_and_port_only() -> None:
    assert parse_origins(["https://PACS.example/", "http://10.0.0.5:3000,https://b.example"]) == {
        "https://pacs.example", "http://10.0.0.5:3000", "https://b.example",
    }  # fmt: skip
    for bad in ("pacs.example", "https://pacs.example/viewer", "ftp://pacs.example", "*"):
        with pytest.raises(ValueError, match="origin"):
            parse_origins([bad])


def test_the_product_command_serves_reads_and_stores_only_from_its_configured_origin(
    tmp_path: Path, orthanc_stand_in: tuple[str, type[_Recorder]]
) -> None:
    """``python -m orthanc_plugin viewer`` as docker-compose.yml runs it (a real process, real HTTP)."""
    orthanc_url, recorder = orthanc_stand_in
    dist, config = _viewer_files(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orthanc_plugin", "viewer", f"--orthanc={orthanc_url}",
         f"--listen=127.0.0.1:{port}", f"--dist={dist}", f"--config={config}", "--origin=https://pacs.example"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else proc.returncode
            try:
                httpx.get(f"{base}/app-config.js", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the gateway did not listen within 30 s"
                time.sleep(0.1)
        assert httpx.get(f"{base}/viewer?StudyInstanceUIDs=1.2.3").text == "<html>OHIF</html>"
        assert httpx.get(f"{base}/app-config.js").text == "window.config = {};"
        assert httpx.get(f"{base}/dicom-web/studies").status_code == 200
        stow = {"Content-Type": STOW["Content-Type"]}
        foreign = httpx.post(f"{base}/dicom-web/studies", content=b"x", headers={**stow, "Origin": base})
        assert foreign.status_code == 403  # its own address is not the configured public origin
        site = httpx.post(
            f"{base}/dicom-web/studies", content=b"x", headers={**stow, "Origin": "https://pacs.example"}
        )
        assert site.status_code == 200
        assert [(m, p) for m, p, _, _ in recorder.seen] == [
            ("GET", "/dicom-web/studies"),
            ("POST", "/dicom-web/studies"),
        ]
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_product_command_refuses_a_bad_origin_before_listening(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "orthanc_plugin", "viewer", "--orthanc=http://127.0.0.1:9", f"--dist={tmp_path}",
         f"--config={tmp_path / 'c.js'}", "--origin=https://pacs.example/viewer"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2
    assert "give an origin such as https://pacs.example" in r.stderr
