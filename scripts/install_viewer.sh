#!/usr/bin/env bash
# Idempotent set-up of the viewer side on Debian 12 or 13: Debian `chromium` (for the headless OHIF test),
# the prebuilt OHIF viewer (npm package @ohif/app, only its dist/ is used) under var/ohif/, and
# playwright-core (driver only, no browser download) under viewer/node_modules/.
# Each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
OHIF_VERSION=3.13.2
OHIF_DIR=var/ohif
start=$SECONDS

if ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian package: chromium"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

# Node.js (>= 18) and npm: Debian's packages when none is installed (Debian 12 has Node 18, 13 has 20).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "installing Debian packages: nodejs npm"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

# The version file is written last, so an interrupted download or untar is redone on the next run.
if [ "$(cat "$OHIF_DIR/VERSION" 2>/dev/null)" != "$OHIF_VERSION" ] || [ ! -f "$OHIF_DIR/package/dist/index.html" ]; then
  echo "fetching @ohif/app@$OHIF_VERSION"
  rm -rf "$OHIF_DIR"
  mkdir -p "$OHIF_DIR"
  tgz=$(cd "$OHIF_DIR" && npm pack --silent --no-audit --no-fund "@ohif/app@$OHIF_VERSION" | tail -n 1)
  tar -xzf "$OHIF_DIR/$tgz" -C "$OHIF_DIR"
  rm -f "$OHIF_DIR/$tgz"
  echo "$OHIF_VERSION" > "$OHIF_DIR/VERSION"
fi

# npm ci from the committed lock file; redone only when the lock file changed.
if ! cmp -s viewer/package-lock.json viewer/node_modules/.installed-lock 2>/dev/null; then
  echo "installing playwright-core (no browser download: Debian chromium is used)"
  (cd viewer && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --silent --no-audit --no-fund)
  cp viewer/package-lock.json viewer/node_modules/.installed-lock
fi

echo "install_viewer: ok ($((SECONDS - start)) s; OHIF $OHIF_VERSION in $OHIF_DIR/package/dist, $(chromium --version 2>/dev/null | head -n 1))"
