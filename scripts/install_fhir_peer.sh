#!/usr/bin/env bash
# Idempotent set-up of the independent FHIR server the tests deliver to: Medplum's FHIR router
# (npm, Apache-2.0) under devstack/fhir_peer/node_modules/, from the committed lock file.
# Redone only when the lock file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: '$tool' not found: install Node.js >= 20" >&2; exit 1; }
done
if ! cmp -s devstack/fhir_peer/package-lock.json devstack/fhir_peer/node_modules/.installed-lock 2>/dev/null; then
  echo "installing the FHIR test peer (@medplum/fhir-router)"
  # Medplum declares Node >= 22; it runs on Node 20 (server.mjs provides what 22 adds), so the
  # engine warning is expected there.
  (cd devstack/fhir_peer && npm ci --silent --no-audit --no-fund)
  cp devstack/fhir_peer/package-lock.json devstack/fhir_peer/node_modules/.installed-lock
fi
echo "install_fhir_peer: ok ($(node --version); $(node -p "require('./devstack/fhir_peer/node_modules/@medplum/fhir-router/package.json').version" 2>/dev/null || echo '?'))"
