#!/usr/bin/env bash
# Create (or update) the project's virtual environment. Idempotent: re-running installs only when requirements.lock,
# pyproject.toml or TORCH_SPEC changed.
# Every dependency comes from requirements.lock: each release pinned, each file checked against its sha256 (pip's
# --require-hashes), torch included (the same wheel as PyPI's). To change a dependency, edit pyproject.toml and run
# `bash scripts/lock.sh` (see its header; `--upgrade-package NAME` moves one package).
#   VENV        where the environment goes (default .venv)
#   PYTHON      the interpreter that creates it (3.11+)
#   TORCH_SPEC  another PyTorch build than the locked one, e.g. "torch==2.14.1+cpu torchvision==0.29.1+cpu
#               --index-url <PyTorch's CPU index>": installed after the lock, which then provides everything else
#               (torch, torchvision and their CUDA libraries excepted) with its hashes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-}
LOCK=requirements.lock
# 3.11: asyncio.TimeoutError is TimeoutError from 3.11 on; the PACS delivery loop relies on it.
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: Python 3.11+ is required" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
stamp=$VENV/.oct-installed
want="lock $(cat "$LOCK" pyproject.toml | sha256sum | cut -c1-16) torch ${TORCH_SPEC:-locked}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing $LOCK (first time: a few minutes)"
  if [ -z "$TORCH_SPEC" ]; then
    # --no-deps: the lock is complete; what it does not list is not installed.
    "${PIP[@]}" install --require-hashes --no-deps -r "$LOCK"
  else
    filtered=$(mktemp); trap 'rm -f "$filtered"' EXIT
    # The lock without the torch build's own packages (an entry runs from its name line to the next one).
    awk '/^[a-z0-9]/ { skip = /^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==/ } !skip' "$LOCK" > "$filtered"
    "${PIP[@]}" install --require-hashes --no-deps -r "$filtered"
    echo "setup: installing $TORCH_SPEC"
    # shellcheck disable=SC2086  # the spec is a list of requirements and options
    "${PIP[@]}" install $TORCH_SPEC
  fi
  echo "setup: installing the project (editable, no dependencies: they came from the lock)"
  # setuptools, the build backend, is in the lock: building in this environment fetches nothing unhashed.
  "${PIP[@]}" install --no-deps --no-build-isolation -e .
  "${PIP[@]}" check
  echo "$want" > "$stamp"
fi
echo "setup: $VENV ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
