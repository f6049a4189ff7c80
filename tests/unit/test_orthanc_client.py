"""OrthancClient's instance-file reader against a small local HTTP server (no Orthanc)."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from orthanc_plugin.orthanc_rest.client import OrthancClient, OrthancError


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Orthanc
    seen: list[dict[str, Any]] = []
    drop_after_reply = False  # close the socket after answering without saying so

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
        if self.path.startswith("/instances/missing/"):
            body = json.dumps({"Message": "Unknown resource", "OrthancStatus": 17}).encode()
            self.send_response(404)
        else:
            body = b"DICM" * 100_000  # 400 kB, like a CT slice
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if type(self).drop_after_reply:
            self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.seen = []
    _Handler.drop_after_reply = False
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_reads_files_with_basic_auth(server: str) -> None:
    client = OrthancClient(server, "worker", "s3cret")
    try:
        assert client.instance_file("abc") == b"DICM" * 100_000
    finally:
        client.close()
    expected = "Basic " + base64.b64encode(b"worker:s3cret").decode()
    assert _Handler.seen == [{"path": "/instances/abc/file", "auth": expected}]


def test_connections_are_kept_and_a_dropped_one_is_retried(server: str) -> None:
    client = OrthancClient(server)
    try:
        for i in range(5):
            client.instance_file(f"i{i}")
        assert client._files is not None and len(client._files._idle) == 1  # one connection, reused
        # The server now closes every connection after its answer (as Orthanc does after its
        # keep-alive timeout): the pooled connection is stale, the read is retried once, fresh.
        _Handler.drop_after_reply = True
        for i in range(3):
            assert client.instance_file(f"j{i}") == b"DICM" * 100_000
    finally:
        client.close()
    # Each read reached the server once: the failed try on the stale connection sent nothing.
    assert [s["path"] for s in _Handler.seen] == [f"/instances/i{i}/file" for i in range(5)] + [
        f"/instances/j{i}/file" for i in range(3)
    ]


def test_parallel_reads_keep_order_and_bound_the_pool(server: str) -> None:
    client = OrthancClient(server)
    try:
        ids = [f"k{i}" for i in range(40)]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("pydicom.dcmread", lambda fp, **kw: type("D", (), {"raw": fp.getvalue()})())
            got = client.read_instances(ids, threads=6)
        assert [d.orthanc_id for d in got] == ids
        assert client._files is not None and 1 <= len(client._files._idle) <= client._files.POOL
    finally:
        client.close()
    assert client._files is not None and client._files._idle == []


def test_missing_instance_is_a_clear_404(server: str) -> None:
    client = OrthancClient(server)
    try:
        with pytest.raises(OrthancError, match="no longer in Orthanc") as e:
            client.instance_file("missing")
        assert e.value.status == 404
    finally:
        client.close()


def test_unreachable_orthanc_is_an_orthanc_error() -> None:
    client = OrthancClient("http://127.0.0.1:9")  # discard port: nothing listens
    try:
        with pytest.raises(OrthancError, match="unreachable"):
            client.instance_file("abc")
    finally:
        client.close()
