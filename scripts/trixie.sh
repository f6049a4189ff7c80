#!/usr/bin/env bash
# The Debian 13 (trixie) check, run from a Debian 12 (or 13) host: a trixie root file system made
# with debootstrap under var/ (made once, kept), the repository and ../shared bound into it (shared
# read-only), and inside it, as on a fresh Debian 13 machine: `scripts/install.sh`, `make demo` and
# a set of integration tests. Used by `.ci/run` and `make test-trixie`.
#
#   bash scripts/trixie.sh            install, lint, unit tests, demo, integration tests (the CI check)
#   bash scripts/trixie.sh demo       install + demo only
#   bash scripts/trixie.sh shell      an interactive shell in the root (mounts removed on exit)
#   bash scripts/trixie.sh run CMD    one command in the repository inside the root
#
# Environment: TRIXIE_ROOT (default var/trixie-root), TRIXIE_MIRROR (default: the first Debian
# mirror of the host's apt sources), TRIXIE_TESTS (pytest arguments, default the list below).
# Needs root (debootstrap, mount, chroot) and the Debian package debootstrap (installed if absent).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd -P)
SHARED=$(cd .. && pwd -P)/shared
# The other release than the host's: Debian 13 from a Debian 12 host (CI here), Debian 12 from a
# Debian 13 host. OTHER_RELEASE=trixie|bookworm chooses by hand.
# shellcheck disable=SC1091
host=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
if [ -n "${OTHER_RELEASE:-}" ]; then REL=$OTHER_RELEASE; elif [ "$host" = trixie ]; then REL=bookworm; else REL=trixie; fi
ROOT=${TRIXIE_ROOT:-$REPO/var/$REL-root}
VENV=.venv-$REL
DEFAULT_TESTS="tests/integration/test_e2e_ct_lung.py tests/integration/test_bad_input_corpus.py
  tests/integration/test_faults.py tests/integration/test_fhir_delivery.py tests/integration/test_ohif.py
  tests/integration/test_triton.py tests/integration/test_labels.py tests/integration/test_tls.py
  tests/integration/test_load.py tests/integration/test_ohif_edit.py tests/integration/test_per_series.py
  tests/integration/test_priority.py tests/integration/test_fhir_peer.py"
TESTS=${TRIXIE_TESTS:-$DEFAULT_TESTS}
start=$SECONDS

if [ "$(id -u)" -ne 0 ]; then
  echo "error: the trixie check needs root (debootstrap, mount, chroot): run it with sudo" >&2
  exit 1
fi
[ -d "$SHARED" ] || { echo "error: $SHARED not found: the shared data must sit beside the repository" >&2; exit 1; }

mirror() {
  if [ -n "${TRIXIE_MIRROR:-}" ]; then echo "$TRIXIE_MIRROR"; return; fi
  local url
  url=$(grep -hsE '^(URIs:|deb ) *https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list.d/* /etc/apt/sources.list \
        | grep -v security | head -n 1 | grep -oE 'https?://[^ ]*' || true)
  echo "${url:-http://deb.debian.org/debian}"
}

# Mounts left under the root by a run that was killed outright (no trap ran): remove them first,
# deepest first, so that nothing below can ever reach the repository or ../shared through them.
mounted_under_root() { awk -v r="$ROOT" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/self/mounts | sort -r; }
for m in $(mounted_under_root); do umount "$m" 2>/dev/null || umount -l "$m"; done
if [ -n "$(mounted_under_root)" ]; then
  echo "error: mounts left under $ROOT that cannot be removed:" >&2; mounted_under_root >&2; exit 1
fi

# 1. The root file system: made once (into a temporary folder, renamed when complete).
if [ ! -x "$ROOT/usr/bin/apt-get" ] || [ ! -f "$ROOT/.orthanc-ai-bootstrapped" ]; then
  command -v debootstrap >/dev/null 2>&1 || {
    echo "installing Debian package: debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  url=$(mirror)
  echo "$REL: debootstrap --variant=minbase $REL $ROOT $url"
  rm -rf --one-file-system "$ROOT.tmp" "$ROOT"
  mkdir -p "$(dirname "$ROOT")"
  debootstrap --variant=minbase "$REL" "$ROOT.tmp" "$url" > "$(dirname "$ROOT")/$REL-debootstrap.log" 2>&1 || {
    tail -n 20 "$(dirname "$ROOT")/$REL-debootstrap.log" >&2; exit 1; }
  touch "$ROOT.tmp/.orthanc-ai-bootstrapped"
  mv "$ROOT.tmp" "$ROOT"
  echo "$REL: root file system made ($((SECONDS - start)) s)"
fi

# 2. Mounts, always removed again (trap), with the processes still running in the root killed first.
MOUNTS=()
bind() {  # bind SRC DST [ro]
  mkdir -p "$2"
  mount --bind "$1" "$2"
  MOUNTS+=("$2")
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2"; fi
}
kill_root_processes() {
  local pids=() link
  for p in /proc/[0-9]*; do
    link=$(readlink "$p/root" 2>/dev/null) || continue
    [ "$link" = "$ROOT" ] && pids+=("${p#/proc/}")
  done
  [ ${#pids[@]} -eq 0 ] && return 0
  echo "$REL: stopping ${#pids[@]} process(es) left in the root"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    local alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    [ ${#alive[@]} -eq 0 ] && return 0
    pids=("${alive[@]}")
    sleep 0.2  # polling the processes' exit: nothing to wait on for non-children
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  kill_root_processes
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" || true
  done
  if [ -n "$(mounted_under_root)" ]; then echo "$REL: warning: mounts left under $ROOT" >&2; fi
  exit $rc
}
trap cleanup EXIT INT TERM

mkdir -p "$ROOT/proc" "$ROOT/sys" "$ROOT/dev"
mount -t proc proc "$ROOT/proc"; MOUNTS+=("$ROOT/proc")
bind /sys "$ROOT/sys" ro
bind /dev "$ROOT/dev"
bind /dev/pts "$ROOT/dev/pts"
bind /dev/shm "$ROOT/dev/shm"
bind "$REPO" "$ROOT$REPO"
bind "$SHARED" "$ROOT$SHARED" ro
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp -L /etc/hosts "$ROOT/etc/hosts" 2>/dev/null || true
# This machine's own network settings go in with it: local CAs (added to the root's trust store
# once ca-certificates is there) and pip/npm configuration.
mkdir -p "$ROOT/usr/local/share/ca-certificates" "$ROOT/root/.config/pip"
cp -L /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/" 2>/dev/null || true
for f in /etc/pip.conf /root/.config/pip/pip.conf /root/.npmrc; do
  [ -f "$f" ] && cp -L "$f" "$ROOT$f"
done
PASS_ENV=()
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL PIP_EXTRA_INDEX_URL \
         PIP_CERT PIP_DEFAULT_TIMEOUT SSL_CERT_FILE REQUESTS_CA_BUNDLE CURL_CA_BUNDLE NODE_EXTRA_CA_CERTS \
         npm_config_registry; do
  [ -n "${!v:-}" ] && PASS_ENV+=("$v=${!v}")
done
mkdir -p "$ROOT/tmp" && chmod 1777 "$ROOT/tmp"

in_root() {  # in_root 'shell command' : runs in the repository inside the root, clean environment
  chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" PYTHONUNBUFFERED=1 \
    DEBIAN_FRONTEND=noninteractive "${PASS_ENV[@]}" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    ORTHANC_AI_VENV="$REPO/$VENV" ORTHANC_AI_VAR="$REPO/var/$REL" VENV="$VENV" \
    /bin/bash -c "cd '$REPO' && $1"
}

case "${1:-check}" in
  shell) in_root "exec bash -i"; exit ;;
  run) shift; in_root "$*"; exit ;;
  check|demo) ;;
  *) echo "usage: $0 [check|shell|run CMD]" >&2; exit 2 ;;
esac

# 3. The check, as on a fresh Debian 13 machine; make and the CA store are the only things added
# by hand (the CA store so that this machine's local CAs are trusted inside as outside).
in_root "dpkg -s make ca-certificates >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends make ca-certificates >/dev/null; }; update-ca-certificates >/dev/null"
t=$SECONDS
echo "== $REL: make install"
in_root "make install"
echo "$REL: install $((SECONDS - t)) s"
t=$SECONDS
echo "== $REL: make lint, unit tests"
in_root "make lint && \$VENV/bin/python -m pytest -q -p no:cacheprovider tests/unit"
echo "$REL: lint + unit tests $((SECONDS - t)) s"
t=$SECONDS
echo "== $REL: make demo"
# On free ports (other services may hold the usual 8042/8000/...), stopped again whatever happens.
ports=$(in_root "python3 -c 'import socket
socks = [socket.socket() for _ in range(7)]
for s in socks: s.bind((\"127.0.0.1\", 0))
print(\" \".join(str(s.getsockname()[1]) for s in socks))'")
read -r p_http p_dicom p_thttp p_tgrpc p_tmetrics p_ehr p_viewer <<< "$ports"
in_root "export ORTHANC_AI_HTTP_PORT=$p_http ORTHANC_AI_DICOM_PORT=$p_dicom ORTHANC_AI_TRITON_HTTP_PORT=$p_thttp \
  ORTHANC_AI_TRITON_GRPC_PORT=$p_tgrpc ORTHANC_AI_TRITON_METRICS_PORT=$p_tmetrics ORTHANC_AI_EHR_PORT=$p_ehr \
  ORTHANC_AI_VIEWER_PORT=$p_viewer; make demo; rc=\$?; make down; exit \$rc"
echo "$REL: demo $((SECONDS - t)) s"
[ "${1:-check}" = demo ] && exit 0
t=$SECONDS
echo "== $REL: integration tests"
in_root "\$VENV/bin/python -m pytest -q -rfEs -p no:cacheprovider $(echo $TESTS)"
echo "$REL: tests $((SECONDS - t)) s"
echo "$REL: ok ($((SECONDS - start)) s in all)"
