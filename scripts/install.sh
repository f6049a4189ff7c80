#!/usr/bin/env bash
# Idempotent set-up on Debian 12: system packages, then the project venv.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
# orthanc-postgresql + postgresql: Orthanc's index and the job store in PostgreSQL (scale-out, its tests).
# fonts-dejavu-core: the key images' and the PDF's font; poppler-utils: pdftotext/pdftoppm read our PDFs in tests.
# docker-compose (1.29): only to validate docker-compose.yml in CI (tests/unit/test_compose.py), no engine.
for p in orthanc orthanc-python orthanc-dicomweb orthanc-gdcm orthanc-postgresql postgresql dcmtk python3-venv docker-compose fonts-dejavu-core poppler-utils; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# The plugin runs inside Orthanc's embedded Debian Python 3.11: the venv must use that interpreter.
if [ ! -x .venv/bin/python ] || ! cmp -s requirements-dev.txt .venv/.installed-dev 2>/dev/null || ! cmp -s requirements.txt .venv/.installed 2>/dev/null || ! cmp -s requirements-stack.txt .venv/.installed-stack 2>/dev/null; then
  [ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "is ignored: it is neither" || true
  cp requirements.txt .venv/.installed; cp requirements-stack.txt .venv/.installed-stack; cp requirements-dev.txt .venv/.installed-dev
fi
# Chart.js (MIT) for the admin page's Models view: npm ci from the committed lock file into
# orthanc_plugin/server/ui/vendor/node_modules (served by the plugin, never committed); redone only
# when the lock file changed.
VENDOR=orthanc_plugin/server/ui/vendor
if ! cmp -s "$VENDOR/package-lock.json" "$VENDOR/node_modules/.installed-lock" 2>/dev/null; then
  command -v npm >/dev/null 2>&1 || { echo "error: 'npm' not found: install Node.js >= 20 (the admin page's charts)" >&2; exit 1; }
  (cd "$VENDOR" && npm ci --silent --no-audit --no-fund)
  cp "$VENDOR/package-lock.json" "$VENDOR/node_modules/.installed-lock"
fi
echo "install: ok"
