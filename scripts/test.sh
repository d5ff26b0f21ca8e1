#!/usr/bin/env bash
# The whole test suite from a fresh clone: environment, the real Orthanc the PACS tests talk to, lint, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f scripts/orthanc.sh ]; then
  bash scripts/orthanc.sh install || echo "test: Orthanc could not be installed; the PACS end-to-end tests will say so"
fi
# The viewer's browser tests drive Debian's chromium through Playwright (no browser download); without it they skip.
if ! command -v chromium >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "test: chromium could not be installed; the viewer's browser tests will say so"
fi
echo "test: ruff check"
.venv/bin/ruff check .
echo "test: pytest"
exec .venv/bin/python -m pytest "$@"
