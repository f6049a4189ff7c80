"""TLS to Triton (gRPC, mutual TLS) and a client certificate for the FHIR server, with a throwaway CA
made by ``openssl`` here.

A real ``tritonserver`` runs with ``--grpc-use-ssl`` and ``--grpc-use-ssl-mutual``; our
TritonClient built from the settings (CA + client certificate) runs the ct_lung model over it;
without the CA, without the client certificate or without TLS it fails with an error that says
so. About 20 s on 2 cores (mostly starting and stopping Triton).
"""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from devstack.stack import ROOT, free_port
from devstack.triton_server import TritonServer
from orthanc_plugin.core.config import Settings
from orthanc_plugin.core.tls import fhir_tls, triton_tls_options
from orthanc_plugin.inference.triton import InferenceError, TritonClient

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by it.

    Made as RFC 5280 asks (CA: critical basicConstraints and keyUsage keyCertSign; leaves: key
    identifiers, keyUsage): Python 3.13 verifies strictly (VERIFY_X509_STRICT) and refuses a CA
    without key usage, Python 3.11 does not check it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "1", "-subj", "/CN=orthanc-ai test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash", cwd=folder)  # fmt: skip
    leaf = (
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    for name, ext in (
        ("server", leaf + "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", leaf + "extendedKeyUsage=clientAuth\n"),
    ):
        (folder / f"{name}.ext").write_text(ext)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=orthanc-ai test {name}", cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in folder.iterdir()}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def triton_tls(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[TritonServer]:
    tmp = tmp_path_factory.mktemp("triton-tls")
    server = TritonServer(
        ROOT / "triton_models", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        log_file=tmp / "triton.log", backend_root=tmp / "backends", model_control="explicit",
        load_models=("ct_lung",),
        extra_args=(
            "--grpc-use-ssl=true", "--grpc-use-ssl-mutual=true",
            f"--grpc-server-cert={pki['server_pem']}", f"--grpc-server-key={pki['server_key']}",
            f"--grpc-root-cert={pki['ca_pem']}",
        ),
    )  # fmt: skip
    server.start(timeout=120)
    yield server
    server.stop()


def _settings(**section: object) -> Settings:
    return Settings.model_validate({"PipelinesFile": "pipelines.yaml", **section})


def test_inference_over_mutual_tls(triton_tls: TritonServer, pki: dict[str, Path]) -> None:
    settings = _settings(
        TritonUrl=triton_tls.grpc_url, TritonTls=True, TritonTlsCaFile=str(pki["ca_pem"]),
        TritonTlsCertFile=str(pki["client_pem"]), TritonTlsKeyFile=str(pki["client_key"]),
    )  # fmt: skip
    # No shared memory: the tensors themselves cross the TLS channel.
    with TritonClient(settings.triton_url, use_shared_memory=False, **triton_tls_options(settings)) as client:
        assert client.is_ready()
        info = client.model_info("ct_lung")
        shape = [1, *info.input("image").shape[1:]]
        x = np.zeros(shape, dtype=np.float32)
        x[..., 16:48, 32:96, 20:60] = 0.2  # something lung-like in air-window units
        out = client.infer("ct_lung", {"image": x}, ["probabilities"])["probabilities"]
    assert out.shape[0] == 1 and out.shape[2:] == x.shape[2:]
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-3)  # softmax over the classes


@pytest.mark.parametrize(
    "case",
    ["without the CA", "without a client certificate", "without TLS"],
)
def test_refused_without_the_right_credentials(
    triton_tls: TritonServer, pki: dict[str, Path], case: str
) -> None:
    kwargs: dict[str, object] = {
        "without the CA": {"tls": True, "tls_cert": pki["client_pem"], "tls_key": pki["client_key"]},
        "without a client certificate": {"tls": True, "tls_ca": pki["ca_pem"]},
        "without TLS": {},
    }[case]
    with TritonClient(triton_tls.grpc_url, use_shared_memory=False, timeout_s=10, **kwargs) as client:  # type: ignore[arg-type]
        assert not client.is_ready()
        with pytest.raises(InferenceError) as caught:
            client.model_info("ct_lung")
    message = str(caught.value)
    print(f"{case}: {message}")
    assert triton_tls.grpc_url in message
    if case == "without the CA":
        assert "CERTIFICATE_VERIFY_FAILED" in message or "certificate verify failed" in message.lower()
    else:
        assert any(w in message.lower() for w in ("handshake", "ssl", "tls", "socket closed", "connection"))


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b'{"resourceType": "CapabilityStatement"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def https_mutual(pki: dict[str, Path]) -> Iterator[str]:
    """An HTTPS server on 127.0.0.1 that requires a client certificate signed by the test CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server_pem"], pki["server_key"])
    context.load_verify_locations(pki["ca_pem"])
    context.verify_mode = ssl.CERT_REQUIRED
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_fhir_client_certificate(https_mutual: str, pki: dict[str, Path]) -> None:
    mutual = _settings(
        FhirBaseUrl=https_mutual, FhirVerifyTls=str(pki["ca_pem"]),
        FhirClientCertFile=str(pki["client_pem"]), FhirClientKeyFile=str(pki["client_key"]),
    )  # fmt: skip
    with httpx.Client(verify=fhir_tls(mutual), timeout=10) as c:
        assert c.get(f"{https_mutual}/metadata").json()["resourceType"] == "CapabilityStatement"
    ca_only = _settings(FhirBaseUrl=https_mutual, FhirVerifyTls=str(pki["ca_pem"]))
    with httpx.Client(verify=fhir_tls(ca_only), timeout=10) as c, pytest.raises(httpx.HTTPError):
        c.get(f"{https_mutual}/metadata")
    system_cas = fhir_tls(_settings(FhirBaseUrl=https_mutual))
    with (
        httpx.Client(verify=system_cas, timeout=10) as c,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        c.get(f"{https_mutual}/metadata")


def test_tls_settings_are_checked(pki: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="TritonTlsCertFile and TritonTlsKeyFile go together"):
        _settings(TritonTls=True, TritonTlsCertFile=str(pki["client_pem"]))
    with pytest.raises(ValueError, match="does not exist"):
        _settings(TritonTls=True, TritonTlsCaFile="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="TritonTls is false"):
        _settings(TritonTlsCaFile=str(pki["ca_pem"]))
    assert triton_tls_options(_settings(TritonTlsCaFile="")) == {}  # an unset ${VAR}: no TLS
