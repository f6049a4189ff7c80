"""The viewer proxy forwards only reads of DICOMweb/WADO paths, whatever the path is dressed as."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from devstack.viewer import create_app, upstream_path


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


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html>OHIF</html>")
    config = tmp_path / "app-config.js"
    config.write_text("window.config = {};")
    # Orthanc's address is a closed port: nothing refused below may reach it (it would be a 502).
    return TestClient(create_app("http://127.0.0.1:9", dist, config))


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_only_reads_are_forwarded(client: TestClient, method: str) -> None:
    for path in ("/dicom-web/studies", "/wado"):
        assert client.request(method, path).status_code == 405


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
