#!/usr/bin/env bash
# The whole test suite from a fresh clone: environment, the real Orthanc the PACS tests talk to, lint, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f scripts/orthanc.sh ]; then
  bash scripts/orthanc.sh install || echo "test: Orthanc could not be installed; the PACS end-to-end tests will say so"
fi
# dciodvfy (Debian's dicom3tools) checks the SR and Secondary Capture the service builds (tests/pacs/test_conformance.py).
if ! command -v dciodvfy >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  { command -v apt-get >/dev/null 2>&1 && $sudo apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends dicom3tools; } \
    || echo "test: dicom3tools could not be installed; the DICOM conformance tests will be skipped and say so"
fi
echo "test: ruff check"
.venv/bin/ruff check .
echo "test: pytest"
exec .venv/bin/python -m pytest "$@"
