#!/bin/sh
# pip-install-locked LOCK: install an image's dependencies from its lock file (scripts/lock.sh writes it), then the
# project in the working directory. Run in Dockerfile.gpu's build stages.
# Every file is checked against the lock's sha256 (--require-hashes) and nothing outside the lock is installed
# (--no-deps: the lock is complete). With TORCH_INDEX_URL set, the torch build's own packages (torch, torchvision,
# triton, the CUDA libraries) are left out of that step, and the lock's torch and torchvision releases come from
# that index instead (a CPU or CUDA 12 build of the same release).
set -eu
lock=$1
if [ -z "${TORCH_INDEX_URL:-}" ]; then
  pip install --require-hashes --no-deps -r "$lock"
else
  # An entry runs from its name line to the next name line.
  awk '/^[a-z0-9]/ { skip = /^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==/ } !skip' "$lock" > /tmp/lock
  pip install --require-hashes --no-deps -r /tmp/lock
  # shellcheck disable=SC2046  # one argument per pinned release
  pip install --index-url "$TORCH_INDEX_URL" $(grep -E -o '^(torch|torchvision)==[^ ;]+' "$lock")
  rm /tmp/lock
fi
# setuptools, the build backend, is in the lock: the build fetches nothing unhashed.
pip install --no-deps --no-build-isolation .
pip check
