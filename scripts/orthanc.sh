#!/usr/bin/env bash
# A real Orthanc PACS (with its DICOMweb plugin) for development and the end-to-end tests, from Debian packages.
#
#   scripts/orthanc.sh install        install orthanc + orthanc-dicomweb with apt-get when missing (root or sudo)
#   scripts/orthanc.sh start DIR      start an instance on 127.0.0.1 with storage, config and log under DIR
#   scripts/orthanc.sh stop DIR       stop that instance (SIGTERM, then wait)
#   scripts/orthanc.sh status DIR     exit 0 when it answers
#
# `start` renders docker/orthanc/orthanc.json (the file docker compose mounts as-is) into DIR/config/: the integer
# and boolean settings Orthanc cannot take from ${VARS} are replaced from these variables, and remote access is
# switched off so the instance is reachable from loopback only:
#   ORTHANC_HTTP_PORT (8042)  ORTHANC_DICOM_PORT (4242)  ORTHANC_STABLE_AGE (30 s)
# Strings stay ${VAR} references that Orthanc itself expands at start-up:
#   ORTHANC_PASSWORD (user "oct", required)  OCT_SERVICE_DICOMWEB_URL  OCT_SERVICE_API_KEY  ORTHANC_NAME  ORTHANC_AET
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONF_SRC="$ROOT/docker/orthanc"
PLUGIN=${ORTHANC_DICOMWEB_PLUGIN:-/usr/share/orthanc/plugins/libOrthancDicomWeb.so}

die() { echo "orthanc.sh: $*" >&2; exit 1; }

installed() { command -v Orthanc >/dev/null 2>&1 && [ -f "$PLUGIN" ]; }

install() {
  if installed; then
    echo "orthanc.sh: Orthanc $(Orthanc --version 2>/dev/null | head -1 | awk '{print $2}') and its DICOMweb plugin are installed"
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "need root or sudo to apt-get install orthanc orthanc-dicomweb"
    sudo="sudo"
  fi
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install Orthanc >= 1.10 and its DICOMweb plugin by hand"
  $sudo apt-get update
  # The Debian package registers a system service; it is not started here (containers have no init), and the
  # instances this script starts use their own config, storage and ports.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends orthanc orthanc-dicomweb
  installed || die "apt-get finished but Orthanc or $PLUGIN is missing"
}

render() {
  local dir=$1
  mkdir -p "$dir/config" "$dir/db"
  sed -e "s/\"HttpPort\": *[0-9]*/\"HttpPort\": ${ORTHANC_HTTP_PORT:-8042}/" \
      -e "s/\"DicomPort\": *[0-9]*/\"DicomPort\": ${ORTHANC_DICOM_PORT:-4242}/" \
      -e "s/\"StableAge\": *[0-9]*/\"StableAge\": ${ORTHANC_STABLE_AGE:-30}/" \
      -e "s/\"RemoteAccessAllowed\": *true/\"RemoteAccessAllowed\": false/" \
      "$CONF_SRC/orthanc.json" >"$dir/config/orthanc.json"
  cp "$CONF_SRC/autoroute.lua" "$dir/config/autoroute.lua"
}

url() { echo "http://127.0.0.1:${ORTHANC_HTTP_PORT:-8042}"; }

answers() {
  curl -sf --max-time 2 -u "oct:$ORTHANC_PASSWORD" "$(url)/system" >/dev/null 2>&1
}

start() {
  local dir=${1:?usage: orthanc.sh start DIR}
  [ -n "${ORTHANC_PASSWORD:-}" ] || die "set ORTHANC_PASSWORD (user oct's password): there is no default"
  installed || die "Orthanc is not installed: run scripts/orthanc.sh install"
  dir=$(mkdir -p "$dir" && cd "$dir" && pwd)
  if [ -f "$dir/orthanc.pid" ] && kill -0 "$(cat "$dir/orthanc.pid")" 2>/dev/null; then
    die "already running (pid $(cat "$dir/orthanc.pid")) for $dir"
  fi
  render "$dir"
  ORTHANC_STORAGE_DIR="$dir/db" ORTHANC_CONFIG_DIR="$dir/config" ORTHANC_DICOMWEB_PLUGIN="$PLUGIN" \
    nohup Orthanc "$dir/config/orthanc.json" >>"$dir/orthanc.log" 2>&1 </dev/null &
  echo $! >"$dir/orthanc.pid"
  for _ in $(seq 1 100); do
    if answers; then
      echo "orthanc.sh: Orthanc answers on $(url) (pid $(cat "$dir/orthanc.pid"), storage $dir/db)"
      return 0
    fi
    kill -0 "$(cat "$dir/orthanc.pid")" 2>/dev/null || die "Orthanc exited: $(tail -3 "$dir/orthanc.log")"
    sleep 0.2
  done
  die "Orthanc did not answer on $(url) within 20 s: $(tail -3 "$dir/orthanc.log")"
}

stop() {
  local dir=${1:?usage: orthanc.sh stop DIR}
  [ -f "$dir/orthanc.pid" ] || { echo "orthanc.sh: not running (no $dir/orthanc.pid)"; return 0; }
  local pid
  pid=$(cat "$dir/orthanc.pid")
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$dir/orthanc.pid"
  echo "orthanc.sh: stopped pid $pid"
}

case "${1:-}" in
  install) install ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  status) answers ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
