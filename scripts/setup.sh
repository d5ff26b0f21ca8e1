#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv. Idempotent: re-running only installs what changed.
# TORCH_SPEC picks the PyTorch build (default: the release this project is tested with, and the torchvision release
# made for it: an unpinned torchvision may pull another torch); PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
# 3.11: asyncio.TimeoutError is TimeoutError from 3.11 on; the PACS delivery loop relies on it.
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: Python 3.11+ is required" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
stamp=.venv/.oct-installed
want="$TORCH_SPEC $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first and pinned: the project states only a lower bound, and an unpinned resolve may pull a newer
  # multi-GB build than the one this project is tested with.
  echo "setup: installing $TORCH_SPEC (first time: a few minutes)"
  # shellcheck disable=SC2086  # the spec is a list of requirements
  "${PIP[@]}" install $TORCH_SPEC
  echo "setup: installing the project and its dependencies"
  "${PIP[@]}" install -e '.[dev]'
  echo "$want" > "$stamp"
fi
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
