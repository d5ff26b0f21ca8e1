#!/usr/bin/env bash
# The whole test suite from a fresh clone: environment, the real Orthanc the PACS tests talk to, lint, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f scripts/orthanc.sh ]; then
  bash scripts/orthanc.sh install || echo "test: Orthanc could not be installed; the PACS end-to-end tests will say so"
fi
# System tools some tests drive, from Debian in one apt transaction; a test whose tool is missing skips and says why.
#   dciodvfy (dicom3tools): DICOM conformance of the SR and Secondary Capture the service builds
#   chromium: the viewer's browser tests, through Playwright (no browser download)
missing=()
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "test: installing ${missing[*]} from Debian"
  { command -v apt-get >/dev/null 2>&1 && $sudo apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"; } \
      >/dev/null 2>&1 || echo "test: could not install ${missing[*]}; the tests that need them will skip and say so"
fi
echo "test: ruff check"
.venv/bin/ruff check .
echo "test: pytest"
# Two processes (pytest-xdist), a test file to each in turn: most tests wait on servers, PACS answers and drains, not
# on the CPU, so two share 2 cores well. The trained tiny models are built once for both (tests/conftest.py).
# Arguments are passed on: `-n 0` runs in one process, a path runs one file.
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
