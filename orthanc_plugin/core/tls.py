"""TLS settings turned into what the clients take: Triton's gRPC client and the FHIR delivery client.

Only file paths are configured (``TritonTlsCaFile``, ``FhirClientCertFile``...): certificates
and keys stay in files outside the repository (e.g. ``/run/secrets/``), never inline.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from orthanc_plugin.core.config import Settings


def triton_tls_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for :class:`orthanc_plugin.inference.triton.TritonClient` (empty without TLS)."""
    if not settings.triton_tls:
        return {}
    return {
        "tls": True,
        "tls_ca": settings.triton_tls_ca,
        "tls_cert": settings.triton_tls_cert,
        "tls_key": settings.triton_tls_key,
    }


def fhir_tls(settings: Settings) -> bool | ssl.SSLContext:
    """``verify`` for the FHIR HTTP client: ``FhirVerifyTls`` (false, true or a CA file) plus an
    optional client certificate (``FhirClientCertFile``/``FhirClientKeyFile``) for mutual TLS."""
    verify = settings.fhir_verify_tls
    cert, key = settings.fhir_client_cert, settings.fhir_client_key
    if cert is None or key is None:
        if isinstance(verify, bool):
            return verify
        return ssl.create_default_context(cafile=str(verify))
    return client_context(verify, cert, key)


def client_context(verify: bool | Path, cert: Path, key: Path) -> ssl.SSLContext:
    """An SSL context that presents ``cert``/``key`` and checks the server per ``verify``."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif verify is True:
        context = ssl.create_default_context()
    else:
        context = ssl.create_default_context(cafile=str(verify))
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return context
