#!/usr/bin/env bash
# Idempotent set-up on Debian 12 (bookworm) or Debian 13 (trixie): system packages, then the
# project venv ($VENV, default .venv). Any failure stops the script with a non-zero status and
# leaves no "installed" marker behind, so the next run installs again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# shellcheck disable=SC1091
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
case "$codename" in
  bookworm|trixie) ;;
  *) echo "warning: Debian release '${codename:-unknown}' is not one of the supported bookworm (12) or trixie (13); trying anyway" >&2 ;;
esac

need_apt=()
# orthanc-postgresql + postgresql: Orthanc's index and the job store in PostgreSQL (scale-out, its tests).
# docker-compose: only to validate docker-compose.yml in CI (tests/unit/test_compose.py), no engine.
# patchelf: points the local Triton's python backend stub at Debian's libpython (devstack/triton_server.py).
# fonts-dejavu-core: the key images' and the PDF's font; poppler-utils: pdftotext/pdftoppm read our PDFs in tests.
for p in orthanc orthanc-python orthanc-dicomweb orthanc-gdcm orthanc-postgresql postgresql dcmtk \
         python3-venv docker-compose patchelf ca-certificates fonts-dejavu-core poppler-utils; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
# Node.js and npm (the admin page's charts below, the viewer, the FHIR test peer): Debian's when none is there.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  need_apt+=(nodejs npm)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages ($codename): ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# The plugin runs inside Orthanc's embedded Debian Python (3.11 on Debian 12, 3.13 on Debian 13):
# the venv must use that interpreter, /usr/bin/python3.
pyver=$(/usr/bin/python3 -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')" != "$pyver" ]; then
  echo "$VENV was made with another Python than /usr/bin/python3 ($pyver): making it again"
  rm -rf "$VENV"
fi
markers=(requirements.txt requirements-stack.txt requirements-dev.txt requirements-triton.txt)
up_to_date() {
  [ -x "$VENV/bin/python" ] || return 1
  for f in "${markers[@]}"; do cmp -s "$f" "$VENV/.installed-$f" || return 1; done
}
pip_quiet() {  # pip's own exit status counts (pipefail); only one known harmless line is hidden
  "$VENV/bin/pip" "$@" --disable-pip-version-check 2>&1 | { grep -v "is ignored: it is" || true; }
}
if ! up_to_date; then
  rm -f "$VENV"/.installed*
  [ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
  echo "installing Python packages into $VENV (Python $pyver)"
  pip_quiet install -q -r requirements-dev.txt
  # Only the tritonserver binary and its stubs are used: the wheel's own dependency pins are not.
  pip_quiet install -q --no-deps -r requirements-triton.txt
  pip_quiet install -q --no-deps -e .
  "$VENV/bin/python" -c 'import numpy, onnxruntime, pydicom, highdicom, tritonclient.grpc, orthanc_plugin' \
    || { echo "error: the packages in $VENV do not import" >&2; exit 1; }
  for f in "${markers[@]}"; do cp "$f" "$VENV/.installed-$f"; done
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
echo "install: ok (Debian ${codename:-?}, Orthanc $(dpkg-query -W -f='${Version}' orthanc 2>/dev/null), Python $pyver, $VENV)"
