"""A small FHIR R4 server standing in for the EHR, for tests and the demo.

It does what our delivery needs and checks it strictly: transaction Bundles of POST entries
(conditional create with ``ifNoneExist``) and PUT entries (conditional update,
``Type?identifier=...``: the one match is replaced and its versionId goes up, none is created),
``urn:uuid:`` fullUrls resolved into ``Type/id`` references, all or nothing; plain and
conditional create, read, and search by identifier, subject and study. Every resource is validated with the R4 models of ``fhir.resources``
(``fhir.resources.R4B``, identical to R4 for the resources we send); invalid ones get a 400
with an OperationOutcome. An optional bearer token is required on everything but
``/metadata``. ``GET /_stats`` counts what is stored, for tests.

Storage is in memory, optionally appended to a JSON-lines file that is read back at start,
so a restarted server keeps its data. Not a production server: no history, no paging.

    python -m devstack.ehr_server --port 8090 [--data FILE] [--token-env NAME]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hmac
import json
import logging
import os
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("orthanc_ai.ehr_server")

FHIR_JSON = "application/fhir+json"
#: DICOM UIDs as FHIR identifiers (ImagingStudy.identifier): system and value prefix.
DICOM_UID_SYSTEM = "urn:dicom:uid"
_SEARCH_PARAMS = frozenset(
    {"_id", "_count", "_format", "identifier", "subject", "patient", "subject:identifier",
     "patient:identifier", "study"}
)  # fmt: skip


class FhirError(Exception):
    """An error answered as an OperationOutcome."""

    def __init__(self, status: int, code: str, diagnostics: str | list[str]) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = [diagnostics] if isinstance(diagnostics, str) else diagnostics


def operation_outcome(code: str, diagnostics: list[str], severity: str = "error") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": d} for d in diagnostics],
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- validation


def model_class(resource_type: str) -> Any:
    """The ``fhir.resources`` R4 class of a resource type; FhirError for anything else."""
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    try:
        cls = get_fhir_model_class(resource_type)
    except ValueError:
        cls = None
    if cls is None or not issubclass(cls, Resource):
        raise FhirError(404, "not-supported", f"{resource_type!r} is not an R4 resource type")
    return cls


def validate_resource(resource: Any, where: str = "") -> None:
    """FhirError 400 unless ``resource`` is a valid R4 resource."""
    from pydantic import ValidationError

    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise FhirError(400, "structure", f"{where}not a FHIR resource (no resourceType)")
    rt = resource["resourceType"]
    try:
        cls = model_class(rt)
    except FhirError as e:
        raise FhirError(400, "not-supported", f"{where}{e.diagnostics[0]}") from None
    try:
        cls.model_validate(resource)
    except ValidationError as e:
        issues = []
        for err in e.errors()[:20]:
            loc = ".".join(str(p) for p in err["loc"])
            issues.append(f"{where}{rt}.{loc}: {err['msg']}" if loc else f"{where}{rt}: {err['msg']}")
        raise FhirError(400, "invalid", issues) from None


# --------------------------------------------------------------------------- search helpers


def _token(value: str) -> tuple[str | None, str | None]:
    """``system|value`` -> (system, value); ``value`` alone -> (None, value): any system.

    An empty side is returned as "" (``|value``: no system; ``system|``: any value).
    """
    if "|" in value:
        system, _, code = value.partition("|")
        return system, code
    return None, value


def _identifier_matches(identifier: Any, token: str) -> bool:
    if not isinstance(identifier, dict):
        return False
    system, value = _token(token)
    if system is not None:
        if system == "" and identifier.get("system") is not None:
            return False
        if system and identifier.get("system") != system:
            return False
    return not value or identifier.get("value") == value


def _identifiers(resource: dict[str, Any]) -> list[Any]:
    ids = resource.get("identifier")
    if ids is None:
        return []
    return ids if isinstance(ids, list) else [ids]


def _study_values(token: str) -> set[str]:
    """Accept ``1.2.3``, ``urn:oid:1.2.3`` or ``urn:dicom:uid|urn:oid:1.2.3``."""
    system, value = _token(token)
    if system not in (None, "", DICOM_UID_SYSTEM) or not value:
        return set()
    uid = value.removeprefix("urn:oid:")
    return {uid, f"urn:oid:{uid}"}


def _study_refs(resource: dict[str, Any]) -> list[Any]:
    rt = resource.get("resourceType")
    if rt == "DiagnosticReport":
        return list(resource.get("imagingStudy") or [])
    if rt == "Observation":
        return list(resource.get("derivedFrom") or []) + list(resource.get("partOf") or [])
    if rt == "ImagingStudy":
        return [{"identifier": i} for i in _identifiers(resource)]
    return []


def _subject(resource: dict[str, Any]) -> dict[str, Any]:
    subject = resource.get("subject") or resource.get("patient")
    return subject if isinstance(subject, dict) else {}


def _matches(resource: dict[str, Any], name: str, value: str) -> bool:
    """One search parameter; a comma means any of several values."""
    alternatives = value.split(",")
    if name == "_id":
        return resource.get("id") in alternatives
    if name == "identifier":
        return any(_identifier_matches(i, v) for i in _identifiers(resource) for v in alternatives)
    if name in ("subject:identifier", "patient:identifier"):
        ident = _subject(resource).get("identifier")
        return any(_identifier_matches(ident, v) for v in alternatives)
    if name in ("subject", "patient"):
        ref = _subject(resource).get("reference")
        wanted = {v if "/" in v else f"Patient/{v}" for v in alternatives}
        return ref in wanted
    if name == "study":
        wanted = set().union(*(_study_values(v) for v in alternatives))
        for ref in _study_refs(resource):
            ident = ref.get("identifier") if isinstance(ref, dict) else None
            if isinstance(ident, dict) and ident.get("value") in wanted:
                return True
        return False
    raise FhirError(400, "not-supported", f"search parameter {name!r} is not supported")


# --------------------------------------------------------------------------- storage


class ResourceStore:
    """Resources by type and id, in memory, optionally journalled to a JSON-lines file."""

    def __init__(self, data_file: Path | None = None) -> None:
        self.data_file = data_file
        self._by_type: dict[str, dict[str, dict[str, Any]]] = {}
        self.lock = threading.Lock()
        self.transactions = 0
        self.conditional_matches = 0
        if data_file is not None and data_file.exists():
            self._load(data_file)

    def _load(self, path: Path) -> None:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                resource = json.loads(line)
                self._by_type.setdefault(resource["resourceType"], {})[resource["id"]] = resource
            except (ValueError, KeyError, TypeError):
                # A crash can leave a torn last line; everything before it is whole.
                log.warning("%s:%d: unreadable line skipped", path, n)

    def _journal(self, resources: list[dict[str, Any]]) -> None:
        if self.data_file is None:
            return
        self.data_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.data_file, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in resources))
            f.flush()
            os.fsync(f.fileno())

    def get(self, resource_type: str, rid: str) -> dict[str, Any] | None:
        return self._by_type.get(resource_type, {}).get(rid)

    def all(self, resource_type: str) -> Iterator[dict[str, Any]]:
        yield from self._by_type.get(resource_type, {}).values()

    def search(self, resource_type: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        for name, _ in params:
            if name not in _SEARCH_PARAMS:
                raise FhirError(400, "not-supported", f"search parameter {name!r} is not supported")
        criteria = [(n, v) for n, v in params if n not in ("_count", "_format")]
        return [r for r in self.all(resource_type) if all(_matches(r, n, v) for n, v in criteria)]

    def conditional(self, resource_type: str, query: str) -> dict[str, Any] | None:
        """The one resource matching an ``If-None-Exist`` query; None if none; 412 if several."""
        params = parse_qsl(query.lstrip("?"), keep_blank_values=True)
        if not params:
            raise FhirError(400, "invalid", f"empty conditional create criteria for {resource_type}")
        found = self.search(resource_type, params)
        if len(found) > 1:
            raise FhirError(
                412, "duplicate", f"conditional create {resource_type}?{query} matches {len(found)} resources"
            )
        return found[0] if found else None

    def add(self, resources: list[dict[str, Any]]) -> None:
        """Store new resources (ids and meta already set) all together."""
        self._journal(resources)
        for r in resources:
            self._by_type.setdefault(r["resourceType"], {})[r["id"]] = r

    def counts(self) -> dict[str, int]:
        return {t: len(rs) for t, rs in sorted(self._by_type.items()) if rs}


def _with_id(resource: dict[str, Any], rid: str, when: str, version: int = 1) -> dict[str, Any]:
    out = dict(resource)
    out["id"] = rid
    out["meta"] = {**(resource.get("meta") or {}), "versionId": str(version), "lastUpdated": when}
    return out


def _resolve(value: Any, ids: dict[str, str]) -> Any:
    """Copy of ``value`` with references to bundle fullUrls replaced by ``Type/id``."""
    if isinstance(value, dict):
        out = {k: _resolve(v, ids) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in ids:
            out["reference"] = ids[ref]
        elif isinstance(ref, str) and ref.startswith(("urn:uuid:", "urn:oid:")):
            raise FhirError(400, "invalid", f"reference {ref} points at no entry of the transaction")
        return out
    if isinstance(value, list):
        return [_resolve(v, ids) for v in value]
    return value


def process_transaction(store: ResourceStore, bundle: Any) -> dict[str, Any]:
    """Apply a transaction Bundle of POST entries all or nothing; the transaction-response."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise FhirError(400, "structure", "POST / takes a Bundle")
    if bundle.get("type") != "transaction":
        raise FhirError(
            400, "not-supported", f"Bundle.type {bundle.get('type')!r}: only 'transaction' is supported"
        )
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise FhirError(400, "structure", "Bundle.entry must be a list")
    when = _now()
    ids: dict[str, str] = {}  # fullUrl -> Type/id
    # (type, id, new resource or None, its versionId)
    plan: list[tuple[str, str, dict[str, Any] | None, int]] = []
    for i, entry in enumerate(entries):
        where = f"Bundle.entry[{i}]: "
        request = entry.get("request") if isinstance(entry, dict) else None
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(request, dict) or not isinstance(resource, dict):
            raise FhirError(400, "structure", f"{where}needs request and resource")
        method = request.get("method")
        if method not in ("POST", "PUT"):
            raise FhirError(
                400, "not-supported", f"{where}method {method!r}: only POST and conditional PUT are supported"
            )
        rt = resource.get("resourceType")
        url = str(request.get("url", "")).strip("/")
        update_query = None
        if method == "PUT":
            url, _, update_query = url.partition("?")
            if not update_query:
                raise FhirError(
                    400, "not-supported", f"{where}PUT needs a conditional URL Type?identifier=..."
                )
        if url != rt:
            raise FhirError(400, "invalid", f"{where}request.url {url!r} does not match resourceType {rt!r}")
        try:
            model_class(str(rt))
        except FhirError as e:
            raise FhirError(400, "not-supported", f"{where}{e.diagnostics[0]}") from None
        existing = None
        version = 1
        if update_query is not None:
            existing = store.conditional(str(rt), update_query)
            if existing is not None:
                version = int(existing.get("meta", {}).get("versionId", "1")) + 1
            rid, new = (existing["id"] if existing is not None else str(uuid.uuid4())), resource
        else:
            if request.get("ifNoneExist"):
                existing = store.conditional(str(rt), str(request["ifNoneExist"]))
            if existing is not None:
                rid, new = existing["id"], None
            else:
                rid, new = str(uuid.uuid4()), resource
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and full_url:
            if full_url in ids:
                raise FhirError(400, "invalid", f"{where}fullUrl {full_url} is used twice")
            ids[full_url] = f"{rt}/{rid}"
        plan.append((str(rt), rid, new, version))
    created: list[dict[str, Any]] = []
    response_entries = []
    for i, (rt, rid, new, version) in enumerate(plan):
        if new is None:
            status = "200 OK"
        else:
            resource = _with_id(_resolve(new, ids), rid, when, version)
            validate_resource(resource, f"Bundle.entry[{i}]: ")
            created.append(resource)
            status = "201 Created" if version == 1 else "200 OK"
        version = (store.get(rt, rid) or {}).get("meta", {}).get("versionId", "1")
        response_entries.append(
            {
                "response": {
                    "status": status,
                    "location": f"{rt}/{rid}/_history/{version}",
                    "etag": f'W/"{version}"',
                    "lastModified": when,
                }
            }
        )
    store.add(created)
    store.transactions += 1
    store.conditional_matches += len(plan) - len(created)
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": response_entries}


# --------------------------------------------------------------------------- HTTP


def _fhir(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def _error(e: FhirError) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="ehr"'} if e.status == 401 else None
    return _fhir(operation_outcome(e.code, e.diagnostics), e.status, headers)


async def _json_body(request: Request) -> Any:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype not in (FHIR_JSON, "application/json"):
        raise FhirError(415, "not-supported", f"Content-Type {ctype!r}: send {FHIR_JSON}")
    try:
        return json.loads(await request.body())
    except ValueError:
        raise FhirError(400, "structure", "the body is not JSON") from None


Handler = Callable[[Request], Awaitable[Response]]


def create_app(token: str | None = None, data_file: Path | None = None) -> Starlette:
    """The ASGI app; with ``token``, every route but ``/metadata`` needs ``Bearer <token>``."""
    store = ResourceStore(data_file)

    def guarded(fn: Callable[[Request], Awaitable[Response]], open_route: bool = False) -> Handler:
        async def handler(request: Request) -> Response:
            try:
                if token is not None and not open_route:
                    given = request.headers.get("authorization", "")
                    scheme, _, value = given.partition(" ")
                    if scheme.lower() != "bearer" or not value:
                        raise FhirError(401, "login", "a bearer token is required")
                    if not hmac.compare_digest(value.strip().encode(), token.encode()):
                        raise FhirError(401, "login", "the bearer token is not valid")
                return await fn(request)
            except FhirError as e:
                return _error(e)

        return handler

    async def metadata(request: Request) -> Response:
        return _fhir(capability_statement())

    async def stats(request: Request) -> Response:
        with store.lock:
            return _fhir(
                {
                    "resources": store.counts(),
                    "transactions": store.transactions,
                    "conditional_matches": store.conditional_matches,
                }
            )

    async def transaction(request: Request) -> Response:
        bundle = await _json_body(request)
        with store.lock:
            return _fhir(process_transaction(store, bundle))

    async def create(request: Request) -> Response:
        rt = request.path_params["type"]
        model_class(rt)
        resource = await _json_body(request)
        if not isinstance(resource, dict) or resource.get("resourceType") != rt:
            raise FhirError(400, "invalid", f"POST /{rt} takes a {rt} resource")
        base = str(request.base_url).rstrip("/")
        with store.lock:
            condition = request.headers.get("if-none-exist")
            existing = store.conditional(rt, condition) if condition else None
            if existing is not None:
                store.conditional_matches += 1
                return _fhir(existing, 200, {"Location": f"{base}/{rt}/{existing['id']}/_history/1"})
            new = _with_id(resource, str(uuid.uuid4()), _now())
            validate_resource(new)
            store.add([new])
        return _fhir(new, 201, {"Location": f"{base}/{rt}/{new['id']}/_history/1", "ETag": 'W/"1"'})

    async def read(request: Request) -> Response:
        rt, rid = request.path_params["type"], request.path_params["id"]
        model_class(rt)
        with store.lock:
            found = store.get(rt, rid)
        if found is None:
            raise FhirError(404, "not-found", f"{rt}/{rid} is not known")
        return _fhir(found)

    async def search(request: Request) -> Response:
        rt = request.path_params["type"]
        model_class(rt)
        params = list(request.query_params.multi_items())
        with store.lock:
            found = store.search(rt, params)
        count = request.query_params.get("_count")
        if count is not None:
            if not count.isdigit():
                raise FhirError(400, "invalid", "_count must be a number")
            found = found[: int(count)]
        base = str(request.base_url).rstrip("/")
        return _fhir(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(found),
                "link": [{"relation": "self", "url": str(request.url)}],
                "entry": [
                    {"fullUrl": f"{base}/{rt}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                    for r in found
                ],
            }
        )

    app = Starlette(
        routes=[
            Route("/metadata", guarded(metadata, open_route=True), methods=["GET"]),
            Route("/_stats", guarded(stats), methods=["GET"]),
            Route("/", guarded(transaction), methods=["POST"]),
            Route("/{type}", guarded(create), methods=["POST"]),
            Route("/{type}", guarded(search), methods=["GET"]),
            Route("/{type}/{id}", guarded(read), methods=["GET"]),
        ]
    )
    app.state.store = store
    return app


def capability_statement() -> dict[str, Any]:
    interactions = [{"code": "read"}, {"code": "search-type"}, {"code": "create"}]
    params = [
        {"name": "identifier", "type": "token"},
        {"name": "subject", "type": "reference"},
        {"name": "patient", "type": "reference"},
        {"name": "study", "type": "token", "documentation": "DICOM StudyInstanceUID of the imaging study"},
    ]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": dt.date.today().isoformat(),
        "kind": "instance",
        "software": {"name": "orthanc-ai test EHR"},
        "implementation": {"description": "orthanc-ai test EHR (in memory)"},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {
                        "type": t,
                        "interaction": interactions,
                        "conditionalCreate": True,
                        "searchParam": params,
                    }
                    for t in ("DiagnosticReport", "Observation", "Device", "Patient", "ImagingStudy")
                ],
                "interaction": [{"code": "transaction"}],
            }
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m devstack.ehr_server", description="small FHIR R4 server (binds 127.0.0.1)"
    )
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--data", type=Path, help="JSON-lines file that keeps the resources across restarts")
    p.add_argument(
        "--token-env", metavar="NAME", help="require the bearer token held by this environment variable"
    )
    args = p.parse_args(argv)
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            print(
                f"error: --token-env {args.token_env}: that environment variable is not set", file=sys.stderr
            )
            return 2
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(token, args.data)
    log.info(
        "FHIR server on http://127.0.0.1:%d (data %s, token %s)",
        args.port,
        args.data,
        "required" if token else "off",
    )
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
