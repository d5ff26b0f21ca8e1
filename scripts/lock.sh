#!/usr/bin/env bash
# Regenerates the lock files from pyproject.toml, every release pinned with the sha256 of each of its files:
#   requirements.lock        the dev extra (tests, lint, training, serving): scripts/setup.sh and so CI install it
#   requirements-serve.lock  the serve extra: Dockerfile.gpu's `serve` image
#   requirements-train.lock  the train extra: Dockerfile.gpu's `train` image
# The last two are resolved inside the first (-c), so the images run the releases the tests ran.
#
#   bash scripts/lock.sh                             # after editing pyproject.toml: adds what it gained, keeps the rest
#   bash scripts/lock.sh --upgrade-package fastapi   # one package to its newest release that fits pyproject.toml
#   bash scripts/lock.sh --upgrade                   # everything to its newest release, torch excepted
#
# Needs uv (`pip install uv`, or UV=/path/to/uv). Torch stays pinned by TORCH_PINS below, whatever the options: the
# release this project is tested with, and the torchvision made for it (each torchvision requires one torch).
# The lock is universal (markers, not this machine's platform) from Python 3.11 on, so the Ubuntu image's 3.12
# installs from it too.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
common=(--universal --python-version 3.11 --generate-hashes --quiet --custom-compile-command "bash scripts/lock.sh")
# setuptools is the build backend: locked, so the project itself installs with --no-build-isolation and nothing
# unhashed is fetched to build it.
printf '%s\n' "setuptools>=68" "${TORCH_PINS[@]}" \
  | "$UV" pip compile pyproject.toml - --extra dev -o requirements.lock "${common[@]}" "$@"
for extra in serve train; do
  printf '%s\n' "setuptools>=68" \
    | "$UV" pip compile pyproject.toml - --extra "$extra" -c requirements.lock -o "requirements-$extra.lock" "${common[@]}"
done
echo "lock: requirements.lock requirements-serve.lock requirements-train.lock"
